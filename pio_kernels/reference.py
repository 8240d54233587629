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
                   device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that carry the proxy loss (SPEC 2.3): ``(rows, valid)``, each (B, K).

    A sample with ``n`` valid tokens has ``min(K, n - 1)`` loss rows: the valid positions
    immediately before its last valid token. A sample with ``n <= 1`` has none. Padding may
    sit on either side (or anywhere).

    Layout: slot ``k`` of a sample holds the valid position ``K - k`` places before its last
    valid token, so the loss rows are right-aligned and ascending, and a short sample's
    missing slots come first. ``valid`` (bool) marks the slots that hold a loss row; every
    other slot holds ``seq_len - 1``, a row that is never a loss row (a loss row has a valid
    token after it), so it is harmless to gather and distinct from the real rows.

    Args:
        attention_mask: (B, S), nonzero for real tokens, any device; ``None``: all real.
        batch, seq_len: B and S (used when ``attention_mask`` is ``None``).
        num_positions: K >= 1.
        device: where to build the result when ``attention_mask`` is ``None``.

    Returns:
        ``rows`` (B, K) int64 and ``valid`` (B, K) bool, on the mask's device (or ``device``).
        Built with tensor ops only: no host synchronisation, whatever the mask holds.

    Raises:
        ValueError: when ``num_positions`` is not an int >= 1 (an argument check).
    """
    if isinstance(num_positions, bool) or not isinstance(num_positions, int) or num_positions < 1:
        raise ValueError(f"num_positions must be an int >= 1, got {num_positions!r}")
    if attention_mask is not None:
        device = attention_mask.device
    rank = torch.arange(num_positions, 0, -1, device=device)  # slot k -> K - k places before the last
    if attention_mask is None:
        valid = (rank <= seq_len - 1).expand(batch, num_positions)
        rows = torch.where(valid, seq_len - 1 - rank, seq_len - 1)
        return rows.clone(), valid.clone()
    real = attention_mask != 0
    cumulative = real.long().cumsum(dim=1)  # (B, S): real tokens up to and including each position
    counts = cumulative[:, -1:]  # (B, 1)
    valid = rank[None] <= counts - 1  # (B, K)
    # The loss row of slot k is the (n - rank)-th real token: the first position whose
    # running count reaches n - rank.
    target = (counts - rank[None]).clamp_min(1)
    rows = torch.searchsorted(cumulative, target).clamp_max(seq_len - 1)
    rows = torch.where(valid, rows, seq_len - 1)
    return rows, valid


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
def _sdpa_attention(layer: nn.Module) -> Iterator[None]:
    """Runs ``layer``'s attention through SDPA, with any SDPA backend allowed.

    - SDPA takes the 4-D mask built here (flash attention would not), and it returns no
      attention weights, so a surrounding ``output_attentions`` capture records nothing
      from this extra call (an eager layer would hand its weights to that capture).
    - The backend guard lets SDPA pick any kernel even where the caller forced one (e.g.
      flash, which refuses a mask) around us.

    The switch is the layer config's attention implementation, set for the duration of the
    call and restored after it (another thread running the same model meanwhile would see it),
    through the module that owns every transformers convention.
    """
    from pio_kernels.integrations import hf  # imported here: the integrations import this module

    config = getattr(getattr(layer, "self_attn", None), "config", None)
    with hf.attention_implementation_as(config, "sdpa"), torch.nn.attention.sdpa_kernel(_ALL_SDPA_BACKENDS):
        yield


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
        num_positions: K >= 1, the most loss rows per sample.

    Returns:
        (B, S) float32: ``|| d l_b / d H_{b,i} ||_2``. ``l_b`` is the mean, over sample
        ``b``'s own loss rows (:func:`loss_positions`: ``min(K, n_b - 1)`` of them for
        ``n_b`` real tokens), of the cross-entropy against the argmax pseudo-label. Padding
        scores 0; a sample with at most one real token has no loss row and scores 0 everywhere.

    How the layer is run, and why: the layer is called through ``layer.forward``, not
    ``layer(...)``, so that no forward hook of the layer fires. Transformers records
    ``output_hidden_states`` through hooks on the decoder layers, and a pio hook on this
    layer would otherwise see its own probe. Its attention runs through SDPA (see
    :func:`_sdpa_attention`), which returns no attention weights, so an ``output_attentions``
    capture around us records nothing either. Nothing here touches transformers' output
    collector: a surrounding model's ``output_hidden_states`` / ``output_attentions`` come
    out as without the probe, under ``torch.compile`` too. (Hooks of the layer's
    submodules still fire; e.g. a MoE router's ``output_router_logits`` capture records
    this call's router logits.)

    Works under ``torch.no_grad()`` and ``torch.inference_mode()``; no parameter gradient
    is accumulated. Host synchronisation: none of its own (the loss rows are built on the
    device); the layer's own code may have some.
    """
    batch, seq_len, _ = hidden_states.shape
    # Everything autograd saves is made inside inference_mode(False): an inference tensor
    # (the caller's inputs, or anything built from them under inference_mode) cannot be.
    with torch.inference_mode(False), torch.enable_grad(), _sdpa_attention(layer):
        mask_2d = None if attention_mask is None else attention_mask.clone()
        rows, valid = loss_positions(mask_2d, batch, seq_len, num_positions, device=hidden_states.device)
        h = hidden_states.detach().clone().requires_grad_(True)
        cos, sin = (t.detach().clone() for t in position_embeddings)
        mask = _causal_padding_mask(mask_2d, batch, seq_len, h.dtype, h.device)
        y = layer.forward(h, attention_mask=mask, position_embeddings=(cos, sin))
        if isinstance(y, tuple):  # older transformers return (hidden_states, ...)
            y = y[0]
        normed = final_norm(y).float()
        bias = None if lm_head.bias is None else lm_head.bias.float()
        logits = F.linear(normed, lm_head.weight.float(), bias)  # (B, S, V), fp32
        z = logits.gather(1, rows[..., None].expand(-1, -1, logits.shape[-1]))  # (B, K, V)
        pseudo = z.detach().argmax(dim=-1)
        ce = F.cross_entropy(z.transpose(1, 2), pseudo, reduction="none")  # (B, K)
        # Each sample's mean over its own loss rows; a slot without a loss row weighs 0.
        row_weight = valid.float() / valid.sum(dim=1, keepdim=True).clamp_min(1)
        (grad,) = torch.autograd.grad((ce * row_weight).sum(), h)
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
