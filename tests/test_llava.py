"""LLaVA-1.5 / LLaVA-NeXT integration on tiny random-weight models (SPEC sections 1-5).

The oracle of the reduced model is ``reduced_reference``: a from-scratch forward over the
stock modules, layer by layer, that drops at each stage the visual rows ``last_selection``
says were dropped and renumbers positions contiguously (SPEC 5). Every cached decoding
step of the integration must match it.
"""
from __future__ import annotations

import pytest
import torch

from pio_kernels.integrations import PioConfig, apply_pio, hf, last_selection, remove_pio

pytestmark = pytest.mark.integration

from llava_factory import IMAGE, VOCAB, eager_tower_attentions
from llava_factory import make_llava as _llava
from llava_factory import make_llava_encoder as _llava_encoder
from llava_factory import pad as _pad
from llava_factory import pixels as _pixels
from llava_factory import prompt as _prompt


def _enc_prompt(images: int, before=(1, 2, 3), after=(4, 5, 6, 7, 8)) -> list[int]:
    return _prompt(list(before), images, list(after), tokens=64)


def _enc_pixels(n: int, seed: int = 2) -> torch.Tensor:
    return _pixels(n, seed=seed, size=56)


def _causal(n: int, dtype, device="cpu") -> torch.Tensor:
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.zeros(1, 1, n, n, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def lm_reference(model, embeds: torch.Tensor, rows: torch.Tensor, is_image: torch.Tensor, layers: list[int],
                 kept: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one unpadded sample through the reduced language model, from scratch.

    ``embeds`` (1, S, D) enter layer 0; ``rows`` (S,) are their caller positions and
    ``is_image`` (S,) marks visual rows. Before layer ``layers[s]`` the visual rows whose
    caller position is not in ``kept[s]`` are dropped; positions are renumbered 0.. (SPEC 5).
    Returns the logits of the rows left after the last stage and their caller positions.
    """
    lm = model.model.language_model
    hidden = embeds
    for i, layer in enumerate(lm.layers):
        if i in layers:
            present = set(kept[layers.index(i)].tolist())
            sel = torch.tensor([j for j, r in enumerate(rows.tolist()) if not is_image[j] or r in present],
                               device=hidden.device)
            rows, is_image, hidden = rows[sel], is_image[sel], hidden[:, sel]
        pos = torch.arange(rows.numel(), device=hidden.device)[None]
        hidden = layer(hidden, attention_mask=_causal(rows.numel(), hidden.dtype, hidden.device),
                       position_embeddings=lm.rotary_emb(hidden, pos), position_ids=pos)
    return model.lm_head(lm.norm(hidden))[0], rows


@torch.no_grad()
def reduced_reference(model, ids: torch.Tensor, n_prompt: int, pixels: torch.Tensor, layers: list[int],
                      kept: list[torch.Tensor], **image_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``lm_reference`` on the stock embeddings of ``ids``: the prompt (``n_prompt`` tokens,
    images from ``pixels``) followed by generated tokens, which are never dropped."""
    mm, lm = model.model, model.model.language_model
    embeds = lm.embed_tokens(ids[None])
    feats = mm.get_image_features(pixel_values=pixels, **image_kwargs).pooler_output
    feats = torch.cat(list(feats)).to(embeds.dtype)
    is_image = (ids == IMAGE) & (torch.arange(ids.numel(), device=ids.device) < n_prompt)
    embeds = embeds.masked_scatter(is_image[:, None], feats)
    newline = getattr(mm, "image_newline", None)
    if newline is not None:  # LLaVA-NeXT's newline tokens are layout, never dropped (not visual tokens)
        is_image &= ~(embeds[0] == newline.to(embeds.dtype)).all(-1)
    return lm_reference(model, embeds, torch.arange(ids.numel(), device=ids.device), is_image, layers, kept)


def _generate(model, ids, pixels, steps, mask=None, **extra):
    if pixels is not None:
        extra["pixel_values"] = pixels
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, **extra,
                         do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)  # (B, S + steps), (B, steps, V)


def _hooks(model) -> list:
    return [(name, list(m._forward_pre_hooks.values()), list(m._forward_hooks.values()))
            for name, m in model.named_modules()]


# ------------------------------------------------------------------------------------------------
def test_full_budget_reproduces_stock_logits_and_remove_restores():
    model = _llava()
    ids = torch.tensor([_prompt([1, 2, 3], 2, [4, 5, 6, 7, 8])])
    px = _pixels(2)
    with torch.no_grad():
        stock = model(input_ids=ids, pixel_values=px).logits
        hooks_before = _hooks(model)
        apply_pio(model, PioConfig(layers=[2], keep=[16]))
        full = model(input_ids=ids, pixel_values=px).logits
        sel = last_selection(model)
        apply_pio_again = pytest.raises(ValueError)
        with apply_pio_again:
            apply_pio(model, PioConfig(layers=[2], keep=[16]))
        remove_pio(model)
        apply_pio(model, PioConfig(layers=[2], keep=[4]))
        reduced = model(input_ids=ids, pixel_values=px).logits
        remove_pio(model)
        back = model(input_ids=ids, pixel_values=px).logits
    assert torch.equal(full, stock)
    assert len(sel) == 1 and sel[0].tolist() == [list(range(3, 19)) + list(range(21, 37))]
    assert not torch.allclose(reduced[:, -1], stock[:, -1])  # selection changes the model
    assert torch.equal(back, stock)
    assert not hasattr(model, "_pio")
    assert "get_image_features" not in vars(model.model)
    assert _hooks(model) == hooks_before


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("stages", [([2], [5]), ([1, 3, 5], [12, 0.5, 2])], ids=["one", "three"])
def test_cached_decoding_equals_reduced_model_from_scratch(attn, stages):
    layers, keep = stages
    model = _llava(layers=6, attn=attn)
    ids = torch.tensor([_prompt([1, 2, 3], 2, [4, 5, 6, 7, 8])])
    px = _pixels(2)
    apply_pio(model, PioConfig(layers=layers, keep=keep))
    seq, logits = _generate(model, ids, px, steps=4)
    kept = last_selection(model)
    counts = [k.shape[1] for k in kept]
    assert counts == ([10] if len(layers) == 1 else [24, 12, 4])
    for a, b in zip(kept, kept[1:]):
        assert set(b.tolist()[0]) <= set(a.tolist()[0])
    # the KV cache of every layer holds the rows that layer saw: S before layers[0], fewer after
    with torch.no_grad():
        cache = hf.output_cache(model(input_ids=ids, pixel_values=px, use_cache=True))
    seen = [ids.shape[1]] * layers[0] + sum(([ids.shape[1] - 32 + c] * (b - a) for a, b, c in
                                             zip(layers, layers[1:] + [6], counts)), [])
    assert [hf.stored_length(cache, i) for i in range(6)] == seen
    ref, rows = reduced_reference(model, seq[0, :-1], ids.shape[1], px, layers, [k[0] for k in kept])
    prompt_rows = (rows < ids.shape[1]).sum()
    # logits of the last prompt row and of every decoded token, against the same rows from scratch
    torch.testing.assert_close(logits[0], ref[prompt_rows - 1:], rtol=1e-4, atol=1e-4, equal_nan=True)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp_min(0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(side):
    model = _llava(layers=4)
    rows = [_prompt([1, 2], 1, [4, 5, 6, 7, 8]), _prompt([1, 2, 3, 9, 10], 2, [4, 5, 6, 7, 8, 11])]
    pixels = [_pixels(1, seed=3), _pixels(2, seed=4)]
    ids, mask = _pad(rows, side)
    apply_pio(model, PioConfig(layers=[1, 3], keep=[6, 0.5]))
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                      pixel_values=torch.cat(pixels)).logits
        sel_batch = last_selection(model)
        for b, r in enumerate(rows):
            alone = model(input_ids=torch.tensor([r]), pixel_values=pixels[b]).logits[0]
            sel_alone = last_selection(model)
            offset = ids.shape[1] - len(r) if side == "left" else 0
            torch.testing.assert_close(batch[b, offset:offset + len(r)], alone, rtol=1e-5, atol=1e-5, equal_nan=True)
            for s_b, s_a in zip(sel_batch, sel_alone):
                got = s_b[b][s_b[b] >= 0] - offset
                assert got.tolist() == s_a[0].tolist()
    assert [s.shape[1] for s in sel_batch] == [12, 6]
    assert (sel_batch[0][0] == -1).sum() == 6  # the one-image sample is padded with -1


@pytest.fixture(params=["fast", "reference"])
def probe(request, monkeypatch):
    """Runs a test with the engine's saliency probe as shipped, and forced to the reference
    (the path of layers without a fast path: it calls the layer itself, with hooks installed)."""
    if request.param == "reference":
        import pio_kernels
        monkeypatch.setattr(pio_kernels, "proxy_saliency", pio_kernels.reference.proxy_saliency)
    return request.param


def test_inference_mode_equals_no_grad(probe):
    model = _llava(layers=4)
    ids = torch.tensor([_prompt([1, 2, 3], 1, [4, 5, 6, 7, 8])])
    apply_pio(model, PioConfig(layers=[1, 3], keep=[6, 2]))
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=_pixels(1)).logits
    with torch.inference_mode():
        got = model(input_ids=ids, pixel_values=_pixels(1)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_output_hidden_states_has_one_entry_per_layer(probe):
    model = _llava(layers=4)
    ids = torch.tensor([_prompt([1, 2, 3], 1, [4, 5, 6, 7, 8])])
    apply_pio(model, PioConfig(layers=[2], keep=[4]))
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=_pixels(1), output_hidden_states=True)
    # embeddings, then every layer's output: layers from 2 on see 24 - 12 rows
    assert [h.shape[1] for h in out.hidden_states] == [24, 24, 24, 12, 12]


def test_batch_mixing_a_text_only_sample_equals_each_sample_alone():
    model = _llava(layers=4)
    rows = [[1, 2, 3, 4, 5, 6, 7], _prompt([1, 2, 3], 1, [4, 5, 6, 7, 8])]
    ids, mask = _pad(rows, "left")
    apply_pio(model, PioConfig(layers=[2], keep=[4]))
    seq, logits = _generate(model, ids, _pixels(1), steps=3, mask=mask)
    assert (last_selection(model)[0][0] == -1).all() and (last_selection(model)[0][1] >= 0).sum() == 4
    for b, (r, px) in enumerate(zip(rows, (None, _pixels(1)))):
        seq_a, logits_a = _generate(model, torch.tensor([r]), px, steps=3)
        assert seq[b, ids.shape[1]:].tolist() == seq_a[0, len(r):].tolist()
        torch.testing.assert_close(logits[b], logits_a[0], rtol=1e-4, atol=1e-4, equal_nan=True)


def test_left_padded_generate_equals_each_sample_alone():
    model = _llava(layers=4)
    rows = [_prompt([1, 2], 1, [4, 5, 6]), _prompt([1, 2, 3, 9, 10], 2, [4, 5, 6, 7, 8, 11])]
    pixels = [_pixels(1, seed=3), _pixels(2, seed=4)]
    ids, mask = _pad(rows, "left")
    apply_pio(model, PioConfig(layers=[2], keep=[3]))
    seq, logits = _generate(model, ids, torch.cat(pixels), steps=3, mask=mask)
    for b, r in enumerate(rows):
        seq_a, logits_a = _generate(model, torch.tensor([r]), pixels[b], steps=3)
        assert seq[b, ids.shape[1]:].tolist() == seq_a[0, len(r):].tolist()
        torch.testing.assert_close(logits[b], logits_a[0], rtol=1e-4, atol=1e-4, equal_nan=True)


def test_bf16_error_within_twice_pytorch_bf16_error():
    model32 = _llava(layers=4)
    model16 = _llava(layers=4, dtype=torch.bfloat16)
    ids = torch.tensor([_prompt([1, 2, 3], 2, [4, 5, 6, 7, 8])])
    px = _pixels(2)
    apply_pio(model16, PioConfig(layers=[1, 3], keep=[8, 3]))
    seq, logits = _generate(model16, ids, px.bfloat16(), steps=3)
    kept = [k[0] for k in last_selection(model16)]
    remove_pio(model16)
    ref32, rows = reduced_reference(model32, seq[0, :-1], ids.shape[1], px, [1, 3], kept)
    ref16, _ = reduced_reference(model16, seq[0, :-1], ids.shape[1], px.bfloat16(), [1, 3], kept)
    n = logits.shape[1]
    err_pio = (logits[0].float() - ref32[-n:]).abs().max()
    err_torch = (ref16[-n:].float() - ref32[-n:]).abs().max()
    assert err_torch > 0  # the comparison would be vacuous otherwise
    assert err_pio <= 2 * err_torch + 1e-6, (err_pio, err_torch)


def test_text_only_prompt_is_untouched():
    model = _llava(layers=4)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        apply_pio(model, PioConfig(layers=[1], keep=[2]))
        out = model(input_ids=ids).logits
    seq, _ = _generate(model, ids, None, steps=2)
    remove_pio(model)
    seq_stock, _ = _generate(model, ids, None, steps=2)
    assert torch.equal(out, stock)
    assert torch.equal(seq, seq_stock)


@pytest.mark.parametrize("kwargs", [
    dict(layers=[], keep=[]), dict(layers=[0], keep=[4]), dict(layers=[3, 2], keep=[4, 2]),
    dict(layers=[2, 2], keep=[4, 2]), dict(layers=[2], keep=[4, 2]), dict(layers=[2], keep=[0]),
    dict(layers=[2], keep=[1.5]), dict(layers=[2], keep=[0.0]), dict(layers=[1, 2], keep=[2, 4]),
    dict(layers=[2], keep=["4"]), dict(layers=[2.0], keep=[4]), dict(layers=[2], keep=[4], tau=float("nan")),
    dict(layers=[2], keep=[4], num_positions=0), dict(layers=[2], keep=[4], encoder_keep=0),
    dict(layers=[2], keep=[8], encoder_keep=4), dict(layers=[2], keep=[True]),
])
def test_bad_configs_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        PioConfig(**kwargs)


def test_schedule_past_the_last_layer_and_unsupported_models():
    model = _llava(layers=4)
    with pytest.raises(ValueError, match="layers"):
        apply_pio(model, PioConfig(layers=[4], keep=[2]))
    assert not hasattr(model, "_pio")
    from transformers import LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=50))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        apply_pio(llama, PioConfig(layers=[1], keep=[2]))
    with pytest.raises(TypeError, match="PioConfig"):
        apply_pio(model, {"layers": [1], "keep": [2]})


# ------------------------------------------------------------------------------------------------
# LLaVA-NeXT: anyres crops, unpadding and newline tokens give every image its own token count
def _llava_next(layers: int = 4, attn: str = "sdpa", seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=7)
    text = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                             image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(config).eval()


NEXT_SIZES = torch.tensor([[28, 56], [50, 30], [56, 56]])  # 52, 56 and 88 tokens


def _next_newlines(model, sizes: torch.Tensor) -> list[int]:
    """Newline tokens of each image of ``sizes`` after packing (crops of 16 patches)."""
    crops = hf.llava_next_crops(model.config, sizes)
    index = torch.arange(sum(crops) * 16, dtype=torch.float64).view(sum(crops), 16, 1)
    packed, _ = model.model.pack_image_features(torch.split(index, crops), sizes, "default",
                                                image_newline=torch.tensor([-1.0], dtype=torch.float64))
    return [int((p[:, 0] < 0).sum()) for p in packed]


def _next_inputs(model, images: list[int], seed: int = 5):
    """Pixel values (n, 5, 3, 28, 28), image sizes and per-image token counts for NEXT_SIZES[images]."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(images), 5, 3, 28, 28, generator=g)
    sizes = NEXT_SIZES[images]
    with torch.no_grad():
        counts = [f.shape[0] for f in model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output]
    return pixels, sizes, counts


def _next_prompt(counts: list[int], before=(1, 2), after=(4, 5, 6, 7)) -> list[int]:
    ids = list(before)
    for i, n in enumerate(counts):
        ids += ([7, 8] if i else []) + [IMAGE] * n
    return ids + list(after)


def test_llava_next_varying_counts_fraction_budgets_and_padded_batch():
    model = _llava_next()
    px0, sz0, c0 = _next_inputs(model, [0])
    px1, sz1, c1 = _next_inputs(model, [1, 2], seed=6)
    assert c0 + c1 == [52, 56, 88]
    visual = [c - n for c, n in zip(c0 + c1, _next_newlines(model, torch.cat([sz0, sz1])))]
    rows = [_next_prompt(c0), _next_prompt(c1, before=(1, 2, 3))]
    ids, mask = _pad(rows, "left")
    apply_pio(model, PioConfig(layers=[2], keep=[0.25]))
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                      pixel_values=torch.cat([px0, px1]), image_sizes=torch.cat([sz0, sz1])).logits
        sel = last_selection(model)[0]
        # a quarter of each image's visual tokens (newline tokens are layout: kept, not counted)
        assert ((sel >= 0).sum(1)).tolist() == [visual[0] // 4, visual[1] // 4 + visual[2] // 4]
        for b, (r, px, sz) in enumerate(zip(rows, (px0, px1), (sz0, sz1))):
            alone = model(input_ids=torch.tensor([r]), pixel_values=px, image_sizes=sz).logits[0]
            offset = ids.shape[1] - len(r)
            torch.testing.assert_close(batch[b, offset:], alone, rtol=1e-5, atol=1e-5, equal_nan=True)
            assert (sel[b][sel[b] >= 0] - offset).tolist() == last_selection(model)[0][0].tolist()


def test_llava_next_cached_decoding_equals_reduced_model_from_scratch():
    model = _llava_next(layers=4)
    px, sz, counts = _next_inputs(model, [1, 2])
    ids = torch.tensor([_next_prompt(counts)])
    apply_pio(model, PioConfig(layers=[1, 3], keep=[30, 0.5]))
    seq, logits = _generate(model, ids, px, steps=3, image_sizes=sz)
    kept = last_selection(model)
    assert [k.shape[1] for k in kept] == [60, 30]
    ref, rows = reduced_reference(model, seq[0, :-1], ids.shape[1], px, [1, 3], [k[0] for k in kept],
                                  image_sizes=sz)
    torch.testing.assert_close(logits[0], ref[-logits.shape[1]:], rtol=1e-4, atol=1e-4, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# Encoder-side selection (SPEC 4), LLaVA-1.5: an 8 x 8 patch grid, windows of 2 x 2 (16 windows)
def test_split_local_global_and_merge_dropped_rules():
    from pio_kernels.integrations.engine import merge_dropped, split_local_global
    # 5 x 5 grid, windows 2 x 2: 9 windows (edge windows smaller); budget 20 -> 1 local per window
    g = torch.Generator().manual_seed(0)
    shallow, deep = torch.rand(2, 25, generator=g), torch.rand(2, 25, generator=g)
    kept = split_local_global(shallow, deep, (5, 5), torch.tensor([20, 7]), (2, 2))
    window = [(r // 2) * 3 + c // 2 for r in range(5) for c in range(5)]
    for i, budget in enumerate((20, 7)):
        per = (budget // 2) // 9  # 1 for 20, 0 for 7: all global
        local = [max((c for c in range(25) if window[c] == w), key=lambda c: (float(shallow[i, c]), -c))
                 for w in range(9)][:9 * per]
        rest = sorted((c for c in range(25) if c not in local), key=lambda c: (-float(deep[i, c]), c))
        assert kept[i].nonzero().flatten().tolist() == sorted(local + rest[:budget - len(local)])
    # ties go to the lower index; unavailable tokens are never kept and their windows do not count
    flat = torch.zeros(1, 25)
    available = torch.ones(1, 25, dtype=torch.bool)
    available[0, :10] = False
    assert split_local_global(flat, flat, (5, 5), 3, (5, 5), available)[0].nonzero().flatten().tolist() == [10, 11, 12]
    with pytest.raises(ValueError, match="budget"):
        split_local_global(flat, flat, (5, 5), 16, (5, 5), available)
    # merging: each dropped row joins its most similar kept row of its span; kept rows become means
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [5.0, 5.0]])[None]
    keep = torch.tensor([[True, True, False, False, False, True]])
    group = torch.tensor([[0, 0, 0, 0, 0, -1]])
    merged = merge_dropped(feats, keep, group)
    torch.testing.assert_close(merged[0, [0, 1]], torch.stack([feats[0, [0, 2]].mean(0), feats[0, [1, 3, 4]].mean(0)]))
    assert torch.equal(merged[0, 2:], feats[0, 2:])  # dropped rows and rows outside any span are left as they were
    # spans do not mix: the same rows in two spans merge within each
    two = merge_dropped(feats, keep, torch.tensor([[0, 1, 0, 1, 1, -1]]))
    torch.testing.assert_close(two[0, 0], feats[0, [0, 2]].mean(0))
    torch.testing.assert_close(two[0, 1], feats[0, [1, 3, 4]].mean(0))
    assert torch.equal(merge_dropped(feats, torch.ones(1, 6, dtype=torch.bool), group), feats)


def _expected_encoder_selection(model, pixels: torch.Tensor, budget: int) -> list[list[int]]:
    """Kept patches per image from full eager attention maps (the literal SPEC 4 recipe)."""
    maps = eager_tower_attentions(model, pixels)
    shallow = maps[5][:, :, 0, 1:].mean(1)          # layer 5
    deep = maps[len(maps) - 2][:, :, 0, 1:].mean(1)  # the layer producing hidden_states[-2]
    out = []
    for i in range(pixels.shape[0]):
        per_window = (budget // 2) // 16
        local = []
        for wy in range(4):
            for wx in range(4):
                cells = [(2 * wy + dy) * 8 + 2 * wx + dx for dy in range(2) for dx in range(2)]
                cells.sort(key=lambda c: (-float(shallow[i, c]), c))
                local += cells[:per_window]
        rest = sorted((c for c in range(64) if c not in local), key=lambda c: (-float(deep[i, c]), c))
        out.append(sorted(local + rest[:budget - len(local)]))
    return out


def _lm_inputs(model) -> list:
    """Records the inputs_embeds of every language-model call."""
    seen = []
    model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    return seen


def test_encoder_full_budget_reproduces_stock_logits():
    model = _llava_encoder()
    ids, px = torch.tensor([_enc_prompt(2)]), _enc_pixels(2)
    with torch.no_grad():
        stock = model(input_ids=ids, pixel_values=px).logits
        apply_pio(model, PioConfig(layers=[2], keep=[1.0], encoder_keep=64))
        out = model(input_ids=ids, pixel_values=px).logits
    assert torch.equal(out, stock)
    assert last_selection(model, encoder=True)[0].tolist() == list(range(3, 67)) + list(range(69, 133))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_encoder_selection_counts_split_and_merging_means(attn):
    model = _llava_encoder(attn)
    ids, px = torch.tensor([_enc_prompt(2)]), _enc_pixels(2)
    with torch.no_grad():
        stock_feats = model.model.get_image_features(pixel_values=px).pooler_output
    expected = _expected_encoder_selection(model, px, 40)
    apply_pio(model, PioConfig(layers=[2], keep=[10], encoder_keep=40))
    seen = _lm_inputs(model)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px).logits
    enc = last_selection(model, encoder=True)[0]
    assert out.shape[1] == ids.shape[1]  # logits line up with the caller's rows
    assert enc.numel() == 80
    starts = (3, 69)
    got = [(enc[(enc >= s) & (enc < s + 64)] - s).tolist() for s in starts]
    assert got == expected
    lm_in = seen[0][0]
    assert lm_in.shape[0] == ids.shape[1] - 2 * 24
    visual_rows = torch.cat([torch.arange(3, 43), torch.arange(45, 85)])  # LM rows of the kept tokens
    for i, kept in enumerate(got):
        feats = stock_feats[i].float()
        unit = torch.nn.functional.normalize(feats, dim=-1)
        dropped = [c for c in range(64) if c not in kept]
        target = (unit[dropped] @ unit[kept].T).argmax(1)
        want = feats[kept].clone()
        for j, kept_j in enumerate(kept):
            members = [feats[kept_j]] + [feats[d] for d, t in zip(dropped, target.tolist()) if t == j]
            want[j] = torch.stack(members).mean(0)
        torch.testing.assert_close(lm_in[visual_rows[40 * i:40 * (i + 1)]], want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_encoder_selection_cached_decoding_equals_reduced_model_from_scratch():
    model = _llava_encoder()
    ids, px = torch.tensor([_enc_prompt(2)]), _enc_pixels(2)
    apply_pio(model, PioConfig(layers=[1, 3], keep=[20, 6], encoder_keep=0.5))
    seen = _lm_inputs(model)
    seq, logits = _generate(model, ids, px, steps=3)
    enc = last_selection(model, encoder=True)[0]
    kept = [k[0] for k in last_selection(model)]
    assert enc.numel() == 64 and [k.numel() for k in kept] == [40, 12]
    lm = model.model.language_model
    prompt_rows = torch.cat([torch.tensor([0, 1, 2]), enc[:32], torch.tensor([67, 68]), enc[32:],
                             torch.arange(133, 138)])
    generated = seq[0, ids.shape[1]:-1]
    with torch.no_grad():
        embeds = torch.cat([seen[0], lm.embed_tokens(generated[None])], dim=1)
    rows = torch.cat([prompt_rows, torch.arange(ids.shape[1], ids.shape[1] + generated.numel())])
    is_image = torch.zeros(rows.numel(), dtype=torch.bool)
    is_image[3:35] = True
    is_image[37:69] = True
    ref, _ = lm_reference(model, embeds, rows, is_image, [1, 3], kept)
    torch.testing.assert_close(logits[0], ref[-logits.shape[1]:], rtol=1e-4, atol=1e-4, equal_nan=True)


def test_encoder_selection_left_padded_batch_equals_each_sample_alone():
    model = _llava_encoder()
    rows = [_enc_prompt(1, before=(1, 2)), _enc_prompt(2)]
    pixels = [_enc_pixels(1, seed=3), _enc_pixels(2, seed=4)]
    ids, mask = _pad(rows, "left")
    apply_pio(model, PioConfig(layers=[2], keep=[8], encoder_keep=24))
    seq, logits = _generate(model, ids, torch.cat(pixels), steps=3, mask=mask)
    enc = last_selection(model, encoder=True)
    for b, r in enumerate(rows):
        seq_a, logits_a = _generate(model, torch.tensor([r]), pixels[b], steps=3)
        offset = ids.shape[1] - len(r)
        assert (enc[b][enc[b] >= 0] - offset).tolist() == last_selection(model, encoder=True)[0].tolist()
        assert seq[b, ids.shape[1]:].tolist() == seq_a[0, len(r):].tolist()
        torch.testing.assert_close(logits[b], logits_a[0], rtol=1e-4, atol=1e-4, equal_nan=True)


def test_encoder_selection_is_refused_where_unsupported():
    model = _llava()
    model.config.vision_feature_select_strategy = "full"  # CLS among the features
    with pytest.raises(ValueError, match="encoder_keep"):
        apply_pio(model, PioConfig(layers=[2], keep=[8], encoder_keep=24))


def test_llava_next_encoder_selection_per_crop():
    model = _llava_next()
    px, sz, counts = _next_inputs(model, [1, 2])  # 5 crops each; 56 and 88 tokens after packing
    ids = torch.tensor([_next_prompt(counts)])
    with torch.no_grad():
        stock = model(input_ids=ids, pixel_values=px, image_sizes=sz).logits
        apply_pio(model, PioConfig(layers=[2], keep=[1.0], encoder_keep=1.0))
        full = model(input_ids=ids, pixel_values=px, image_sizes=sz).logits
        remove_pio(model)
        # which packed rows come from which crop, and which are newline tokens
        mm = model.model
        index = torch.arange(10 * 16, dtype=torch.float64).view(10, 16, 1)
        packed, _ = mm.pack_image_features(torch.split(index, [5, 5]), sz, "default",
                                           image_newline=torch.tensor([-1.0], dtype=torch.float64))
        apply_pio(model, PioConfig(layers=[2], keep=[10], encoder_keep=0.5))
        seen = _lm_inputs(model)
        reduced = model(input_ids=ids, pixel_values=px, image_sizes=sz).logits
    # generate encodes the images before its prefill (mm_encoder_outputs): same result
    _, logits = _generate(model, ids, px, steps=2, image_sizes=sz)
    torch.testing.assert_close(logits[0, 0], reduced[0, -1], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(full, stock)
    enc = last_selection(model, encoder=True)[0]
    starts = [2, 2 + counts[0] + 2]
    newlines = 0
    for i, (start, src) in enumerate(zip(starts, packed)):
        src = src[:, 0].long()
        kept = enc[(enc >= start) & (enc < start + counts[i])] - start
        assert not src[kept].lt(0).any()  # newline tokens are not visual tokens: never in a selection
        newlines += int(src.lt(0).sum())
        for crop in range(5 * i, 5 * i + 5):
            in_crop = (src >= 0) & (src // 16 == crop)
            n = int(in_crop.sum())
            assert int(in_crop[kept].sum()) == max(1, int(0.5 * n)), (crop, n)
    # the language model gets the kept visual tokens, every newline token and the text
    assert seen[0].shape[1] == ids.shape[1] - (counts[0] + counts[1] - newlines - enc.numel())
    assert [k.shape[1] for k in last_selection(model)] == [20]


# ------------------------------------------------------------------------------------------------
# CUDA, bf16 (unverified in CPU-only sessions: these skip there)
def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attn", ["sdpa-flash", "flash_attention_2"])
@pytest.mark.parametrize("stages", [([2], [5]), ([1, 3, 5], [12, 0.5, 2])], ids=["one", "three"])
def test_cuda_bf16_cached_decoding_against_fp32_reduced_model(attn, stages):
    if attn == "flash_attention_2" and not _has_flash_attn():
        pytest.skip("flash_attn is not installed")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    layers, keep = stages
    impl = "sdpa" if attn == "sdpa-flash" else attn
    model16 = _llava(layers=6, attn=impl).to("cuda", torch.bfloat16)
    model32 = _llava(layers=6).to("cuda")
    ids = torch.tensor([_prompt([1, 2, 3], 2, [4, 5, 6, 7, 8])], device="cuda")
    px = _pixels(2).cuda()
    apply_pio(model16, PioConfig(layers=layers, keep=keep))
    if attn == "sdpa-flash":
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            seq, logits = _generate(model16, ids, px.bfloat16(), steps=4)
    else:
        seq, logits = _generate(model16, ids, px.bfloat16(), steps=4)
    kept = [k[0].cpu() for k in last_selection(model16)]
    remove_pio(model16)
    model16.config.text_config._attn_implementation = "sdpa"  # the reference passes explicit masks
    ids_all = seq[0, :-1]
    ref32, _ = reduced_reference(model32, ids_all, ids.shape[1], px, layers, kept)
    ref16, _ = reduced_reference(model16, ids_all, ids.shape[1], px.bfloat16(), layers, kept)
    n = logits.shape[1]
    err_pio = (logits[0].float() - ref32[-n:]).abs().max()
    err_torch = (ref16[-n:].float() - ref32[-n:]).abs().max()
    assert err_pio <= 2 * err_torch + 1e-6, (err_pio, err_torch)


def test_encoder_selection_keeps_stage_budgets_per_image_for_adjacent_images():
    # Two images with no text between them: after the encoder side, the stage must still tell
    # where one image ends (from the reduced features), not take both for one run of tokens.
    model = _llava_encoder()
    ids = torch.tensor([[1, 2, 3] + [IMAGE] * 128 + [4, 5, 6, 7, 8]])
    apply_pio(model, PioConfig(layers=[2], keep=[10], encoder_keep=40))
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=_enc_pixels(2))
        kept = last_selection(model)[0][0]
    finally:
        remove_pio(model)
    kept = kept[kept >= 0]
    assert int(((kept >= 3) & (kept < 67)).sum()) == 10
    assert int(((kept >= 67) & (kept < 131)).sum()) == 10
