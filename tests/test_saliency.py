"""The exact reduced probe (pio_kernels.proxy_saliency) against the reference (SPEC section 2)."""
import copy
import warnings

import pytest
import torch
from torch import nn

from layer_factory import FAMILIES, MROPE_FAMILIES, make_stage, mrope_positions, padded_batch, positions_from_mask
from pio_kernels import proxy_saliency, reference
from pio_kernels.saliency import supports_fast_path


def _inputs(stage, lengths, seq_len, side, seed, dtype=torch.float32, family="llama"):
    mask = padded_batch(lengths, seq_len, side)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(lengths), seq_len, stage.hidden_size, generator=gen).to(dtype)
    if family in MROPE_FAMILIES:
        # an image span inside the shortest sample's valid tokens (both sides of padding)
        start = seq_len - min(lengths) + 1 if side == "left" else 1
        pos = mrope_positions(mask, (start, start + min(lengths) - 4))
    else:
        pos = positions_from_mask(mask)
    return hidden, stage.rope(hidden, pos), mask


def _both(stage, hidden, pe, mask, num_positions=4, **kw):
    args = (stage.layer, stage.final_norm, stage.lm_head, hidden, pe)
    assert supports_fast_path(stage.layer, stage.final_norm, stage.lm_head)  # no silent fallback
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


@pytest.mark.parametrize("family,hidden_size,heads,kv_heads,mlp,vocab,num_positions,head_dim", [
    ("llama", 48, 4, 1, 70, 131, 1, None),          # head_dim 12, MQA, K = 1
    ("qwen2", 96, 6, 3, 40, 257, 6, None),          # head_dim 16, GQA 2, K = 6
    ("qwen2_5_vl", 80, 5, 5, 33, 97, 3, None),      # head_dim 16, MHA with bias, odd MLP
    ("qwen3", 56, 7, 1, 45, 101, 5, 20),            # head_dim 20 > 56 / 7, MQA, q/k norms and biases
    ("qwen3_vl", 72, 6, 2, 50, 113, 2, 12),         # head_dim 12, GQA 3, interleaved M-RoPE
    ("qwen3_vl_moe", 40, 5, 5, 30, 89, 4, 8),       # head_dim 8, MHA, sparse MoE
    ("llama_geglu", 36, 3, 3, 29, 67, 7, None),     # GeGLU, K = 7
])
def test_fp32_odd_shapes(family, hidden_size, heads, kv_heads, mlp, vocab, num_positions, head_dim):
    stage = make_stage(family, hidden=hidden_size, heads=heads, kv_heads=kv_heads, mlp=mlp, vocab=vocab, seed=3,
                       head_dim=head_dim)
    hidden, pe, mask = _inputs(stage, [17, 10, 9, 17], 17, "left", 3, family=family)
    ref, fast = _both(stage, hidden, pe, mask, num_positions=num_positions)
    assert ref.max() > 0
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


def test_structure_detection_accepts_any_mlp_and_rejects_what_it_does_not_model():
    stage = make_stage("llama", seed=9)
    assert supports_fast_path(stage.layer, stage.final_norm, stage.lm_head)
    gelu = copy.deepcopy(stage.layer)
    gelu.mlp.act_fn = nn.GELU()  # the MLP runs through autograd: any MLP is modelled
    assert supports_fast_path(gelu, stage.final_norm, stage.lm_head)
    plain_mlp = copy.deepcopy(stage.layer)
    plain_mlp.mlp = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 64))
    assert supports_fast_path(plain_mlp, stage.final_norm, stage.lm_head)

    def rejected(mutate):
        layer = copy.deepcopy(stage.layer)
        mutate(layer)
        return not supports_fast_path(layer, stage.final_norm, stage.lm_head)

    # a q norm over the whole projection (OLMo-2 style), not per head
    assert rejected(lambda m: setattr(m.self_attn, "q_norm", copy.deepcopy(stage.final_norm)))
    # an extra parameterised child of the layer (Gemma's pre/post feed-forward norms)
    assert rejected(lambda m: setattr(m, "post_feedforward_layernorm", copy.deepcopy(stage.final_norm)))
    # an extra parameterised child of the attention
    assert rejected(lambda m: setattr(m.self_attn, "rel_bias", nn.Linear(4, 4)))
    # a residual multiplier (Granite) or an attention logit soft-cap (Gemma-2)
    assert rejected(lambda m: setattr(m, "residual_multiplier", 0.22))
    assert rejected(lambda m: setattr(m.self_attn, "attn_logit_softcapping", 50.0))
    # a fused qkv projection (Phi-3), a non-causal attention, a LayerNorm as input norm
    assert rejected(lambda m: delattr(m.self_attn, "k_proj"))
    assert rejected(lambda m: setattr(m.self_attn, "is_causal", False))
    assert rejected(lambda m: setattr(m, "input_layernorm", nn.LayerNorm(64)))
    assert not supports_fast_path(stage.layer, nn.LayerNorm(stage.hidden_size), stage.lm_head)
    assert not supports_fast_path(stage.layer, stage.final_norm, nn.Linear(32, 80))


def test_structure_detection_on_every_stock_family():
    for family in FAMILIES:
        stage = make_stage(family)
        assert supports_fast_path(stage.layer, stage.final_norm, stage.lm_head), family


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
    args = (stage.layer, stage.final_norm, stage.lm_head, hidden, pe)
    ref = reference.proxy_saliency(*args, attention_mask=mask)
    if dtype == torch.float32:
        truth, limit = ref, 1e-4
    else:  # flash-attention rule against fp32 on the same rounded weights
        modules = (copy.deepcopy(m).float() for m in (stage.layer, stage.final_norm, stage.lm_head))
        truth = reference.proxy_saliency(*modules, hidden.float(), tuple(t.float() for t in pe), attention_mask=mask)
        limit = 2 * _rel_err(ref, truth)
        assert limit > 0
    for backend in ("triton", "torch"):
        fast = proxy_saliency(*args, attention_mask=mask, backend=backend)
        assert fast.device.type == "cuda"
        assert _rel_err(fast, truth) <= limit, backend


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_torch_head_in_slices_matches_full_softmax(monkeypatch, chunk):
    """The torch head, whole or in slices of the vocabulary, against the direct formula, ties included."""
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


def _stock_layer(model_type: str, **extra):
    """(layer, final norm, head, rotary) of a 1-layer random model of ``model_type`` (transformers' own classes)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=90,
                               max_position_embeddings=64, **extra)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(13)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # trained-like scales, so that attention is not uniform
        for name, p in model.model.layers[0].named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0.0, 2.0 * p.shape[-1] ** -0.5)
    return model.model.layers[0], model.model.norm, model.lm_head, model.model.rotary_emb


@pytest.mark.parametrize("model_type,extra,fast", [
    ("mistral", {}, True),
    ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 48}, True),   # sparse MoE plus a gated shared expert
    ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, True),
    ("minimax", {"layer_types": ["full_attention"], "num_local_experts": 4, "num_experts_per_tok": 2}, False),
    ("helium", {}, False),     # RoPE on interleaved pairs
    ("ernie4_5", {}, False),   # RoPE on interleaved pairs
])
def test_numerical_structure_check_on_other_stock_layers(model_type, extra, fast):
    """Structure alone accepts all of these; the numerical check keeps out the ones we do not model
    (MiniMax: residual of the normalised input, alpha/beta factors; Helium, Ernie 4.5: interleaved
    RoPE), which then fall back to the reference. Either way the scores equal the reference's."""
    import pio_kernels.saliency as sal
    layer, norm, head, rotary = _stock_layer(model_type, **extra)
    assert sal._attention_supported(layer.self_attn, 64)  # the structure alone would take them
    assert supports_fast_path(layer, norm, head) == fast
    mask = padded_batch([10, 6], 10, "left")
    hidden = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(13))
    pe = rotary(hidden, positions_from_mask(mask))
    want = reference.proxy_saliency(layer, norm, head, hidden, pe, attention_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = proxy_saliency(layer, norm, head, hidden, pe, attention_mask=mask)
    assert _rel_err(got, want) <= 1e-4
    if not fast:  # what the fast path would have computed for it is off by far more than 1e-4
        with torch.no_grad():
            wrong = sal._fast_proxy_saliency(layer, norm, head, hidden, pe, mask, 4, False)
        assert _rel_err(wrong, want) > 2e-3


def test_numerical_structure_check_catches_a_scaled_residual():
    stage = make_stage("llama", seed=14)
    layer = copy.deepcopy(stage.layer)
    original = type(layer).forward

    def scaled(self, hidden_states, **kwargs):  # a residual multiplier hidden in the forward code
        out = original(self, hidden_states, **kwargs)
        return hidden_states + 0.5 * (out - hidden_states)

    layer.forward = scaled.__get__(layer)
    assert supports_fast_path(stage.layer, stage.final_norm, stage.lm_head)
    assert not supports_fast_path(layer, stage.final_norm, stage.lm_head)
