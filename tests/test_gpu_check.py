"""benchmarks/gpu_check.py (``make gpu-check``) on CPU: the plumbing, without a GPU.

The real parts need a CUDA device; here the orchestration is checked with stand-in steps:
per-part time budgets (time left over goes to later parts, a step past its window is killed
with its children), the JSON rewritten after every step, the summary and the exit status;
and the plan of a real run (commands, flags the scripts accept, environment).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check  # noqa: E402

PY = sys.executable
ENV = {"device": "Fake GPU", "device_slug": "fake-gpu", "torch": "x", "cuda": "y", "triton": "z",
       "transformers": "t", "python": "3", "date": "2030-01-01T00:00:00+00:00", "cuda_available": True,
       "capability": [9, 0]}


def _py(code: str) -> list[str]:
    return [PY, "-c", code]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_budgets_timeouts_json_and_summary(tmp_path):
    json_path = tmp_path / "gpu-check-fake-gpu.json"
    pid_file = tmp_path / "grandchild.pid"
    sleeper = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               f"open({str(pid_file)!r}, 'w').write(str(p.pid)); p.wait()")
    reads_json = (f"import json; d = json.load(open({str(json_path)!r})); "
                  "assert d['parts'][1]['steps'][0]['status'] == 'timeout', d; print('saw the timeout')")
    parts = [
        gpu_check.Part("first", 4.0, [gpu_check.Step("ok", _py("print('hello')")),
                                      gpu_check.Step("fails", _py("import sys; sys.exit(3)"))]),
        gpu_check.Part("second", 2.0, [gpu_check.Step("sleeps", _py(sleeper))]),
        gpu_check.Part("third", 6.0, [gpu_check.Step("reads", _py(reads_json))],
                       summarize=lambda steps, folder: "custom summary"),
        gpu_check.Part("fourth", 1.0, [], skip="not here"),
    ]
    lines: list[str] = []
    t0 = time.monotonic()
    report = gpu_check.run_plan(parts, results_dir=str(tmp_path), budget_s=13.0, env=ENV, echo=lines.append)
    took = time.monotonic() - t0
    assert took < 40
    statuses = {p["part"]: p["status"] for p in report["parts"]}
    assert statuses == {"first": "fail", "second": "timeout", "third": "pass", "fourth": "skip"}
    first = report["parts"][0]["steps"]
    assert [s["status"] for s in first] == ["pass", "fail"] and first[1]["detail"] == "exit status 3"
    assert "hello" in (tmp_path / "gpu-check-logs" / "first-ok.log").read_text()
    sleeps = report["parts"][1]["steps"][0]
    # The second part may use what the first left over: its window ends 6 s after the start.
    assert sleeps["rc"] is None and sleeps["seconds"] < 12
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 15
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(grandchild), "the step's child survived the timeout"  # killed with its process group
    assert report["parts"][2]["detail"] == "custom summary"
    assert "saw the timeout" in "\n".join(report["parts"][2]["steps"][0]["tail"])  # the JSON was there in time
    on_disk = json.loads(json_path.read_text())
    assert on_disk["status"] == "fail" and on_disk["device"] == "Fake GPU" and on_disk["date"].startswith("2030")
    assert [p["part"] for p in on_disk["parts"]] == ["first", "second", "third", "fourth"]
    text = gpu_check.summary(report)
    assert len(text.splitlines()) <= 24
    assert "TIMEOUT" in text and "FAIL" in text and "SKIP" in text and "result: FAIL (first, second)" in text
    assert any("second/sleeps: timeout" in line for line in lines)


def test_mirror_copies_results_as_they_go(tmp_path):
    results, mirror = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    (results / "old.json").write_text("{}")  # there before the run: not copied
    parts = [gpu_check.Part("one", 1.0, [gpu_check.Step(
        "writes", _py(f"open({str(results / 'new.json')!r}, 'w').write('1')"))])]
    report = gpu_check.run_plan(parts, results_dir=str(results), budget_s=20, env=ENV, mirror=str(mirror),
                                echo=lambda line: None)
    assert report["status"] == "pass"
    copied = {p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file()}
    assert {"new.json", "gpu-check-fake-gpu.json", "gpu-check-logs/one-writes.log"} <= copied
    assert "old.json" not in copied


def test_dry_run_end_to_end(tmp_path):
    """``--dry-run``: the whole real plan with stand-in commands, in a fresh process (as make runs it)."""
    proc = subprocess.run([PY, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run", "--results-dir",
                           str(tmp_path), "--budget", "120"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("gpu-check-dry-run-*.json")
    data = json.loads(path.read_text())
    assert data["dry_run"] and data["status"] == "pass"
    for key in ("device", "torch", "triton", "transformers", "python", "date"):
        assert key in data
    assert [p["part"] for p in data["parts"]] == list(gpu_check.PARTS)
    logs = {p.name for p in (tmp_path / "gpu-check-logs").iterdir()}
    assert {"build-install.log", "tests-pytest.log", "kernels-nms.log", "e2e-qwen2.5-vl-7b.log"} <= logs
    assert "result: PASS" in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without a GPU")
def test_no_gpu_exits_2(tmp_path):
    proc = subprocess.run([PY, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not list(tmp_path.glob("*.json"))


def test_real_plan_commands(tmp_path):
    parts = {p.name: p for p in gpu_check.build_parts(PY, str(tmp_path), ENV, list(gpu_check.PARTS))}
    assert list(parts) == list(gpu_check.PARTS) and all(p.skip is None or "sanitizer" in p.skip for p in parts.values())
    build = parts["build"].steps
    assert build[0].env["PIO_REQUIRE_EXTENSION"] == "1" and build[0].env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert "--no-build-isolation" in build[0].cmd or "build_ext" in build[0].cmd
    assert "assert 'cuda' in b" in build[1].cmd[-1]
    (pytest_step,) = parts["tests"].steps
    assert pytest_step.cmd[pytest_step.cmd.index("pytest") + 1: pytest_step.cmd.index("pytest") + 3] == ["-m", "cuda"]
    nms_step = parts["kernels"].steps[1]
    assert nms_step.cmd[nms_step.cmd.index("--preset") + 1] == "gpu-check"
    e2e = parts["e2e"].steps
    assert [s.name for s in e2e] == list(gpu_check.E2E_MODELS)
    for step in e2e:
        cmd = step.cmd
        assert cmd[cmd.index("--batches") + 1: cmd.index("--batches") + 3] == ["1", "8"]
        assert cmd[cmd.index("--size") + 1] == "full" and cmd[cmd.index("--device") + 1] == "cuda"
    # Every flag a step passes to a benchmark script is one that script accepts.
    for step in (nms_step, e2e[0]):
        script = next(c for c in step.cmd if c.endswith(".py"))
        helptext = subprocess.run([PY, script, "--help"], capture_output=True, text=True, timeout=120).stdout
        for flag in (c for c in step.cmd if c.startswith("--")):
            assert flag in helptext, f"{os.path.basename(script)} does not accept {flag}"
    no_gpu = gpu_check.build_parts(PY, str(tmp_path), {**ENV, "cuda_available": False}, ["build", "e2e"])
    assert [p.skip for p in no_gpu] == ["no CUDA device", "no CUDA device"]


@pytest.mark.parametrize("output,rc,status", [
    ("PAYLOAD OK\n========= ERROR SUMMARY: 0 errors\n", 0, "pass"),
    ("========= Invalid __global__ read of size 4 bytes\n=========     at pio::(anonymous namespace)::scan_kernel"
     "(const unsigned int *)+0x1a0\nPAYLOAD OK\n========= ERROR SUMMARY: 3 errors\n", 99, "fail"),
    ("PAYLOAD OK\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", 0, "pass"),
    ("PAYLOAD OK\n========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n", 0, "fail"),
    ("AssertionError: budget 8\n========= ERROR SUMMARY: 0 errors\n", 1, "fail"),
    ("========= Error: Target application terminated before first instrumented API call\n", 255, "skip"),
    ("========= Error: Device not supported\n", 1, "skip"),
])
def test_judge_sanitizer(output, rc, status):
    got, detail = gpu_check.judge_sanitizer(rc, output)
    assert got == status, detail
    if "scan_kernel" in output:
        assert "scan_kernel" in detail


def test_parse_junit(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.test_a" name="test_ok"/>'
                   '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
                   '<testcase classname="tests.test_b" name="test_skip"><skipped/></testcase>'
                   '<testcase classname="tests.test_b" name="test_ok2"/></testsuite></testsuites>')
    c = gpu_check.parse_junit(str(xml))
    assert (c["passed"], c["failures"], c["skipped"], c["failed"]) == (2, 1, 1, ["test_a::test_bad"])
    status, detail = gpu_check._judge_tests(str(xml))(1, "")
    assert status == "fail" and "test_a::test_bad" in detail
    xml.write_text('<testsuites><testsuite tests="2" failures="0" errors="0" skipped="2"/></testsuites>')
    assert gpu_check._judge_tests(str(xml))(0, "")[0] == "fail"  # nothing ran: vacuous
