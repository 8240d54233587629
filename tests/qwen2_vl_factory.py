"""Tiny random-weight Qwen2-VL and Qwen3-VL models for the integration tests (no downloads).

Both families take the inputs of :mod:`qwen2_5_vl_factory` (the same token ids, patch sizes and
``mm_token_type_ids``); Qwen3-VL puts a timestamp before every video frame, which
:func:`make_qwen3_inputs` adds.

``make_qwen2_vl`` builds a stock ``Qwen2VLForConditionalGeneration``: a full-attention vision
tower (no windows), the 2x2 merger, an M-RoPE decoder with an untied head.
``make_qwen3_vl`` builds a stock ``Qwen3VLForConditionalGeneration`` (or, with ``moe=True``,
``Qwen3VLMoeForConditionalGeneration``): a vision tower with learned position embeddings and
DeepStack mergers after ``deepstack`` blocks, and a decoder with q/k norms and interleaved M-RoPE.
"""
from __future__ import annotations

import torch

from qwen2_5_vl_factory import IMAGE, MERGE, PAD, PATCH, TEMPORAL_PATCH, VIDEO, VISION_END, VISION_START, VOCAB
from qwen2_5_vl_factory import make_inputs as make_qwen2_inputs
from qwen2_5_vl_factory import randomise

__all__ = ["make_qwen2_inputs", "make_qwen2_vl", "make_qwen3_inputs", "make_qwen3_vl", "randomise"]


def _set_attention(config, attn: str) -> None:
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn


def _text(layers: int, hidden: int, heads: int, kv_heads: int, **extra) -> dict:
    half = (extra.get("head_dim") or hidden // heads) // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}, **extra)


_TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END, tie_word_embeddings=False)


def make_qwen2_vl(*, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vision_depth: int = 4,
                  attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A stock Qwen2-VL with random weights."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=_text(layers, hidden, heads, kv_heads),
        vision_config=dict(depth=vision_depth, embed_dim=32, hidden_size=hidden, mlp_ratio=2, num_heads=2,
                           patch_size=PATCH, temporal_patch_size=TEMPORAL_PATCH, spatial_merge_size=MERGE),
        **_TOKENS)
    _set_attention(config, attn)
    return randomise(Qwen2VLForConditionalGeneration(config), seed).to(dtype).eval()


def make_qwen3_vl(*, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vision_depth: int = 4,
                  deepstack: tuple[int, ...] = (0, 2, 3), moe: bool = False, attn: str = "sdpa",
                  dtype: torch.dtype = torch.float32, seed: int = 0):
    """A stock Qwen3-VL (``moe``: Qwen3-VL-MoE, 4 experts, 2 per token) with random weights.

    ``deepstack``: the vision blocks whose features the decoder adds after its first
    ``len(deepstack)`` layers."""
    import transformers

    text = _text(layers, hidden, heads, kv_heads, head_dim=hidden // heads)
    text["rope_parameters"]["mrope_interleaved"] = True
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, decoder_sparse_step=1)
    prefix = "Qwen3VLMoe" if moe else "Qwen3VL"
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text,
        vision_config=dict(depth=vision_depth, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=PATCH,
                           temporal_patch_size=TEMPORAL_PATCH, spatial_merge_size=MERGE, out_hidden_size=hidden,
                           num_position_embeddings=16, deepstack_visual_indexes=list(deepstack)),
        **_TOKENS)
    _set_attention(config, attn)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    return randomise(model, seed).to(dtype).eval()


def make_qwen3_inputs(samples: list[list], **kwargs) -> dict[str, torch.Tensor]:
    """:func:`make_qwen2_inputs` in Qwen3-VL's video layout: every frame of a video ``(t, h, w)``
    comes after a timestamp (two text tokens) in its own vision start / end pair, while the video
    keeps one ``(t, h, w)`` grid (frame-major patches, as the processor orders them)."""
    frames, spec = [], []
    for sample in samples:
        out = []
        for seg in sample:
            if isinstance(seg, tuple) and len(seg) == 3:
                out += [x for _ in range(seg[0]) for x in (2, (1, seg[1], seg[2]))]
                frames.append(seg[0])
            else:
                out.append(seg)
        spec.append(out)
    inputs = make_qwen2_inputs(spec, **kwargs)
    if frames:
        grids = inputs["video_grid_thw"].split(frames)
        inputs["video_grid_thw"] = torch.stack([torch.tensor([len(g), *g[0, 1:].tolist()]) for g in grids])
    return inputs
