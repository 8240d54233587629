"""LLaVA-1.5 and LLaVA-NeXT on stock transformers: the model-specific answers for the engine.

Where the images are: runs of ``config.image_token_id`` in ``input_ids`` (or, with
``inputs_embeds``, rows equal to that token's embedding, as the model itself finds them), cut
into images by the per-image token counts of the image features (LLaVA-NeXT's anyres packing
gives every image its own count, newline tokens included).
LLaVA-NeXT's newline tokens (rows equal to ``image_newline``) mark the layout: no stage drops
them, and they do not count as visual tokens. Positions: 1-D, renumbered after each stage; decoding positions shifted by the tokens dropped
so far (SPEC section 5, as the released LLaVA code): the engine's defaults.

Encoder-side selection (CLIP towers with a CLS token; SPEC section 4): the CLS row of the
attention of encoder layer 5 (the shallow map) and of the layer that produces the feature
(``vision_feature_layer``, -2: the deep map), averaged over heads, computed from that layer's
own queries and keys while the tower runs (so any attention implementation works and no full
map is built). Windows are a quarter of the patch grid per side (6 x 6 on LLaVA-1.5's 24 x 24,
16 windows). The shallow layer is capped at the tower's last layer.
LLaVA-NeXT: the same per crop (the base image and every anyres crop), over the tokens of that
crop that survive unpadding; the budget (int or fraction) is per crop, newline tokens are
always kept, and merging stays inside a crop. Which crop and patch each packed token comes
from is traced by packing an index tensor with the model's own ``pack_image_features``.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import hf
from ..engine.adapter import Adapter, features_of, register_adapter
from ..engine.encoder import image_sources, split_local_global

__all__ = ["LlavaAdapter", "cls_attention"]


def _placeholders(model, call: dict) -> torch.Tensor | None:
    """(B, S) bool: the image placeholder rows of the call."""
    token = model.config.image_token_id
    input_ids = call.get("input_ids")
    if input_ids is not None:
        return input_ids == token
    embeds = call.get("inputs_embeds")
    if embeds is None:
        return None
    table = model.get_input_embeddings()
    placeholder = table(torch.tensor(token, device=embeds.device)).to(embeds.dtype)
    return (embeds == placeholder).all(-1)


def _counts(call: dict, runs: list) -> list[int] | None:
    """Tokens of every image, in prompt order: from the features generate handed over (already
    expanded for beams), else from the image-feature calls of this forward."""
    precomputed = hf.precomputed_image_features(call)
    if precomputed is not None:
        return [int(f.shape[0]) for f in features_of(precomputed)]
    if runs:
        return [int(f.shape[0]) for run in runs for f in features_of(run.output)]
    return None


def newline_rows(model, embeds: torch.Tensor | None, placeholders: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: placeholder rows whose features are the model's newline token (LLaVA-NeXT,
    LLaVA-OneVision). They mark the 2-D layout: stages never drop them, and they do not count as
    visual tokens. ``embeds``: the language model's input, features in place."""
    newline = getattr(model.model, "image_newline", None)
    if embeds is None or newline is None:
        return torch.zeros_like(placeholders)
    return placeholders & (embeds == newline.to(embeds.device, embeds.dtype)).all(-1).to(placeholders.device)


def image_ids(is_image: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
    """(B, S) image id of every placeholder row, -1 elsewhere: images fill the placeholders in
    row-major order with ``counts`` tokens each; without counts (or when they do not add up),
    every contiguous run of placeholders is one image."""
    out = torch.full(is_image.shape, -1, dtype=torch.long, device=is_image.device)
    flat = is_image.reshape(-1)
    total = int(flat.sum())
    if total == 0:
        return out
    if counts is not None and sum(counts) == total:
        ids = torch.repeat_interleave(torch.arange(len(counts), device=out.device),
                                      torch.tensor(counts, device=out.device))
    else:
        starts = is_image & ~torch.nn.functional.pad(is_image[:, :-1], (1, 0), value=False)
        ids = starts.reshape(-1).long().cumsum(0)[flat] - 1
    out.view(-1)[flat] = ids
    return out


class LlavaAdapter(Adapter):
    name = "llava"
    shallow_layer = 5

    def model_classes(self) -> tuple[type, ...]:
        from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
        return (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)

    def image_map(self, model, call: dict, runs: list, lm_kwargs: dict | None = None) -> torch.Tensor | None:
        is_image = _placeholders(model, call)
        if is_image is None:
            return None
        newline = newline_rows(model, (lm_kwargs or {}).get("inputs_embeds"), is_image)
        return image_ids(is_image, _counts(call, runs)).masked_fill(newline, -1)

    # encoder-side selection --------------------------------------------------------------
    def supports_encoder_selection(self, model) -> bool:
        config = model.config
        return (type(model.model.vision_tower).__name__ == "CLIPVisionModel"
                and config.vision_feature_select_strategy == "default"
                and isinstance(config.vision_feature_layer, int) and config.vision_feature_layer != 0)

    @staticmethod
    def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
        inner = getattr(tower, "vision_model", tower)  # older transformers nest a vision_model
        return inner.encoder.layers

    def encoder_probes(self, model) -> dict[str, nn.Module]:
        layers = self._encoder_layers(model.model.vision_tower)
        feature = model.config.vision_feature_layer
        deep = len(layers) + feature if feature < 0 else feature - 1  # the layer whose output is the feature
        shallow = min(self.shallow_layer, len(layers) - 1)
        return {"shallow": layers[shallow], "deep": layers[deep]}

    def encoder_probe(self, model, key, module, args, kwargs) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        return cls_attention(module, hidden)

    def encoder_select(self, model, call: dict, runs: list, image_map: torch.Tensor, budget, tau: float):
        config = model.config
        device = image_map.device
        visual = image_map.reshape(-1) >= 0
        rows = visual.nonzero().squeeze(1)
        keep = torch.ones_like(image_map, dtype=torch.bool)
        group = torch.full_like(image_map, -1)
        sources, shallow, deep = [], [], []
        crop_offset = 0
        for run in runs:
            if "shallow" not in run.maps:
                raise ValueError("encoder_keep needs the image features computed by this pio-enabled model "
                                 "(pixel_values in this call, or generate's own encoding)")
            self._check_call(config, run.kwargs)
            for src in self._token_sources(model, run):
                sources.append(torch.where(src >= 0, src + crop_offset * self._patches(config), src))
            crop_offset += run.maps["shallow"].shape[0]
            shallow.append(run.maps["shallow"])
            deep.append(run.maps["deep"])
        if not sources:
            raise ValueError("encoder_keep needs pixel_values (or generate's encoded images) with the prompt's images")
        source_of = image_sources(image_map, len(sources))
        src = torch.cat([sources[j] for j in source_of]).to(device)
        src = src[src >= 0]  # newline tokens are not in the image map: never dropped, never merged
        if src.numel() != rows.numel():
            raise ValueError(f"the prompt holds {rows.numel()} image tokens; the image features have {src.numel()}")
        patches = self._patches(config)
        shallow, deep = torch.cat(shallow).to(device), torch.cat(deep).to(device)
        is_patch = src >= 0
        lm_image = image_map.reshape(-1)[rows]
        span_key = torch.where(is_patch, lm_image * (crop_offset + 1) + src // patches, torch.full_like(src, -1))
        spans, span = torch.unique(span_key[is_patch], return_inverse=True)
        crop = src[is_patch] // patches
        patch = src[is_patch] % patches
        n_spans = spans.numel()
        available = torch.zeros(n_spans, patches, dtype=torch.bool, device=device)
        available[span, patch] = True
        span_crop = torch.zeros(n_spans, dtype=torch.long, device=device)
        span_crop[span] = crop
        sizes = available.sum(1).tolist()  # the span sizes: the one read-back
        budgets = torch.tensor([budget(n) for n in sizes], device=device)
        grid = config.vision_config.image_size // config.vision_config.patch_size
        side = max(1, round(grid / 4))
        chosen = split_local_global(shallow[span_crop], deep[span_crop], (grid, grid), budgets, (side, side),
                                    available)
        kept_rows = torch.ones(rows.numel(), dtype=torch.bool, device=device)
        kept_rows[is_patch] = chosen[span, patch]
        row_group = torch.full_like(src, -1)
        row_group[is_patch] = span
        keep.view(-1)[rows] = kept_rows
        group.view(-1)[rows] = row_group
        return keep, group

    @staticmethod
    def _patches(config) -> int:
        return (config.vision_config.image_size // config.vision_config.patch_size) ** 2

    @staticmethod
    def _check_call(config, kwargs: dict) -> None:
        layer = kwargs.get("vision_feature_layer")
        strategy = kwargs.get("vision_feature_select_strategy")
        if (layer is not None and layer != config.vision_feature_layer) or strategy not in (
                None, config.vision_feature_select_strategy):
            raise ValueError("encoder_keep reads the vision tower at the config's vision_feature_layer and "
                             f"strategy; this call asks for {layer!r} and {strategy!r}")

    def _token_sources(self, model, run) -> list[torch.Tensor]:
        """Per image of the run: for every feature token, ``crop * patches + patch`` within the run
        (crops numbered over the run's images), or -1 for a LLaVA-NeXT newline token."""
        config = model.config
        patches = self._patches(config)
        crops_total = run.maps["shallow"].shape[0]
        mm = model.model
        if not hasattr(mm, "pack_image_features"):  # LLaVA-1.5: one crop per image, placed as is
            return [torch.arange(i * patches, (i + 1) * patches) for i in range(crops_total)]
        crops = hf.llava_next_crops(config, run.kwargs["image_sizes"])
        index = torch.arange(crops_total * patches, dtype=torch.float64, device=run.maps["shallow"].device)
        packed, _ = mm.pack_image_features(torch.split(index.view(crops_total, patches, 1), crops),
                                           run.kwargs["image_sizes"], config.vision_feature_select_strategy,
                                           image_newline=torch.tensor([-1.0], dtype=torch.float64,
                                                                      device=index.device))
        return [p[:, 0].long() for p in packed]


def cls_attention(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(n, N) fp32 attention of the CLS query to the N patch tokens, mean over heads.

    ``layer``: a CLIP encoder layer; ``hidden``: (n, 1 + N, C), its input. Only the CLS row
    of ``softmax(q k^T * scale)`` is computed, from the layer's own ``layer_norm1``,
    ``q_proj`` and ``k_proj`` (SPEC 4).
    """
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    n, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(x[:, :1]).view(n, 1, heads, head_dim).transpose(1, 2).float()
    k = attn.k_proj(x).view(n, tokens, heads, head_dim).transpose(1, 2).float()
    probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)  # (n, heads, 1, 1 + N)
    return probs.mean(dim=1)[:, 0, 1:]


register_adapter(LlavaAdapter())
