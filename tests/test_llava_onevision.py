"""LLaVA-OneVision integration on tiny random-weight models (SPEC sections 1-5), against the
from-scratch reduced model of :mod:`vlm_checks` (positions renumbered, as for LLaVA)."""
from __future__ import annotations

import pytest
import torch

import vlm_checks as checks
from llava_onevision_factory import IMAGE, VIDEO, family, image_features, make_inputs, make_model, reference_encoder
from pio_kernels.integrations import PioConfig, last_selection
from pio_kernels.integrations.engine import resolve_budget
from pio_kernels.integrations.models.llava_onevision import LlavaOnevisionAdapter

pytestmark = pytest.mark.integration

# An anyres image; an anyres image and a 2-frame video; two images in one sample (base crops only).
SAMPLES = [[3, ("image", 0), 5], [2, ("image", 1), 2, ("video", 2), 3]]
MULTI = [[3, ("image", 2), 4], [2, ("image", 0), 1, ("image", 1), 3, ("video", 2), 2]]
_MODELS: dict = {}


def _model(attn="sdpa", aspect="anyres_max_9"):
    if (attn, aspect) not in _MODELS:
        _MODELS[attn, aspect] = make_model(attn=attn, vision_aspect_ratio=aspect)
    return _MODELS[attn, aspect]


@pytest.mark.parametrize("samples", [SAMPLES, MULTI], ids=["anyres", "multi-image"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_full_budget_is_stock_and_remove_restores(samples, padding_side):
    model = _model()
    checks.check_full_budget_is_stock(model, make_inputs(model, samples, padding_side=padding_side), encoder=True)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layers,keep,encoder_keep", [([2], [0.34], None), ([1, 3], [0.5, 1], None),
                                                      ([1, 3], [0.5, 0.34], 0.5), ([2], [2], 3)])
@pytest.mark.parametrize("samples", [SAMPLES, MULTI], ids=["anyres", "multi-image"])
def test_prefill_matches_reduced_model_from_scratch(attn, layers, keep, encoder_keep, samples):
    model = _model(attn)
    inputs = make_inputs(model, samples, padding_side="right", seed=1)
    checks.check_prefill_matches_reference(model, family(model), inputs, layers, keep, encoder_keep)


def test_newline_tokens_are_kept_and_not_counted():
    model = _model()
    inputs = make_inputs(model, SAMPLES, padding_side="right", seed=1)
    newline = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    rows = (inputs["input_ids"] == IMAGE).nonzero()
    marks = torch.cat([(f == model.model.image_newline).all(-1) for f in image_features(model, inputs)])
    newline[rows[marks, 0], rows[marks, 1]] = True
    video_end = (inputs["input_ids"] == VIDEO).nonzero()[-1]
    newline[video_end[0], video_end[1]] = True
    assert int(newline.sum()) == 8 + 16 + 1  # rows of the two high-resolution grids, the video's end
    with checks.pio(model, PioConfig(layers=[1, 3], keep=[0.25, 1], encoder_keep=0.5)):
        out = checks.logits(model, inputs)
        selected = last_selection(model)[0]
        encoded = last_selection(model, encoder=True)
    valid = inputs["attention_mask"].bool()
    assert not out[newline].isnan().any() and out[valid & ~newline].isnan().any()
    for kept in (selected, encoded):
        assert not newline.gather(1, kept.clamp_min(0))[kept >= 0].any()


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"], ids=["unpadded", "downscaled"])
@pytest.mark.parametrize("keep", [0.5, 3])
def test_encoder_selection_matches_materialised_attention(aspect, keep):
    model = _model(aspect=aspect)
    inputs = make_inputs(model, [[2, ("image", 2), 1, ("video", 1), 3], [1, ("image", 0), 2, ("video", 1)]], seed=6)
    assert LlavaOnevisionAdapter().encoder_probes(model).keys() == {"shallow", "deep"}
    budget = lambda n: resolve_budget(keep, n)  # noqa: E731
    spans = reference_encoder(model, inputs, budget)
    features = image_features(model, inputs)
    image_rows = (inputs["input_ids"] == IMAGE).nonzero()
    expected = [[] for _ in range(2)]
    start = 0
    for image, f in zip(spans, features):
        rows = image_rows[start:start + len(f)]
        dropped = torch.zeros(len(f), dtype=torch.bool)
        for positions, kept in image:
            assert len(kept) == budget(len(positions))
            dropped[positions] = True
            dropped[positions[kept]] = False
        for b, s in rows[~dropped].tolist():
            expected[b].append(s)
        start += len(f)
    if aspect == "anyres_max_1":  # the 16 x 16 grid of the 112 x 112 image is downscaled to 8 x 8
        assert len(spans[0][1][0]) == 64
    with checks.pio(model, PioConfig(layers=[3], keep=[1.0], encoder_keep=keep)):
        checks.logits(model, inputs)
        got = last_selection(model, encoder=True)
    for b in range(2):
        video = (inputs["input_ids"][b] == VIDEO).nonzero().flatten()[:-1].tolist()  # frames pass whole
        newline_free = [r for r in expected[b] if inputs["input_ids"][b, r] == IMAGE]
        mine = [r for r in got[b].tolist() if r >= 0]
        assert mine == sorted(set(newline_free) - _newlines(model, inputs, b) | set(video))


def _newlines(model, inputs, b) -> set[int]:
    rows = (inputs["input_ids"] == IMAGE).nonzero()
    marks = torch.cat([(f == model.model.image_newline).all(-1) for f in image_features(model, inputs)])
    return {int(s) for bb, s in rows[marks].tolist() if bb == b}


@pytest.mark.parametrize("samples,encoder_keep", [(SAMPLES, None), (SAMPLES, 0.5), (MULTI, 0.5)],
                         ids=["anyres", "anyres-encoder", "multi-image-encoder"])
def test_cached_decode_equals_reduced_model_from_scratch(samples, encoder_keep):
    model = _model()
    inputs = make_inputs(model, samples, seed=3)
    checks.check_cached_decode_matches_reference(model, family(model), inputs, [1, 3], [0.5, 0.34], encoder_keep)


@pytest.mark.parametrize("encoder_keep", [None, 0.5])
def test_padded_batch_equals_each_sample_alone_through_generate(encoder_keep):
    model = _model()
    checks.check_padded_batch_equals_singles(model, family(model), SAMPLES + [[7, ("image", 2), 1]], [1, 3],
                                             [0.5, 0.34], encoder_keep, seed=2)


@pytest.mark.parametrize("encoder_keep", [None, 0.5])
def test_kv_cache_past_a_stage_shrinks(encoder_keep):
    model = _model()
    checks.check_cache_shrinks(model, make_inputs(model, SAMPLES, seed=4), [1, 3], [0.5, 0.34], encoder_keep)


@pytest.mark.parametrize("name,layers", [("llava-onevision-ve", 28), ("llava-onevision-0.5b-ve", 24)])
def test_default_schedule(name, layers):
    model = make_model(layers=layers)
    checks.check_preset(model, make_inputs(model, [[5, ("image", 2), 9]]), name)


def test_bf16_within_twice_torch_error():
    model = make_model(dtype=torch.bfloat16)
    inputs = make_inputs(_model(), SAMPLES, seed=5)  # the fp32 twin counts the tokens
    checks.check_bf16_within_twice_torch(model, family(model), inputs, [1, 3], [0.5, 0.34])
