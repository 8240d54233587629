"""Instruments the selection step of an integrated model: per-stage timers and the reference path.

The integrations call :func:`pio_kernels.proxy_saliency` and :func:`pio_kernels.select_tokens`
through the ``pio_kernels`` module, and encoder-side selection through the adapter's
``reduce_encoder_features``; both context managers here swap those attributes for the
duration of a ``with`` block and put the originals back after.

``StageTimer``    times each selection stage of every prefill: the encoder stage (SPEC 4)
                  and, per decoder stage, the saliency probe plus its NMS calls. CUDA events
                  on a GPU (the elapsed time includes any host sync inside the stage),
                  ``time.perf_counter`` elsewhere. The encoder stage runs the vision tower
                  itself (with whatever hooks the selection puts in it), so the tower's
                  forward is timed too, in every forward (stock ones included): the encoder
                  stage's own cost is its time minus the stock model's tower time.
``reference_path`` forces the literal algorithm of :mod:`pio_kernels.reference` (full-layer
                  autograd saliency, host-side NMS loop): what the released code costs.
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Iterator

import torch

import pio_kernels
from pio_kernels import reference


@contextlib.contextmanager
def _patched(owner: Any, name: str, replacement: Callable) -> Iterator[None]:
    had_own = name in vars(owner)
    original = vars(owner)[name] if had_own else None
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Routes the integrations' saliency and NMS through :mod:`pio_kernels.reference`."""
    with _patched(pio_kernels, "proxy_saliency", reference.proxy_saliency), \
            _patched(pio_kernels, "select_tokens", reference.select_tokens):
        yield


def _vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    inner = getattr(model, "model", model)
    for name in ("vision_tower", "visual"):  # LLaVA / LLaVA-NeXT, Qwen2.5-VL
        tower = getattr(inner, name, None)
        if isinstance(tower, torch.nn.Module):
            return tower
    return None


def _encoder_adapter(model: torch.nn.Module) -> Any | None:
    state = getattr(model, "_pio", None)
    adapter = getattr(state, "adapter", None)
    return adapter if hasattr(adapter, "reduce_encoder_features") else None


class StageTimer:
    """Records the time of every selection stage while active.

    ``with StageTimer(model, device) as timer: model(**inputs)``; then ``timer.stages_ms()``
    gives one list per forward of per-stage milliseconds: the encoder stage first (when the
    schedule has one), then one entry per decoder stage (saliency + NMS of that stage).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str):
        self.model = model
        self.device = torch.device(device)
        self._forwards: list[list[dict]] = []
        self._stack = contextlib.ExitStack()
        self._tower_start: Any = None

    # -- clock ------------------------------------------------------------------------------
    def _mark(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _elapsed(self, start: Any, stop: Any) -> float:
        if self.device.type == "cuda":
            stop.synchronize()
            return start.elapsed_time(stop)
        return (stop - start) * 1e3

    # -- wrappers ---------------------------------------------------------------------------
    def new_forward(self) -> None:
        """Starts the records of a new forward (call before each timed prefill)."""
        self._forwards.append({"stages": [], "tower": []})

    def _current(self) -> dict:
        if not self._forwards:
            self.new_forward()
        return self._forwards[-1]

    def _wrap(self, fn: Callable, kind: str) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            stages = self._current()["stages"]
            if kind == "saliency" or kind == "encoder" or not stages or stages[-1]["kind"] == "encoder":
                stages.append({"kind": kind, "spans": []})
            stage = stages[-1]
            start = self._mark()
            with torch.profiler.record_function(f"pio::{kind}"):  # names the stage in a profile
                out = fn(*args, **kwargs)
            stage["spans"].append((start, self._mark()))
            return out

        return timed

    def _tower_pre_hook(self, module, args) -> None:
        self._tower_start = self._mark()

    def _tower_hook(self, module, args, output) -> None:
        if self._tower_start is not None:
            self._current()["tower"].append((self._tower_start, self._mark()))
            self._tower_start = None

    def __enter__(self) -> "StageTimer":
        stack = self._stack.__enter__()
        stack.enter_context(_patched(pio_kernels, "proxy_saliency", self._wrap(pio_kernels.proxy_saliency, "saliency")))
        stack.enter_context(_patched(pio_kernels, "select_tokens", self._wrap(pio_kernels.select_tokens, "nms")))
        adapter = _encoder_adapter(self.model)
        if adapter is not None:
            stack.enter_context(_patched(adapter, "reduce_encoder_features",
                                         self._wrap(adapter.reduce_encoder_features, "encoder")))
        tower = _vision_tower(self.model)
        if tower is not None:
            for handle in (tower.register_forward_pre_hook(self._tower_pre_hook),
                           tower.register_forward_hook(self._tower_hook)):
                stack.callback(handle.remove)
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)

    def stages_ms(self) -> list[list[float]]:
        """Per forward, per stage: milliseconds (sum of that stage's timed calls; an encoder
        stage includes the vision tower it runs)."""
        return [[sum(self._elapsed(a, b) for a, b in st["spans"]) for st in f["stages"]]
                for f in self._forwards if f["stages"]]

    def tower_ms(self) -> list[float]:
        """Per forward: milliseconds of the vision tower's forward (``[]`` when none ran)."""
        return [sum(self._elapsed(a, b) for a, b in f["tower"]) for f in self._forwards if f["tower"]]

    def stage_kinds(self) -> list[str]:
        """``encoder`` / ``decoder`` for each stage of the last recorded forward."""
        for f in reversed(self._forwards):
            if f["stages"]:
                return ["encoder" if st["kind"] == "encoder" else "decoder" for st in f["stages"]]
        return []
