"""The exact reduced probe: proxy saliency (SPEC section 2) without a full layer pass.

:func:`pio_kernels.reference.proxy_saliency` runs the layer on every position, builds
``S x V`` logits and asks autograd for ``d l / d H``. Only the loss rows of each sample
reach the loss (at most K, :func:`pio_kernels.reference.loss_positions`), and every other
token reaches them only through its key and value in the layer's attention (SPEC 2, "Why
this is cheap to compute exactly"). This module computes the same gradient: everything
that touches all S rows is written out by hand, step by step; the feed-forward block of the
K loss rows goes through autograd.

forward (``p`` = the K loss rows, ``j`` = every position)
    F1  ``Xn = input_layernorm(H)`` for every row (HF rounding kept: fp32 norm, cast, times gain)
    F2  keys ``Kr_j = rope(k_norm(Xn_j W_k^T + b_k))`` for every row; queries
        ``Qr_p = rope(q_norm(Xn_p W_q^T + b_q))`` for the loss rows only (``q_norm`` /
        ``k_norm``: per-head RMSNorms, Qwen3; the identity where the layer has none)
    F3  ``P = softmax(scaling * Qr_p Kr^T)`` over the keys row ``p`` may see (causal, no padding)
    F4  ``O_p = (P Xn) W_v^T + b_v`` (no value projection of every row), ``A_p = O_p W_o^T``
    F5  ``H1_p = H_p + A_p``; ``Y_p = H1_p + mlp(post_attention_layernorm(H1_p))`` through
        autograd on the loss rows only (any MLP: SwiGLU, GeGLU, sparse MoE, ...)
    F6  ``Z_p = lm_head(final_norm(Y_p))`` (K x V, fp32), pseudo-label ``argmax Z_p``
backward (fp32 throughout; weights stay in their dtype, matmuls accumulate in fp32)
    B1  ``dZ = w_p (softmax(Z) - onehot)`` with ``w_p`` = 1 / (the sample's loss rows), 0 in a
        slot without a loss row; ``dF = dZ W_head``; final-norm backward -> ``dY``
    B2  autograd through F5's feed-forward block -> ``dH1_p`` (also the residual part of ``dH_p``)
    B3  ``dO = dH1 W_o``; ``u = dO W_v`` (one D-vector per head and loss row)
    B4  ``dS = P * (u Xn^T - rowsum)`` (the value bias and ``b_v`` cancel in the softmax)
    B5  ``dXn_j = W_k^T k_norm'(R^T(dKr_j))`` (key path) ``+ P^T u`` (value path, rank <= heads*K)
        ``+ W_q^T q_norm'(R^T(dQr_p))`` on the loss rows; ``R^T`` undoes RoPE with the given
        cos/sin, ``k_norm'`` is the per-head RMSNorm backward
    B6  ``dH = input_layernorm backward(dXn) + dH1`` (loss rows), score ``||dH_j||_2`` (fp32)

A slot without a loss row (a sample with fewer than K + 1 real tokens) points at row S - 1,
attends at least to itself (so its softmax stays finite) and weighs 0 in B1, so it adds
exactly nothing.

Cost on LLaVA-1.5-7B (S 640, D 4096, V 32000): two ``S x D x D_kv`` products (keys and the
key-path backward, ~43 GFLOP) plus K rows of everything else, against ~1.3 TFLOP for the
reference. On CUDA the head (F6 + B1) and the epilogue (B6) run as fused Triton kernels
(:mod:`pio_kernels.triton.head_loss`, :mod:`pio_kernels.triton.saliency_epilogue`); the
torch code below is their fallback and the CPU path. Host synchronisation: none in the
hand-written steps (the loss rows are built on the device); an MLP's own code may have
some (a sparse MoE block reads which experts are hit).

Which layers take the fast path (:func:`supports_fast_path`): checked by structure, not by
class name, then numerically once per layer object:

- a pre-norm residual decoder layer whose only parameterised children are ``self_attn``,
  ``mlp``, ``input_layernorm`` and ``post_attention_layernorm``, computing
  ``H1 = H + self_attn(input_layernorm(H))``, ``Y = H1 + mlp(post_attention_layernorm(H1))``;
- ``self_attn``: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` linears (biases optional;
  MHA, GQA or MQA; ``head_dim`` may differ from D / heads), an int ``head_dim`` and a float
  ``scaling``, optional per-head ``q_norm`` / ``k_norm`` RMSNorms of size ``head_dim``
  applied before RoPE, causal, and no other parameterised child;
- ``input_layernorm`` and the model's ``final_norm``: HF RMSNorms
  (``weight * (x * rsqrt(mean(x^2) + variance_epsilon)).to(dtype)``);
- ``post_attention_layernorm`` and ``mlp``: any modules that act on each row on its own
  (they run through autograd on the loss rows: SwiGLU, GeGLU, a sparse MoE block without
  token dropping, a shared expert);
- ``lm_head``: a linear layer;
- RoPE (plain or M-RoPE) handed over as ``(cos, sin)`` of shape (B, S, head_dim) or
  (S, head_dim), applied with HF's ``rotate_half`` (halves, not interleaved pairs);
- no float attribute on the layer itself and none on ``self_attn`` besides ``scaling`` and
  ``attention_dropout`` (this keeps out e.g. Granite's residual multiplier or a logit
  soft-cap, which the probe does not model);
- the numerical check (:func:`_forward_matches`) confirms the wiring above, the attention
  and the norms on a few random tokens: structure cannot see a forward's code.

In transformers 5.17-5.24 this takes ``LlamaDecoderLayer``, ``Qwen2DecoderLayer``,
``Qwen2_5_VLDecoderLayer``, ``Qwen3DecoderLayer``, ``Qwen3MoeDecoderLayer`` (dense or sparse
MoE MLP), ``Qwen3VLTextDecoderLayer`` and ``Qwen3VLMoeTextDecoderLayer`` (tested here), and
also Mistral, Mixtral and Qwen2-MoE layers. Everything else falls back to the reference
with a one-time warning naming its type: structurally, Gemma (extra norms, ``1 + weight``
RMSNorm), Phi-3 (fused ``qkv_proj``), OLMo-2 (post-norms), Cohere (parallel block), Granite
(multipliers), Qwen3-Next (gated attention); numerically, MiniMax (residual taken after the
norm, alpha/beta factors), Helium and Ernie 4.5 (RoPE on interleaved pairs). Not modelled by
either path: sliding-window attention (both attend over the whole causal prefix; Qwen2/3
enable it only with ``use_sliding_window``) and dropout (layers are assumed in eval mode).
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from pio_kernels import reference

__all__ = ["proxy_saliency", "supports_fast_path"]

BACKENDS = ("auto", "torch", "triton")
# Process-wide default for ``backend="auto"``: set to "torch" to force the torch path
# everywhere (benchmarks, debugging); "auto" uses Triton on CUDA when it imports.
DEFAULT_BACKEND = "auto"

_WARNED_TYPES: set[str] = set()
_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_ATTN_PARTS = {*_ATTN_PROJECTIONS, "q_norm", "k_norm"}
_ATTN_FLOATS = {"scaling", "attention_dropout"}


# --------------------------------------------------------------------------------------
# Structure detection
# --------------------------------------------------------------------------------------

def _is_rms_norm(module: object) -> bool:
    """HF RMSNorm: ``weight * (x * rsqrt(mean(x^2) + variance_epsilon)).to(dtype)``, no bias."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float)
            and getattr(module, "bias", None) is None
            and not any(True for _ in module.children()))


def _only_known_parameterised_children(module: nn.Module, known: set[str]) -> bool:
    """True when every child that carries parameters is one we model (rejects e.g. Gemma's extra norms)."""
    return all(name in known or not any(True for _ in child.parameters())
               for name, child in module.named_children())


def _float_attributes(module: nn.Module) -> set[str]:
    """Names of the plain float attributes set on ``module`` (a scale the probe would have to model)."""
    return {name for name, value in vars(module).items() if isinstance(value, float)}


def _attention_supported(attn: nn.Module, hidden: int) -> bool:
    projections = [getattr(attn, n, None) for n in _ATTN_PROJECTIONS]
    if not all(isinstance(p, nn.Linear) for p in projections):
        return False
    q_proj, k_proj, v_proj, o_proj = projections
    head_dim, scaling = getattr(attn, "head_dim", None), getattr(attn, "scaling", None)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        return False
    if not isinstance(scaling, float) or getattr(attn, "is_causal", True) is not True:
        return False
    if any(p.in_features != hidden for p in (q_proj, k_proj, v_proj)) or o_proj.out_features != hidden:
        return False
    if q_proj.out_features % head_dim or k_proj.out_features % head_dim or v_proj.out_features != k_proj.out_features:
        return False
    if o_proj.in_features != q_proj.out_features or (q_proj.out_features // head_dim) % (k_proj.out_features // head_dim):
        return False
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name, None)
        if norm is not None and not (_is_rms_norm(norm) and norm.weight.numel() == head_dim):
            return False
    return _only_known_parameterised_children(attn, _ATTN_PARTS) and _float_attributes(attn) <= _ATTN_FLOATS


def supports_fast_path(layer: nn.Module, final_norm: nn.Module, lm_head: nn.Module) -> bool:
    """Whether the reduced probe models ``layer`` exactly (see this module's docstring for the list).

    First by structure, not by class: the layer's parameterised children, the attention's
    projections and optional per-head q/k RMSNorms, HF RMSNorms for ``input_layernorm`` and
    ``final_norm``, any modules for ``post_attention_layernorm`` and ``mlp``, a linear head,
    and no float attribute that would scale a residual or a logit.

    Then numerically, once per layer and norm object (:func:`_forward_matches`): structure
    cannot see a forward's code, and e.g. MiniMax (normalised residuals, alpha/beta factors),
    Helium and Ernie 4.5 (RoPE on interleaved pairs) pass the structural test. This runs the
    layer on a few random tokens (no hook fires, as in the reference), reads one flag back
    from the device and caches the answer.
    """
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    post_norm = getattr(layer, "post_attention_layernorm", None)
    if not all(isinstance(m, nn.Module) for m in (attn, mlp, post_norm)):
        return False
    if not (_is_rms_norm(getattr(layer, "input_layernorm", None)) and _is_rms_norm(final_norm)):
        return False
    if not isinstance(lm_head, nn.Linear):
        return False
    hidden = layer.input_layernorm.weight.numel()
    if final_norm.weight.numel() != hidden or lm_head.in_features != hidden:
        return False
    if not (_attention_supported(attn, hidden) and _only_known_parameterised_children(layer, _LAYER_PARTS)
            and not _float_attributes(layer)):
        return False
    return _checked(layer, _forward_matches) and _checked(final_norm, _rms_norm_matches)


# --------------------------------------------------------------------------------------
# Small exact pieces (fp32 math, weights in their own dtype)
# --------------------------------------------------------------------------------------

def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` in fp32: the matmul runs in the weight's dtype (fp32 accumulate)."""
    y = F.linear(x.to(weight.dtype), weight).float()
    return y if bias is None else y + bias.float()


def _linear_t(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dy @ weight`` in fp32: the input gradient of ``F.linear(x, weight)``."""
    return (dy.to(weight.dtype) @ weight).float()


def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``rsqrt(mean(x^2) + eps)`` over the last dim, fp32, keepdim."""
    x = x.float()
    return torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def _rms_norm_backward(x: torch.Tensor, rstd: torch.Tensor, grad_normed: torch.Tensor) -> torch.Tensor:
    """d/dx of ``x * rstd(x)`` given the gradient ``g`` of the normalised rows (gain already applied).

    ``dx = rstd * g - x * rstd^3 * mean(g * x)``, fp32.
    """
    x = x.float()
    return rstd * grad_normed - x * rstd.pow(3) * (grad_normed * x).mean(dim=-1, keepdim=True)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x cos + rotate_half(x) sin`` with HF's ``rotate_half``: ``(x1, x2) -> (-x2, x1)`` on the two
    halves of the last dim; built in one output buffer (no (B, S, ...) temporaries)."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def _rope_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``R^T``: undoes RoPE on a gradient (``y = x cos + rot(x) sin`` -> ``dx = dy cos + rot^T(dy sin)``,
    with ``rot^T: (g1, g2) -> (g2, -g1)``). Built in one output buffer, as :func:`_rope`.
    """
    half = grad.shape[-1] // 2
    out = grad * cos
    out[..., :half].addcmul_(grad[..., half:], sin[..., half:])
    out[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1.0)
    return out


# --------------------------------------------------------------------------------------
# Numerical check of the structure (once per module object)
# --------------------------------------------------------------------------------------

_CHECKED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
_CHECK_TOKENS = 6
# Largest relative difference accepted between our model of a piece and the module itself,
# per dtype: the module rounds every intermediate to its dtype, ours keeps fp32. A piece we
# do not model (another residual, RoPE convention, norm formula) is off by O(1).
_CHECK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _checked(module: nn.Module, check) -> bool:
    verdict = _CHECKED.get(module)
    if verdict is None:
        verdict = _CHECKED[module] = check(module)
    return verdict


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``max |got - want| <= tol * max |want|`` as a 0-d bool tensor (no host read here)."""
    got, want = got.float(), want.float()
    return (got - want).abs().max() <= _CHECK_TOLERANCE[dtype] * want.abs().max()


def _rms_norm_model(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """F1's formula: fp32 norm, cast to the input dtype, times the gain (fp32 result)."""
    return (norm.weight * (x.float() * _rms_scale(x, norm.variance_epsilon)).to(x.dtype)).float()


def _rms_norm_matches(norm: nn.Module) -> bool:
    """Whether ``norm`` computes :func:`_rms_norm_model` (e.g. not ``1 + weight``, as Gemma's)."""
    weight = norm.weight
    if weight.dtype not in _CHECK_TOLERANCE or weight.device.type == "meta":
        return False
    gen = torch.Generator().manual_seed(0)
    x = (3.0 * torch.randn(2, weight.numel(), generator=gen)).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        return bool(_close(_rms_norm_model(norm, x), norm(x), weight.dtype))


def _attention_model(attn: nn.Module, xn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """What the probe assumes ``self_attn`` computes (F2-F4), on every row of one causal sequence.

    ``xn`` (1, n, D); ``cos``/``sin`` (1, n, head_dim). fp32 result, weights in their dtype.
    """
    _, n, _ = xn.shape
    head_dim = attn.head_dim
    heads = []
    for name in ("q", "k", "v"):
        proj = getattr(attn, f"{name}_proj")
        x = _linear(xn, proj.weight, proj.bias).view(1, n, -1, head_dim)
        norm = getattr(attn, f"{name}_norm", None)
        if norm is not None:
            x = norm.weight.float() * (x * _rms_scale(x, norm.variance_epsilon))
        if name != "v":
            x = _rope(x, cos.float()[:, :, None], sin.float()[:, :, None])
        heads.append(x.transpose(1, 2))  # (1, heads, n, hd)
    q, k, v = heads
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    causal = torch.ones(n, n, dtype=torch.bool, device=xn.device).tril()
    prob = (attn.scaling * q @ k.transpose(-1, -2)).masked_fill(~causal, float("-inf")).softmax(-1)
    out = (prob @ v).transpose(1, 2).reshape(1, n, -1)
    return _linear(out, attn.o_proj.weight, attn.o_proj.bias)


def _forward_matches(layer: nn.Module) -> bool:
    """Whether ``layer`` computes what the probe assumes, on a few random tokens.

    Three comparisons, each within :data:`_CHECK_TOLERANCE` of the layer's dtype:
    ``input_layernorm`` against F1's formula; ``self_attn`` against :func:`_attention_model`
    (projections, q/k norms, RoPE with ``rotate_half`` on random angles, GQA, scaling, causal
    softmax); and ``layer.forward`` against ``H1 = H + self_attn(input_layernorm(H))``,
    ``Y = H1 + mlp(post_attention_layernorm(H1))`` built from the layer's own modules (the
    residual wiring). Forwards are called directly, with attention through SDPA, so no hook
    of the layer or its attention fires. Any exception means "not modelled".
    """
    weight = layer.input_layernorm.weight
    dtype, device = weight.dtype, weight.device
    if dtype not in _CHECK_TOLERANCE or device.type == "meta":
        return False
    attn, n = layer.self_attn, _CHECK_TOKENS
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, n, weight.numel(), generator=gen).to(device=device, dtype=dtype)
    angles = 6.283 * torch.rand(1, n, attn.head_dim // 2, generator=gen)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = (t.to(device=device, dtype=dtype) for t in (angles.cos(), angles.sin()))
    mask = reference._causal_padding_mask(None, 1, n, dtype, device)
    try:
        with torch.no_grad(), reference._sdpa_attention(layer):
            xn = layer.input_layernorm(h)
            attn_out = attn.forward(hidden_states=xn, position_embeddings=(cos, sin), attention_mask=mask)[0]
            h1 = h + attn_out
            ffn = layer.mlp(layer.post_attention_layernorm(h1))
            composed = h1 + (ffn[0] if isinstance(ffn, tuple) else ffn)
            out = layer.forward(h, attention_mask=mask, position_embeddings=(cos, sin))
            out = out[0] if isinstance(out, tuple) else out
            ok = (_close(_rms_norm_model(layer.input_layernorm, h), xn, dtype)
                  & _close(_attention_model(attn, xn, cos, sin), attn_out, dtype)
                  & _close(out - h, composed - h, dtype))
        return bool(ok)
    except Exception:  # noqa: BLE001 - a forward we cannot call this way is not one we model
        return False


def _head_chunk_rows(weight: torch.Tensor) -> int:
    """Vocabulary rows per product of the torch head: the whole head when it is already fp32
    (no copy), else slices whose fp32 copy is 64 MB at most."""
    if weight.dtype == torch.float32:
        return weight.shape[0]
    return max(1, (64 << 20) // (4 * weight.shape[1]))


def _head_loss_grad_torch(normed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          row_scale: torch.Tensor) -> torch.Tensor:
    """Torch fallback of :func:`pio_kernels.triton.head_loss.head_loss_grad` (SPEC 2.2-2.4).

    ``normed`` (R, D) fp32 final-norm rows; ``weight`` (V, D); ``row_scale`` (R,) fp32 loss
    weight of each row (1 / the sample's loss rows, 0 for an empty slot). Returns
    ``d loss / d normed`` (R, D) fp32 with ``loss = sum_r row_scale_r * CE(Z_r, argmax Z_r)``,
    ``Z = normed W^T + b`` in fp32, i.e. ``row_scale * (softmax(Z) W - W[argmax Z])``.

    Two passes over the head, each a few large products: the ``R x V`` fp32 logits (R = B*K
    rows, e.g. 2.4 MB at R 4, V 152k), then ``softmax(Z) W``. Ties of the pseudo-label go to
    the lowest index (``torch.argmax``). A half-precision head is upcast one 64 MB slice at a
    time, never as a whole. Few, large operations on purpose: on a busy CPU, every parallel
    region of a small operation waits for a descheduled thread (an earlier one-pass version
    in 128-row slices took 40 s instead of 4 s for Qwen3-VL's head at load 7 on 2 cores).
    """
    rows = normed.shape[0]
    vocab = weight.shape[0]
    step = _head_chunk_rows(weight)
    if step >= vocab:
        logits = normed @ weight.float().T
    else:
        logits = torch.empty(rows, vocab, dtype=torch.float32, device=normed.device)
        for start in range(0, vocab, step):
            logits[:, start:start + step] = normed @ weight[start:start + step].float().T
    if bias is not None:
        logits += bias.float()
    label = logits.argmax(dim=1)
    prob = torch.softmax(logits, dim=1)
    acc = torch.zeros_like(normed)
    for start in range(0, vocab, step):
        acc.addmm_(prob[:, start:start + step], weight[start:start + step].float())
    return row_scale[:, None] * (acc - weight[label].float())


def _epilogue_torch(grad_xn: torch.Tensor, hidden: torch.Tensor, gain: torch.Tensor, eps: float,
                    rows: torch.Tensor, grad_residual: torch.Tensor) -> torch.Tensor:
    """Torch fallback of :func:`pio_kernels.triton.saliency_epilogue.saliency_epilogue` (SPEC 2.5).

    ``grad_xn`` (B, S, D) fp32 gradient of ``input_layernorm``'s output, ``hidden`` (B, S, D)
    its input, ``rows`` (B, K) loss rows whose residual gradient ``grad_residual`` (B, K, D)
    is added. Returns (B, S) fp32 ``|| dH ||_2``.

    This runs on every (B, S, D) row, so the RMSNorm backward (:func:`_rms_norm_backward`'s
    formula) works in place on one buffer rather than through temporaries.
    """
    x = hidden.float()
    rstd = _rms_scale(x, eps)
    grad = grad_xn * gain.float()
    coef = (grad * x).mean(dim=-1, keepdim=True).mul_(rstd.pow(3))
    grad_h = grad.mul_(rstd).addcmul_(x, coef, value=-1.0)
    grad_h.scatter_add_(1, rows[..., None].expand_as(grad_residual), grad_residual)
    return grad_h.norm(dim=-1)


# --------------------------------------------------------------------------------------
# The reduced probe
# --------------------------------------------------------------------------------------

def _triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _rotary_tables(position_embeddings, batch: int, seq_len: int, head_dim: int):
    cos, sin = position_embeddings
    if cos.dim() == 4:
        raise ValueError("position_embeddings: got a 4-D cos of shape "
                         f"{tuple(cos.shape)}; pass the (B, S, head_dim) pair the decoder layer takes "
                         "(M-RoPE sections already merged, as transformers >= 5 does)")
    if cos.shape != sin.shape or cos.shape[-1] != head_dim or cos.shape[-2] != seq_len or cos.dim() not in (2, 3):
        raise ValueError(f"position_embeddings must be (cos, sin) of shape (B, {seq_len}, {head_dim}) or "
                         f"({seq_len}, {head_dim}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    cos, sin = cos.float(), sin.float()
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)


def _feed_forward(layer: nn.Module, h1: torch.Tensor, dtype: torch.dtype):
    """F5's feed-forward block on the loss rows through autograd: ``(leaf, out)``.

    ``h1`` (B, K, D) fp32 is rounded to the residual stream's ``dtype`` (what the block sees
    in the model) into a fresh leaf; ``out = mlp(post_attention_layernorm(leaf))`` keeps its
    graph for :func:`_feed_forward_backward`. Made outside inference mode, so that it works
    when the caller runs under ``torch.inference_mode()``.
    """
    with torch.inference_mode(False), torch.enable_grad():
        leaf = h1.detach().to(dtype).clone().requires_grad_(True)
        out = layer.mlp(layer.post_attention_layernorm(leaf))
        if isinstance(out, tuple):  # MLPs that also return e.g. router logits
            out = out[0]
    return leaf, out


def _feed_forward_backward(leaf: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``d <out, grad_out> / d leaf`` (fp32); no parameter gradient is computed or accumulated."""
    with torch.inference_mode(False), torch.enable_grad():
        (grad,) = torch.autograd.grad(out, leaf, grad_out.to(out.dtype).clone())
    return grad.float()


def _fast_proxy_saliency(layer: nn.Module, final_norm: nn.Module, lm_head: nn.Linear, hidden_states: torch.Tensor,
                         position_embeddings, attention_mask: torch.Tensor | None, num_positions: int,
                         use_triton: bool) -> torch.Tensor:
    attn = layer.self_attn
    norm_in = layer.input_layernorm
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    batch, seq_len, hidden = hidden_states.shape
    head_dim = attn.head_dim
    n_heads, n_kv = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
    group = n_heads // n_kv
    k_rows = num_positions
    device = hidden_states.device
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)

    # (B, K) loss rows and which slots hold one; empty slots point at row S - 1 (SPEC 2.3).
    rows, valid = reference.loss_positions(attention_mask, batch, seq_len, num_positions, device=device)
    cos, sin = _rotary_tables(position_embeddings, batch, seq_len, head_dim)  # (B, S, hd) fp32
    gather_rows = rows[..., None]

    def take(x: torch.Tensor) -> torch.Tensor:  # (B, S, ...) -> (B, K, ...), the loss rows
        return x.gather(1, gather_rows.expand(-1, -1, x.shape[-1]))

    # F1: input norm for every row, rounded like HF (fp32 norm, cast to the input dtype, times gain).
    h = hidden_states
    rstd_in = _rms_scale(h, norm_in.variance_epsilon)  # (B, S, 1)
    xn = (norm_in.weight * (h.float() * rstd_in).to(h.dtype)).float()  # (B, S, D)

    # F2: keys of every row (k_norm, then RoPE); queries of the loss rows only (q_norm, then RoPE).
    k = _linear(xn, attn.k_proj.weight, attn.k_proj.bias).view(batch, seq_len, n_kv, head_dim)
    if k_norm is not None:
        k_raw, rstd_k = k, _rms_scale(k, k_norm.variance_epsilon)  # (B, S, G, 1)
        k = k_norm.weight.float() * (k_raw * rstd_k)
    k_rot = _rope(k, cos[:, :, None], sin[:, :, None]).transpose(1, 2)  # (B, G, S, hd)
    del k
    cos_p, sin_p = take(cos)[:, :, None], take(sin)[:, :, None]  # (B, K, 1, hd)
    xn_p = take(xn)  # (B, K, D)
    q = _linear(xn_p, attn.q_proj.weight, attn.q_proj.bias).view(batch, k_rows, n_heads, head_dim)
    if q_norm is not None:
        q_raw, rstd_q = q, _rms_scale(q, q_norm.variance_epsilon)
        q = q_norm.weight.float() * (q_raw * rstd_q)
    q_rot = _rope(q, cos_p, sin_p).view(batch, k_rows, n_kv, group, head_dim).permute(0, 2, 3, 1, 4)
    # q_rot: (B, G, r, K, hd); head h = g * r + i, the order of HF's repeat_kv.

    # F3: attention probabilities of the loss rows: causal, padding keys hidden (SPEC 2.1).
    # Each row also sees itself, so that an empty slot's softmax stays finite.
    key_pos = torch.arange(seq_len, device=device)
    allowed = key_pos[None, None, :] <= rows[..., None]  # (B, K, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | (key_pos[None, None, :] == rows[..., None])
    logits_att = attn.scaling * torch.einsum("bgrpd,bgsd->bgrps", q_rot, k_rot)
    logits_att = logits_att.masked_fill(~allowed[:, None, None], float("-inf"))
    prob = torch.softmax(logits_att, dim=-1)  # (B, G, r, K, S) fp32
    del logits_att

    # F4: attention output through P Xn (values never projected for every row), then o_proj.
    w_v = attn.v_proj.weight.view(n_kv, head_dim, hidden)
    prob_xn = torch.einsum("bgrps,bsD->bgrpD", prob, xn)  # (B, G, r, K, D)
    out = torch.einsum("bgrpD,gdD->bgrpd", prob_xn.to(w_v.dtype), w_v).float()
    del prob_xn
    if attn.v_proj.bias is not None:
        out = out + attn.v_proj.bias.float().view(n_kv, 1, 1, head_dim)
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, k_rows, n_heads * head_dim)
    h1 = take(h).float() + _linear(out, attn.o_proj.weight, attn.o_proj.bias)  # (B, K, D)

    # F5: post-attention norm and MLP on the loss rows, through autograd.
    ffn_leaf, ffn_out = _feed_forward(layer, h1, h.dtype)
    y = h1 + ffn_out.detach().float()

    # F6 + B1: final norm, head, CE against the argmax pseudo-label, gradient back to Y.
    # Each sample's loss is the mean over its own loss rows; an empty slot weighs 0.
    rstd_final = _rms_scale(y, final_norm.variance_epsilon)
    normed = (final_norm.weight.float() * (y * rstd_final)).reshape(batch * k_rows, hidden)
    row_scale = (valid.float() / valid.sum(dim=1, keepdim=True).clamp_min(1)).reshape(batch * k_rows)
    if use_triton:
        from pio_kernels.triton.head_loss import head_loss_grad
        grad_normed = head_loss_grad(normed, lm_head.weight, lm_head.bias, row_scale)
    else:
        grad_normed = _head_loss_grad_torch(normed, lm_head.weight, lm_head.bias, row_scale)
    grad_normed = grad_normed.view(batch, k_rows, hidden)
    grad_y = _rms_norm_backward(y, rstd_final, grad_normed * final_norm.weight.float())

    # B2: feed-forward backward; dH1 is also the residual gradient of H_p.
    grad_h1 = grad_y + _feed_forward_backward(ffn_leaf, ffn_out, grad_y)
    del ffn_leaf, ffn_out

    # B3: through o_proj to the per-head attention output, then u = dO W_v per head.
    grad_out = _linear_t(grad_h1, attn.o_proj.weight).view(batch, k_rows, n_kv, group, head_dim)
    grad_out = grad_out.permute(0, 2, 3, 1, 4)  # (B, G, r, K, hd)
    u = torch.einsum("bgrpd,gdD->bgrpD", grad_out.to(w_v.dtype), w_v).float()  # (B, G, r, K, D)

    # B4: softmax backward. dP_j = u . Xn_j + dO . b_v; the constant cancels against the rowsum.
    grad_prob = torch.einsum("bgrpD,bsD->bgrps", u, xn)
    grad_logits_att = prob * (grad_prob - (prob * grad_prob).sum(dim=-1, keepdim=True))
    grad_logits_att = grad_logits_att * attn.scaling
    del grad_prob

    # B5: key path (every row), value path (rank <= heads*K), query path (loss rows).
    grad_k = torch.einsum("bgrps,bgrpd->bgsd", grad_logits_att, q_rot).transpose(1, 2)  # (B, S, G, hd)
    grad_k = _rope_backward(grad_k, cos[:, :, None], sin[:, :, None])
    if k_norm is not None:
        grad_k = _rms_norm_backward(k_raw, rstd_k, grad_k.mul_(k_norm.weight.float()))
        del k_raw, rstd_k
    grad_xn = _linear_t(grad_k.reshape(batch, seq_len, n_kv * head_dim), attn.k_proj.weight)  # (B, S, D)
    del grad_k
    grad_xn += torch.einsum("bgrps,bgrpD->bsD", prob, u)
    grad_q = torch.einsum("bgrps,bgsd->bgrpd", grad_logits_att, k_rot).permute(0, 3, 1, 2, 4)
    grad_q = _rope_backward(grad_q.reshape(batch, k_rows, n_heads, head_dim), cos_p, sin_p)
    if q_norm is not None:
        grad_q = _rms_norm_backward(q_raw, rstd_q, grad_q * q_norm.weight.float())
    grad_xn.scatter_add_(1, gather_rows.expand(-1, -1, hidden),
                         _linear_t(grad_q.reshape(batch, k_rows, n_heads * head_dim), attn.q_proj.weight))

    # B6: input-norm backward, the residual of the loss rows, per-token L2 norm.
    if use_triton:
        from pio_kernels.triton.saliency_epilogue import saliency_epilogue
        scores = saliency_epilogue(grad_xn, h, norm_in.weight, norm_in.variance_epsilon, rows, grad_h1)
    else:
        scores = _epilogue_torch(grad_xn, h, norm_in.weight, norm_in.variance_epsilon, rows, grad_h1)
    if attention_mask is not None:
        scores = scores * attention_mask.to(device=device, dtype=scores.dtype)
    return scores


def _check_args(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, num_positions: int,
                backend: str) -> None:
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        raise ValueError("hidden_states must be a (B, S, D) tensor, got "
                         f"{getattr(hidden_states, 'shape', type(hidden_states))}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be floating point, got {hidden_states.dtype}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"attention_mask must be (B, S) = {tuple(hidden_states.shape[:2])}, "
                         f"got {tuple(attention_mask.shape)}")
    if not isinstance(num_positions, int) or num_positions < 1:
        raise ValueError(f"num_positions must be an int >= 1, got {num_positions!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def proxy_saliency(layer: nn.Module, final_norm: nn.Module, lm_head: nn.Linear, hidden_states: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor], *,
                   attention_mask: torch.Tensor | None = None, num_positions: int = 4,
                   backend: str | None = None) -> torch.Tensor:
    """Gradient saliency (B, S) float32 of every token entering ``layer`` (SPEC section 2).

    Same arguments and result as :func:`pio_kernels.reference.proxy_saliency` (which is the
    definition), computed by the exact reduced probe described in this module's docstring.

    Args:
        layer, final_norm, lm_head: the decoder layer, the model's final norm and head; any
            dtype (fp32 / fp16 / bf16), CPU or CUDA.
        hidden_states: (B, S, D), the input of ``layer``.
        position_embeddings: ``(cos, sin)``, each (B, S, head_dim) (or (S, head_dim)).
        attention_mask: (B, S), 1 for real tokens, padding on either side; ``None``: all real.
        num_positions: K >= 1, the most loss rows per sample (SPEC 2.3): a sample with ``n``
            real tokens has ``min(K, n - 1)`` (:func:`pio_kernels.reference.loss_positions`).
        backend: ``"auto"`` (Triton kernels on CUDA when Triton imports, torch otherwise),
            ``"torch"`` (force the torch path) or ``"triton"`` (force the kernels; CPU only
            under ``TRITON_INTERPRET=1``). ``None`` reads :data:`DEFAULT_BACKEND`.

    Returns:
        (B, S) float32 on ``hidden_states.device``; padding scores 0. Each sample's loss is
        the mean over its own loss rows, so scores are batch-invariant; a sample with at most
        one real token has no loss row and scores 0 everywhere. Works under
        ``torch.no_grad()`` and ``torch.inference_mode()``. No host synchronisation on a fast-path
        layer with a dense MLP (see the module docstring).

    Layers that :func:`supports_fast_path` rejects go to the reference, with one warning
    per layer type.
    """
    backend = DEFAULT_BACKEND if backend is None else backend
    _check_args(hidden_states, attention_mask, num_positions, backend)
    if not supports_fast_path(layer, final_norm, lm_head):
        name = type(layer).__name__
        if name not in _WARNED_TYPES:
            _WARNED_TYPES.add(name)
            warnings.warn(f"proxy_saliency: no exact fast path for {name} (not a pre-norm "
                          "Llama/Qwen-family layer with RMSNorms, see pio_kernels.saliency); using the reference, which runs the whole "
                          "layer and full-vocabulary logits", RuntimeWarning, stacklevel=2)
        return reference.proxy_saliency(layer, final_norm, lm_head, hidden_states, position_embeddings,
                                        attention_mask=attention_mask, num_positions=num_positions)
    use_triton = backend == "triton" or (backend == "auto" and _triton_available(hidden_states.device))
    with torch.no_grad():
        return _fast_proxy_saliency(layer, final_norm, lm_head, hidden_states.detach(), position_embeddings,
                                    attention_mask, num_positions, use_triton)
