"""One command for a GPU machine: build, sanitizers, GPU tests, kernel and end-to-end benchmarks.

    make gpu-check                                  # = python3 benchmarks/gpu_check.py
    python3 benchmarks/gpu_check.py --mirror "$OUT" # also copy every result file there as it goes
    python3 benchmarks/gpu_check.py --parts tests kernels --budget 300
    python3 benchmarks/gpu_check.py --dry-run       # the plumbing only, any machine, seconds

For a machine with torch (CUDA), Triton, transformers and pytest installed and no network.
Five parts run in order, each as subprocesses with a time budget (``--budget`` seconds in
all, 470 by default, shared out as below; time a part leaves unused goes to the parts after
it, and a part past its budget is killed, its process group with it):

``build``      (110 s) ``pip install --no-deps --no-build-isolation -e .`` with
               ``PIO_REQUIRE_EXTENSION=1`` (a failed CUDA compile fails here instead of warning),
               then asserts ``"cuda" in available_backends("cuda")``.
``sanitizer``  (60 s) ``compute-sanitizer`` memcheck and racecheck on small CUDA
               ``select_tokens`` calls (several blocks, ragged rows, rows at or under the
               budget), checked against the reference. Where the tool is missing or refuses
               the device, the part says so and is skipped.
``tests``      (80 s) every ``cuda``-marked test (``pytest -m cuda``); none collected is a failure.
``kernels``    (80 s) ``benchmarks/saliency.py --device cuda`` as it is (fast path vs reference,
               the head and epilogue Triton kernels vs their bandwidth bound), then the
               registers and spills of every Triton kernel it launched (plus the NMS ones);
               ``benchmarks/nms.py --preset gpu-check``: every path at N = 576, 2880, 16384,
               batch 1 and 8, clustered and heavy-suppression features.
``e2e``        (140 s) ``benchmarks/e2e.py`` per model (LLaVA-1.5-7B, LLaVA-NeXT-7B,
               Qwen2.5-VL-7B, random weights built on the GPU, bf16, SDPA flash first): stock vs
               the published schedules at 11.1%, ours vs reference-path selection (batch 1),
               batch 1 and 8.

Every step's output goes to ``benchmarks/results/gpu-check-logs/<part>-<step>.log``; after
every step ``benchmarks/results/gpu-check-<device>.json`` is rewritten with the device,
versions, date and every result so far (a timeout leaves the earlier results). The benchmark
scripts write their own JSON beside it. The run ends with a one-screen summary; the exit
status is 0 when no part failed or timed out, 1 otherwise, 2 when there is no CUDA device.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
E2E_MODELS = ("llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b")
PART_BUDGETS = {"build": 110.0, "sanitizer": 60.0, "tests": 80.0, "kernels": 80.0, "e2e": 140.0}
PARTS = tuple(PART_BUDGETS)


# ------------------------------------------------------------------------------------------------
# Plan: parts made of steps (one subprocess each)
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Step:
    name: str
    cmd: list[str]
    share: float = 1.0                 # of the part's budget, relative to the other steps
    env: dict[str, str] | None = None
    judge: Callable[[int | None, str], tuple[str, str]] | None = None  # (rc, output) -> (status, detail)


@dataclasses.dataclass
class Part:
    name: str
    budget_s: float
    steps: list[Step]
    skip: str | None = None            # a reason to skip the whole part
    summarize: Callable[[list[dict], str], str] | None = None  # (step results, results dir) -> one line


@dataclasses.dataclass
class Outcome:
    status: str                        # pass | fail | timeout | skip
    detail: str = ""


def _default_judge(rc: int | None, output: str) -> tuple[str, str]:
    return ("pass", "") if rc == 0 else ("fail", f"exit status {rc}")


def run_step(step: Step, timeout_s: float, log_path: str, cwd: str = ROOT) -> dict[str, Any]:
    """Runs one step with its own process group; kills the group at the timeout."""
    t0 = time.monotonic()
    env = {**os.environ, **(step.env or {})}
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(step.cmd)}\n")
        log.flush()
        rc: int | None
        try:
            proc = subprocess.Popen(step.cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            log.write(f"could not start: {exc}\n")
            rc, timed_out = 127, False
        else:
            try:
                rc, timed_out = proc.wait(timeout=max(timeout_s, 0.1)), False
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = None
    with open(log_path, errors="replace") as f:
        output = f.read()
    seconds = round(time.monotonic() - t0, 1)
    if timed_out:
        status, detail = "timeout", f"killed after {seconds:.0f} s (budget {timeout_s:.0f} s)"
    else:
        status, detail = (step.judge or _default_judge)(rc, output)
    return {"step": step.name, "status": status, "detail": detail, "rc": rc, "seconds": seconds,
            "budget_s": round(timeout_s, 1), "log": os.path.relpath(log_path, ROOT),
            "tail": output[-3000:].splitlines()[-40:]}


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _part_status(steps: list[dict]) -> str:
    statuses = [s["status"] for s in steps]
    for status in ("timeout", "fail"):
        if status in statuses:
            return status
    if statuses and all(s == "skip" for s in statuses):
        return "skip"
    return "pass"


def run_plan(parts: list[Part], *, results_dir: str, budget_s: float, env: dict[str, Any],
             mirror: str | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the parts in order within ``budget_s`` seconds; writes the JSON after every step.

    Part ``i`` may run until ``start + (sum of the budgets of parts 0..i) * budget_s / total``:
    time an earlier part left unused goes to the later ones. Steps share their part's window
    the same way, by ``share``.
    """
    t0 = time.monotonic()
    total = sum(p.budget_s for p in parts) or 1.0
    scale = budget_s / total
    json_path = os.path.join(results_dir, f"gpu-check-{env.get('device_slug', 'unknown')}.json")
    logs = os.path.join(results_dir, "gpu-check-logs")
    before = _snapshot(results_dir)
    report: dict[str, Any] = {"benchmark": "gpu-check", **env, "budget_s": budget_s, "parts": []}
    cumulative = 0.0
    for part in parts:
        cumulative += part.budget_s * scale
        part_deadline = t0 + cumulative
        entry: dict[str, Any] = {"part": part.name, "budget_s": round(part.budget_s * scale, 1), "steps": []}
        report["parts"].append(entry)
        started = time.monotonic()
        if part.skip:
            entry.update(status="skip", detail=part.skip, seconds=0.0)
            echo(f"[gpu-check] {part.name}: skipped ({part.skip})")
            _write(json_path, report, t0)
            continue
        shares = sum(s.share for s in part.steps) or 1.0
        used_share = 0.0
        for step in part.steps:
            used_share += step.share
            window_end = started + (part_deadline - started) * used_share / shares
            timeout = window_end - time.monotonic()
            if timeout <= 1:
                result = {"step": step.name, "status": "timeout", "detail": "no time left", "rc": None,
                          "seconds": 0.0, "budget_s": 0.0}
            else:
                echo(f"[gpu-check] {part.name}/{step.name}: running (up to {timeout:.0f} s)")
                result = run_step(step, timeout, os.path.join(logs, f"{part.name}-{step.name}.log"))
            entry["steps"].append(result)
            echo(f"[gpu-check] {part.name}/{step.name}: {result['status']} in {result['seconds']:.0f} s"
                 + (f" ({result['detail']})" if result["detail"] else ""))
            _write(json_path, report, t0)
            _mirror(results_dir, before, mirror)
        entry["status"] = _part_status(entry["steps"])
        entry["seconds"] = round(time.monotonic() - started, 1)
        entry["detail"] = ""
        if part.summarize is not None:
            try:
                entry["detail"] = part.summarize(entry["steps"], results_dir)
            except Exception as exc:  # noqa: BLE001 - a summary must not end the run
                entry["detail"] = f"(no summary: {type(exc).__name__}: {exc})"
        if not entry["detail"]:
            entry["detail"] = "; ".join(f"{s['step']}: {s['detail'] or s['status']}" for s in entry["steps"])
        _write(json_path, report, t0)
        _mirror(results_dir, before, mirror)
    report["status"] = "fail" if any(p["status"] in ("fail", "timeout") for p in report["parts"]) else "pass"
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["json"] = os.path.relpath(json_path, ROOT)
    _write(json_path, report, t0)
    _mirror(results_dir, before, mirror)
    return report


def _write(path: str, report: dict[str, Any], t0: float) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)


def _snapshot(folder: str) -> dict[str, float]:
    out = {}
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path):
            out[path] = os.path.getmtime(path)
    return out


def _mirror(folder: str, before: dict[str, float], target: str | None) -> None:
    """Copies the files of ``folder`` that are new or changed since ``before`` into ``target``."""
    if not target:
        return
    for path, mtime in _snapshot(folder).items():
        if before.get(path) == mtime or path.endswith(".tmp"):
            continue
        dest = os.path.join(target, os.path.relpath(path, folder))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            shutil.copy2(path, dest)
        except OSError:
            pass


def summary(report: dict[str, Any]) -> str:
    """The one-screen pass/fail summary of a run."""
    lines = [f"gpu-check on {report.get('device', '?')}: torch {report.get('torch')}, CUDA {report.get('cuda')}, "
             f"triton {report.get('triton')}, transformers {report.get('transformers')}, python "
             f"{report.get('python')}; {report.get('date', '')}; {report.get('seconds', 0):.0f} s of "
             f"{report.get('budget_s', 0):.0f} s"]
    for part in report["parts"]:
        detail = part.get("detail", "")
        lines.append(f"  {part['status'].upper():8s}{part['part']:10s}{part.get('seconds', 0):5.0f} s  {detail}"[:400])
        for step in part.get("steps", []):
            if step["status"] in ("fail", "timeout"):
                lines.append(f"      {step['step']}: {step['status']} {step['detail']} (log: {step.get('log', '-')})"[:400])
    failed = [p["part"] for p in report["parts"] if p["status"] in ("fail", "timeout")]
    lines.append(f"result: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}   "
                 f"JSON: {report.get('json', '?')}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The parts of a real run
# ------------------------------------------------------------------------------------------------
def _environment(python: str) -> dict[str, Any]:
    """Device, versions and date, from a subprocess (this process never initialises CUDA).
    Whether the extension is built is the build part's answer, not recorded here."""
    code = ("import json, sys; sys.path.insert(0, %r); import torch, harness; "
            "dev = 'cuda' if torch.cuda.is_available() else 'cpu'; env = harness.environment(dev); "
            "env.pop('pio_kernels_extension', None); env['cuda_available'] = torch.cuda.is_available(); "
            "env['capability'] = list(torch.cuda.get_device_capability()) if env['cuda_available'] else None; "
            "print('ENV' + json.dumps(env))") % HERE
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT).stdout
        env = json.loads(next(line[3:] for line in out.splitlines() if line.startswith("ENV")))
    except (subprocess.SubprocessError, StopIteration, json.JSONDecodeError, OSError) as exc:
        env = {"device": "unknown", "cuda_available": False, "error": f"{type(exc).__name__}: {exc}",
               "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    env["device_slug"] = re.sub(r"[^a-z0-9]+", "-", env.get("device", "unknown").split(" (")[0].lower()).strip("-")
    return env


def _compute_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in homes:
        if home:
            for rel in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
                path = os.path.join(home, rel)
                if os.path.exists(path):
                    return path
    return None


def judge_sanitizer(rc: int | None, output: str) -> tuple[str, str]:
    """pass: the payload ran and the tool reported no error; fail: errors or hazards, or the
    payload failed under a working tool; skip: the tool did not run (missing, refused the device)."""
    payload_ok = "PAYLOAD OK" in output
    errors = re.search(r"ERROR SUMMARY: (\d+) error", output)
    hazards = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", output)
    kernels = sorted(set(re.findall(r"at (?:0x[0-9a-f]+ in )?(?:[\w:()<> ]*::)?(\w+_kernel)", output)))
    where = f" in {', '.join(kernels[:4])}" if kernels else ""
    if hazards:
        n_err, n_warn = int(hazards.group(2)), int(hazards.group(3))
        if n_err:
            return "fail", f"racecheck: {n_err} errors, {n_warn} warnings{where}"
        if payload_ok:
            return "pass", f"racecheck: 0 errors, {n_warn} warnings"
    if errors:
        n = int(errors.group(1))
        if n:
            return "fail", f"memcheck: {n} errors{where}"
        if payload_ok:
            return "pass", "memcheck: 0 errors"
        return "fail", "the payload failed under the sanitizer (no memory error reported)"
    if payload_ok and rc == 0:
        return "pass", "payload ran; no summary line found"
    tail = " ".join(output.strip().splitlines()[-2:])[-200:]
    return "skip", f"sanitizer did not run here (exit status {rc}): {tail}"


def parse_junit(path: str) -> dict[str, Any]:
    """Counts and failed test names of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failed
    return counts


def _judge_tests(junit: str) -> Callable[[int | None, str], tuple[str, str]]:
    def judge(rc: int | None, output: str) -> tuple[str, str]:
        if not os.path.exists(junit):
            return "fail", f"pytest wrote no report (exit status {rc})"
        c = parse_junit(junit)
        line = f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped"
        if c["failed"]:
            line += ": " + ", ".join(c["failed"][:6]) + (" ..." if len(c["failed"]) > 6 else "")
        if c["tests"] == 0 or c["passed"] == 0:
            return "fail", "no cuda-marked test ran: " + line
        return ("pass" if rc == 0 and not c["failed"] else "fail"), line
    return judge


def _latest(results_dir: str, pattern: str) -> dict[str, Any] | None:
    paths = sorted(glob.glob(os.path.join(results_dir, pattern)), key=os.path.getmtime)
    if not paths:
        return None
    with open(paths[-1]) as f:
        return json.load(f)


def _summarize_kernels(steps: list[dict], results_dir: str) -> str:
    out = []
    sal = _latest(results_dir, "saliency-*.json")
    if sal:
        stage = [r for r in sal["rows"] if r.get("kind") == "stage" and r.get("backend") == "auto"]
        out.append("saliency x ref " + ", ".join(f"{r['shape']} {r['speedup']:.1f}x" for r in stage))
        kern = [r for r in sal["rows"] if str(r.get("kind", "")).startswith("kernel:")]
        if kern:
            worst = max(kern, key=lambda r: r["triton_ms"] / r["bound_ms"])
            out.append(f"Triton worst {worst['kind'][7:]} {worst['triton_ms'] / worst['bound_ms']:.1f}x its bound")
    regs = _latest(results_dir, "triton-kernels-*.json")
    if regs:
        spilling = sorted({r["kernel"] for r in regs["rows"] if r.get("n_spills")})
        out.append("spills: " + (", ".join(spilling) if spilling else "none") + f" ({len(regs['rows'])} variants)")
    nms = _latest(results_dir, "nms-*gpu-check*.json")
    if nms:
        bad = [r for r in nms["rows"] if r.get("identical") is False or r.get("same_as_cuda") is False]
        heavy = [r for r in nms["rows"] if r.get("path") == "cuda" and r.get("kind") == "heavy" and r["N"] == 16384
                 and r.get("batch") == 1]
        out.append(f"nms {len(bad)} of {len(nms['rows'])} rows differ" + (f", cuda heavy N=16384 {heavy[0]['ms']:.2f} ms" if heavy else ""))
    return "; ".join(out)


def _summarize_e2e(steps: list[dict], results_dir: str) -> str:
    out = []
    for model in E2E_MODELS:
        run = _latest(results_dir, f"e2e-*gpu-check-{model}.json")
        if not run:
            continue
        rows = [r for r in run["rows"] if r.get("path") == "ours" and r.get("batch") == 1 and "prefill_speedup" in r]
        errors = sum("error" in r for r in run["rows"])
        out.append(f"{model} " + "/".join(f"{r['schedule']} {r['prefill_speedup']:.2f}x" for r in rows)
                   + (f" ({errors} errors)" if errors else ""))
    return "prefill b1: " + "; ".join(out) if out else ""


def _summarize_build(steps: list[dict], results_dir: str) -> str:
    for step in steps:
        for line in step.get("tail", []):
            if line.startswith("BACKENDS "):
                return line
    return ""


def _summarize_sanitizer(steps: list[dict], results_dir: str) -> str:
    return "; ".join(f"{s['step']}: {s['detail']}" for s in steps)


def build_parts(python: str, results_dir: str, env: dict[str, Any], selected: list[str]) -> list[Part]:
    """The plan of a real run on this machine (skips where there is no CUDA device)."""
    no_gpu = None if env.get("cuda_available") else "no CUDA device"
    script = os.path.join(HERE, "gpu_check.py")
    cc = env.get("capability") or [9, 0]
    build_env = {"PIO_REQUIRE_EXTENSION": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)),
                 "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", f"{cc[0]}.{cc[1]}")}
    has_pip = subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0
    install = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", ROOT] if has_pip \
        else [python, os.path.join(ROOT, "setup.py"), "build_ext", "--inplace"]
    check = [python, "-c", "import pio_kernels; from pio_kernels.ops import available_backends as a; "
             "b = a('cuda'); print('BACKENDS cuda:', b, 'extension:', pio_kernels.HAS_EXTENSION); "
             "assert 'cuda' in b, 'the compiled CUDA kernel is missing'"]
    parts = [Part("build", PART_BUDGETS["build"], [Step("install", install, 6, build_env), Step("check", check, 1)],
                  skip=no_gpu, summarize=_summarize_build)]

    sanitizer = _compute_sanitizer()
    payload = [python, script, "--sanitizer-payload"]
    san_env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    parts.append(Part("sanitizer", PART_BUDGETS["sanitizer"], [
        Step("memcheck", [sanitizer or "compute-sanitizer", "--tool", "memcheck", "--print-limit", "20", *payload],
             1, san_env, judge_sanitizer),
        Step("racecheck", [sanitizer or "compute-sanitizer", "--tool", "racecheck", "--print-limit", "20", *payload],
             1, san_env, judge_sanitizer)],
        skip=no_gpu or (None if sanitizer else "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda*)"),
        summarize=_summarize_sanitizer))

    junit = os.path.join(results_dir, "gpu-check-logs", "pytest-cuda.xml")
    parts.append(Part("tests", PART_BUDGETS["tests"], [
        Step("pytest", [python, "-m", "pytest", "-m", "cuda", "-q", "-rfE", "-p", "no:cacheprovider",
                        f"--junitxml={junit}", os.path.join(ROOT, "tests")], 1, None, _judge_tests(junit))],
        skip=no_gpu))

    parts.append(Part("kernels", PART_BUDGETS["kernels"], [
        Step("saliency", [python, script, "--triton-report", "--results-dir", results_dir], 1),
        Step("nms", [python, os.path.join(HERE, "nms.py"), "--device", "cuda", "--preset", "gpu-check",
                     "--reference-cap-s", "5", "--tag", "gpu-check", "--results-dir", results_dir], 1)],
        skip=no_gpu, summarize=_summarize_kernels))

    e2e_steps = []
    for model, share in zip(E2E_MODELS, (1.0, 1.6, 1.4)):
        e2e_steps.append(Step(model, [python, os.path.join(HERE, "e2e.py"), "--device", "cuda", "--size", "full",
                                      "--models", model, "--batches", "1", "8", "--retentions", str(1 / 9),
                                      "--repeat", "2", "--warmup", "1", "--new-tokens", "4",
                                      "--reference-repeat", "1", "--reference-batches", "1",
                                      "--tag", f"gpu-check-{model}", "--results-dir", results_dir], share))
    parts.append(Part("e2e", PART_BUDGETS["e2e"], e2e_steps, skip=no_gpu, summarize=_summarize_e2e))
    return [p for p in parts if p.name in selected]


def dry_run_parts(parts: list[Part]) -> list[Part]:
    """The same plan with every command replaced by one that prints it (plumbing check)."""
    out = []
    for part in parts:
        steps = [dataclasses.replace(s, cmd=[sys.executable, "-c", f"print({'dry run: ' + ' '.join(s.cmd)!r})"],
                                     judge=None, env=None) for s in part.steps]
        out.append(dataclasses.replace(part, steps=steps, skip=None, summarize=None))
    return out


# ------------------------------------------------------------------------------------------------
# Payloads run inside a step
# ------------------------------------------------------------------------------------------------
def sanitizer_payload() -> None:
    """Small CUDA select_tokens calls covering every kernel and branch, checked against the
    reference: several blocks (the walk past the prefix), ragged rows, a row of length 0 and
    rows at or under the budget, out-of-range lengths (clamped), exact ties at tau."""
    import torch

    import pio_kernels
    from pio_kernels import reference

    g = torch.Generator().manual_seed(0)
    n, d = 2200, 32
    heavy = torch.zeros(n, d)
    heavy[:, 0] = 1.0
    heavy[:, 1:8] = 0.02 * torch.randn(n, 7, generator=g)
    for i, row in enumerate((900, 1500, 2100)):  # distinct tokens in the second and third blocks
        heavy[row] = 0
        heavy[row, 10 + i] = 1.0
    clustered = torch.randn(n // 10, d, generator=g).repeat_interleave(10, 0) + 0.05 * torch.randn(n, d, generator=g)
    x = torch.stack([heavy, clustered, torch.randn(n, d, generator=g)])
    s = torch.linspace(1, 0, n).expand(3, n).contiguous()
    cases = [(8, 0.8, torch.tensor([n, 1800, 5])), (230, 0.8, torch.tensor([n, n, 0])), (3, 1.0, None),
             (64, 0.5, torch.tensor([-4, 99999, 40]))]
    for budget, tau, lengths in cases:
        got = pio_kernels.select_tokens(x.cuda(), s.cuda(), budget, tau,
                                        None if lengths is None else lengths.cuda(), backend="cuda")
        torch.cuda.synchronize()
        clamped = None if lengths is None else lengths.clamp(0, n)
        want = reference.select_tokens(x, s, budget, tau, clamped)
        assert torch.equal(got.cpu(), want), f"budget {budget}, tau {tau}: {got.cpu()} != {want}"
    print("PAYLOAD OK")


def triton_report(results_dir: str) -> None:
    """Runs benchmarks/saliency.py on CUDA as it is, then a few NMS calls on the Triton path, and
    writes the registers and spills of every Triton kernel variant this process launched."""
    import runpy

    import torch

    sys.argv = [os.path.join(HERE, "saliency.py"), "--device", "cuda"]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.path.insert(0, HERE)
        import pio_kernels
        import harness

        for n, budget in ((576, 64), (2880, 320), (16384, 64), (16384, 1819)):
            x = torch.randn(1, n, 4096, device="cuda", dtype=torch.bfloat16)
            pio_kernels.select_tokens(x, torch.rand(1, n, device="cuda"), budget, 0.8, backend="triton")
        torch.cuda.synchronize()
        rows = triton_kernel_resources()
        for r in rows:
            print(f"{r['kernel']:32s} regs {r['n_regs']!s:>4s} spills {r['n_spills']!s:>4s} warps {r['num_warps']} "
                  f"shared {r['shared']} {r['constexprs']}")
        print("wrote", harness.write_results("triton-kernels", "cuda", rows, folder=results_dir))


def triton_kernel_resources() -> list[dict[str, Any]]:
    """Registers and spills of every compiled variant of every Triton kernel of pio_kernels."""
    import importlib

    rows = []
    for module_name in ("pio_kernels.triton.head_loss", "pio_kernels.triton.saliency_epilogue",
                        "pio_kernels.triton.select_tokens"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, fn in vars(module).items():
            caches = getattr(fn, "device_caches", None)
            if not isinstance(caches, dict):
                continue
            for device, cache in caches.items():
                for part in cache if isinstance(cache, tuple) else (cache,):
                    if not isinstance(part, dict):
                        continue
                    for kernel in part.values():
                        if not hasattr(kernel, "metadata"):
                            continue
                        if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
                            kernel._init_handles()
                        src = getattr(kernel, "src", None)
                        consts = getattr(src, "constexprs", None) or getattr(src, "constants", None) or {}
                        meta = kernel.metadata
                        rows.append({"module": module_name.rsplit(".", 1)[-1], "kernel": name, "device": str(device),
                                     "n_regs": getattr(kernel, "n_regs", None),
                                     "n_spills": getattr(kernel, "n_spills", None),
                                     "num_warps": getattr(meta, "num_warps", None),
                                     "num_stages": getattr(meta, "num_stages", None),
                                     "shared": getattr(meta, "shared", None),
                                     "constexprs": {str(k): str(v) for k, v in dict(consts).items()}})
    return rows


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--budget", type=float, default=sum(PART_BUDGETS.values()),
                        help="seconds for everything (default %(default).0f), shared out by the part budgets")
    parser.add_argument("--results-dir", default=RESULTS_DIR)
    parser.add_argument("--mirror", default=None, help="copy every new or changed result file here as it goes")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of every step")
    parser.add_argument("--dry-run", action="store_true", help="run the plan with stand-in commands")
    parser.add_argument("--sanitizer-payload", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--triton-report", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sanitizer_payload:
        sanitizer_payload()
        return 0
    if args.triton_report:
        triton_report(args.results_dir)
        return 0

    results_dir = os.path.abspath(args.results_dir)
    env = _environment(args.python)
    parts = build_parts(args.python, results_dir, env, args.parts)
    if args.dry_run:
        parts = dry_run_parts(parts)
        env = {**env, "dry_run": True, "device_slug": f"dry-run-{env['device_slug']}"}
    elif not env.get("cuda_available"):
        print(f"gpu-check: no CUDA device here ({env.get('device')}); nothing to check. "
              "`--dry-run` checks the plumbing.", file=sys.stderr)
        return 2
    report = run_plan(parts, results_dir=results_dir, budget_s=args.budget, env=env, mirror=args.mirror)
    print()
    print(summary(report))
    return 0 if report["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
