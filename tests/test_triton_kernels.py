"""Runs the Triton interpreter cases (tests/triton_interpreter_cases.py) in a fresh process.

``TRITON_INTERPRET=1`` only takes effect if it is set before Triton is first imported, and
the main test process may already have imported Triton; a subprocess is the one place
where that is guaranteed.
"""
import os

import pytest

from triton_interpreter import run_interpreted

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_triton_kernels_under_interpreter():
    out = run_interpreted(["-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(HERE, "triton_interpreter_cases.py")])
    assert " passed" in out and "skipped" not in out.split("\n")[-2], out[-6000:]
