"""Triton path of ``pio::select_tokens`` (SPEC section 3): bitmask GEMM and per-row scan.

Used on CUDA when the compiled CUDA kernel is absent; also runs on CPU tensors under
``TRITON_INTERPRET=1`` (set before Triton is imported), which is how it is tested
without a GPU. Everything stays on the device: no ``.item()``, no host copy, static
output shape.

Steps:
  1. PyTorch: rows normalised with ``F.normalize`` in fp32 (as the reference), the
     saliency order by two stable sorts (descending score with NaN as -inf, then by the
     group valid < NaN < padding), so a row's first ``n = lengths[b]`` order positions
     are its valid tokens in the reference's order; ``lengths`` clamped to [0, N].
  2. ``_similarity_mask_kernel``: ``mask[b, i, j] = cos(x_order[i], x_order[j]) >= tau``
     for order positions ``j > i``, fp32 ``tl.dot`` with ``input_precision="ieee"`` (no
     TF32: the decision near tau must be the fp32 one), bits packed 32 to an int32 word in
     the tile before the store. Tiles wholly below the diagonal are skipped.
  3. ``_strict_pass_kernel``: one program per row walks the order with the alive set in
     registers (one int32 word per 32 positions), selects, clears the pick's mask row,
     stops at the budget; writes a flag per order position.
  4. PyTorch: the fill pass (the first ``budget - picks`` unpicked positions, by a
     cumulative sum) and the ascending output (a scatter to token indices and a sort).

Bound (one row, N tokens, D features): the mask is N^2 D FLOPs in fp32 (full tiles on
and above the diagonal) plus N^2 / 8 bytes written; the strict pass is N steps of
O(N / 32) register work, latency-bound.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["select_tokens", "saliency_order_device", "assemble_output"]


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _similarity_mask_kernel(xn_ptr, order_ptr, len_ptr, mask_ptr, N, D, W, tau,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2)
    n = tl.load(len_ptr + b).to(tl.int32)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    # Only tiles touching j > i inside the valid prefix are ever read by the scan.
    if (col0 + BLOCK_N > row0 + 1) & (row0 < n) & (col0 < n):
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = col0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        col_ok = cols < n
        base = b.to(tl.int64) * N
        tok_r = tl.load(order_ptr + base + rows, mask=row_ok, other=0).to(tl.int64)
        tok_c = tl.load(order_ptr + base + cols, mask=col_ok, other=0).to(tl.int64)
        xb = xn_ptr + base * D
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            a = tl.load(xb + tok_r[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            c = tl.load(xb + tok_c[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(a, tl.trans(c), input_precision="ieee")
        hit = (acc >= tau) & (cols[None, :] > rows[:, None]) & row_ok[:, None] & col_ok[None, :]
        shifts = tl.arange(0, BLOCK_N) % 32
        words = hit.to(tl.int32) << shifts[None, :]
        words = tl.reduce(tl.reshape(words, (BLOCK_M, BLOCK_N // 32, 32)), 2, _bit_or)
        wcols = col0 // 32 + tl.arange(0, BLOCK_N // 32)
        ptrs = mask_ptr + (base + rows[:, None]) * W + wcols[None, :]
        tl.store(ptrs, words, mask=row_ok[:, None] & (wcols[None, :] < W))


@triton.jit
def _strict_pass_kernel(mask_ptr, len_ptr, picked_ptr, N, W, budget, BLOCK_W: tl.constexpr):
    b = tl.program_id(0)
    n = tl.load(len_ptr + b).to(tl.int32)
    base = b.to(tl.int64) * N
    woffs = tl.arange(0, BLOCK_W)
    lo = woffs * 32
    # alive: order positions < n that no pick has suppressed yet, 32 to a word.
    full = tl.full((BLOCK_W,), -1, tl.int32)
    shift = tl.minimum(tl.maximum(n - lo, 0), 31)  # in range even where unused below
    part = (tl.full((BLOCK_W,), 1, tl.int32) << shift) - 1
    alive = tl.where(lo + 32 <= n, full, tl.where(lo >= n, 0, part))
    r = 0
    count = 0
    while (r < n) & (count < budget):
        word = tl.sum(tl.where(woffs == r // 32, alive, 0), axis=0)
        if ((word >> (r % 32)) & 1) != 0:
            tl.store(picked_ptr + base + r, 1)
            row = tl.load(mask_ptr + (base + r) * W + woffs, mask=woffs < W, other=0)
            alive = alive & ~row
            count += 1
        r += 1


def saliency_order_device(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, N) int64 saliency order per row: valid tokens first (descending score, ties to
    the lower index, NaN last), then the padding positions. ``lengths`` (B,) int64 in
    [0, N]. Device-side, no host sync."""
    n = scores.shape[1]
    nan = scores.isnan()
    finite_first = torch.where(nan, torch.full_like(scores, float("-inf")), scores)
    by_score = torch.sort(finite_first, dim=1, descending=True, stable=True).indices
    pad = torch.arange(n, device=scores.device)[None, :] >= lengths[:, None]
    group = torch.where(pad, 2, nan.to(torch.uint8)).to(torch.uint8)
    by_group = torch.sort(group.gather(1, by_score), dim=1, stable=True).indices
    return by_score.gather(1, by_group)


def assemble_output(picked: torch.Tensor, order: torch.Tensor, lengths: torch.Tensor, budget: int) -> torch.Tensor:
    """Fill pass and ascending output from the strict-pass flags.

    picked: (B, N) bool over order positions; order: (B, N) int64; lengths: (B,) int64.
    Returns (B, budget) int64, -1 padded. Device-side, no host sync.
    """
    batch, n = order.shape
    pos = torch.arange(n, device=order.device)
    valid = pos[None, :] < lengths[:, None]
    picked = picked & valid
    need = budget - picked.sum(1, keepdim=True)
    free = valid & ~picked
    chosen = picked | (free & (torch.cumsum(free, 1) <= need))
    by_token = torch.zeros_like(chosen).scatter(1, order, chosen)
    keyed = torch.where(by_token, pos[None, :], n)
    kept = torch.sort(keyed, dim=1).values[:, :budget]
    kept = torch.where(kept == n, -1, kept)
    if budget > n:
        kept = torch.cat([kept, kept.new_full((batch, budget - n), -1)], dim=1)
    return kept


def _fp32_threshold(tau: float) -> float:
    """tau as the fp32 scalar that torch's ``x >= tau`` compares with (saturating)."""
    return float(torch.tensor(tau, dtype=torch.float64).to(torch.float32))


def select_tokens(features: torch.Tensor, scores: torch.Tensor, budget: int, tau: float = 0.8,
                  lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy cosine NMS per row on the Triton path (SPEC section 3).

    Args:
        features: (B, N, D) floating, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        scores: (B, N) floating, same device.
        budget: tokens kept per row, >= 1.
        tau: cosine threshold.
        lengths: (B,) int64 or None; values are clamped to [0, N] on the device.

    Returns:
        (B, budget) int64, kept positions ascending, -1 padded. Memory: B N^2 / 8 bytes of
        bitmask plus the fp32 normalised features.
    """
    batch, n, d = features.shape
    device = features.device
    if batch == 0 or n == 0:
        return torch.full((batch, budget), -1, dtype=torch.long, device=device)
    if lengths is None:
        lengths = torch.full((batch,), n, dtype=torch.long, device=device)
    else:
        lengths = lengths.clamp(0, n).contiguous()
    xn = F.normalize(features.float(), dim=-1, eps=1e-12).contiguous()
    order = saliency_order_device(scores, lengths)
    order32 = order.to(torch.int32).contiguous()
    words = triton.cdiv(n, 32)
    mask = torch.empty((batch, n, words), dtype=torch.int32, device=device)
    picked = torch.zeros((batch, n), dtype=torch.int8, device=device)

    block = 32 if n <= 32 else 64
    block_k = min(64, max(16, triton.next_power_of_2(d)))
    grid = (triton.cdiv(n, block), triton.cdiv(n, block), batch)
    _similarity_mask_kernel[grid](xn, order32, lengths, mask, n, d, words, _fp32_threshold(tau),
                                  BLOCK_M=block, BLOCK_N=block, BLOCK_K=block_k)
    _strict_pass_kernel[(batch,)](mask, lengths, picked, n, words, min(budget, n),
                                  BLOCK_W=triton.next_power_of_2(words))
    return assemble_output(picked.bool(), order, lengths, budget)
