"""The oracle itself: reference.proxy_saliency against an independent float64 computation.

The independent version shares no code with the reference: it re-implements the decoder
layer from its weights in plain torch (RMSNorm, per-head q/k RMSNorm, RoPE, GQA causal
attention, gated MLP or top-k sparse MoE), runs each sample alone on its valid tokens only
(no padding, no mask tricks), builds the proxy loss of SPEC 2.3-2.4 from its own loss rows
(the ``min(K, n - 1)`` tokens before the last one; none for ``n <= 1``) and takes
d loss / d H with autograd, one sample at a time.
"""
import pytest
import torch
import torch.nn.functional as F

from layer_factory import MROPE_FAMILIES, make_stage, mrope_positions, padded_batch, positions_from_mask
from pio_kernels import reference


def _rms(x, norm):
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _rot(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _moe(block, x):
    """Top-k sparse MoE, token by token: softmax router, top-k renormalised, weighted experts."""
    experts = block.experts
    probs = F.linear(x, block.gate.weight).softmax(-1)
    top, idx = probs.topk(block.gate.top_k, dim=-1)
    if getattr(block.gate, "norm_topk_prob", True):
        top = top / top.sum(-1, keepdim=True)
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for w, e in zip(top[t], idx[t].tolist()):
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            acc = acc + w * (experts.down_proj[e] @ (experts.act_fn(gate) * up))
        rows.append(acc)
    return torch.stack(rows)


def _mlp(mlp, x):
    if hasattr(mlp, "experts"):
        return _moe(mlp, x)
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def _layer_forward(layer, x, cos, sin):
    """x (n, D) float64 -> (n, D): one pre-norm Llama/Qwen-family layer, causal attention."""
    attn = layer.self_attn
    n = x.shape[0]
    hd = attn.head_dim
    xn = _rms(x, layer.input_layernorm)
    q = attn.q_proj(xn).view(n, -1, hd)
    k = attn.k_proj(xn).view(n, -1, hd)
    v = attn.v_proj(xn).view(n, -1, hd).transpose(0, 1)
    if hasattr(attn, "q_norm"):
        q, k = _rms(q, attn.q_norm), _rms(k, attn.k_norm)
    q, k = q.transpose(0, 1), k.transpose(0, 1)  # (heads, n, hd)
    q, k = q * cos + _rot(q) * sin, k * cos + _rot(k) * sin
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    scores = (q @ k.transpose(1, 2)) * hd ** -0.5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)
    h1 = x + attn.o_proj(out)
    return h1 + _mlp(layer.mlp, _rms(h1, layer.post_attention_layernorm))


def _independent_saliency(stage, x, cos, sin, num_positions):
    """x (n, D) float64, one sample without padding, cos/sin (n, head_dim) -> (n,) float64."""
    n = x.shape[0]
    m = min(num_positions, n - 1)
    if m <= 0:
        return torch.zeros(n, dtype=torch.float64)
    x = x.detach().clone().requires_grad_(True)
    y = _layer_forward(stage.layer, x, cos, sin)
    logits = stage.lm_head(_rms(y, stage.final_norm))
    rows = logits[n - 1 - m:n - 1]  # the m positions before the last token
    labels = rows.argmax(-1)
    loss = (rows.logsumexp(-1) - rows.gather(1, labels[:, None])[:, 0]).mean()
    (grad,) = torch.autograd.grad(loss, x)
    return grad.norm(dim=-1)


def _check_against_independent(family, lengths, seq_len, side, num_positions, seed, attn="sdpa"):
    stage = make_stage(family, seed=seed, dtype=torch.float64, attn=attn)
    mask = padded_batch(lengths, seq_len, side)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(lengths), seq_len, stage.hidden_size, generator=gen, dtype=torch.float64)
    if family in MROPE_FAMILIES:
        start = 1 if side == "right" else seq_len - max(lengths) + 1
        pos = mrope_positions(mask, (start, start + 6))
    else:
        pos = positions_from_mask(mask)
    cos, sin = stage.rope(hidden, pos)
    batched = reference.proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, hidden, (cos, sin),
                                       attention_mask=mask, num_positions=num_positions)
    assert batched.dtype == torch.float32
    assert (batched[mask == 0] == 0).all()
    for b, n in enumerate(lengths):
        valid = mask[b].bool()
        expected = _independent_saliency(stage, hidden[b, valid], cos[b, valid], sin[b, valid], num_positions)
        if n <= 1:
            assert (batched[b] == 0).all()
            continue
        assert expected.max() > 0 and expected[-1] == 0
        # The reference returns fp32: compare at fp32 resolution.
        torch.testing.assert_close(batched[b, valid].double(), expected, rtol=1e-6, atol=1e-7 * float(expected.max()))
        # Batch invariance of the reference: the sample alone, unpadded.
        alone = reference.proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, hidden[b:b + 1, valid],
                                         (cos[b:b + 1, valid], sin[b:b + 1, valid]), num_positions=num_positions)
        torch.testing.assert_close(batched[b, valid], alone[0], rtol=1e-6, atol=1e-7 * float(alone.max()))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_vl"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_reference_matches_independent_float64(family, side):
    _check_against_independent(family, [14, 9, 12], 14, side, 4, seed=21)


@pytest.mark.parametrize("family", ["llama_geglu", "qwen3_moe", "qwen3_vl_moe"])
def test_reference_matches_independent_float64_other_mlps(family):
    _check_against_independent(family, [11, 8], 11, "left", 3, seed=22)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("num_positions", [1, 4, 20])
def test_reference_short_samples_match_independent_float64(side, num_positions):
    """Samples with 0, 1, 2, 4, 5 and 12 real tokens; K = 20 is larger than every sample."""
    _check_against_independent("qwen3", [12, 5, 2, 1, 0, 4], 12, side, num_positions, seed=23)


def test_reference_eager_config_matches_independent_float64():
    """An eager layer runs through SDPA inside the probe: same numbers."""
    _check_against_independent("llama", [10, 3, 7], 10, "left", 4, seed=24, attn="eager")
