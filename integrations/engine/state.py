"""Per-model and per-prefill state: what a prefill decided, and what decoding steps read.

``PioState`` hangs on the model (``model._pio``) for as long as pio is applied. A prefill that
selects something writes a :class:`Prefill`: the chain of :class:`Cut` s (the rows each group
of layers sees), the selections for ``last_selection`` and the statistics for ``last_stats``.
The record also goes onto the KV cache that prefill filled, so decoding steps find it there
(several conversations can continue on one model, each from its own cache).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Cut", "PioState", "Prefill", "Stats", "Step", "VisionRun", "time_mark"]


@dataclass
class Cut:
    """The rows that a group of layers sees: the prompt, or what a stage kept of it.

    ``cuts[0]`` is the prompt as the language model's layers see it: the caller's rows, or
    fewer after encoder-side selection (the language model is then handed those rows
    directly). Every later cut is a language-model stage.
    """

    layer: int                        # first decoder layer that sees these rows
    index: torch.Tensor               # (B, W) prompt row of each row, -1 for padding
    valid: torch.Tensor               # (B, W) bool
    positions: torch.Tensor           # (B, W) or (3, B, W): the adapter's positions of these rows
    shift: torch.Tensor               # (B,) real prompt tokens dropped up to this cut
    src: torch.Tensor | None = None   # (B, W) rows of the previous cut (None for cuts[0])
    replaces: bool = False            # layers get this cut's mask and positions instead of the model's
    embeddings: tuple | None = None   # (cos, sin) of these rows in the prefill
    mask: Any = None                  # the layers' attention mask in the prefill

    @property
    def width(self) -> int:
        return self.valid.shape[1]


@dataclass
class Stats:
    """Per-prefill statistics (``last_stats``): token counts and selection time."""

    visual_tokens: torch.Tensor | None = None      # (B,) visual tokens in the caller's prompt
    tokens_per_layer: torch.Tensor | None = None   # (B, num_layers) visual tokens each layer sees
    stage_kinds: list[str] = field(default_factory=list)
    _timers: list = field(default_factory=list)    # per stage: (start, stop) marks

    def start(self, kind: str, device: torch.device) -> int:
        self.stage_kinds.append(kind)
        self._timers.append([time_mark(device), None])
        return len(self._timers) - 1

    def stop(self, slot: int, device: torch.device) -> None:
        self._timers[slot][1] = time_mark(device)

    def add(self, slot: int, seconds_mark: tuple) -> None:
        """Adds an interval measured elsewhere (the encoder probes in the vision tower)."""
        self._timers[slot].append(seconds_mark)

    def selection_ms(self) -> list[float]:
        out = []
        for start, stop, *extra in self._timers:
            ms = _elapsed(start, stop)
            for a, b in extra:
                ms += _elapsed(a, b)
            out.append(ms)
        return out


def time_mark(device: torch.device):
    """A point in time: a recorded CUDA event on a GPU, ``perf_counter`` elsewhere."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(start, stop) -> float:
    if stop is None:
        return float("nan")
    if isinstance(start, float):
        return (stop - start) * 1e3
    stop.synchronize()
    return start.elapsed_time(stop)


@dataclass
class Prefill:
    """What one prefill decided; decoding steps, replays and ``last_selection`` read it."""

    seq_len: int                      # S0: rows of the prompt as the caller handed it
    image_map: torch.Tensor           # (B, S0) image id per row, -1 for text and padding
    prompt_valid: torch.Tensor        # (B, S0) which prompt rows are real tokens
    mask_kind: str
    static_len: int | None            # key columns of a static cache, else None
    cuts: list[Cut] = field(default_factory=list)
    selection: list[torch.Tensor] = field(default_factory=list)   # per language-model stage
    encoder_selection: torch.Tensor | None = None
    encoder_ran: bool = False                    # encoder-side selection ran (it may have kept everything)
    encoder_embeds: torch.Tensor | None = None   # (B, W0, D) the reduced, merged input of cuts[0]
    encoder_merge: tuple | None = None           # (keep, group), (B, S0) each: what the encoder cut merged
    fingerprint: torch.Tensor | None = None      # (B, S0) a projection of the prompt, for replays
    decided: bool = False                        # a replay: stages gather the rows of an earlier prefill
    prompt_len: int | None = None                # rows of the caller's prompt when the call holds more
    stats: Stats = field(default_factory=Stats)

    def cut_for_layer(self, layer_idx: int) -> Cut:
        cut = self.cuts[0]
        for c in self.cuts:
            if c.layer <= layer_idx:
                cut = c
        return cut


@dataclass
class Step:
    """One language-model call that continues a cache a prefill filled (a decoding step)."""

    prefill: Prefill
    past: int                         # cached tokens in the caller's numbering
    q: int                            # new rows of this call
    new_valid: torch.Tensor           # (B, past + q - S0) caller validity of every row after the prompt
    positions: torch.Tensor           # positions of the q new rows, caller numbering
    hidden: torch.Tensor              # the language model's input (for rotary dtype/device)
    per_cut: dict = field(default_factory=dict)


@dataclass
class VisionRun:
    """One call of the model's image-feature function, and what the encoder probes recorded."""

    kwargs: dict                      # the call's named arguments (pixel_values, image sizes, ...)
    maps: dict = field(default_factory=dict)
    output: Any = None
    time_marks: list = field(default_factory=list)


class PioState:
    """Everything ``apply_pio`` attaches to a model (``model._pio``)."""

    def __init__(self, model: nn.Module, adapter, config) -> None:
        self.model = model
        self.adapter = adapter
        self.config = config
        self.handles: list[Any] = []
        self.patched: list[tuple[Any, str]] = []
        self.call: dict | None = None            # named kwargs of the multimodal forward in progress
        self.prefill: Prefill | None = None      # the last prefill that selected something
        self.pending: Prefill | None = None      # the prefill in progress (set at the language-model call)
        self.step: Step | None = None            # the continuation in progress
        self.labels: torch.Tensor | None = None  # the caller's labels, cloned, while a forward runs
        self.prompt_len: int | None = None       # length of the prompt of the generate call in progress
        self.runs: list[VisionRun] = []          # image-feature calls since the last prefill
        self.run: VisionRun | None = None        # the image-feature call in progress
        self.in_probe = False                    # a scoring rule is running a layer itself

    def current_cut(self, layer_idx: int) -> Cut | None:
        """The rows decoder layer ``layer_idx`` sees in the language-model call in progress.

        ``None`` outside a call that pio changes (the model's own rows). In a prefill (a replay
        included), the rows of that layer; in a decoding step, the prompt rows its cache holds
        (the new rows follow them)."""
        if self.pending is not None:
            return self.pending.cut_for_layer(layer_idx)
        if self.step is not None:
            return self.step.prefill.cut_for_layer(layer_idx)
        return None

