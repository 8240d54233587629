"""Tiny random-weight LLaVA-1.5 models and their inputs for the integration tests (no downloads).

``make_llava``: a CLIP tower of 4 x 4 patches and a small Llama; ``make_llava_encoder``: an 8 x 8
patch grid and a 9-layer tower (encoder-side selection reads layer 5). ``prompt`` lays out text
and image placeholders; ``pad`` pads rows left or right into ``input_ids`` and a mask.
"""
from __future__ import annotations

import torch

IMAGE = 99
VOCAB = 100


def _build(vision: dict, layers: int, attn: str, dtype, seed: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    text = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=text, image_token_id=IMAGE,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval().to(dtype)


def make_llava(layers: int = 4, attn: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """LLaVA-1.5 in miniature: 16 visual tokens per image."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=28, patch_size=7)
    return _build(vision, layers, attn, dtype, seed)


def make_llava_encoder(attn: str = "sdpa", layers: int = 4, dtype=torch.float32, seed: int = 0):
    """LLaVA-1.5 with a tower deep enough for encoder-side selection: 64 visual tokens per image."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=9, num_attention_heads=4,
                  image_size=56, patch_size=7)
    return _build(vision, layers, attn, dtype, seed)


def prompt(text_before: list[int], images: int, text_after: list[int], between=(7, 8), tokens: int = 16) -> list[int]:
    """Token ids: text, then ``images`` runs of ``tokens`` placeholders (``between`` apart), then text."""
    ids = list(text_before)
    for i in range(images):
        if i:
            ids += list(between)
        ids += [IMAGE] * tokens
    return ids + list(text_after)


def pixels(n: int, seed: int = 1, dtype=torch.float32, size: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(dtype)


def pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``rows`` padded with 0 on ``side``."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    return ids, mask


def eager_tower_attentions(model, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The full attention maps of every layer of the model's vision tower, run eager."""
    from pio_kernels.integrations import hf

    tower = model.model.vision_tower
    with hf.attention_implementation_as(tower.config, "eager"), torch.no_grad():
        return tower(pixels, output_attentions=True, return_dict=True).attentions

