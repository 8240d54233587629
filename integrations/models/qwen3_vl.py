"""Qwen3-VL (dense and MoE) on stock transformers: Qwen2-VL's adapter plus DeepStack.

``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration`` place visual
tokens and form positions as Qwen2.5-VL does (:class:`~.qwen2_5_vl.Qwen2_5_VLAdapter`):
image pad tokens, one span per video frame (Qwen3-VL puts a timestamp before every frame, so
each frame is its own run of video pad tokens), interleaved M-RoPE ids gathered at every cut
(SPEC 5, never renumbered), decode positions from the model's ``rope_deltas``. What differs:

* **Video features** are computed through ``get_image_features``; those calls are told apart
  (:func:`~..hf.is_video_run`) and never count as images. Videos pass the encoder side whole, as
  for Qwen2.5-VL; language-model stages select in every frame.
* **Encoder side** (SPEC 4): the tower has no window attention, so the rule is Qwen2-VL's
  (:class:`~.qwen2_vl.Qwen2VLAdapter`): column means of full attention over the frame at the
  block at a quarter of the depth (block 5 of the 27 of Qwen3-VL-8B) and at the last block,
  window-local plus global selection per image frame on the merged grid, then merging.
* **DeepStack.** The text model adds ``deepstack_visual_embeds[i]`` (features of vision block
  ``deepstack_visual_indexes[i]``) to the visual rows after each of its first decoder layers.
  Under pio those layers may see fewer rows, so :class:`DeepStack` takes the features out of
  the language model's call and adds level ``i`` itself, just before the module that reads
  layer ``i``'s output (layer ``i + 1``, before any stage there scores it), to the visual rows
  of :meth:`~..engine.state.PioState.current_cut` that are still present, with the stock
  arithmetic (bit for bit where nothing is dropped). After an encoder-side cut, the kept rows
  get the mean of the DeepStack rows of the tokens merged into them, with the assignment the
  main features decided (``merge_dropped(..., values=)``): every level follows its token. The
  proxy loss of a stage is the layer-local one of SPEC 2 (its loss rows are text, where
  DeepStack adds nothing).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import hf
from ..engine.adapter import register_adapter
from ..engine.encoder import merge_dropped
from .qwen2_vl import Qwen2VLAdapter

__all__ = ["DeepStack", "Qwen3VLAdapter"]


class DeepStack:
    """Qwen3-VL's DeepStack on the rows each decoder layer keeps; one per model under pio.

    ``take`` (a pre-hook of the language model, ahead of the engine's) records the call's
    language-model input, visual-row mask and per-level features and hides the features from the
    stock layers loop; :class:`_Level` pre-hooks add them back; ``release`` drops the record.
    """

    def __init__(self, state) -> None:
        self.state = state
        self.call: tuple | None = None    # (inputs_embeds, mask, [features per level]) of the call
        self.features: tuple | None = None  # (visual rows, levels * D) features, (B, S) row of each

    def take(self, module, args, kwargs):
        self.call = self.features = None
        kwargs, mask, features = hf.take_deepstack(kwargs)
        if mask is None:
            return None
        self.call = (kwargs.get("inputs_embeds"), mask, features)
        return args, kwargs

    def release(self, module, args, kwargs, output):
        self.call = self.features = None

    def add(self, level: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """``hidden`` (B, W, D), the output of decoder layer ``level``, with DeepStack level ``level``."""
        state = self.state
        if state.in_probe or self.call is None or level >= len(self.call[2]):
            return None
        _, mask, features = self.call
        prefill = state.pending  # a prefill pio changes (a replay included); else the call's own rows
        if prefill is None:
            return hf.deepstack_add(hidden, mask, features[level])
        cut = state.current_cut(level)
        stacked, slot_of = self._features(prefill)
        index = cut.index.to(hidden.device)
        slot = slot_of.to(hidden.device).gather(1, index.clamp_min(0))
        present = (index >= 0) & (slot >= 0)
        dim = hidden.shape[-1]
        values = stacked[slot.clamp_min(0), level * dim:(level + 1) * dim]
        out = hidden.clone()
        head = out[:, :index.shape[1]]  # the prompt rows of the cut; a replay's new rows follow
        head[present] = head[present] + values[present].to(hidden.dtype)
        return out

    def _features(self, prefill) -> tuple[torch.Tensor, torch.Tensor]:
        """Every level's features side by side, (visual rows, levels * D) in the row-major order of
        the call's visual rows, merged as the main features were when the encoder side cut the
        prompt; and (B, S) the row of each caller row among them (-1 for text)."""
        if self.features is None:
            embeds, mask, features = self.call
            mask = mask.to(embeds.device)
            stacked = torch.cat([f.to(embeds.device) for f in features], dim=-1)
            if prefill.encoder_merge is not None:
                keep, group = prefill.encoder_merge
                s0 = keep.shape[1]
                rows = stacked.new_zeros(*mask.shape, stacked.shape[-1])
                rows[mask] = stacked
                rows[:, :s0] = merge_dropped(embeds[:, :s0], keep, group, values=rows[:, :s0])
                stacked = rows[mask]
            slot = mask.reshape(-1).long().cumsum(0).view_as(mask) - 1
            self.features = stacked, slot.masked_fill(~mask, -1)
        return self.features


class _Level:
    """Pre-hook of the module that reads decoder layer ``level``'s output: adds DeepStack level ``level``."""

    def __init__(self, deepstack: DeepStack, level: int) -> None:
        self.deepstack = deepstack
        self.level = level

    def __call__(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = self.deepstack.add(self.level, hidden)
        if out is None:
            return None
        if args:
            return (out,) + tuple(args[1:]), kwargs
        return args, dict(kwargs, hidden_states=out)


class Qwen3VLAdapter(Qwen2VLAdapter):
    """``Qwen3VLForConditionalGeneration`` (and the MoE variant): Qwen2-VL's answers, DeepStack, videos
    encoded through ``get_image_features``."""

    name = "qwen3_vl"

    def model_classes(self) -> tuple[type, ...]:
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
        return (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration)

    def image_runs(self, call: dict, runs: list) -> list:
        return [run for run in runs if not hf.is_video_run(call, run)]

    def extra_hooks(self, model: nn.Module, state) -> list:
        lm = self.language_model(model)
        levels = min(len(model.config.vision_config.deepstack_visual_indexes), len(lm.layers))
        deepstack = DeepStack(state)
        handles = [lm.register_forward_pre_hook(deepstack.take, with_kwargs=True, prepend=True),
                   lm.register_forward_hook(deepstack.release, with_kwargs=True)]
        for level in range(levels):
            reader = lm.layers[level + 1] if level + 1 < len(lm.layers) else lm.norm
            handles.append(reader.register_forward_pre_hook(_Level(deepstack, level), with_kwargs=True,
                                                            prepend=True))
        return handles


register_adapter(Qwen3VLAdapter())
