"""LLaVA-OneVision on stock transformers: LLaVA-NeXT's answers for a SigLIP tower without CLS.

``LlavaOnevisionForConditionalGeneration``: a Qwen2 language model (the fast saliency applies),
1-D positions renumbered after each stage (SPEC 5, the LLaVA rule: the engine's defaults), a
SigLIP vision tower, anyres-max tiling and video frames.

Where the visual tokens are (language-model stages): every image is one span of image
placeholder rows, cut by the per-image token counts of the image features (as LLaVA-NeXT); a
video is one span per frame (the frame's patch grid pooled 2 x 2). The newline tokens the model
puts after every row of an image's high-resolution grid, after a single-crop image and after a
video are rows equal to the model's ``image_newline``: they mark the layout, so they are never
dropped and do not count as visual tokens (budgets, ``last_selection`` and ``last_stats`` leave
them out). Without ``input_ids`` (a call with ``inputs_embeds`` only) video rows are not found
and are kept as text.

Encoder side (SPEC 4; SigLIP towers with ``vision_feature_select_strategy="full"``). SigLIP has
no CLS token, so the CLS attention of SPEC 4 is replaced by the **attention each patch
receives**: the column means of the attention map (over heads and over all queries of the crop),
at the shallow layer (5) and at the layer that produces the feature (``vision_feature_layer``),
computed from that layer's queries and keys in query chunks while the tower runs, never as a
full map (:func:`received_attention`). The maps are laid out as the features are, by the
model's own ``pack_image_features`` (unpadding, and the bilinear downscale of ``anyres_max``
when the high-resolution grid is too large, so a downscaled token's score is the interpolation
of its patches' scores). Each image gives one span for its base crop (the patch grid) and one
for its high-resolution grid (the unpadded crops joined, newline tokens left out); per span,
half the budget is local (the top of the shallow map in every window of a quarter of the patch
grid per side), half global (the top of the deep map), every dropped token is merged into its
most similar kept token of the span, and newline tokens are kept. The budget (int or fraction)
is per span. Videos pass the encoder side whole (their features are not computed through
``get_image_features``); language-model stages select in every frame.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import hf
from ..engine.adapter import register_adapter
from ..engine.encoder import attention_received, image_sources, split_local_global
from .llava import LlavaAdapter, _counts, _placeholders, image_ids, newline_rows

__all__ = ["LlavaOnevisionAdapter", "received_attention"]


def received_attention(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(n, N) fp32: the attention each of the N patches receives at a SigLIP encoder layer, averaged
    over heads and over the N queries (SPEC 4's CLS attention, for a tower without CLS).

    ``layer``: a SigLIP (or CLIP) encoder layer; ``hidden``: (n, N, C), its input. The map is
    ``softmax(q k^T * scale)`` of the layer's own ``layer_norm1``, ``q_proj`` and ``k_proj``,
    reduced over query chunks (:func:`~..engine.encoder.attention_received`).
    """
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    n, tokens, _ = x.shape
    shape = (n, tokens, attn.num_heads, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2).float() * attn.scale
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    return attention_received(q, k)


class LlavaOnevisionAdapter(LlavaAdapter):
    """``LlavaOnevisionForConditionalGeneration``: per-image and per-frame spans, newline tokens kept."""

    name = "llava_onevision"

    def model_classes(self) -> tuple[type, ...]:
        from transformers import LlavaOnevisionForConditionalGeneration
        return (LlavaOnevisionForConditionalGeneration,)

    def image_map(self, model, call: dict, runs: list, lm_kwargs: dict | None = None) -> torch.Tensor | None:
        """One id per image, then one per video frame, in row-major order; -1 for text, padding and
        newline tokens."""
        is_image = _placeholders(model, call)
        if is_image is None:
            return None
        input_ids = call.get("input_ids")
        is_video = torch.zeros_like(is_image) if input_ids is None else input_ids == model.config.video_token_id
        newline = newline_rows(model, (lm_kwargs or {}).get("inputs_embeds"), is_image | is_video)
        out = image_ids(is_image, _counts(call, runs))
        frames = is_video & ~newline
        if bool(frames.any()):
            per_frame = hf.llava_onevision_frame_tokens(model.config)
            first = int(out.max()) + 1
            ids = image_ids(frames, [per_frame] * (int(frames.sum()) // per_frame))
            out = torch.where(frames, ids + first, out)
        return out.masked_fill(newline, -1)

    # encoder-side selection --------------------------------------------------------------
    def supports_encoder_selection(self, model) -> bool:
        config = model.config
        return (type(model.model.vision_tower).__name__ == "SiglipVisionModel"
                and config.vision_feature_select_strategy == "full" and isinstance(config.vision_feature_layer, int))

    def encoder_probe(self, model, key, module, args, kwargs) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        return received_attention(module, hidden)

    def _packed_maps(self, model, run) -> list[torch.Tensor]:
        """Per image of the run: (tokens, 3) [shallow, deep, marker] laid out as its features
        (marker -1 on newline tokens), by the model's own packing."""
        config = model.config
        shallow = run.maps["shallow"]
        maps = torch.stack([shallow, run.maps["deep"], torch.ones_like(shallow)], dim=-1)
        crops = hf.llava_onevision_crops(config, run.kwargs["image_sizes"], run.kwargs.get("batch_num_images"))
        newline = torch.tensor([0.0, 0.0, -1.0], device=maps.device)
        packed, _ = model.model.pack_image_features(
            list(torch.split(maps, crops)), run.kwargs["image_sizes"], image_newline=newline,
            vision_aspect_ratio=run.kwargs.get("vision_aspect_ratio") or config.vision_aspect_ratio)
        return packed

    def encoder_select(self, model, call: dict, runs: list, image_map: torch.Tensor, budget, tau: float):
        config = model.config
        device = image_map.device
        side = config.vision_config.image_size // config.vision_config.patch_size
        window = max(1, round(side / 4))
        packed = []
        for run in runs:
            if "shallow" not in run.maps:
                raise ValueError("encoder_keep needs the image features computed by this pio-enabled model "
                                 "(pixel_values in this call, or generate's own encoding)")
            self._check_call(config, run.kwargs)
            packed += self._packed_maps(model, run)
        is_image = _placeholders(model, call).to(device)
        images = [packed[j].to(device) for j in image_sources(image_map.masked_fill(~is_image, -1), len(packed))]
        rows = is_image.reshape(-1).nonzero().squeeze(1)
        if sum(len(p) for p in images) != rows.numel():
            raise ValueError(f"the prompt holds {rows.numel()} image tokens; the image features have "
                             f"{sum(len(p) for p in images)}")
        spans = []  # (grid, first prompt row of each token, scores (N, 2))
        start = 0
        for p in images:
            image_rows = rows[start:start + len(p)]
            start += len(p)
            spans.append(((side, side), image_rows[:side * side], p[:side * side, :2]))
            high = p[side * side:]
            if len(high) > 1:  # the high-resolution grid: rows of tokens, each ended by a newline
                is_token = high[:, 2] > -0.5
                grid_h = len(high) - int(is_token.sum())
                spans.append(((grid_h, len(high) // grid_h - 1), image_rows[side * side:][is_token], high[is_token, :2]))
        keep = torch.ones_like(image_map, dtype=torch.bool)
        group = torch.full_like(image_map, -1)
        by_grid: dict[tuple[int, int], list[int]] = {}
        for s, (grid, _, _) in enumerate(spans):
            by_grid.setdefault(grid, []).append(s)
        for grid, members in by_grid.items():
            scores = torch.stack([spans[s][2] for s in members])  # (G, N, 2)
            budgets = torch.tensor([budget(grid[0] * grid[1])] * len(members), device=device)
            chosen = split_local_global(scores[..., 0], scores[..., 1], grid, budgets, (window, window))
            for s, kept in zip(members, chosen):
                span_rows = spans[s][1]
                keep.view(-1)[span_rows] = kept
                group.view(-1)[span_rows] = s
        return keep, group


register_adapter(LlavaOnevisionAdapter())
