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
search optimises); :func:`measured_tokens_per_layer` reads what a prefill really kept.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["SampleStats", "layer_flops", "measured_tokens_per_layer", "retention", "resolve_budget",
           "schedule_retention", "schedule_tokens_per_layer", "text_dims"]


def resolve_budget(keep: int | float, n: int) -> int:
    """Tokens a budget keeps of ``n``: the engine's own rule (an int is a count capped at ``n``,
    a float a fraction rounded half up, at least 1)."""
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
    """SPEC section 6: ``sum_l 4 n d^2 + 2 n^2 d + 2 n d m``, in FLOPs."""
    d, m = hidden, mlp
    return float(sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in tokens_per_layer))


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
    selection_ms: list[float] | None    # per decoder stage, the batch's time over its samples

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Measured: what the last prefill kept.
# WIRING POINT (last_stats): when ``pio_kernels.integrations.last_stats`` lands, read
# ``visual_tokens`` / ``tokens_per_layer`` from it here and drop the counting below.
# ------------------------------------------------------------------------------------------------
def measured_tokens_per_layer(model, config, input_ids: torch.Tensor, image_token_ids: tuple[int, ...],
                              attention_mask: torch.Tensor | None = None) -> list[tuple[int, list[int], list[int]]]:
    """Per sample of the last prefill: ``(N, kept, n_l for every decoder layer)``.

    ``N`` counts the image placeholders of ``image_token_ids`` in the caller's ``input_ids``
    (real rows only); ``kept`` lists the visual tokens left after the encoder stage (when the
    schedule has one) and after each decoder stage, from ``last_selection`` (-1 padding not
    counted). ``config``: the PioConfig applied to ``model``, or ``None`` for the stock model
    (which keeps everything).
    """
    from pio_kernels.integrations import last_selection

    num_layers = text_dims(model)[0]
    is_image = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in image_token_ids:
        is_image |= input_ids == token
    if attention_mask is not None:
        is_image &= attention_mask.bool()
    visual = is_image.sum(1).tolist()
    stages = last_selection(model) if config is not None else []
    encoder = last_selection(model, encoder=True) if config is not None else None
    out = []
    for b, n_in in enumerate(visual):
        n = n_in
        kept = []
        if encoder is not None:
            n = int((encoder[b] >= 0).sum())
            kept.append(n)
        counts, stage = [], 0
        per_stage = [int((s[b] >= 0).sum()) for s in stages] if stages else []
        for layer in range(num_layers):
            while per_stage and stage < len(config.layers) and config.layers[stage] == layer:
                n = per_stage[stage]
                kept.append(n)
                stage += 1
            counts.append(n)
        out.append((int(n_in), kept, counts))
    return out
