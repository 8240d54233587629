"""Model integrations (installed as ``pio_kernels.integrations``): one call on a stock model.

    from pio_kernels.integrations import PioConfig, apply_pio, remove_pio, last_selection
    apply_pio(model, PioConfig(layers=[16], keep=[32], encoder_keep=96))
    out = model.generate(**inputs)
    kept = last_selection(model)
    remove_pio(model)

The shared machinery lives in :mod:`.engine`; each supported model family has a thin
adapter module (:mod:`.llava`, ...). Semantics: SPEC sections 1-5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import engine

__all__ = ["PioConfig", "apply_pio", "last_selection", "remove_pio"]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_budget(name: str, value) -> None:
    if _is_int(value):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 when an int, got {value}")
    elif isinstance(value, float):
        if not (0.0 < value <= 1.0):
            raise ValueError(f"{name} must lie in (0, 1] when a float, got {value}")
    else:
        raise ValueError(f"{name} must be an int or a float in (0, 1], got {value!r}")


@dataclass(frozen=True)
class PioConfig:
    """A selection schedule (SPEC section 1).

    Attributes:
        layers: strictly increasing 0-based indices (>= 1) of the first decoder layer that
            sees each reduced set. Layer 0 is excluded: its KV cache is what the model reads
            as the sequence length.
        keep: one budget per stage: an int (tokens kept per image) or a float in (0, 1]
            (fraction of that image's current tokens, rounded half up, at least 1). Int
            budgets must not increase from stage to stage.
        tau: cosine threshold of the NMS (SPEC 3); any finite number, > 1 gives top-k.
        num_positions: K, loss rows of the proxy loss (SPEC 2.3), >= 1.
        encoder_keep: encoder-side budget per image (SPEC 4), an int or a float in (0, 1];
            ``None`` for off.
    """

    layers: tuple[int, ...]
    keep: tuple[int | float, ...]
    tau: float = 0.8
    num_positions: int = 4
    encoder_keep: int | float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise ValueError(f"layers must be a sequence of ints, got {self.layers!r}")
        if isinstance(self.keep, (str, bytes)) or not hasattr(self.keep, "__iter__"):
            raise ValueError(f"keep must be a sequence of ints or floats, got {self.keep!r}")
        layers, keep = tuple(self.layers), tuple(self.keep)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "keep", keep)
        if not layers:
            raise ValueError("layers must name at least one stage")
        for x in layers:
            if not _is_int(x):
                raise ValueError(f"layers must hold ints, got {x!r}")
        if layers[0] < 1:
            raise ValueError(f"layers must be >= 1 (layer 0's cache sets the model's sequence length), "
                             f"got {list(layers)}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"layers must be strictly increasing, got {list(layers)}")
        if len(keep) != len(layers):
            raise ValueError(f"keep must have one entry per stage ({len(layers)}), got {len(keep)}")
        for s, k in enumerate(keep):
            _check_budget(f"keep[{s}]", k)
        ints = [k for k in keep if _is_int(k)]
        if any(b > a for a, b in zip(ints, ints[1:])):
            raise ValueError(f"int budgets in keep must not increase, got {list(keep)}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not math.isfinite(self.tau):
            raise ValueError(f"tau must be a finite real number, got {self.tau!r}")
        object.__setattr__(self, "tau", float(self.tau))
        if not _is_int(self.num_positions) or self.num_positions < 1:
            raise ValueError(f"num_positions must be an int >= 1, got {self.num_positions!r}")
        if self.encoder_keep is not None:
            _check_budget("encoder_keep", self.encoder_keep)
            if _is_int(self.encoder_keep) and ints and ints[0] > self.encoder_keep:
                raise ValueError(f"keep[0]={ints[0]} exceeds encoder_keep={self.encoder_keep}")


def apply_pio(model: nn.Module, config: PioConfig) -> nn.Module:
    """Installs visual-token selection on a stock Hugging Face model, in place; returns it.

    Raises:
        TypeError: ``config`` is not a PioConfig, or the model class is not supported (the
            message names the supported classes).
        ValueError: the schedule does not fit the model (a layer index past its last layer),
            the attention implementation is not supported, or pio is already applied.
    """
    if not isinstance(config, PioConfig):
        raise TypeError(f"config must be a PioConfig, got {type(config).__name__}")
    adapter = engine.adapter_for(model)
    if getattr(model, "_pio", None) is not None:
        raise ValueError("pio is already applied to this model; call remove_pio first")
    lm = adapter.language_model(model)
    n_layers = len(lm.layers)
    if config.layers[-1] >= n_layers:
        raise ValueError(f"layers must be < the model's {n_layers} decoder layers, got {list(config.layers)}")
    engine.mask_kind(lm.config._attn_implementation)
    if config.encoder_keep is not None and not adapter.supports_encoder_selection(model):
        raise ValueError(f"encoder_keep is not supported for {type(model).__name__}")
    engine.install(model, adapter, config)
    return model


def remove_pio(model: nn.Module) -> nn.Module:
    """Removes every hook and patch ``apply_pio`` added; the model is the stock one again."""
    engine.uninstall(model)
    return model


def last_selection(model: nn.Module, encoder: bool = False) -> list[torch.Tensor] | torch.Tensor | None:
    """What the last prefill kept.

    Returns:
        A list with one LongTensor (B, k) per stage of ``layers``: positions, in the
        ``input_ids`` the caller passed, of the visual tokens present after that stage,
        ascending, -1 padded where samples differ. ``encoder=True`` returns the (B, k)
        positions kept by the encoder-side selection instead (``None`` when it is off).
        An empty list when the last prefill had no image.
    """
    state = getattr(model, "_pio", None)
    if state is None:
        raise ValueError("pio is not applied to this model")
    prefill = state.prefill
    if prefill is None:
        return None if encoder else []
    if encoder:
        return prefill.encoder_selection
    return list(prefill.selection)
