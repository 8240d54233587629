"""Qwen2.5-VL on stock transformers: the model-specific half of the integration.

Everything model-independent lives in :mod:`..engine`. This file answers only what is
particular to ``Qwen2_5_VLForConditionalGeneration``:

* where the visual tokens are: image pad tokens (and video pad tokens, one span per temporal
  frame), found from ``input_ids``; each image or frame gets its own budget;
* positions: M-RoPE ``(3, B, S)`` ids; kept tokens keep their original 3-D positions (SPEC
  section 5, gathered, never renumbered), so the decode positions the model derives from its
  ``rope_deltas`` stay right;
* encoder-side selection (SPEC section 4) on the vision tower: column means of the attention
  at two blocks (the first full-attention block and the last block, as the released code),
  computed blockwise from that block's queries and keys while the tower runs (no ``N x N``
  map); window-local plus global selection on the merged 2x2 grid per image (or frame); every
  dropped token merged into its most cosine-similar kept token of the same frame. Video frames
  pass the encoder side whole (language-model stages still select in them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import hf
from ..engine.adapter import Adapter, features_of, register_adapter
from ..engine.encoder import SCORE_CHUNK_ELEMENTS, attention_received, image_sources, window_global

__all__ = ["Qwen2_5_VLAdapter", "default_score_blocks", "vision_column_scores"]

# Attention probabilities held at once by vision_column_scores, in elements (fp32: 64 MiB).
_SCORE_CHUNK_ELEMENTS = SCORE_CHUNK_ELEMENTS


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def vision_column_scores(attn: nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Column means of one vision block's attention, without materialising the map (SPEC section 4).

    Args:
        attn: the block's vision attention (``qkv``, ``num_heads``, ``scaling``).
        hidden_states: (N, C), the attention's input (the block's ``norm1`` output), in the
            tower's window order.
        cu_seqlens: (segments + 1,) int, the attention segments the block uses (one per image
            frame for a full-attention block, one per window otherwise).
        position_embeddings: the vision ``(cos, sin)`` pair, each (N, head_dim), applied with the
            rotate-half convention of the tower.

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
    q = q * cos + _rotate_half(q) * sin  # as the tower's rotary, kept in fp32
    k = k * cos + _rotate_half(k) * sin
    q, k = q.transpose(0, 1) * attn.scaling, k.transpose(0, 1)  # (H, N, d)
    out = torch.zeros(n, dtype=torch.float32, device=hidden_states.device)
    bounds = cu_seqlens.tolist()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop > start:
            out[start:stop] = attention_received(q[None, :, start:stop], k[None, :, start:stop],
                                                 _SCORE_CHUNK_ELEMENTS)[0]
    return out


def default_score_blocks(visual: nn.Module) -> tuple[int, int]:
    """(local, global) blocks read by the encoder-side selection: as the released code, the first
    full-attention block and the last block (blocks 7 and 31 of the 7B tower)."""
    full = list(getattr(visual, "fullatt_block_indexes", None) or [])
    depth = len(visual.blocks)
    return (full[0] if full else depth // 2), depth - 1


def three_rows(position_ids: torch.Tensor | None, batch: int, start: int, length: int, device) -> torch.Tensor:
    """The (3, B, L) M-RoPE ids the text model uses, from what it was handed.

    ``(4, B, L)`` (text positions prepended) drops its first row, ``(B, L)`` is broadcast to the
    three axes, ``None`` means ``arange`` from ``start`` (the text model's own fallback).
    """
    if position_ids is None:
        pos = torch.arange(start, start + length, device=device)
        return pos.view(1, 1, -1).expand(3, batch, -1)
    if position_ids.dim() == 2:
        return position_ids[None].expand(3, -1, -1)
    if position_ids.shape[0] == 4:
        return position_ids[1:]
    return position_ids


def frame_ids(input_ids: torch.Tensor, token: int, counts: list[int] | None,
              positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat rows of ``token``, their span id from 0): spans of ``counts`` tokens in row-major
    order; without counts, contiguous runs, split where the temporal M-RoPE row changes."""
    is_token = input_ids == token
    rows = is_token.reshape(-1).nonzero().squeeze(1)
    if counts is not None and sum(counts) == rows.numel():
        ids = torch.repeat_interleave(torch.arange(len(counts), device=rows.device),
                                      torch.tensor(counts, device=rows.device))
        return rows, ids
    starts = is_token & ~F.pad(is_token[:, :-1], (1, 0), value=False)
    if positions is not None and positions.dim() == 3 and positions.shape[-1] == input_ids.shape[1]:
        t = positions[-3].to(input_ids.device)  # temporal row of the M-RoPE ids
        starts |= is_token & (t != F.pad(t[:, :-1], (1, 0), value=-1))
    return rows, starts.reshape(-1).long().cumsum(0)[rows] - 1


class Qwen2_5_VLAdapter(Adapter):
    """``Qwen2_5_VLForConditionalGeneration``: image and video-frame spans, gathered M-RoPE positions."""

    name = "qwen2_5_vl"
    window = 4  # side, in merged tokens, of the encoder side's local windows (the released code)

    def model_classes(self) -> tuple[type, ...]:
        from transformers import Qwen2_5_VLForConditionalGeneration
        return (Qwen2_5_VLForConditionalGeneration,)

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head  # the real head (the released code used the tied input embeddings)

    def _merge(self, model) -> int:
        return model.config.vision_config.spatial_merge_size

    def image_runs(self, call: dict, runs: list) -> list:
        """The image-feature calls that computed image (not video) features."""
        return runs

    def image_counts(self, model, call: dict, runs: list) -> list[int] | None:
        precomputed = hf.precomputed_image_features(call)
        if precomputed is not None:
            return [int(f.shape[0]) for f in features_of(precomputed)]
        runs = self.image_runs(call, runs)
        if runs:
            return [int(f.shape[0]) for run in runs for f in features_of(run.output)]
        grid = call.get("image_grid_thw")
        if grid is not None:
            return [t * h * w // self._merge(model) ** 2 for t, h, w in grid.tolist()]
        return None

    def image_map(self, model, call: dict, runs: list, lm_kwargs: dict | None = None) -> torch.Tensor | None:
        """One id per image and per video frame, in sequence order; -1 for text and padding.

        Images come first (ids ``0 .. images - 1``, the order of ``image_grid_thw``), then video
        frames. Sizes come from the image features of this forward (or generate's), else from the
        grids; without either an image is a contiguous run of pad tokens, and a video frame a run
        of video pad tokens with one temporal position.
        """
        input_ids = call.get("input_ids")
        if input_ids is None:
            return None
        cfg = model.config
        merge = self._merge(model)
        out = torch.full(input_ids.shape, -1, dtype=torch.long, device=input_ids.device)
        positions = (lm_kwargs or {}).get("position_ids")
        rows, ids = frame_ids(input_ids, cfg.image_token_id, self.image_counts(model, call, runs), positions)
        n_images = 0
        if rows.numel():
            out.view(-1)[rows] = ids
            n_images = int(ids[-1]) + 1
        video = call.get("video_grid_thw")
        frames = None if video is None else [h * w // merge ** 2 for t, h, w in video.tolist() for _ in range(t)]
        rows, ids = frame_ids(input_ids, cfg.video_token_id, frames, positions)
        if rows.numel():
            out.view(-1)[rows] = ids + n_images
        return out

    def prompt_positions(self, model, lm_kwargs: dict, batch: int, seq_len: int, device) -> torch.Tensor:
        return three_rows(lm_kwargs.get("position_ids"), batch, 0, seq_len, device)

    def step_positions(self, model, lm_kwargs: dict, batch: int, past: int, q: int, device) -> torch.Tensor:
        return three_rows(lm_kwargs.get("position_ids"), batch, past, q, device)

    def positions_after_stage(self, positions: torch.Tensor, src: torch.Tensor, dropped_before: torch.Tensor,
                              valid: torch.Tensor) -> torch.Tensor:
        # SPEC 5 for Qwen2.5-VL: kept tokens keep their 3-D positions (gather, no renumbering).
        kept = positions.gather(2, src[None].expand(positions.shape[0], -1, -1))
        return torch.where(valid[None], kept, torch.zeros_like(kept))

    def decode_positions(self, positions: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return positions  # the model's rope deltas already give the right positions

    def layer_position_ids(self, positions: torch.Tensor) -> None:
        # Layers use position_ids only to detect packed sequences (flash attention); gathered
        # positions have gaps, so layers after a stage get none and rely on the mask.
        return None

    # encoder-side selection (SPEC section 4) -------------------------------------------------
    def supports_encoder_selection(self, model) -> bool:
        return True

    def score_blocks(self, visual: nn.Module) -> tuple[int, int]:
        """(local, global) vision blocks whose attention the encoder side reads."""
        return default_score_blocks(visual)

    def tower_order(self, visual: nn.Module, grid: torch.Tensor) -> torch.Tensor | None:
        """Merged token of the tower's output at each position of its blocks (the window order), or
        ``None`` when the blocks run in output order."""
        return hf.vision_window_index(visual, grid)

    def encoder_probes(self, model) -> dict[str, nn.Module]:
        visual = model.model.visual
        local, global_ = self.score_blocks(visual)
        return {"local": visual.blocks[local], "global": visual.blocks[global_]}

    def encoder_probe(self, model, key, block, args, kwargs) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        cu = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        pe = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[2]
        return vision_column_scores(block.attn, block.norm1(hidden), cu, pe)

    def encoder_select(self, model, call: dict, runs: list, image_map: torch.Tensor, budget, tau: float):
        """Window + global selection per image frame, on the merged grid (videos pass whole)."""
        visual = model.model.visual
        merge = visual.spatial_merge_size
        device = image_map.device
        frames = []  # per run image: list of (local scores, global scores, h, w) per frame
        for run in self.image_runs(call, runs):
            if "local" not in run.maps:
                raise ValueError("encoder_keep needs the image features computed by this pio-enabled model "
                                 "(pixel_values in this call, or generate's own encoding)")
            grid = run.kwargs.get("image_grid_thw")
            local = run.maps["local"].view(-1, merge ** 2).mean(1)
            global_ = run.maps["global"].view(-1, merge ** 2).mean(1)
            order = self.tower_order(visual, grid)
            if order is not None:
                reverse = torch.argsort(order.to(local.device))
                local, global_ = local[reverse], global_[reverse]
            start = 0
            for t, h, w in grid.tolist():
                h, w = h // merge, w // merge
                item = []
                for _ in range(t):
                    item.append((local[start:start + h * w], global_[start:start + h * w], h, w))
                    start += h * w
                frames.append(item)
        image_rows = call["input_ids"].to(device) == model.config.image_token_id  # not video frames
        lm_images = image_map.masked_fill(~image_rows, -1)
        source_of = image_sources(lm_images, len(frames))
        keep = torch.ones_like(image_map, dtype=torch.bool)
        group = torch.full_like(image_map, -1)
        rows = (lm_images.reshape(-1) >= 0).nonzero().squeeze(1)
        by_grid: dict[tuple[int, int], list] = {}
        span = 0
        for item in (frames[j] for j in source_of):
            for local, global_, h, w in item:
                by_grid.setdefault((h, w), []).append((span, local, global_))
                span += 1
        chosen = [None] * span
        for (h, w), group_frames in by_grid.items():
            budgets = torch.tensor([budget(h * w)] * len(group_frames), device=device)
            picked = window_global(torch.stack([f[1] for f in group_frames]).to(device),
                                   torch.stack([f[2] for f in group_frames]).to(device), h, w, budgets, self.window)
            for (s, _, _), p in zip(group_frames, picked):
                chosen[s] = p
        flat_keep = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.bool, device=device)
        flat_group = torch.cat([torch.full((c.numel(),), s, device=device) for s, c in enumerate(chosen)]) \
            if chosen else torch.zeros(0, dtype=torch.long, device=device)
        if flat_keep.numel() != rows.numel():
            raise ValueError(f"the prompt holds {rows.numel()} image tokens; the image features have "
                             f"{flat_keep.numel()}")
        keep.view(-1)[rows] = flat_keep
        group.view(-1)[rows] = flat_group.long()
        return keep, group


register_adapter(Qwen2_5_VLAdapter())
