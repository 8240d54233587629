"""Greedy cosine NMS (``select_tokens``, SPEC section 3): every available path vs the reference.

Shapes: N = 576 (LLaVA-1.5), 2880 (LLaVA-NeXT), 16384 (Qwen2.5-VL, high resolution);
D = 4096 (7B Llama/Vicuna) and 3584 (Qwen2.5-7B); budgets 64, 320 and 11.1% of N;
batch 1 and 8 (and 2, the size of the CPU goal). Features are bf16 hidden states in
clusters (so suppression happens), scores are random.

Each row: the path's median time, the reference's time in the same run, their ratio,
and whether the indices are identical. The reference (``pio_kernels.reference``, the
published algorithm: full N x N matrix, then a host loop) is skipped where its estimated
time exceeds ``REFERENCE_CAP_S``; the row says so. On a GPU the compiled CUDA kernel's
time is also set against its bound (see ``cuda_bound_us``). The ``torch`` path is the
reference loop itself and is not timed twice.

    python benchmarks/nms.py [--device cpu|cuda] [--quick] [--tag TAG]
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
from pio_kernels import reference  # noqa: E402
from pio_kernels.ops import available_backends  # noqa: E402

TAU = 0.8
REFERENCE_CAP_S = 30.0
# Rates assumed for the estimate of the reference's time (reached on the 2-core CPU
# this was written on; a faster machine only makes the cap conservative).
_REF_CPU_GFLOPS = 40.0
_REF_LOOP_PER_S = 2.0e6  # inner iterations of the reference's Python suppression loop
# H100 SXM figures the CUDA kernel is held to (the mask GEMM is fp32 FMA on purpose).
H100_FP32_TFLOPS = 67.0
H100_HBM_TBPS = 3.35
_PREFIX_PER_BUDGET, _PREFIX_MIN, _PREFIX_MAX = 4, 1024, 32768  # as csrc/cuda/select_tokens.cu


def _features(batch: int, n: int, d: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clusters = max(1, n // 6)
    centres = torch.randn(clusters, d, generator=g)
    x = torch.empty(batch, n, d, dtype=torch.bfloat16)
    for b in range(batch):  # one row at a time: the fp32 temporaries stay small
        assign = torch.randint(0, clusters, (n,), generator=g)
        x[b] = centres[assign] + 0.6 * torch.randn(n, d, generator=g)
    s = torch.rand(batch, n, generator=g)
    return x.to(device), s.to(device)


def cuda_bound_us(batch: int, n: int, d: int, budget: int) -> tuple[float, float, float]:
    """(FLOPs, bytes, bound in us) of the CUDA kernel: the upper-triangle fp32 mask GEMM over
    the prefix M (M^2 D FLOPs per row) and the normalisation (bf16 read, fp32 write, fp32
    read by the GEMM: 10 bytes per element)."""
    m = min(n, max(_PREFIX_PER_BUDGET * budget, _PREFIX_MIN), _PREFIX_MAX)
    flops = batch * m * m * d
    nbytes = batch * n * d * 10
    bound_s = max(flops / (H100_FP32_TFLOPS * 1e12), nbytes / (H100_HBM_TBPS * 1e12))
    return float(flops), float(nbytes), bound_s * 1e6


def _reference_estimate_s(batch: int, n: int, d: int, budget: int) -> float:
    return batch * (2.0 * n * n * d / (_REF_CPU_GFLOPS * 1e9) + budget * n / _REF_LOOP_PER_S)


def _shapes(quick: bool) -> list[tuple[int, int, int, int]]:
    """(batch, N, D, budget) rows."""
    if quick:
        return [(b, n, 4096, k) for n in (576, 2880) for b in (1, 2) for k in (64, 320)]
    rows = []
    for n in (576, 2880, 16384):
        for d in (4096, 3584):
            for b in (1, 8) if d == 4096 else (1,):
                for k in sorted({64, 320, round(0.111 * n)}):
                    rows.append((b, n, d, k))
    rows.append((2, 2880, 4096, 320))  # the CPU goal
    return rows


def run(device: str, quick: bool) -> list[dict]:
    """Times every available path at the benchmark shapes on ``device``; one dict per (shape, path)."""
    dev = torch.device(device)
    paths = [p for p in available_backends(dev) if p != "torch"]
    rows: list[dict] = []
    for batch, n, d, budget in _shapes(quick):
        x, s = _features(batch, n, d, device)
        est = _reference_estimate_s(batch, n, d, budget)
        ref_ms, want, note = None, None, ""
        if est <= REFERENCE_CAP_S:
            repeat = 3 if est <= 10 else 1
            ref_ms = harness.time_ms(lambda: reference.select_tokens(x, s, budget, TAU), warmup=0, repeat=repeat,
                                     device=dev)
            want = reference.select_tokens(x, s, budget, TAU).cpu()
            note = f"reference median of {repeat}"
        else:
            note = f"reference skipped (estimated {est:.0f} s > {REFERENCE_CAP_S:.0f} s)"
        for path in paths:
            fn = lambda: pio_kernels.select_tokens(x, s, budget, TAU, backend=path)  # noqa: E731
            got = fn().cpu()
            ms = harness.time_ms(fn, warmup=1, repeat=3, device=dev)
            row = {"path": path, "batch": batch, "N": n, "D": d, "budget": budget, "tau": TAU,
                   "ms": ms, "reference_ms": ref_ms,
                   "speedup": None if ref_ms is None else ref_ms / ms,
                   "identical": None if want is None else bool(torch.equal(got, want)),
                   "note": note}
            if path == "cuda":
                flops, nbytes, bound = cuda_bound_us(batch, n, d, budget)
                row.update(flops=flops, bytes=nbytes, bound_us=bound, of_bound=bound / (ms * 1e3))
            rows.append(row)
        del x, s
    return rows


COLUMNS = ["path", "batch", "N", "D", "budget", "ms", "reference_ms", "speedup", "identical", "bound_us",
           "of_bound", "note"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="N in {576, 2880}, batch 1 and 2, D 4096 only")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows = run(args.device, args.quick)
    harness.print_table(rows, COLUMNS)
    extra = {"tau": TAU, "quick": args.quick, "reference_cap_s": REFERENCE_CAP_S,
             "seconds": round(time.perf_counter() - t0, 1),
             "bound_assumptions": {"fp32_tflops": H100_FP32_TFLOPS, "hbm_tbps": H100_HBM_TBPS}}
    path = harness.write_results("nms", args.device, rows, tag=args.tag, extra=extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
