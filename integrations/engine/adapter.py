"""The adapter interface: the model-specific answers the engine asks for, and the registry.

One subclass of :class:`Adapter` per model family lives in ``integrations/models/``; it
registers an instance with :func:`register_adapter` when imported, and :func:`adapter_for`
imports the built-in modules listed in ``BUILTIN_ADAPTERS``. An adapter answers only model
questions (where are the images, how are positions formed, what does the vision tower
expose); it never touches masks, caches or stages.

Required
    ``model_classes()``            the supported top-level classes (for ``isinstance``).
    ``multimodal_module(model)``   the module whose forward takes ``input_ids`` / pixels and
                                   calls the language model (its kwargs are recorded).
    ``language_model(model)``      the decoder stack: ``.layers``, ``.norm``, ``.config``.
    ``image_map(model, call, runs, lm_kwargs)``
                                   (B, S) int64 on the device: image id of every row of the
                                   caller's prompt, -1 for text. Ids are unique over the batch and
                                   ascend in row-major order. ``call``: the recorded kwargs of
                                   the multimodal forward; ``runs``: the image-feature calls of
                                   this prefill (:class:`~.state.VisionRun`, with ``output``);
                                   ``lm_kwargs``: the language model's kwargs (its positions).
Optional (defaults fit a Llama-style decoder with 1-D positions, renumbered after a stage)
    ``lm_head(model)``             the output head of the proxy loss (``model.lm_head``).
    ``prompt_positions(model, lm_kwargs, batch, seq_len, device)``
                                   positions of the prompt rows as the language model uses them
                                   ((B, S), or (3, B, S) for M-RoPE).
    ``step_positions(model, lm_kwargs, batch, past, q, device)``
                                   positions of ``q`` rows after ``past`` cached tokens, in the
                                   caller's numbering.
    ``positions_after_stage(positions, src, dropped_before, valid)``
                                   positions of the rows a cut keeps (``src`` (B, W) rows of the
                                   previous cut, ``dropped_before`` (B, W) real rows dropped
                                   before each). Default: gather and renumber (SPEC 5, LLaVA).
    ``decode_positions(positions, shift)``
                                   positions that layers behind a cut see for new tokens;
                                   ``shift`` (B,) tokens dropped so far. Default ``pos - shift``.
    ``position_embeddings(model, hidden, positions)``  the ``(cos, sin)`` pair.
    ``layer_position_ids(positions)``  what a decoder layer receives as ``position_ids``.
    ``lm_position_ids(positions)``  what the language model receives as ``position_ids``.
Encoder-side selection (SPEC 4; only where ``supports_encoder_selection(model)``)
    ``encoder_probes(model)``      ``{key: module}``: modules of the vision tower whose input
                                   the adapter reads while the image features are computed.
    ``encoder_probe(model, key, module, args, kwargs)``
                                   a score map computed from that module's input (called from
                                   a forward pre-hook, under ``torch.no_grad()``).
    ``encoder_select(model, call, runs, image_map, budget, tau)``
                                   ``(keep, group)``, both (B, S) over the caller's rows: which
                                   visual rows the encoder side keeps (rows it does not reduce:
                                   True) and, per visual row, the id of the span whose kept rows
                                   its features may merge into (SPEC 4: an image, a crop, a
                                   frame; -1: no merging, e.g. LLaVA-NeXT's newline tokens).
                                   ``budget(n)`` gives the tokens kept of a span of ``n``.
Model behaviour the engine does not model (optional)
    ``extra_hooks(model, state)``  handles (``.remove()``) of hooks the family needs on top of the
                                   engine's, registered after them (``prepend=True`` runs one before
                                   them); e.g. Qwen3-VL's DeepStack, which adds features to the rows
                                   each layer keeps (see :meth:`~.state.PioState.current_cut`).
                                   ``uninstall`` removes them.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import nn

from .. import hf

__all__ = ["Adapter", "BUILTIN_ADAPTERS", "adapter_for", "register_adapter"]

# Modules of integrations.models that define adapters; each registers itself when imported.
BUILTIN_ADAPTERS = ("llava", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision")
_ADAPTERS: list["Adapter"] = []


class Adapter:
    """Model-specific answers; see the module docstring for the contract of each method."""

    name = "adapter"

    def model_classes(self) -> tuple[type, ...]:
        raise NotImplementedError

    def multimodal_module(self, model: nn.Module) -> nn.Module:
        return model.model

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def image_map(self, model: nn.Module, call: dict, runs: list, lm_kwargs: dict | None = None) -> torch.Tensor | None:
        raise NotImplementedError

    def prompt_positions(self, model, lm_kwargs: dict, batch: int, seq_len: int, device) -> torch.Tensor:
        pos = lm_kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(seq_len, device=device)[None]
        return pos.expand(batch, seq_len)

    def step_positions(self, model, lm_kwargs: dict, batch: int, past: int, q: int, device) -> torch.Tensor:
        pos = lm_kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(past, past + q, device=device)[None]
        return pos.expand(batch, q)

    def positions_after_stage(self, positions: torch.Tensor, src: torch.Tensor, dropped_before: torch.Tensor,
                              valid: torch.Tensor) -> torch.Tensor:
        kept = positions.expand(src.shape[0], -1).gather(1, src) - dropped_before
        return torch.where(valid, kept, torch.zeros_like(kept))

    def decode_positions(self, positions: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return positions - shift[:, None].to(positions.dtype)

    def position_embeddings(self, model, hidden: torch.Tensor, positions: torch.Tensor):
        return hf.rotary(self.language_model(model), hidden, positions)

    def layer_position_ids(self, positions: torch.Tensor) -> torch.Tensor | None:
        return positions

    def lm_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions

    def concat_positions(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Positions of two runs of rows side by side (the last dimension is the row)."""
        return torch.cat([first.expand(*second.shape[:-1], -1), second], dim=-1)

    # encoder-side selection --------------------------------------------------------------
    def supports_encoder_selection(self, model) -> bool:
        return False

    def encoder_probes(self, model) -> dict[str, nn.Module]:
        return {}

    def encoder_probe(self, model, key: str, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        raise NotImplementedError

    def encoder_select(self, model, call: dict, runs: list, image_map: torch.Tensor, budget: Callable[[int], int],
                       tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{self.name}: encoder-side selection is not implemented")

    # model behaviour the engine does not model ------------------------------------------------
    def extra_hooks(self, model, state) -> list:
        return []


def register_adapter(adapter: Adapter) -> Adapter:
    """Adds an adapter to the registry (idempotent per adapter class)."""
    if not any(type(a) is type(adapter) for a in _ADAPTERS):
        _ADAPTERS.append(adapter)
    return adapter


def _load_builtin_adapters() -> None:
    package = __package__.rsplit(".", 1)[0] + ".models"
    for name in BUILTIN_ADAPTERS:
        module = f"{package}.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # an adapter module left out of the install: skip it
            if exc.name != module:
                raise


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s class. Raises TypeError naming the supported classes."""
    _load_builtin_adapters()
    names: list[str] = []
    for adapter in _ADAPTERS:
        classes = adapter.model_classes()
        if isinstance(model, classes):
            return adapter
        names += [c.__name__ for c in classes]
    raise TypeError(f"model must be one of {', '.join(names)}; got {type(model).__name__}")


def features_of(output: Any) -> list[torch.Tensor]:
    """Per-image features in the output of a model's image-feature function."""
    return list(getattr(output, "pooler_output", output))
