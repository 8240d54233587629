"""Python face of ``torch.ops.pio.*``: typed wrappers, argument checks, fake kernels, fallbacks.

The schemas are defined in C++ (``csrc/pio.cpp``) and the compiled kernels register
themselves per device when ``pio_kernels._C`` loads. When the extension was not built
(no compiler at install time), the same schema is defined here and the op runs on the
PyTorch paths, so ``torch.ops.pio.select_tokens`` always exists. ``PIO_NO_EXTENSION=1``
at import time takes that path on purpose (tests of builds without a compiler).

Dispatch order of ``select_tokens`` per device (``backend=None``):

- CPU: the compiled C++ kernel, else the PyTorch path (``pio_kernels/nms.py``).
- CUDA: the compiled CUDA kernel (``csrc/cuda/select_tokens.cu``); where the extension was
  not built, the Triton path (``pio_kernels/triton/select_tokens.py``, the same block scheme
  and decisions: a prefix of the saliency order, then bounded blocks), else PyTorch (full
  N x N similarity and N sequential steps: a last resort).

``select_tokens(..., backend=...)`` forces one path (tests, benchmarks);
``available_backends(device)`` lists the paths that can run on a device, in that order.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

from pio_kernels import nms

__all__ = ["BACKENDS", "HAS_EXTENSION", "available_backends", "select_tokens"]

# Must match csrc/pio.cpp; used only when the compiled extension is absent.
_SELECT_TOKENS_SCHEMA = ("select_tokens(Tensor features, Tensor scores, int budget, float tau=0.8, "
                         "Tensor? lengths=None) -> Tensor")

try:
    if os.environ.get("PIO_NO_EXTENSION", "0") not in ("", "0"):
        raise ImportError("PIO_NO_EXTENSION is set")
    importlib.import_module("pio_kernels._C")  # loading it registers the schemas and kernels
    HAS_EXTENSION = True
except ImportError as exc:  # built without a compiler, or PIO_NO_EXTENSION=1
    HAS_EXTENSION = False
    warnings.warn(f"pio_kernels._C is not available ({exc}); using the PyTorch paths", RuntimeWarning,
                  stacklevel=2)
    _LIB = torch.library.Library("pio", "DEF")
    _LIB.define(_SELECT_TOKENS_SCHEMA)


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pio::{op}", key)


# Paths of select_tokens that can be forced; None lets the dispatcher choose.
BACKENDS = ("cpp", "cuda", "triton", "torch")
# Compiled kernels, recorded before the Python fallbacks below fill the missing keys.
_COMPILED = {key: _has_kernel("select_tokens", key) for key in ("CPU", "CUDA")}
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_runs_on(device: torch.device) -> bool:
    """Triton runs on CUDA, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before import."""
    if not _HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def available_backends(device: torch.device | str) -> list[str]:
    """The ``select_tokens`` backends that can run on ``device``, in dispatch order."""
    device = torch.device(device)
    paths = []
    if device.type == "cpu" and _COMPILED["CPU"]:
        paths.append("cpp")
    if device.type == "cuda" and _COMPILED["CUDA"]:
        paths.append("cuda")
    if _triton_runs_on(device):
        paths.append("triton")
    paths.append("torch")
    return paths


def _check_select_tokens_args(features: torch.Tensor, scores: torch.Tensor, budget: int, tau: float,
                              lengths: torch.Tensor | None) -> None:
    """Shape, dtype and device checks; nothing here reads tensor values (no host sync)."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a Tensor, got {type(features).__name__}")
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a Tensor, got {type(scores).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    if features.dim() != 3:
        raise ValueError(f"features must be (B, N, D), got shape {tuple(features.shape)}")
    batch, n, _ = features.shape
    if tuple(scores.shape) != (batch, n):
        raise ValueError(f"scores must be (B, N) = {(batch, n)} to match features, got {tuple(scores.shape)}")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int, got {type(budget).__name__}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a real number, got {type(tau).__name__}")
    if tau != tau:
        raise ValueError("tau must not be NaN")
    if scores.device != features.device:
        raise ValueError(f"scores must be on the device of features ({features.device}), got {scores.device}")
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor):
            raise TypeError(f"lengths must be a Tensor or None, got {type(lengths).__name__}")
        if lengths.dtype != torch.int64:
            raise TypeError(f"lengths must be int64, got {lengths.dtype}")
        if tuple(lengths.shape) != (batch,):
            raise ValueError(f"lengths must be (B,) = ({batch},), got {tuple(lengths.shape)}")
        if lengths.device != features.device:
            raise ValueError(f"lengths must be on the device of features ({features.device}), "
                             f"got {lengths.device}")


def _check_lengths_values(lengths: torch.Tensor | None, n: int) -> None:
    """Value check for kernels that may read ``lengths`` on the host."""
    if lengths is None:
        return
    bad = (lengths < 0) | (lengths > n)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"lengths must lie in [0, {n}], got {int(lengths[row])} at row {row}")


def select_tokens(features: torch.Tensor, scores: torch.Tensor, budget: int, tau: float = 0.8,
                  lengths: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Keeps ``budget`` tokens per row: greedy cosine NMS in saliency order (SPEC section 3).

    Args:
        features: (B, N, D) or (N, D), fp32/fp16/bf16, any strides. Cosine similarity is
            taken on L2-normalised rows in fp32.
        scores: (B, N) or (N,), floating, same device. Higher is kept first; ties go to the
            lower index; NaN ranks last.
        budget: tokens kept per row, >= 1.
        tau: a token is suppressed by a kept token whose cosine with it is >= ``tau``.
            ``tau > 1`` gives plain top-k.
        lengths: (B,) int64, valid tokens per row (ragged batches); default N. Values out of
            [0, N] raise ValueError on CPU; on a GPU every path clamps them instead,
            since checking would sync.
        backend: None (default) lets the dispatcher choose: the compiled kernel of the
            device, else on CUDA the Triton path, else PyTorch (see the module docstring).
            ``"cpp"`` (compiled CPU kernel), ``"cuda"`` (compiled CUDA kernel), ``"triton"``
            (CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"torch"`` (tensor ops on the
            device, no host sync, ``pio_kernels/nms.py``) force a path; see
            ``available_backends(device)``.

    Returns:
        (B, budget) int64 (or (budget,) for 2-D input): kept positions in ascending order;
        a row with no more than ``budget`` valid tokens keeps them all and is padded with -1.

    Raises:
        TypeError / ValueError naming the offending argument (also an unknown or
        unavailable ``backend``).
    """
    unbatched = isinstance(features, torch.Tensor) and features.dim() == 2
    if unbatched:
        if isinstance(scores, torch.Tensor) and scores.dim() != 1:
            raise ValueError(f"scores must be (N,) for 2-D features, got shape {tuple(scores.shape)}")
        if lengths is not None:
            raise ValueError("lengths is only meaningful for batched (B, N, D) features")
        features, scores = features[None], scores[None]
    _check_select_tokens_args(features, scores, budget, tau, lengths)
    if backend is None:
        out = torch.ops.pio.select_tokens(features, scores, budget, float(tau), lengths)
    else:
        out = _run_backend(backend, features, scores, budget, float(tau), lengths)
    return out[0] if unbatched else out


def _run_backend(backend, features, scores, budget, tau, lengths):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    device = features.device
    if backend not in available_backends(device):
        raise ValueError(f"backend {backend!r} is not available for {device.type} tensors here "
                         f"(available: {available_backends(device)})")
    if backend in ("cpp", "cuda"):  # the compiled kernel of this device, through the dispatcher
        return torch.ops.pio.select_tokens(features, scores, budget, tau, lengths)
    if backend == "triton":
        return _select_tokens_triton(features, scores, budget, tau, lengths)
    return _select_tokens_torch(features, scores, budget, tau, lengths)


@torch.library.register_fake("pio::select_tokens")
def _select_tokens_fake(features, scores, budget, tau=0.8, lengths=None):
    torch._check(features.dim() == 3, lambda: f"features must be (B, N, D), got {features.dim()} dims")
    torch._check(scores.dim() == 2, lambda: f"scores must be (B, N), got {scores.dim()} dims")
    torch._check(budget >= 1, lambda: f"budget must be >= 1, got {budget}")
    return features.new_empty((features.shape[0], budget), dtype=torch.long)


def _select_tokens_torch(features, scores, budget, tau=0.8, lengths=None):
    """PyTorch path (pio_kernels/nms.py), on the tensors' device; lengths checked on CPU, clamped elsewhere."""
    _check_select_tokens_args(features, scores, budget, tau, lengths)
    if features.device.type == "cpu":
        _check_lengths_values(lengths, features.shape[1])
    return nms.select_tokens(features, scores, budget, tau, lengths)


def _select_tokens_triton(features, scores, budget, tau=0.8, lengths=None):
    """Triton path (pio_kernels/triton/select_tokens.py); lengths are checked on CPU, clamped on CUDA."""
    from pio_kernels.triton import select_tokens as triton_select_tokens

    _check_select_tokens_args(features, scores, budget, tau, lengths)
    if features.device.type == "cpu":
        _check_lengths_values(lengths, features.shape[1])
    return triton_select_tokens.select_tokens(features, scores, budget, tau, lengths)


def _select_tokens_cuda_fallback(features, scores, budget, tau=0.8, lengths=None):
    """CUDA without the compiled kernel: Triton when importable, else the PyTorch path."""
    if _HAS_TRITON:
        return _select_tokens_triton(features, scores, budget, tau, lengths)
    return _select_tokens_torch(features, scores, budget, tau, lengths)


if not _COMPILED["CPU"]:
    torch.library.impl("pio::select_tokens", "CPU")(_select_tokens_torch)
if not _COMPILED["CUDA"]:
    torch.library.impl("pio::select_tokens", "CUDA")(_select_tokens_cuda_fallback)
