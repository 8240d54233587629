"""Schedules by name, the text syntax of schedule fields, and PioConfig construction.

Presets: the schedules of :data:`pio_kernels.integrations.PRESETS` (SPEC section 1: the published
ones, then this library's). Retention by
:mod:`.accounting` (average over decoder layers; fractions keep ``floor(keep * n)``):

=====================  ======================================================  ==========================
name                   schedule                                                retention
=====================  ======================================================  ==========================
``llava-1.5-ve``       ``layers=[16], keep=[32], encoder_keep=96``              11.11% (64 of 576, 32 layers)
``llava-1.5``          ``layers=[1,10,15], keep=[92,54,22]``                    11.11% (published, w/o VE)
``llava-1.5-128``      ``layers=[1,10,15], keep=[218,128,54]``                  22.22% (published, w/o VE)
``qwen2.5-vl-ve``      ``layers=[14], keep=[0.333], encoder_keep=0.167``        11.07% of 1296 (published)
``qwen2.5-vl``         ``layers=[1,8,12], keep=[0.16,0.59,0.41]``               11.11% of 1296 (ours, w/o VE)
``llava-next-ve``      ``layers=[16], keep=[0.34], encoder_keep=0.167``         11.11% per 576-token crop
``llava-next``         ``layers=[1,10,15], keep=[0.16,0.59,0.41]``              11.14% of 2880 (w/o VE)
``qwen2-vl-ve``        ``layers=[14], keep=[0.333], encoder_keep=0.167``        11.1% (default, 28 layers)
``qwen3-vl-ve``        ``layers=[18], keep=[0.333], encoder_keep=0.167``        11.1% (default, 8B: 36 layers)
``qwen3-vl-32b-ve``    ``layers=[32], keep=[0.333], encoder_keep=0.167``        11.1% (default, 32B: 64 layers)
``llava-onevision-ve`` ``layers=[14], keep=[0.333], encoder_keep=0.167``        11.1% (default, 7B: 28 layers)
``llava-onevision-0.5b-ve`` ``layers=[12], keep=[0.333], encoder_keep=0.167``   11.1% (default, 0.5B: 24 layers)
``stock``              no selection (the unpruned model)                        100%
``default``            the family's default for the model's depth (below)
=====================  ======================================================  ==========================

``qwen2.5-vl`` has no published w/o-VE schedule; ours mirrors LLaVA-1.5's (about the same relative
budgets, 92/576, 54/92 and 22/54, at layers 1, 8 and 12 of 28): 144.0 tokens on average of an
image of 1296 (11.11%), 10.8-11.1% from 256 to 4096 tokens, since budgets round per image. The
LLaVA-NeXT presets apply LLaVA-1.5's fractions per crop (the encoder side: 96 of 576, then 32
of those at layer 16) or per image; LLaVA-NeXT's newline tokens are never dropped by the encoder
stage, so ``llava-next-ve`` keeps slightly more than 11.1% of an image's tokens.

The Qwen2-VL, Qwen3-VL and LLaVA-OneVision presets are defaults, not tuned results: the
published Qwen2.5-VL ratios at each model's middle decoder layer. ``default`` (:func:`default_preset`)
picks, from the model family's presets (:data:`FAMILY_PRESETS`), the one set for the model's
decoder depth, or the nearest one scaled to that depth (its layers proportionally, int budgets
by the token count when known): the README's ``layers=[L // 2]`` for a depth ``L`` not listed.
Qwen3-VL-MoE takes Qwen3-VL's.

Field syntax (``parse_list``): a list is ``[1,10,15]`` (brackets keep lmms-eval's comma split
off it), or ``1;10;15``, or ``1 10 15``; a single value is a one-stage list. Entries are ints
(token counts) or floats (fractions): ``keep=[0.16,0.59,0.41]``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

__all__ = ["FAMILY_PRESETS", "default_preset", "describe", "make_config", "parse_list", "parse_value", "preset",
           "presets", "schedule_fields"]

# Each family's presets (pio_kernels.integrations.PRESETS), with the decoder depth each was set
# for; the family's first preset with the encoder side is its default at that depth.
FAMILY_PRESETS: dict[str, tuple[tuple[str, int], ...]] = {
    "llava-1.5": (("llava-1.5-ve", 32), ("llava-1.5", 32), ("llava-1.5-128", 32)),
    "llava-next": (("llava-next-ve", 32), ("llava-next", 32)),
    "llava-onevision": (("llava-onevision-ve", 28), ("llava-onevision-0.5b-ve", 24)),
    "qwen2-vl": (("qwen2-vl-ve", 28),),
    "qwen2.5-vl": (("qwen2.5-vl-ve", 28), ("qwen2.5-vl", 28)),
    "qwen3-vl": (("qwen3-vl-ve", 36), ("qwen3-vl-32b-ve", 64)),
    "qwen3-vl-moe": (("qwen3-vl-ve", 36), ("qwen3-vl-32b-ve", 64)),
}
# Visual tokens of one image the int budgets of a family's presets were set for
_PRESET_TOKENS = {"llava-1.5": 576}

def presets() -> dict[str, dict[str, Any] | None]:
    """Every preset by name (``pio_kernels.integrations.PRESETS``): its schedule fields, and
    ``stock`` (``None``) for the unpruned model."""
    from pio_kernels.integrations import PRESETS
    named = {name: dict(layers=c.layers, keep=c.keep, encoder_keep=c.encoder_keep) for name, c in PRESETS.items()}
    return {**named, "stock": None}


# Fields of PioConfig a user may set: the schedule, then the method (scoring rule, selection, seed).
_SCHEDULE_FIELDS = ("layers", "keep", "tau", "num_positions", "encoder_keep")
_METHOD_FIELDS = ("scoring", "selection", "seed")


def schedule_fields() -> tuple[str, ...]:
    """The PioConfig fields that the plugin and the CLIs accept."""
    return _SCHEDULE_FIELDS + _METHOD_FIELDS


def parse_value(text: str) -> int | float:
    """``"32"`` -> 32, ``"0.333"`` -> 0.333 (an int is a count, a float a fraction)."""
    text = str(text).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected an int or a float, got {text!r}") from None


def parse_list(value: Any, name: str = "value") -> tuple[int | float, ...]:
    """A schedule list from text or Python: ``"[1,10,15]"``, ``"1;10;15"``, ``"1 10 15"``, ``16``,
    ``[92, 54, 22]``. Raises ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number or a list of numbers, got {value!r}")
    if isinstance(value, (int, float)):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(parse_value(v) if isinstance(v, str) else v for v in value)
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]") or text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    parts = [p for p in re.split(r"[,;\s]+", text) if p]
    if not parts:
        raise ValueError(f"{name} must name at least one value, got {value!r}")
    try:
        return tuple(parse_value(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def preset(name: str) -> dict[str, Any] | None:
    """The schedule fields of a preset (``None`` for ``stock``). ValueError names the presets
    (``default``, the family's default, is resolved by :func:`make_config`)."""
    known = presets()
    if name not in known:
        raise ValueError(f"preset must be one of {', '.join(known)} or default; got {name!r}")
    fields = known[name]
    return None if fields is None else {k: v for k, v in fields.items() if v is not None}


def default_preset(family: str, num_layers: int, *, encoder: bool = True, visual_tokens: int | None = None
                   ) -> tuple[str, dict[str, Any]]:
    """The default schedule of ``family`` for a decoder of ``num_layers`` layers: ``(label, fields)``.

    Among the family's presets with the encoder side (``encoder``) or without it, the one set for
    ``num_layers`` layers; else the one set for the nearest depth, scaled to ``num_layers``: each
    layer proportionally (strictly increasing, >= 1; a middle layer stays the middle one), int
    budgets by ``visual_tokens`` over the tokens they were set for (unscaled when
    ``visual_tokens`` is None). A family without a preset of the asked kind (no schedule without the encoder side for
    Qwen2-VL, Qwen3-VL and LLaVA-OneVision) gets its default, and the label says so.

    Raises:
        ValueError: unknown ``family``, or ``num_layers`` < 2.
    """
    if family not in FAMILY_PRESETS:
        raise ValueError(f"family must be one of {', '.join(FAMILY_PRESETS)}; got {family!r}")
    if num_layers < 2:
        raise ValueError(f"num_layers must be >= 2, got {num_layers}")
    known = presets()
    candidates = [(name, depth) for name, depth in FAMILY_PRESETS[family]
                  if (known[name].get("encoder_keep") is not None) == encoder]
    note = ""
    if not candidates:
        candidates = [FAMILY_PRESETS[family][0]]
        note = f" (the family has no preset {'with' if encoder else 'without'} the encoder side: its default)"
    name, depth = min(candidates, key=lambda c: abs(c[1] - num_layers))
    spec = preset(name)
    if depth == num_layers:
        return name + note, spec
    layers, last = [], 0
    for layer in spec["layers"]:
        layer = min(max(last + 1, int(layer * num_layers / depth + 0.5)), num_layers - 1)
        layers.append(layer)
        last = layer
    scale = None if visual_tokens is None else visual_tokens / _PRESET_TOKENS.get(family, visual_tokens)

    def scaled(k):
        return k if isinstance(k, float) or k is None or scale is None else max(1, round(k * scale))

    fields = dict(spec, layers=tuple(layers), keep=tuple(scaled(k) for k in spec["keep"]))
    if "encoder_keep" in spec:
        fields["encoder_keep"] = scaled(spec["encoder_keep"])
    tokens = "" if scale is None or scale == 1 else f", {visual_tokens} tokens"
    return f"{name} (scaled to {num_layers} layers{tokens}){note}", fields


def make_config(preset_name: str | None = None, *, family: str | None = None, num_layers: int | None = None,
                **fields: Any):
    """A PioConfig from a preset and/or explicit fields (explicit ones win), or ``None`` for the
    stock model (``preset_name="stock"``, or no preset and no ``layers``).

    ``preset_name="default"`` is the model family's default (:func:`default_preset`): it needs
    ``family`` and ``num_layers``, the model's.

    ``fields`` take the text syntax of :func:`parse_list` for ``layers`` / ``keep``, and
    ``"none"`` for ``encoder_keep``. ``scoring``, ``selection`` and ``seed`` pass through to
    PioConfig (``scoring`` must be a name of :mod:`pio_kernels.scoring`).

    Raises:
        ValueError: unknown preset or field, a malformed value, or an invalid PioConfig.
    """
    unknown = set(fields) - set(schedule_fields())
    if unknown:
        raise ValueError(f"unknown schedule field(s) {sorted(unknown)}; known: {', '.join(schedule_fields())}")
    fields = {k: v for k, v in fields.items() if v is not None}
    if preset_name == "default":
        if family is None or num_layers is None:
            raise ValueError("preset=default needs the model's family and num_layers (it depends on the model)")
        base = default_preset(family, num_layers)[1]
    else:
        base = preset(preset_name) if preset_name else None
    if preset_name == "stock" or (base is None and "layers" not in fields):
        if preset_name != "stock" and fields:
            raise ValueError(f"{', '.join(sorted(fields))} need layers (or a preset)")
        if preset_name == "stock" and fields:
            raise ValueError(f"the stock model takes no schedule fields, got {sorted(fields)}")
        return None
    spec: dict[str, Any] = dict(base or {})
    for key, value in fields.items():
        if key in ("layers", "keep"):
            spec[key] = parse_list(value, key)
        elif key == "encoder_keep":
            spec[key] = None if str(value).lower() in ("none", "off", "") else (
                parse_value(value) if isinstance(value, str) else value)
        elif key == "tau":
            spec[key] = float(value)
        elif key in ("num_positions", "seed"):
            spec[key] = int(value)
        else:
            spec[key] = value
    if "keep" not in spec:
        raise ValueError("keep is required with layers (one budget per stage)")
    if spec.get("scoring") is not None:
        from pio_kernels.scoring import get_scoring
        get_scoring(spec["scoring"])  # ValueError naming the rules
    if spec.get("selection") is not None and spec["selection"] not in ("nms", "topk", "uniform"):
        raise ValueError(f"selection must be one of nms, topk, uniform; got {spec['selection']!r}")
    from pio_kernels.integrations import PioConfig
    return PioConfig(**spec)


def describe(config) -> dict[str, Any]:
    """JSON-ready fields of a PioConfig (``{"stock": True}`` for ``None``)."""
    if config is None:
        return {"stock": True}
    out = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
