"""Speedup plots and the README results section, from the JSON files under ``benchmarks/results/``.

    python benchmarks/plot.py                 # results/speedup-<device>-<size>.png per device
    python benchmarks/plot.py --markdown      # also print the README results section
    python benchmarks/plot.py --markdown-out results/README-section.md

Works on whatever JSON exists: e2e files (``"benchmark": "e2e"``) of one device and size are
merged (a run may be split by model), and each device gets its own figure: speedup of
prefill and of the whole generation against the stock model of the same run, vs the
retained fraction of visual tokens (average over layers), one panel per model, ours vs the
reference-path selection, both schedules, smallest and largest batch. The published figures
(SPEC section 6) are drawn as stars where they apply. Tiny (CPU) runs are labelled as such.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import defaultdict
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")

# SPEC section 6, LLaVA at 11.1% of the visual tokens: (prefill, total) speedups.
PUBLISHED = {"llava-1.5-7b": (1.27, 1.13), "llava-next-7b": (2.67, 2.11)}
# Goals of the benchmark issue, batch 1, 11.1% retention: prefill speedup.
GOALS = {"llava-1.5-7b": 2.5, "llava-next-7b": 4.0}
# Goals of the half-depth CPU run (issue 11), batch 1, 11.1%: prefill speedup with the encoder side.
GOALS_HALF = {"llava-1.5-7b": 3.0}
MODEL_ORDER = ("llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b")


def load(benchmark: str, results_dir: str = RESULTS_DIR) -> list[dict[str, Any]]:
    """All result files of ``benchmark``, sorted by name."""
    out = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"plot: skipping {path}: {exc}", file=sys.stderr)
            continue
        if isinstance(data, dict) and data.get("benchmark") == benchmark:
            data["_path"] = path
            out.append(data)
    return out


def group_runs(files: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Merges files of the same (device, size): metadata of the newest, rows of all."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for data in sorted(files, key=lambda d: d.get("date", "")):
        key = (data.get("device", "?"), data.get("size", "?"))
        group = groups.setdefault(key, {"rows": [], "files": []})
        labels = group.get("size_labels", [])
        group.update({k: v for k, v in data.items() if k not in ("rows", "_path")})
        if data.get("size_label") and data["size_label"] not in labels:
            labels.append(data["size_label"])
        group["size_labels"] = labels
        group["rows"] += data.get("rows", [])
        group["files"].append(os.path.relpath(data["_path"], os.path.dirname(HERE)))
    return groups


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.split(" (")[0].lower()).strip("-")


def _is_tiny(run: dict[str, Any]) -> bool:
    return run.get("size") == "tiny"


def _is_half(run: dict[str, Any]) -> bool:
    return run.get("size") == "half"


def plot_run(run: dict[str, Any], out_path: str) -> str:
    """One figure for one device: rows = prefill / total speedup, columns = models."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in run["rows"] if r.get("path") in ("ours", "reference") and "prefill_speedup" in r]
    models = [m for m in MODEL_ORDER if any(r["model"] == m for r in rows)]
    models += sorted({r["model"] for r in rows} - set(models))
    if not models:
        raise ValueError("no e2e rows with speedups to plot")
    batches = sorted({r["batch"] for r in rows})
    shown_batches = [batches[0]] + ([batches[-1]] if len(batches) > 1 else [])
    fig, axes = plt.subplots(2, len(models), figsize=(4.6 * len(models), 7.2), squeeze=False)
    colors = {"ours": "tab:blue", "reference": "tab:orange"}
    markers = {"w/ VE": "o", "w/o VE": "s"}
    styles = {shown_batches[0]: "-", shown_batches[-1]: "--"}
    for col, model in enumerate(models):
        for row_idx, (metric, label) in enumerate((("prefill_speedup", "prefill"), ("total_speedup", "total"))):
            ax = axes[row_idx][col]
            for path in ("ours", "reference"):
                for schedule in ("w/ VE", "w/o VE"):
                    for batch in shown_batches:
                        pts = sorted((r["retention"], r[metric]) for r in rows
                                     if r["model"] == model and r["path"] == path and r["schedule"] == schedule
                                     and r["batch"] == batch)
                        if not pts:
                            continue
                        xs, ys = zip(*pts)
                        ax.plot([100 * x for x in xs], ys, color=colors[path], marker=markers[schedule],
                                linestyle=styles[batch], label=f"{path}, {schedule}, batch {batch}")
            if model in PUBLISHED and run.get("size") == "full":
                ax.plot([100 / 9], [PUBLISHED[model][row_idx]], marker="*", color="black", markersize=12,
                        linestyle="none", label="published (SPEC 6)")
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xlabel("retained visual tokens, % (average over layers)")
            ax.set_ylabel(f"{label} speedup vs stock (x)")
            ax.set_title(f"{model}: {label}")
            ax.grid(alpha=0.3)
            if row_idx == 0 and col == 0:
                ax.legend(fontsize=7)
    title = f"pio-kernels end to end on {run.get('device', '?')}"
    if _is_tiny(run):
        title += "\nTINY CPU SHAPES (widths of a few dozen channels): checks the pipeline, not GPU speed"
    elif _is_half(run):
        title += f"\nFULL 7B WIDTHS, ABOUT HALF DEPTH ({run.get('dtype', '')}, {run.get('new_tokens', '?')} new tokens)"
    else:
        title += f" ({run.get('dtype', '')}, {run.get('new_tokens', '?')} new tokens)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


# ------------------------------------------------------------------------------------------------
# README section
# ------------------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return " / ".join(_f(v, digits) for v in value)
    return str(value)


def _describe(run: dict[str, Any]) -> str:
    parts = [f"**{run.get('device', '?')}**", run.get("date", "")[:10],
             f"torch {run.get('torch')}", f"triton {run.get('triton')}", f"transformers {run.get('transformers')}"]
    return ", ".join(p for p in parts if p)


def _near_published(row: dict[str, Any]) -> bool:
    """Stock rows and rows near the published 11.1% retention (the README table's rows)."""
    return row.get("path") == "stock" or abs(row.get("retention", 0) - 1 / 9) < 0.02


def e2e_markdown(run: dict[str, Any], png: str | None, all_rows: bool = False) -> list[str]:
    lines = [f"End to end, {_describe(run)}; {run.get('size')} shapes, {run.get('dtype')}, "
             f"{run.get('new_tokens')} new tokens, median of {run.get('repeat')} runs "
             f"(reference path: at most {run.get('reference_repeat')}). From {', '.join(run['files'])}."]
    if _is_tiny(run):
        lines.append("")
        lines.append("> These are **tiny CPU shapes** (same depth and visual-token counts, widths of a few "
                     "dozen channels): they show the pipeline runs end to end, not how fast anything is on a "
                     "GPU. The GPU figures are still to be measured (`make bench` on an H100/H200).")
    if _is_half(run):
        lines.append("")
        label = "; ".join(run.get("size_labels") or [run.get("size_label", "")])
        lines.append(f"> **Full 7B widths at about half depth** ({label}), on CPU: the "
                     "published schedules with their stage layers scaled to the depth. Not GPU figures.")
    shown = run["rows"] if all_rows else [r for r in run["rows"] if _near_published(r)]
    lines += ["", ("All rows." if all_rows else "Rows at ~11.1% retention (the published point); every "
                   "retention is in the JSON and the plot.") + " Speedups (x) against the stock row of the same "
              "batch; TFLOPs of the visual tokens per sample (SPEC 6 formula); KV cache per sample; selection "
              "ms per stage (encoder stage net of the stock vision tower) and its share of the reduced prefill, "
              "per stage and in all.",
              "", "| model | batch | schedule | path | retained | prefill ms | prefill x | total ms | total x | "
                  "TFLOPs | KV MiB | selection ms per stage | share per stage | selection share |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in shown:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['schedule']} | {r['path']} | {_f(r.get('retention'))} "
                         f"| failed: {r['error'][:80]} ||||||||||")
            continue
        share = r.get("selection_share")
        lines.append("| " + " | ".join([
            r["model"], str(r["batch"]), r["schedule"], r["path"], f"{100 * r['retention']:.1f}%",
            _f(r.get("prefill_ms")), _f(r.get("prefill_speedup")), _f(r.get("total_ms")),
            _f(r.get("total_speedup")), _f(r.get("tflops")), _f(r.get("kv_cache_mb")),
            _f(r.get("selection_ms")),
            " / ".join(f"{100 * v:.1f}%" for v in r.get("selection_share_stages") or []),
            "" if share is None else f"{100 * share:.1f}%"]) + " |")
    if any(isinstance(r.get("selection_ms"), list) and r["selection_ms"] and r["selection_ms"][0] < 0 for r in shown):
        lines += ["", "A negative encoder-stage time is timing noise: the stock tower time it subtracts comes "
                      "from separate runs, and here the tower is most of the stage."]
    if not _is_tiny(run):
        if _is_half(run):
            lines += ["", "Goals at 11.1% retention, batch 1 (issue 11): prefill >= 3x stock (LLaVA-1.5 width, "
                          "half depth, with the encoder side), selection <= 5% of the reduced prefill:", ""]
        else:
            lines += ["", "Goals at 11.1% retention, batch 1 (issue 7): prefill speedup >= 2.5x (LLaVA-1.5) and "
                          ">= 4x (LLaVA-NeXT), selection < 5% of the reduced prefill, reference-path selection "
                          "slower than ours by the factor the kernel benchmarks measured:", ""]
        for r in run["rows"]:
            if not (r.get("batch") == 1 and r.get("path") == "ours" and "prefill_speedup" in r
                    and abs(r.get("retention", 0) - 1 / 9) < 0.01):
                continue
            goal = (GOALS_HALF.get(r["model"]) if r["schedule"] == "w/ VE" else None) if _is_half(run) \
                else GOALS.get(r["model"])
            verdict = "" if goal is None else (" (goal met)" if r["prefill_speedup"] >= goal else
                                               f" (goal {goal}x missed by {goal - r['prefill_speedup']:.2f}x)")
            ref = next((x for x in run["rows"] if x.get("path") == "reference" and x.get("batch") == 1
                        and x.get("model") == r["model"] and x.get("schedule") == r["schedule"]
                        and x.get("retention") == r.get("retention") and "selection_ms_total" in x), None)
            ratio = "" if ref is None or not r.get("selection_ms_total") else \
                f"; reference-path selection {ref['selection_ms_total'] / r['selection_ms_total']:.1f}x ours"
            lines.append(f"- {r['model']} {r['schedule']}: prefill {r['prefill_speedup']:.2f}x{verdict}; "
                         f"selection {100 * r.get('selection_share', float('nan')):.1f}% of the prefill{ratio}")
    if png:
        lines += ["", f"![speedup vs retained tokens]({png})"]
    return lines


def kernels_markdown(run: dict[str, Any]) -> list[str]:
    lines = [f"Kernels, {_describe(run)}" + (" (small shapes)" if run.get("quick") else "") +
             f". Suites: {json.dumps(run.get('suites', {}))}. From {', '.join(run['files'])}."]
    by_suite: dict[str, list[dict]] = defaultdict(list)
    for r in run["rows"]:
        by_suite[r.get("suite", "?")].append(r)
    for suite, rows in by_suite.items():
        columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c != "suite"]
        lines += ["", f"{suite}:", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in rows:
            lines.append("| " + " | ".join(_f(r.get(c)) for c in columns) + " |")
    return lines


def markdown(e2e_runs: dict, kernel_runs: dict, pngs: dict, all_rows: bool = False) -> str:
    lines = ["## Results", "",
             "Generated by `python benchmarks/plot.py --markdown` from the JSON under `benchmarks/results/` "
             "(every figure carries its device, versions and date). Random-weight models built from configs "
             "(timing does not depend on the weights); speedups are against the stock model in the same run."]
    gpu = [k for k, run in e2e_runs.items() if run.get("size") == "full"]
    if not gpu:
        lines += ["", "**No GPU figures yet**: everything below was measured on CPU; the GPU figures "
                      "(H100/H200, 7B shapes) are still to be measured with `make bench` or `make gpu-check`."]
    order = {"full": 0, "half": 1, "tiny": 2}
    for key, run in sorted(e2e_runs.items(), key=lambda kv: (order.get(kv[1].get("size"), 3), kv[0])):
        lines += ["", *e2e_markdown(run, pngs.get(key), all_rows)]
    for _, run in sorted(kernel_runs.items()):
        lines += ["", *kernels_markdown(run)]
    return "\n".join(lines) + "\n"


README_START = "<!-- results:start (generated by benchmarks/plot.py --update-readme) -->"
README_END = "<!-- results:end -->"


def update_readme(path: str, section: str) -> None:
    """Replaces the generated block of ``path`` (between the two markers) with ``section``."""
    with open(path) as f:
        text = f.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {README_START!r} ... {README_END!r} block to replace")
    body = section.replace("## Results\n", "", 1).strip()
    text = text[:start + len(README_START)] + "\n" + body + "\n" + text[end:]
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> dict[tuple[str, str], str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=RESULTS_DIR, help="folder of the JSON files (and the PNGs)")
    parser.add_argument("--markdown", action="store_true", help="print the README results section")
    parser.add_argument("--markdown-out", default=None, help="write the README results section to this file")
    parser.add_argument("--all-rows", action="store_true", help="every e2e row in the markdown, not only ~11.1%%")
    parser.add_argument("--update-readme", default=None, metavar="README",
                        help=f"replace the text between {README_START!r} and {README_END!r} in this file")
    args = parser.parse_args(argv)

    e2e_runs = group_runs(load("e2e", args.results))
    kernel_runs = {(d.get("device", "?"), d.get("_path")): {**d, "files": [os.path.basename(d["_path"])]}
                   for d in load("kernels", args.results)}
    pngs: dict[tuple[str, str], str] = {}
    for key, run in e2e_runs.items():
        path = os.path.join(args.results, f"speedup-{_slug(key[0])}-{key[1]}.png")
        try:
            plot_run(run, path)
        except ValueError as exc:
            print(f"plot: {key}: {exc}", file=sys.stderr)
            continue
        pngs[key] = os.path.relpath(path, os.path.dirname(HERE))
        print("wrote", path)
    if not e2e_runs:
        print("plot: no e2e results found under", args.results, file=sys.stderr)
    if args.markdown or args.markdown_out or args.update_readme:
        text = markdown(e2e_runs, kernel_runs, pngs, args.all_rows)
        if args.markdown_out:
            with open(args.markdown_out, "w") as f:
                f.write(text)
            print("wrote", args.markdown_out)
        if args.update_readme:
            update_readme(args.update_readme, text)
            print("updated", args.update_readme)
        if args.markdown:
            print(text)
    return pngs


if __name__ == "__main__":
    main()
