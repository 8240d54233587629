"""One language-model stage (SPEC sections 1-3 and 5): score, select per image, gather the rows.

In a prefill, the pre-hook of layer ``layers[s]`` calls :func:`run_stage`: the stage scores the
rows entering that layer (the configured scoring rule, the proxy saliency by default), keeps
``keep[s]`` rows of every image with one :func:`pio_kernels.select_tokens` call per distinct
budget (every image of the batch at once), and returns the gathered hidden states with a new
:class:`~.state.Cut`. The work is batched over samples and images: a stage reads back a fixed
handful of values (the image sizes, the widest sample), whatever the number of tokens.

A *replay* (:func:`extend_prefill`) is a from-scratch call that repeats a prompt already
selected (``use_cache=False`` decoding, assisted decoding's first call): its stages keep the
rows the prompt's prefill kept and every row after the prompt, so the result is the reduced
model of cached decoding.
"""
from __future__ import annotations

from typing import Any

import torch

import pio_kernels
from pio_kernels import scoring

from .. import hf
from .masks import build_attention_mask
from .state import Cut, Prefill, Step

__all__ = ["compact", "cut_inputs", "cut_rows", "extend_prefill", "gather_rows", "resolve_budget", "run_stage",
           "select_per_image", "step_inputs"]


def resolve_budget(keep: int | float, n: int) -> int:
    """Tokens kept of ``n`` by a budget (SPEC 1): an int is a count (capped at ``n``); a float
    in (0, 1] keeps ``floor(keep * n)``, at least 1, as the released code (``int(ratio * n)``)."""
    if isinstance(keep, float):
        return max(1, min(n, int(keep * n)))
    return min(n, int(keep))


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to gather (B, W) for the kept rows of every sample, ascending, and their validity.

    Samples with fewer rows are padded on the left (so each sample's last token stays last);
    padding rows point at row 0 and are invalid. One host read (the widest sample)."""
    counts = keep.sum(1)
    width = int(counts.max())
    batch = keep.shape[0]
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # kept rows first
    slot = torch.arange(width, device=keep.device).expand(batch, width)
    pad = (width - counts)[:, None]
    valid = slot >= pad
    src = torch.where(valid, order.gather(1, (slot - pad).clamp_min(0)), torch.zeros_like(slot))
    return src, valid


def _uniform_slots(lengths: torch.Tensor, budget: int) -> torch.Tensor:
    """(g, budget) evenly spaced slots of each row of ``lengths`` (raster order), -1 past a short row."""
    j = torch.arange(budget, device=lengths.device, dtype=torch.float64)
    n = lengths.to(torch.float64)[:, None]
    slots = torch.floor((j[None] + 0.5) * n / budget).long()
    short = lengths[:, None] <= budget
    slots = torch.where(short, torch.arange(budget, device=lengths.device)[None].expand_as(slots), slots)
    return torch.where(slots < lengths[:, None], slots, torch.full_like(slots, -1))


def select_per_image(hidden: torch.Tensor, scores: torch.Tensor | None, image_ids: torch.Tensor,
                     keep_spec: int | float, tau: float, selection: str = "nms") -> torch.Tensor:
    """(B, W) bool: the visual rows kept, ``keep_spec`` per image (SPEC 1 and 3).

    ``image_ids`` (B, W): image id of each row, -1 for rows that are not candidates. Every image
    of the batch is laid out in one (images, n_max) table; one ``select_tokens`` call per
    distinct budget (one for an int budget) selects in all of them. ``selection``: ``"nms"``
    (SPEC 3), ``"topk"`` (no suppression) or ``"uniform"`` (evenly spaced rows, no scores).
    """
    batch, width, dim = hidden.shape
    device = hidden.device
    keep = torch.zeros(batch, width, dtype=torch.bool, device=device)
    flat_ids = image_ids.reshape(-1)
    rows = (flat_ids >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return keep
    ids = flat_ids[rows]
    ids, order = torch.sort(ids, stable=True)
    rows = rows[order]
    n_images = int(ids[-1]) + 1
    counts = torch.bincount(ids, minlength=n_images)
    counts_host = counts.tolist()  # the image sizes: the one read-back of a stage
    n_max = max(counts_host)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=device) - start[ids]
    table = torch.full((n_images, n_max), -1, dtype=torch.long, device=device)
    table[ids, slot] = rows
    by_budget: dict[int, list[int]] = {}
    for image, n in enumerate(counts_host):
        if n:
            by_budget.setdefault(resolve_budget(keep_spec, n), []).append(image)
    if selection != "uniform":
        feats = hidden.new_zeros(n_images, n_max, dim)
        feats[ids, slot] = hidden.reshape(-1, dim)[rows]
        sc = torch.zeros(n_images, n_max, dtype=torch.float32, device=device)
        sc[ids, slot] = scores.reshape(-1)[rows].float()
    threshold = 2.0 if selection == "topk" else tau  # tau > 1: plain top-k (SPEC 3)
    flat_keep = keep.view(-1)
    for budget, images in by_budget.items():
        sel = torch.tensor(images, device=device) if len(images) < n_images else None
        lengths = counts if sel is None else counts[sel]
        if selection == "uniform":
            picked = _uniform_slots(lengths, budget)
        else:
            f = feats if sel is None else feats[sel]
            s = sc if sel is None else sc[sel]
            picked = pio_kernels.select_tokens(f, s, budget, threshold, lengths)
        tab = table if sel is None else table[sel]
        kept_rows = tab.gather(1, picked.clamp_min(0))
        flat_keep[kept_rows[picked >= 0]] = True
    return keep


def _score(state, layer, hidden: torch.Tensor, embeddings, valid: torch.Tensor, image_ids: torch.Tensor,
           all_valid: bool) -> torch.Tensor | None:
    """Scores of the rows entering ``layer`` by the configured rule of :mod:`pio_kernels.scoring`
    (``None`` for ``uniform`` selection, which reads no scores)."""
    config = state.config
    if config.selection == "uniform":
        return None
    lm = state.adapter.language_model(state.model)
    generator = torch.Generator(device=hidden.device).manual_seed(config.seed) if config.scoring == "random" else None
    inputs = scoring.StageInputs(layer=layer, final_norm=lm.norm, lm_head=state.adapter.lm_head(state.model),
                                 hidden_states=hidden, position_embeddings=embeddings,
                                 attention_mask=None if all_valid else valid.long(), image_ids=image_ids,
                                 num_positions=config.num_positions, generator=generator)
    return scoring.get_scoring(config.scoring)(inputs)


def _candidates(prefill: Prefill, cut: Cut) -> torch.Tensor:
    """(B, W) image id of each row of ``cut`` that a stage may drop, -1 otherwise.

    Text, padding and each sample's last real row (it predicts the next token) are never dropped."""
    rows = cut.index.clamp_min(0)
    real = cut.valid & (cut.index >= 0)
    if prefill.prompt_len is not None:  # rows past the caller's prompt (assisted decoding's candidates)
        real &= cut.index < prefill.prompt_len
    ids = torch.where(real, prefill.image_map.gather(1, rows), torch.full_like(rows, -1))
    arange = torch.arange(cut.width, device=rows.device)
    last = torch.where(real, arange, torch.full_like(arange, -1)).max(dim=1).values
    return ids.scatter(1, last.clamp_min(0)[:, None], -1)


def cut_rows(state, prefill: Prefill, prev: Cut, layer_idx: int, keep: torch.Tensor, hidden: torch.Tensor,
             replaces: bool = True) -> tuple[Cut, torch.Tensor]:
    """The cut that keeps ``keep`` (B, W) of ``prev``'s rows, and the gathered hidden states.

    ``replaces``: the layers behind the cut get its mask and positions (a stage inside the
    language model); ``False`` for the encoder cut, whose rows the language model is handed."""
    adapter = state.adapter
    dropped = prev.valid & ~keep
    src, valid = compact(keep)
    dropped_before = (dropped.long().cumsum(1) - dropped.long()).gather(1, src)
    positions = adapter.positions_after_stage(prev.positions, src, dropped_before, valid)
    hidden = hidden.gather(1, src[..., None].expand(-1, -1, hidden.shape[-1]))
    index = torch.where(valid, prev.index.gather(1, src), torch.full_like(src, -1))
    cut = Cut(layer=layer_idx, index=index, valid=valid, positions=positions, shift=prev.shift + dropped.sum(1),
              src=src, replaces=replaces)
    if replaces:
        cut.embeddings = adapter.position_embeddings(state.model, hidden, positions)
        cut.mask = build_attention_mask(prefill.mask_kind, valid, valid.shape[1], hidden.dtype, prefill.static_len)
    return cut, hidden


@torch.compiler.disable  # data-dependent selection: one graph break under torch.compile
def run_stage(state, prefill: Prefill, layer, stage: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Selects before ``layer`` (stage ``stage``), appends the new cut; returns the hidden states it keeps."""
    config = state.config
    prev = prefill.cuts[-1]
    if prev.embeddings is None:  # the prompt: the model's own (cos, sin) and mask
        prev.embeddings = kwargs["position_embeddings"]
        prev.mask = kwargs.get("attention_mask")
    slot = prefill.stats.start("stage", hidden.device)
    ids = _candidates(prefill, prev)
    valid = prev.valid if prefill.prompt_len is None else prev.valid & (prev.index < prefill.prompt_len)
    all_valid = bool(valid.all())
    state.in_probe = True  # a rule may run ``layer`` itself (the reference probe): its hook stands aside
    try:
        with torch.profiler.record_function("pio::score"), hf.outputs_not_recorded():
            scores = _score(state, layer, hidden, prev.embeddings, valid, ids, all_valid)
    finally:
        state.in_probe = False
    keep = prev.valid & (ids < 0)
    with torch.profiler.record_function("pio::select"):
        keep |= select_per_image(hidden, scores, ids, config.keep[stage], config.tau, config.selection)
    if bool((keep == prev.valid).all()):  # nothing dropped: the same rows go on
        cut = Cut(layer=config.layers[stage], index=prev.index, valid=prev.valid, positions=prev.positions,
                  shift=prev.shift, src=torch.arange(prev.width, device=hidden.device).expand(hidden.shape[0], -1),
                  replaces=prev.replaces, embeddings=prev.embeddings, mask=prev.mask)
    else:
        cut, hidden = cut_rows(state, prefill, prev, config.layers[stage], keep, hidden)
    prefill.cuts.append(cut)
    prefill.stats.stop(slot, hidden.device)
    return hidden


# ----------------------------------------------------------------------------------------------
# Replays and decoding steps
# ----------------------------------------------------------------------------------------------
def extend_prefill(state, prefill: Prefill, valid: torch.Tensor, new_positions: torch.Tensor,
                   static_len: int | None) -> Prefill:
    """The prefill of a call that repeats ``prefill``'s prompt and appends rows (a replay).

    Every cut keeps the prompt rows it kept, then every new row, whose positions follow the
    cut's numbering as in decoding. ``valid`` (B, q): the call's validity; ``new_positions``:
    the caller's positions of the q - S0 new rows. The result is *decided*: its stages gather
    rows instead of selecting, so the call computes the reduced model of cached decoding."""
    adapter = state.adapter
    batch, q = valid.shape
    s0 = prefill.seq_len
    new = q - s0
    device = valid.device
    tail = s0 + torch.arange(new, device=device).expand(batch, new)
    new_valid = valid[:, s0:]
    ext = Prefill(seq_len=q, image_map=torch.cat([prefill.image_map, torch.full_like(tail, -1)], dim=1),
                  prompt_valid=valid, mask_kind=prefill.mask_kind, static_len=static_len, decided=True,
                  encoder_ran=prefill.encoder_ran, encoder_merge=prefill.encoder_merge)
    for i, cut in enumerate(prefill.cuts):
        src = None
        if cut.src is not None:
            src = torch.cat([cut.src, prefill.cuts[i - 1].width + torch.arange(new, device=device).expand(batch, new)],
                            dim=1)
        positions = adapter.concat_positions(cut.positions, adapter.decode_positions(new_positions, cut.shift))
        ext.cuts.append(Cut(layer=cut.layer, index=torch.cat([cut.index, tail], dim=1),
                            valid=torch.cat([cut.valid, new_valid], dim=1), positions=positions, shift=cut.shift,
                            src=src, replaces=cut.replaces))
    return ext


def gather_rows(hidden: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """The rows ``src`` (B, W) of ``hidden`` (B, S, D)."""
    return hidden.gather(1, src[..., None].expand(-1, -1, hidden.shape[-1]))


def cut_inputs(state, prefill: Prefill, cut: Cut, hidden: torch.Tensor) -> None:
    """Fills in the prefill mask and (cos, sin) of a cut that replaces the model's (once)."""
    if cut.embeddings is None:
        cut.embeddings = state.adapter.position_embeddings(state.model, hidden, cut.positions)
        cut.mask = build_attention_mask(prefill.mask_kind, cut.valid, cut.width, hidden.dtype, prefill.static_len)


def step_inputs(state, step: Step, cut: Cut, dtype: torch.dtype) -> tuple[Any, tuple, Any]:
    """(mask, (cos, sin), position_ids) of the layers behind ``cut`` in a decoding step."""
    key = id(cut)
    if key not in step.per_cut:
        adapter, prefill = state.adapter, step.prefill
        positions = adapter.decode_positions(step.positions, cut.shift)
        kv_valid = torch.cat([cut.valid, step.new_valid], dim=1)
        mask = build_attention_mask(prefill.mask_kind, kv_valid, step.q, dtype, prefill.static_len)
        embeddings = adapter.position_embeddings(state.model, step.hidden, positions)
        step.per_cut[key] = (mask, embeddings, adapter.layer_position_ids(positions))
    return step.per_cut[key]
