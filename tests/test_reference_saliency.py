"""The oracle itself: reference.proxy_saliency against an independent float64 computation.

The independent version shares no code with the reference: it re-implements the decoder
layer from its weights in plain torch (RMSNorm, RoPE, GQA causal attention, SwiGLU), runs
each sample alone on its valid tokens only (no padding, no mask tricks), builds the
proxy loss of SPEC 2.3-2.4 and takes d loss / d H with autograd, one sample at a time.
"""
import pytest
import torch
import torch.nn.functional as F

from layer_factory import make_stage, padded_batch, positions_from_mask
from pio_kernels import reference


def _rms(x, norm):
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _rot(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _layer_forward(layer, x, cos, sin):
    """x (n, D) float64 -> (n, D): one pre-norm Llama-family layer, causal attention."""
    attn, mlp = layer.self_attn, layer.mlp
    n = x.shape[0]
    hd = attn.head_dim
    xn = _rms(x, layer.input_layernorm)
    q = attn.q_proj(xn).view(n, -1, hd).transpose(0, 1)  # (heads, n, hd)
    k = attn.k_proj(xn).view(n, -1, hd).transpose(0, 1)
    v = attn.v_proj(xn).view(n, -1, hd).transpose(0, 1)
    q, k = q * cos + _rot(q) * sin, k * cos + _rot(k) * sin
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    scores = (q @ k.transpose(1, 2)) * hd ** -0.5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)
    h1 = x + attn.o_proj(out)
    m = _rms(h1, layer.post_attention_layernorm)
    return h1 + mlp.down_proj(F.silu(mlp.gate_proj(m)) * mlp.up_proj(m))


def _independent_saliency(stage, x, num_positions):
    """x (n, D) float64, one sample without padding -> (n,) float64."""
    x = x.detach().clone().requires_grad_(True)
    n = x.shape[0]
    cos, sin = stage.rope(x[None], torch.arange(n)[None])
    y = _layer_forward(stage.layer, x, cos[0], sin[0])
    logits = stage.lm_head(_rms(y, stage.final_norm))
    rows = logits[n - 1 - num_positions:n - 1]  # the K positions before the last token
    labels = rows.argmax(-1)
    loss = (rows.logsumexp(-1) - rows.gather(1, labels[:, None])[:, 0]).mean()
    (grad,) = torch.autograd.grad(loss, x)
    return grad.norm(dim=-1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_reference_matches_independent_float64(family, side):
    stage = make_stage(family, seed=21, dtype=torch.float64)
    lengths, num_positions = [14, 9, 12], 4
    mask = padded_batch(lengths, 14, side)
    gen = torch.Generator().manual_seed(21)
    hidden = torch.randn(3, 14, stage.hidden_size, generator=gen, dtype=torch.float64)
    pe = stage.rope(hidden, positions_from_mask(mask))
    batched = reference.proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, hidden, pe,
                                       attention_mask=mask, num_positions=num_positions)
    assert batched.dtype == torch.float32
    assert (batched[mask == 0] == 0).all()
    for b in range(3):
        valid = mask[b].bool()
        expected = _independent_saliency(stage, hidden[b, valid], num_positions)
        assert expected.max() > 0
        # The reference returns fp32: compare at fp32 resolution.
        torch.testing.assert_close(batched[b, valid].double(), expected, rtol=1e-6, atol=1e-7 * float(expected.max()))
        # Batch invariance of the reference: the sample alone, unpadded.
        alone = reference.proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, hidden[b:b + 1, valid],
                                         stage.rope(hidden[b:b + 1, valid], torch.arange(lengths[b])[None]),
                                         num_positions=num_positions)
        torch.testing.assert_close(batched[b, valid], alone[0], rtol=1e-6, atol=1e-7 * float(alone.max()))
