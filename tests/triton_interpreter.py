"""Running a check in a fresh Python process under Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before any kernel is imported, so an interpreted check runs
in a process of its own (from the repository root) and reports through its output.
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_interpreted(args: list[str], timeout: int = 600) -> str:
    """Runs ``python *args`` with ``TRITON_INTERPRET=1``; asserts that it exits 0 (the message is
    the tail of its output) and returns its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done.stdout
