"""Qwen2-VL integration on tiny random-weight models (SPEC sections 1-5), against the from-scratch
reduced model of :mod:`vlm_checks`."""
from __future__ import annotations

import pytest
import torch

import vlm_checks as checks
from pio_kernels.integrations import PioConfig, last_selection
from pio_kernels.integrations.engine import resolve_budget
from pio_kernels.integrations.models import qwen2_vl
from qwen2_vl_factory import IMAGE, make_qwen2_inputs, make_qwen2_vl
from qwen_vl_reference import family, reference_encoder

pytestmark = pytest.mark.integration

# Several images of different sizes (6, 6 and 1 tokens), and a 2-frame video (4 tokens a frame).
SAMPLES = [[3, (4, 6), 5], [2, (6, 4), 2, (2, 2), 6, (2, 4, 4), 2]]
_MODELS: dict = {}


def _model(attn="sdpa"):
    if attn not in _MODELS:
        _MODELS[attn] = make_qwen2_vl(attn=attn)
    return _MODELS[attn]


FAMILY = family(make_qwen2_vl, make_qwen2_inputs, lambda model: qwen2_vl.quarter_depth_blocks(model.model.visual))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_full_budget_is_stock_and_remove_restores(padding_side):
    model = _model()
    checks.check_full_budget_is_stock(model, make_qwen2_inputs(SAMPLES, padding_side=padding_side), encoder=True)
    checks.check_full_budget_is_stock(model, make_qwen2_inputs(SAMPLES[1:]), encoder=True)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layers,keep,encoder_keep", [([2], [0.34], None), ([1, 3], [0.5, 1], None),
                                                      ([1, 3], [0.5, 0.34], 0.5), ([2], [2], 3)])
def test_prefill_matches_reduced_model_from_scratch(attn, layers, keep, encoder_keep):
    model = _model(attn)
    inputs = make_qwen2_inputs(SAMPLES, padding_side="right", seed=1)
    sel = checks.check_prefill_matches_reference(model, FAMILY, inputs, layers, keep, encoder_keep)
    if encoder_keep is None and keep[0] == 0.34:  # per image (6; 6, 1) and per video frame (4, 4)
        assert [len(rows) for rows in sel[0]] == [2, 2 + 1 + 1 + 1]


@pytest.mark.parametrize("keep", [0.34, 3])
def test_encoder_selection_matches_materialised_attention(keep):
    model = _model()
    inputs = make_qwen2_inputs([[2, (8, 8), 1, (4, 6), 1, (2, 2), 3, (2, 4, 4)]], seed=6)
    blocks = qwen2_vl.quarter_depth_blocks(model.model.visual)
    assert blocks == (0, 3)
    kept = reference_encoder(model, inputs, blocks, lambda n: resolve_budget(keep, n))
    with checks.pio(model, PioConfig(layers=[3], keep=[1.0], encoder_keep=keep)):
        checks.logits(model, inputs)
        got = last_selection(model, encoder=True)[0].tolist()
    ids = inputs["input_ids"][0]
    image_rows = (ids == IMAGE).nonzero().flatten()
    expected, start = [], 0
    for n, k in zip((16, 6, 1), kept):
        assert len(k) == resolve_budget(keep, n)
        expected += image_rows[start + torch.tensor(k)].tolist()
        start += n
    video_rows = (ids == 91).nonzero().flatten().tolist()  # videos pass the encoder side whole
    assert got == sorted(expected + video_rows)


@pytest.mark.parametrize("encoder_keep", [None, 0.5])
def test_cached_decode_equals_reduced_model_from_scratch(encoder_keep):
    model = _model()
    inputs = make_qwen2_inputs(SAMPLES, seed=3)
    checks.check_cached_decode_matches_reference(model, FAMILY, inputs, [1, 3], [0.5, 0.34], encoder_keep)


@pytest.mark.parametrize("encoder_keep", [None, 0.5])
def test_padded_batch_equals_each_sample_alone_through_generate(encoder_keep):
    checks.check_padded_batch_equals_singles(_model(), FAMILY, SAMPLES + [[7, (2, 4)]], [1, 3], [0.5, 0.34],
                                             encoder_keep, seed=2)


@pytest.mark.parametrize("encoder_keep", [None, 0.5])
def test_kv_cache_past_a_stage_shrinks(encoder_keep):
    checks.check_cache_shrinks(_model(), make_qwen2_inputs(SAMPLES, seed=4), [1, 3], [0.5, 0.34], encoder_keep)


def test_default_schedule():
    checks.check_preset(make_qwen2_vl(layers=28), make_qwen2_inputs([[5, (24, 24), 9]]), "qwen2-vl-ve")


def test_bf16_within_twice_torch_error():
    model = make_qwen2_vl(dtype=torch.bfloat16)
    checks.check_bf16_within_twice_torch(model, FAMILY, make_qwen2_inputs(SAMPLES, seed=5), [1, 3], [0.5, 0.34])
