"""PyTorch path of ``pio::select_tokens`` (SPEC section 3) that stays on the tensors' device.

No ``.item()``, no host copy, static shapes: on CUDA it can be captured in a CUDA graph.
It is the ``"torch"`` backend of :func:`pio_kernels.select_tokens` and the last step of
the dispatch order (compiled kernel -> Triton -> PyTorch); the Triton path reuses its
saliency order and output assembly. :func:`block_plan` is the order of work of the two GPU
paths (CUDA and Triton): the blocks of order positions they resolve one after the other.

Cost per row: the full N x N similarity (``bmm``, fp32, so TF32 only if the caller enabled
it for matmuls, as for the reference) kept as N^2 bools, then N sequential steps of O(N)
tensor ops (one small launch group per order position on a GPU): a fallback, not a fast
path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["assemble_output", "block_plan", "saliency_order", "select_tokens"]

# The blocks of order positions the GPU paths (csrc/cuda/select_tokens.cu and
# pio_kernels/triton/select_tokens.py) resolve one after the other; the CUDA file holds the
# same numbers (kPrefixPerBudget, ...), and a test reads them from there to check.
PREFIX_PER_BUDGET = 4     # the first block (the prefix) holds 4 x budget positions,
PREFIX_MIN = 1024         # at least 1024,
PREFIX_MAX = 32768        # at most 32768;
TAIL_BLOCKS = 8           # the rest is cut into about this many blocks,
TAIL_BLOCK_MAX = 4096     # of at most this many positions (or the prefix's, if larger),
BLOCK_ALIGN = 64          # a multiple of the 64-position tile.


def saliency_order(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, N) int64 order per row: valid tokens first by descending score, ties to the lower
    index, NaN last; then the padding positions (index >= ``lengths[b]``).

    scores: (B, N) floating; lengths: (B,) int64 in [0, N], same device.
    """
    n = scores.shape[1]
    nan = scores.isnan()
    finite_first = torch.where(nan, torch.full_like(scores, float("-inf")), scores)
    by_score = torch.sort(finite_first, dim=1, descending=True, stable=True).indices
    pad = torch.arange(n, device=scores.device)[None, :] >= lengths[:, None]
    group = torch.where(pad, 2, nan.to(torch.uint8)).to(torch.uint8)  # valid < NaN < padding
    by_group = torch.sort(group.gather(1, by_score), dim=1, stable=True).indices
    return by_score.gather(1, by_group)


def assemble_output(picked: torch.Tensor, order: torch.Tensor, lengths: torch.Tensor, budget: int) -> torch.Tensor:
    """Fill pass and ascending output from the strict pass.

    picked: (B, N) bool over order positions (the strict-pass picks); order: (B, N) int64
    from :func:`saliency_order`; lengths: (B,) int64. Returns (B, budget) int64, kept token
    indices ascending, -1 padded.
    """
    batch, n = order.shape
    pos = torch.arange(n, device=order.device)
    valid = pos[None, :] < lengths[:, None]
    picked = picked & valid
    need = budget - picked.sum(1, keepdim=True)
    free = valid & ~picked
    chosen = picked | (free & (torch.cumsum(free, 1) <= need))  # the first `need` others, in order
    by_token = torch.zeros_like(chosen).scatter(1, order, chosen)
    kept = torch.sort(torch.where(by_token, pos[None, :], n), dim=1).values[:, :budget]
    kept = torch.where(kept == n, -1, kept)
    if budget > n:
        kept = torch.cat([kept, kept.new_full((batch, budget - n), -1)], dim=1)
    return kept


def block_plan(n: int, budget: int) -> list[tuple[int, int]]:
    """``(start, size)`` of the blocks of order positions the GPU paths resolve in turn (SPEC 3).

    The first block (the prefix) is where the strict pass usually ends: ``4 x budget``
    positions, at least 1024, at most 32768, at most ``n``. Under heavy suppression the walk
    needs more: the remaining positions are cut into at most about ``TAIL_BLOCKS`` blocks of
    equal size (a multiple of 64, at least the prefix's size unless fewer positions remain,
    at most ``max(prefix, TAIL_BLOCK_MAX)``). Each later block is resolved by
    a fixed amount of parallel work: its candidates against the picks so far, the mask
    within the block, then a scan. The plan depends on ``n`` (the padded N) and ``budget``
    only, so a GPU path launches a fixed sequence of kernels and never syncs.

    Args:
        n: tokens per row (N), >= 1. budget: tokens kept per row, >= 1.

    Returns:
        Blocks covering ``[0, n)`` in order, ``[(0, prefix), (prefix, size), ...]``.
    """
    if n < 1 or budget < 1:
        raise ValueError(f"n and budget must be >= 1, got n={n}, budget={budget}")
    prefix = min(n, max(PREFIX_PER_BUDGET * min(budget, n), PREFIX_MIN), PREFIX_MAX)
    blocks = [(0, prefix)]
    rest = n - prefix
    if rest > 0:
        per = -(-rest // TAIL_BLOCKS)
        per = -(-per // BLOCK_ALIGN) * BLOCK_ALIGN
        size = min(rest, max(prefix, min(per, TAIL_BLOCK_MAX)))
        blocks += [(start, min(size, n - start)) for start in range(prefix, n, size)]
    return blocks


def clamp_lengths(lengths: torch.Tensor | None, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """(B,) int64 lengths clamped to [0, N] on the device (N for None)."""
    if lengths is None:
        return torch.full((batch,), n, dtype=torch.long, device=device)
    return lengths.clamp(0, n).contiguous()


def select_tokens(features: torch.Tensor, scores: torch.Tensor, budget: int, tau: float = 0.8,
                  lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy cosine NMS per row with tensor ops on the input's device (SPEC section 3).

    Args:
        features: (B, N, D) floating, any device.
        scores: (B, N) floating, same device.
        budget: tokens kept per row, >= 1.
        tau: ``j`` is a neighbour of ``i`` when ``cos(x_i, x_j) >= tau`` (fp32).
        lengths: (B,) int64 or None; values are clamped to [0, N] (no host check here).

    Returns:
        (B, budget) int64 on the same device: kept positions ascending, -1 padded.
    """
    batch, n, d = features.shape
    if batch == 0 or n == 0:
        return torch.full((batch, budget), -1, dtype=torch.long, device=features.device)
    lengths = clamp_lengths(lengths, batch, n, features.device)
    order = saliency_order(scores, lengths)
    xn = F.normalize(features.float(), dim=-1, eps=1e-12)
    xo = xn.gather(1, order[..., None].expand(batch, n, d))  # rows in saliency order
    neighbour = torch.bmm(xo, xo.transpose(1, 2)) >= tau   # [b, i, j], i the earlier position
    alive = torch.arange(n, device=features.device)[None, :] < lengths[:, None]
    picked = torch.zeros_like(alive)
    count = torch.zeros(batch, dtype=torch.long, device=features.device)
    for r in range(n):  # strict pass: select if alive and under budget, then suppress
        take = alive[:, r] & (count < budget)
        picked[:, r] = take
        alive &= ~(neighbour[:, r] & take[:, None])
        count += take
    return assemble_output(picked, order, lengths, budget)
