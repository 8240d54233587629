"""Qwen2.5-VL on upstream transformers: the model-specific half of the integration.

Everything model-independent (wrapping the decoder layers, the per-forward state, masks
per cache length, saliency and NMS calls) lives in :mod:`integrations.engine`. This file
answers only what is particular to ``Qwen2_5_VLForConditionalGeneration``:

* where the visual tokens are: image pad tokens (and video pad tokens, one span per
  temporal frame), found from ``input_ids``; each image or frame gets its own budget;
* positions: M-RoPE ``(3, B, S)`` ids; kept tokens keep their original 3-D positions
  (SPEC section 5, gathered, never renumbered), so the decode positions the model derives
  from its ``rope_deltas`` stay right;
* encoder-side selection (SPEC section 4) on the vision tower: column means of the
  attention at two full-attention blocks, computed blockwise from that block's queries
  and keys (no ``N x N`` map), window-local plus global top selection on the merged
  2x2 grid per image (or frame), and every dropped token merged into its most
  cosine-similar kept token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["merge_into_kept", "vision_column_scores", "window_global_selection"]

# Attention probabilities held at once by vision_column_scores, in elements (fp32: 64 MiB).
_SCORE_CHUNK_ELEMENTS = 1 << 24


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def vision_column_scores(attn: nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Column means of one vision block's attention, without materialising the map (SPEC section 4).

    Args:
        attn: the block's ``Qwen2_5_VLVisionAttention`` (``qkv``, ``num_heads``, ``scaling``).
        hidden_states: (N, C), the attention's input (the block's ``norm1`` output), in the
            tower's window order.
        cu_seqlens: (segments + 1,) int, the attention segments the block uses (one per image
            frame for a full-attention block, one per window otherwise).
        position_embeddings: the vision ``(cos, sin)`` pair, each (N, head_dim).

    Returns:
        (N,) float32 on ``hidden_states.device``: for every key token, the attention it receives
        averaged over heads and over the queries of its segment. The softmax is taken in fp32
        over query chunks, so memory is O(chunk x segment length), never O(N^2).
    """
    n = hidden_states.shape[0]
    heads = attn.num_heads
    q, k, _ = attn.qkv(hidden_states).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = (t.float().unsqueeze(-2) for t in position_embeddings)
    q, k = q.float(), k.float()
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    q, k = q.transpose(0, 1) * attn.scaling, k.transpose(0, 1)  # (H, N, d)
    out = torch.zeros(n, dtype=torch.float32, device=hidden_states.device)
    bounds = cu_seqlens.tolist()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        length = stop - start
        if length == 0:
            continue
        keys = k[:, start:stop]
        chunk = max(1, _SCORE_CHUNK_ELEMENTS // (heads * length))
        col = torch.zeros(length, dtype=torch.float32, device=out.device)
        for q0 in range(start, stop, chunk):
            logits = q[:, q0:min(q0 + chunk, stop)] @ keys.transpose(1, 2)  # (H, c, length)
            col += logits.softmax(dim=-1).sum(dim=(0, 1))
        out[start:stop] = col / (heads * length)
    return out


def _descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score, ties to the lower index."""
    return torch.sort(scores, descending=True, stable=True).indices


def window_global_selection(local_scores: torch.Tensor, global_scores: torch.Tensor, grid_h: int, grid_w: int,
                            budget: int, window: int = 4) -> torch.Tensor:
    """Kept tokens of one image (or frame) on its merged grid (SPEC section 4, Qwen2.5-VL).

    Half the budget (``budget // 2``) is local: the grid is split into ``window x window``
    windows (a partial last row or column of windows joins its neighbour) and tokens are
    taken by descending ``local_scores`` with at most ``ceil(local / windows)`` per window
    (then, if the caps leave it short, the best remaining). The other half is global: the
    top of ``global_scores`` among the rest. Ties go to the lower index.

    Args:
        local_scores, global_scores: (grid_h * grid_w,) floating, row-major merged grid.
        budget: tokens kept, >= 1 (all are kept when the image has no more).

    Returns:
        (min(budget, n),) int64, ascending.
    """
    n = grid_h * grid_w
    if local_scores.shape != (n,) or global_scores.shape != (n,):
        raise ValueError(f"scores must have shape ({n},) for a {grid_h}x{grid_w} grid, got "
                         f"{tuple(local_scores.shape)} and {tuple(global_scores.shape)}")
    device = local_scores.device
    if budget >= n:
        return torch.arange(n, device=device)
    n_local = budget // 2
    windows_h, windows_w = max(1, grid_h // window), max(1, grid_w // window)
    idx = torch.arange(n, device=device)
    win = ((idx // grid_w) // window).clamp_max(windows_h - 1) * windows_w \
        + ((idx % grid_w) // window).clamp_max(windows_w - 1)
    cap = math.ceil(n_local / (windows_h * windows_w)) if n_local else 0
    order = _descending(local_scores.float())
    # Rank of each token inside its window by descending local score.
    by_window = order[torch.sort(win[order], stable=True).indices]
    first = torch.searchsorted(win[by_window], win[by_window], right=False)
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[by_window] = torch.arange(n, device=device) - first
    eligible = order[rank[order] < cap]
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    chosen[eligible[:n_local]] = True
    short = n_local - int(chosen.sum())
    if short > 0:  # caps left the local half short: best remaining by the local map
        rest = order[~chosen[order]]
        chosen[rest[:short]] = True
    g_order = _descending(global_scores.float())
    rest = g_order[~chosen[g_order]]
    chosen[rest[:budget - n_local]] = True
    return chosen.nonzero().squeeze(1)


def merge_into_kept(features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Merges every dropped row into its most cosine-similar kept row (SPEC section 4).

    Args:
        features: (N, D) floating, one image's tokens after the merger.
        keep: (k,) int64, kept row indices, ascending.

    Returns:
        (k, D) in ``features.dtype``: each kept row becomes the mean of itself and the rows
        merged into it (similarity in fp32 on L2-normalised rows, ties to the lower kept index).
    """
    n = features.shape[0]
    dropped = torch.ones(n, dtype=torch.bool, device=features.device)
    dropped[keep] = False
    kept_x = features[keep].float()
    if not bool(dropped.any()):
        return features[keep]
    drop_x = features[dropped].float()
    target = (F.normalize(drop_x, dim=-1) @ F.normalize(kept_x, dim=-1).T).argmax(dim=1)
    total = kept_x.index_add(0, target, drop_x)
    count = torch.ones(keep.shape[0], dtype=torch.float32, device=features.device)
    count = count.index_add(0, target, torch.ones_like(target, dtype=torch.float32))
    return (total / count[:, None]).to(features.dtype)
