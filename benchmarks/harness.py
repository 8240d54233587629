"""Timing and result files shared by every benchmark script.

``time_ms`` times a kernel or a short GPU function the way the field does: on a GPU with
``triton.testing.do_bench`` (the L2 cache flushed before every timed call, the number of
calls set by a time budget, the median reported), or its CUDA-graph variant
(``graph=True``: no launch overhead, for launch-bound sequences); on CPU the median of
``repeat`` wall-clock runs after ``warmup``. ``wall_ms`` times end-to-end and host-bound work
(a model's prefill or ``generate``, the reference's host loop) by the wall clock on any
device, synchronising before and after each call: a given number of calls, no cache flush.
``environment()`` is the metadata written beside every figure (device name, versions,
date); ``write_results`` stores one run as JSON under ``benchmarks/results/``.
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


def time_ms(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 3, device: torch.device | str = "cpu",
            graph: bool = False, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median time of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench(fn, warmup_ms, rep_ms, return_mode="median")`` (L2 flushed
    before every timed call; ``warmup``/``repeat`` are not used: do_bench sizes both from its
    own estimate, at least 1 + 5 + 1 + 1 calls), or ``do_bench_cudagraph`` when ``graph``
    (``fn`` must be capturable; run it once before). Without Triton,
    ``torch.utils.benchmark.Timer.blocked_autorange``. CPU: the median of ``repeat`` wall-clock
    runs after ``warmup`` calls.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return wall_ms(fn, warmup=warmup, repeat=repeat, device=device)
    with torch.cuda.device(device):
        try:
            import triton.testing
        except ImportError:  # no Triton: torch's own benchmark timer (synchronises, no L2 flush)
            import torch.utils.benchmark as tub
            return tub.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=rep_ms / 1e3).median * 1e3
        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def wall_ms(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 3, device: torch.device | str = "cpu") -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeat`` calls after ``warmup`` calls,
    the device synchronised before and after each (host work and syncs inside ``fn`` count)."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
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
