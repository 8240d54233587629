"""Console scripts ``pio-eval`` and ``pio-tune`` (see docs/evaluate.md).

``pio-eval fidelity CHECKPOINT FOLDER --method NAME=SPEC ... --out DIR``
    fidelity of each method against the unpruned model (``fidelity.json``, ``fidelity.png``).
    A SPEC is written like lmms-eval's ``--model_args``: ``preset=llava-1.5``, ``preset=default``
    (the family's default for the model's depth) or ``layers=[2,4],keep=[16,8],scoring=random``.
    Runs named ``method@label`` share a line in the plot (e.g. ``ours@11``, ``ours@22``,
    ``random@11``).
``pio-eval make-task FOLDER --name NAME --out DIR [--multiple-choice]``
    an lmms-eval task over a folder of images + prompts.jsonl (answers required).
``pio-eval presets``
    the presets, each with its family and its retention by the SPEC accounting.
``pio-eval tiny-checkpoint OUT [--family llava-1.5]``
    a tiny random-weight checkpoint, to try the workflow without weights.
``pio-tune CHECKPOINT FOLDER --target 0.111 --out DIR``
    schedule search (:mod:`.tune`): ``best_config.json`` and ``tune.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["eval_main", "parse_spec", "tune_main"]


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_spec(spec: str) -> dict[str, str]:
    """``"layers=[2,4],keep=[16,8]"`` -> ``{"layers": "[2,4]", "keep": "[16,8]"}`` (commas inside
    brackets stay). Raises ValueError for an item without ``=``."""
    out = {}
    for item in _split_top_level(spec):
        if "=" not in item:
            raise ValueError(f"expected key=value in {spec!r}, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def config_from_spec(spec: str, vlm=None):
    """A PioConfig (or ``None`` for the stock model) from a SPEC string; ``preset=default`` needs
    ``vlm`` (a :class:`~.vlm.LocalVLM`: its family and depth)."""
    from .schedules import make_config
    fields = parse_spec(spec)
    preset = fields.pop("preset", None)
    model = {} if vlm is None else dict(family=vlm.family, num_layers=vlm.num_layers)
    return make_config(preset, **model, **fields)


def _methods(items: list[str], vlm=None) -> dict:
    from .schedules import schedule_fields
    methods = {}
    for item in items:
        name, _, spec = item.partition("=")
        if not spec or name in schedule_fields() + ("preset",):
            raise ValueError(f"--method takes NAME=SPEC (e.g. ours@11=preset=llava-1.5), got {item!r}")
        methods[name] = config_from_spec(spec, vlm)
    return methods


def _load_vlm(args):
    from .vlm import LocalVLM
    return LocalVLM.load(args.checkpoint, dtype=args.dtype, attn_implementation=args.attn_implementation,
                         device=args.device)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="local checkpoint folder (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, "
                                      "Qwen2.5-VL, Qwen3-VL)")
    p.add_argument("folder", help="folder of images, with an optional prompts.jsonl")
    p.add_argument("--prompt", default=None, help="prompt for every image when the folder has no prompts.jsonl")
    p.add_argument("--limit", type=int, default=None, help="first N samples only")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")


def _samples(args):
    from .tasks.local import DEFAULT_PROMPT, load_folder
    samples = load_folder(args.folder, args.prompt or DEFAULT_PROMPT)
    return samples[:args.limit] if args.limit else samples


def _fidelity(args) -> int:
    from .fidelity import compare, plot
    _methods([m for m in args.method if "preset=default" not in m])  # bad specs fail before the weights load
    vlm = _load_vlm(args)
    methods = _methods(args.method, vlm)
    report = compare(vlm, _samples(args), methods, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                     generate=not args.no_generate, progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fidelity.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{'method':<24} {'retention':>9} {'FLOPs':>7} {'agreement':>9} {'KL':>10} {'drift':>8}")
    for run in report["runs"]:
        agree = "" if run.get("agreement") is None else f"{run['agreement']:.3f}"
        print(f"{run['name']:<24} {100 * run['retention']:8.1f}% {100 * run['flops_fraction']:6.1f}% {agree:>9} "
              f"{run['kl']:10.4g} {run['hidden_drift']:8.4f}")
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(report, os.path.join(args.out, 'fidelity.png'))}")
    return 0


def _make_task(args) -> int:
    from .tasks.local import load_folder, write_task
    path = write_task(args.out, args.name, load_folder(args.folder), multiple_choice=args.multiple_choice,
                      max_new_tokens=args.max_new_tokens)
    print(f"wrote {path}\nrun: lmms-eval --model pio --model_args pretrained=CHECKPOINT,preset=... "
          f"--include_path {os.path.abspath(args.out)} --tasks {args.name} --batch_size 4 --output_path OUT")
    return 0


# Visual tokens of one image, per family, for the retention `pio-eval presets` prints: LLaVA-1.5 at
# 336 px, LLaVA-NeXT's five 576-token crops, a Qwen image of 1008 x 1008 pixels, one OneVision crop.
_PRESET_SHAPES = {"llava-1.5": 576, "llava-next": 2880, "llava-onevision": 729, "qwen2-vl": 1296,
                  "qwen2.5-vl": 1296, "qwen3-vl": 1296}


def _presets(args) -> int:
    from .accounting import schedule_retention
    from .schedules import FAMILY_PRESETS, make_config, presets
    for name, spec in presets().items():
        family, layers = next(((f, depth) for f, names in FAMILY_PRESETS.items() for p, depth in names if p == name),
                              (None, None))
        if spec is None or family is None:
            print(f"{name:<24} the unpruned model")
            continue
        n = _PRESET_SHAPES[family]
        r = schedule_retention(make_config(name), n, layers)
        fields = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in spec.items() if v is not None)
        print(f"{name:<24} {fields:<52} {100 * r:6.2f}% of {n} tokens over {layers} layers ({family})")
    print(f"{'default':<24} the model family's preset for the model's depth (scaled to it when none is)")
    return 0


def _tiny(args) -> int:
    from .tiny import write_checkpoint
    print(write_checkpoint(args.out, args.family, layers=args.layers, seed=args.seed))
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    from .tiny import FAMILIES as TINY_FAMILIES
    parser = argparse.ArgumentParser(prog="pio-eval", description="Evaluation tools of pio-kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fidelity", help="fidelity of pruned vs unpruned outputs (no labels needed)")
    _model_args(p)
    p.add_argument("--method", action="append", required=True,
                   help="NAME=SPEC, repeatable; e.g. ours@11=preset=llava-1.5 or r@50=layers=[2],keep=[0.5],scoring=random")
    p.add_argument("--no-generate", action="store_true", help="skip answer generation (no agreement)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(run=_fidelity)
    p = sub.add_parser("make-task", help="an lmms-eval task from a folder of images + prompts.jsonl")
    p.add_argument("folder")
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--multiple-choice", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(run=_make_task)
    p = sub.add_parser("presets", help="the published schedules")
    p.set_defaults(run=_presets)
    p = sub.add_parser("tiny-checkpoint", help="a tiny random-weight checkpoint (no download)")
    p.add_argument("out")
    p.add_argument("--family", default="llava-1.5", choices=TINY_FAMILIES)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_tiny)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as exc:
        parser.exit(2, f"pio-eval: error: {exc}\n")


def tune_main(argv: list[str] | None = None) -> int:
    from .fidelity import OBJECTIVES
    parser = argparse.ArgumentParser(prog="pio-tune", description="Schedule search for a retention target "
                                     "(best PioConfig + every candidate, as JSON).")
    _model_args(parser)
    parser.add_argument("--target", type=float, default=1 / 9, help="average retention (default 1/9 = 11.1%%)")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--encoder", action="store_true", help="search an encoder-side budget too")
    parser.add_argument("--budget", type=int, default=24, help="schedules evaluated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objective", default="kl", choices=OBJECTIVES)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from .tune import search
    try:
        vlm = _load_vlm(args)
        report = search(vlm, _samples(args), args.target, stages=args.stages, encoder=args.encoder,
                        budget=args.budget, seed=args.seed, objective_name=args.objective, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, progress=not args.no_progress, out=args.out)
    except ValueError as exc:
        parser.exit(2, f"pio-tune: error: {exc}\n")
    best, default = report["best"], report["published_default"]
    print(f"target {100 * report['target']:.2f}%: {report['target_token_layers']} token-layers "
          f"({report['visual_tokens']} tokens x {report['num_layers']} layers), retention "
          f"{100 * report['retention']:.3f}%")
    print(f"best     {args.objective}={best['objective']:.5g}  {best['config']}")
    print(f"default  {args.objective}={default['objective']:.5g}  {default['name']} "
          f"(retention {100 * default['retention_at_n']:.2f}%)")
    print(f"wrote {os.path.join(args.out, 'best_config.json')} and {os.path.join(args.out, 'tune.json')}")
    return 0


if __name__ == "__main__":  # python -m pio_kernels.eval.cli fidelity ...
    sys.exit(eval_main())
