"""Timing and result files shared by every benchmark script.

``time_ms`` takes the median of repeated runs after warm-up: CUDA events on a GPU,
``time.perf_counter`` on CPU. ``environment()`` is the metadata written beside every
figure (device name, versions, date); ``write_results`` stores one run as JSON under
``benchmarks/results/``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_ms(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 3, device: torch.device | str = "cpu") -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device | str) -> dict[str, Any]:
    """Device and versions, recorded beside every figure."""
    env: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for name in ("triton", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    try:
        import pio_kernels
        env["pio_kernels_extension"] = pio_kernels.HAS_EXTENSION
    except ImportError:
        pass
    return env


def write_results(benchmark: str, device: torch.device | str, rows: list[dict[str, Any]], *,
                  tag: str = "", extra: dict[str, Any] | None = None, folder: str | None = None) -> str:
    """Writes ``{"benchmark", **environment, "rows"}`` to <folder>/<benchmark>-<device>[-tag].json.

    ``folder`` defaults to ``benchmarks/results``.
    """
    device = torch.device(device)
    folder = folder or RESULTS_DIR
    os.makedirs(folder, exist_ok=True)
    slug = device_name(device).split(" (")[0].lower().replace(" ", "-")
    name = "-".join(part for part in (benchmark, slug, tag) if part) + ".json"
    path = os.path.join(folder, name)
    payload = {"benchmark": benchmark, **environment(device), **(extra or {}), "rows": rows}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain aligned table of the chosen columns."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
