"""The three VLM shapes the end-to-end benchmark runs, built from configs with random weights.

Timing does not depend on the weights, so nothing is downloaded: each model is built from
a config directly on the target device (in bf16 on a GPU). Three sizes per model:

``full``   the published 7B shapes: LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B, 576 visual
           tokens), LLaVA-NeXT-7B (the same towers, anyres 672x672: 4 crops + base image,
           2928 visual tokens incl. row newlines, the "~2880" of the paper), Qwen2.5-VL-7B
           (1008x1008 image: 72x72 patches merged 2x2 into 1296 visual tokens).
``half``   for CPU figures that mean something: the full 7B widths at about half depth, meant
           for fp32 on a CPU with 24 GiB of memory (about 14 GiB of weights):
           LLaVA-1.5-7B / LLaVA-NeXT-7B: the whole CLIP ViT-L/14-336 tower and 16 of the 32
           Vicuna-7B layers; Qwen2.5-VL-7B: 16 of the 32 vision blocks and 10 of the 28
           language-model layers (14 would need about 16 GiB), at 672x672 (576 visual tokens).
           The output head is tied to the input embeddings (0.5 GiB saved for LLaVA, 2 GiB
           for Qwen; the same shapes and FLOPs). 13.8 GiB (LLaVA) and 12.1 GiB (Qwen) of fp32
           weights.
``tiny``   for CPU runs and CI: the same depth (so the published schedules apply unchanged)
           and the same visual-token counts for LLaVA / LLaVA-NeXT, but widths of a few dozen
           channels and a 4096-token vocabulary; Qwen2.5-VL at 672x672 (576 visual tokens). Figures from it say nothing
           about a GPU and are labelled as such.

``build(name, size, device, dtype)`` returns a :class:`Built`: the model (eval mode, sdpa
attention) and a function that makes a batch of synthetic prompt inputs
``[text prefix] [visual tokens] [question]`` of the length a real prompt has. ``layers`` and
``vision_layers`` override the depth of the language model and of the vision tower (a smoke
test of the ``half`` size on a small machine).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

MODELS = ("llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b")
SIZES = ("full", "half", "tiny")
# Depth of the ``half`` size: (language-model layers, vision layers).
HALF_DEPTH = {"llava-1.5-7b": (16, 24), "llava-next-7b": (16, 24), "qwen2.5-vl-7b": (10, 16)}
_TIED = {"tie_word_embeddings": True}  # the ``half`` size's output head is the input embedding

# Text around the image: LLaVA's system prompt + "USER:" before, question + "ASSISTANT:" after,
# so that the LLaVA-1.5 prompt has the ~640 tokens the SPEC quotes.
_PREFIX_TOKENS, _SUFFIX_TOKENS = 36, 28


@dataclass
class Built:
    name: str
    size: str
    model: torch.nn.Module
    make_inputs: Callable[[int], dict[str, Any]]  # batch -> model kwargs
    visual_tokens: int      # per image, stock model
    seq_len: int            # prompt length, stock model
    num_layers: int
    hidden: int             # d in the SPEC section 6 formula
    mlp: int                # m in the SPEC section 6 formula
    kv_bytes_per_token_layer: int  # K and V of one token in one layer, at the model's dtype


def build(name: str, size: str = "full", device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.bfloat16, seed: int = 0, *, layers: int | None = None,
          vision_layers: int | None = None) -> Built:
    """Builds ``name`` (one of :data:`MODELS`) at ``size`` (``full`` | ``half`` | ``tiny``) on
    ``device``; ``layers`` / ``vision_layers`` (>= 1) replace the size's depths."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {MODELS}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    for label, value in (("layers", layers), ("vision_layers", vision_layers)):
        if value is not None and value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    device = torch.device(device)
    torch.manual_seed(seed)
    if name == "qwen2.5-vl-7b":
        return _build_qwen(size, device, dtype, seed, layers, vision_layers)
    return _build_llava(name, size, device, dtype, seed, layers, vision_layers)


def _instantiate(cls, config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from pio_kernels.integrations import hf

    model = hf.build_model(cls, config, attn_implementation="sdpa", dtype=dtype, device=device)
    model.generation_config.pad_token_id = 0
    return model


def _text_ids(batch: int, length: int, seed: int, vocab_hi: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_hi, (batch, length), generator=g).to(device)


def _llama_text(size: str, vocab: int) -> dict[str, Any]:
    if size in ("full", "half"):  # Vicuna-7B (all 32 layers, or the first 16 with a tied head)
        return dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                    num_hidden_layers=32 if size == "full" else HALF_DEPTH["llava-1.5-7b"][0],
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=vocab,
                    max_position_embeddings=4096, rms_norm_eps=1e-5, **_TIED if size == "half" else {})
    return dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
                max_position_embeddings=4096, rms_norm_eps=1e-5)


def _clip_vision(size: str) -> dict[str, Any]:
    if size in ("full", "half"):  # CLIP ViT-L/14-336
        return dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                    projection_dim=768, hidden_act="quick_gelu")
    return dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                num_attention_heads=2, image_size=336, patch_size=14, projection_dim=32, hidden_act="quick_gelu")


def _build_llava(name: str, size: str, device: torch.device, dtype: torch.dtype, seed: int,
                 layers: int | None, vision_layers: int | None) -> Built:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, \
        LlavaNextForConditionalGeneration

    # The tiny vocabulary is small too: the reference path builds full-vocabulary logits.
    vocab, image_token = (32064, 32000) if size != "tiny" else (4096, 4000)
    text_config, vision_config = _llama_text(size, vocab), _clip_vision(size)
    if layers is not None:
        text_config["num_hidden_layers"] = layers
    if vision_layers is not None:
        vision_config["num_hidden_layers"] = vision_layers
    common = dict(text_config=text_config, vision_config=vision_config,
                  image_token_index=image_token, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu",
                  **_TIED if size == "half" else {})
    grid = 336 // 14
    if name == "llava-1.5-7b":
        config = LlavaConfig(**common, image_seq_length=grid * grid)
        cls = LlavaForConditionalGeneration
        visual = grid * grid
    else:
        config = LlavaNextConfig(**common, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672],
                                                                 [1008, 336], [336, 1008]])
        cls = LlavaNextForConditionalGeneration
        # A 672x672 image: base 24x24 + a 2x2 grid of crops (48x48, no unpadding for a square
        # image) + one newline token per row of the 48x48 grid.
        visual = grid * grid + (2 * grid) ** 2 + 2 * grid
    model = _instantiate(cls, config, device, dtype)
    text = config.text_config
    seq_len = _PREFIX_TOKENS + visual + _SUFFIX_TOKENS

    def make_inputs(batch: int) -> dict[str, Any]:
        prefix = _text_ids(batch, _PREFIX_TOKENS, seed, image_token - 1, device)
        suffix = _text_ids(batch, _SUFFIX_TOKENS, seed + 1, image_token - 1, device)
        prefix[:, 0] = 1  # BOS
        image = torch.full((batch, visual), image_token, dtype=torch.long, device=device)
        input_ids = torch.cat([prefix, image, suffix], dim=1)
        g = torch.Generator().manual_seed(seed + 2)
        if name == "llava-1.5-7b":
            pixels = torch.randn(batch, 3, 336, 336, generator=g)
            extra: dict[str, Any] = {}
        else:
            pixels = torch.randn(batch, 5, 3, 336, 336, generator=g)
            extra = {"image_sizes": torch.tensor([[672, 672]] * batch, device=device)}
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": pixels.to(device=device, dtype=dtype), **extra}

    return Built(name, size, model, make_inputs, visual, seq_len, text.num_hidden_layers, text.hidden_size,
                 text.intermediate_size, _kv_bytes(text, dtype))


def _build_qwen(size: str, device: torch.device, dtype: torch.dtype, seed: int, layers: int | None,
                vision_layers: int | None) -> Built:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if size in ("full", "half"):
        half = size == "half"
        text_layers, depth = HALF_DEPTH["qwen2.5-vl-7b"] if half else (28, 32)
        text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=text_layers, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": [16, 24, 24]}, **_TIED if half else {})
        vision = dict(depth=depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
        side = 672 if half else 1008
    else:
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=28, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=4096, max_position_embeddings=128000, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
        vision = dict(depth=8, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[3, 7], tokens_per_second=2)
        side = 672
    if layers is not None:
        text["num_hidden_layers"] = layers
    if vision_layers is not None:
        vision["depth"] = vision_layers
    # Full-attention blocks every 8th (every 4th in the tiny tower), as many as the depth holds.
    vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision["depth"]] \
        or [vision["depth"] - 1]
    first = 151652 if size != "tiny" else 4000  # vision start, end, image, video
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vision_start_token_id=first,
                              vision_end_token_id=first + 1, image_token_id=first + 3, video_token_id=first + 4,
                              **_TIED if size == "half" else {})
    model = _instantiate(Qwen2_5_VLForConditionalGeneration, config, device, dtype)
    patches = side // 14
    visual = (patches // 2) ** 2
    patch_dim = 3 * 2 * 14 * 14
    takes_token_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
    seq_len = _PREFIX_TOKENS + 2 + visual + _SUFFIX_TOKENS

    def make_inputs(batch: int) -> dict[str, Any]:
        prefix = _text_ids(batch, _PREFIX_TOKENS, seed, first - 1, device)
        suffix = _text_ids(batch, _SUFFIX_TOKENS, seed + 1, first - 1, device)
        start = torch.full((batch, 1), config.vision_start_token_id, device=device)
        end = torch.full((batch, 1), config.vision_end_token_id, device=device)
        image = torch.full((batch, visual), config.image_token_id, device=device)
        input_ids = torch.cat([prefix, start, image, end, suffix], dim=1)
        g = torch.Generator().manual_seed(seed + 2)
        pixels = torch.randn(batch * patches * patches, patch_dim, generator=g)
        out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
               "pixel_values": pixels.to(device=device, dtype=dtype),
               "image_grid_thw": torch.tensor([[1, patches, patches]] * batch, device=device)}
        if takes_token_types:  # newer transformers need it for 3-D positions (else silently 1-D)
            out["mm_token_type_ids"] = (input_ids == config.image_token_id).long()
        return out

    tc = config.text_config
    return Built("qwen2.5-vl-7b", size, model, make_inputs, visual, seq_len, tc.num_hidden_layers, tc.hidden_size,
                 tc.intermediate_size, _kv_bytes(tc, dtype))


def _kv_bytes(text_config, dtype: torch.dtype) -> int:
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return 2 * text_config.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size()
