"""Proxy saliency (SPEC section 2) behind the public API.

For now this is backed by :func:`pio_kernels.reference.proxy_saliency`; the exact
reduced probe replaces the body without changing the signature.
"""
from __future__ import annotations

import torch
from torch import nn

from pio_kernels import reference

__all__ = ["proxy_saliency"]


def proxy_saliency(layer: nn.Module, final_norm: nn.Module, lm_head: nn.Linear, hidden_states: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor], *,
                   attention_mask: torch.Tensor | None = None, num_positions: int = 4) -> torch.Tensor:
    """Gradient saliency (B, S) float32 of every token entering ``layer`` (SPEC section 2).

    See :func:`pio_kernels.reference.proxy_saliency` for the arguments and semantics.
    """
    return reference.proxy_saliency(layer, final_norm, lm_head, hidden_states, position_embeddings,
                                    attention_mask=attention_mask, num_positions=num_positions)
