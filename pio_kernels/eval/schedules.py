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
``stock``              no selection (the unpruned model)                        100%
=====================  ======================================================  ==========================

``qwen2.5-vl`` has no published w/o-VE schedule; ours mirrors LLaVA-1.5's (about the same relative
budgets, 92/576, 54/92 and 22/54, at layers 1, 8 and 12 of 28): 144.0 tokens on average of an
image of 1296 (11.11%), 10.8-11.1% from 256 to 4096 tokens, since budgets round per image. The
LLaVA-NeXT presets apply LLaVA-1.5's fractions per crop (the encoder side: 96 of 576, then 32
of those at layer 16) or per image; LLaVA-NeXT's newline tokens are never dropped by the encoder
stage, so ``llava-next-ve`` keeps slightly more than 11.1% of an image's tokens.

Field syntax (``parse_list``): a list is ``[1,10,15]`` (brackets keep lmms-eval's comma split
off it), or ``1;10;15``, or ``1 10 15``; a single value is a one-stage list. Entries are ints
(token counts) or floats (fractions): ``keep=[0.16,0.59,0.41]``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

__all__ = ["describe", "make_config", "parse_list", "parse_value", "preset", "presets",
           "schedule_fields"]

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
    """The schedule fields of a preset (``None`` for ``stock``). ValueError names the presets."""
    known = presets()
    if name not in known:
        raise ValueError(f"preset must be one of {', '.join(known)}; got {name!r}")
    fields = known[name]
    return None if fields is None else {k: v for k, v in fields.items() if v is not None}


def make_config(preset_name: str | None = None, **fields: Any):
    """A PioConfig from a preset and/or explicit fields (explicit ones win), or ``None`` for the
    stock model (``preset_name="stock"``, or no preset and no ``layers``).

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
