"""Fused head of the proxy loss: ``lm_head`` + CE against the argmax pseudo-label + its gradient.

SPEC 2.2-2.4 on the R = B*K loss rows only. Given the final-norm rows ``X`` (R, D) fp32 and
the head ``W`` (V, D) (+ bias), computes ``dX = d/dX sum_r s_r CE(Z_r, argmax Z_r)`` with
``Z = X W^T + b`` in fp32 and ``s_r`` a per-row loss weight (1/K). Two passes stream over the
vocabulary; only the small ``R x V`` fp32 logits are ever written:

1. ``_logits_kernel`` (grid: vocabulary blocks x row blocks): one tile of ``Z``, stored,
   plus the tile's row max, its first argmax and ``sum exp(Z - max)``. The host merges the
   per-tile statistics into ``logsumexp`` and the pseudo-label (online-softmax merge; ties
   go to the lowest vocabulary index, like ``torch.argmax``).
2. ``_grad_kernel`` (grid: D blocks x vocabulary splits x row blocks): rebuilds
   ``dZ = s_r (exp(Z - lse) - onehot)`` tile by tile from the stored logits and
   accumulates ``dZ W`` over its vocabulary split; the host sums the splits (no atomics,
   so the result is deterministic).

Precision: every tile is upcast to fp32 and ``tl.dot`` runs in IEEE fp32, the same numbers
as the reference (which upcasts the head to fp32); fp16/bf16 weights are never rounded
further.

Bytes and bound: the head is read exactly twice, ``2 * V * D * elt`` bytes; the logits add
``3 * R * V * 4``; rows are handled in one block up to R = 64 (beyond
that, each further block of 64 rows reads the head again). LLaVA-1.5 (V 32000, D 4096, bf16): 0.52 GB -> 0.16 ms at
H100's ~3.35 TB/s; Qwen2.5-VL-7B (V 152064, D 3584): 2.18 GB -> 0.65 ms. The IEEE fp32 dots
cost ``4 * R_pad * V * D`` FLOP (R_pad >= 16): 8.4 GFLOP for LLaVA, ~0.15 ms at H100's
~60 TFLOP/s fp32 FMA rate, so for small R the kernel should sit near the bandwidth bound.
Not measured on a GPU yet.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["head_loss_grad"]

_MAX_BLOCK_R = 64  # all loss rows in one block up to 64 (B*K): each block reads the head again
_LOGITS_BLOCK_V, _LOGITS_BLOCK_D = 128, 64
_GRAD_BLOCK_V, _GRAD_BLOCK_D = 64, 128


@triton.jit
def _logits_kernel(x_ptr, w_ptr, b_ptr, z_ptr, tile_max_ptr, tile_arg_ptr, tile_sum_ptr,
                   R, V, D, stride_x, stride_w, stride_z, n_tiles,
                   HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_v = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    r_ok = offs_r < R
    v_ok = offs_v < V
    acc = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        x = tl.load(x_ptr + offs_r[:, None].to(tl.int64) * stride_x + offs_d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_v[:, None].to(tl.int64) * stride_w + offs_d[None, :],
                    mask=v_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(z_ptr + offs_r[:, None].to(tl.int64) * stride_z + offs_v[None, :], acc,
             mask=r_ok[:, None] & v_ok[None, :])
    z = tl.where(v_ok[None, :], acc, float("-inf"))
    tile_max = tl.max(z, axis=1)
    tile_arg = tl.argmax(z, axis=1, tie_break_left=True) + pid_v * BLOCK_V
    tile_sum = tl.sum(tl.exp(z - tile_max[:, None]), axis=1)
    stat = offs_r * n_tiles + pid_v
    tl.store(tile_max_ptr + stat, tile_max, mask=r_ok)
    tl.store(tile_arg_ptr + stat, tile_arg.to(tl.int64), mask=r_ok)
    tl.store(tile_sum_ptr + stat, tile_sum, mask=r_ok)


@triton.jit
def _grad_kernel(z_ptr, lse_ptr, label_ptr, scale_ptr, w_ptr, out_ptr,
                 R, V, D, stride_z, stride_w, v_per_split,
                 BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = offs_r < R
    d_ok = offs_d < D
    lse = tl.load(lse_ptr + offs_r, mask=r_ok, other=0.0)
    label = tl.load(label_ptr + offs_r, mask=r_ok, other=-1)
    scale = tl.load(scale_ptr + offs_r, mask=r_ok, other=0.0)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    v_start = pid_s * v_per_split
    for v0 in range(v_start, v_start + v_per_split, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z = tl.load(z_ptr + offs_r[:, None].to(tl.int64) * stride_z + offs_v[None, :],
                    mask=r_ok[:, None] & v_ok[None, :], other=float("-inf"))
        onehot = tl.where(offs_v[None, :] == label[:, None], 1.0, 0.0)
        dz = (tl.exp(z - lse[:, None]) - onehot) * scale[:, None]
        dz = tl.where(r_ok[:, None] & v_ok[None, :], dz, 0.0)
        w = tl.load(w_ptr + offs_v[:, None].to(tl.int64) * stride_w + offs_d[None, :],
                    mask=v_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(dz, w, input_precision="ieee")
    out = out_ptr + pid_s.to(tl.int64) * R * D
    tl.store(out + offs_r[:, None] * D + offs_d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])


def _check(normed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_scale: torch.Tensor) -> None:
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for name, t in (("normed", normed), ("weight", weight), ("row_scale", row_scale), ("bias", bias)):
        if t is None:
            continue
        if t.device != normed.device:
            raise ValueError(f"{name} must be on {normed.device}, got {t.device}")
    if normed.device.type != "cuda" and not interpreting:
        raise ValueError(f"normed must be a CUDA tensor (or set TRITON_INTERPRET=1), got {normed.device}")
    if normed.dim() != 2 or normed.dtype != torch.float32:
        raise ValueError(f"normed must be (R, D) float32, got {tuple(normed.shape)} {normed.dtype}")
    if weight.dim() != 2 or weight.shape[1] != normed.shape[1]:
        raise ValueError(f"weight must be (V, D={normed.shape[1]}), got {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (V={weight.shape[0]},), got {tuple(bias.shape)}")
    if tuple(row_scale.shape) != (normed.shape[0],) or row_scale.dtype != torch.float32:
        raise ValueError(f"row_scale must be (R={normed.shape[0]},) float32, got "
                         f"{tuple(row_scale.shape)} {row_scale.dtype}")


def head_loss_grad(normed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   row_scale: torch.Tensor) -> torch.Tensor:
    """``d/d normed`` of ``sum_r row_scale_r * CE(Z_r, argmax Z_r)``, ``Z = normed W^T + b`` (fp32).

    Args:
        normed: (R, D) float32, the final-norm output of the loss rows; CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        weight: (V, D) float32/float16/bfloat16, the head; any row stride, unit column stride.
        bias: (V,) or ``None``.
        row_scale: (R,) float32, the loss weight of each row.

    Returns:
        (R, D) float32 on ``normed.device``.
    """
    _check(normed, weight, bias, row_scale)
    normed = normed.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    rows, dim = normed.shape
    vocab = weight.shape[0]
    device = normed.device
    block_r = min(_MAX_BLOCK_R, max(16, triton.next_power_of_2(rows)))  # tl.dot needs >= 16
    n_row_blocks = triton.cdiv(rows, block_r)

    # Pass 1: logits tiles and per-tile (max, argmax, sum exp).
    n_tiles = triton.cdiv(vocab, _LOGITS_BLOCK_V)
    logits = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    tile_max = torch.empty(rows, n_tiles, dtype=torch.float32, device=device)
    tile_arg = torch.empty(rows, n_tiles, dtype=torch.int64, device=device)
    tile_sum = torch.empty(rows, n_tiles, dtype=torch.float32, device=device)
    _logits_kernel[(n_tiles, n_row_blocks)](
        normed, weight, bias if bias is not None else normed, logits, tile_max, tile_arg, tile_sum,
        rows, vocab, dim, normed.stride(0), weight.stride(0), logits.stride(0), n_tiles,
        HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_V=_LOGITS_BLOCK_V, BLOCK_D=_LOGITS_BLOCK_D)
    row_max, best_tile = tile_max.max(dim=1)  # first tile holding the max: lowest index on ties
    label = tile_arg.gather(1, best_tile[:, None])[:, 0]
    lse = row_max + (tile_sum * torch.exp(tile_max - row_max[:, None])).sum(dim=1).log()

    # Pass 2: dZ W, split over the vocabulary so that enough programs run; splits summed here.
    n_d_blocks = triton.cdiv(dim, _GRAD_BLOCK_D)
    n_v_blocks = triton.cdiv(vocab, _GRAD_BLOCK_V)
    splits = max(1, min(n_v_blocks, 256 // max(1, n_d_blocks * n_row_blocks)))
    v_per_split = triton.cdiv(n_v_blocks, splits) * _GRAD_BLOCK_V
    splits = triton.cdiv(vocab, v_per_split)
    partial = torch.empty(splits, rows, dim, dtype=torch.float32, device=device)
    _grad_kernel[(n_d_blocks, splits, n_row_blocks)](
        logits, lse.contiguous(), label.contiguous(), row_scale.contiguous(), weight, partial,
        rows, vocab, dim, logits.stride(0), weight.stride(0), v_per_split,
        BLOCK_R=block_r, BLOCK_V=_GRAD_BLOCK_V, BLOCK_D=_GRAD_BLOCK_D)
    return partial.sum(dim=0)
