"""The exact reduced probe (pio_kernels.proxy_saliency) against the reference (SPEC section 2)."""
import copy
import warnings

import pytest
import torch
from torch import nn

from layer_factory import FAMILIES, make_stage, mrope_positions, padded_batch, positions_from_mask
from pio_kernels import proxy_saliency, reference
from pio_kernels.saliency import supports_fast_path


def _inputs(stage, lengths, seq_len, side, seed, dtype=torch.float32, family="llama"):
    mask = padded_batch(lengths, seq_len, side)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(lengths), seq_len, stage.hidden_size, generator=gen).to(dtype)
    if family == "qwen2_5_vl":
        # an image span inside the shortest sample's valid tokens (both sides of padding)
        start = seq_len - min(lengths) + 1 if side == "left" else 1
        pos = mrope_positions(mask, (start, start + min(lengths) - 4))
    else:
        pos = positions_from_mask(mask)
    return hidden, stage.rope(hidden, pos), mask


def _both(stage, hidden, pe, mask, num_positions=4, **kw):
    args = (stage.layer, stage.final_norm, stage.lm_head, hidden, pe)
    ref = reference.proxy_saliency(*args, attention_mask=mask, num_positions=num_positions)
    fast = proxy_saliency(*args, attention_mask=mask, num_positions=num_positions, **kw)
    return ref, fast


def _rel_err(x, truth):
    return ((x.float() - truth.float()).abs().max() / truth.float().abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp32_matches_reference(family, side, seed):
    stage = make_stage(family, seed=seed)
    hidden, pe, mask = _inputs(stage, [13, 8, 11], 13, side, seed, family=family)
    ref, fast = _both(stage, hidden, pe, mask)
    assert fast.shape == ref.shape and fast.dtype == torch.float32
    assert ref.max() > 0
    assert _rel_err(fast, ref) <= 1e-4


@pytest.mark.parametrize("family,hidden_size,heads,kv_heads,mlp,vocab,num_positions", [
    ("llama", 48, 4, 1, 70, 131, 1),       # head_dim 12, MQA, K = 1
    ("qwen2", 96, 6, 3, 40, 257, 6),       # head_dim 16, GQA 2, K = 6
    ("qwen2_5_vl", 80, 5, 5, 33, 97, 3),   # head_dim 16, MHA with bias, odd MLP
])
def test_fp32_odd_shapes(family, hidden_size, heads, kv_heads, mlp, vocab, num_positions):
    stage = make_stage(family, hidden=hidden_size, heads=heads, kv_heads=kv_heads, mlp=mlp, vocab=vocab, seed=3)
    hidden, pe, mask = _inputs(stage, [17, 10, 9, 17], 17, "left", 3, family=family)
    ref, fast = _both(stage, hidden, pe, mask, num_positions=num_positions)
    assert _rel_err(fast, ref) <= 1e-4


def test_fp32_no_mask_and_eager_attention():
    stage = make_stage("qwen2", attn="eager", seed=4)
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 9, stage.hidden_size, generator=gen)
    pe = stage.rope(hidden, torch.arange(9).expand(2, 9))
    ref, fast = _both(stage, hidden, pe, None)
    assert (fast[:, :-1] > 0).all() and (fast[:, -1] == 0).all()  # the last token reaches no loss row
    assert _rel_err(fast, ref) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_reference_error(family, dtype):
    """Flash-attention rule: both measured against fp32 on the same (rounded) weights and inputs."""
    for seed in (0, 1):
        low = make_stage(family, hidden=64, mlp=128, vocab=300, dtype=dtype, seed=seed)
        truth_stage = copy.copy(low)
        truth_stage.layer, truth_stage.final_norm, truth_stage.lm_head = (
            copy.deepcopy(m).float() for m in (low.layer, low.final_norm, low.lm_head))
        hidden, pe, mask = _inputs(low, [21, 15], 21, "left", seed, dtype=dtype, family=family)
        truth = reference.proxy_saliency(truth_stage.layer, truth_stage.final_norm, truth_stage.lm_head,
                                         hidden.float(), tuple(t.float() for t in pe), attention_mask=mask)
        ref, fast = _both(low, hidden, pe, mask)
        ref_err, fast_err = _rel_err(ref, truth), _rel_err(fast, truth)
        assert ref_err > 0
        assert fast_err <= 2 * ref_err, (seed, fast_err, ref_err)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_top_k_on_well_separated_scores(family):
    stage = make_stage(family, seed=5)
    hidden, pe, mask = _inputs(stage, [30, 24], 30, "right", 5, family=family)
    ref, fast = _both(stage, hidden, pe, mask)
    for b in range(2):
        ordered = ref[b].sort(descending=True).values
        gaps = (ordered[3:9] - ordered[4:10]) / ordered[0]
        k = 4 + int(gaps.argmax())  # the cut with the widest gap among k = 4..9
        assert gaps.max() > 1e-3
        assert set(ref[b].topk(k).indices.tolist()) == set(fast[b].topk(k).indices.tolist())


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_scores_zero_and_batch_invariance(side):
    stage = make_stage("qwen2", seed=6)
    lengths = [12, 7, 10]
    hidden, pe, mask = _inputs(stage, lengths, 12, side, 6)
    batched = proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, hidden, pe, attention_mask=mask)
    assert torch.isfinite(batched).all()
    last = (mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True)) & (mask == 1)  # no loss row sees it
    assert (batched[mask == 0] == 0).all() and (batched[last] == 0).all()
    assert (batched[(mask == 1) & ~last] > 0).all()
    for b, n in enumerate(lengths):
        valid = mask[b].bool()
        alone_h = hidden[b:b + 1, valid]
        alone_pe = stage.rope(alone_h, torch.arange(n)[None])
        alone = proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, alone_h, alone_pe)
        torch.testing.assert_close(batched[b, valid], alone[0], rtol=1e-5, atol=1e-6 * float(alone.max()))


def test_no_grad_inference_mode_and_grad_enabled_agree():
    stage = make_stage("llama", seed=7)
    hidden, pe, mask = _inputs(stage, [10, 6], 10, "left", 7)
    args = (stage.layer, stage.final_norm, stage.lm_head, hidden, pe)
    plain = proxy_saliency(*args, attention_mask=mask)
    assert not plain.requires_grad
    with torch.no_grad():
        no_grad = proxy_saliency(*args, attention_mask=mask)
    with torch.inference_mode():
        inference = proxy_saliency(*args, attention_mask=mask)
    torch.testing.assert_close(no_grad, plain, rtol=0, atol=0)
    torch.testing.assert_close(inference, plain, rtol=0, atol=0)
    assert all(p.grad is None for p in stage.layer.parameters())


class _WrappedDecoderLayer(nn.Module):
    """A layer type the fast path does not know (no self_attn at the top level)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, **kwargs):
        return self.inner(hidden_states, **kwargs)


def test_unknown_layer_falls_back_with_one_warning():
    stage = make_stage("llama", seed=8)
    layer = _WrappedDecoderLayer(stage.layer)
    hidden, pe, mask = _inputs(stage, [9, 7], 9, "left", 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = proxy_saliency(layer, stage.final_norm, stage.lm_head, hidden, pe, attention_mask=mask)
        proxy_saliency(layer, stage.final_norm, stage.lm_head, hidden, pe, attention_mask=mask)
    ours = [w for w in caught if "_WrappedDecoderLayer" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    expected = reference.proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, hidden, pe,
                                        attention_mask=mask)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)


def test_structure_detection_rejects_extra_norms_and_other_activations():
    stage = make_stage("llama", seed=9)
    assert supports_fast_path(stage.layer, stage.final_norm, stage.lm_head)
    qk_norm = copy.deepcopy(stage.layer)
    qk_norm.self_attn.q_norm = copy.deepcopy(stage.final_norm)  # Qwen3-style query norm
    assert not supports_fast_path(qk_norm, stage.final_norm, stage.lm_head)
    gelu = copy.deepcopy(stage.layer)
    gelu.mlp.act_fn = nn.GELU()
    assert not supports_fast_path(gelu, stage.final_norm, stage.lm_head)
    assert not supports_fast_path(stage.layer, nn.LayerNorm(stage.hidden_size), stage.lm_head)


def test_bad_arguments_raise():
    stage = make_stage("llama", seed=10)
    hidden, pe, mask = _inputs(stage, [9, 7], 9, "left", 10)
    args = (stage.layer, stage.final_norm, stage.lm_head, hidden)
    with pytest.raises(ValueError, match="position_embeddings"):
        proxy_saliency(*args, (pe[0][None].expand(3, -1, -1, -1), pe[1][None].expand(3, -1, -1, -1)),
                       attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask"):
        proxy_saliency(*args, pe, attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="backend"):
        proxy_saliency(*args, pe, attention_mask=mask, backend="cuda")
    with pytest.raises(ValueError, match="num_positions"):
        proxy_saliency(*args, pe, attention_mask=mask, num_positions=0)
    with pytest.raises(ValueError, match="hidden_states"):
        proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, hidden[0], pe)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_and_torch_paths_match_reference(family, dtype):
    stage = make_stage(family, hidden=128, heads=4, mlp=256, vocab=1000, dtype=dtype, seed=11, device="cuda")
    hidden, pe, mask = _inputs(stage, [40, 33, 25], 40, "left", 11, dtype=dtype, family=family)
    hidden, mask = hidden.cuda(), mask.cuda()
    pe = tuple(t.cuda() for t in pe)
    ref = reference.proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, hidden, pe, attention_mask=mask)
    for backend in ("triton", "torch"):
        fast = proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, hidden, pe, attention_mask=mask,
                              backend=backend)
        assert fast.device.type == "cuda"
        assert _rel_err(fast, ref) <= (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_torch_head_one_pass_matches_full_softmax(monkeypatch, chunk):
    """The online-softmax head (one read of the head) against the direct formula, ties included."""
    import pio_kernels.saliency as sal
    monkeypatch.setattr(sal, "_head_chunk_rows", lambda weight: chunk)
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(8, generator=gen)
    normed = torch.zeros(5, 16)
    normed[:, :8] = base + 0.1 * torch.randn(5, 8, generator=gen)
    weight = 0.1 * torch.randn(150, 16, generator=gen)
    weight[3, :8] = weight[120, :8] = 2.0 * base  # tied maxima in different chunks, different rows
    bias = torch.zeros(150)
    scale = torch.rand(5, generator=gen)
    logits = normed @ weight.T + bias
    assert (logits.argmax(-1) == 3).all() and (logits[:, 3] == logits[:, 120]).all()
    expected = scale[:, None] * (logits.softmax(-1) @ weight - weight[3])
    got = sal._head_loss_grad_torch(normed, weight, bias, scale)
    assert (scale[:, None] * (weight[3] - weight[120])).abs().max() > 1e-2  # the label matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
