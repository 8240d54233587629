"""Kernel benchmarks: saliency (SPEC 2) and NMS (SPEC 3), every path, in one JSON file.

Gathers the suites the kernel work wrote, each a module of this folder with
``run(device, quick) -> list[dict]`` (one row per shape and path, with the bound the kernel
is held to): ``saliency.py`` and ``nms.py``. A suite that is absent or fails is reported and
skipped; the others still run. Writes ``results/kernels-<device>[-tag].json`` with
``"benchmark": "kernels"``, the device and versions, ``"suites"`` (what ran) and the rows,
each tagged with its ``suite``.

    python benchmarks/kernels.py            # real shapes on a GPU, small ones on CPU
    python benchmarks/kernels.py --quick    # small shapes everywhere
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import traceback
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

SUITES = ("saliency", "nms")


def load_suite(name: str):
    """The module ``benchmarks/<name>.py``, or ``None`` when the file does not exist."""
    path = os.path.join(HERE, f"{name}.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location(f"pio_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    if not callable(getattr(module, "run", None)):
        raise AttributeError(f"benchmarks/{name}.py has no run(device, quick)")
    return module


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU runs always are)")
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
    parser.add_argument("--tag", default=None, help="suffix of the JSON file name")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--results-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    quick = args.quick or device.type != "cuda"

    rows: list[dict[str, Any]] = []
    status: dict[str, str] = {}
    for name in args.suites:
        try:
            module = load_suite(name)
            if module is None:
                status[name] = "absent"
                print(f"kernels: benchmarks/{name}.py not found, skipped")
                continue
            suite_rows = module.run(device, quick)
        except Exception as exc:  # one broken suite must not hide the others
            status[name] = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            traceback.print_exc()
            print(f"kernels: {name} failed, skipped")
            continue
        status[name] = "ran"
        for row in suite_rows:
            rows.append({"suite": name, **row})
        print(f"\n{name} on {harness.device_name(device)}" + (" (small shapes)" if quick else ""))
        columns = list(dict.fromkeys(k for r in suite_rows for k in r))
        harness.print_table(suite_rows, columns)

    if not args.no_write:
        tag = args.tag if args.tag is not None else ("quick" if quick and device.type == "cuda" else "")
        path = harness.write_results("kernels", device, rows, tag=tag, extra={"quick": quick, "suites": status},
                             folder=args.results_dir)
        print("wrote", path)
    return rows


if __name__ == "__main__":
    main()
