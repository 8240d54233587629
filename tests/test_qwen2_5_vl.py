"""Qwen2.5-VL integration (issue 6) on tiny random-weight models built from configs."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from pio_kernels.integrations import PioConfig, apply_pio, hf, last_selection, remove_pio
from pio_kernels.integrations.engine import merge_dropped, resolve_budget, window_global
from pio_kernels.integrations.models import qwen2_5_vl as qwen
from qwen2_5_vl_factory import IMAGE, make_inputs, make_model
from qwen_vl_reference import eager_attention_weights, visual_ids

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- encoder side, pieces

def window_global_selection(local, global_, h, w, budget, window=4):
    """Kept indices of one frame by the engine's batched rule."""
    return window_global(local[None], global_[None], h, w, budget, window)[0].nonzero().squeeze(1)


def _brute_window_global(local, global_, h, w, budget, window):
    """The greedy walk of SPEC section 4 written out literally."""
    n_local = budget // 2
    windows_h, windows_w = max(1, h // window), max(1, w // window)
    cap = math.ceil(n_local / (windows_h * windows_w))
    count, keep = {}, []
    by_local = sorted(range(h * w), key=lambda i: (-float(local[i]), i))
    for i in by_local:
        if len(keep) == n_local:
            break
        win = (min(i // w // window, windows_h - 1), min(i % w // window, windows_w - 1))
        if count.get(win, 0) < cap:
            count[win] = count.get(win, 0) + 1
            keep.append(i)
    for i in by_local:
        if len(keep) == n_local:
            break
        if i not in keep:
            keep.append(i)
    for i in sorted(range(h * w), key=lambda i: (-float(global_[i]), i)):
        if len(keep) == budget:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


@pytest.mark.parametrize("h,w,budget,window", [(6, 10, 12, 4), (2, 2, 3, 4), (8, 8, 20, 4), (4, 6, 7, 2),
                                               (6, 6, 35, 4), (10, 3, 9, 4), (5, 7, 1, 4), (4, 4, 16, 4)])
def test_window_global_selection_matches_greedy_walk(h, w, budget, window):
    g = torch.Generator().manual_seed(h * 100 + w)
    local = torch.rand(h * w, generator=g)
    global_ = torch.rand(h * w, generator=g)
    local[3 % (h * w)] = local[0]  # a tie
    kept = window_global_selection(local, global_, h, w, budget, window)
    assert kept.tolist() == _brute_window_global(local, global_, h, w, min(budget, h * w), window)


def test_window_global_selection_spreads_local_half():
    # The local map is largest in one window; the local half still takes one token per window
    # (the lowest index where a window is all ties), the global half the top of its own map.
    h = w = 8
    local = torch.zeros(h, w)
    local[:4, :4] = 10 + torch.arange(16.0).view(4, 4)
    kept = window_global_selection(local.flatten(), torch.arange(h * w, dtype=torch.float), h, w,
                                        budget=8, window=4)
    assert kept.tolist() == [4, 27, 32, 36, 60, 61, 62, 63]


def test_vision_column_scores_match_full_attention_map():
    model = make_model(attn="eager")
    block = model.model.visual.blocks[1]
    n, cu = 40, torch.tensor([0, 16, 40], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 32, generator=g)
    angles = torch.randn(n, 8, generator=g)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    scores = qwen.vision_column_scores(block.attn, x, cu, (cos, sin))
    # Reference: the whole block-diagonal map, materialised.
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    q, k, _ = block.attn.qkv(x).reshape(n, 3, 2, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    logits = torch.einsum("qhd,khd->hqk", q, k) * block.attn.scaling
    same = torch.zeros(n, n, dtype=torch.bool)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        same[s:e, s:e] = True
    probs = logits.masked_fill(~same, float("-inf")).softmax(-1)  # (H, N, N)
    seg_len = same.sum(0).float()
    expected = probs.sum(dim=(0, 1)) / (2 * seg_len)
    torch.testing.assert_close(scores, expected, equal_nan=True)
    old = qwen._SCORE_CHUNK_ELEMENTS
    try:  # several query chunks per segment
        qwen._SCORE_CHUNK_ELEMENTS = 2 * 2 * 24
        torch.testing.assert_close(qwen.vision_column_scores(block.attn, x, cu, (cos, sin)), expected, equal_nan=True)
    finally:
        qwen._SCORE_CHUNK_ELEMENTS = old


# ---------------------------------------------------------------- a from-scratch reduced model

def _lm_inputs(model, inputs):
    """What the stock model hands its language model: embeddings, (3, B, S) positions, mask."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    pos, embeds = captured["position_ids"], captured["inputs_embeds"]
    if pos is None:  # no mm_token_type_ids: the stock model falls back to 1-D positions
        pos = torch.arange(embeds.shape[1], device=embeds.device).expand(3, embeds.shape[0], -1)
    pos = pos[1:] if pos.shape[0] == 4 else pos
    deltas = model.model.rope_deltas
    deltas = torch.zeros(embeds.shape[0], 1, dtype=torch.long) if deltas is None else deltas.clone()
    return embeds, pos, captured["attention_mask"], deltas


def _causal(n, dtype):
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def reference_reduced(model, inputs, layers, keep, *, new_tokens=None, selection=None, tau=0.8, k=4,
                      encoder_keep=None):
    """Logits of the reduced model computed from scratch, one unpadded sample at a time, no cache.

    Uses the stock modules only and ``pio_kernels.reference`` for the selection (when
    ``selection`` is None). Returns ``(logits, selection)``: per sample a dict
    {caller row: logits (V,)} for the rows reaching the head (new tokens are rows
    S, S+1, ...), and per stage per sample the kept visual caller rows (sorted list).
    """
    from pio_kernels import reference
    lm = model.model.language_model
    embeds, pos, mask, deltas = _lm_inputs(model, inputs)
    device = embeds.device
    vis = visual_ids(model, inputs).to(device)
    encoded = None
    if encoder_keep is not None:  # per image: merged features of the kept tokens, kept indices
        encoded = reference_encoder(model, inputs["pixel_values"], inputs["image_grid_thw"],
                                    lambda n: resolve_budget(encoder_keep, n))
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
    batch, seq_len = mask.shape
    out_logits, out_sel = [], [[] for _ in layers]
    for b in range(batch):
        rows = mask[b].nonzero().flatten()
        x = embeds[b, rows]
        p = pos[:, b, rows]
        caller = rows.clone()
        ids = vis[b, rows]
        n_prompt = rows.numel()
        if new_tokens is not None:
            t = new_tokens.shape[1]
            x = torch.cat([x, lm.embed_tokens(new_tokens[b])])
            p_new = (n_prompt + torch.arange(t, device=device) + deltas[b].to(device)).expand(3, t)
            p = torch.cat([p, p_new], dim=1)
            caller = torch.cat([caller, seq_len + torch.arange(t, device=device)])
            ids = torch.cat([ids, torch.full((t,), -1, device=device)])
        cur = torch.arange(x.shape[0], device=device)  # rows of this sample still present
        if encoded is not None:
            x = x.clone()
            present = torch.ones(x.shape[0], dtype=torch.bool, device=device)
            for image in ids.unique().tolist():
                if 0 <= image < len(encoded[0]):
                    r = (ids == image).nonzero().flatten()
                    x[r[encoded[1][image]]] = encoded[0][image].to(x.dtype)
                    present[r] = False
                    present[r[encoded[1][image]]] = True
            cur = cur[present]
        h = x[cur][None]
        with torch.no_grad():
            for li, layer in enumerate(lm.layers):
                if li in layers:
                    s = layers.index(li)
                    cos, sin = lm.rotary_emb(h, p[:, None, cur])
                    is_prompt = cur < n_prompt
                    if selection is None:
                        hp = h[:, is_prompt]
                        scores = reference.proxy_saliency(layer, lm.norm, model.lm_head, hp,
                                                          (cos[:, is_prompt], sin[:, is_prompt]), num_positions=k)[0]
                        keep_rows = torch.ones(cur.numel(), dtype=torch.bool, device=device)
                        for image in ids[cur].unique().tolist():
                            if image < 0:
                                continue
                            r = (ids[cur] == image).nonzero().flatten()
                            budget = resolve_budget(keep[s], r.numel())
                            picked = reference.select_tokens(hp[:, r], scores[None, r], budget, tau)[0]
                            keep_rows[r] = False
                            keep_rows[r[picked[picked >= 0]]] = True
                    else:
                        wanted = set(selection[s][b])
                        keep_rows = torch.tensor([bool(ids[c] < 0) or int(caller[c]) in wanted for c in cur.tolist()],
                                                 device=device)
                    cur = cur[keep_rows]
                    h = h[:, keep_rows]
                    out_sel[s].append(sorted(int(caller[c]) for c in cur.tolist() if ids[c] >= 0))
                pe = lm.rotary_emb(h, p[:, None, cur])
                y = layer(h, attention_mask=_causal(h.shape[1], h.dtype).to(device), position_embeddings=pe)
                h = y[0] if isinstance(y, tuple) else y
            logits = model.lm_head(lm.norm(h))[0]
        out_logits.append({int(caller[c]): logits[i] for i, c in enumerate(cur.tolist())})
    return out_logits, out_sel


def _selection_lists(model):
    return [[[int(v) for v in row if v >= 0] for row in stage] for stage in last_selection(model)]


# ---------------------------------------------------------------- the integration, language side

SAMPLES = [[3, (4, 6), 5], [2, (6, 4), 2, (2, 2), 6]]  # several images of different sizes
_MODELS: dict = {}


def _model(attn="sdpa", dtype=torch.float32, layers=4):
    key = (attn, dtype, layers)
    if key not in _MODELS:
        _MODELS[key] = make_model(attn=attn, layers=layers, dtype=dtype)
    model = _MODELS[key]
    if getattr(model, "_pio", None) is not None:
        remove_pio(model)
    return model


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _assert_rows_close(out, ref, **tol):
    for b, rows in enumerate(ref):
        for r, expected in rows.items():
            torch.testing.assert_close(out[b, r].float(), expected.float(), **tol, equal_nan=True)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("keep", [[1.0], [1000]])
def test_full_budget_reproduces_stock_logits(attn, padding_side, keep):
    model = _model(attn)
    inputs = make_inputs(SAMPLES, padding_side=padding_side)
    stock = _logits(model, inputs)
    apply_pio(model, PioConfig(layers=[2], keep=keep))
    try:
        torch.testing.assert_close(_logits(model, inputs), stock, rtol=0, atol=0, equal_nan=True)
        assert [s.shape[1] for s in last_selection(model)] == [7]  # 6 + 1 image tokens
    finally:
        remove_pio(model)
    torch.testing.assert_close(_logits(model, inputs), stock, rtol=0, atol=0, equal_nan=True)


def _logits_and_selection(model, inputs, config):
    """Logits and per-stage kept positions of one prefill with ``config`` applied, then removed."""
    apply_pio(model, config)
    try:
        return _logits(model, inputs), _selection_lists(model)
    finally:
        remove_pio(model)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("layers,keep", [([2], [0.34]), ([1, 2, 3], [0.75, 2, 1]), ([1, 3], [0.5, 0.34])])
def test_prefill_matches_reduced_model_from_scratch(attn, padding_side, layers, keep):
    model = _model(attn)
    inputs = make_inputs(SAMPLES, padding_side=padding_side, seed=1)
    ref, ref_sel = reference_reduced(model, inputs, layers, keep)
    out, sel = _logits_and_selection(model, inputs, PioConfig(layers=layers, keep=keep))
    assert sel == ref_sel
    _assert_rows_close(out, ref, rtol=1e-4, atol=1e-4)


def test_budgets_count_per_image():
    model = _model()
    inputs = make_inputs(SAMPLES)  # images of 6, 6 and 1 tokens
    apply_pio(model, PioConfig(layers=[1, 2], keep=[0.5, 2]))
    try:
        _logits(model, inputs)
        first, second = _selection_lists(model)
    finally:
        remove_pio(model)
    assert [len(r) for r in first] == [3, 3 + 1]  # round-half-up of half, at least 1
    assert [len(r) for r in second] == [2, 2 + 1]
    image = inputs["input_ids"] == IMAGE
    for b, rows in enumerate(first):
        assert all(bool(image[b, r]) for r in rows)
        assert set(second[b]) <= set(rows)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_single_samples(padding_side):
    model = _model()
    layers, keep = [1, 3], [0.5, 0.34]
    samples = SAMPLES + [[7, (2, 4)]]
    batch = make_inputs(samples, padding_side=padding_side, seed=2)
    apply_pio(model, PioConfig(layers=layers, keep=keep))
    try:
        out = _logits(model, batch)
        sel = _selection_lists(model)
        mask = batch["attention_mask"]
        for b in range(mask.shape[0]):
            rows = mask[b].nonzero().flatten()
            offset = int(rows[0])
            single = {k: v[b:b + 1, rows] for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                             "mm_token_type_ids")}
            # this sample's images and pixels
            images = [sum(isinstance(seg, tuple) for seg in sample) for sample in samples]
            first, mine = sum(images[:b]), images[b]
            patches = [int(g.prod()) for g in batch["image_grid_thw"]]
            start = sum(patches[:first])
            single["image_grid_thw"] = batch["image_grid_thw"][first:first + mine]
            single["pixel_values"] = batch["pixel_values"][start:start + sum(patches[first:first + mine])]
            alone = _logits(model, single)
            assert _selection_lists(model) == [[[r - offset for r in stage[b]]] for stage in sel]
            kept_rows = [r for r in range(rows.numel()) if bool(alone[0, r].abs().sum() > 0)]
            torch.testing.assert_close(out[b, rows[kept_rows]], alone[0, kept_rows], rtol=1e-4, atol=1e-4, equal_nan=True)
    finally:
        remove_pio(model)


def _generate_matches_reduced_model(model, inputs, layers, keep, encoder_keep=None):
    """``generate`` (4 greedy tokens, cached) with pio applied; every step's logits must equal the
    reduced model recomputed from scratch. Returns the new tokens and the reference logits."""
    seq_len = inputs["input_ids"].shape[1]
    apply_pio(model, PioConfig(layers=layers, keep=keep, encoder_keep=encoder_keep))
    try:
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        sel = _selection_lists(model)
    finally:
        remove_pio(model)
    new = gen.sequences[:, seq_len:]
    ref, _ = reference_reduced(model, inputs, layers, keep, new_tokens=new[:, :-1], selection=sel,
                               encoder_keep=encoder_keep)
    for step, logits in enumerate(gen.logits):
        for b in range(logits.shape[0]):
            torch.testing.assert_close(logits[b], ref[b][seq_len - 1 + step], rtol=1e-4, atol=1e-4, equal_nan=True)
    return new, ref


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_decode_equals_reduced_model_from_scratch(attn):
    model = _model(attn)
    layers, keep = [1, 3], [0.5, 0.34]
    inputs = make_inputs(SAMPLES, padding_side="left", seed=3)
    seq_len = inputs["input_ids"].shape[1]
    new, ref = _generate_matches_reduced_model(model, inputs, layers, keep)
    # greedy decoding follows the reduced model's own argmax
    for step in range(new.shape[1]):
        assert new[:, step].tolist() == [int(ref[b][seq_len - 1 + step].argmax()) for b in range(len(SAMPLES))]


def test_text_only_prompt_is_untouched():
    model = _model()
    inputs = make_inputs([[9], [5]], padding_side="left")
    stock = _logits(model, inputs)
    stock_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    apply_pio(model, PioConfig(layers=[1], keep=[0.3]))
    try:
        torch.testing.assert_close(_logits(model, inputs), stock, rtol=0, atol=0, equal_nan=True)
        assert last_selection(model) == []
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), stock_gen)
    finally:
        remove_pio(model)


def test_video_frames_are_selected_per_frame():
    model = _model()
    samples = [[2, (2, 4, 4), 3, (4, 4), 5]]  # a 2-frame video (4 tokens a frame) and an image
    inputs = make_inputs(samples, seed=4)
    layers, keep = [2], [0.34]
    ref, ref_sel = reference_reduced(model, inputs, layers, keep)
    out, sel = _logits_and_selection(model, inputs, PioConfig(layers=layers, keep=keep))
    assert sel == ref_sel and len(sel[0][0]) == 1 + 1 + 1  # a whole video would keep 3 + 1
    _assert_rows_close(out, ref, rtol=1e-4, atol=1e-4)
    # generate (which may consume the grids before the prefill) splits the frames the same way
    apply_pio(model, PioConfig(layers=layers, keep=keep))
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert _selection_lists(model) == ref_sel
    finally:
        remove_pio(model)


def _check_bf16_against_fp32(device, samples, encoder_keep=None, generate=False, sdpa_backend=None):
    """Flash-attention rule: the bf16 integration is no further from fp32 than PyTorch's bf16 is.

    The fp32 model is the bf16 one upcast; both references use the selection the bf16 run made.
    """
    import contextlib
    model = make_model(dtype=torch.bfloat16).to(device)
    model32 = copy.deepcopy(model).float()
    layers, keep = [1, 3], [0.5, 0.34]
    inputs = {k: v.to(device) for k, v in make_inputs(samples, seed=5, dtype=torch.bfloat16).items()}
    seq_len = inputs["input_ids"].shape[1]
    backend = contextlib.nullcontext()
    if sdpa_backend is not None:
        from torch.nn.attention import sdpa_kernel
        backend = sdpa_kernel(sdpa_backend)
    apply_pio(model, PioConfig(layers=layers, keep=keep, encoder_keep=encoder_keep))
    try:
        with backend, torch.no_grad():
            if generate:
                gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
                rows = {seq_len - 1 + j: lg for j, lg in enumerate(gen.logits)}
                new = gen.sequences[:, seq_len:-1]
            else:
                out = model(**inputs).logits
                new = None
        sel = _selection_lists(model)
    finally:
        remove_pio(model)
    inputs32 = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    kw = dict(selection=sel, new_tokens=new, encoder_keep=encoder_keep)
    ref32, _ = reference_reduced(model32, inputs32, layers, keep, **kw)
    ref16, _ = reference_reduced(model, inputs, layers, keep, **kw)
    checked = 0
    for b, expected_rows in enumerate(ref32):
        for r, expected in expected_rows.items():
            if generate and r not in rows:
                continue
            ours = (rows[r][b] if generate else out[b, r]).float()
            ours_err = (ours - expected).abs().max()
            torch_err = (ref16[b][r].float() - expected).abs().max()
            assert ours_err <= 2 * torch_err + 1e-2, (b, r, float(ours_err), float(torch_err))
            checked += 1
    assert checked >= (3 if generate else 10)


@pytest.mark.parametrize("encoder_keep,generate", [(None, False), (0.5, False), (0.5, True)])
def test_bf16_within_twice_torch_error(encoder_keep, generate):
    _check_bf16_against_fp32("cpu", SAMPLES, encoder_keep=encoder_keep, generate=generate)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("encoder_keep", [None, 0.5])
@pytest.mark.parametrize("generate", [False, True])
def test_cuda_bf16_padded_batch(encoder_keep, generate):
    _check_bf16_against_fp32("cuda", SAMPLES, encoder_keep=encoder_keep, generate=generate)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("encoder_keep", [None, 0.5])
def test_cuda_bf16_flash_sdpa_single_sample(encoder_keep):
    # One unpadded sample: the model's layers (and the vision tower) get no mask, so sdpa's
    # flash kernel is forced for them; the engine lets the saliency probe pick its own backend.
    from torch.nn.attention import SDPBackend
    _check_bf16_against_fp32("cuda", SAMPLES[1:], encoder_keep=encoder_keep, generate=True,
                             sdpa_backend=SDPBackend.FLASH_ATTENTION)


# ---------------------------------------------------------------- encoder side on the real tower

def _reference_tower_scores(model, pixel_values, grid_thw, blocks):
    """Column means of the attention at ``blocks``, from materialised eager attention weights,
    in the tower's output order (the permutation recovered by matching merger rows)."""
    visual = model.model.visual
    weights, out = eager_attention_weights(visual, pixel_values, grid_thw, blocks)
    with torch.no_grad():
        window_order = visual.merger(out.last_hidden_state)
    pooled = out.pooler_output
    perm = torch.tensor([int((window_order == row).all(1).nonzero()[0]) for row in pooled])
    result = []
    for b in blocks:
        col = torch.cat([w.mean(0).mean(0) for w in weights[b]])  # heads, then queries
        result.append(col.view(-1, 4).mean(1)[perm])
    return result, pooled


def _merge_one(features, kept):
    """SPEC 4 merging of one frame by the engine's batched rule: (k, D) merged kept features."""
    keep = torch.zeros(1, features.shape[0], dtype=torch.bool)
    keep[0, kept] = True
    merged = merge_dropped(features[None], keep, torch.zeros(1, features.shape[0], dtype=torch.long))
    return merged[0, kept]


def reference_encoder(model, pixel_values, grid_thw, budget):
    """Encoder-side selection from materialised attention maps: per frame, the merged features of
    the kept tokens and their indices (window + global rule of SPEC 4 on the merged grid)."""
    visual = model.model.visual
    (local, global_), pooled = _reference_tower_scores(model, pixel_values, grid_thw,
                                                       qwen.default_score_blocks(visual))
    frames, kept, start = [], [], 0
    for t, h, w in grid_thw.tolist():
        h, w = h // 2, w // 2
        for _ in range(t):
            rows = slice(start, start + h * w)
            k = window_global_selection(local[rows], global_[rows], h, w, budget(h * w))
            frames.append(_merge_one(pooled[rows], k))
            kept.append(k)
            start += h * w
    return frames, kept


@pytest.mark.parametrize("keep", [0.34, 3])
def test_encoder_selection_matches_materialised_attention(keep):
    model = _model()
    inputs = make_inputs([[2, (8, 8), 1, (4, 6), 1, (2, 2), 3, (2, 4, 4)]], seed=6)
    visual = model.model.visual
    assert qwen.default_score_blocks(visual) == (1, 3)
    budget = lambda n: resolve_budget(keep, n)  # noqa: E731
    frames, kept = reference_encoder(model, inputs["pixel_values"], inputs["image_grid_thw"], budget)
    sizes = [(4, 4), (2, 3), (1, 1)]  # merged grids of the three images (the video passes whole)
    assert [k.numel() for k in kept] == [min(h * w, budget(h * w)) for h, w in sizes]
    apply_pio(model, PioConfig(layers=[3], keep=[1.0], encoder_keep=keep))
    _logits(model, inputs)
    got = last_selection(model, encoder=True)[0].tolist()
    ids = inputs["input_ids"][0]
    image_rows = (ids == IMAGE).nonzero().flatten()
    expected, start = [], 0
    for (h, w), k in zip(sizes, kept):
        expected += image_rows[start + k].tolist()
        start += h * w
    video_rows = (ids == 91).nonzero().flatten().tolist()
    assert got == sorted(expected + video_rows)


# ---------------------------------------------------------------- the integration with encoder-side selection

@pytest.mark.parametrize("encoder_keep", [1.0, 1000])
def test_full_encoder_budget_reproduces_stock_logits(encoder_keep):
    model = _model()
    inputs = make_inputs(SAMPLES, seed=7)
    stock = _logits(model, inputs)
    apply_pio(model, PioConfig(layers=[2], keep=[1.0], encoder_keep=encoder_keep))
    try:
        torch.testing.assert_close(_logits(model, inputs), stock, rtol=0, atol=0, equal_nan=True)
        assert last_selection(model, encoder=True).shape == (2, 7)
    finally:
        remove_pio(model)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("encoder_keep,keep", [(0.5, [0.5, 0.34]), (3, [2, 1])])
def test_encoder_selection_matches_reduced_model_from_scratch(attn, padding_side, encoder_keep, keep):
    model = _model(attn)
    samples = [[3, (4, 6), 5], [2, (6, 4), 2, (2, 2), 6, (2, 4, 4), 2]]  # images of 6, 6, 1 tokens; a video
    inputs = make_inputs(samples, padding_side=padding_side, seed=8)
    layers = [1, 3]
    ref, ref_sel = reference_reduced(model, inputs, layers, keep, encoder_keep=encoder_keep)
    apply_pio(model, PioConfig(layers=layers, keep=keep, encoder_keep=encoder_keep))
    try:
        out = _logits(model, inputs)
        sel = _selection_lists(model)
        enc = [[int(v) for v in row if v >= 0] for row in last_selection(model, encoder=True)]
    finally:
        remove_pio(model)
    assert sel == ref_sel
    _assert_rows_close(out, ref, rtol=1e-4, atol=1e-4)
    # per image resolve_budget(encoder_keep, n) tokens leave the encoder; video frames pass whole
    image = inputs["input_ids"] == IMAGE
    n_kept_images = [sum(bool(image[b, r]) for r in rows) for b, rows in enumerate(enc)]
    expected = [resolve_budget(encoder_keep, 6), resolve_budget(encoder_keep, 6) + 1]
    assert n_kept_images == expected
    assert len(enc[1]) - n_kept_images[1] == 8  # the video's two frames of 4 tokens
    assert all(set(stage[b]) <= set(enc[b]) for stage in sel for b in range(2))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_encoder_selection_cached_decode_equals_from_scratch(attn):
    model = _model(attn)
    layers, keep, encoder_keep = [2], [0.5], 0.5
    inputs = make_inputs(SAMPLES, padding_side="left", seed=9)
    _generate_matches_reduced_model(model, inputs, layers, keep, encoder_keep=encoder_keep)


@pytest.mark.parametrize("encoder_keep", [None, 0.5])
def test_manual_decode_loop_without_positions(encoder_keep):
    """A plain cached loop (no mask, no position_ids): decode positions come from the rope deltas."""
    model = _model()
    layers, keep = [2], [0.5]
    inputs = make_inputs([[3, (4, 6), 2, (2, 4), 5]], seed=10)
    inputs.pop("attention_mask")
    seq_len = inputs["input_ids"].shape[1]
    apply_pio(model, PioConfig(layers=layers, keep=keep, encoder_keep=encoder_keep))
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            logits, tokens = [out.logits[:, -1]], []
            for _ in range(3):
                tokens.append(logits[-1].argmax(-1, keepdim=True))
                out = model(input_ids=tokens[-1], **hf.cache_kwargs(hf.output_cache(out)), use_cache=True)
                logits.append(out.logits[:, -1])
        sel = _selection_lists(model)
    finally:
        remove_pio(model)
    ref, _ = reference_reduced(model, {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}, layers,
                               keep, new_tokens=torch.cat(tokens, 1), selection=sel, encoder_keep=encoder_keep)
    for step, lg in enumerate(logits):
        torch.testing.assert_close(lg[0], ref[0][seq_len - 1 + step], rtol=1e-4, atol=1e-4, equal_nan=True)


def test_without_mm_token_type_ids_positions_fall_back_like_stock():
    """Without mm_token_type_ids the stock model uses 1-D positions; the integration gathers those."""
    model = _model()
    model.model.rope_deltas = None
    inputs = make_inputs([[3, (4, 6), 5]], seed=11)
    inputs.pop("mm_token_type_ids")
    inputs.pop("attention_mask")
    layers, keep, encoder_keep = [2], [0.5], 0.5
    ref, ref_sel = reference_reduced(model, inputs, layers, keep, encoder_keep=encoder_keep)
    out, sel = _logits_and_selection(model, inputs, PioConfig(layers=layers, keep=keep, encoder_keep=encoder_keep))
    assert sel == ref_sel
    _assert_rows_close(out, ref, rtol=1e-4, atol=1e-4)


def test_remove_pio_restores_stock_model_and_bad_schedules_raise():
    model = _model()
    inputs = make_inputs(SAMPLES, seed=12)
    stock = _logits(model, inputs)
    apply_pio(model, PioConfig(layers=[1, 3], keep=[0.5, 1], encoder_keep=0.5))
    reduced = _logits(model, inputs)
    remove_pio(model)
    assert not torch.equal(reduced, stock)
    torch.testing.assert_close(_logits(model, inputs), stock, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="layers"):
        apply_pio(model, PioConfig(layers=[4], keep=[0.5]))  # the tiny model has 4 layers
    with pytest.raises(ValueError, match="encoder_keep"):
        PioConfig(layers=[1], keep=[0.5], encoder_keep=1.5)
