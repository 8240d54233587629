"""Qwen2-VL on stock transformers: Qwen2.5-VL's adapter, on a vision tower without window attention.

``Qwen2VLForConditionalGeneration`` places its visual tokens, forms its M-RoPE positions and
decodes exactly as Qwen2.5-VL, so everything but the encoder side is
:class:`~.qwen2_5_vl.Qwen2_5_VLAdapter`'s: image pad tokens and per-frame video spans, kept
tokens keep their 3-D positions (gathered, SPEC 5).

Encoder side (SPEC 4): every block of the tower attends over a whole frame, and its tokens run
in output order (no window permutation). The rule is Qwen2.5-VL's, on full attention: column
means of the attention over the frame (the attention each token receives, averaged over heads
and the frame's queries; computed in query chunks, never the N x N map) at two blocks, then
window-local plus global selection per image frame on the merged grid, then merging. The two
blocks (:func:`quarter_depth_blocks`): the block at a quarter of the depth, where Qwen2.5-VL's
first full-attention block sits (block 7 of 32), for the local half, and the last block for the
global half.
"""
from __future__ import annotations

from torch import nn

from ..engine.adapter import register_adapter
from .qwen2_5_vl import Qwen2_5_VLAdapter

__all__ = ["Qwen2VLAdapter", "quarter_depth_blocks"]


def quarter_depth_blocks(visual: nn.Module) -> tuple[int, int]:
    """(local, global) blocks of a tower without window attention: block ``depth // 4 - 1`` (7 of
    Qwen2-VL's 32, the depth of Qwen2.5-VL's first full-attention block) and the last block."""
    depth = len(visual.blocks)
    return max(0, depth // 4 - 1), depth - 1


class Qwen2VLAdapter(Qwen2_5_VLAdapter):
    """``Qwen2VLForConditionalGeneration``: Qwen2.5-VL's answers, full-attention encoder side."""

    name = "qwen2_vl"

    def model_classes(self) -> tuple[type, ...]:
        from transformers import Qwen2VLForConditionalGeneration
        return (Qwen2VLForConditionalGeneration,)

    def score_blocks(self, visual: nn.Module) -> tuple[int, int]:
        return quarter_depth_blocks(visual)

    def tower_order(self, visual: nn.Module, grid) -> None:
        return None  # no window attention: the blocks run in output order


register_adapter(Qwen2VLAdapter())
