"""The attention mask each decoder layer takes, for the rows a cut keeps (SPEC section 5).

Layers after a stage hold fewer rows in their KV cache than the model's own mask describes,
so the engine builds their masks itself, in the format the attention implementation takes
(:func:`pio_kernels.integrations.hf.mask_kind`): what the stock model would build for the same
rows. A static cache attends over all ``max_cache_len`` columns; columns past the rows really
stored are masked.
"""
from __future__ import annotations

import torch

__all__ = ["build_attention_mask", "all_valid"]


def all_valid(valid: torch.Tensor) -> bool:
    """Whether every entry of ``valid`` is true, read on the host, so that no mask need be built.

    While ``torch.compile`` traces, answers ``False`` without reading: a mask is then always
    built (the same attention, with no data-dependent branch to break the graph on).
    """
    if torch.compiler.is_compiling():
        return False
    return bool(valid.all())


def build_attention_mask(kind: str, kv_valid: torch.Tensor, q: int, dtype: torch.dtype,
                         total: int | None = None):
    """The mask a decoder layer takes, for ``q`` new rows after a cache of ``kv - q`` rows.

    Args:
        kind: ``"additive"`` (eager), ``"bool"`` (sdpa) or ``"2d"`` (flash attention).
        kv_valid: (B, kv) bool, which cached + new rows are real tokens.
        q: new rows (the last ``q`` of the kv rows).
        dtype: dtype of an additive mask.
        total: key columns the layer attends over when it differs from ``kv`` (a static
            cache: ``max_cache_len``); columns from ``kv`` on are masked.

    Returns:
        ``None`` where no mask is needed (as the stock model), (B, kv) bool for flash attention,
        (B, 1, q, kv) bool for sdpa, additive (B, 1, q, kv) for eager (``kv`` = ``total`` when given).
    """
    batch, kv = kv_valid.shape
    device = kv_valid.device
    if total is not None and total > kv:
        kv_valid = torch.cat([kv_valid, kv_valid.new_zeros(batch, total - kv)], dim=1)
    elif total is None and kind != "additive" and all_valid(kv_valid):
        if kind == "2d" or q == kv or q == 1:
            return None
    if kind == "2d":
        return kv_valid
    past = kv - q
    width = kv_valid.shape[1]
    causal = torch.arange(width, device=device)[None, :] <= (past + torch.arange(q, device=device))[:, None]
    allowed = causal[None, None] & kv_valid[:, None, None, :]
    if kind == "bool":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
