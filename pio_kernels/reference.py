"""The literal algorithm of SPEC sections 2 and 3: the oracle every fast path is tested against.

Nothing here is fast on purpose. :func:`proxy_saliency` runs the whole decoder layer on
every position, builds full-vocabulary logits and differentiates with autograd;
:func:`select_tokens` builds the full N x N cosine matrix and walks it in a Python loop.
Keep it short and obviously right: when a fast path and this module disagree, this
module is the definition.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["loss_positions", "proxy_saliency", "saliency_order", "select_tokens"]


def loss_positions(attention_mask: torch.Tensor | None, batch: int, seq_len: int, num_positions: int,
                   device: torch.device | None = None) -> torch.Tensor:
    """Rows that carry the proxy loss (SPEC 2.3), as a LongTensor (B, K).

    For every sample, the ``num_positions`` valid positions immediately before its last
    valid token, ascending. Padding may sit on either side (or anywhere).

    Raises:
        ValueError: when a sample has fewer than ``num_positions + 1`` valid tokens.
    """
    if num_positions < 1:
        raise ValueError(f"num_positions must be >= 1, got {num_positions}")
    if attention_mask is None:
        if seq_len < num_positions + 1:
            raise ValueError(f"num_positions={num_positions} needs at least {num_positions + 1} tokens, "
                             f"got a sequence of {seq_len}")
        row = torch.arange(seq_len - 1 - num_positions, seq_len - 1, device=device)
        return row.expand(batch, num_positions).clone()
    valid = attention_mask.bool()
    counts = valid.sum(dim=1)
    if bool((counts < num_positions + 1).any()):
        short = int(counts.argmin())
        raise ValueError(f"num_positions={num_positions} needs at least {num_positions + 1} valid tokens "
                         f"per sample; sample {short} has {int(counts[short])}")
    # Rank of each valid position from the end (last valid token -> 0), -1 for padding.
    rank_from_end = counts[:, None] - valid.long().cumsum(dim=1)
    rank_from_end = torch.where(valid, rank_from_end, torch.full_like(rank_from_end, -1))
    wanted = (rank_from_end >= 1) & (rank_from_end <= num_positions)
    return wanted.nonzero()[:, 1].view(attention_mask.shape[0], num_positions)


def _causal_padding_mask(attention_mask: torch.Tensor | None, batch: int, seq_len: int,
                         dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (B, 1, S, S) mask: causal, padding keys hidden, and every row sees itself.

    The diagonal keeps padding queries off an all-masked row, whose softmax would be NaN
    and would leak NaN into the key gradient of the real tokens.
    """
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    allowed = allowed.expand(batch, seq_len, seq_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(seq_len, dtype=torch.bool, device=device)
    mask = torch.zeros(batch, 1, seq_len, seq_len, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


_ALL_SDPA_BACKENDS = [torch.nn.attention.SDPBackend.FLASH_ATTENTION, torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
                      torch.nn.attention.SDPBackend.CUDNN_ATTENTION, torch.nn.attention.SDPBackend.MATH]


@contextlib.contextmanager
def _mask_friendly_attention(layer: nn.Module) -> Iterator[None]:
    """Runs a layer whose config asks for flash attention through SDPA, which takes a 4-D mask,
    and lets SDPA pick any backend, even where the caller forced one (e.g. flash) around us."""
    config = getattr(getattr(layer, "self_attn", None), "config", None)
    impl = getattr(config, "_attn_implementation", None)
    switch = config is not None and impl not in (None, "eager", "sdpa")
    if switch:
        config._attn_implementation = "sdpa"
    try:
        with torch.nn.attention.sdpa_kernel(_ALL_SDPA_BACKENDS):
            yield
    finally:
        if switch:
            config._attn_implementation = impl


@contextlib.contextmanager
def _outputs_not_recorded() -> Iterator[None]:
    """Keeps this extra call of the layer out of a surrounding model's ``output_hidden_states`` /
    ``output_attentions`` (transformers records layer outputs through a context variable)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # other transformers versions, or no transformers: nothing records
        yield
        return
    token = _active_collector.set(None)
    try:
        yield
    finally:
        _active_collector.reset(token)


def proxy_saliency(layer: nn.Module, final_norm: nn.Module, lm_head: nn.Linear, hidden_states: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor], *,
                   attention_mask: torch.Tensor | None = None, num_positions: int = 4) -> torch.Tensor:
    """Gradient saliency of every token from the layer-local proxy loss (SPEC section 2).

    Args:
        layer: the Hugging Face decoder layer that will consume the reduced sequence.
        final_norm: the model's final norm.
        lm_head: the model's output head.
        hidden_states: (B, S, D), the input of ``layer``.
        position_embeddings: the ``(cos, sin)`` pair the model hands its layers.
        attention_mask: (B, S), 1 for real tokens; padding on either side. ``None``: all real.
        num_positions: K, loss rows per sample.

    Returns:
        (B, S) float32: ``|| d l_b / d H_{b,i} ||_2``, with ``l_b`` the mean over the K loss
        rows of the cross-entropy against the argmax pseudo-label. Padding scores 0.

    Works under ``torch.no_grad()`` and ``torch.inference_mode()``; no parameter gradient
    is accumulated.
    """
    batch, seq_len, _ = hidden_states.shape
    # Everything autograd saves is made inside inference_mode(False): an inference tensor
    # (the caller's inputs, or anything built from them under inference_mode) cannot be.
    with torch.inference_mode(False), torch.enable_grad(), _mask_friendly_attention(layer), \
            _outputs_not_recorded():
        mask_2d = None if attention_mask is None else attention_mask.clone()
        rows = loss_positions(mask_2d, batch, seq_len, num_positions, device=hidden_states.device)
        h = hidden_states.detach().clone().requires_grad_(True)
        cos, sin = (t.detach().clone() for t in position_embeddings)
        mask = _causal_padding_mask(mask_2d, batch, seq_len, h.dtype, h.device)
        y = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
        if isinstance(y, tuple):  # older transformers return (hidden_states, ...)
            y = y[0]
        normed = final_norm(y).float()
        bias = None if lm_head.bias is None else lm_head.bias.float()
        logits = F.linear(normed, lm_head.weight.float(), bias)  # (B, S, V), fp32
        z = logits.gather(1, rows[..., None].expand(-1, -1, logits.shape[-1]))  # (B, K, V)
        pseudo = z.detach().argmax(dim=-1)
        per_sample = F.cross_entropy(z.transpose(1, 2), pseudo, reduction="none").mean(dim=1)
        (grad,) = torch.autograd.grad(per_sample.sum(), h)
    scores = grad.float().norm(dim=-1)
    if attention_mask is not None:
        scores = scores * attention_mask.to(scores.dtype)
    return scores


def saliency_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices of a 1-D score vector by descending score, ties to the lower index, NaN last."""
    nan = scores.isnan()
    finite_first = torch.where(nan, torch.full_like(scores, float("-inf")), scores)
    order = torch.sort(finite_first, descending=True, stable=True).indices
    return order[torch.sort(nan[order].to(torch.uint8), stable=True).indices]


def _select_row(features: torch.Tensor, scores: torch.Tensor, budget: int, tau: float) -> list[int]:
    n = features.shape[0]
    if n <= budget:
        return list(range(n))
    x = F.normalize(features.float(), dim=-1, eps=1e-12)
    neighbour = (x @ x.T >= tau).cpu().numpy()
    order = saliency_order(scores).tolist()
    picked: list[int] = []
    suppressed = [False] * n
    for i in order:  # strict pass
        if len(picked) == budget:
            break
        if suppressed[i]:
            continue
        picked.append(i)
        for j in range(n):
            if neighbour[i, j]:
                suppressed[j] = True
    chosen = set(picked)
    for i in order:  # fill pass
        if len(picked) == budget:
            break
        if i not in chosen:
            picked.append(i)
            chosen.add(i)
    return sorted(picked)


def select_tokens(features: torch.Tensor, scores: torch.Tensor, budget: int, tau: float = 0.8,
                  lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy cosine NMS with a fixed budget, per batch row (SPEC section 3).

    Args:
        features: (B, N, D) floating.
        scores: (B, N) floating.
        budget: tokens kept per row, >= 1.
        tau: cosine threshold; ``j`` is a neighbour of ``i`` when ``cos >= tau``.
        lengths: (B,) int64, valid tokens per row (default N).

    Returns:
        (B, budget) int64 on ``features.device``: kept positions ascending, -1 padded where
        a row has no more than ``budget`` valid tokens (then all of them are kept).
    """
    batch, n, _ = features.shape
    out = torch.full((batch, budget), -1, dtype=torch.long)
    for b in range(batch):
        valid = n if lengths is None else int(lengths[b])
        kept = _select_row(features[b, :valid], scores[b, :valid], budget, tau)
        out[b, :len(kept)] = torch.tensor(kept, dtype=torch.long)
    return out.to(features.device)
