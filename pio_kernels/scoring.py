"""Scoring rules of a language-model stage: one registry, used by every stage of every model.

A stage asks two questions of the visual rows entering its layer ``L_s`` (SPEC section 1):
"how important is each row" (a *scoring rule*, this module) and "which rows to keep per
image" (the selection of :class:`pio_kernels.integrations.PioConfig`: NMS, top-k or uniform).
Keeping the rules in one registry lets a baseline be a name, not a fork of the engine::

    from pio_kernels.scoring import get_scoring, register_scoring, scoring_names
    scores = get_scoring("attention")(inputs)       # (B, S) float32, higher = keep first

Built-in rules (every one returns (B, S) float32 on the device of ``hidden_states``; rows
whose ``image_ids`` are negative are ignored by the caller, padding rows score 0):

``saliency``   the proxy-loss gradient saliency of SPEC section 2
               (:func:`pio_kernels.proxy_saliency`). The default.
``random``     uniform in [0, 1) from ``generator``: the same scores for the same seed (on
               the generator's device).
``attention``  FastV-style: the attention that the last valid query of each sample pays to
               every key at the stage layer, averaged over heads. Computed from that layer's
               own ``input_layernorm``, ``q_proj`` / ``k_proj`` (and ``q_norm`` / ``k_norm``
               when present), the given RoPE ``(cos, sin)``, grouped-query heads and the
               padding mask; only one query row per sample is formed, never an attention map,
               so it works whatever attention implementation the model runs (SDPA, flash).
``norm``       the L2 norm of each row of the hidden states (fp32).

A new rule is any callable ``StageInputs -> (B, S) float tensor``; ``register_scoring`` adds it
under a name that ``PioConfig(scoring=...)`` (and the evaluation plugin's ``scoring=``) accept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["ScoringRule", "StageInputs", "attention_scores", "get_scoring", "norm_scores", "random_scores",
           "register_scoring", "saliency_scores", "scoring_names"]


@dataclass(frozen=True)
class StageInputs:
    """What a scoring rule sees at a language-model stage (SPEC section 1).

    Attributes:
        layer: decoder layer ``L_s``, the first layer that sees the reduced rows.
        final_norm: the model's final norm.
        lm_head: the model's output head.
        hidden_states: (B, S, D), the input of ``layer`` (model dtype, model device).
        position_embeddings: ``(cos, sin)`` as the model hands its layers, each (B, S, head_dim),
            (1, S, head_dim) or (S, head_dim).
        attention_mask: (B, S), 1 for real tokens and 0 for padding (either side); ``None`` when
            every row is real.
        image_ids: (B, S) int64, the image id of every row, -1 for text and padding.
        num_positions: K, loss rows of the proxy loss (SPEC 2.3).
        generator: a ``torch.Generator`` seeded by the engine for this forward (``PioConfig.seed``,
            on the model's device; read by ``random``); ``None`` means a CPU generator seeded with 0.
    """

    layer: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module
    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: torch.Tensor | None
    image_ids: torch.Tensor
    num_positions: int = 4
    generator: torch.Generator | None = None


ScoringRule = Callable[[StageInputs], torch.Tensor]

_RULES: dict[str, ScoringRule] = {}


def register_scoring(name: str, rule: ScoringRule, *, replace: bool = False) -> None:
    """Adds ``rule`` to the registry under ``name``.

    Raises:
        ValueError: ``name`` is empty or not a string, ``rule`` is not callable, or the name is
            taken (pass ``replace=True`` to swap a rule on purpose).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(rule):
        raise ValueError(f"rule must be callable (StageInputs -> (B, S) tensor), got {type(rule).__name__}")
    if name in _RULES and not replace and _RULES[name] is not rule:
        raise ValueError(f"a scoring rule named {name!r} is already registered; pass replace=True to swap it")
    _RULES[name] = rule


def get_scoring(name: str) -> ScoringRule:
    """The rule registered under ``name``. Raises ValueError naming the known rules."""
    try:
        return _RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"scoring must be one of {', '.join(scoring_names())}; got {name!r}") from None


def scoring_names() -> tuple[str, ...]:
    """Names of the registered rules, in registration order (the built-ins first)."""
    return tuple(_RULES)


# ----------------------------------------------------------------------------------------------
# Built-in rules
# ----------------------------------------------------------------------------------------------
def _valid(inputs: StageInputs) -> torch.Tensor:
    """(B, S) bool: the real rows."""
    hidden = inputs.hidden_states
    if inputs.attention_mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    mask = inputs.attention_mask
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask must be (B, S) = {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
    return mask.to(device=hidden.device).bool()


def saliency_scores(inputs: StageInputs) -> torch.Tensor:
    """``saliency``: the proxy-loss gradient saliency (SPEC section 2)."""
    import pio_kernels  # the package attribute, so instrumentation that swaps it is seen

    return pio_kernels.proxy_saliency(inputs.layer, inputs.final_norm, inputs.lm_head, inputs.hidden_states,
                                      inputs.position_embeddings, attention_mask=inputs.attention_mask,
                                      num_positions=inputs.num_positions)


def random_scores(inputs: StageInputs) -> torch.Tensor:
    """``random``: uniform [0, 1) scores drawn from ``inputs.generator`` on its device (a CPU
    generator seeded with 0 when ``None``): the same seed and device give the same scores.
    Padding rows score 0."""
    hidden = inputs.hidden_states
    generator = inputs.generator
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    scores = torch.rand(hidden.shape[:2], generator=generator, dtype=torch.float32, device=generator.device)
    return scores.to(hidden.device).masked_fill(~_valid(inputs), 0.0)


def norm_scores(inputs: StageInputs) -> torch.Tensor:
    """``norm``: the L2 norm of every row of the hidden states, fp32. Padding rows score 0."""
    scores = torch.linalg.vector_norm(inputs.hidden_states.float(), dim=-1)
    return scores.masked_fill(~_valid(inputs), 0.0)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _heads(proj: nn.Module, x: torch.Tensor, head_dim: int, norm: nn.Module | None) -> torch.Tensor:
    """``proj(x)`` as (B, heads, rows, head_dim) in fp32, through the per-head norm when given."""
    y = proj(x)
    y = y.view(*y.shape[:-1], -1, head_dim)
    if norm is not None:
        y = norm(y)
    return y.transpose(1, 2).float()


def attention_scores(inputs: StageInputs) -> torch.Tensor:
    """``attention``: last-query attention at the stage layer, mean over heads (FastV-style).

    For each sample, the query of its last real row attends to every real row (all of them
    precede it, so the causal mask is the padding mask);
    ``softmax(q k^T * scale)`` is taken in fp32 over the real keys and averaged over the
    query heads. Built from the layer's ``input_layernorm``, ``self_attn.q_proj`` /
    ``k_proj`` (+ ``q_norm`` / ``k_norm``), the given ``(cos, sin)`` and ``self_attn.scaling``
    (``head_dim ** -0.5`` when absent); grouped-query attention maps each query head to its
    key head. Memory: the keys (B, S, kv_heads * head_dim) plus (B, heads, S) probabilities.

    Returns:
        (B, S) float32, a distribution over each sample's real rows; padding rows score 0.
    """
    layer = inputs.layer
    attn = getattr(layer, "self_attn", None)
    norm = getattr(layer, "input_layernorm", None)
    if attn is None or norm is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj")):
        raise ValueError(f"scoring='attention' needs a decoder layer with input_layernorm and "
                         f"self_attn.q_proj / k_proj; got {type(layer).__name__}")
    hidden = inputs.hidden_states
    batch, seq_len, _ = hidden.shape
    valid = _valid(inputs)
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None:
        config = getattr(attn, "config", None)
        head_dim = config.hidden_size // config.num_attention_heads
    x = norm(hidden)
    # the last real row of every sample (right padding: before its padding; left padding: S - 1)
    positions = torch.arange(seq_len, device=hidden.device)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=1).clamp_min(0)  # (B,)
    x_last = x.gather(1, last[:, None, None].expand(-1, 1, x.shape[-1]))  # (B, 1, D)
    q = _heads(attn.q_proj, x_last, head_dim, getattr(attn, "q_norm", None))  # (B, H, 1, hd)
    k = _heads(attn.k_proj, x, head_dim, getattr(attn, "k_norm", None))       # (B, G, S, hd)
    cos, sin = (t.float() for t in inputs.position_embeddings)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if cos.dim() == 3 and cos.shape[0] == 1:  # positions shared by the batch
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    if cos.shape != (batch, seq_len, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"position_embeddings must be (cos, sin) of shape (B, S, head_dim) = "
                         f"{(batch, seq_len, head_dim)}, (1, S, head_dim) or (S, head_dim), got {tuple(cos.shape)}")
    cos_q = cos.gather(1, last[:, None, None].expand(-1, 1, head_dim))[:, None]  # (B, 1, 1, hd)
    sin_q = sin.gather(1, last[:, None, None].expand(-1, 1, head_dim))[:, None]
    q = q * cos_q + _rotate_half(q) * sin_q
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    group = heads // kv_heads
    scale = getattr(attn, "scaling", None)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    q = q.view(batch, kv_heads, group, head_dim)  # query head h uses key head h // group
    logits = torch.einsum("bgqd,bgsd->bgqs", q, k).reshape(batch, heads, seq_len) * scale
    logits = logits.masked_fill(~valid[:, None], -math.inf)  # real keys are all at or before the query
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a sample without any real row scores 0
    return probs.mean(dim=1)


register_scoring("saliency", saliency_scores)
register_scoring("random", random_scores)
register_scoring("attention", attention_scores)
register_scoring("norm", norm_scores)
