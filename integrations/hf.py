"""The transformers surface: every convention of Hugging Face transformers that pio relies on.

The engine and the model adapters read transformers' keyword names, caches, masks and
``generate`` conventions only through this module; nothing else in ``integrations`` names a
private transformers attribute. When a release changes one of these, this file changes, and
``tests/test_hf_surface.py`` names the assumption that broke. Tested range: transformers
5.17.0 to the newest release (see the README).

What is assumed, and where it differs between releases:

* **Cache keyword.** The models' forward takes the KV cache as ``past_key_values`` up to
  5.23 and as ``cache`` from 5.24; decoder layers as ``past_key_values`` (``past_key_value``
  in older releases). :data:`CACHE_KEYS`, :func:`get_cache`.
* **Cache lengths.** ``Cache.get_seq_length(layer_idx)`` is what ``generate`` and the models
  read to number new tokens and to slice a continued prompt; ``cache.layers[i]`` hold the
  per-layer tensors (``get_seq_length()`` per layer), static layers have a fixed
  ``max_cache_len``. A cache that pio filled holds fewer rows in the layers after a stage; it
  reports the caller's numbering (:func:`report_caller_lengths`), so ``generate``'s
  bookkeeping (continuation slicing, positions) is the stock one, while the engine reads the
  rows really stored with :func:`stored_length`.
* **Masks.** The language model receives a 2-D padding mask (B, S) or ``None`` from a plain
  call, a 4-D mask (B, 1, q, kv) from ``generate`` with a static cache or from a user, and on
  some models (Qwen2.5-VL) a dict of 4-D masks per layer type. :func:`key_validity` reads the
  padding out of each; :func:`mask_kind` says which mask a decoder layer takes per attention
  implementation.
* **Generate and images.** From 5.24 ``generate`` encodes images before the prefill through
  ``model.model.get_image_features`` (instance attribute lookup) and hands the model
  ``mm_encoder_outputs``; it expands them per sample group for beams. Up to 5.23 the
  prefill forward receives ``pixel_values`` and encodes them itself. Either way the image
  features pass through ``get_image_features``, which :func:`image_feature_owner` names.
* **Rotary embeddings.** ``language_model.rotary_emb(hidden, position_ids)`` returns
  ``(cos, sin)``; :func:`rotary`.
* **Output capturing.** Hidden states, attentions and MoE router logits are recorded by forward
  hooks on the decoder layers, attention modules and routers, into a context-variable collector.
  pio's probe calls ``layer.forward`` directly and runs attention through SDPA (see
  ``pio_kernels.reference``); a stage scores inside :func:`outputs_not_recorded`, so the
  probe's MLP call (a MoE router) adds nothing to the caller's outputs.
* **Attention implementation.** Attention modules read ``config._attn_implementation`` at each
  call: :func:`attention_implementation`, :func:`attention_implementation_as`; random-weight
  models are built with :func:`build_model` (benchmarks, demo).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["CACHE_KEYS", "cache_kwargs", "get_cache", "output_cache", "is_static_cache", "key_validity", "mask_kind", "max_cache_length",
           "report_caller_lengths", "reported_offsets", "rotary", "stored_length", "transformers_version"]

# Keyword names of the KV cache, newest first: models' forward (5.24+: ``cache``), older forwards
# and decoder layers (``past_key_values``), oldest decoder layers (``past_key_value``).
CACHE_KEYS = ("cache", "past_key_values", "past_key_value")

# Attention implementations and the mask their decoder layers take (see masks.py).
MASK_KINDS = {"eager": "additive", "sdpa": "bool", "flash_attention_2": "2d", "flash_attention_3": "2d"}


def transformers_version() -> str:
    import transformers
    return transformers.__version__


# ----------------------------------------------------------------------------------------------
# Caches
# ----------------------------------------------------------------------------------------------
def get_cache(kwargs: dict) -> Any:
    """The KV cache in a forward's keyword arguments, under whichever name this release uses."""
    for key in CACHE_KEYS:
        cache = kwargs.get(key)
        if cache is not None:
            return cache
    return None


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"pio needs a transformers Cache with per-layer storage (.layers), got {type(cache).__name__}")
    return layers


def stored_length(cache, layer_idx: int = 0) -> int:
    """Rows the cache really holds for decoder layer ``layer_idx`` (0 for no cache)."""
    if cache is None:
        return 0
    layers = _layers(cache)
    if layer_idx >= len(layers):
        return 0
    return int(layers[layer_idx].get_seq_length())


def output_cache(output) -> Any:
    """The KV cache a model output carries (``cache`` from 5.24, ``past_key_values`` before)."""
    if isinstance(output, tuple):
        return None
    fields = getattr(output, "__dataclass_fields__", {})
    for key in CACHE_KEYS:  # the field this release defines (reading a deprecated alias would warn)
        if key in fields:
            return getattr(output, key)
    return None


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` under the keyword this release's models take."""
    import inspect

    from transformers import LlamaModel
    name = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
    return {name: cache}


def is_static_cache(cache) -> bool:
    """Whether the cache preallocates a fixed length (StaticCache and friends)."""
    if cache is None:
        return False
    layers = _layers(cache)
    return bool(layers) and getattr(layers[0], "max_cache_len", None) is not None \
        and type(layers[0]).__name__.startswith("Static")


def max_cache_length(cache, layer_idx: int = 0) -> int | None:
    """Columns a static layer attends over (its ``max_cache_len``); ``None`` for a growing cache."""
    if not is_static_cache(cache):
        return None
    return int(_layers(cache)[layer_idx].max_cache_len)


@functools.lru_cache(maxsize=None)
def _reporting_class(cls: type) -> type:
    """A subclass of the cache class whose ``get_seq_length`` adds each layer's offset."""

    def get_seq_length(self, layer_idx: int = 0):
        stored = cls.get_seq_length(self, layer_idx)
        offsets = self.__dict__.get("_pio_offsets")
        if not offsets or layer_idx >= len(offsets) or not stored:
            return stored
        return stored + offsets[layer_idx]

    return type(cls.__name__, (cls,), {"get_seq_length": get_seq_length, "_pio_base_class": cls,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def report_caller_lengths(cache, offsets: list[int]) -> None:
    """Makes ``cache.get_seq_length(i)`` report ``stored + offsets[i]``: the caller's numbering.

    A prefill that drops tokens leaves layer ``i`` with ``offsets[i]`` fewer rows than the
    caller's sequence. ``generate`` (and the models' own position code) number new tokens and
    slice a continued prompt by ``get_seq_length()``; reporting the caller's length keeps that
    bookkeeping the stock one. The cache's class becomes a subclass of its own class (so
    ``isinstance`` checks, ``reorder_cache``, ``crop`` by a negative count and ``deepcopy`` are
    unchanged); an all-zero ``offsets`` restores the plain numbering.
    """
    base = getattr(type(cache), "_pio_base_class", type(cache))
    if any(offsets):
        cache.__class__ = _reporting_class(base)
        cache.__dict__["_pio_offsets"] = list(offsets)
    else:
        cache.__class__ = base
        cache.__dict__.pop("_pio_offsets", None)


def reported_offsets(cache) -> list[int] | None:
    """The offsets :func:`report_caller_lengths` installed, or ``None``."""
    return None if cache is None else cache.__dict__.get("_pio_offsets")


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
def attention_implementation(config) -> str | None:
    """The attention implementation a model config selects (``eager``, ``sdpa``, ...)."""
    return getattr(config, "_attn_implementation", None)


@contextlib.contextmanager
def attention_implementation_as(config, impl: str) -> Iterator[None]:
    """Runs the modules reading ``config`` with attention implementation ``impl`` for the duration
    of the block (the attention modules read it at each call); restored after it. Another thread
    running the same model meanwhile would see the switch. A ``None`` config is left alone."""
    old = attention_implementation(config)
    if config is None or old == impl:
        yield
        return
    config._attn_implementation = impl
    try:
        yield
    finally:
        config._attn_implementation = old


@contextlib.contextmanager
def outputs_not_recorded() -> Iterator[None]:
    """Runs the block with transformers' output capturing inactive: modules called in it (the
    saliency probe's MLP, whose MoE router a surrounding ``output_router_logits`` call would
    record) add nothing to the caller's ``hidden_states`` / ``attentions`` / ``router_logits``.

    The collector is a context variable of ``transformers.utils.output_capturing`` (5.17 to
    5.24); it is set to ``None`` for the block and reset with its token after it. While a
    surrounding call is being traced by ``torch.compile`` transformers keeps it as a plain
    global instead, which is left alone here (pio's stages run outside the traced graph).
    """
    from transformers.utils import output_capturing

    collector = output_capturing._active_collector
    if getattr(collector, "compiling", False) or collector.get() is None:
        yield
        return
    token = collector.context_var.set(None)
    try:
        yield
    finally:
        collector.context_var.reset(token)


def router_logits_requested(model, kwargs: dict) -> bool:
    """Whether a forward of ``model`` records MoE router logits (``output_router_logits`` in the
    call, else in the text config)."""
    flag = kwargs.get("output_router_logits")
    if flag is None:
        config = getattr(model.config, "text_config", model.config)
        flag = getattr(config, "output_router_logits", False)
    return bool(flag)


def build_model(cls, config, *, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> nn.Module:
    """A model of class ``cls`` with random weights from ``config`` (no checkpoint), built on
    ``device`` in ``dtype`` with attention implementation ``attn_implementation``, in eval mode."""
    config._attn_implementation = attn_implementation
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
    return model.eval()


def mask_kind(impl: str | None) -> str:
    """How a decoder layer with attention implementation ``impl`` takes its mask.

    ``"additive"`` (eager: (B, 1, q, kv) float, 0 or the dtype's min), ``"bool"`` (sdpa: (B, 1,
    q, kv) bool, True = attend, or None) or ``"2d"`` (flash attention: (B, kv) padding or None).
    Raises ValueError for an implementation pio does not know.
    """
    impl = impl or "eager"
    if impl in MASK_KINDS:
        return MASK_KINDS[impl]
    if "flash" in impl:  # hub kernels such as kernels-community/flash-attn
        return "2d"
    raise ValueError(f"attention implementation {impl!r} is not supported by pio "
                     f"(supported: {', '.join(MASK_KINDS)})")


def _one_mask(mask):
    """The 4-D mask of the full-attention layers out of a per-layer-type dict."""
    if isinstance(mask, dict):
        if "full_attention" in mask:
            return mask["full_attention"]
        return next(iter(mask.values()))
    return mask


def key_validity(mask, batch: int, q: int, kv: int, device) -> tuple[torch.Tensor, bool]:
    """Which of ``kv`` key columns are real tokens, from any mask format a language model takes.

    Args:
        mask: ``None``, a 2-D padding mask (B, kv), a 4-D mask (B or 1, 1, q, >= kv) (bool: True
            attends; float: 0 attends), or a dict of such masks per layer type.
        batch, q, kv: batch size, new rows, key columns (cache + new rows).

    Returns:
        ``(valid, standard)``: (B, kv) bool, and whether ``mask`` is exactly the causal padding
        mask of ``valid`` (always True for ``None`` and 2-D masks). A 4-D mask is read from its
        last query row, which sees every real key; ``standard`` is False for anything else (a
        custom mask: packed sequences, bidirectional spans).
    """
    mask = _one_mask(mask)
    if mask is None:
        return torch.ones(batch, kv, dtype=torch.bool, device=device), True
    if mask.dim() == 2:
        if mask.shape[1] < kv:
            raise ValueError(f"attention_mask has {mask.shape[1]} columns; {kv} are needed "
                             f"(cache {kv - q} + {q} new)")
        return mask[:, :kv].to(device).bool().expand(batch, kv), True
    if mask.dim() != 4:
        raise ValueError(f"attention_mask must be 2-D (B, S) or 4-D (B, 1, q, kv), got shape {tuple(mask.shape)}")
    allowed = mask if mask.dtype == torch.bool else mask == 0
    allowed = allowed[:, 0].to(device)
    valid = allowed[:, -1, :kv].expand(batch, kv)
    past = kv - q
    causal = torch.arange(kv, device=device)[None, :] <= (past + torch.arange(q, device=device))[:, None]
    expect = causal[None] & valid[:, None, :]
    rows = allowed[:, :, :kv].expand(batch, q, kv)
    query_valid = valid[:, past:, None]  # rows of padding queries may hold anything (e.g. unmasked)
    standard = bool(((rows == expect) | ~query_valid).all()) \
        and not bool((allowed[:, :, kv:].expand(batch, q, -1) & query_valid).any())
    return valid, standard


def layer_mask_like(template, mask):
    """``mask`` in the container the model used for ``template`` (a dict per layer type stays a dict)."""
    if isinstance(template, dict):
        return {key: mask for key in template}
    return mask


# ----------------------------------------------------------------------------------------------
# Models and generate
# ----------------------------------------------------------------------------------------------
def precomputed_image_features(kwargs: dict):
    """The image features ``generate`` (5.24+) encoded before the prefill, or ``None``."""
    outputs = kwargs.get("mm_encoder_outputs") or {}
    return outputs.get("image")


def image_feature_owner(model: nn.Module) -> nn.Module:
    """The module whose ``get_image_features`` both ``generate`` and the forward call."""
    return model.model


def llava_next_crops(config, image_sizes) -> list[int]:
    """Crops (base image + anyres tiles) LLaVA-NeXT cuts each image of ``image_sizes`` into."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    return [int(image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                          patch_size=config.vision_config.image_size)) for size in image_sizes]


@functools.lru_cache(maxsize=256)
def _window_index_of(grid: tuple[int, int, int], merge: int, window: int, patch: int) -> torch.Tensor:
    from transformers.vision_utils import get_vision_window_index
    index, _ = get_vision_window_index(torch.tensor([grid]), spatial_merge_size=merge, window_size=window,
                                       patch_size=patch)
    return index


def vision_window_index(visual: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL's permutation of the merged vision tokens into window order (the tower's own
    helper), built once per distinct grid: one read of ``grid_thw``, whatever the number of images."""
    index, offset = [], 0
    for grid in grid_thw.tolist():
        one = _window_index_of(tuple(int(g) for g in grid), visual.spatial_merge_size, visual.window_size,
                               visual.patch_size)
        index.append(one + offset)
        offset += one.numel()
    return torch.cat(index)


def rotary(language_model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor):
    """``(cos, sin)`` of ``positions`` from the language model's own rotary embedding."""
    return language_model.rotary_emb(hidden, positions)


def generation_modes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """What a ``generate(...)`` call asks for, resolved against the model's generation config."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    def pick(name, default=None):
        if name in kwargs:
            return kwargs[name]
        return getattr(config, name, default) if config is not None else default
    return {
        "assistant": kwargs.get("assistant_model") is not None or pick("prompt_lookup_num_tokens") is not None,
        "prefill_chunk_size": pick("prefill_chunk_size"),
        "cache_implementation": pick("cache_implementation"),
        "use_cache": pick("use_cache", True),
        "num_beams": pick("num_beams", 1) or 1,
    }


# ----------------------------------------------------------------------------------------------
# Model-family internals: Qwen3-VL (DeepStack, video features), LLaVA-OneVision (crops, frames).
# The same in 5.17 and 5.24.
# ----------------------------------------------------------------------------------------------
# Qwen3-VL's text model takes its DeepStack features as two forward keywords: ``visual_pos_masks``
# (B, S) bool, the visual rows of the call, and ``deepstack_visual_embeds``, one (visual rows, D)
# tensor per DeepStack level, in the row-major order of the mask. After decoder layer ``i`` it adds
# level ``i`` to those rows (its ``_deepstack_process``).
DEEPSTACK_KEYS = ("visual_pos_masks", "deepstack_visual_embeds")


def take_deepstack(kwargs: dict) -> tuple[dict, torch.Tensor | None, list | None]:
    """``(kwargs, mask, features)``: the language model's kwargs with the DeepStack features taken
    out (so its own layers loop adds none), the visual-row mask and the per-level features; the
    kwargs unchanged and ``None`` twice when the call carries none."""
    mask, features = (kwargs.get(key) for key in DEEPSTACK_KEYS)
    if mask is None or features is None:
        return kwargs, None, None
    kwargs = dict(kwargs)
    for key in DEEPSTACK_KEYS:
        kwargs[key] = None
    return kwargs, mask, list(features)


def deepstack_add(hidden: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's DeepStack step, with the stock arithmetic: ``features`` (n, D) added, in
    ``hidden``'s dtype, to the ``n`` rows of ``hidden`` (B, S, D) that ``mask`` (B, S) marks."""
    mask = mask.to(hidden.device)
    out = hidden.clone()
    out[mask, :] = out[mask, :] + features.to(hidden.device, hidden.dtype)
    return out


def is_video_run(call: dict, run) -> bool:
    """Whether an image-feature call computed video features. Qwen3-VL's ``get_video_features``
    calls ``get_image_features`` with the video's pixels: in a forward they are the call's
    ``pixel_values_videos``; ``generate`` (5.24+) hands the output over as
    ``mm_encoder_outputs["video"]`` (expanded for beams in place, so the object stays the same)."""
    pixels = run.kwargs.get("pixel_values")
    if pixels is not None and pixels is call.get("pixel_values_videos"):
        return True
    video = (call.get("mm_encoder_outputs") or {}).get("video")
    return video is not None and video is run.output


def llava_onevision_crops(config, image_sizes, batch_num_images=None) -> list[int]:
    """Crops (base image + anyres tiles) LLaVA-OneVision cuts each image into: one for every image
    of a sample with several images (``batch_num_images``), else as LLaVA-NeXT."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
    patching = [True] * len(image_sizes) if batch_num_images is None else \
        [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    return [int(image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                          patch_size=config.vision_config.image_size)) if patch else 1
            for size, patch in zip(image_sizes, patching)]


def llava_onevision_frame_tokens(config) -> int:
    """Tokens of one LLaVA-OneVision video frame: the patch grid pooled 2x2 (``apply_pooling``)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return ((side + 1) // 2) ** 2
