"""Samples with at most K real tokens (SPEC 2.3, issue 10 item 4): the fast path against the reference.

A sample with n real tokens has min(K, n - 1) loss rows and its loss is the mean over
those; a sample with n <= 1 has none and scores 0. Padded batches mix such samples with
long ones, padding on either side.
"""
import copy

import pytest
import torch

from layer_factory import FAMILIES, MROPE_FAMILIES, make_stage, mrope_positions, padded_batch, positions_from_mask
from pio_kernels import proxy_saliency, reference
from pio_kernels.saliency import supports_fast_path

LENGTHS = [13, 5, 2, 1, 0, 4, 9]  # K = 4: a sample of K + 1, of K, of 2, 1 and 0 tokens, long ones


def _inputs(stage, family, lengths, seq_len, side, seed, dtype=torch.float32):
    mask = padded_batch(lengths, seq_len, side)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(lengths), seq_len, stage.hidden_size, generator=gen).to(dtype)
    if family in MROPE_FAMILIES:
        start = 1 if side == "right" else 3
        pos = mrope_positions(mask, (start, start + 8))
    else:
        pos = positions_from_mask(mask)
    return hidden, stage.rope(hidden, pos), mask


def _rel_err(x, truth):
    return ((x.float() - truth.float()).abs().max() / truth.float().abs().max()).item()


def _both(stage, hidden, pe, mask, num_positions):
    args = (stage.layer, stage.final_norm, stage.lm_head, hidden, pe)
    assert supports_fast_path(stage.layer, stage.final_norm, stage.lm_head)  # no silent fallback
    return (reference.proxy_saliency(*args, attention_mask=mask, num_positions=num_positions),
            proxy_saliency(*args, attention_mask=mask, num_positions=num_positions))


def _expected_support(mask):
    """Where a score must be > 0: real tokens with a later real token (padding and last token: 0)."""
    real = mask.bool()
    last = (mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True)) & real
    return real & ~last


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_fp32_short_samples_match_reference(family, side):
    stage = make_stage(family, seed=31)
    hidden, pe, mask = _inputs(stage, family, LENGTHS, 13, side, 31)
    ref, fast = _both(stage, hidden, pe, mask, 4)
    assert torch.isfinite(fast).all()
    support = _expected_support(mask)
    assert (ref[~support] == 0).all() and (ref[support] > 0).all()
    assert (fast[~support] == 0).all() and (fast[support] > 0).all()
    assert _rel_err(fast, ref) <= 1e-4
    for b in range(len(LENGTHS)):  # per sample too: a short sample's scores are small next to a long one's
        if LENGTHS[b] > 1:
            assert _rel_err(fast[b], ref[b]) <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3_vl"])
@pytest.mark.parametrize("num_positions", [12, 30])
def test_k_larger_than_every_sample(family, num_positions):
    """K >= S: every sample's loss runs over all its tokens but the last; K beyond that changes nothing."""
    stage = make_stage(family, seed=32)
    hidden, pe, mask = _inputs(stage, family, [13, 7, 1], 13, "left", 32)
    ref, fast = _both(stage, hidden, pe, mask, num_positions)
    assert _rel_err(fast, ref) <= 1e-4
    _, exact_k = _both(stage, hidden, pe, mask, 12)  # 12 = n - 1 of the longest sample
    torch.testing.assert_close(fast, exact_k, rtol=1e-6, atol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_short_sample_alone_equals_batched(side):
    """The per-sample mean over its own loss rows keeps scores batch-invariant for short samples."""
    stage = make_stage("qwen3", seed=33)
    lengths = [11, 3, 2, 1, 0]
    hidden, pe, mask = _inputs(stage, "qwen3", lengths, 11, side, 33)
    batched = proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, hidden, pe, attention_mask=mask)
    for b, n in enumerate(lengths):
        real = mask[b].bool()
        if n == 0:
            assert (batched[b] == 0).all()
            continue
        alone_h = hidden[b:b + 1, real]
        alone = proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, alone_h,
                               (pe[0][b:b + 1, real], pe[1][b:b + 1, real]))
        torch.testing.assert_close(batched[b, real], alone[0], rtol=1e-5, atol=1e-6 * max(float(alone.max()), 1e-30))
        if n == 2:  # one loss row: exactly the K = 1 probe of that sample
            one = proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, alone_h,
                                 (pe[0][b:b + 1, real], pe[1][b:b + 1, real]), num_positions=1)
            torch.testing.assert_close(alone, one, rtol=1e-6, atol=0)


def test_all_samples_too_short_score_zero():
    stage = make_stage("llama", seed=34)
    hidden, pe, mask = _inputs(stage, "llama", [1, 0, 1], 6, "left", 34)
    ref, fast = _both(stage, hidden, pe, mask, 4)
    assert (ref == 0).all() and (fast == 0).all()
    one_token = hidden[:1, :1]
    one_pe = stage.rope(one_token, torch.zeros(1, 1, dtype=torch.long))
    for fn in (reference.proxy_saliency, proxy_saliency):
        out = fn(stage.layer, stage.final_norm, stage.lm_head, one_token, one_pe)  # no mask, S = 1
        assert out.shape == (1, 1) and (out == 0).all()


@pytest.mark.parametrize("family", ["llama", "qwen2_5_vl", "qwen3", "qwen3_vl_moe"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_short_samples_within_twice_reference_error(family, dtype):
    """Flash-attention rule, both measured against fp32 on the same (rounded) weights and inputs."""
    low = make_stage(family, hidden=64, mlp=128, vocab=300, dtype=dtype, seed=35)
    modules = [copy.deepcopy(m).float() for m in (low.layer, low.final_norm, low.lm_head)]
    hidden, pe, mask = _inputs(low, family, LENGTHS, 13, "right", 35, dtype=dtype)
    truth = reference.proxy_saliency(*modules, hidden.float(), tuple(t.float() for t in pe), attention_mask=mask)
    ref, fast = _both(low, hidden, pe, mask, 4)
    assert torch.isfinite(fast).all() and (fast[~_expected_support(mask)] == 0).all()
    ref_err, fast_err = _rel_err(ref, truth), _rel_err(fast, truth)
    assert ref_err > 0
    assert fast_err <= 2 * ref_err, (fast_err, ref_err)
