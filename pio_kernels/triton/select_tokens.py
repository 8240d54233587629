"""Triton path of ``pio::select_tokens`` (SPEC section 3): the block scheme of the CUDA kernel.

Used on CUDA when the compiled CUDA kernel is absent (the dispatch order is compiled kernel
-> Triton -> PyTorch, ``pio_kernels/ops.py``); also runs on CPU tensors under
``TRITON_INTERPRET=1`` (set before Triton is imported), which is how it is tested without a
GPU. Everything stays on the device: no ``.item()``, no host copy, static output shape, a
fixed sequence of launches. Launches run under the tensors' device (``_on_device``): Triton
launches on the current device and stream, which need not be the tensors'.

Steps (the same plan and decisions as ``csrc/cuda/select_tokens.cu``):
  1. PyTorch: rows normalised with ``F.normalize`` in fp32 (as the reference), the
     saliency order (``pio_kernels.nms.saliency_order``: a row's first ``n = lengths[b]``
     order positions are its valid tokens in the reference's order), ``lengths`` clamped
     to [0, N].
  2. The strict pass block by block (``pio_kernels.nms.block_plan``: a prefix of
     ``max(4 budget, 1024)`` positions, then at most about 8 more blocks), per block:
     - ``_cross_kernel`` (not for the prefix): the block's candidates against every pick so
       far, fp32 ``tl.dot`` with ``input_precision="ieee"`` (no TF32: the decision near tau
       must be the fp32 one); a candidate with ``cos >= tau`` to a pick is suppressed.
     - ``_similarity_mask_kernel``: ``mask[b, i, j] = cos(x_order[i], x_order[j]) >= tau``
       for block positions ``j > i``, bits packed 32 to an int32 word in the tile before the
       store; tiles below the diagonal, and tiles without a live row or a live column, are
       skipped (the scan reads only picks' rows, and a dead column's stale bits clear nothing
       alive).
     - ``_scan_kernel``: one program per row holds the block's alive set as a vector, jumps
       to the next alive position (a min-reduction), selects it, clears its mask row, stops
       at the budget; picks and their count stay on the device between blocks.
     Every kernel returns at once for a row that is done.
  3. PyTorch (``pio_kernels.nms.assemble_output``): the fill pass and the ascending output.

Bound (one row, N tokens, D features, prefix M, blocks of T after it): M^2 D FLOPs in fp32
for the prefix mask (full tiles on and above the diagonal) plus M^2 / 8 bytes written; past
the prefix at most 2 (N - M) (k + T) D FLOPs; one scan step per pick.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pio_kernels.nms import assemble_output, block_plan, clamp_lengths, saliency_order

__all__ = ["select_tokens"]

_TILE = 64              # block positions per tile side (32 for tiny inputs); blocks are padded to 64
_BLOCK_MAX = 16384      # longest block one scan program holds (longer plan blocks are split)
_GEMM_WARPS = 8         # with BLOCK_K <= 32: no register spills at sm_90 (tests/test_select_tokens_blocks.py)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _pack_bits(flags, ROWS: tl.constexpr, COLS: tl.constexpr):
    """(ROWS, COLS) int1 -> (ROWS, COLS // 32) int32 words, bit c % 32 of word c // 32."""
    shifts = tl.arange(0, COLS) % 32
    words = flags.to(tl.int32) << shifts[None, :]
    return tl.reduce(tl.reshape(words, (ROWS, COLS // 32, 32)), 2, _bit_or)


@triton.jit
def _unset_bits(words_ptr, offs, other):
    """For positions ``offs``: is bit ``offs % 32`` of word ``words_ptr[offs // 32]`` clear?"""
    w = tl.load(words_ptr + offs // 32, mask=other, other=0)
    return ((w >> (offs % 32)) & 1) == 0


@triton.jit(do_not_specialize=["budget", "start", "size"])
def _cross_kernel(xn_ptr, order_ptr, len_ptr, picks_ptr, count_ptr, sup_ptr, N, D, W, budget, start, size, tau,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    n = tl.load(len_ptr + b).to(tl.int32)
    count = tl.load(count_ptr + b)
    m = tl.minimum(n - start, size)
    row0 = pid * BLOCK_M
    # A row that is done (or has no candidate in this tile) is never read again in this block.
    if (n > budget) & (count < budget) & (row0 < m):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m
        base = b.to(tl.int64) * N
        tok_r = tl.load(order_ptr + base + start + rows, mask=row_ok, other=0).to(tl.int64)
        xb = xn_ptr + base * D
        live = row_ok
        p0 = 0
        while (p0 < count) & (tl.max(live.to(tl.int32), axis=0) > 0):  # stop once all are suppressed
            ps = p0 + tl.arange(0, BLOCK_N)
            p_ok = ps < count
            pos = tl.load(picks_ptr + b.to(tl.int64) * budget + ps, mask=p_ok, other=0)
            tok_c = tl.load(order_ptr + base + pos, mask=p_ok, other=0).to(tl.int64)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                a = tl.load(xb + tok_r[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                c = tl.load(xb + tok_c[:, None] * D + ks[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0)
                acc += tl.dot(a, tl.trans(c), input_precision="ieee")
            hit = (acc >= tau) & p_ok[None, :]
            live = live & (tl.max(hit.to(tl.int32), axis=1) == 0)
            p0 += BLOCK_N
        words = _pack_bits((row_ok & (live == 0))[None, :], 1, BLOCK_M)
        wcols = row0 // 32 + tl.arange(0, BLOCK_M // 32)
        tl.store(sup_ptr + b.to(tl.int64) * W + wcols[None, :], words)


@triton.jit(do_not_specialize=["budget", "start", "size"])
def _similarity_mask_kernel(xn_ptr, order_ptr, len_ptr, count_ptr, sup_ptr, mask_ptr, N, D, W, budget, start, size,
                            tau, HAS_SUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2)
    n = tl.load(len_ptr + b).to(tl.int32)
    count = tl.load(count_ptr + b)
    m = tl.minimum(n - start, size)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < m
    # Only tiles touching j > i inside the valid block, of a row not yet done, are ever read.
    go = (n > budget) & (count < budget) & (col0 + BLOCK_N > row0 + 1) & (row0 < m) & (col0 < m)
    if HAS_SUP:  # ... and only those with a live row and a live column
        sup_b = sup_ptr + b.to(tl.int64) * W
        live_r = row_ok & _unset_bits(sup_b, rows, row_ok)
        live_c = col_ok & _unset_bits(sup_b, cols, col_ok)
        go = go & (tl.max(live_r.to(tl.int32), axis=0) > 0) & (tl.max(live_c.to(tl.int32), axis=0) > 0)
    if go:
        base = b.to(tl.int64) * N
        tok_r = tl.load(order_ptr + base + start + rows, mask=row_ok, other=0).to(tl.int64)
        tok_c = tl.load(order_ptr + base + start + cols, mask=col_ok, other=0).to(tl.int64)
        xb = xn_ptr + base * D
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            a = tl.load(xb + tok_r[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            c = tl.load(xb + tok_c[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(a, tl.trans(c), input_precision="ieee")
        hit = (acc >= tau) & (cols[None, :] > rows[:, None]) & row_ok[:, None] & col_ok[None, :]
        words = _pack_bits(hit, BLOCK_M, BLOCK_N)
        wcols = col0 // 32 + tl.arange(0, BLOCK_N // 32)
        ptrs = mask_ptr + (b.to(tl.int64) * 32 * W + rows[:, None]) * W + wcols[None, :]
        tl.store(ptrs, words, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["budget", "start", "size"])
def _scan_kernel(mask_ptr, sup_ptr, len_ptr, picks_ptr, count_ptr, picked_ptr, N, W, budget, start, size,
                 HAS_SUP: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    n = tl.load(len_ptr + b).to(tl.int32)
    count = tl.load(count_ptr + b)
    m = tl.minimum(n - start, size)
    if (n > budget) & (count < budget) & (m > 0):
        offs = tl.arange(0, BLOCK_T)
        alive = offs < m  # block positions still selectable
        if HAS_SUP:
            alive = alive & _unset_bits(sup_ptr + b.to(tl.int64) * W, offs, alive)
        row_base = mask_ptr + b.to(tl.int64) * 32 * W * W
        nxt = tl.min(tl.where(alive, offs, BLOCK_T), axis=0)
        while (nxt < BLOCK_T) & (count < budget):
            tl.store(picks_ptr + b.to(tl.int64) * budget + count, start + nxt)
            tl.store(picked_ptr + b.to(tl.int64) * N + start + nxt, 1)
            count += 1
            # Positions before the pick are not alive: only the bits after it matter.
            clear = _unset_bits(row_base + nxt.to(tl.int64) * W, offs, alive & (offs > nxt))
            alive = alive & clear & (offs != nxt)
            nxt = tl.min(tl.where(alive, offs, BLOCK_T), axis=0)
        tl.store(count_ptr + b, count)


def _blocks(n: int, budget: int) -> list[tuple[int, int]]:
    """``block_plan(n, budget)`` with blocks longer than ``_BLOCK_MAX`` cut in two or more
    (any cut into contiguous blocks gives the same picks; shorter ones keep the scan's
    alive vector in registers)."""
    out = []
    for start, size in block_plan(n, budget):
        out += [(s, min(_BLOCK_MAX, start + size - s)) for s in range(start, start + size, _BLOCK_MAX)]
    return out


def _launch_config(n: int, d: int, t_pad: int) -> dict[str, int]:
    """Tile sizes and warps of the three kernels for N = ``n``, D = ``d`` and blocks padded to
    ``t_pad`` positions: every value here is one the sm_90 compile test covers."""
    block_t = triton.next_power_of_2(t_pad)
    return {"tile": 32 if n <= 32 else _TILE, "block_k": min(32, max(16, triton.next_power_of_2(d))),
            "block_t": block_t, "scan_warps": max(4, block_t // 1024)}


def _on_device(device: torch.device):
    """The tensors' CUDA device as the current one while launching (Triton launches on the
    current device and its current stream); nothing to switch for CPU tensors (interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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
        (B, budget) int64, kept positions ascending, -1 padded. Memory: B T^2 / 8 bytes of
        bitmask (T the largest block of ``block_plan(N, budget)``, padded to 64) plus the fp32
        normalised features.
    """
    batch, n, d = features.shape
    device = features.device
    if batch == 0 or n == 0:
        return torch.full((batch, budget), -1, dtype=torch.long, device=device)
    with _on_device(device):
        lengths = clamp_lengths(lengths, batch, n, device)
        xn = F.normalize(features.float(), dim=-1, eps=1e-12).contiguous()
        order = saliency_order(scores, lengths)
        order32 = order.to(torch.int32).contiguous()
        blocks = _blocks(n, budget)
        t_pad = triton.cdiv(max(size for _, size in blocks), _TILE) * _TILE
        words = t_pad // 32
        k = min(budget, n)  # a row with n > budget has n <= N: then budget == k
        mask = torch.empty((batch, t_pad, words), dtype=torch.int32, device=device)
        sup = torch.zeros((batch, words), dtype=torch.int32, device=device)
        picks = torch.empty((batch, k), dtype=torch.int32, device=device)
        count = torch.zeros((batch,), dtype=torch.int32, device=device)
        picked = torch.zeros((batch, n), dtype=torch.int8, device=device)

        cfg = _launch_config(n, d, t_pad)
        tile, block_k = cfg["tile"], cfg["block_k"]
        tau_f = _fp32_threshold(tau)
        for start, size in blocks:
            tiles = triton.cdiv(size, tile)
            has_sup = start > 0  # the prefix comes first: no picks before it
            if has_sup:
                _cross_kernel[(tiles, batch)](xn, order32, lengths, picks, count, sup, n, d, words, k, start, size,
                                              tau_f, BLOCK_M=tile, BLOCK_N=tile, BLOCK_K=block_k,
                                              num_warps=_GEMM_WARPS)
            _similarity_mask_kernel[(tiles, tiles, batch)](xn, order32, lengths, count, sup, mask, n, d, words, k,
                                                           start, size, tau_f, HAS_SUP=has_sup, BLOCK_M=tile,
                                                           BLOCK_N=tile, BLOCK_K=block_k, num_warps=_GEMM_WARPS)
            _scan_kernel[(batch,)](mask, sup, lengths, picks, count, picked, n, words, k, start, size,
                                   HAS_SUP=has_sup, BLOCK_T=cfg["block_t"], num_warps=cfg["scan_warps"])
        return assemble_output(picked.bool(), order, lengths, budget)
