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

from .engine import Adapter, merge_dropped, register_adapter, resolve_budget

__all__ = ["Qwen2_5_VLAdapter", "default_score_blocks", "encoder_selection", "vision_column_scores",
           "window_global_selection"]

# Attention probabilities held at once by vision_column_scores, in elements (fp32: 64 MiB).
_SCORE_CHUNK_ELEMENTS = 1 << 24


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
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import rotate_half  # the tower's own convention

    cos, sin = (t.float().unsqueeze(-2) for t in position_embeddings)
    q, k = q.float(), k.float()
    q = q * cos + rotate_half(q) * sin  # as apply_rotary_pos_emb_vision, kept in fp32
    k = k * cos + rotate_half(k) * sin
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
    top of ``global_scores`` among the rest. Ties go to the lower index. This is the released
    Qwen2.5-VL rule; LLaVA's fixed count per window is :func:`~.engine.split_local_global`.

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
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
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


def _window_order(visual: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """The tower's permutation of merged rows into window order (the stock helper computes it)."""
    from transformers.vision_utils import get_vision_window_index
    index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                       window_size=visual.window_size, patch_size=visual.patch_size)
    return index


def default_score_blocks(visual: nn.Module) -> tuple[int, int]:
    """(local, global) blocks read by the encoder-side selection: as the released code, the first
    full-attention block and the last block (blocks 7 and 31 of the 7B tower)."""
    full = list(getattr(visual, "fullatt_block_indexes", None) or [])
    depth = len(visual.blocks)
    return (full[0] if full else depth // 2), depth - 1


def encoder_selection(visual: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor, budget,
                      *, window: int = 4, blocks: tuple[int, int] | None = None):
    """Runs the vision tower once and selects, per image or video frame, the tokens that reach the LLM.

    SPEC section 4, Qwen2.5-VL. While the tower runs, pre-hooks on the two score blocks
    compute the column means of their attention (:func:`vision_column_scores`, blockwise, no
    ``N x N`` map); per patch scores are averaged over each 2x2 merge group and put back into
    the merged order the tower outputs. Then, per frame (an image is one frame):
    :func:`window_global_selection` on the frame's merged grid with ``budget(n)`` tokens, and
    :func:`~.engine.merge_dropped` on the tower's merged output.

    Args:
        visual: ``Qwen2_5_VisionTransformerPretrainedModel``.
        pixel_values: what the model hands its tower (patches, C * T * P * P).
        grid_thw: (items, 3) int64 patch grids.
        budget: ``budget(n) -> int``, tokens kept out of a frame's ``n``.
        window: side, in merged tokens, of the local windows (4 in the released code).
        blocks: (local, global) block indices; default :func:`default_score_blocks`.

    Returns:
        ``(frames, kept)``: per frame, the (k, D) merged features (``visual``'s dtype) and the
        (k,) int64 kept indices into that frame's merged tokens, ascending; frames in the
        order the tower outputs them (item by item, time-major).
    """
    local_block, global_block = default_score_blocks(visual) if blocks is None else blocks
    depth = len(visual.blocks)
    for name, idx in (("local block", local_block), ("global block", global_block)):
        if not 0 <= idx < depth:
            raise ValueError(f"{name} must be in [0, {depth}), got {idx}")
    scores: dict[int, torch.Tensor] = {}

    def score_hook(idx):
        def hook(block, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cu = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
            pe = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[2]
            scores[idx] = vision_column_scores(block.attn, block.norm1(hidden), cu, pe)
        return hook

    handles = [visual.blocks[i].register_forward_pre_hook(score_hook(i), with_kwargs=True)
               for i in sorted({local_block, global_block})]
    try:
        with torch.no_grad():
            out = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw)
    finally:
        for h in handles:
            h.remove()
    merged = out.pooler_output if hasattr(out, "pooler_output") else out
    merge = visual.spatial_merge_size
    reverse = torch.argsort(_window_order(visual, grid_thw).to(merged.device))
    local = scores[local_block].view(-1, merge ** 2).mean(1)[reverse]
    global_ = scores[global_block].view(-1, merge ** 2).mean(1)[reverse]
    frames, kept = [], []
    start = 0
    with torch.no_grad():
        for t, h, w in grid_thw.tolist():
            h, w = h // merge, w // merge
            for _ in range(t):
                rows = slice(start, start + h * w)
                keep = window_global_selection(local[rows], global_[rows], h, w, budget(h * w), window)
                frames.append(merge_dropped(merged[rows], keep))
                kept.append(keep)
                start += h * w
    return frames, kept


# ----------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------
def _three_rows(position_ids: torch.Tensor | None, batch: int, start: int, length: int, device) -> torch.Tensor:
    """The (3, B, L) M-RoPE ids the text model uses, from what it was handed.

    ``(4, B, L)`` (``generate`` prepends the text positions) drops its first row, ``(B, L)`` is
    broadcast to the three axes, ``None`` means ``arange`` from ``start`` (the text model's own
    fallback).
    """
    if position_ids is None:
        pos = torch.arange(start, start + length, device=device)
        return pos.view(1, 1, -1).expand(3, batch, -1)
    if position_ids.dim() == 2:
        return position_ids[None].expand(3, -1, -1)
    if position_ids.shape[0] == 4:
        return position_ids[1:]
    return position_ids


class Qwen2_5_VLAdapter(Adapter):
    """``Qwen2_5_VLForConditionalGeneration``: image and video-frame spans, gathered M-RoPE positions."""

    name = "qwen2_5_vl"

    def model_classes(self) -> tuple[type, ...]:
        from transformers import Qwen2_5_VLForConditionalGeneration
        return (Qwen2_5_VLForConditionalGeneration,)

    def multimodal_module(self, model: nn.Module) -> nn.Module:
        return model.model

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head  # the real head (the released code used the tied input embeddings)

    def image_map(self, model, call: dict, lm_kwargs: dict, seq_len: int) -> torch.Tensor | None:
        """One id per image and per video frame, in sequence order; -1 for text and padding.

        Images come first (ids ``0 .. images - 1``, the order of ``image_grid_thw`` and of the
        encoder-side lists), then video frames. Sizes come from the counts the engine recorded,
        else from the grids. Without either (``generate`` may have consumed the grids, and
        encoder-side selection changes the counts) an image is a contiguous run of pad tokens
        and a video frame a run of video pad tokens with one temporal position.
        """
        input_ids = call.get("input_ids")
        if input_ids is None:
            return None
        cfg = model.config
        merge = cfg.vision_config.spatial_merge_size
        out = torch.full(input_ids.shape, -1, dtype=torch.long, device=input_ids.device)
        flat = out.view(-1)
        next_id = 0
        for token, grid_key, counts_key in ((cfg.image_token_id, "image_grid_thw", "_image_token_counts"),
                                            (cfg.video_token_id, "video_grid_thw", None)):
            rows = (input_ids == token).flatten()
            total = int(rows.sum())
            if total == 0:
                continue
            candidates = [call.get(counts_key) if counts_key else None]
            if call.get(grid_key) is not None:
                per = [h * w // merge ** 2 for t, h, w in call[grid_key].tolist() for _ in range(t)]
                candidates.append(per)
            counts = next((c for c in candidates if c is not None and sum(c) == total), None)
            if counts is not None:
                ids = torch.repeat_interleave(torch.arange(len(counts), device=out.device),
                                              torch.tensor(counts, device=out.device))
            else:
                run = input_ids == token
                starts = run & ~F.pad(run[:, :-1], (1, 0), value=False)
                positions = call.get("position_ids")
                if positions is None:
                    positions = lm_kwargs.get("position_ids")
                if token == cfg.video_token_id and positions is not None and positions.dim() == 3:
                    t = positions[-3].to(out.device)  # temporal row of the M-RoPE ids
                    starts |= run & (t != F.pad(t[:, :-1], (1, 0), value=-1))
                ids = starts.flatten().long().cumsum(0)[rows] - 1
            flat[rows] = ids + next_id
            next_id += int(ids.max()) + 1
        return out

    def prompt_positions(self, model, lm_kwargs: dict, batch: int, seq_len: int, device) -> torch.Tensor:
        return _three_rows(lm_kwargs.get("position_ids"), batch, 0, seq_len, device)

    def step_positions(self, model, lm_kwargs: dict, batch: int, past: int, q: int, device) -> torch.Tensor:
        return _three_rows(lm_kwargs.get("position_ids"), batch, past, q, device)

    def positions_after_stage(self, positions: torch.Tensor, src: torch.Tensor, dropped_before: torch.Tensor,
                              valid: torch.Tensor) -> torch.Tensor:
        # SPEC 5 for Qwen2.5-VL: kept tokens keep their 3-D positions (gather, no renumbering).
        kept = positions.gather(2, src[None].expand(positions.shape[0], -1, -1))
        return torch.where(valid[None], kept, torch.zeros_like(kept))

    def decode_positions(self, positions: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return positions  # the model's rope deltas already give the right positions

    # encoder-side selection (SPEC section 4) -------------------------------------------------
    pixel_keys = ("pixel_values",)
    image_feature_keys = ("pixel_values", "image_grid_thw")

    def image_feature_function(self, model):
        return model.model, "get_image_features"

    def supports_encoder_selection(self, model) -> bool:
        return True

    def reduce_encoder_features(self, model, call: dict, budget, tau: float):
        """Window + global selection with merging per image (videos pass whole).

        Returns what ``get_image_features`` returns (``pooler_output``: one (k_i, D) tensor
        per image), the kept indices per image and the tokens per image before selection.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        grid = call["image_grid_thw"]
        visual = model.model.visual
        frames, kept = encoder_selection(visual, call["pixel_values"], grid,
                                         lambda n: resolve_budget(budget, n))
        merge = visual.spatial_merge_size
        features, kept_per_image, counts = [], [], []
        i = 0
        for t, h, w in grid.tolist():  # an image is one frame; join the frames of a t > 1 item
            per_frame = h * w // merge ** 2
            features.append(torch.cat(frames[i:i + t]))
            kept_per_image.append(torch.cat([k + j * per_frame for j, k in enumerate(kept[i:i + t])]))
            counts.append(t * per_frame)
            i += t
        return BaseModelOutputWithPooling(pooler_output=tuple(features)), kept_per_image, counts

    def encoder_positions(self, model, call: dict, src: torch.Tensor, dropped_before: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
        """The 3-D positions of the rows left after encoder-side selection, gathered (SPEC 5).

        Without caller positions they are computed as the stock model would (``get_rope_index``,
        which also records the model's ``rope_deltas`` for decoding) on the unreduced call.
        """
        positions = call.get("position_ids")
        if positions is None:
            positions = self._prompt_positions(model, call)
        positions = _three_rows(positions, src.shape[0], 0, call["input_ids"].shape[1], src.device)
        return self.positions_after_stage(positions, src, dropped_before, valid)

    @staticmethod
    def _prompt_positions(model, call: dict) -> torch.Tensor:
        input_ids = call["input_ids"]
        inner = model.model
        if call.get("mm_token_type_ids") is None or (call.get("image_grid_thw") is None
                                                     and call.get("video_grid_thw") is None):
            return None  # the stock model falls back to 1-D positions too
        positions, deltas = inner.get_rope_index(
            input_ids, mm_token_type_ids=call["mm_token_type_ids"], image_grid_thw=call.get("image_grid_thw"),
            video_grid_thw=call.get("video_grid_thw"), second_per_grid_ts=call.get("second_per_grid_ts"),
            attention_mask=call.get("attention_mask"))
        inner.rope_deltas = deltas
        return positions

    def encoder_step_positions(self, model, call: dict, caller_past: int, q: int, shift: torch.Tensor):
        """Decode positions after encoder-side selection: the caller's, else what the stock model
        would compute from the unreduced sequence (caller positions plus its ``rope_deltas``)."""
        positions = call.get("position_ids")
        deltas = model.model.rope_deltas
        if positions is not None or deltas is None:
            return positions
        ref = call["input_ids"] if call.get("input_ids") is not None else call["inputs_embeds"]
        batch, device = ref.shape[0], ref.device
        mask = call.get("attention_mask")
        if mask is not None:
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -q:]
        else:
            pos = torch.arange(caller_past, caller_past + q, device=device)[None].expand(batch, q)
        deltas = deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)
        return (pos + deltas)[None].expand(3, -1, -1)

    def shrink_call(self, model, call: dict, keep_rows: torch.Tensor) -> dict:
        types = call.get("mm_token_type_ids")
        return {} if types is None else {"mm_token_type_ids": types.gather(1, keep_rows)}

    def layer_position_ids(self, positions: torch.Tensor) -> None:
        # Layers use position_ids only to detect packed sequences (flash attention); gathered
        # positions have gaps, so layers after a stage get none and rely on the mask.
        return None


register_adapter(Qwen2_5_VLAdapter())
