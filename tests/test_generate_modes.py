"""Every generate mode, the way users call it, on LLaVA-1.5 and Qwen2.5-VL (with and without the
encoder side): each keeps the integration's promises or refuses clearly (issue 10).

The promises:
* full budget = the stock model, bit for bit, in every mode;
* cached decoding = recomputation of the reduced model: the modes below are compared with cached
  greedy (or seeded sampling) generation, which ``test_llava.py`` / ``test_qwen2_5_vl.py`` check
  against an independent from-scratch reduced model; ``use_cache=False`` recomputes every step
  from scratch (one selection per prompt) and must give the same tokens;
* a padded batch = each sample alone.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

import llava_factory as lf
import qwen2_5_vl_factory as qf
from pio_kernels.integrations import PioConfig, apply_pio, hf, last_selection, last_stats, remove_pio

pytestmark = pytest.mark.integration

STEPS = 4


@dataclass
class Family:
    name: str
    build: Callable
    inputs: Callable[[str], dict]        # "single" | "padded" -> model inputs
    pruned: PioConfig
    full: PioConfig


def _llava_inputs(kind: str, size: int = 28, tokens: int = 16) -> dict:
    rows = [lf.prompt([1, 2, 3], 2, [4, 5, 6, 7, 8], tokens=tokens)]
    px = [lf.pixels(2, seed=1, size=size)]
    if kind == "padded":
        rows.append(lf.prompt([1, 2], 1, [4, 5, 6, 9, 10, 11, 12], tokens=tokens))
        px.append(lf.pixels(1, seed=3, size=size))
    ids, mask = lf.pad(rows, "left")
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(px)}


def _qwen_inputs(kind: str) -> dict:
    samples = [[3, (4, 6), 5]] if kind == "single" else [[3, (4, 6), 5], [2, (6, 4), 2, (2, 2), 6]]
    return qf.make_inputs(samples, seed=7)


FAMILIES = {
    "llava": Family("llava", lambda: lf.make_llava(layers=4), _llava_inputs,
                    PioConfig(layers=[2], keep=[4]), PioConfig(layers=[2], keep=[1.0])),
    "llava-ve": Family("llava-ve", lambda: lf.make_llava_encoder(layers=4),
                       lambda kind: _llava_inputs(kind, size=56, tokens=64),
                       PioConfig(layers=[2], keep=[6], encoder_keep=16),
                       PioConfig(layers=[2], keep=[1.0], encoder_keep=1.0)),
    "qwen": Family("qwen", lambda: qf.make_model(layers=4), _qwen_inputs,
                   PioConfig(layers=[2], keep=[0.5]), PioConfig(layers=[2], keep=[1.0])),
    "qwen-ve": Family("qwen-ve", lambda: qf.make_model(layers=4), _qwen_inputs,
                      PioConfig(layers=[2], keep=[0.5], encoder_keep=0.5),
                      PioConfig(layers=[2], keep=[1.0], encoder_keep=1.0)),
}
_BUILT: dict = {}


def _model(family: Family):
    key = family.name.split("-")[0] + ("-ve" if family.name.endswith("-ve") and "llava" in family.name else "")
    if key not in _BUILT:
        _BUILT[key] = family.build()
    model = _BUILT[key]
    if getattr(model, "_pio", None) is not None:
        remove_pio(model)
    return model


def _special_tokens(model) -> list[int]:
    """Image / video / vision-span tokens: never generated here (an uncached step would take a
    generated placeholder for an image, in the stock model too)."""
    config = model.config
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [getattr(config, n) for n in names if getattr(config, n, None) is not None]


def _generate(model, inputs: dict, seed: int | None = None, **kwargs):
    """(sequences, logits (B, steps, V)) of ``model.generate`` with greedy defaults."""
    if seed is not None:
        torch.manual_seed(seed)
    options = dict(max_new_tokens=STEPS, do_sample=False, eos_token_id=None, pad_token_id=0,
                   output_logits=True, return_dict_in_generate=True, suppress_tokens=_special_tokens(model))
    options.update(kwargs)
    out = model.generate(**inputs, **options)
    return out.sequences, torch.stack(out.logits, dim=1)


MODES = {
    "greedy": {},
    "sampling": dict(do_sample=True, top_k=0, seed=0),
    "beams": dict(num_beams=2),
    "num_return_sequences": dict(do_sample=True, top_k=0, num_return_sequences=2, seed=0),
    "use_cache=False": dict(use_cache=False),
    "static cache": dict(cache_implementation="static"),
}


def _run(model, inputs, mode: str, **extra):
    kwargs = dict(MODES[mode])
    seed = kwargs.pop("seed", None)
    kwargs.update(extra)
    return _generate(model, inputs, seed=seed, **kwargs)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_budget_is_the_stock_model_in_every_mode(name, mode):
    family = FAMILIES[name]
    model = _model(family)
    inputs = family.inputs("padded")
    seq, logits = _run(model, inputs, mode)
    apply_pio(model, family.full)
    seq_pio, logits_pio = _run(model, inputs, mode)
    assert torch.equal(seq_pio, seq)
    torch.testing.assert_close(logits_pio, logits, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["use_cache=False", "static cache", "user cache", "beams=1 sampling"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_pruned_modes_equal_cached_generation(name, mode):
    """Greedy (or seeded sampling) through a mode = the same through the default dynamic cache."""
    family = FAMILIES[name]
    model = _model(family)
    inputs = family.inputs("padded")
    apply_pio(model, family.pruned)
    if mode == "beams=1 sampling":
        seq, logits = _generate(model, inputs, seed=1, do_sample=True, top_k=0)
        seq_mode, logits_mode = _generate(model, inputs, seed=1, do_sample=True, top_k=0, use_cache=False)
    else:
        seq, logits = _generate(model, inputs)
        kwargs = {"user cache": _user_cache(), "use_cache=False": dict(use_cache=False),
                  "static cache": dict(cache_implementation="static")}[mode]
        seq_mode, logits_mode = _generate(model, inputs, **kwargs)
    assert torch.equal(seq_mode, seq)
    torch.testing.assert_close(logits_mode, logits, rtol=1e-4, atol=1e-4)
    assert all((s >= 0).sum(1).max() < (inputs["input_ids"] >= 0).sum() for s in last_selection(model))


def _user_cache() -> dict:
    from transformers import DynamicCache
    return hf.cache_kwargs(DynamicCache())


@pytest.mark.parametrize("mode", ["beams", "num_return_sequences"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_pruned_beams_and_returned_sequences_equal_uncached(name, mode):
    """Beam search and several returned sequences over the reduced model: cached = recomputed."""
    family = FAMILIES[name]
    model = _model(family)
    inputs = family.inputs("padded")
    stock, stock_nc = _run(model, inputs, mode)[0], _run(model, inputs, mode, use_cache=False)[0]
    if not torch.equal(stock, stock_nc):  # the yardstick: the stock model's own behaviour
        import transformers
        pytest.skip(f"transformers {transformers.__version__}: {mode} without a cache differs from cached in the "
                    "stock model too")
    apply_pio(model, family.pruned)
    seq, logits = _run(model, inputs, mode)
    seq_nc, logits_nc = _run(model, inputs, mode, use_cache=False)
    assert torch.equal(seq, seq_nc)
    torch.testing.assert_close(logits, logits_nc, rtol=1e-4, atol=1e-4)
    expand = 2
    assert last_selection(model)[0].shape[0] == inputs["input_ids"].shape[0] * expand


@pytest.mark.parametrize("name", ["llava", "llava-ve"])
@pytest.mark.parametrize("first", ["fresh", "after greedy"])
def test_assisted_decoding_equals_greedy(name, first):
    """Assisted decoding is lossless for greedy: with pio it gives pio's greedy tokens, whether the
    prompt was selected before (a replay) or the first call also holds the candidates."""
    family = FAMILIES[name]
    model = _model(family)
    assistant = lf.make_llava(layers=2, seed=5) if name == "llava" else lf.make_llava_encoder(layers=2, seed=5)
    inputs = family.inputs("single")
    inputs.pop("attention_mask")
    apply_pio(model, family.pruned)
    greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    kept = [k.clone() for k in last_selection(model)]
    if first == "fresh":
        remove_pio(model)
        apply_pio(model, family.pruned)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
                         assistant_model=assistant)
    assert torch.equal(out, greedy)
    assert all(torch.equal(a, b) for a, b in zip(last_selection(model), kept))


def test_prefill_chunking_is_refused_before_any_compute():
    family = FAMILIES["llava"]
    model = _model(family)
    apply_pio(model, family.pruned)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(NotImplementedError, match="prefill_chunk_size"):
            model.generate(**family.inputs("single"), max_new_tokens=2, prefill_chunk_size=8)
    finally:
        handle.remove()
    assert not calls


# ------------------------------------------------------------------------------------------------
# Multi-turn continuation from the returned cache
def _continue(model, first_seq, cache, new_ids, **extra):
    ids = torch.cat([first_seq, new_ids], dim=1)
    return _generate(model, {"input_ids": ids, **extra}, **hf.cache_kwargs(cache))


@pytest.mark.parametrize("name", ["llava", "llava-ve"])
@pytest.mark.parametrize("new_image", [False, True])
def test_multi_turn_continuation_equals_recomputation(name, new_image):
    """Turn 2 continues turn 1's cache; it equals recomputing turn 1 + 2 from scratch with turn 1's
    selection (rows after the first prompt, a new image included, are kept whole)."""
    family = FAMILIES[name]
    model = _model(family)
    size, tokens = (56, 64) if name.endswith("-ve") else (28, 16)
    first = {"input_ids": torch.tensor([lf.prompt([1, 2, 3], 1, [4, 5, 6], tokens=tokens)]),
             "pixel_values": lf.pixels(1, seed=1, size=size)}
    apply_pio(model, family.pruned)
    out = model.generate(**first, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                         return_dict_in_generate=True)
    kept = [k.clone() for k in last_selection(model)]
    new = [11, 12] + ([lf.IMAGE] * tokens if new_image else []) + [13, 14]
    extra = {"pixel_values": lf.pixels(1, seed=9, size=size)} if new_image else {}
    seq, logits = _continue(model, out.sequences, hf.output_cache(out), torch.tensor([new]), **extra)
    assert all(torch.equal(a, b) for a, b in zip(last_selection(model), kept))  # turn 1's selection stands
    full_ids = seq[:, :out.sequences.shape[1] + len(new)]
    pixels = first["pixel_values"] if not new_image else torch.cat([first["pixel_values"], extra["pixel_values"]])
    seq_nc, logits_nc = _generate(model, {"input_ids": full_ids, "pixel_values": pixels}, use_cache=False)
    assert torch.equal(seq, seq_nc)
    torch.testing.assert_close(logits, logits_nc, rtol=1e-4, atol=1e-4)


def _step_by_step(model, out, new: torch.Tensor) -> torch.Tensor:
    """Next-token logits after feeding the last generated token and ``new`` one at a time
    through a copy of ``out``'s cache (the last generated token is not cached yet)."""
    cache = copy.deepcopy(hf.output_cache(out))
    fed = torch.cat([out.sequences[:, -1:], new], dim=1)
    with torch.no_grad():
        for t in range(fed.shape[1]):
            step = model(input_ids=fed[:, t:t + 1], **hf.cache_kwargs(cache), use_cache=True)
            cache = hf.output_cache(step)
    return step.logits[:, -1]


def test_multi_turn_continuation_equals_step_by_step_decoding():
    """The continued prompt's tokens fed one at a time through the cache give the same next logits."""
    family = FAMILIES["llava-ve"]
    model = _model(family)
    first = {"input_ids": torch.tensor([lf.prompt([1, 2, 3], 1, [4, 5, 6], tokens=64)]),
             "pixel_values": lf.pixels(1, seed=1, size=56)}
    apply_pio(model, family.pruned)
    out = model.generate(**first, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                         return_dict_in_generate=True)
    new = torch.tensor([[11, 12, 13, 14]])
    stepped = _step_by_step(model, out, new)
    _, logits = _continue(model, out.sequences, hf.output_cache(out), new)
    torch.testing.assert_close(logits[:, 0], stepped, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["qwen", "qwen-ve"])
def test_qwen_multi_turn_continuation_equals_step_by_step(name):
    family = FAMILIES[name]
    model = _model(family)
    first = qf.make_inputs([[3, (4, 6), 5]], seed=7)
    first.pop("attention_mask")
    apply_pio(model, family.pruned)
    out = model.generate(**first, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                         return_dict_in_generate=True)
    new = torch.tensor([[11, 12, 13, 14]])
    stepped = _step_by_step(model, out, new)
    types = torch.cat([first["mm_token_type_ids"], torch.zeros(1, 3 + 4, dtype=torch.long)], dim=1)
    _, logits = _continue(model, out.sequences, hf.output_cache(out), new, mm_token_type_ids=types)
    torch.testing.assert_close(logits[:, 0], stepped, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Padded batches and short prompts
@pytest.mark.parametrize("mode", ["static cache", "use_cache=False"])
@pytest.mark.parametrize("name", ["llava", "qwen-ve"])
def test_padded_batch_equals_each_sample_alone_in_mode(name, mode):
    family = FAMILIES[name]
    model = _model(family)
    apply_pio(model, family.pruned)
    if name == "llava":
        rows = [lf.prompt([1, 2, 3], 2, [4, 5, 6, 7, 8]), lf.prompt([1, 2], 1, [4, 5, 6, 9, 10, 11, 12])]
        px = [lf.pixels(2, seed=1), lf.pixels(1, seed=3)]
        ids, mask = lf.pad(rows, "left")
        batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(px)}
        alone = [{"input_ids": torch.tensor([r]), "pixel_values": p} for r, p in zip(rows, px)]
    else:
        samples = [[3, (4, 6), 5], [2, (6, 4), 2, (2, 2), 6]]
        batch = qf.make_inputs(samples, seed=7)
        alone = [_qwen_sample(batch, b, samples) for b in range(2)]
    seq, logits = _run(model, batch, mode)
    width = batch["input_ids"].shape[1]
    for b, single in enumerate(alone):
        seq_a, logits_a = _run(model, single, mode)
        assert seq[b, width:].tolist() == seq_a[0, single["input_ids"].shape[1]:].tolist()
        torch.testing.assert_close(logits[b], logits_a[0], rtol=1e-4, atol=1e-4)


def _qwen_sample(batch: dict, b: int, samples: list) -> dict:
    """Sample ``b`` of a padded Qwen batch built from ``samples``, unpadded, with its own images."""
    keep = batch["attention_mask"][b].bool()
    images = [len([seg for seg in sample if isinstance(seg, tuple)]) for sample in samples]
    lo, hi = sum(images[:b]), sum(images[:b + 1])
    rows = batch["image_grid_thw"].prod(-1).cumsum(0).tolist()
    start, stop = ([0] + rows)[lo], ([0] + rows)[hi]
    single = {"input_ids": batch["input_ids"][b:b + 1, keep],
              "mm_token_type_ids": batch["mm_token_type_ids"][b:b + 1, keep]}
    if hi > lo:
        single.update(pixel_values=batch["pixel_values"][start:stop], image_grid_thw=batch["image_grid_thw"][lo:hi])
    return single


@pytest.mark.parametrize("name", ["llava", "qwen"])
def test_a_short_prompt_in_a_padded_batch_equals_each_sample_alone(name):
    """A sample with no more than num_positions real tokens (here a 3-token text prompt) beside an
    image sample: the stage runs, and both samples equal themselves alone."""
    family = FAMILIES[name]
    model = _model(family)
    apply_pio(model, family.pruned)
    if name == "llava":
        rows = [lf.prompt([1, 2, 3], 1, [4, 5, 6, 7, 8]), [5, 6, 7]]
        ids, mask = lf.pad(rows, "left")
        batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": lf.pixels(1)}
        alone = [{"input_ids": torch.tensor([rows[0]]), "pixel_values": lf.pixels(1)},
                 {"input_ids": torch.tensor([rows[1]])}]
    else:
        samples = [[3, (4, 6), 5], [3]]
        batch = qf.make_inputs(samples, seed=7)
        alone = [_qwen_sample(batch, b, samples) for b in range(2)]
    seq, logits = _generate(model, batch)
    width = batch["input_ids"].shape[1]
    for b, single in enumerate(alone):
        seq_a, logits_a = _generate(model, single)
        assert seq[b, width:].tolist() == seq_a[0, single["input_ids"].shape[1]:].tolist()
        torch.testing.assert_close(logits[b], logits_a[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llava-ve", "qwen-ve"])
def test_right_padded_batch_at_full_budget_with_encoder_side_is_stock(name):
    family = FAMILIES[name]
    model = _model(family)
    if name == "llava-ve":
        rows = [lf.prompt([1, 2, 3], 2, [4, 5, 6, 7, 8], tokens=64), lf.prompt([1, 2], 1, [4, 5], tokens=64)]
        ids, mask = lf.pad(rows, "right")
        inputs = {"input_ids": ids, "attention_mask": mask,
                  "pixel_values": torch.cat([lf.pixels(2, seed=1, size=56), lf.pixels(1, seed=3, size=56)])}
    else:
        inputs = qf.make_inputs([[3, (4, 6), 5], [2, (6, 4), 2, (2, 2), 6]], padding_side="right", seed=7)
    with torch.no_grad():
        stock = model(**inputs).logits
    apply_pio(model, family.full)
    with torch.no_grad():
        got = model(**inputs).logits
    assert torch.equal(got, stock)


# ------------------------------------------------------------------------------------------------
# Everything else a user does with the model
def test_deepcopy_after_apply_pio_is_an_independent_pio_model():
    """The copy scores with its own weights and reports its own selection; the original is untouched."""
    family = FAMILIES["llava"]
    model = _model(family)
    apply_pio(model, family.pruned)
    inputs = family.inputs("single")
    with torch.no_grad():
        model(**inputs)
    kept = [k.clone() for k in last_selection(model)]
    twin = copy.deepcopy(model)
    assert twin._pio is not model._pio and twin._pio.model is twin
    with torch.no_grad():
        twin.lm_head.weight.copy_(torch.randn_like(twin.lm_head.weight, generator=torch.Generator().manual_seed(3)))
        twin_logits = twin(**inputs).logits
    twin_kept = [k.clone() for k in last_selection(twin)]
    assert all(torch.equal(a, b) for a, b in zip(last_selection(model), kept))  # the original is untouched
    assert not all(torch.equal(a, b) for a, b in zip(twin_kept, kept))  # other weights, other scores
    remove_pio(twin)
    apply_pio(twin, family.pruned)  # a fresh install on the copy agrees with the copied one
    with torch.no_grad():
        fresh_logits = twin(**inputs).logits
    assert all(torch.equal(a, b) for a, b in zip(last_selection(twin), twin_kept))
    torch.testing.assert_close(fresh_logits, twin_logits, rtol=0, atol=0, equal_nan=True)
    assert getattr(model, "_pio", None) is not None


@pytest.mark.parametrize("name", ["llava", "llava-ve", "qwen"])
def test_labels_of_rows_predicted_by_dropped_rows_are_ignored(name):
    """With pruning, a dropped row has no output (its logits are NaN) and the label it would predict
    is ignored: the loss is the stock loss over the rows that remain, never NaN or +log V."""
    family = FAMILIES[name]
    model = _model(family)
    inputs = family.inputs("padded")
    ids = inputs["input_ids"]
    labels = torch.where(inputs["attention_mask"].bool(), ids, torch.full_like(ids, -100))
    labels[ids == (lf.IMAGE if "llava" in name else qf.IMAGE)] = 7  # every image row is a label too
    apply_pio(model, family.pruned)
    original = labels.clone()
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    assert torch.equal(labels, original)  # the caller's tensor is not written
    dropped = torch.isnan(out.logits).any(-1)
    assert dropped.any()
    shifted = original[:, 1:].masked_fill(dropped[:, :-1], -100)
    vocab = out.logits.shape[-1]
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, vocab).float().nan_to_num(0.0),
                                             shifted.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


def test_inputs_embeds_with_pixel_values_selects_as_input_ids():
    family = FAMILIES["llava"]
    model = _model(family)
    inputs = family.inputs("single")
    apply_pio(model, family.pruned)
    with torch.no_grad():
        by_ids = model(**inputs).logits
        kept = [k.clone() for k in last_selection(model)]
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        by_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                          pixel_values=inputs["pixel_values"]).logits
    assert all(torch.equal(a, b) for a, b in zip(last_selection(model), kept))
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=0, equal_nan=True)


def test_standard_4d_mask_is_accepted_and_a_custom_one_refused():
    family = FAMILIES["llava"]
    model = _model(family)
    inputs = family.inputs("padded")
    apply_pio(model, family.pruned)
    mask2d = inputs["attention_mask"].bool()
    seq = mask2d.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    mask4d = causal[None, None] & mask2d[:, None, None, :]
    with torch.no_grad():
        want = model(**inputs).logits
        got = model(**dict(inputs, attention_mask=mask4d)).logits
        custom = mask4d.clone()
        custom[:, :, :, :3] = True  # the first rows attend bidirectionally
        with pytest.raises(NotImplementedError, match="custom 4-D"):
            model(**dict(inputs, attention_mask=custom))
    real = mask2d[..., None]
    torch.testing.assert_close(got.masked_fill(~real, 0), want.masked_fill(~real, 0), rtol=1e-5, atol=1e-5,
                               equal_nan=True)


def test_small_api_contracts():
    family = FAMILIES["llava"]
    model = _model(family)
    with pytest.raises(ValueError, match="not applied"):
        remove_pio(model)
    with pytest.raises(ValueError, match="not applied"):
        last_selection(model)
    config = PioConfig(layers=np.array([2]), keep=[np.int64(4)], encoder_keep=None, tau=np.float32(0.8))
    assert config.layers == (2,) and type(config.keep[0]) is int and type(config.tau) is float
    assert PioConfig(layers=[np.int32(2)], keep=[np.float64(0.25)]).keep == (0.25,)
    apply_pio(model, config)
    assert last_stats(model) is None
    with torch.no_grad():
        model(**family.inputs("padded"))
    stats = last_stats(model)
    assert stats.visual_tokens == [32, 16]
    assert stats.tokens_per_layer[0] == [32, 32, 8, 8] and stats.tokens_per_layer[1] == [16, 16, 4, 4]
    assert stats.retention[0] == pytest.approx((32 + 32 + 8 + 8) / 4 / 32)
    assert len(stats.selection_ms) == 1 and stats.stage_kinds == ["stage"]
    d, m = 64, 96
    assert stats.visual_flops[1] == pytest.approx(sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m
                                                      for n in (16, 16, 4, 4)))


def test_compiled_generate_with_a_static_cache_equals_eager():
    """generate compiles the decoding forward for a static cache (on GPUs by default; asked for
    here on CPU, with the eager backend to keep it short): the hooks trace, the tokens stand."""
    from transformers import CompileConfig
    family = FAMILIES["llava"]
    model = _model(family)
    inputs = family.inputs("single")
    apply_pio(model, family.pruned)
    options = dict(max_new_tokens=STEPS, do_sample=False, eos_token_id=None, pad_token_id=0,
                   cache_implementation="static", suppress_tokens=_special_tokens(model))
    want = model.generate(**inputs, **options)
    compile_config = CompileConfig(backend="eager", fullgraph=False, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only by default
    got = model.generate(**inputs, **options, compile_config=compile_config)
    assert torch.equal(got, want)
