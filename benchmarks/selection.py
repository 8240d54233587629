"""Instruments the selection step of an integrated model: per-stage timers and the reference path.

The integrations call :func:`pio_kernels.proxy_saliency` and :func:`pio_kernels.select_tokens`
through the ``pio_kernels`` module; ``reference_path`` swaps those attributes for the duration
of a ``with`` block and puts the originals back after.

``StageTimer``    collects the selection time of each stage of every prefill, as the engine
                  measures it (``last_stats``: CUDA events on a GPU, ``perf_counter``
                  elsewhere), and times the vision tower.
``reference_path`` forces the literal algorithm of :mod:`pio_kernels.reference` (full-layer
                  autograd saliency, host-side NMS loop): what the released code costs.
"""
from __future__ import annotations

import contextlib
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


class StageTimer:
    """Records, for every timed forward, the selection time of each stage and the tower's time.

    ``with StageTimer(model, device) as timer: timer.new_forward(); model(**inputs)``; then
    ``timer.stages_ms()`` gives one list per forward of per-stage milliseconds, as the engine
    measured them (``last_stats``): the encoder stage first (when the schedule has one: its
    probes inside the vision tower plus the selection and merging, net of the stock tower),
    then one entry per decoder stage (scoring + NMS + gathering). The vision tower's forward is
    timed too (``tower_ms``), in every forward (stock ones included).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str):
        self.model = model
        self.device = torch.device(device)
        self._forwards: list[dict] = []
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

    def new_forward(self) -> None:
        """Starts the records of a new forward (call before each timed prefill)."""
        self._forwards.append({"prefill": None, "tower": []})

    def _current(self) -> dict:
        if not self._forwards:
            self.new_forward()
        return self._forwards[-1]

    def _model_hook(self, module, args, output) -> None:
        state = getattr(self.model, "_pio", None)
        if state is not None and state.prefill is not None:
            self._current()["prefill"] = state.prefill  # read after the timed region: no sync here

    def _tower_pre_hook(self, module, args) -> None:
        self._tower_start = self._mark()

    def _tower_hook(self, module, args, output) -> None:
        if self._tower_start is not None:
            self._current()["tower"].append((self._tower_start, self._mark()))
            self._tower_start = None

    def __enter__(self) -> "StageTimer":
        stack = self._stack.__enter__()
        handle = self.model.register_forward_hook(self._model_hook)
        stack.callback(handle.remove)
        tower = _vision_tower(self.model)
        if tower is not None:
            for handle in (tower.register_forward_pre_hook(self._tower_pre_hook),
                           tower.register_forward_hook(self._tower_hook)):
                stack.callback(handle.remove)
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)

    def stages_ms(self) -> list[list[float]]:
        """Per forward that selected, per stage: milliseconds of selection."""
        return [f["prefill"].stats.selection_ms() for f in self._forwards if f["prefill"] is not None]

    def tower_ms(self) -> list[float]:
        """Per forward: milliseconds of the vision tower's forward (``[]`` when none ran)."""
        return [sum(self._elapsed(a, b) for a, b in f["tower"]) for f in self._forwards if f["tower"]]

    def stage_kinds(self) -> list[str]:
        """``encoder`` / ``decoder`` for each stage of the last recorded forward."""
        for f in reversed(self._forwards):
            if f["prefill"] is not None:
                return ["encoder" if k == "encoder" else "decoder" for k in f["prefill"].stats.stage_kinds]
        return []
