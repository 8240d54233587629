"""The SPEC accounting of a schedule: visual tokens per decoder layer, retention and FLOPs.

One definition, used by the evaluation plugin, the fidelity runs and ``pio-tune`` alike:

* **Visual tokens a layer sees** (``n_l``): the image tokens of the sample present in decoder
  layer ``l``'s input. Without encoder-side selection layer 0 sees all ``N`` visual tokens; with
  it, layer 0 sees what the encoder kept. Each stage ``L_s`` sets the count from layer ``L_s`` on.
* **Retention**: ``sum_l n_l / (num_layers * N)``, the average over all decoder layers of the
  visual tokens seen over the visual tokens in (SPEC section 1: LLaVA-1.5-7B's published
  schedules average 64 of 576 tokens over 32 layers, 11.1%).
* **FLOPs** (SPEC section 6): ``sum_l 4 n_l d^2 + 2 n_l^2 d + 2 n_l d m`` with ``d`` the hidden
  size and ``m`` the MLP width of the language model.

:func:`schedule_tokens_per_layer` predicts ``n_l`` for one image from a schedule (what the
search optimises); :func:`prefill_stats` reads what a prefill really kept, from the engine's
``last_stats``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["SampleStats", "layer_flops", "prefill_stats", "retention", "resolve_budget", "schedule_retention",
           "schedule_tokens_per_layer", "text_dims"]


def resolve_budget(keep: int | float, n: int) -> int:
    """Tokens a budget keeps of ``n``: the engine's own rule (an int is a count capped at ``n``,
    a float a fraction ``floor(keep * n)``, at least 1; SPEC 1)."""
    from pio_kernels.integrations.engine import resolve_budget as engine_rule
    return engine_rule(keep, n) if n > 0 else 0


def schedule_tokens_per_layer(config, visual_tokens: int, num_layers: int) -> list[int]:
    """``n_l`` for l = 0 .. num_layers - 1, for one image of ``visual_tokens`` tokens.

    ``config``: anything with ``layers``, ``keep`` and ``encoder_keep`` (a PioConfig), or
    ``None`` for the stock model. Budgets apply per image, so a sample of several equal images
    scales every count by the number of images.
    """
    if visual_tokens < 0 or num_layers < 1:
        raise ValueError(f"visual_tokens must be >= 0 and num_layers >= 1, got {visual_tokens} and {num_layers}")
    if config is None:
        return [visual_tokens] * num_layers
    n = visual_tokens
    if getattr(config, "encoder_keep", None) is not None:
        n = resolve_budget(config.encoder_keep, n)
    counts, stage = [], 0
    for layer in range(num_layers):
        while stage < len(config.layers) and config.layers[stage] == layer:
            n = resolve_budget(config.keep[stage], n)
            stage += 1
        counts.append(n)
    return counts


def retention(tokens_per_layer: list[int], visual_tokens: int) -> float | None:
    """Average over the layers of ``n_l / N``; ``None`` when there is no visual token."""
    if visual_tokens <= 0 or not tokens_per_layer:
        return None
    return sum(tokens_per_layer) / (len(tokens_per_layer) * visual_tokens)


def schedule_retention(config, visual_tokens: int, num_layers: int) -> float:
    """The retention a schedule gives one image of ``visual_tokens`` tokens (stock: 1.0)."""
    return retention(schedule_tokens_per_layer(config, visual_tokens, num_layers), visual_tokens)


def layer_flops(tokens_per_layer: list[int], hidden: int, mlp: int) -> float:
    """SPEC section 6: ``sum_l 4 n d^2 + 2 n^2 d + 2 n d m``, in FLOPs (the integrations' formula)."""
    from pio_kernels.integrations import visual_flops
    return visual_flops(tokens_per_layer, hidden, mlp)


def text_dims(model) -> tuple[int, int, int]:
    """(num_layers, hidden size d, MLP width m) of a VLM's language model."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    return int(text.num_hidden_layers), int(text.hidden_size), int(text.intermediate_size)


@dataclass
class SampleStats:
    """What one sample's prefill cost by the SPEC accounting (JSON-ready through ``asdict``)."""

    input_tokens: int                   # real tokens of the prompt (caller's input_ids)
    visual_tokens: int                  # N, image tokens in the caller's input_ids
    kept: list[int]                     # visual tokens after the encoder stage (if any), then each stage
    retained_fraction: float | None     # average over decoder layers of n_l / N
    tflops: float                       # SPEC 6 formula at the measured n_l
    tflops_stock: float                 # the same formula with n_l = N everywhere
    selection_ms: list[float] | None    # per stage (encoder first when on), the batch's time over its samples

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Measured: what the last prefill kept (the engine's own record, ``last_stats``).
# ------------------------------------------------------------------------------------------------
def prefill_stats(model, config, input_ids: torch.Tensor, image_token_ids: tuple[int, ...],
                  attention_mask: torch.Tensor | None = None) -> list[SampleStats]:
    """Per sample of the last prefill of ``model``: the SPEC accounting of what it kept.

    With a schedule (``config`` the PioConfig applied to ``model``) the counts, retention, FLOPs
    and selection times are :func:`pio_kernels.integrations.last_stats` (a beam search prefills
    each sample ``num_beams`` times: its first copy is read); the batch's selection time per
    stage is shared evenly by its samples. For the stock model (``config`` None) every
    layer sees the ``N`` image placeholders of ``image_token_ids`` in ``input_ids`` (real rows).
    ``kept`` lists the visual tokens after the encoder stage (when on), then after each stage.
    """
    num_layers, hidden, mlp = text_dims(model)
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    lengths = real.sum(1).tolist()
    stats = None
    if config is not None:
        from pio_kernels.integrations import last_stats
        stats = last_stats(model)
    out = []
    if stats is None:
        is_image = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in image_token_ids:
            is_image |= input_ids == token
        for n, length in zip((is_image & real).sum(1).tolist(), lengths):
            stock = layer_flops([n] * num_layers, hidden, mlp) / 1e12
            out.append(SampleStats(int(length), int(n), [], 1.0 if n else None, stock, stock, None))
        return out
    rows = len(stats.visual_tokens)
    step = rows // len(lengths) if rows % len(lengths) == 0 else 1  # beam search prefills every sample k times
    per_sample_ms = [ms / len(lengths) for ms in stats.selection_ms]
    for b, length in enumerate(lengths):
        n, counts = int(stats.visual_tokens[b * step]), [int(c) for c in stats.tokens_per_layer[b * step]]
        kept = ([counts[0]] if config.encoder_keep is not None else []) + [counts[layer] for layer in config.layers]
        out.append(SampleStats(input_tokens=int(length), visual_tokens=n, kept=kept,
                               retained_fraction=retention(counts, n), tflops=stats.visual_flops[b * step] / 1e12,
                               tflops_stock=layer_flops([n] * num_layers, hidden, mlp) / 1e12,
                               selection_ms=per_sample_ms))
    return out
