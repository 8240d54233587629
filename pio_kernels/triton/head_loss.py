"""Fused head of the proxy loss: ``lm_head`` + CE against the argmax pseudo-label + its gradient.

SPEC 2.2-2.4 on the R = B*K loss rows only. Given the final-norm rows ``X`` (R, D) fp32 and
the head ``W`` (V, D) (+ bias), computes ``dX = d/dX sum_r s_r CE(Z_r, argmax Z_r)`` with
``Z = X W^T + b`` in fp32 and ``s_r`` a per-row loss weight (1/K). Two passes stream over the
vocabulary; only the small ``R x V`` fp32 logits are ever written:

1. ``_logits_kernel`` (grid: vocabulary blocks x row blocks): one tile of ``Z``, stored,
   plus the tile's row max, its first argmax and ``sum exp(Z - max)``. The host merges the
   per-tile statistics into ``logsumexp`` and the pseudo-label (online-softmax merge; ties
   go to the lowest vocabulary index, like ``torch.argmax``).
2. ``_grad_kernel`` (grid: D blocks x vocabulary splits x row blocks): rebuilds
   ``dZ = s_r (exp(Z - lse) - onehot)`` tile by tile from the stored logits and
   accumulates ``dZ W`` over its vocabulary split; the host sums the splits (no atomics,
   so the result is deterministic).

Precision: every tile is upcast to fp32 and ``tl.dot`` runs in IEEE fp32 (FMA units, no
tensor cores), the same numbers as the reference (which upcasts the head to fp32);
fp16/bf16 weights are never rounded further.

Bound (H100 SXM: ~3.35 TB/s HBM, ~67 TFLOP/s fp32 FMA; H200: ~4.8 TB/s, same FMA rate).
Rows go in blocks of ``BLOCK_R`` in {16, 32, 64} (:func:`launch_configs`); ``R_pad`` is R
rounded up to whole blocks, ``n_rb = R_pad / BLOCK_R`` (1 up to R = 64).

- DRAM bytes: each pass reads the head once per row block, ``2 * n_rb * V * D * elt`` in
  all; the logits add ``R * V * 4`` written (plus one read if L2 evicted them) and the
  pass-2 partial sums ``2 * splits * R * D * 4`` (8 splits at D = 4096, a few MB).
  LLaVA-1.5 (V 32000, D 4096, bf16, R <= 64): 0.52 GB -> 0.16 ms at 3.35 TB/s (0.11 ms at
  4.8 TB/s); Qwen2.5-VL-7B (V 152064, D 3584): 2.18 GB -> 0.65 ms (0.45 ms).
- FLOPs: the padded rows are computed too, ``4 * R_pad * V * D``. That is
  ``2 * R_pad / elt`` FLOP per head byte: 16 at R_pad = 16 in bf16, about the H100 balance
  (67 / 3.35 = 20) and above the H200's (14). So for R <= 16 (B*K = 4 at batch 1) the
  kernels sit near the bandwidth bound on H100 and at the FMA bound on H200 (LLaVA: 8.4
  GFLOP -> 0.13 ms; Qwen: 35 GFLOP -> 0.52 ms); at R_pad = 32 or 64 both are FMA-bound, 2x
  or 4x that. The time bound is ``max(bytes / bandwidth, FLOPs / 67 TFLOP/s)``.

What the config does to it. ``BLOCK_R`` sets ``R_pad`` and ``n_rb``, the two terms above.
``BLOCK_V``, ``BLOCK_D``, ``num_warps`` and ``num_stages`` move no DRAM bytes. They set L2
re-reads (pass 1 reads the ``R_pad x D`` rows once per vocabulary tile, ``V / BLOCK_V``
times; pass 2 reads the logits once per column block, ``D / BLOCK_D`` times), the registers
of each thread (its share of the accumulator plus its slices of the two dot operands, which
grow with the reduction tile: ``BLOCK_D`` in pass 1, ``BLOCK_V`` in pass 2) and the
occupancy. A config that needs more than the registers ptxas gives it spills to local
memory, and every ``tl.dot`` step then round-trips through L1/L2. The configs before these
(pass 1 ``BLOCK_V = 128, BLOCK_D = 64``, pass 2 ``64, 128``, 4 warps, bf16 head) spilled at
sm_90: pass 1 3.3 / 6 / 10.6-12.3 KB of stack per thread at BLOCK_R = 16 / 32 / 64 (ptxas
then reports 32 registers), pass 2 255 registers + 8-24 B / 2.6-2.7 KB at 32 / 64. The
chosen configs, with the most registers per thread over weight dtypes, bias and launch
specialisations (:func:`kernel_resources`), no stack (0 spills) in any, on Triton 3.6
(ptxas 12.8) / 3.9 (ptxas 13.4):

=======  ==========================  ======  ==========================  ======
BLOCK_R  pass 1 (V, D, warps, stg)   regs    pass 2 (V, D, warps, stg)   regs
=======  ==========================  ======  ==========================  ======
16       128, 16, 4, 3               168     64, 128, 4, 3               154/148
32       128, 16, 8, 3               164/166 32, 128, 4, 3               179/186
64       64, 16, 8, 2                128/150 32, 128, 8, 3               186/176
=======  ==========================  ======  ==========================  ======

Each keeps 16 accumulators per thread (pass 2 at BLOCK_R = 32 and 64: 32) and at most 76 KB
of shared memory per CTA. Constraints met on purpose: ``tl.dot`` needs K >= 16 on Triton
3.6 (3.9 also takes 8); ptxas picks its own register target and may spill a few bytes well
below 255 registers (3.6 at ``64, 64, 16, 8, 4`` in fp32: 80 registers + 16 B), so only the
compiled cubin decides: ``tests/test_triton_aot.py`` compiles every config the launcher can
choose for sm_90 and asserts zero spills. The kernels do not specialise on R (nor on pass
1's tile count): one compiled kernel per config whatever the batch, and one to check.
Not measured on a GPU yet.
"""
from __future__ import annotations

import contextlib
import os
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["KernelConfig", "head_loss_grad", "launch_configs", "possible_configs", "launch_ints", "aot_compile",
           "compile_ahead_of_time", "compiled_resources", "kernel_resources", "parallel_map"]

_MAX_BLOCK_R = 64  # all loss rows in one block up to 64 (B*K): each further block reads the head again
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelConfig(NamedTuple):
    """Tile sizes and launch options of one kernel launch (``BLOCK_*`` constexprs, ``num_*`` options)."""
    block_r: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


# BLOCK_R -> (pass-1 logits config, pass-2 grad config); registers in the module docstring.
# Pass 1 reduces over BLOCK_D, pass 2 over BLOCK_V (both >= 16: tl.dot's K on Triton 3.6).
_CONFIGS: dict[int, tuple[KernelConfig, KernelConfig]] = {
    16: (KernelConfig(16, 128, 16, 4, 3), KernelConfig(16, 64, 128, 4, 3)),
    32: (KernelConfig(32, 128, 16, 8, 3), KernelConfig(32, 32, 128, 4, 3)),
    64: (KernelConfig(64, 64, 16, 8, 2), KernelConfig(64, 32, 128, 8, 3)),
}


def launch_configs(rows: int) -> tuple[KernelConfig, KernelConfig]:
    """The (logits, grad) kernel configs :func:`head_loss_grad` launches for ``rows`` loss rows.

    ``BLOCK_R`` is the next power of two >= ``rows``, at least 16 (``tl.dot`` needs 16) and at
    most 64 (beyond that the rows go in several blocks of 64).
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    block_r = min(_MAX_BLOCK_R, max(16, triton.next_power_of_2(rows)))
    return _CONFIGS[block_r]


def possible_configs() -> list[tuple[KernelConfig, KernelConfig]]:
    """Every value :func:`launch_configs` can return (constant from ``rows = _MAX_BLOCK_R`` on)."""
    seen: list[tuple[KernelConfig, KernelConfig]] = []
    for rows in range(1, 2 * _MAX_BLOCK_R + 1):
        pair = launch_configs(rows)
        if pair not in seen:
            seen.append(pair)
    return seen


# R and n_tiles change with the batch: not specialising on them (Triton would make R == 1 a
# constant and mark multiples of 16) keeps one compiled kernel per config, and one to check.
@triton.jit(do_not_specialize=["R", "n_tiles"])
def _logits_kernel(x_ptr, w_ptr, b_ptr, z_ptr, tile_max_ptr, tile_arg_ptr, tile_sum_ptr,
                   R, V, D, stride_x, stride_w, stride_z, n_tiles,
                   HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_v = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    r_ok = offs_r < R
    v_ok = offs_v < V
    acc = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        x = tl.load(x_ptr + offs_r[:, None].to(tl.int64) * stride_x + offs_d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_v[:, None].to(tl.int64) * stride_w + offs_d[None, :],
                    mask=v_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(z_ptr + offs_r[:, None].to(tl.int64) * stride_z + offs_v[None, :], acc,
             mask=r_ok[:, None] & v_ok[None, :])
    z = tl.where(v_ok[None, :], acc, float("-inf"))
    tile_max = tl.max(z, axis=1)
    tile_arg = tl.argmax(z, axis=1, tie_break_left=True) + pid_v * BLOCK_V
    tile_sum = tl.sum(tl.exp(z - tile_max[:, None]), axis=1)
    stat = offs_r * n_tiles + pid_v
    tl.store(tile_max_ptr + stat, tile_max, mask=r_ok)
    tl.store(tile_arg_ptr + stat, tile_arg.to(tl.int64), mask=r_ok)
    tl.store(tile_sum_ptr + stat, tile_sum, mask=r_ok)


@triton.jit(do_not_specialize=["R"])
def _grad_kernel(z_ptr, lse_ptr, label_ptr, scale_ptr, w_ptr, out_ptr,
                 R, V, D, stride_z, stride_w, v_per_split,
                 BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = offs_r < R
    d_ok = offs_d < D
    lse = tl.load(lse_ptr + offs_r, mask=r_ok, other=0.0)
    label = tl.load(label_ptr + offs_r, mask=r_ok, other=-1)
    scale = tl.load(scale_ptr + offs_r, mask=r_ok, other=0.0)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    v_start = pid_s * v_per_split
    for v0 in range(v_start, v_start + v_per_split, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z = tl.load(z_ptr + offs_r[:, None].to(tl.int64) * stride_z + offs_v[None, :],
                    mask=r_ok[:, None] & v_ok[None, :], other=float("-inf"))
        onehot = tl.where(offs_v[None, :] == label[:, None], 1.0, 0.0)
        dz = (tl.exp(z - lse[:, None]) - onehot) * scale[:, None]
        dz = tl.where(r_ok[:, None] & v_ok[None, :], dz, 0.0)
        w = tl.load(w_ptr + offs_v[:, None].to(tl.int64) * stride_w + offs_d[None, :],
                    mask=v_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(dz, w, input_precision="ieee")
    out = out_ptr + pid_s.to(tl.int64) * R * D
    tl.store(out + offs_r[:, None] * D + offs_d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])


def _check(normed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_scale: torch.Tensor) -> None:
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for name, t in (("normed", normed), ("weight", weight), ("row_scale", row_scale), ("bias", bias)):
        if t is None:
            continue
        if t.device != normed.device:
            raise ValueError(f"{name} must be on {normed.device}, got {t.device}")
    if normed.device.type != "cuda" and not interpreting:
        raise ValueError(f"normed must be a CUDA tensor (or set TRITON_INTERPRET=1), got {normed.device}")
    if normed.dim() != 2 or normed.dtype != torch.float32:
        raise ValueError(f"normed must be (R, D) float32, got {tuple(normed.shape)} {normed.dtype}")
    if weight.dim() != 2 or weight.shape[1] != normed.shape[1]:
        raise ValueError(f"weight must be (V, D={normed.shape[1]}), got {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (V={weight.shape[0]},), got {tuple(bias.shape)}")
    if tuple(row_scale.shape) != (normed.shape[0],) or row_scale.dtype != torch.float32:
        raise ValueError(f"row_scale must be (R={normed.shape[0]},) float32, got "
                         f"{tuple(row_scale.shape)} {row_scale.dtype}")


def head_loss_grad(normed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   row_scale: torch.Tensor) -> torch.Tensor:
    """``d/d normed`` of ``sum_r row_scale_r * CE(Z_r, argmax Z_r)``, ``Z = normed W^T + b`` (fp32).

    Args:
        normed: (R, D) float32, the final-norm output of the loss rows; CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        weight: (V, D) float32/float16/bfloat16, the head; any row stride, unit column stride.
        bias: (V,) or ``None``.
        row_scale: (R,) float32, the loss weight of each row.

    Returns:
        (R, D) float32 on ``normed.device``. The kernels run on that device (and its current
        stream), whatever the current CUDA device is.
    """
    _check(normed, weight, bias, row_scale)
    normed = normed.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    rows, dim = normed.shape
    vocab = weight.shape[0]
    device = normed.device
    if rows == 0:
        return torch.zeros(0, dim, dtype=torch.float32, device=device)
    logits_cfg, grad_cfg = launch_configs(rows)
    n_row_blocks = triton.cdiv(rows, logits_cfg.block_r)
    # Triton launches on the current device: make it the tensors' one.
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        # Pass 1: logits tiles and per-tile (max, argmax, sum exp).
        n_tiles = triton.cdiv(vocab, logits_cfg.block_v)
        logits = torch.empty(rows, vocab, dtype=torch.float32, device=device)
        tile_max = torch.empty(rows, n_tiles, dtype=torch.float32, device=device)
        tile_arg = torch.empty(rows, n_tiles, dtype=torch.int64, device=device)
        tile_sum = torch.empty(rows, n_tiles, dtype=torch.float32, device=device)
        _logits_kernel[(n_tiles, n_row_blocks)](
            normed, weight, bias if bias is not None else normed, logits, tile_max, tile_arg, tile_sum,
            rows, vocab, dim, normed.stride(0), weight.stride(0), logits.stride(0), n_tiles,
            HAS_BIAS=bias is not None, BLOCK_R=logits_cfg.block_r, BLOCK_V=logits_cfg.block_v,
            BLOCK_D=logits_cfg.block_d, num_warps=logits_cfg.num_warps, num_stages=logits_cfg.num_stages)
        row_max, best_tile = tile_max.max(dim=1)  # first tile holding the max: lowest index on ties
        label = tile_arg.gather(1, best_tile.unsqueeze(1)).squeeze(1)
        lse = row_max + (tile_sum * torch.exp(tile_max - row_max.unsqueeze(1))).sum(dim=1).log()

        # Pass 2: dZ W, split over the vocabulary so that enough programs run; splits summed here.
        n_d_blocks = triton.cdiv(dim, grad_cfg.block_d)
        n_v_blocks = triton.cdiv(vocab, grad_cfg.block_v)
        splits = max(1, min(n_v_blocks, 256 // max(1, n_d_blocks * n_row_blocks)))
        v_per_split = triton.cdiv(n_v_blocks, splits) * grad_cfg.block_v
        splits = triton.cdiv(vocab, v_per_split)
        partial = torch.empty(splits, rows, dim, dtype=torch.float32, device=device)
        _grad_kernel[(n_d_blocks, splits, n_row_blocks)](
            logits, lse.contiguous(), label.contiguous(), row_scale.contiguous(), weight, partial,
            rows, vocab, dim, logits.stride(0), weight.stride(0), v_per_split,
            BLOCK_R=grad_cfg.block_r, BLOCK_V=grad_cfg.block_v, BLOCK_D=grad_cfg.block_d,
            num_warps=grad_cfg.num_warps, num_stages=grad_cfg.num_stages)
        return partial.sum(dim=0)


# --------------------------------------------------------------------------------------
# Ahead-of-time compilation: registers, spills and shared memory of every config
# --------------------------------------------------------------------------------------

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_ahead_of_time(fn, signature: dict[str, str], constexprs: dict, *, num_warps: int, num_stages: int,
                          ints: dict[str, int] | None = None, target=None):
    """``triton.compile`` of the ``@triton.jit`` function ``fn`` for ``target`` without a GPU.

    Args:
        fn: the jitted kernel.
        signature: Triton type of each runtime argument (``"*bf16"``, ``"i32"``, ...).
        constexprs: values of the ``tl.constexpr`` arguments.
        num_warps, num_stages: the launch options.
        ints: ``None`` compiles the unspecialised kernel. Otherwise the kernel a launch with
            these integer argument values gets (Triton 3.6 to 3.9): an int equal to 1 becomes a
            constant, a multiple of 16 is marked divisible by 16, and so is every pointer
            (PyTorch allocations are 16-byte aligned); ints not given, and those the kernel
            lists in ``do_not_specialize``, get no hint.
        target: a ``triton.backends.compiler.GPUTarget``; default sm_90 (H100/H200).

    Returns:
        Triton's ``CompiledKernel`` (``asm["cubin"]``, ``asm["ptx"]``, ``metadata.shared``).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    constexprs, signature, divisible = dict(constexprs), dict(signature), []
    if ints is not None:
        fixed = {param.name for param in fn.params if param.do_not_specialize}
        for name, value in ints.items():
            if name in fixed:
                continue
            if value == 1:
                constexprs[name] = 1
                del signature[name]
            elif value % 16 == 0:
                divisible.append(name)
        divisible += [name for name, kind in signature.items() if kind.startswith("*")]
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=target or GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compiled_resources(compiled) -> dict[str, int]:
    """Registers, local memory and shared memory of a compiled CUDA kernel (no GPU needed).

    Read from its cubin: the ``EIATTR_REGCOUNT`` and ``EIATTR_FRAME_SIZE`` records of the
    ``.nv.info`` section, what ``cuobjdump --dump-resource-usage`` prints as REG and STACK and
    ``ptxas -v`` as registers and stack frame. Returns ``regs`` (per thread), ``stack_bytes``
    (local memory per thread: spilled registers), ``spills`` (``stack_bytes // 4``, the figure
    Triton reports as ``n_spills`` once a kernel is loaded on a GPU) and ``shared`` (bytes of
    shared memory per CTA, ``metadata.shared``).
    """
    cubin = compiled.asm["cubin"]
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    found: dict[int, int] = {}
    for name, _type, _flags, _addr, offset, size in sections:
        if cubin[names_at + name:cubin.index(b"\0", names_at + name)] != b".nv.info":
            continue
        pos = offset
        while pos < offset + size:  # records: format byte, attribute byte, then a u16 or a sized payload
            fmt, attr = cubin[pos], cubin[pos + 1]
            if fmt != 0x04:  # no payload
                pos += 4
                continue
            length, = struct.unpack_from("<H", cubin, pos + 2)
            if attr in (0x2F, 0x11) and length == 8:  # REGCOUNT, FRAME_SIZE: (symbol index, value)
                found[attr] = max(found.get(attr, 0), struct.unpack_from("<I", cubin, pos + 8)[0])
            pos += 4 + length
    if 0x2F not in found or 0x11 not in found:
        raise RuntimeError("no register count / frame size record in the cubin's .nv.info section")
    return {"regs": found[0x2F], "stack_bytes": found[0x11], "spills": found[0x11] // 4,
            "shared": int(compiled.metadata.shared)}


def launch_ints(kernel: str, config: KernelConfig) -> list[dict[str, int] | None]:
    """Integer argument values standing for every specialisation a launch of ``kernel`` with
    ``config`` gets: unspecialised (``None``: pointers not 16-byte aligned, e.g. a sliced view),
    V and D not multiples of 16 (aligned pointers), and the real heads' case, all multiples
    of 16 (LLaVA 32000 x 4096, Qwen2.5-VL 152064 x 3584). R and the tile count are not
    specialised on (``do_not_specialize``); ``v_per_split`` is a multiple of ``BLOCK_V`` >= 16.
    """
    if kernel not in ("logits", "grad"):
        raise ValueError(f"kernel must be 'logits' or 'grad', got {kernel!r}")
    variants: list[dict[str, int] | None] = [None]
    for size in (4095, 4096):
        ints = dict(R=config.block_r, V=size, D=size, stride_w=size, stride_z=size)
        ints.update(dict(stride_x=size, n_tiles=250) if kernel == "logits" else dict(v_per_split=16 * config.block_v))
        variants.append(ints)
    return variants


def aot_compile(kernel: str, config: KernelConfig, weight_dtype: torch.dtype, *, has_bias: bool = True,
                ints: dict[str, int] | None = None, target=None):
    """Compile pass ``kernel`` of :func:`head_loss_grad` with ``config`` ahead of time (no GPU needed).

    Args:
        kernel: ``"logits"`` (pass 1) or ``"grad"`` (pass 2).
        config: one of the configs of :func:`possible_configs`.
        weight_dtype: the head's dtype, float32/float16/bfloat16.
        has_bias: the ``HAS_BIAS`` constexpr of pass 1.
        ints: integer argument values to specialise on (:func:`compile_ahead_of_time`), e.g.
            one of :func:`launch_ints`; ``None``: unspecialised.
        target: a ``triton.backends.compiler.GPUTarget``; default sm_90 (H100/H200).

    Returns:
        Triton's ``CompiledKernel``; :func:`compiled_resources` reads it.
    """
    if weight_dtype not in TRITON_TYPES:
        raise TypeError(f"weight_dtype must be float32, float16 or bfloat16, got {weight_dtype}")
    w = "*" + TRITON_TYPES[weight_dtype]
    constexprs = {"BLOCK_R": config.block_r, "BLOCK_V": config.block_v, "BLOCK_D": config.block_d}
    if kernel == "logits":
        fn = _logits_kernel
        signature = {"x_ptr": "*fp32", "w_ptr": w, "b_ptr": w, "z_ptr": "*fp32", "tile_max_ptr": "*fp32",
                     "tile_arg_ptr": "*i64", "tile_sum_ptr": "*fp32", "R": "i32", "V": "i32", "D": "i32",
                     "stride_x": "i32", "stride_w": "i32", "stride_z": "i32", "n_tiles": "i32"}
        constexprs["HAS_BIAS"] = has_bias
    elif kernel == "grad":
        fn = _grad_kernel
        signature = {"z_ptr": "*fp32", "lse_ptr": "*fp32", "label_ptr": "*i64", "scale_ptr": "*fp32",
                     "w_ptr": w, "out_ptr": "*fp32", "R": "i32", "V": "i32", "D": "i32", "stride_z": "i32",
                     "stride_w": "i32", "v_per_split": "i32"}
    else:
        raise ValueError(f"kernel must be 'logits' or 'grad', got {kernel!r}")
    return compile_ahead_of_time(fn, signature, constexprs, num_warps=config.num_warps,
                                 num_stages=config.num_stages, ints=ints, target=target)


def kernel_resources(target=None, weight_dtypes: tuple[torch.dtype, ...] = WEIGHT_DTYPES,
                     specialized_only: bool = False, workers: int | None = None) -> list[dict]:
    """:func:`compiled_resources` of every kernel config :func:`launch_configs` can choose.

    Compiles ahead of time for ``target`` (default sm_90; no GPU needed; about a second per
    kernel on ``workers`` threads, cached by Triton), for each weight dtype, bias or not, and
    each launch specialisation of :func:`launch_ints` (``specialized_only``: only the real
    heads' one, all sizes multiples of 16). One dict per kernel:
    ``kernel`` (``"logits"``/``"grad"``), the :class:`KernelConfig` fields, ``weight_dtype``,
    ``has_bias``, ``ints`` (the launch values, ``None``: unspecialised), ``regs``,
    ``stack_bytes``, ``spills`` and ``shared``. For a short benchmark report:
    ``kernel_resources(weight_dtypes=(torch.bfloat16,), specialized_only=True)``.
    """
    jobs = [(kernel, cfg, dtype, has_bias, ints)
            for pair in possible_configs() for dtype in weight_dtypes
            for kernel, cfg, has_bias in (("logits", pair[0], False), ("logits", pair[0], True),
                                          ("grad", pair[1], None))
            for ints in launch_ints(kernel, cfg)[-1 if specialized_only else 0:]]

    def measure(job) -> dict:
        kernel, cfg, dtype, has_bias, ints = job
        compiled = aot_compile(kernel, cfg, dtype, has_bias=bool(has_bias), ints=ints, target=target)
        return dict(kernel=kernel, **cfg._asdict(), weight_dtype=str(dtype).removeprefix("torch."),
                    has_bias=has_bias, ints=ints, **compiled_resources(compiled))

    return parallel_map(measure, jobs, workers)


def parallel_map(fn, items: list, workers: int | None = None) -> list:
    """``[fn(x) for x in items]`` on up to ``workers`` threads (default: one per CPU, at most 8);
    Triton's compiler spends most of its time outside the GIL (MLIR passes, ptxas)."""
    workers = workers or min(8, os.cpu_count() or 1)
    if workers == 1 or len(items) < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))
