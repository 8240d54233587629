"""Saliency epilogue: ``input_layernorm`` backward fused with the per-token L2 norm (SPEC 2.5).

One program per token row ``(b, j)``. With ``x = H[b, j]`` (D), ``g = dXn[b, j] * w`` (the
gradient of the normalised row, gain applied) and ``rstd = rsqrt(mean(x^2) + eps)``:

    dH = rstd * g - x * rstd^3 * mean(g * x)      (+ dH1 of the row when it is a loss row)
    score = || dH ||_2                             (fp32)

The row is read twice (pass 1: ``sum x^2`` and ``sum g x``; pass 2: ``dH`` and its squared
norm), so ``D`` may be any size; the second read of a 16-32 KB row is served from L1/L2.
The loss rows' residual gradient is added through an index map (row -> slot in ``extra``
or -1), so no (B, S, D) residual tensor is built.

Bytes and bound: ``B*S*D*(4 + elt(H)) + D*4`` read and ``B*S*4`` written once from DRAM,
~4 FLOP per element: bandwidth-bound (H100 SXM ~3.35 TB/s, H200 ~4.8 TB/s). LLaVA-1.5
(S 640, D 4096, bf16 H): 15.7 MB -> ~5 us at 3.35 TB/s (~3 us at 4.8), about a kernel
launch; the torch fallback makes ~6 passes over (B, S, D) fp32 tensors. The config
(:func:`launch_config`: ``BLOCK_D`` = next power of two of D in [128, 1024], ``BLOCK_D / 128``
warps) moves no extra bytes; each thread holds 4 elements of each operand per step (one
16-byte fp32 vector), 40-64 registers at sm_90 and no spill (with 4 warps at ``BLOCK_D =
1024``, ptxas 13.x spilled 8 bytes; ``tests/test_triton_aot.py`` checks every choice). Not
measured on a GPU yet.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pio_kernels.triton.head_loss import TRITON_TYPES, compile_ahead_of_time, compiled_resources, parallel_map

__all__ = ["EpilogueConfig", "saliency_epilogue", "launch_config", "possible_configs", "launch_ints",
           "aot_compile", "kernel_resources"]

HIDDEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # any other float is upcast to fp32 first
_MIN_BLOCK_D, _MAX_BLOCK_D = 128, 1024


class EpilogueConfig(NamedTuple):
    """``BLOCK_D`` (elements of a row per loop step) and the launch options of the epilogue."""
    block_d: int
    num_warps: int
    num_stages: int


def launch_config(dim: int) -> EpilogueConfig:
    """The config :func:`saliency_epilogue` launches for rows of ``dim`` channels."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    block_d = min(_MAX_BLOCK_D, max(_MIN_BLOCK_D, triton.next_power_of_2(dim)))
    return EpilogueConfig(block_d, num_warps=block_d // 128, num_stages=3)  # 4 elements per thread


def possible_configs() -> list[EpilogueConfig]:
    """Every value :func:`launch_config` can return (constant from ``dim = _MAX_BLOCK_D`` on)."""
    seen: list[EpilogueConfig] = []
    for dim in range(1, 2 * _MAX_BLOCK_D + 1):
        cfg = launch_config(dim)
        if cfg not in seen:
            seen.append(cfg)
    return seen


@triton.jit
def _epilogue_kernel(grad_ptr, h_ptr, w_ptr, extra_ptr, extra_slot_ptr, out_ptr, D, eps,
                     stride_grad, stride_h, stride_extra, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    grad_row = grad_ptr + row * stride_grad
    h_row = h_ptr + row * stride_h
    sum_xx = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        ok = offs < D
        x = tl.load(h_row + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(grad_row + offs, mask=ok, other=0.0).to(tl.float32) * \
            tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        sum_xx += x * x
        sum_gx += g * x
    rstd = 1.0 / tl.sqrt(tl.sum(sum_xx, axis=0) / D + eps)
    coef = rstd * rstd * rstd * tl.sum(sum_gx, axis=0) / D
    slot = tl.load(extra_slot_ptr + row)
    has_extra = slot >= 0
    extra_row = extra_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_extra
    sum_dd = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        ok = offs < D
        x = tl.load(h_row + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(grad_row + offs, mask=ok, other=0.0).to(tl.float32) * \
            tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dh = rstd * g - x * coef
        extra = tl.load(extra_row + offs, mask=ok, other=0.0)  # slot 0 stands in for "none"
        dh += tl.where(has_extra, extra, 0.0)
        sum_dd += dh * dh
    tl.store(out_ptr + row, tl.sqrt(tl.sum(sum_dd, axis=0)))


def saliency_epilogue(grad_xn: torch.Tensor, hidden: torch.Tensor, gain: torch.Tensor, eps: float,
                      rows: torch.Tensor, grad_residual: torch.Tensor) -> torch.Tensor:
    """Per-token ``|| dH ||_2`` from the gradient of ``input_layernorm``'s output.

    Args:
        grad_xn: (B, S, D) float32, gradient w.r.t. the norm's output; CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        hidden: (B, S, D) floating, the norm's input (float32/float16/bfloat16 are read as
            they are, any other float dtype is upcast to float32 first).
        gain: (D,) floating, the norm's weight.
        eps: the norm's ``variance_epsilon``.
        rows: (B, K) int64, the loss rows (distinct within a sample).
        grad_residual: (B, K, D) float32, residual gradient added to those rows.

    Returns:
        (B, S) float32 on ``grad_xn.device`` (padding is not masked here). The kernel runs on
        that device (and its current stream), whatever the current CUDA device is.
    """
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if grad_xn.device.type != "cuda" and not interpreting:
        raise ValueError(f"grad_xn must be a CUDA tensor (or set TRITON_INTERPRET=1), got {grad_xn.device}")
    if grad_xn.dim() != 3 or grad_xn.dtype != torch.float32:
        raise ValueError(f"grad_xn must be (B, S, D) float32, got {tuple(grad_xn.shape)} {grad_xn.dtype}")
    batch, seq_len, dim = grad_xn.shape
    if hidden.shape != grad_xn.shape or not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating (B, S, D) = {tuple(grad_xn.shape)}, got "
                         f"{tuple(hidden.shape)} {hidden.dtype}")
    if tuple(gain.shape) != (dim,) or not gain.is_floating_point():
        raise ValueError(f"gain must be floating (D={dim},), got {tuple(gain.shape)} {gain.dtype}")
    if rows.dim() != 2 or rows.shape[0] != batch or rows.dtype != torch.int64:
        raise ValueError(f"rows must be (B={batch}, K) int64, got {tuple(rows.shape)} {rows.dtype}")
    if tuple(grad_residual.shape) != (batch, rows.shape[1], dim) or grad_residual.dtype != torch.float32:
        raise ValueError(f"grad_residual must be (B, K, D) = ({batch}, {rows.shape[1]}, {dim}) float32, "
                         f"got {tuple(grad_residual.shape)} {grad_residual.dtype}")
    for name, t in (("hidden", hidden), ("gain", gain), ("rows", rows), ("grad_residual", grad_residual)):
        if t.device != grad_xn.device:
            raise ValueError(f"{name} must be on {grad_xn.device}, got {t.device}")
    device = grad_xn.device
    if batch * seq_len == 0 or dim == 0:  # no row to launch for; a row of no channels has norm 0
        return torch.zeros(batch, seq_len, dtype=torch.float32, device=device)
    if hidden.dtype not in HIDDEN_DTYPES:
        hidden = hidden.float()  # the kernel computes in fp32: same result, three compiled variants only
    config = launch_config(dim)
    # Triton launches on the current device: make it the tensors' one.
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        grad_xn = grad_xn.contiguous().view(batch * seq_len, dim)
        hidden = hidden.contiguous().view(batch * seq_len, dim)
        extra = grad_residual.contiguous().view(-1, dim)
        slot = torch.full((batch * seq_len,), -1, dtype=torch.int64, device=device)
        flat_rows = (rows + seq_len * torch.arange(batch, device=device).unsqueeze(1)).view(-1)
        slot.scatter_(0, flat_rows, torch.arange(flat_rows.numel(), device=device))
        out = torch.empty(batch * seq_len, dtype=torch.float32, device=device)
        _epilogue_kernel[(batch * seq_len,)](
            grad_xn, hidden, gain.float().contiguous(), extra, slot, out, dim, float(eps),
            grad_xn.stride(0), hidden.stride(0), extra.stride(0),
            BLOCK_D=config.block_d, num_warps=config.num_warps, num_stages=config.num_stages)
        return out.view(batch, seq_len)


def launch_ints(config: EpilogueConfig) -> list[dict[str, int] | None]:
    """Integer argument values standing for every specialisation a launch with ``config`` can get:
    ``None`` (unspecialised: pointers not 16-byte aligned), then aligned pointers with D and the
    row strides (all equal) not a multiple of 16, and a multiple of 16 (real models)."""
    return [None] + [dict(D=d, stride_grad=d, stride_h=d, stride_extra=d) for d in (4095, 4096)]


def aot_compile(config: EpilogueConfig, hidden_dtype: torch.dtype, *, ints: dict[str, int] | None = None,
                target=None):
    """Compile the epilogue kernel with ``config`` ahead of time (no GPU needed).

    Args:
        config: one of :func:`possible_configs`.
        hidden_dtype: float32/float16/bfloat16 (the gain is always passed as float32).
        ints: integer argument values to specialise on (see
            :func:`pio_kernels.triton.head_loss.compile_ahead_of_time`), e.g. one of
            :func:`launch_ints`; ``None``: unspecialised.
        target: a ``triton.backends.compiler.GPUTarget``; default sm_90 (H100/H200).
    """
    if hidden_dtype not in HIDDEN_DTYPES:
        raise TypeError(f"hidden_dtype must be float32, float16 or bfloat16, got {hidden_dtype}")
    signature = {"grad_ptr": "*fp32", "h_ptr": "*" + TRITON_TYPES[hidden_dtype], "w_ptr": "*fp32",
                 "extra_ptr": "*fp32", "extra_slot_ptr": "*i64", "out_ptr": "*fp32", "D": "i32", "eps": "fp32",
                 "stride_grad": "i32", "stride_h": "i32", "stride_extra": "i32"}
    return compile_ahead_of_time(_epilogue_kernel, signature, {"BLOCK_D": config.block_d},
                                 num_warps=config.num_warps, num_stages=config.num_stages, ints=ints, target=target)


def kernel_resources(target=None, hidden_dtypes: tuple[torch.dtype, ...] = HIDDEN_DTYPES,
                     specialized_only: bool = False, workers: int | None = None) -> list[dict]:
    """``compiled_resources`` (regs, stack_bytes, spills, shared) of every config :func:`launch_config`
    can choose, per hidden dtype and launch specialisation (:func:`launch_ints`;
    ``specialized_only``: only D a multiple of 16, as in real models); one dict each, with
    the config's fields, ``hidden_dtype`` and ``ints``. Compiles on ``workers`` threads."""
    jobs = [(cfg, dtype, ints) for cfg in possible_configs() for dtype in hidden_dtypes
            for ints in launch_ints(cfg)[-1 if specialized_only else 0:]]

    def measure(job) -> dict:
        cfg, dtype, ints = job
        compiled = aot_compile(cfg, dtype, ints=ints, target=target)
        return dict(kernel="epilogue", **cfg._asdict(), hidden_dtype=str(dtype).removeprefix("torch."), ints=ints,
                    **compiled_resources(compiled))

    return parallel_map(measure, jobs, workers)
