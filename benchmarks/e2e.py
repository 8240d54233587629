"""End-to-end prefill and generation: stock model vs the published schedules, ours vs reference path.

For each model shape of :mod:`vlm_shapes` (LLaVA-1.5-7B, LLaVA-NeXT-7B, Qwen2.5-VL-7B, random
weights built on the device) and each batch size, it measures

* ``stock``                    the unmodified model;
* ``ours``      per schedule   ``apply_pio`` with the library's kernels;
* ``reference`` per schedule   the same schedule with saliency and NMS forced through
                               :mod:`pio_kernels.reference` (what the released code costs).

Schedules (SPEC section 1) at each retained-token fraction (default 11.1% and 22.2%, the
published 64- and 128-token averages), with (``w/ VE``) and without (``w/o VE``) encoder-side
selection. On LLaVA-1.5-7B the published schedules are used as they are; the other models get
the same budgets scaled to their visual-token count (and, for Qwen2.5-VL without VE, to its
28 layers; LLaVA-NeXT's encoder budget is per crop and its newline tokens always stay);
every row records its ``layers``/``keep``/``encoder_keep`` and whether it is ``published``
or ``scaled``. ``retention`` and ``tflops`` are computed from the tokens the model really
kept (``kept_tokens``, read back with ``last_selection``; ``counts_from`` says so).

Columns: prefill ms (one forward with an empty cache, logits of the last row only), total ms
(``generate`` with a fixed number of new tokens), visual-token FLOPs by the SPEC section 6
formula ``sum over layers of 4nd^2 + 2n^2d + 2ndm``, the KV cache measured after prefill (MiB
per sample), selection ms per stage and its share of the prefill, and speedups against the
stock model of the same run (``selection_share_stages``: each stage's share). The encoder
stage (w/ VE) runs the vision tower itself: its selection ms is the stage's time minus the
stock model's vision tower (``tower_ms``), both in the row. Timing: ``harness.wall_ms``
(synchronised wall clock, median after warm-up: host syncs inside a stage count); bf16 and
SDPA with the flash backend first on a GPU.

Sizes (``--size``, :mod:`vlm_shapes`): ``full`` (the 7B shapes; the GPU default), ``tiny``
(widths of a few dozen channels, same depth and visual-token counts: the CPU default and
``--quick``; those rows check that the script works and say nothing about speed, the JSON
says ``"size": "tiny"``) and ``half`` (the full 7B widths at about half depth, fp32 on a
CPU: LLaVA-1.5-7B with the whole CLIP ViT-L/14-336 and 16 Llama-7B layers, Qwen2.5-VL-7B
with 16 vision blocks and 10 layers; about 14 GiB). Schedules follow the depth: stage
layers scaled by ``layers / 32`` (``/ 28`` for Qwen), e.g. LLaVA-1.5 w/ VE at 16 layers is
``encoder_keep=96``, layer 8 keeps 32; the w/o VE budgets are rescaled so the average over
the layers stays at the retention. ``--layers`` / ``--vision-layers`` override the depth
(a smoke test of ``half`` on a small machine).

    python benchmarks/e2e.py                     # everything, for the device present
    python benchmarks/e2e.py --models llava-1.5-7b --batches 1   # a part (own JSON file)
    python benchmarks/e2e.py --quick             # tiny shapes, few repeats (CI)
    python benchmarks/e2e.py --device cpu --size half --models llava-1.5-7b qwen2.5-vl-7b
    python benchmarks/e2e.py --device cpu --size half --layers 4 --models llava-1.5-7b \
        --new-tokens 1 --repeat 1 --no-write       # smoke test of the half size (LLaVA's encoder
                                                   # selection reads CLIP layer 5: keep its depth)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import selection  # noqa: E402
import vlm_shapes  # noqa: E402

from pio_kernels.integrations import hf  # noqa: E402

COLUMNS = ["model", "batch", "schedule", "path", "retention", "prefill_ms", "total_ms", "prefill_speedup",
           "total_speedup", "tflops", "kv_cache_mb", "selection_ms", "selection_share"]

# LLaVA-1.5-7B, the published schedules (SPEC section 1), by average retained fraction.
_LLAVA15_NO_VE = {64: ((1, 10, 15), (92, 54, 22)), 128: ((1, 10, 15), (218, 128, 54))}
_LLAVA15_VE = {64: ((16,), (32,), 96)}
_LLAVA15_TOKENS, _LLAVA15_LAYERS = 576, 32
_QWEN_LAYERS = 28


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    name: str                          # "w/ VE" | "w/o VE"
    layers: tuple[int, ...]
    keep: tuple[int | float, ...]
    encoder_keep: int | float | None
    source: str                        # "published" | "scaled"

    def config(self):
        from pio_kernels.integrations import PioConfig
        return PioConfig(layers=self.layers, keep=self.keep, tau=0.8, num_positions=4,
                         encoder_keep=self.encoder_keep)

    def tokens_per_layer(self, visual: int, num_layers: int) -> list[int]:
        """Visual tokens each decoder layer sees (per image), the ``n`` of the FLOP formula."""
        from pio_kernels.eval.accounting import schedule_tokens_per_layer
        return schedule_tokens_per_layer(self, visual, num_layers)

    def describe(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "keep": list(self.keep), "encoder_keep": self.encoder_keep,
                "schedule_source": self.source}


def _scaled_layers(layers: tuple[int, ...], published_depth: int, num_layers: int) -> tuple[int, ...] | None:
    """Stage layers of a ``published_depth``-layer schedule placed in ``num_layers`` layers:
    scaled and rounded, kept >= 1 and strictly increasing; ``None`` when they do not fit."""
    out: list[int] = []
    for layer in layers:
        scaled = max(1, round(layer * num_layers / published_depth))
        out.append(max(scaled, out[-1] + 1) if out else scaled)
    return tuple(out) if out[-1] < num_layers else None


def schedules(model: str, visual: int, num_layers: int, retention: float) -> list[Schedule]:
    """The w/ VE and w/o VE schedules of ``model`` at an average retained fraction ``retention``.

    ``num_layers`` is the model's depth: the published stage layers (of 32 layers, 28 for
    Qwen2.5-VL) are scaled to it; a schedule whose stages do not fit is left out.
    """
    avg = round(retention * _LLAVA15_TOKENS)  # in LLaVA-1.5 tokens: 64 or 128 for the published ones
    full_depth = _QWEN_LAYERS if model == "qwen2.5-vl-7b" else _LLAVA15_LAYERS
    out = []
    # With encoder-side selection.
    if model == "qwen2.5-vl-7b":
        published = abs(retention - 1 / 9) < 1e-3 and num_layers == full_depth
        ratio = round(0.167 * retention * 9, 3)  # encoder keeps 16.7% at 11.1%, layer 14 a third of it
        ve = ((14,), (0.333,), ratio, published)
    elif model == "llava-next-7b":
        # The integration's encoder budget is per crop (newline tokens always stay): the
        # LLaVA-1.5 fractions, 96 of each 576-token crop, then a third of those at layer 16.
        layers, keep, enc = _LLAVA15_VE[64]
        ve = (layers, (round(keep[0] / enc, 3),), round(enc / _LLAVA15_TOKENS * retention * 9, 3), False)
    else:
        layers, keep, enc = _LLAVA15_VE[64]
        factor = retention * 9                   # the published one is the 11.1% point
        scale = visual / _LLAVA15_TOKENS
        published = model == "llava-1.5-7b" and abs(factor - 1) < 1e-3 and num_layers == full_depth
        ve = (layers, (max(1, round(keep[0] * factor * scale)),), max(1, round(enc * factor * scale)), published)
    ve_layers = _scaled_layers(ve[0], full_depth, num_layers)
    if ve_layers is not None:
        out.append(Schedule("w/ VE", ve_layers, ve[1], ve[2], "published" if ve[3] else "scaled"))
    # Without: the LLaVA-1.5 budgets (published at 64 and 128 average tokens), scaled to the
    # model's visual tokens and depth so that the average over layers is ``retention``.
    base_layers, base_keep = _LLAVA15_NO_VE[128 if avg >= 96 else 64]
    fractions = [k / _LLAVA15_TOKENS for k in base_keep]
    layers = _scaled_layers(base_layers, _LLAVA15_LAYERS, num_layers)
    if layers is None:
        return out
    spans = [b - a for a, b in zip(layers, layers[1:] + (num_layers,))]
    rest = sum(f * s for f, s in zip(fractions, spans))
    gain = (retention * num_layers - layers[0]) / rest
    keep = tuple(max(1, round(f * gain * visual)) for f in fractions)
    published = model == "llava-1.5-7b" and avg in _LLAVA15_NO_VE and num_layers == _LLAVA15_LAYERS
    if published:
        layers, keep = _LLAVA15_NO_VE[avg]
    out.append(Schedule("w/o VE", layers, keep, None, "published" if published else "scaled"))
    return out


def visual_tflops(counts: list[int], hidden: int, mlp: int) -> float:
    """SPEC section 6: sum over layers of 4nd^2 + 2n^2d + 2ndm, per image, in TFLOPs."""
    from pio_kernels.integrations import visual_flops
    return visual_flops(counts, hidden, mlp) / 1e12


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------
def kv_cache_bytes(cache) -> int:
    """Bytes held by a transformers cache (keys and values of every layer)."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for name in ("key_cache", "value_cache"):  # older transformers
        for t in getattr(cache, name, []):
            total += t.numel() * t.element_size()
    return total


def kept_counts(model: torch.nn.Module) -> dict[str, Any] | None:
    """Visual tokens per sample (batch mean) the last prefill kept: after the encoder stage
    (``None`` without one) and after each decoder stage; ``None`` on a stock model."""
    if getattr(model, "_pio", None) is None:
        return None
    from pio_kernels.integrations import last_selection

    def mean_count(kept: torch.Tensor) -> float:
        return float((kept >= 0).sum(dim=1).float().mean())

    encoder = last_selection(model, encoder=True)
    return {"encoder": None if encoder is None else mean_count(encoder),
            "stages": [mean_count(k) for k in last_selection(model)]}


def layer_counts(kept: dict[str, Any], layers: tuple[int, ...], visual: int, num_layers: int) -> list[float]:
    """Visual tokens each decoder layer saw, from :func:`kept_counts` and the stage layers."""
    n = visual if kept["encoder"] is None else kept["encoder"]
    counts, stage = [], 0
    for layer in range(num_layers):
        while stage < len(layers) and layers[stage] == layer:
            n = kept["stages"][stage]
            stage += 1
        counts.append(n)
    return counts


@contextlib.contextmanager
def attention_backends(device: torch.device) -> Iterator[None]:
    """SDPA with the flash backend first on a GPU (masked layers fall back to efficient)."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
             SDPBackend.MATH]
    try:
        context = sdpa_kernel(order, set_priority=True)
    except TypeError:  # a torch without backend priorities: flash is still the first choice when it applies
        context = sdpa_kernel(order)
    with context:
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(built: vlm_shapes.Built, inputs: dict[str, Any], *, new_tokens: int, warmup: int, repeat: int,
            device: torch.device) -> dict[str, Any]:
    """Prefill ms, total ms, KV MiB per sample, vision-tower ms and selection ms per stage.

    Selection ms per stage are the engine's own (the encoder stage: its probes inside the
    vision tower plus selection and merging, net of the stock tower); the tower time is kept in
    the row too.
    """
    model = built.model
    batch = inputs["input_ids"].shape[0]

    def prefill():
        return model(**inputs, use_cache=True, logits_to_keep=1)

    def generate():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    with torch.no_grad(), attention_backends(device):
        out = prefill()
        kv = kv_cache_bytes(hf.output_cache(out)) / batch / 2**20
        del out
        kept = kept_counts(model)
        prefill_ms = harness.wall_ms(prefill, warmup=warmup, repeat=repeat, device=device)
        total_ms = harness.wall_ms(generate, warmup=min(warmup, 1), repeat=repeat, device=device)
        row: dict[str, Any] = {"prefill_ms": prefill_ms, "total_ms": total_ms, "kv_cache_mb": kv}
        if kept is not None:
            row["kept_tokens"] = kept
        with selection.StageTimer(model, device) as timer:
            for _ in range(repeat):
                timer.new_forward()
                prefill()
                _sync(device)
    if timer.tower_ms():
        row["tower_ms"] = statistics.median(timer.tower_ms())
    per_forward = timer.stages_ms()
    if per_forward and len({len(f) for f in per_forward}) == 1:
        stages = [statistics.median(col) for col in zip(*per_forward)]
        kinds = timer.stage_kinds()
        row["selection_ms"] = stages
        row["selection_stages"] = kinds
        row["selection_ms_total"] = sum(stages)
        row["selection_share"] = sum(stages) / prefill_ms
        row["selection_share_stages"] = [ms / prefill_ms for ms in stages]
    return row


def run_model(name: str, size: str, device: torch.device, dtype: torch.dtype, args, progress) -> list[dict]:
    from pio_kernels.integrations import apply_pio, remove_pio

    built = vlm_shapes.build(name, size, device, dtype, layers=args.layers, vision_layers=args.vision_layers)
    rows: list[dict[str, Any]] = []
    base = {"model": name, "size": size, "visual_tokens": built.visual_tokens, "seq_len": built.seq_len,
            "num_layers": built.num_layers, "new_tokens": args.new_tokens, "dtype": str(dtype).replace("torch.", "")}
    for batch in args.batches:
        inputs = built.make_inputs(batch)
        stock_counts = [built.visual_tokens] * built.num_layers
        stock = {**base, "batch": batch, "schedule": "stock", "path": "stock", "retention": 1.0,
                 "tflops": visual_tflops(stock_counts, built.hidden, built.mlp)}
        progress.set_postfix_str(f"{name} b{batch} stock")
        stock.update(measure(built, inputs, new_tokens=args.new_tokens, warmup=args.warmup, repeat=args.repeat,
                             device=device))
        progress.update()
        rows.append(stock)
        for retention in args.retentions:
            for schedule in schedules(name, built.visual_tokens, built.num_layers, retention):
                if schedule.name not in args.schedules:
                    continue
                counts = schedule.tokens_per_layer(built.visual_tokens, built.num_layers)
                for path in args.paths:
                    if path == "reference" and batch not in args.reference_batches:
                        continue
                    row = {**base, "batch": batch, "schedule": schedule.name, "path": path,
                           "retention": sum(counts) / (built.visual_tokens * built.num_layers),
                           "tflops": visual_tflops(counts, built.hidden, built.mlp), "counts_from": "schedule",
                           **schedule.describe()}
                    progress.set_postfix_str(f"{name} b{batch} {schedule.name} {retention:.3f} {path}")
                    repeat = args.repeat if path == "ours" else max(1, min(args.repeat, args.reference_repeat))
                    warmup = args.warmup if path == "ours" else min(args.warmup, 1)
                    try:
                        apply_pio(built.model, schedule.config())
                        try:
                            with selection.reference_path() if path == "reference" else contextlib.nullcontext():
                                row.update(measure(built, inputs, new_tokens=args.new_tokens, warmup=warmup,
                                                   repeat=repeat, device=device))
                        finally:
                            remove_pio(built.model)
                    except (ValueError, NotImplementedError, TypeError, RuntimeError) as exc:
                        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    if row.get("kept_tokens") and len(row["kept_tokens"]["stages"]) == len(schedule.layers):
                        # what the model really kept (per-crop budgets and LLaVA-NeXT's newline tokens included)
                        measured = layer_counts(row["kept_tokens"], schedule.layers, built.visual_tokens,
                                                built.num_layers)
                        row["retention"] = sum(measured) / (built.visual_tokens * built.num_layers)
                        row["tflops"] = visual_tflops(measured, built.hidden, built.mlp)
                        row["counts_from"] = "measured"
                    if "prefill_ms" in row:
                        row["prefill_speedup"] = stock["prefill_ms"] / row["prefill_ms"]
                        row["total_speedup"] = stock["total_ms"] / row["total_ms"]
                        row["kv_ratio"] = stock["kv_cache_mb"] / row["kv_cache_mb"]
                    rows.append(row)
                    progress.update()
    if args.profile:
        profile(built, schedules(name, built.visual_tokens, built.num_layers, args.retentions[0])[0], device)
    del built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def profile(built: vlm_shapes.Built, schedule: Schedule, device: torch.device) -> None:
    """Prints where a batch-1 prefill with ``schedule`` spends its time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from pio_kernels.integrations import apply_pio, remove_pio

    inputs = built.make_inputs(1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    apply_pio(built.model, schedule.config())
    try:
        with torch.no_grad(), attention_backends(device):
            built.model(**inputs, use_cache=True, logits_to_keep=1)
            _sync(device)
            with torch_profile(activities=activities) as prof, selection.StageTimer(built.model, device):
                built.model(**inputs, use_cache=True, logits_to_keep=1)  # stages show as pio::<kind>
                _sync(device)
    finally:
        remove_pio(built.model)
    print(f"\nprofile: {built.name} batch 1, {schedule.name} {schedule.describe()}")
    keys = ("device_time_total", "cuda_time_total") if device.type == "cuda" else ("cpu_time_total",)
    for key in keys:  # the name of the device column changed across torch versions
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=25))
            break
        except (AttributeError, KeyError, ValueError):
            continue


def _display(row: dict[str, Any]) -> dict[str, Any]:
    """The row with per-stage lists shortened for the printed table."""
    out = dict(row)
    if isinstance(out.get("selection_ms"), list):
        out["selection_ms"] = "/".join(f"{v:.3g}" for v in out["selection_ms"])
    return out


def size_label(size: str, rows: list[dict[str, Any]]) -> str:
    """What the model shapes of a run are, in words (printed and written beside the rows)."""
    if size == "tiny":
        return "widths of a few dozen channels: NOT representative of a GPU or of a real model"
    depths = sorted({(r["model"], r.get("num_layers")) for r in rows})
    depth = ", ".join(f"{model} {layers} layers" for model, layers in depths)
    if size == "half":
        return f"full 7B widths, about half depth ({depth}; the head tied to the embeddings)"
    return f"the published 7B shapes ({depth})"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (what CI runs)")
    parser.add_argument("--size", choices=vlm_shapes.SIZES,
                        help="model shapes (default: full on a GPU, tiny on CPU or with --quick)")
    parser.add_argument("--layers", type=int, help="language-model depth instead of the size's (smoke tests)")
    parser.add_argument("--vision-layers", type=int, help="vision-tower depth instead of the size's (smoke tests)")
    parser.add_argument("--models", nargs="+", choices=vlm_shapes.MODELS,
                        help="default: all (half size: llava-1.5-7b and qwen2.5-vl-7b)")
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--retentions", nargs="+", type=float,
                        help="average retained fractions (default 1/9 and 2/9; 1/9 only for the half size)")
    parser.add_argument("--schedules", nargs="+", default=["w/ VE", "w/o VE"], choices=["w/ VE", "w/o VE"])
    parser.add_argument("--paths", nargs="+", default=["ours", "reference"], choices=["ours", "reference"])
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--reference-repeat", type=int, default=3,
                        help="at most this many timed runs on the (slow) reference path")
    parser.add_argument("--reference-batches", nargs="+", type=int,
                        help="batches that also run the reference path (default: the smallest; its host-side "
                             "NMS loop takes minutes at batch 8 on LLaVA-NeXT)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tag", default=None, help="suffix of the JSON file name")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per model")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (recorded in the device name)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--results-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or ("tiny" if args.quick or device.type != "cuda" else "full")
    small = size != "full"
    half = size == "half"  # minutes per prefill on a CPU: one batch, few repeats
    args.models = args.models or (["llava-1.5-7b", "qwen2.5-vl-7b"] if half else list(vlm_shapes.MODELS))
    args.retentions = args.retentions or ([1 / 9] if half else [1 / 9, 2 / 9])
    args.batches = args.batches or ([1] if half else [1, 2] if small else [1, 8])
    args.reference_batches = args.reference_batches or [min(args.batches)]
    args.new_tokens = args.new_tokens or (4 if small else 8)
    args.warmup = args.warmup if args.warmup is not None else (0 if half else 1 if small else 2)
    args.repeat = args.repeat or (2 if half else 3 if small else 5)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)

    from tqdm import tqdm
    per_batch = [1 + len(args.retentions) * len(args.schedules) *
                 sum(p == "ours" or b in args.reference_batches for p in args.paths) for b in args.batches]
    rows: list[dict] = []
    with tqdm(total=len(args.models) * sum(per_batch), desc="e2e", unit="run",
              disable=None) as progress:
        for name in args.models:
            rows += run_model(name, size, device, dtype, args, progress)

    print(f"\ne2e on {harness.device_name(device)}, {size} shapes, {str(dtype).replace('torch.', '')}: "
          + size_label(size, rows))
    harness.print_table([_display(r) for r in rows], COLUMNS)
    errors = [r for r in rows if "error" in r]
    for r in errors:
        print(f"  {r['model']} b{r['batch']} {r['schedule']} {r['path']}: {r['error']}")
    if not args.no_write:
        tag = args.tag if args.tag is not None else "-".join(
            [size] + ([*args.models] if len(args.models) < len(vlm_shapes.MODELS) else []))
        extra = {"size": size, "size_label": size_label(size, rows), "dtype": str(dtype).replace("torch.", ""),
                 "new_tokens": args.new_tokens,
                 "warmup": args.warmup, "repeat": args.repeat, "reference_repeat": args.reference_repeat,
                 "reference_batches": args.reference_batches,
                 "attention": "sdpa, flash first" if device.type == "cuda" else "sdpa (CPU)",
                 "flops_formula": "sum over layers of 4nd^2 + 2n^2d + 2ndm, n visual tokens (SPEC 6)"}
        print("wrote", harness.write_results("e2e", device, rows, tag=tag, extra=extra, folder=args.results_dir))
    return rows


if __name__ == "__main__":
    main()
