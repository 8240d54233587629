"""Greedy cosine NMS (``select_tokens``, SPEC section 3): every available path vs the reference.

Shapes: N = 576 (LLaVA-1.5), 2880 (LLaVA-NeXT), 16384 (Qwen2.5-VL, high resolution);
D = 4096 (7B Llama/Vicuna) and 3584 (Qwen2.5-7B); budgets 64, 320 and 11.1% of N;
batch 1 and 8 (and 2, the size of the CPU goal). Two kinds of features, bf16:
``clustered`` (hidden states in clusters of about 6, so suppression happens and the walk
ends in the prefix) and ``heavy`` (one tight cluster with a few distinct tokens spread over
the order: the walk must go through every block of the GPU paths, the worst case).

Each row: the path's median time, the reference's time in the same run, their ratio,
and whether the indices are identical (``identical_to`` says to what: the reference, or,
where the reference is too slow and the walk is cheap for it, the compiled CPU kernel,
itself tested against the reference); GPU paths also say whether they agree with the
compiled CUDA kernel (``same_as_cuda``; the clustered features can put a pair within
rounding of tau, where fp32 sums in a different order may legitimately decide otherwise). The reference (``pio_kernels.reference``, the
published algorithm: full N x N matrix, then a host loop) is skipped where its estimated
time exceeds ``--reference-cap-s``; the row says so. GPU paths are timed with
``harness.time_ms`` (``triton.testing.do_bench``, L2 flushed, median) and, where the launch
sequence can be captured, also in a CUDA graph (``graph_ms``: the same work without the
launch overhead of its 2 + 3 x blocks launches); the reference and CPU paths by the wall clock.
On a GPU the compiled CUDA kernel's time is also set against its bound (see
``cuda_bound_us``). The ``torch`` path (device tensor ops, ``pio_kernels/nms.py``) does the
reference's N^2 D GEMM, holds B x N x N fp32 similarities and takes N sequential steps: on
CPU it is skipped where the reference is, on a GPU above N = 4096, and everywhere above
``TORCH_PATH_CAP_BYTES``.

    python benchmarks/nms.py [--device cpu|cuda] [--preset quick|full|gpu-check] [--tag TAG]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import pio_kernels  # noqa: E402
from pio_kernels import nms, reference  # noqa: E402
from pio_kernels.ops import BACKENDS, available_backends  # noqa: E402

TAU = 0.8
REFERENCE_CAP_S = 30.0
TORCH_PATH_CAP_BYTES = 2 << 30
TORCH_PATH_MAX_N_CUDA = 4096     # N sequential steps of small launches on a GPU
CPP_CHECK_MAX_FMAS = 4e9         # compiled CPU kernel as the identity check, up to this work
# Rates assumed for the estimate of the reference's time (reached on the 2-core CPU
# this was written on; a faster machine only makes the cap conservative).
_REF_CPU_GFLOPS = 40.0
_REF_LOOP_PER_S = 2.0e6  # inner iterations of the reference's Python suppression loop
# H100 SXM figures the CUDA kernel is held to (the mask GEMM is fp32 FMA on purpose).
H100_FP32_TFLOPS = 67.0
H100_HBM_TBPS = 3.35
KINDS = ("clustered", "heavy")


def _features(batch: int, n: int, d: int, device: str, seed: int = 0,
              kind: str = "clustered") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) bf16 features and (B, N) fp32 scores of ``kind`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(batch, n, d, dtype=torch.bfloat16)
    if kind == "heavy":  # cos > 0.97 inside the cluster; the distinct tokens are orthogonal to it
        centre = torch.zeros(d)
        centre[0] = 1.0
        for b in range(batch):
            row = centre + 0.1 / d ** 0.5 * torch.randn(n, d, generator=g)
            row[:, 1:17] = 0
            distinct = torch.randperm(n, generator=g)[:16]
            row[distinct] = 0
            row[distinct, 1 + torch.arange(16)] = 1.0
            x[b] = row
        return x.to(device), torch.rand(batch, n, generator=g).to(device)
    clusters = max(1, n // 6)
    centres = torch.randn(clusters, d, generator=g)
    for b in range(batch):  # one row at a time: the fp32 temporaries stay small
        assign = torch.randint(0, clusters, (n,), generator=g)
        x[b] = centres[assign] + 0.6 * torch.randn(n, d, generator=g)
    s = torch.rand(batch, n, generator=g)
    return x.to(device), s.to(device)


def cuda_bound_us(batch: int, n: int, d: int, budget: int) -> tuple[float, float, float]:
    """(FLOPs, bytes, bound in us) of the CUDA kernel when the walk ends in the prefix: the
    upper-triangle fp32 mask GEMM over the prefix M (M^2 D FLOPs per row,
    ``pio_kernels.nms.block_plan``) and the normalisation (bf16 read, fp32 write, fp32 read
    by the GEMM: 10 bytes per element). A walk past the prefix adds at most 2 (N - M) (k + T)
    D FLOPs (T the later blocks' size)."""
    m = nms.block_plan(n, budget)[0][1]
    flops = batch * m * m * d
    nbytes = batch * n * d * 10
    bound_s = max(flops / (H100_FP32_TFLOPS * 1e12), nbytes / (H100_HBM_TBPS * 1e12))
    return float(flops), float(nbytes), bound_s * 1e6


def _reference_estimate_s(batch: int, n: int, d: int, budget: int) -> float:
    return batch * (2.0 * n * n * d / (_REF_CPU_GFLOPS * 1e9) + budget * n / _REF_LOOP_PER_S)


PRESETS = ("quick", "full", "gpu-check")


def _shapes(preset: str) -> list[tuple[int, int, int, int, str]]:
    """(batch, N, D, budget, kind) rows of a preset."""
    if preset == "quick":
        return [(b, n, 4096, k, "clustered") for n in (576, 2880) for b in (1, 2) for k in (64, 320)] + \
            [(1, 2880, 4096, 64, "heavy")]
    if preset == "gpu-check":  # minutes on a GPU: D 4096, batch 1 and 8, both kinds
        rows = []
        for n in (576, 2880, 16384):
            for b in (1, 8):
                rows += [(b, n, 4096, k, "clustered") for k in sorted({64, round(0.111 * n)})]
                rows.append((b, n, 4096, 64, "heavy"))
        return rows
    rows = []
    for n in (576, 2880, 16384):
        for d in (4096, 3584):
            for b in (1, 8) if d == 4096 else (1,):
                for k in sorted({64, 320, round(0.111 * n)}):
                    rows.append((b, n, d, k, "clustered"))
                if d == 4096:
                    rows.append((b, n, d, 64, "heavy"))
    rows.append((2, 2880, 4096, 320, "clustered"))  # the CPU goal
    return rows


def _cpp_fmas(batch: int, n: int, d: int, budget: int, kind: str) -> float:
    """Upper estimate of the compiled CPU kernel's multiply-adds (candidates x picks x D)."""
    if kind == "heavy":  # every candidate walked, each stopped by the cluster's pick (one of the first few)
        return float(batch) * n * 4 * d
    return float(batch) * min(n, 8 * budget) * budget * d  # the walk ends soon after the budget


def run(device: str, quick: bool, preset: str | None = None, reference_cap_s: float = REFERENCE_CAP_S,
        paths: list[str] | None = None) -> list[dict]:
    """Times every available path at the preset's shapes on ``device``; one dict per (shape, path).

    ``preset`` defaults to ``quick`` when ``quick`` (or on CPU), else ``full``.
    """
    dev = torch.device(device)
    preset = preset or ("quick" if quick or dev.type != "cuda" else "full")
    paths = [p for p in available_backends(dev) if paths is None or p in paths]
    cpp_ok = "cpp" in available_backends("cpu")
    rows: list[dict] = []
    for batch, n, d, budget, kind in _shapes(preset):
        x, s = _features(batch, n, d, device, kind=kind)
        base = {"batch": batch, "N": n, "D": d, "budget": budget, "tau": TAU, "kind": kind,
                "blocks": len(nms.block_plan(n, budget))}
        est = _reference_estimate_s(batch, n, d, budget)
        ref_ms, want, note, against = None, None, "", None
        if est <= reference_cap_s:
            repeat = 3 if est <= 10 else 1
            want = reference.select_tokens(x, s, budget, TAU).cpu()  # also the warm-up
            ref_ms = harness.wall_ms(lambda: reference.select_tokens(x, s, budget, TAU), warmup=0, repeat=repeat,
                                     device=dev)
            note, against = f"reference median of {repeat}", "reference"
        else:
            note = f"reference skipped (estimated {est:.0f} s > {reference_cap_s:.0f} s)"
            if cpp_ok and _cpp_fmas(batch, n, d, budget, kind) <= CPP_CHECK_MAX_FMAS:
                want = pio_kernels.select_tokens(x.cpu(), s.cpu(), budget, TAU, backend="cpp")
                against = "cpp"
        outputs: dict[str, torch.Tensor] = {}
        for path in paths:
            row = {"path": path, **base}
            if path == "torch" and dev.type == "cpu" and est > reference_cap_s:
                rows.append({**row, "note": f"skipped: same N^2 D GEMM as the reference (estimated {est:.0f} s)"})
                continue
            if path == "torch" and dev.type == "cuda" and n > TORCH_PATH_MAX_N_CUDA:
                rows.append({**row, "note": f"skipped: N sequential steps of small launches (N > "
                                            f"{TORCH_PATH_MAX_N_CUDA})"})
                continue
            if path == "torch" and batch * n * n * 5 > TORCH_PATH_CAP_BYTES:
                rows.append({**row, "note": f"skipped: B N^2 x 5 bytes > {TORCH_PATH_CAP_BYTES >> 30} GiB"})
                continue
            fn = lambda: pio_kernels.select_tokens(x, s, budget, TAU, backend=path)  # noqa: E731
            got = outputs[path] = fn().cpu()  # also the warm-up (Triton compiles here)
            if "cuda" in outputs and path != "cuda":  # GPU paths against each other, always
                row["same_as_cuda"] = bool(torch.equal(got, outputs["cuda"]))
            if dev.type == "cuda":
                ms = harness.time_ms(fn, device=dev)
            else:
                ms = harness.wall_ms(fn, warmup=0, repeat=3 if est <= 10 or path != "torch" else 1, device=dev)
            row.update(ms=ms, reference_ms=ref_ms, speedup=None if ref_ms is None else ref_ms / ms,
                       identical=None if want is None else bool(torch.equal(got, want)), identical_to=against,
                       note=note)
            if dev.type == "cuda" and path in ("cuda", "triton"):
                try:
                    row["graph_ms"] = harness.time_ms(fn, device=dev, graph=True)
                except Exception as exc:  # noqa: BLE001 - a capture failure is reported, not fatal
                    row["graph_ms"] = None
                    row["note"] += f"; graph capture failed: {type(exc).__name__}: {exc}"[:200]
            if path == "cuda":
                flops, nbytes, bound = cuda_bound_us(batch, n, d, budget)
                row.update(flops=flops, bytes=nbytes, bound_us=bound, of_bound=bound / (ms * 1e3))
            rows.append(row)
        del x, s
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


COLUMNS = ["path", "kind", "batch", "N", "D", "budget", "blocks", "ms", "graph_ms", "reference_ms", "speedup",
           "identical", "identical_to", "same_as_cuda", "bound_us", "of_bound", "note"]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the quick preset")
    parser.add_argument("--preset", choices=PRESETS,
                        help="shapes: quick (CPU default), full (GPU default), gpu-check (what make gpu-check runs)")
    parser.add_argument("--paths", nargs="+", choices=BACKENDS, help="default: every available path")
    parser.add_argument("--reference-cap-s", type=float, default=REFERENCE_CAP_S,
                        help="skip the reference where its estimated time is above this")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--results-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.device, args.quick, args.preset, args.reference_cap_s, args.paths)
    harness.print_table(rows, COLUMNS)
    bad = [r for r in rows if r.get("identical") is False]
    for r in bad:
        print(f"  NOT IDENTICAL: {r['path']} {r['kind']} B={r['batch']} N={r['N']} budget={r['budget']} "
              f"vs {r['identical_to']}")
    if not args.no_write:
        extra = {"tau": TAU, "quick": args.quick, "preset": args.preset, "reference_cap_s": args.reference_cap_s,
                 "seconds": round(time.perf_counter() - t0, 1),
                 "bound_assumptions": {"fp32_tflops": H100_FP32_TFLOPS, "hbm_tbps": H100_HBM_TBPS}}
        path = harness.write_results("nms", args.device, rows, tag=args.tag, extra=extra, folder=args.results_dir)
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
