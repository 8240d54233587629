"""Encoder-side selection (SPEC section 4): the rules, and the cut it makes before layer 0.

The stock model computes its image features and places them into the prompt; the adapter's
probes record, while the vision tower runs, the score maps the rule needs (LLaVA: the CLS
attention at a shallow and at the feature layer; Qwen2.5-VL: attention column means). When
the language model is called for the prefill, :func:`encoder_cut` asks the adapter which
visual rows to keep, merges every dropped row into its most cosine-similar kept row of the
same span (image, crop or frame), and hands the language model only the kept rows. Every
layer, and the KV cache, then holds the reduced prompt. Nothing before the language model
changes, so ``generate``'s own image handling (encoding before the prefill, expanding for
beams) is the stock one.

The shared rules below are batched over spans (images, crops, frames): one call selects in
all of them, with a fixed number of host reads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


__all__ = ["attention_received", "encoder_cut", "image_sources", "merge_dropped", "split_local_global",
           "window_global"]

# Attention probabilities held at once by attention_received, in elements (fp32: 64 MiB).
SCORE_CHUNK_ELEMENTS = 1 << 24


def _windows(grid_h: int, grid_w: int, window: tuple[int, int], device, clamp: bool) -> tuple[torch.Tensor, int]:
    """Window id of every cell of a row-major grid, and the number of windows.

    ``clamp=False``: edge windows may be smaller (LLaVA). ``clamp=True``: a partial last row or
    column of windows joins its neighbour (the released Qwen2.5-VL code)."""
    win_h, win_w = window
    idx = torch.arange(grid_h * grid_w, device=device)
    r, c = idx // grid_w // win_h, idx % grid_w // win_w
    if clamp:
        n_h, n_w = max(1, grid_h // win_h), max(1, grid_w // win_w)
        r, c = r.clamp_max(n_h - 1), c.clamp_max(n_w - 1)
    else:
        n_h, n_w = -(-grid_h // win_h), -(-grid_w // win_w)
    return r * n_w + c, n_h * n_w


def _rank_in_window(order: torch.Tensor, win: torch.Tensor, n_windows: int, counted: torch.Tensor) -> torch.Tensor:
    """(G, N): for each position of ``order`` (G, N), how many earlier positions of the same window
    are ``counted`` (G, N, in order)."""
    w = win[order]
    onehot = F.one_hot(w, n_windows) * counted[..., None]
    before = onehot.cumsum(1) - onehot
    return before.gather(2, w[..., None]).squeeze(2)


def _descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score along the last dimension, ties to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def _take_first(order: torch.Tensor, eligible_in_order: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(G, N) bool: the first ``count`` (G,) eligible positions of ``order``, scattered back."""
    rank = eligible_in_order.long().cumsum(1) - 1
    pick = eligible_in_order & (rank < count[:, None])
    return torch.zeros_like(pick).scatter(1, order, pick)


def split_local_global(shallow: torch.Tensor, deep: torch.Tensor, grid: tuple[int, int], budget: torch.Tensor,
                       window: tuple[int, int], available: torch.Tensor | None = None) -> torch.Tensor:
    """Kept tokens of G images (or crops) on one grid: half local, half global (SPEC 4, LLaVA).

    Args:
        shallow: (G, N) attention maps at the shallow layer, N = grid_h * grid_w, row-major.
        deep: (G, N) attention maps at the deep layer.
        grid: (grid_h, grid_w).
        budget: (G,) int64 (or an int for all), tokens kept, 1 <= budget <= available tokens.
        window: (win_h, win_w) window size; edge windows may be smaller.
        available: (G, N) bool, tokens that may be kept (default all), e.g. those left by
            LLaVA-NeXT's unpadding; windows without one do not count.

    Every window gives its top ``(budget // 2) // windows`` available tokens by ``shallow``; the
    rest of the budget goes to the top of ``deep`` among the others (so exactly ``budget`` are
    kept). Ties go to the lower index. Returns (G, N) bool.
    """
    groups, n = shallow.shape
    grid_h, grid_w = grid
    device = shallow.device
    if n != grid_h * grid_w or deep.shape != shallow.shape:
        raise ValueError(f"attention maps must be (G, {grid_h * grid_w}) for a {grid_h}x{grid_w} grid, "
                         f"got {tuple(shallow.shape)} and {tuple(deep.shape)}")
    if available is None:
        available = torch.ones(groups, n, dtype=torch.bool, device=device)
    budget = torch.as_tensor(budget, device=device).long().expand(groups)
    n_available = available.sum(1)
    if bool(((budget < 1) | (budget > n_available)).any()):
        raise ValueError(f"budget must lie in [1, available tokens {n_available.tolist()}], got {budget.tolist()}")
    win, n_windows = _windows(grid_h, grid_w, window, device, clamp=False)
    used = (F.one_hot(win, n_windows)[None] * available[..., None]).amax(1).sum(1)  # windows with a token
    per_window = (budget // 2) // used
    order = _descending(shallow.float().masked_fill(~available, float("-inf")))
    avail = available.gather(1, order)
    rank = _rank_in_window(order, win, n_windows, avail)
    chosen = torch.zeros_like(available).scatter(1, order, avail & (rank < per_window[:, None]))
    rest = budget - chosen.sum(1)
    g_order = _descending(deep.float().masked_fill(chosen | ~available, float("-inf")))
    free = (available & ~chosen).gather(1, g_order)
    return chosen | _take_first(g_order, free, rest)


def window_global(local: torch.Tensor, global_: torch.Tensor, grid_h: int, grid_w: int, budget: torch.Tensor,
                  window: int = 4) -> torch.Tensor:
    """Kept tokens of G frames on one merged grid (SPEC 4, the released Qwen2.5-VL rule).

    Half the budget (``budget // 2``) is local: the grid is split into ``window x window``
    windows (a partial last row or column of windows joins its neighbour) and tokens are taken
    by descending ``local`` with at most ``ceil(local_half / windows)`` per window (then, if the
    caps leave it short, the best remaining by ``local``). The other half is global: the top of
    ``global_`` among the rest. Ties go to the lower index.

    Args:
        local, global_: (G, grid_h * grid_w) floating, row-major.
        budget: (G,) int64 (or an int), >= 1; a frame with no more tokens keeps them all.

    Returns: (G, N) bool.
    """
    groups, n = local.shape
    device = local.device
    if n != grid_h * grid_w or global_.shape != local.shape:
        raise ValueError(f"scores must be (G, {grid_h * grid_w}) for a {grid_h}x{grid_w} grid, "
                         f"got {tuple(local.shape)} and {tuple(global_.shape)}")
    budget = torch.as_tensor(budget, device=device).long().expand(groups)
    if bool((budget < 1).any()):
        raise ValueError(f"budget must be >= 1, got {budget.tolist()}")
    budget = budget.clamp_max(n)
    n_local = budget // 2
    win, n_windows = _windows(grid_h, grid_w, (window, window), device, clamp=True)
    cap = (n_local + n_windows - 1) // n_windows
    order = _descending(local.float())
    everything = torch.ones(groups, n, dtype=torch.bool, device=device)
    rank = _rank_in_window(order, win, n_windows, everything)
    chosen = _take_first(order, rank < cap[:, None], n_local)
    short = n_local - chosen.sum(1)  # caps left the local half short: best remaining by local
    chosen |= _take_first(order, ~chosen.gather(1, order), short)
    g_order = _descending(global_.float())
    return chosen | _take_first(g_order, ~chosen.gather(1, g_order), budget - n_local)


def attention_received(q: torch.Tensor, k: torch.Tensor, chunk_elements: int = SCORE_CHUNK_ELEMENTS) -> torch.Tensor:
    """The attention each key receives, averaged over heads and queries (SPEC 4's column means).

    Args:
        q: (B, H, N, d) queries, already scaled (the attention is ``softmax(q k^T)`` over keys).
        k: (B, H, N, d) keys.
        chunk_elements: probabilities held at once.

    Returns:
        (B, N) float32: column means of the attention map of each of the B sequences. The softmax
        is taken in fp32 over query chunks, so memory is O(chunk_elements), never O(N^2).
    """
    batch, heads, n, _ = q.shape
    q, k = q.float(), k.float().transpose(-1, -2)
    out = torch.zeros(batch, n, dtype=torch.float32, device=q.device)
    chunk = max(1, chunk_elements // (batch * heads * n))
    for q0 in range(0, n, chunk):
        out += (q[:, :, q0:q0 + chunk] @ k).softmax(dim=-1).sum(dim=(1, 2))
    return out / (heads * n)


def merge_dropped(features: torch.Tensor, keep: torch.Tensor, group: torch.Tensor,
                  values: torch.Tensor | None = None) -> torch.Tensor:
    """Rows after merging (SPEC 4): every dropped row of a span joins its most cosine-similar kept
    row of the same span; a kept row becomes the mean of itself and the rows merged into it.

    Args:
        features: (B, S, D) the features in the sequence.
        keep: (B, S) bool, rows kept.
        group: (B, S) int64 span id of each row that takes part (unique over the batch), -1 for
            rows that do not (text, padding, rows never merged).
        values: (B, S, E) rows to average instead of ``features``, with the assignment the
            similarity of ``features`` decides (e.g. Qwen3-VL's DeepStack features, merged as the
            main features are); default ``features``.

    Returns: (B, S, E) in ``values``' dtype: kept rows of a span replaced by their means
    (computed in fp32; cosine ties go to the lower row), every other row unchanged. Spans
    are processed together, padded to the largest; one host read (the span sizes).
    """
    values = features if values is None else values
    batch, seq, dim = values.shape
    flat_group = group.reshape(-1)
    rows = (flat_group >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return features
    gid, order = torch.sort(flat_group[rows], stable=True)
    rows = rows[order]
    _, gid = torch.unique_consecutive(gid, return_inverse=True)  # 0 .. spans-1
    counts = torch.bincount(gid)
    n_spans, n_max = counts.numel(), int(counts.max())
    slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[gid]
    x = features.new_zeros(n_spans, n_max, features.shape[-1], dtype=torch.float32)
    x[gid, slot] = features.reshape(-1, features.shape[-1])[rows].float()
    flat = values.reshape(-1, dim)
    v = x
    if values is not features:
        v = values.new_zeros(n_spans, n_max, dim, dtype=torch.float32)
        v[gid, slot] = flat[rows].float()
    kept = torch.zeros(n_spans, n_max, dtype=torch.bool, device=rows.device)
    kept[gid, slot] = keep.reshape(-1)[rows]
    present = torch.zeros_like(kept)
    present[gid, slot] = True
    dropped = present & ~kept
    unit = F.normalize(x, dim=-1, eps=1e-12)
    sim = unit @ unit.transpose(1, 2)  # (spans, n_max, n_max): row = dropped, column = kept
    sim = sim.masked_fill(~kept[:, None, :], float("-inf"))
    target = sim.argmax(dim=2)  # first maximum: the lowest kept row on ties
    weight = dropped.float()[..., None]
    sums = (v * kept.float()[..., None]).scatter_add(1, target[..., None].expand(-1, -1, dim), v * weight)
    counts_k = kept.float().scatter_add(1, target, dropped.float())
    merged = sums / counts_k.clamp_min(1.0)[..., None]
    out = flat.clone()
    take = kept[gid, slot]
    out[rows[take]] = merged[gid[take], slot[take]].to(values.dtype)
    return out.view(batch, seq, dim)


def image_sources(image_map: torch.Tensor, n_run_images: int) -> list[int]:
    """For every image of the prompt, the image of the vision runs that produced its features.

    ``image_map`` (B, S): the prompt's image ids (ascending, row-major); ``n_run_images``: the
    images the recorded image-feature calls returned, in call order. The two agree one to one,
    or ``generate`` encoded each sample's images once and repeated the whole group for every
    beam / returned sequence (``[A, B] -> [A, B, A, B]``; transformers >= 5.24). Raises
    ValueError when neither holds. One host read.
    """
    batch = image_map.shape[0]
    present = image_map >= 0
    big = torch.iinfo(torch.long).max
    first = torch.where(present, image_map, torch.full_like(image_map, big)).min(1).values
    last = image_map.max(1).values
    per_sample = torch.where(last >= 0, last - first + 1, torch.zeros_like(last)).tolist()
    n_prompt = sum(per_sample)
    if n_prompt == n_run_images:
        return list(range(n_prompt))
    if n_run_images and n_prompt % n_run_images == 0 and batch % (n_prompt // n_run_images) == 0:
        expand = n_prompt // n_run_images
        sources, offset = [], 0
        for b in range(0, batch, expand):
            for beam in range(expand):
                sources += range(offset, offset + per_sample[b + beam])
            offset += per_sample[b]
        if offset == n_run_images:
            return sources
    raise ValueError(f"the prompt holds {n_prompt} images but the image-feature calls of this forward "
                     f"returned {n_run_images}; encoder-side selection cannot pair them")


def encoder_cut(state, prefill, call: dict, hidden: torch.Tensor, runs: list):
    """The encoder-side cut of a prefill (SPEC 4): ``(cut, rows)`` or ``None`` when nothing is dropped.

    ``hidden`` (B, S, D): the language model's input, image features in place. The adapter
    chooses the rows; every dropped row is merged into the most similar kept row of its span;
    ``rows`` (B, W, D) are the kept rows, merged, in order (samples left-padded). The decision
    is recorded as ``prefill.encoder_merge`` (``keep``, ``group``), so that features the model
    adds later to the same rows can be merged the same way (``merge_dropped(..., values=)``)."""
    from .stage import cut_rows, resolve_budget

    adapter, config = state.adapter, state.config
    cut0 = prefill.cuts[0]
    spec = config.encoder_keep
    keep, group = adapter.encoder_select(state.model, call, runs, prefill.image_map,
                                         lambda n: resolve_budget(spec, n), config.tau)
    keep = keep & cut0.valid
    if bool((keep == cut0.valid).all()):
        return None
    group = group.masked_fill(~cut0.valid, -1)
    prefill.encoder_merge = (keep, group)
    merged = merge_dropped(hidden, keep, group)
    return cut_rows(state, prefill, cut0, 0, keep, merged, replaces=False)
