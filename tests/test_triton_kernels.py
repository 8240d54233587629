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


_HEAD_SIG = {"x_ptr": "*fp32", "w_ptr": "*bf16", "b_ptr": "*bf16", "z_ptr": "*fp32", "tile_max_ptr": "*fp32",
             "tile_arg_ptr": "*i64", "tile_sum_ptr": "*fp32", "R": "i32", "V": "i32", "D": "i32", "stride_x": "i32",
             "stride_w": "i32", "stride_z": "i32", "n_tiles": "i32", "HAS_BIAS": "constexpr", "BLOCK_R": "constexpr",
             "BLOCK_V": "constexpr", "BLOCK_D": "constexpr"}
_GRAD_SIG = {"z_ptr": "*fp32", "lse_ptr": "*fp32", "label_ptr": "*i64", "scale_ptr": "*fp32", "w_ptr": "*bf16",
             "out_ptr": "*fp32", "R": "i32", "V": "i32", "D": "i32", "stride_z": "i32", "stride_w": "i32",
             "v_per_split": "i32", "BLOCK_R": "constexpr", "BLOCK_V": "constexpr", "BLOCK_D": "constexpr"}
_EPILOGUE_SIG = {"grad_ptr": "*fp32", "h_ptr": "*bf16", "w_ptr": "*bf16", "extra_ptr": "*fp32",
                 "extra_slot_ptr": "*i64", "out_ptr": "*fp32", "D": "i32", "eps": "fp32", "stride_grad": "i32",
                 "stride_h": "i32", "stride_extra": "i32", "BLOCK_D": "constexpr"}


def test_kernels_compile_for_sm90():
    """Ahead-of-time compilation for an H100 (no GPU needed): catches what the interpreter accepts
    but the compiler rejects. Skipped where the NVIDIA backend or its ptxas is missing."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pio_kernels.triton import head_loss, saliency_epilogue

    cases = [(saliency_epilogue._epilogue_kernel, _EPILOGUE_SIG, {"BLOCK_D": 1024})]
    for block_r in (16, 64):
        cases.append((head_loss._logits_kernel, _HEAD_SIG, {"HAS_BIAS": True, "BLOCK_R": block_r,
                                                            "BLOCK_V": head_loss._LOGITS_BLOCK_V,
                                                            "BLOCK_D": head_loss._LOGITS_BLOCK_D}))
        cases.append((head_loss._grad_kernel, _GRAD_SIG, {"BLOCK_R": block_r, "BLOCK_V": head_loss._GRAD_BLOCK_V,
                                                          "BLOCK_D": head_loss._GRAD_BLOCK_D}))
    for fn, signature, constexprs in cases:
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32))
        except Exception as exc:  # noqa: BLE001 - only a missing toolchain is a skip
            if "ptxas" in str(exc).lower() or "nvidia" in str(exc).lower() and "backend" in str(exc).lower():
                pytest.skip(f"no NVIDIA toolchain for AOT compilation: {exc}")
            raise
        assert compiled.metadata.shared <= 228 * 1024  # fits an H100 SM
