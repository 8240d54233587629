"""LLaVA-1.5 and LLaVA-NeXT on stock transformers: the model-specific answers for the engine.

Where the images are: runs of ``config.image_token_id`` in ``input_ids``, cut into images by
the per-image token counts the model's ``get_image_features`` produced in the same forward
(LLaVA-NeXT's anyres packing gives every image its own count, newline tokens included).
Positions: 1-D, renumbered after each stage; decoding positions shifted by the tokens
dropped so far (SPEC section 5, as the released LLaVA code) -- the engine's defaults.

Encoder-side selection (LLaVA-1.5, CLIP towers with a CLS token; SPEC section 4): the
CLS row of the attention of encoder layer 5 (the shallow map) and of the layer that
produces the feature (``vision_feature_layer``, -2: the deep map), averaged over heads,
computed from that layer's own queries and keys (so any attention implementation works
and no full map is built). Windows are a quarter of the patch grid per side (6 x 6 on
LLaVA-1.5's 24 x 24, 16 windows). The shallow layer is capped at the tower's last layer.
LLaVA-NeXT: the same per crop (the base image and every anyres crop), over the tokens of
that crop that survive unpadding; the budget (int or fraction) is per crop, newline tokens
are always kept, and merging stays inside a crop. Token positions in the packed sequence
are traced by packing an index tensor with the model's own ``pack_image_features``.
"""
from __future__ import annotations

import torch
from torch import nn

from .engine import Adapter, merge_dropped, register_adapter, resolve_budget, split_local_global

__all__ = ["LlavaAdapter"]


class LlavaAdapter(Adapter):
    name = "llava"

    def model_classes(self) -> tuple[type, ...]:
        from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
        return (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)

    def multimodal_module(self, model: nn.Module) -> nn.Module:
        return model.model

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def image_feature_function(self, model):
        return model.model, "get_image_features"

    def on_image_features(self, model, call: dict, output) -> None:
        features = output.pooler_output if hasattr(output, "pooler_output") else output
        call["_image_token_counts"] = [int(f.shape[0]) for f in features]

    def image_map(self, model, call: dict, lm_kwargs: dict, seq_len: int) -> torch.Tensor | None:
        input_ids = call.get("input_ids")
        if input_ids is None:
            return None
        is_image = input_ids == model.config.image_token_id
        image_map = torch.full(input_ids.shape, -1, dtype=torch.long, device=input_ids.device)
        total = int(is_image.sum())
        if total == 0:
            return image_map
        counts = call.get("_image_token_counts")
        precomputed = (call.get("mm_encoder_outputs") or {}).get("image")
        if precomputed is not None:  # generate encodes the images before the prefill forward
            counts = [int(f.shape[0]) for f in precomputed.pooler_output]
        flat = is_image.flatten()
        if counts is not None and sum(counts) == total:
            # image features fill the placeholders in row-major order, one image after another
            ids = torch.repeat_interleave(torch.arange(len(counts), device=input_ids.device),
                                          torch.tensor(counts, device=input_ids.device))
        else:
            # unknown counts: every contiguous run of placeholders is one image
            starts = is_image & ~torch.nn.functional.pad(is_image[:, :-1], (1, 0), value=False)
            ids = starts.flatten().long().cumsum(0)[flat] - 1
        out = image_map.flatten()
        out[flat] = ids
        return out.view(input_ids.shape)


    # encoder-side selection --------------------------------------------------------------
    shallow_layer = 5

    def supports_encoder_selection(self, model) -> bool:
        config = model.config
        return (type(model.model.vision_tower).__name__ == "CLIPVisionModel"
                and config.vision_feature_select_strategy == "default"
                and isinstance(config.vision_feature_layer, int) and config.vision_feature_layer != 0)

    @staticmethod
    def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
        inner = getattr(tower, "vision_model", tower)  # older transformers nest a vision_model
        return inner.encoder.layers

    def reduce_encoder_features(self, model, call: dict, budget, tau: float):
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        mm, config = model.model, model.config
        layer_idx = call.get("vision_feature_layer")
        layer_idx = config.vision_feature_layer if layer_idx is None else layer_idx
        strategy = call.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if strategy != "default" or not isinstance(layer_idx, int):
            raise ValueError("encoder_keep needs vision_feature_select_strategy='default' and one int "
                             f"vision_feature_layer, got {strategy!r} and {layer_idx!r}")
        pixel_values = call["pixel_values"]
        crops = None
        if hasattr(mm, "pack_image_features"):  # LLaVA-NeXT: the crops of every image, flattened
            crops = self._crops_per_image(config, call["image_sizes"])
            if pixel_values.dim() == 5:
                pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, crops)], dim=0)
        tower = mm.vision_tower
        hidden = tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = self._encoder_layers(tower)
        deep = len(layers) + layer_idx if layer_idx < 0 else layer_idx - 1  # layer whose output is the feature
        shallow = min(self.shallow_layer, len(layers) - 1)
        shallow_map = cls_attention(layers[shallow], hidden[shallow])  # (crops, P)
        deep_map = cls_attention(layers[deep], hidden[deep])
        features = mm.multi_modal_projector(hidden[layer_idx][:, 1:])  # (crops, P, D)
        grid = config.vision_config.image_size // config.vision_config.patch_size
        side = max(1, round(grid / 4))
        crops_p, patches = features.shape[:2]
        if crops is None:  # LLaVA-1.5: one crop per image, placed as is
            sources = [torch.arange(i * patches, (i + 1) * patches, device=features.device) for i in range(crops_p)]
            packed = list(features)
        else:  # pack the crops as the model does, and the same way the index of every token
            index = torch.arange(crops_p * patches, dtype=torch.float64, device=features.device)
            packed_index, _ = mm.pack_image_features(
                torch.split(index.view(crops_p, patches, 1), crops), call["image_sizes"], strategy,
                image_newline=torch.tensor([-1.0], dtype=torch.float64, device=features.device))
            packed, _ = mm.pack_image_features(torch.split(features, crops), call["image_sizes"], strategy,
                                               image_newline=mm.image_newline)
            sources = [p[:, 0].long() for p in packed_index]
        out, kept_all = [], []
        for feats, src in zip(packed, sources):
            keep = src < 0  # LLaVA-NeXT's newline tokens stay
            merged = feats.clone()
            for crop in torch.unique(src[src >= 0] // patches).tolist():
                rows = ((src >= 0) & (src // patches == crop)).nonzero().flatten()
                available = torch.zeros(patches, dtype=torch.bool, device=feats.device)
                available[src[rows] % patches] = True
                chosen = split_local_global(shallow_map[crop], deep_map[crop], (grid, grid),
                                            resolve_budget(budget, rows.numel()), (side, side), available)
                local = torch.searchsorted(src[rows] % patches, chosen)  # rows ascend with patch index
                keep[rows[local]] = True
                merged[rows[local]] = merge_dropped(feats[rows], local)
            kept = keep.nonzero().flatten()
            out.append(merged[kept])
            kept_all.append(kept)
        counts = [int(s.numel()) for s in sources]
        return BaseModelOutputWithPooling(pooler_output=out), kept_all, counts

    @staticmethod
    def _crops_per_image(config, image_sizes) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        return [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                          patch_size=config.vision_config.image_size) for size in image_sizes]


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
