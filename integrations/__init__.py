"""Model integrations (installed as ``pio_kernels.integrations``): one call on a stock model.

    from pio_kernels.integrations import PioConfig, apply_pio, remove_pio, last_selection
    apply_pio(model, PioConfig(layers=[16], keep=[32], encoder_keep=96))
    out = model.generate(**inputs)
    kept = last_selection(model)
    remove_pio(model)

The model-independent machinery lives in :mod:`.engine`, every transformers convention in
:mod:`.hf`, and each supported model family has a thin adapter in :mod:`.models`.
Semantics: SPEC sections 1-5; what each generate mode does is in the README.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from pio_kernels import scoring

from . import engine, hf

__all__ = ["PRESETS", "PioConfig", "PioStats", "apply_pio", "last_selection", "last_stats", "preset", "remove_pio",
           "visual_flops"]

SELECTIONS = ("nms", "topk", "uniform")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _budget(name: str, value) -> int | float:
    """An int budget (a count) or a float in (0, 1] (a fraction); numpy numbers are accepted."""
    if _is_int(value):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 when an int, got {value}")
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
        if not (0.0 < value <= 1.0):
            raise ValueError(f"{name} must lie in (0, 1] when a float, got {value}")
        return value
    raise ValueError(f"{name} must be an int or a float in (0, 1], got {value!r}")


@dataclass(frozen=True)
class PioConfig:
    """A selection schedule (SPEC section 1).

    Attributes:
        layers: strictly increasing 0-based indices (>= 1) of the first decoder layer that
            sees each reduced set. Layer 0 is excluded: its KV cache is what the model reads
            as the sequence length.
        keep: one budget per stage: an int (tokens kept per image) or a float in (0, 1]
            (fraction of that image's current tokens: ``floor(keep * n)``, at least 1). Int
            budgets must not increase from stage to stage.
        tau: cosine threshold of the NMS (SPEC 3); any finite number, > 1 gives top-k.
        num_positions: K, loss rows of the proxy loss (SPEC 2.3), >= 1.
        encoder_keep: encoder-side budget per image (SPEC 4), an int or a float in (0, 1];
            ``None`` for off.
        scoring: the rule that scores the rows at each stage: ``"saliency"`` (the proxy-loss
            gradient, SPEC 2) or a baseline registered in :mod:`pio_kernels.scoring`.
        selection: ``"nms"`` (SPEC 3), ``"topk"`` (the best scores, no suppression) or
            ``"uniform"`` (evenly spaced tokens of each image, in raster order; no scores).
        seed: seed of scoring rules that draw random numbers.
    """

    layers: tuple[int, ...]
    keep: tuple[int | float, ...]
    tau: float = 0.8
    num_positions: int = 4
    encoder_keep: int | float | None = None
    scoring: str = "saliency"
    selection: str = "nms"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise ValueError(f"layers must be a sequence of ints, got {self.layers!r}")
        if isinstance(self.keep, (str, bytes)) or not hasattr(self.keep, "__iter__"):
            raise ValueError(f"keep must be a sequence of ints or floats, got {self.keep!r}")
        layers, keep = tuple(self.layers), tuple(self.keep)
        if not layers:
            raise ValueError("layers must name at least one stage")
        for x in layers:
            if not _is_int(x):
                raise ValueError(f"layers must hold ints, got {x!r}")
        layers = tuple(int(x) for x in layers)
        if layers[0] < 1:
            raise ValueError(f"layers must be >= 1 (layer 0's cache sets the model's sequence length), "
                             f"got {list(layers)}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"layers must be strictly increasing, got {list(layers)}")
        if len(keep) != len(layers):
            raise ValueError(f"keep must have one entry per stage ({len(layers)}), got {len(keep)}")
        keep = tuple(_budget(f"keep[{s}]", k) for s, k in enumerate(keep))
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "keep", keep)
        ints = [k for k in keep if isinstance(k, int)]
        if any(b > a for a, b in zip(ints, ints[1:])):
            raise ValueError(f"int budgets in keep must not increase, got {list(keep)}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, numbers.Real) or not math.isfinite(self.tau):
            raise ValueError(f"tau must be a finite real number, got {self.tau!r}")
        object.__setattr__(self, "tau", float(self.tau))
        if not _is_int(self.num_positions) or self.num_positions < 1:
            raise ValueError(f"num_positions must be an int >= 1, got {self.num_positions!r}")
        object.__setattr__(self, "num_positions", int(self.num_positions))
        if self.encoder_keep is not None:
            object.__setattr__(self, "encoder_keep", _budget("encoder_keep", self.encoder_keep))
            if isinstance(self.encoder_keep, int) and ints and ints[0] > self.encoder_keep:
                raise ValueError(f"keep[0]={ints[0]} exceeds encoder_keep={self.encoder_keep}")
        if not isinstance(self.scoring, str) or not self.scoring:
            raise ValueError(f"scoring must name a scoring rule, got {self.scoring!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    def keeps_everything(self) -> bool:
        """Whether every budget is the full fraction (``1.0``; ``encoder_keep`` None or ``1.0``), so
        that no token is dropped whatever the prompt (int budgets depend on the image's size)."""
        full = self.keep + ((self.encoder_keep,) if self.encoder_keep is not None else ())
        return all(isinstance(k, float) and k >= 1.0 for k in full)


# Schedules by name (SPEC section 1; budgets are per image): the published ones first, then ours.
# Their retention by the SPEC accounting: pio_kernels.eval.schedules (``pio-eval presets``).
PRESETS: dict[str, PioConfig] = {
    "llava-1.5-ve": PioConfig(layers=[16], keep=[32], encoder_keep=96),
    "llava-1.5": PioConfig(layers=[1, 10, 15], keep=[92, 54, 22]),
    "llava-1.5-128": PioConfig(layers=[1, 10, 15], keep=[218, 128, 54]),
    "qwen2.5-vl-ve": PioConfig(layers=[14], keep=[0.333], encoder_keep=0.167),
    # Ours, not published: LLaVA-1.5's relative budgets (92/576, 54/92, 22/54) at layers 1, 8, 12 of
    # 28 (11.1% of a 1296-token image), and LLaVA-1.5's schedules per LLaVA-NeXT crop or image.
    "qwen2.5-vl": PioConfig(layers=[1, 8, 12], keep=[0.16, 0.59, 0.41]),
    "llava-next-ve": PioConfig(layers=[16], keep=[0.34], encoder_keep=0.167),
    "llava-next": PioConfig(layers=[1, 10, 15], keep=[0.16, 0.59, 0.41]),
    # Defaults, not tuned results: the published ratios (the encoder keeps 16.7%, the middle
    # decoder layer keeps 33.3% of those: 11.1% on average) at each model's depth.
    "qwen2-vl-ve": PioConfig(layers=[14], keep=[0.333], encoder_keep=0.167),             # 2B, 7B: 28 layers
    "qwen3-vl-ve": PioConfig(layers=[18], keep=[0.333], encoder_keep=0.167),             # 8B: 36 layers
    "qwen3-vl-32b-ve": PioConfig(layers=[32], keep=[0.333], encoder_keep=0.167),         # 32B: 64 layers
    "llava-onevision-ve": PioConfig(layers=[14], keep=[0.333], encoder_keep=0.167),      # 7B: 28 layers
    "llava-onevision-0.5b-ve": PioConfig(layers=[12], keep=[0.333], encoder_keep=0.167),  # 0.5B: 24 layers
}


def preset(name: str, **overrides) -> PioConfig:
    """A published schedule by name (``PRESETS``), with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    base = PRESETS[name]
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    fields.update(overrides)
    return PioConfig(**fields)


def apply_pio(model: nn.Module, config: PioConfig) -> nn.Module:
    """Installs visual-token selection on a stock Hugging Face model, in place; returns it.

    Raises:
        TypeError: ``config`` is not a PioConfig, or the model class is not supported (the
            message names the supported classes).
        ValueError: the schedule does not fit the model (a layer index past its last layer),
            the attention implementation or the scoring rule is unknown, or pio is already applied.
        NotImplementedError: the model uses sliding-window attention in a layer a stage reaches.
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
    hf.mask_kind(hf.attention_implementation(lm.config))
    types = list(getattr(lm.config, "layer_types", None) or [])
    if any(t != "full_attention" for t in types[config.layers[0] if config.encoder_keep is None else 0:]):
        raise NotImplementedError("pio does not support sliding-window attention layers behind a stage "
                                  f"(layer_types {types})")
    if config.encoder_keep is not None and not adapter.supports_encoder_selection(model):
        raise ValueError(f"encoder_keep is not supported for {type(model).__name__}")
    scoring.get_scoring(config.scoring)
    engine.install(model, adapter, config)
    return model


def remove_pio(model: nn.Module) -> nn.Module:
    """Removes every hook and patch ``apply_pio`` added; the model is the stock one again.

    Raises ValueError when pio is not applied. A cache a pio prefill filled keeps reporting
    lengths in the caller's numbering: continue it with pio, or start a new one."""
    engine.uninstall(model)
    return model


def _state(model: nn.Module):
    state = getattr(model, "_pio", None)
    if state is None:
        raise ValueError("pio is not applied to this model")
    return state


def _ascending_padded(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(B, k) the ``values`` (B, S) where ``present``, ascending per row, -1 padded; k the widest row."""
    width = int(present.sum(1).max()) if values.numel() else 0
    sentinel = torch.iinfo(torch.long).max
    ordered = torch.sort(torch.where(present, values, torch.full_like(values, sentinel)), dim=1).values[:, :width]
    return torch.where(ordered == sentinel, torch.full_like(ordered, -1), ordered)


def _visual_rows(prefill, cut) -> torch.Tensor:
    rows = cut.index.clamp_min(0)
    is_visual = cut.valid & (cut.index >= 0) & (prefill.image_map.gather(1, rows) >= 0)
    return _ascending_padded(cut.index, is_visual)


def last_selection(model: nn.Module, encoder: bool = False) -> list[torch.Tensor] | torch.Tensor | None:
    """What the last prefill kept.

    Returns:
        A list with one LongTensor (B, k) per stage of ``layers``: positions, in the
        ``input_ids`` the caller passed, of the visual tokens present after that stage,
        ascending, -1 padded where samples differ. ``encoder=True`` returns the (B, k)
        positions kept by the encoder-side selection instead (``None`` when it is off).
        An empty list when the last prefill had no image.
    """
    prefill = _state(model).prefill
    if prefill is None:
        return None if encoder else []
    if encoder:
        return _visual_rows(prefill, prefill.cuts[0]) if prefill.encoder_ran else None
    return [_visual_rows(prefill, cut) for cut in prefill.cuts[1:]]


def visual_flops(tokens_per_layer: list[float], hidden: int, mlp: int) -> float:
    """FLOPs spent on the visual tokens (SPEC 6): ``sum over layers of 4nd^2 + 2n^2d + 2ndm`` with
    ``n`` the visual tokens a layer sees, ``d`` the hidden size and ``m`` the MLP width."""
    d, m = hidden, mlp
    return float(sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in tokens_per_layer))


@dataclass(frozen=True)
class PioStats:
    """Statistics of the last prefill (``last_stats``), per sample unless said otherwise.

    Attributes:
        visual_tokens: visual tokens in the caller's prompt.
        tokens_per_layer: visual tokens each decoder layer sees (and caches).
        retention: mean over the decoder layers of ``tokens_per_layer / visual_tokens`` (the
            SPEC 1 accounting: 11.1% for the published schedules); 1.0 without visual tokens.
        visual_flops: FLOPs spent on the visual tokens by the SPEC 6 formula,
            ``sum over layers of 4nd^2 + 2n^2d + 2ndm``.
        selection_ms: per stage (the encoder stage first when on), milliseconds of selection
            (CUDA events on a GPU; reading them waits for the GPU).
        stage_kinds: ``"encoder"`` or ``"stage"`` for each entry of ``selection_ms``.
    """

    visual_tokens: list[int]
    tokens_per_layer: list[list[int]]
    retention: list[float]
    visual_flops: list[float]
    selection_ms: list[float]
    stage_kinds: list[str]


def last_stats(model: nn.Module) -> PioStats | None:
    """Token counts, retention, FLOPs and selection time of the last prefill (``None`` before any)."""
    state = _state(model)
    prefill = state.prefill
    if prefill is None:
        return None
    lm = state.adapter.language_model(state.model)
    n_layers = len(lm.layers)
    visual = (prefill.image_map >= 0).sum(1)
    per_cut = []
    for cut in prefill.cuts:
        rows = cut.index.clamp_min(0)
        per_cut.append((cut.valid & (cut.index >= 0) & (prefill.image_map.gather(1, rows) >= 0)).sum(1))
    counts = torch.stack([per_cut[prefill.cuts.index(prefill.cut_for_layer(i))] for i in range(n_layers)], 1)
    visual_list = visual.tolist()
    counts_list = counts.tolist()
    retention = [sum(c) / (n_layers * v) if v else 1.0 for c, v in zip(counts_list, visual_list)]
    flops = [visual_flops(c, lm.config.hidden_size, lm.config.intermediate_size) for c in counts_list]
    return PioStats(visual_tokens=visual_list, tokens_per_layer=counts_list, retention=retention,
                    visual_flops=flops, selection_ms=prefill.stats.selection_ms(),
                    stage_kinds=list(prefill.stats.stage_kinds))
