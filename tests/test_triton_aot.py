"""Ahead-of-time compilation of the Triton kernels for an H100/H200 (sm_90), no GPU needed.

Every config the launchers can choose (``head_loss.possible_configs``,
``saliency_epilogue.possible_configs``), for every weight / hidden dtype and every launch
specialisation (``launch_ints``: Triton marks 16-aligned pointers and multiples of 16, and
makes an int equal to 1 a constant, except for the arguments a kernel lists in
``do_not_specialize``), must compile with zero register spills and fit an SM's shared memory. The
resource figures are read from the cubin (``head_loss.compiled_resources``); one test shows
that reader sees the spills of a config that has them, so the zero-spill assertions can fail.

Skipped where the NVIDIA backend or its ptxas is missing, and under ``TRITON_INTERPRET=1``.
The first run compiles ~120 small kernels (minutes on two cores; parallel on more); Triton
caches them.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")

from pio_kernels.triton import head_loss, saliency_epilogue  # noqa: E402

# An H100 SM has 228 KB of shared memory, of which one CTA may use at most 227 KB.
MAX_SHARED_PER_CTA = 227 * 1024


@pytest.fixture(scope="module")
def sm90():
    """Skips unless a kernel compiles for sm_90 here."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    try:
        saliency_epilogue.aot_compile(saliency_epilogue.launch_config(64), torch.float32)
    except Exception as exc:  # noqa: BLE001 - only a missing toolchain is a skip
        text = str(exc).lower()
        if "ptxas" in text or ("nvidia" in text and "backend" in text):
            pytest.skip(f"no NVIDIA toolchain for AOT compilation: {exc}")
        raise


def _describe(row: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in row.items())


def test_possible_configs_cover_every_launch():
    """The enumerations the zero-spill tests walk hold every config a launch can pick."""
    head = head_loss.possible_configs()
    assert len(head) == len(set(head)) >= 3
    for rows in range(1, 5000):
        assert head_loss.launch_configs(rows) in head, rows
    epilogue = saliency_epilogue.possible_configs()
    for dim in range(1, 20000):
        assert saliency_epilogue.launch_config(dim) in epilogue, dim
    for pair in head:  # tl.dot needs K >= 16 on Triton 3.6: BLOCK_D in pass 1, BLOCK_V in pass 2
        assert pair[0].block_d >= 16 and pair[1].block_v >= 16 and pair[0].block_r == pair[1].block_r >= 16


def test_head_kernels_compile_for_sm90_without_spills(sm90):
    rows = head_loss.kernel_resources()
    # per pair and dtype: logits with and without bias, and grad, each in 3 launch variants
    assert len(rows) == len(head_loss.possible_configs()) * len(head_loss.WEIGHT_DTYPES) * 3 * 3
    bad = [_describe(r) for r in rows if r["spills"] or r["stack_bytes"] or r["shared"] > MAX_SHARED_PER_CTA]
    assert not bad, "\n".join(bad)
    assert all(0 < r["regs"] <= 255 for r in rows)


def test_epilogue_kernel_compiles_for_sm90_without_spills(sm90):
    rows = saliency_epilogue.kernel_resources()
    assert len(rows) == len(saliency_epilogue.possible_configs()) * 3 * 3
    bad = [_describe(r) for r in rows if r["spills"] or r["stack_bytes"] or r["shared"] > MAX_SHARED_PER_CTA]
    assert not bad, "\n".join(bad)


def test_resource_reader_sees_spills(sm90):
    """The config pass 1 had before (BLOCK_V 128, BLOCK_D 64, 4 warps) spills at BLOCK_R = 64: the
    reader must say so, and agree with cuobjdump where Triton ships it."""
    old = head_loss.KernelConfig(block_r=64, block_v=128, block_d=64, num_warps=4, num_stages=3)
    compiled = head_loss.aot_compile("logits", old, torch.bfloat16, ints=None)
    got = head_loss.compiled_resources(compiled)
    assert got["stack_bytes"] > 0 and got["spills"] == got["stack_bytes"] // 4
    assert got["shared"] == compiled.metadata.shared
    try:
        from triton import knobs
        cuobjdump = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - no bundled cuobjdump: the cross-check is skipped
        return
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    assert match, out
    assert (got["regs"], got["stack_bytes"]) == (int(match[1]), int(match[2]))
