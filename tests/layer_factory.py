"""Tiny random-weight decoder layers for the saliency tests (no downloads).

``make_stage(family, ...)`` returns what ``proxy_saliency`` takes: the layer, the
model's final norm and head, and a function that turns position ids into the
``(cos, sin)`` pair the model hands its layers. Families (the stock transformers classes):

- ``llama``: ``LlamaDecoderLayer``, MHA, no bias, SwiGLU;
- ``llama_geglu``: the same layer with a GELU(tanh) gated MLP (GeGLU);
- ``qwen2``: ``Qwen2DecoderLayer``, GQA, qkv bias;
- ``qwen2_5_vl``: ``Qwen2_5_VLDecoderLayer``, GQA, qkv bias, M-RoPE from 3-D positions;
- ``qwen3``: ``Qwen3DecoderLayer``, GQA, per-head q/k RMSNorms, q/k/v/o biases, and
  ``head_dim`` wider than ``hidden / heads`` (as Qwen3-0.6B);
- ``qwen3_moe``: ``Qwen3MoeDecoderLayer`` with its sparse MoE block (4 experts, top 2);
- ``qwen3_vl``: ``Qwen3VLTextDecoderLayer``, q/k norms, interleaved M-RoPE;
- ``qwen3_vl_moe``: ``Qwen3VLMoeTextDecoderLayer``, q/k norms, interleaved M-RoPE, sparse MoE.

``MROPE_FAMILIES`` take (3, B, S) position ids (``mrope_positions``); the others (B, S).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

FAMILIES = ("llama", "llama_geglu", "qwen2", "qwen2_5_vl", "qwen3", "qwen3_moe", "qwen3_vl", "qwen3_vl_moe")
MROPE_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
QWEN3_FAMILIES = ("qwen3", "qwen3_moe", "qwen3_vl", "qwen3_vl_moe")
MOE_FAMILIES = ("qwen3_moe", "qwen3_vl_moe")


@dataclass
class Stage:
    layer: nn.Module
    final_norm: nn.Module
    lm_head: nn.Linear
    rope: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    hidden_size: int
    vocab_size: int
    head_dim: int


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    return [half - 2 * (half // 3), half // 3, half // 3]


def _config(family: str, hidden: int, heads: int, kv_heads: int, mlp: int, vocab: int, attn: str, head_dim: int):
    common = dict(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, vocab_size=vocab, num_hidden_layers=1, rms_norm_eps=1e-6)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=max(8, mlp // 3), decoder_sparse_step=1,
               mlp_only_layers=[])
    if family in ("llama", "llama_geglu"):
        from transformers import LlamaConfig
        cfg = LlamaConfig(**common, hidden_act="silu" if family == "llama" else "gelu_pytorch_tanh")
    elif family == "qwen2":
        from transformers import Qwen2Config
        cfg = Qwen2Config(**common)
    elif family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
        cfg = Qwen2_5_VLTextConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": _mrope_section(hidden // heads)})
    elif family == "qwen3":
        from transformers import Qwen3Config
        cfg = Qwen3Config(**common, head_dim=head_dim, attention_bias=True)
    elif family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        cfg = Qwen3MoeConfig(**common, **moe, head_dim=head_dim, norm_topk_prob=True, bos_token_id=None,
                             eos_token_id=None)
    elif family in ("qwen3_vl", "qwen3_vl_moe"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim),
                "mrope_interleaved": True}
        if family == "qwen3_vl":
            from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
            cfg = Qwen3VLTextConfig(**common, head_dim=head_dim, rope_parameters=rope)
        else:
            from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
            cfg = Qwen3VLMoeTextConfig(**common, **moe, head_dim=head_dim, rope_parameters=rope)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    cfg._attn_implementation = attn
    return cfg


def _modules(family: str, cfg, hidden: int):
    """(decoder layer, final norm, rotary embedding) of the family's stock classes."""
    eps = cfg.rms_norm_eps
    if family in ("llama", "llama_geglu"):
        from transformers.models.llama import modeling_llama as m
        return m.LlamaDecoderLayer(cfg, 0), m.LlamaRMSNorm(hidden, eps), m.LlamaRotaryEmbedding(cfg)
    if family == "qwen2":
        from transformers.models.qwen2 import modeling_qwen2 as m
        return m.Qwen2DecoderLayer(cfg, 0), m.Qwen2RMSNorm(hidden, eps), m.Qwen2RotaryEmbedding(cfg)
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m
        return m.Qwen2_5_VLDecoderLayer(cfg, 0), m.Qwen2_5_VLRMSNorm(hidden, eps), m.Qwen2_5_VLRotaryEmbedding(cfg)
    if family == "qwen3":
        from transformers.models.qwen3 import modeling_qwen3 as m
        return m.Qwen3DecoderLayer(cfg, 0), m.Qwen3RMSNorm(hidden, eps), m.Qwen3RotaryEmbedding(cfg)
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe import modeling_qwen3_moe as m
        return m.Qwen3MoeDecoderLayer(cfg, 0), m.Qwen3MoeRMSNorm(hidden, eps), m.Qwen3MoeRotaryEmbedding(cfg)
    if family == "qwen3_vl":
        from transformers.models.qwen3_vl import modeling_qwen3_vl as m
        return m.Qwen3VLTextDecoderLayer(cfg, 0), m.Qwen3VLTextRMSNorm(hidden, eps), m.Qwen3VLTextRotaryEmbedding(cfg)
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as m
    return (m.Qwen3VLMoeTextDecoderLayer(cfg, 0), m.Qwen3VLMoeTextRMSNorm(hidden, eps),
            m.Qwen3VLMoeTextRotaryEmbedding(cfg))


def make_stage(family: str, *, hidden: int = 64, heads: int = 4, kv_heads: int | None = None, mlp: int = 96,
               vocab: int = 80, dtype: torch.dtype = torch.float32, seed: int = 0, attn: str = "sdpa",
               device: str | torch.device = "cpu", head_dim: int | None = None) -> Stage:
    """A decoder layer, final norm, head and rotary function with random weights.

    ``head_dim`` is used by the Qwen3 families only (default: ``hidden // heads``, but
    ``qwen3`` defaults to 1.5x that, a multiple of 4); the others have ``hidden // heads``.
    """
    if kv_heads is None:
        kv_heads = heads if family in ("llama", "llama_geglu") else max(1, heads // 2)
    if family not in QWEN3_FAMILIES or head_dim is None:
        head_dim = hidden // heads
        if family == "qwen3":
            head_dim = (3 * head_dim // 2 + 3) // 4 * 4
    cfg = _config(family, hidden, heads, kv_heads, mlp, vocab, attn, head_dim)
    torch.manual_seed(seed)
    layer, norm, rotary = _modules(family, cfg, hidden)
    head = nn.Linear(hidden, vocab, bias=False)
    # Random norm gains and biases, so a path that ignores them cannot pass. MoE experts are
    # allocated with torch.empty and the router with zeros: give them real values.
    with torch.no_grad():
        for module in (layer, norm):
            for name, p in module.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)
                elif p.dim() == 1:
                    p.uniform_(0.5, 1.5)
                elif "experts" in name or name.endswith("gate.weight"):
                    p.normal_(0.0, p.shape[-1] ** -0.5)
    layer, norm, head = (mod.to(device=device, dtype=dtype).eval() for mod in (layer, norm, head))
    rotary = rotary.to(device)

    def rope(hidden_states: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (B, S), or (3, B, S) for M-RoPE (a (B, S) input is broadcast)."""
        if family in MROPE_FAMILIES and position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        return rotary(hidden_states, position_ids)

    return Stage(layer, norm, head, rope, hidden, vocab, head_dim)


def padded_batch(lengths: list[int], seq_len: int, side: str) -> torch.Tensor:
    """(B, S) attention mask with the given valid lengths, padded on ``side`` ('left'/'right')."""
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
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
