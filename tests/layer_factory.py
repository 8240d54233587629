"""Tiny random-weight decoder layers for the saliency tests (no downloads).

``make_stage(family, ...)`` returns what ``proxy_saliency`` takes: the layer, the
model's final norm and head, and a function that turns position ids into the
``(cos, sin)`` pair the model hands its layers. Families: ``llama`` (MHA, no bias),
``qwen2`` (GQA, qkv bias), ``qwen2_5_vl`` (GQA, qkv bias, M-RoPE from 3-D positions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

FAMILIES = ("llama", "qwen2", "qwen2_5_vl")


@dataclass
class Stage:
    layer: nn.Module
    final_norm: nn.Module
    lm_head: nn.Linear
    rope: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    hidden_size: int
    vocab_size: int


def _config(family: str, hidden: int, heads: int, kv_heads: int, mlp: int, vocab: int, attn: str):
    common = dict(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, vocab_size=vocab, num_hidden_layers=1, rms_norm_eps=1e-6)
    if family == "llama":
        from transformers import LlamaConfig
        cfg = LlamaConfig(**common)
    elif family == "qwen2":
        from transformers import Qwen2Config
        cfg = Qwen2Config(**common)
    elif family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
        half = hidden // heads // 2
        section = [half - 2 * (half // 3), half // 3, half // 3]
        cfg = Qwen2_5_VLTextConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": section})
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    cfg._attn_implementation = attn
    return cfg


def make_stage(family: str, *, hidden: int = 64, heads: int = 4, kv_heads: int | None = None, mlp: int = 96,
               vocab: int = 80, dtype: torch.dtype = torch.float32, seed: int = 0, attn: str = "sdpa",
               device: str | torch.device = "cpu") -> Stage:
    """A decoder layer, final norm, head and rotary function with random weights."""
    if kv_heads is None:
        kv_heads = heads if family == "llama" else max(1, heads // 2)
    cfg = _config(family, hidden, heads, kv_heads, mlp, vocab, attn)
    torch.manual_seed(seed)
    if family == "llama":
        from transformers.models.llama import modeling_llama as m
        layer, norm, rotary = m.LlamaDecoderLayer(cfg, 0), m.LlamaRMSNorm(hidden, cfg.rms_norm_eps), \
            m.LlamaRotaryEmbedding(cfg)
    elif family == "qwen2":
        from transformers.models.qwen2 import modeling_qwen2 as m
        layer, norm, rotary = m.Qwen2DecoderLayer(cfg, 0), m.Qwen2RMSNorm(hidden, cfg.rms_norm_eps), \
            m.Qwen2RotaryEmbedding(cfg)
    else:
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m
        layer, norm, rotary = m.Qwen2_5_VLDecoderLayer(cfg, 0), m.Qwen2_5_VLRMSNorm(hidden, cfg.rms_norm_eps), \
            m.Qwen2_5_VLRotaryEmbedding(cfg)
    head = nn.Linear(hidden, vocab, bias=False)
    # Random norm gains and biases, so a path that ignores them cannot pass.
    with torch.no_grad():
        for module in (layer, norm):
            for name, p in module.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)
                elif p.dim() == 1:
                    p.uniform_(0.5, 1.5)
    layer, norm, head = (mod.to(device=device, dtype=dtype).eval() for mod in (layer, norm, head))
    rotary = rotary.to(device)

    def rope(hidden_states: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (B, S), or (3, B, S) for M-RoPE (a (B, S) input is broadcast)."""
        return rotary(hidden_states, position_ids)

    return Stage(layer, norm, head, rope, hidden, vocab)


def padded_batch(lengths: list[int], seq_len: int, side: str) -> torch.Tensor:
    """(B, S) attention mask with the given valid lengths, padded on ``side`` ('left'/'right')."""
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, seq_len - n:] = 1
        else:
            mask[b, :n] = 1
    return mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (what the models build for padded batches)."""
    return (mask.long().cumsum(dim=1) - 1).clamp_min(0)


def mrope_positions(mask: torch.Tensor, image_span: tuple[int, int] | None = None, grid_w: int = 4) -> torch.Tensor:
    """(3, B, S) M-RoPE positions: text tokens share t/h/w; an image span gets a 2-D grid."""
    pos = positions_from_mask(mask)
    out = pos[None].repeat(3, 1, 1)
    if image_span is not None:
        start, stop = image_span
        idx = torch.arange(stop - start)
        out[1, :, start:stop] = out[0, :, start:start + 1] + idx // grid_w
        out[2, :, start:stop] = out[0, :, start:start + 1] + idx % grid_w
    return out
