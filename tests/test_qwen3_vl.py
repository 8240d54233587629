"""Qwen3-VL (and Qwen3-VL-MoE) integration on tiny random-weight models (SPEC sections 1-5),
against the from-scratch reduced model of :mod:`vlm_checks`, DeepStack included.

The tiny model adds DeepStack features after its decoder layers 0, 1 and 2 (of 4), so stages at
layers 1 and 2 run inside the DeepStack layers. Its decoder layers have q/k norms, which the fast
saliency path models (an unmodelled layer would take the reference path with a warning: an error here).
"""
from __future__ import annotations

import pytest
import torch

import vlm_checks as checks
from pio_kernels.integrations import PioConfig, last_selection
from pio_kernels.integrations.engine import merge_dropped, resolve_budget
from pio_kernels.integrations.models import qwen2_vl
from qwen2_vl_factory import IMAGE, VIDEO, make_qwen3_inputs, make_qwen3_vl
from qwen_vl_reference import family, reference_encoder

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("error:proxy_saliency. no exact fast path:RuntimeWarning")]

# Several images (6, 6 and 1 tokens) and a 2-frame video (4 tokens a frame, a timestamp before each).
SAMPLES = [[3, (4, 6), 5], [2, (6, 4), 2, (2, 2), 6, (2, 4, 4), 2]]
_MODELS: dict = {}


def _model(attn="sdpa", moe=False):
    if (attn, moe) not in _MODELS:
        _MODELS[attn, moe] = make_qwen3_vl(attn=attn, moe=moe)
    return _MODELS[attn, moe]


FAMILY = family(make_qwen3_vl, make_qwen3_inputs, lambda model: qwen2_vl.quarter_depth_blocks(model.model.visual))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_full_budget_is_stock_and_remove_restores(padding_side):
    model = _model()
    checks.check_full_budget_is_stock(model, make_qwen3_inputs(SAMPLES, padding_side=padding_side), encoder=True)
    checks.check_full_budget_is_stock(model, make_qwen3_inputs(SAMPLES[1:]), encoder=True)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layers,keep,encoder_keep", [([1], [0.34], None), ([1, 2], [0.5, 1], None),
                                                      ([2, 3], [0.5, 0.34], None), ([1, 3], [0.5, 0.34], 0.5),
                                                      ([2], [2], 3)])
def test_prefill_matches_reduced_model_from_scratch(attn, layers, keep, encoder_keep):
    # stages at layers 1 and 2 run inside the DeepStack layers: the features of the rows they keep
    # are still added after them (the reference adds them to the rows it keeps)
    inputs = make_qwen3_inputs(SAMPLES, padding_side="right", seed=1)
    checks.check_prefill_matches_reference(_model(attn), FAMILY, inputs, layers, keep, encoder_keep)


def test_deepstack_features_reach_the_rows_kept():
    # Without DeepStack the reduced model is another model: the reference without its additions
    # must not match, so the check above cannot pass by ignoring them.
    model = _model()
    inputs = make_qwen3_inputs(SAMPLES, seed=1)
    layers, keep = [1], [0.5]
    with checks.pio(model, PioConfig(layers=layers, keep=keep)):
        out = checks.logits(model, inputs)
        sel = checks.selection_lists(model)
    rows = FAMILY.rows(model, inputs, None, None)
    for b, sample in enumerate(rows):
        ref, _ = checks.reduced_lm(model, sample, layers, selection=[stage[b] for stage in sel])
        sample.additions = []
        without, _ = checks.reduced_lm(model, sample, layers, selection=[stage[b] for stage in sel])
        last = max(ref)
        torch.testing.assert_close(out[b, last], ref[last], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(ref[last], without[last], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("keep", [0.34, 3])
def test_encoder_selection_matches_materialised_attention(keep):
    model = _model()
    inputs = make_qwen3_inputs([[2, (8, 8), 1, (4, 6), 1, (2, 2), 3, (2, 4, 4)]], seed=6)
    kept = reference_encoder(model, inputs, (0, 3), lambda n: resolve_budget(keep, n))
    with checks.pio(model, PioConfig(layers=[3], keep=[1.0], encoder_keep=keep)):
        checks.logits(model, inputs)
        got = last_selection(model, encoder=True)[0].tolist()
    ids = inputs["input_ids"][0]
    image_rows = (ids == IMAGE).nonzero().flatten()
    expected, start = [], 0
    for n, k in zip((16, 6, 1), kept):
        expected += image_rows[start + torch.tensor(k)].tolist()
        start += n
    video_rows = (ids == VIDEO).nonzero().flatten().tolist()  # video frames pass the encoder side whole
    assert got == sorted(expected + video_rows)


@pytest.mark.parametrize("layers,keep,encoder_keep", [([1, 3], [0.5, 0.34], None), ([2], [0.5], 0.5)])
def test_cached_decode_equals_reduced_model_from_scratch(layers, keep, encoder_keep):
    model = _model()
    inputs = make_qwen3_inputs(SAMPLES, seed=3)
    checks.check_cached_decode_matches_reference(model, FAMILY, inputs, layers, keep, encoder_keep)


@pytest.mark.parametrize("encoder_keep", [None, 0.5])
def test_uncached_generate_replays_the_selection(encoder_keep):
    # use_cache=False: every step recomputes the prompt, DeepStack included, on the rows kept
    model = _model()
    inputs = make_qwen3_inputs(SAMPLES, seed=3)
    with checks.pio(model, PioConfig(layers=[1, 3], keep=[0.5, 0.34], encoder_keep=encoder_keep)):
        seq, cached = checks.generate(model, inputs)
        seq_u, uncached = checks.generate(model, inputs, use_cache=False)
    assert torch.equal(seq, seq_u)
    torch.testing.assert_close(uncached, cached, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("encoder_keep", [None, 0.5])
def test_padded_batch_equals_each_sample_alone_through_generate(encoder_keep):
    checks.check_padded_batch_equals_singles(_model(), FAMILY, SAMPLES + [[7, (2, 4)]], [1, 3], [0.5, 0.34],
                                             encoder_keep, seed=2)


@pytest.mark.parametrize("encoder_keep", [None, 0.5])
def test_kv_cache_past_a_stage_shrinks(encoder_keep):
    checks.check_cache_shrinks(_model(), make_qwen3_inputs(SAMPLES, seed=4), [1, 3], [0.5, 0.34], encoder_keep)


def test_moe_variant():
    model = _model(moe=True)
    inputs = make_qwen3_inputs(SAMPLES, seed=5)
    checks.check_full_budget_is_stock(model, inputs, encoder=True)
    checks.check_prefill_matches_reference(model, FAMILY, inputs, [1, 3], [0.5, 0.34], 0.5)
    checks.check_cached_decode_matches_reference(model, FAMILY, inputs, [2], [0.5], None)


def test_moe_router_logits_at_full_budget_are_stock_and_refused_when_pruning():
    """The probe's MLP call routes its loss rows through the MoE router: those must not reach the
    caller's ``router_logits`` (full budget = stock, aux loss included). With pruning, the layers
    after a stage route fewer rows, which the stock load-balancing loss cannot take: refused."""
    model = _model(moe=True)
    inputs = make_qwen3_inputs(SAMPLES, seed=5)
    with torch.no_grad():
        want = model(**inputs, output_router_logits=True)
    with checks.pio(model, PioConfig(layers=[1, 3], keep=[1.0, 1.0], encoder_keep=1.0)):
        with torch.no_grad():
            got = model(**inputs, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits)
    for a, b in zip(got.router_logits, want.router_logits):
        assert torch.equal(a, b)
    assert torch.equal(got.aux_loss, want.aux_loss) and torch.equal(got.logits, want.logits)
    with checks.pio(model, PioConfig(layers=[1], keep=[0.5])):
        with pytest.raises(NotImplementedError, match="output_router_logits"):
            model(**inputs, output_router_logits=True)


def test_merge_dropped_values_follow_the_features_assignment():
    # the DeepStack rows of a span are averaged with the assignment the main features decide
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, 7, 5, generator=g)
    values = torch.randn(1, 7, 3, generator=g)
    keep = torch.tensor([[True, False, True, False, False, True, True]])
    group = torch.tensor([[0, 0, 0, 0, 0, 1, -1]])
    merged = merge_dropped(features, keep, group, values=values)
    kept = [0, 2]
    _, target = checks.merge_literal(features[0, :5], kept)
    torch.testing.assert_close(merged[0, kept], checks.merge_by(values[0, :5], target, 2))
    assert torch.equal(merged[0, 5:], values[0, 5:]) and torch.equal(merged[0, [1, 3, 4]], values[0, [1, 3, 4]])
    assert target != [0, 0, 1, 0, 0]  # not a trivial assignment
    torch.testing.assert_close(merge_dropped(features, keep, group, values=features), merge_dropped(features, keep, group))


def test_default_schedule():
    checks.check_preset(make_qwen3_vl(layers=36), make_qwen3_inputs([[5, (24, 24), 9]]), "qwen3-vl-ve")


def test_bf16_within_twice_torch_error():
    model = make_qwen3_vl(dtype=torch.bfloat16)
    checks.check_bf16_within_twice_torch(model, FAMILY, make_qwen3_inputs(SAMPLES, seed=5), [1, 3], [0.5, 0.34])
