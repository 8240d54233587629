"""Runs the Triton interpreter cases (tests/triton_interpreter_cases.py) in a fresh process.

``TRITON_INTERPRET=1`` only takes effect if it is set before Triton is first imported, and
the main test process may already have imported Triton; a subprocess is the one place
where that is guaranteed.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(HERE, "triton_interpreter_cases.py")]
    done = subprocess.run(cmd, cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=600)
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, tail
    assert " passed" in done.stdout and "skipped" not in done.stdout.split("\n")[-2], tail
