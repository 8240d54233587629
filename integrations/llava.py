"""LLaVA-1.5 and LLaVA-NeXT on stock transformers: the model-specific answers for the engine.

Where the images are: runs of ``config.image_token_id`` in ``input_ids``, cut into images by
the per-image token counts the model's ``get_image_features`` produced in the same forward
(LLaVA-NeXT's anyres packing gives every image its own count, newline tokens included).
Positions: 1-D, renumbered after each stage; decoding positions shifted by the tokens
dropped so far (SPEC section 5, as the released LLaVA code) -- the engine's defaults.
"""
from __future__ import annotations

import torch
from torch import nn

from .engine import Adapter, register_adapter

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


register_adapter(LlavaAdapter())
