"""Model-independent machinery of the integrations: stages, per-forward state, masks, positions.

How one forward pass runs (SPEC sections 1, 4 and 5; DESIGN.md "One forward pass, as data")
-------------------------------------------------------------------------------------------
``install`` registers hooks on the stock model and keeps their handles, so ``uninstall``
leaves the model exactly as it was (no parameter, module or forward is replaced):

1. a forward pre-hook on the *multimodal module* (e.g. ``LlavaModel``) starts a prefill
   (empty or no KV cache): it records the caller's ``input_ids`` and, when
   ``encoder_keep`` is set, lets the adapter reduce the image features before they are
   placed into the sequence, shrinking ``input_ids``, the 2-D mask and the positions
   (in decoding steps it maps the caller's mask and positions onto that shorter prompt);
2. a forward pre-hook on the *language model* records its 2-D mask and positions and asks
   the adapter which rows are image tokens (one integer id per image, -1 for text);
3. forward pre-hooks on every decoder layer from ``layers[0]`` on. In prefill, the layer
   ``layers[s]`` scores its input with :func:`pio_kernels.proxy_saliency`, keeps
   ``keep[s]`` rows per image with :func:`pio_kernels.select_tokens`, and hands itself and
   every later layer the gathered hidden states, the matching mask, ``position_embeddings``
   and ``position_ids``. The KV cache of those layers therefore holds only kept tokens.
   In decoding nothing is selected: the layers after a stage get the positions the adapter
   derives (LLaVA: shifted by what was dropped; Qwen2.5-VL: unchanged) and a mask as long
   as their own cache;
4. a forward hook on the multimodal module scatters the last hidden state back onto the
   caller's rows, so logits line up with the caller's ``input_ids`` (rows of dropped
   visual tokens are zero).

The adapter interface (one subclass of :class:`Adapter` per model family)
------------------------------------------------------------------------
An adapter answers only model-specific questions; it never touches masks, caches or
stages. Register an instance with :func:`register_adapter` at import time of its module;
:func:`adapter_for` imports the built-in modules listed in ``_BUILTIN_ADAPTERS`` (missing
ones are skipped), so a new family is a new file plus one name there.

Required:
    ``model_classes()``           the supported top-level classes (for ``isinstance``).
    ``multimodal_module(model)``  the module whose forward takes ``input_ids`` / pixels and
                                  calls the language model (its kwargs are recorded).
    ``language_model(model)``     the decoder stack: ``.layers``, ``.norm``, ``.config``.
    ``lm_head(model)``            the output head used by the proxy loss.
    ``image_map(model, call, lm_kwargs, seq_len)``
                                  (B, S) int64 on the device: image id of every row of the
                                  language model's prefill input, -1 for text. ``call`` is
                                  the recorded kwargs of the multimodal forward (after any
                                  encoder-side shrinking), plus ``call["_image_token_counts"]``
                                  when the adapter's ``on_image_features`` recorded them.
Optional (defaults fit a Llama-style decoder with 1-D positions):
    ``prompt_positions(model, lm_kwargs, batch, seq_len, device)``
                                  positions of the prefill rows as the language model uses
                                  them ((B, S), or (3, B, S) for M-RoPE); default:
                                  ``lm_kwargs["position_ids"]`` or ``arange(S)``.
    ``step_positions(model, lm_kwargs, batch, past, q, device)``
                                  positions of the new rows in a decoding step, in the
                                  language model's own (unreduced) numbering.
    ``positions_after_stage(positions, src, dropped_before, valid)``
                                  positions of the rows kept by a stage. ``src`` (B, S')
                                  indexes the stage's input rows, ``dropped_before`` (B, S')
                                  counts the valid input rows dropped before each kept row.
                                  Default (LLaVA, SPEC 5): gather and renumber
                                  (``pos - dropped_before``). Qwen2.5-VL: gather only.
    ``decode_positions(positions, shift)``
                                  positions a layer after a stage sees for new tokens;
                                  ``shift`` (B,) tokens dropped so far. Default:
                                  ``positions - shift``. Qwen2.5-VL: unchanged.
    ``position_embeddings(model, hidden, positions)``
                                  the ``(cos, sin)`` pair; default ``language_model.rotary_emb``.
    ``layer_position_ids(positions)``
                                  what a decoder layer receives as ``position_ids``.
    ``on_image_features(model, call, output)``
                                  called with the output of the model's image-feature
                                  function during prefill (e.g. to record token counts).
    ``image_feature_function(model)``
                                  ``(owner, name)`` of that function, patched per instance
                                  while installed; ``None`` for none.
Encoder-side selection (only when ``supports_encoder_selection(model)`` is True; SPEC 4):
    ``supports_encoder_selection(model)``
                                  ``apply_pio`` refuses ``encoder_keep`` otherwise.
    ``reduce_encoder_features(model, image_kwargs, budget, tau)``
                                  ``image_kwargs``: the image-feature function's named
                                  arguments (``pixel_values``, ``image_sizes``, ...). Returns
                                  ``(output, kept, counts)``: an object shaped like the
                                  image-feature function's output holding the reduced (and
                                  merged) features, per image the ascending kept indices into
                                  that image's placeholder tokens, and per image the token
                                  count before reduction. The engine calls it from the
                                  prefill pre-hook (or the patched image-feature function,
                                  when ``generate`` encodes images before the prefill), drops
                                  the placeholder rows of the dropped tokens from
                                  ``input_ids``, the 2-D mask, ``inputs_embeds`` and
                                  ``position_ids`` (left-padding samples that end up shorter),
                                  and maps decoding steps' caller mask and positions onto the
                                  shorter sequence. Image ids at or past the number of
                                  images it returned (e.g. Qwen2.5-VL's video frames) stay whole.
    ``pixel_keys``, ``image_feature_keys``
                                  call keys that carry images / feed the feature function.
    ``features_of(output)``       per-image feature list of the feature function's output.
    ``encoder_positions(model, call, src, dropped_before, valid)``
                                  ``position_ids`` of the rows left (default: the caller's
                                  positions or ``arange``, through ``positions_after_stage``).
    ``encoder_step_positions(model, call, caller_past, q, shift)``
                                  ``position_ids`` of a decoding step's new rows, from the
                                  caller's kwargs (its unreduced mask) (default: the
                                  caller's or ``arange``, through ``decode_positions``; a model
                                  that derives them from its cache length must override it).
    ``shrink_call(model, call, src)``
                                  other per-row kwargs gathered with ``src`` (B, S'), e.g.
                                  ``mm_token_type_ids``; returns the replaced entries.
Shared rules: :func:`split_local_global` (local windows + global top) and
:func:`merge_dropped` (mean merging) implement SPEC 4 on attention maps an adapter provides.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.attention
from torch import nn

import pio_kernels

__all__ = ["Adapter", "PioState", "adapter_for", "build_attention_mask", "install", "merge_dropped",
           "register_adapter", "resolve_budget", "split_local_global", "uninstall"]

# Modules of this package that define adapters; each registers itself when imported.
_BUILTIN_ADAPTERS = ("llava", "qwen2_5_vl")
_ADAPTERS: list["Adapter"] = []
_MASK_KINDS = {"eager": "additive", "sdpa": "bool", "flash_attention_2": "2d", "flash_attention_3": "2d"}


def resolve_budget(keep: int | float, n: int) -> int:
    """Tokens kept from ``n`` by a budget: an int is a count (capped at ``n``), a float in (0, 1]
    a fraction of ``n`` rounded half up, at least 1."""
    if isinstance(keep, float):
        return max(1, min(n, math.floor(keep * n + 0.5)))
    return min(n, keep)


# ----------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------
class Adapter:
    """Model-specific answers; see the module docstring for the contract of each method."""

    name = "adapter"

    def model_classes(self) -> tuple[type, ...]:
        raise NotImplementedError

    def multimodal_module(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def language_model(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def image_map(self, model: nn.Module, call: dict, lm_kwargs: dict, seq_len: int) -> torch.Tensor | None:
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
        kept = positions.gather(1, src) - dropped_before
        return torch.where(valid, kept, torch.zeros_like(kept))

    def decode_positions(self, positions: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return positions - shift[:, None].to(positions.dtype)

    def position_embeddings(self, model, hidden: torch.Tensor, positions: torch.Tensor):
        return self.language_model(model).rotary_emb(hidden, positions)

    def layer_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions

    def image_feature_function(self, model) -> tuple[Any, str] | None:
        return None

    def on_image_features(self, model, call: dict, output: Any) -> None:
        return None

    # encoder-side selection --------------------------------------------------------------
    pixel_keys: tuple[str, ...] = ("pixel_values",)
    image_feature_keys: tuple[str, ...] = ("pixel_values", "image_sizes", "vision_feature_layer",
                                           "vision_feature_select_strategy")

    def supports_encoder_selection(self, model) -> bool:
        return False

    def features_of(self, output) -> list[torch.Tensor]:
        """Per-image features in the output of the model's image-feature function."""
        return list(getattr(output, "pooler_output", output))

    def encoder_positions(self, model, call: dict, src: torch.Tensor, dropped_before: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
        """``position_ids`` of the rows left after encoder-side selection (default: the caller's
        positions, or ``arange``, through ``positions_after_stage``)."""
        batch, width = src.shape
        positions = call.get("position_ids")
        if positions is None:
            ids = call["input_ids"]
            positions = torch.arange(ids.shape[1], device=ids.device)[None]
        return self.positions_after_stage(positions.expand(batch, -1), src, dropped_before, valid)

    def encoder_step_positions(self, model, call: dict, caller_past: int, q: int, shift: torch.Tensor) -> torch.Tensor:
        """``position_ids`` of a decoding step's ``q`` new rows after encoder-side selection.
        ``caller_past``: tokens before them in the caller's numbering; ``shift`` (B,): tokens the
        encoder dropped. Default: the caller's positions (or ``arange``) through ``decode_positions``."""
        positions = call.get("position_ids")
        if positions is None:
            device = shift.device
            positions = torch.arange(caller_past, caller_past + q, device=device)[None].expand(shift.shape[0], q)
        return self.decode_positions(positions, shift)

    def reduce_encoder_features(self, model, call: dict, budget: int | float, tau: float):
        raise NotImplementedError(f"{self.name}: encoder-side selection is not implemented")

    def shrink_call(self, model, call: dict, keep_rows: torch.Tensor) -> dict:
        return {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Adds an adapter to the registry (idempotent per adapter class)."""
    if not any(type(a) is type(adapter) for a in _ADAPTERS):
        _ADAPTERS.append(adapter)
    return adapter


def _load_builtin_adapters() -> None:
    for name in _BUILTIN_ADAPTERS:
        module = f"{__package__}.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s class. Raises TypeError naming the supported classes."""
    _load_builtin_adapters()
    names = []
    for adapter in _ADAPTERS:
        classes = adapter.model_classes()
        if isinstance(model, classes):
            return adapter
        names += [c.__name__ for c in classes]
    raise TypeError(f"model must be one of {', '.join(names)}; got {type(model).__name__}")


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
def mask_kind(impl: str | None) -> str:
    """How the attention implementation ``impl`` takes its mask: additive, bool (4-D) or 2d."""
    impl = impl or "eager"
    if impl in _MASK_KINDS:
        return _MASK_KINDS[impl]
    if "flash" in impl:  # hub kernels such as kernels-community/flash-attn
        return "2d"
    raise ValueError(f"attention implementation {impl!r} is not supported by pio "
                     f"(supported: {', '.join(_MASK_KINDS)})")


def build_attention_mask(kind: str, kv_valid: torch.Tensor, q: int, dtype: torch.dtype):
    """The mask a decoder layer takes, for ``q`` new rows against a cache of ``kv - q`` rows.

    Args:
        kind: ``mask_kind`` of the attention implementation.
        kv_valid: (B, kv) bool, which cached + new rows are real tokens.
        q: new rows (the last ``q`` of the kv rows).
        dtype: dtype of the additive mask.

    Returns: what the stock model builds for the same case: ``None`` where no mask is needed,
    (B, kv) bool for flash attention, (B, 1, q, kv) bool for sdpa, additive (B, 1, q, kv) for eager.
    """
    batch, kv = kv_valid.shape
    all_valid = bool(kv_valid.all())
    if kind == "2d":
        return None if all_valid else kv_valid
    if kind == "bool" and all_valid and (q == kv or q == 1):
        return None
    device = kv_valid.device
    past = kv - q
    causal = torch.arange(kv, device=device)[None, :] <= (past + torch.arange(q, device=device))[:, None]
    allowed = causal[None, None] & kv_valid[:, None, None, :]
    if kind == "bool":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------
# Per-forward state
# ----------------------------------------------------------------------------------------------
@dataclass
class _Cut:
    """The rows that a group of layers sees after a stage (or the prompt itself)."""

    layer: int                      # first layer that sees these rows (0 for the prompt)
    index: torch.Tensor             # (B, S_c) rows of the language model's prompt, -1 for padding
    valid: torch.Tensor             # (B, S_c) bool
    positions: torch.Tensor         # adapter-defined, rows of this cut
    shift: torch.Tensor             # (B,) valid prompt tokens dropped up to this cut
    identity: bool                  # nothing dropped up to here: layers get the model's own inputs
    embeddings: tuple | None = None
    mask: Any = None


@dataclass
class _Prefill:
    """What one prefill decided; decoding steps read it."""

    seq_len: int                    # S0, rows of the language model's prompt
    image_map: torch.Tensor         # (B, S0) image id per row, -1 for text
    caller_index: torch.Tensor      # (B, S0) row of the caller's input_ids
    mask_kind: str
    cuts: list[_Cut] = field(default_factory=list)
    caller_len: int = 0             # rows of the caller's input_ids
    selection: list[torch.Tensor] = field(default_factory=list)
    encoder_selection: torch.Tensor | None = None


class PioState:
    """Everything ``install`` attaches to a model (``model._pio``)."""

    def __init__(self, model: nn.Module, adapter: Adapter, config) -> None:
        self.model = model
        self.adapter = adapter
        self.config = config
        self.handles: list[Any] = []
        self.patched: list[tuple[Any, str]] = []
        self.call: dict | None = None          # recorded kwargs of the current multimodal prefill
        self.prefill: _Prefill | None = None   # the last prefill that selected something
        self.step: dict | None = None          # current language-model call
        self.in_probe = False
        self.scatter_pending = False
        self.encoder_features: Any = None      # one-shot output for the model's image-feature call
        self.encoder_kept: list | None = None  # per image, ascending kept indices of the last reduction
        self.encoder_counts: list | None = None  # per image, tokens before the reduction
        self.encoder: dict | None = None       # the encoder cut of the last prefill (caller -> LM rows)


# ----------------------------------------------------------------------------------------------
# Install / uninstall
# ----------------------------------------------------------------------------------------------
def install(model: nn.Module, adapter: Adapter, config) -> PioState:
    state = PioState(model, adapter, config)
    mm = adapter.multimodal_module(model)
    lm = adapter.language_model(model)
    state.handles.append(mm.register_forward_pre_hook(_mm_pre_hook(state), with_kwargs=True))
    state.handles.append(mm.register_forward_hook(_mm_post_hook(state), with_kwargs=True))
    state.handles.append(lm.register_forward_pre_hook(_lm_pre_hook(state), with_kwargs=True))
    state.handles.append(lm.register_forward_hook(_lm_post_hook(state)))
    for idx in range(config.layers[0], len(lm.layers)):
        hook = _layer_pre_hook(state, idx)
        state.handles.append(lm.layers[idx].register_forward_pre_hook(hook, with_kwargs=True))
    target = adapter.image_feature_function(model)
    if target is not None:
        owner, name = target
        original = getattr(owner, name)

        signature = inspect.signature(original)

        @functools.wraps(original)  # keeps the signature: generate inspects it
        def image_features(*args, **kwargs):
            if state.encoder_features is not None:  # computed by the prefill's pre-hook
                out, state.encoder_features = state.encoder_features, None
            elif state.config.encoder_keep is not None:
                named = dict(signature.bind_partial(*args, **kwargs).arguments)
                named.update(named.pop("kwargs", {}))
                out, state.encoder_kept, state.encoder_counts = adapter.reduce_encoder_features(
                    model, named, state.config.encoder_keep, state.config.tau)
            else:
                out = original(*args, **kwargs)
            # Whatever the features are (stock or reduced), the adapter learns their sizes: the
            # stages need them to tell adjacent images apart.
            if state.call is not None:
                adapter.on_image_features(model, state.call, out)
            return out

        setattr(owner, name, image_features)  # instance attribute, deleted by uninstall
        state.patched.append((owner, name))
    model._pio = state
    return state


def uninstall(model: nn.Module) -> None:
    state: PioState | None = getattr(model, "_pio", None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    for owner, name in state.patched:
        if name in vars(owner):
            delattr(owner, name)
    del model._pio


# ----------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------
def _cache_length(cache, layer_idx: int = 0) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length(layer_idx))
    except TypeError:
        return int(cache.get_seq_length())


def _mm_pre_hook(state: PioState) -> Callable:
    def hook(module, args, kwargs):
        if args:  # e.g. LlavaNext passes input_ids positionally: name every argument
            kwargs = dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
            kwargs.update(kwargs.pop("kwargs", {}))
            args = ()
        past = _cache_length(kwargs.get("past_key_values"))
        if past > 0:
            state.call = None  # a decoding step
            if state.encoder is not None:
                kwargs = _encoder_decode_step(state, kwargs, past)
            return args, kwargs
        state.call = dict(kwargs)
        state.prefill = None
        state.encoder = None
        state.encoder_features = None
        if state.config.encoder_keep is not None:
            state.call = _encoder_stage(state, kwargs)
            kwargs = {k: v for k, v in state.call.items() if not k.startswith("_")}
        return args, kwargs

    return hook


def _mm_post_hook(state: PioState) -> Callable:
    def hook(module, args, kwargs, output):
        state.call = None
        prefill = state.prefill
        if prefill is None or not state.scatter_pending:
            return None
        state.scatter_pending = False
        last = prefill.cuts[-1]
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        caller_len = int(prefill.caller_len)
        if last.identity and caller_len == prefill.seq_len:
            return None
        batch, _, dim = hidden.shape
        full = hidden.new_zeros(batch, caller_len, dim)
        rows = torch.where(last.valid, last.index, torch.full_like(last.index, -1))
        caller_rows = prefill.caller_index.gather(1, rows.clamp_min(0))
        caller_rows = torch.where(rows >= 0, caller_rows, torch.full_like(caller_rows, caller_len))
        full = torch.cat([full, full.new_zeros(batch, 1, dim)], dim=1)
        full.scatter_(1, caller_rows[..., None].expand(-1, -1, dim), hidden)
        full = full[:, :caller_len]
        if hasattr(output, "last_hidden_state"):
            output.last_hidden_state = full
            return output
        return (full,) + tuple(output[1:])

    return hook


def _lm_post_hook(state: PioState) -> Callable:
    def hook(module, args, output):
        # layers called outside a language-model forward (a user's own loop) run untouched
        state.scatter_pending = state.step is not None and state.step["prefill"]
        state.step = None

    return hook


def _lm_pre_hook(state: PioState) -> Callable:
    def hook(module, args, kwargs):
        hidden = kwargs.get("inputs_embeds")
        if hidden is None:
            state.step = None
            return None
        batch, q = hidden.shape[:2]
        cache = kwargs.get("past_key_values")
        past = _cache_length(cache)
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and mask2d.dim() != 2:
            if state.prefill is not None or state.call is not None:
                raise ValueError("pio needs a 2-D attention_mask (B, S) or None, got "
                                 f"shape {tuple(mask2d.shape)}")
            state.step = None
            return None
        if past == 0:
            call, state.call = state.call, None
            state.step = None
            state.prefill = None
            if call is None:
                return None
            image_map = state.adapter.image_map(state.model, call, kwargs, q)
            if image_map is None or not bool((image_map >= 0).any()):
                return None  # no image: the stock model runs untouched
            kind = mask_kind(module.config._attn_implementation)
            device = hidden.device
            valid = torch.ones(batch, q, dtype=torch.bool, device=device) if mask2d is None else mask2d.bool()
            positions = state.adapter.prompt_positions(state.model, kwargs, batch, q, device)
            arange = torch.arange(q, device=device).expand(batch, q)
            caller_index = call.get("_caller_index", arange)
            prefill = _Prefill(seq_len=q, image_map=image_map.to(device), caller_index=caller_index, mask_kind=kind,
                               caller_len=call.get("_caller_len", q))
            prefill.encoder_selection = call.get("_encoder_selection")
            prefill.cuts.append(_Cut(layer=0, index=arange, valid=valid, positions=positions,
                                     shift=torch.zeros(batch, dtype=torch.long, device=device), identity=True))
            state.prefill = prefill
            state.step = {"prefill": True, "hidden": hidden}
            return None
        if state.prefill is None:
            state.step = None
            return None
        prefill = state.prefill
        device = hidden.device
        new = past + q - prefill.seq_len
        if mask2d is None:
            new_valid = torch.ones(batch, new, dtype=torch.bool, device=device)
        else:
            if mask2d.shape[1] != past + q:
                raise ValueError(f"attention_mask has {mask2d.shape[1]} columns; the cache holds {past} tokens "
                                 f"and {q} are new")
            new_valid = mask2d[:, prefill.seq_len:].bool()
        positions = state.adapter.step_positions(state.model, kwargs, batch, past, q, device)
        state.step = {"prefill": False, "past": past, "q": q, "new_valid": new_valid, "positions": positions,
                      "per_cut": {}, "hidden": hidden}
        return None

    return hook


def _layer_pre_hook(state: PioState, layer_idx: int) -> Callable:
    stage_of = {layer: s for s, layer in enumerate(state.config.layers)}

    def hook(module, args, kwargs):
        if state.in_probe or state.step is None or state.prefill is None:
            return None
        prefill = state.prefill
        hidden = args[0] if args else kwargs["hidden_states"]
        if state.step["prefill"]:
            if layer_idx in stage_of:
                hidden = _run_stage(state, module, stage_of[layer_idx], hidden, kwargs)
            cut = prefill.cuts[-1]
            if cut.identity:
                return None
            return _replace(args, kwargs, hidden, cut.mask, cut.embeddings,
                            state.adapter.layer_position_ids(cut.positions), past=0)
        cut = _cut_for_layer(prefill, layer_idx)
        if cut.identity:
            return None
        step = state.step
        past = cut.valid.shape[1] + step["past"] - prefill.seq_len
        cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        if cache is not None and _cache_length(cache, layer_idx) != past:
            raise RuntimeError(f"pio: the KV cache of layer {layer_idx} holds {_cache_length(cache, layer_idx)} "
                               f"tokens, expected {past}; was it filled by the last prefill of this model?")
        key = id(cut)
        if key not in step["per_cut"]:
            positions = state.adapter.decode_positions(step["positions"], cut.shift)
            embeddings = state.adapter.position_embeddings(state.model, step["hidden"], positions)
            kv_valid = torch.cat([cut.valid, step["new_valid"]], dim=1)
            mask = build_attention_mask(prefill.mask_kind, kv_valid, step["q"], hidden.dtype)
            step["per_cut"][key] = (mask, embeddings, state.adapter.layer_position_ids(positions))
        mask, embeddings, position_ids = step["per_cut"][key]
        return _replace(args, kwargs, hidden, mask, embeddings, position_ids, past=past)

    return hook


def _cut_for_layer(prefill: _Prefill, layer_idx: int) -> _Cut:
    cut = prefill.cuts[0]
    for c in prefill.cuts:
        if c.layer <= layer_idx:
            cut = c
    return cut


def _replace(args, kwargs, hidden, mask, embeddings, position_ids, past: int):
    kwargs = dict(kwargs)
    if args:
        args = (hidden,) + tuple(args[1:])
    else:
        kwargs["hidden_states"] = hidden
    kwargs["attention_mask"] = mask
    kwargs["position_embeddings"] = embeddings
    if "position_ids" in kwargs:
        kwargs["position_ids"] = position_ids
    if kwargs.get("cache_position") is not None:  # transformers versions that still pass it
        kwargs["cache_position"] = torch.arange(past, past + hidden.shape[1], device=hidden.device)
    return args, kwargs


# ----------------------------------------------------------------------------------------------
# Selection at a stage (SPEC sections 1-3)
# ----------------------------------------------------------------------------------------------
def _run_stage(state: PioState, layer: nn.Module, stage: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Selects the kept rows before ``layer`` and appends the new cut; returns the gathered hidden states."""
    prefill = state.prefill
    config = state.config
    prev = prefill.cuts[-1]
    if prev.embeddings is None:  # the prompt: the model's own (cos, sin)
        prev.embeddings = kwargs["position_embeddings"]
        prev.mask = kwargs.get("attention_mask")
    lm = state.adapter.language_model(state.model)
    batch = hidden.shape[0]
    image_ids = torch.where(prev.index >= 0, prefill.image_map.gather(1, prev.index.clamp_min(0)),
                            torch.full_like(prev.index, -1))
    image_ids = torch.where(prev.valid, image_ids, torch.full_like(image_ids, -1))
    mask2d = None if bool(prev.valid.all()) else prev.valid.long()
    state.in_probe = True  # the reference probe calls ``layer`` itself: its hook must stand aside
    try:
        scores = pio_kernels.proxy_saliency(layer, lm.norm, state.adapter.lm_head(state.model), hidden,
                                            prev.embeddings, attention_mask=mask2d,
                                            num_positions=config.num_positions)
    finally:
        state.in_probe = False
    keep = prev.valid & (image_ids < 0)
    _select_images(hidden, scores, image_ids, config.keep[stage], config.tau, keep)
    dropped = prev.valid & ~keep
    if not bool(dropped.any()):
        cut = _Cut(layer=config.layers[stage], index=prev.index, valid=prev.valid, positions=prev.positions,
                   shift=prev.shift, identity=prev.identity, embeddings=prev.embeddings, mask=prev.mask)
        prefill.cuts.append(cut)
        prefill.selection.append(_visual_rows(prefill, cut))
        return hidden
    src, valid = _compact(keep)
    dropped_before = (dropped.long().cumsum(1) - dropped.long()).gather(1, src)
    positions = state.adapter.positions_after_stage(prev.positions.expand(batch, -1)
                                                    if prev.positions.dim() == 2 else prev.positions,
                                                    src, dropped_before, valid)
    hidden = hidden.gather(1, src[..., None].expand(-1, -1, hidden.shape[-1]))
    index = torch.where(valid, prev.index.gather(1, src), torch.full_like(src, -1))
    embeddings = state.adapter.position_embeddings(state.model, hidden, positions)
    mask = build_attention_mask(prefill.mask_kind, valid, valid.shape[1], hidden.dtype)
    cut = _Cut(layer=config.layers[stage], index=index, valid=valid, positions=positions,
               shift=prev.shift + dropped.sum(1), identity=False, embeddings=embeddings, mask=mask)
    prefill.cuts.append(cut)
    prefill.selection.append(_visual_rows(prefill, cut))
    return hidden


def _select_images(hidden: torch.Tensor, scores: torch.Tensor, image_ids: torch.Tensor, keep_spec, tau: float,
                   keep: torch.Tensor) -> None:
    """Marks in ``keep`` (B, S) the rows ``select_tokens`` keeps, per image, one call per budget."""
    rows_of: dict[int, list[tuple[int, torch.Tensor]]] = {}
    ids = image_ids.cpu()
    for b in range(ids.shape[0]):
        for image in torch.unique(ids[b]).tolist():
            if image < 0:
                continue
            rows = (ids[b] == image).nonzero().flatten().to(hidden.device)
            budget = resolve_budget(keep_spec, rows.numel())
            rows_of.setdefault(budget, []).append((b, rows))
    for budget, group in rows_of.items():
        n_max = max(rows.numel() for _, rows in group)
        feats = hidden.new_zeros(len(group), n_max, hidden.shape[-1])
        sc = scores.new_zeros(len(group), n_max)
        lengths = torch.zeros(len(group), dtype=torch.long)
        for g, (b, rows) in enumerate(group):
            feats[g, :rows.numel()] = hidden[b, rows]
            sc[g, :rows.numel()] = scores[b, rows]
            lengths[g] = rows.numel()
        picked = pio_kernels.select_tokens(feats, sc, budget, tau, lengths.to(hidden.device))
        for g, (b, rows) in enumerate(group):
            local = picked[g][picked[g] >= 0]
            keep[b, rows[local]] = True


def _compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to gather (B, S') for the kept rows of every sample, ascending, and their validity.

    Samples with fewer rows are padded on the left (so the last prompt token stays last);
    padding rows point at row 0 and are invalid."""
    counts = keep.sum(1)
    width = int(counts.max())
    batch = keep.shape[0]
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # kept rows first
    slot = torch.arange(width, device=keep.device).expand(batch, width)
    pad = (width - counts)[:, None]
    valid = slot >= pad
    src = torch.where(valid, order.gather(1, (slot - pad).clamp_min(0)), torch.zeros_like(slot))
    return src, valid


def _ascending_padded(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(B, k) the ``values`` (B, S) where ``present``, ascending per row, -1 padded; k the widest row."""
    width = int(present.sum(1).max()) if values.numel() else 0
    sentinel = torch.iinfo(torch.long).max
    ordered = torch.sort(torch.where(present, values, torch.full_like(values, sentinel)), dim=1).values[:, :width]
    return torch.where(ordered == sentinel, torch.full_like(ordered, -1), ordered)


def _visual_rows(prefill: _Prefill, cut: _Cut) -> torch.Tensor:
    """(B, k) caller positions of the visual rows present in ``cut``, ascending, -1 padded."""
    rows = cut.index.clamp_min(0)
    is_visual = cut.valid & (cut.index >= 0) & (prefill.image_map.gather(1, rows) >= 0)
    return _ascending_padded(prefill.caller_index.gather(1, rows), is_visual)


def _encoder_stage(state: PioState, kwargs: dict) -> dict:
    """Encoder-side selection (SPEC 4) in a prefill: reduce the image features, shrink the call.

    The adapter reduces and merges the features per image; this function drops the matching
    placeholder rows from ``input_ids`` (and the mask, positions, ``inputs_embeds`` and the
    adapter's own per-row keys), left-padding samples that end up shorter, and records how
    the language model's rows map back onto the caller's.
    """
    model, adapter, config = state.model, state.adapter, state.config
    input_ids = kwargs.get("input_ids")
    precomputed = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    has_pixels = any(kwargs.get(k) is not None for k in adapter.pixel_keys)
    if not has_pixels and precomputed is None:
        return kwargs
    if input_ids is None:
        raise ValueError("encoder_keep needs input_ids to find the image placeholders")
    if precomputed is not None:  # generate encoded the images through the patched function
        kept, counts = state.encoder_kept, state.encoder_counts
        if kept is None or [int(f.shape[0]) for f in adapter.features_of(precomputed)] != [k.numel() for k in kept]:
            raise ValueError("mm_encoder_outputs were not produced by this pio-enabled model")
    else:
        named = {k: v for k, v in kwargs.items() if k in adapter.image_feature_keys}
        out, kept, counts = adapter.reduce_encoder_features(model, named, config.encoder_keep, config.tau)
        state.encoder_features = out
    state.encoder_kept = state.encoder_counts = None
    call = dict(kwargs, _image_token_counts=counts)
    image_map = adapter.image_map(model, call, {}, input_ids.shape[1])
    batch, seq = input_ids.shape
    device = input_ids.device
    reduced = (image_map >= 0) & (image_map < len(counts))  # ids past them (Qwen video frames) stay whole
    keep = ~reduced
    mask2d = kwargs.get("attention_mask")
    valid = torch.ones(batch, seq, dtype=torch.bool, device=device) if mask2d is None else mask2d.bool()
    keep &= valid
    is_img = reduced.flatten()
    if bool(is_img.any()):
        # The placeholders take the images' tokens in row-major order, one image after another.
        kept_flat = torch.zeros(sum(counts), dtype=torch.bool, device=device)
        offset = 0
        for count, k in zip(counts, kept):
            kept_flat[offset + k.to(device)] = True
            offset += count
        keep.view(-1)[is_img] = kept_flat
    src, new_valid = _compact(keep)
    dropped = valid & ~keep
    dropped_before = (dropped.long().cumsum(1) - dropped.long()).gather(1, src)
    new = dict(kwargs)
    new["input_ids"] = torch.where(new_valid, input_ids.gather(1, src), torch.zeros_like(src))
    new["attention_mask"] = new_valid.to(mask2d.dtype if mask2d is not None else torch.long)
    if mask2d is None and bool(new_valid.all()):
        new["attention_mask"] = None
    new["position_ids"] = adapter.encoder_positions(model, kwargs, src, dropped_before, new_valid)
    if kwargs.get("inputs_embeds") is not None:
        emb = kwargs["inputs_embeds"]
        new["inputs_embeds"] = emb.gather(1, src[..., None].expand(-1, -1, emb.shape[-1]))
    new.update(adapter.shrink_call(model, kwargs, src))
    caller_index = torch.where(new_valid, src, torch.zeros_like(src))
    is_visual = new_valid & (image_map.gather(1, src) >= 0)
    selection = _ascending_padded(src, is_visual)
    new["_caller_index"] = caller_index
    new["_caller_len"] = seq
    new["_encoder_selection"] = selection
    state.encoder = {"valid": new_valid, "shift": dropped.sum(1), "caller_len": seq, "lm_len": src.shape[1]}
    return new


def _encoder_decode_step(state: PioState, kwargs: dict, past: int) -> dict:
    """Maps a decoding step's caller mask and positions onto the encoder-reduced rows."""
    enc = state.encoder
    kwargs = dict(kwargs)
    ref = kwargs.get("input_ids")
    if ref is None:
        ref = kwargs["inputs_embeds"]
    batch, q = ref.shape[:2]
    caller_past = past - enc["lm_len"] + enc["caller_len"]
    mask2d = kwargs.get("attention_mask")
    if mask2d is not None and (mask2d.dim() != 2 or mask2d.shape[1] != caller_past + q):
        raise ValueError(f"attention_mask must be (B, {caller_past + q}) in this decoding step, "
                         f"got {tuple(mask2d.shape)}")
    kwargs["position_ids"] = state.adapter.encoder_step_positions(state.model, kwargs, caller_past, q, enc["shift"])
    if mask2d is not None:
        kwargs["attention_mask"] = torch.cat([enc["valid"].to(mask2d.dtype), mask2d[:, enc["caller_len"]:]], dim=1)
    return kwargs


# ----------------------------------------------------------------------------------------------
# Encoder-side rules shared by the adapters (SPEC section 4)
# ----------------------------------------------------------------------------------------------
def split_local_global(shallow: torch.Tensor, deep: torch.Tensor, grid: tuple[int, int], budget: int,
                       window: tuple[int, int], available: torch.Tensor | None = None) -> torch.Tensor:
    """Kept token indices of one image (or crop): half local, half global (SPEC 4).

    Args:
        shallow: (N,) attention map at the shallow layer, N = grid_h * grid_w, row-major.
        deep: (N,) attention map at the deep layer.
        grid: (grid_h, grid_w) token grid.
        budget: tokens kept, 1 <= budget <= number of available tokens.
        window: (win_h, win_w) window size; edge windows may be smaller.
        available: (N,) bool, tokens that may be kept (default all), e.g. those left by
            LLaVA-NeXT's unpadding; windows without one do not count.

    The local half takes the top ``(budget // 2) // n_windows`` tokens of every window by
    ``shallow``; the rest of the budget goes to the top tokens by ``deep`` among the others.
    Ties go to the lower index. Returns (budget,) int64, ascending, on the input's device.
    """
    grid_h, grid_w = grid
    n = grid_h * grid_w
    device = shallow.device
    if shallow.shape != (n,) or deep.shape != (n,):
        raise ValueError(f"attention maps must be ({n},) for a {grid_h}x{grid_w} grid, "
                         f"got {tuple(shallow.shape)} and {tuple(deep.shape)}")
    if available is None:
        available = torch.ones(n, dtype=torch.bool, device=device)
    n_available = int(available.sum())
    if not 1 <= budget <= n_available:
        raise ValueError(f"budget must lie in [1, {n_available}], got {budget}")
    win_h, win_w = window
    rows = torch.arange(n, device=device) // grid_w
    cols = torch.arange(n, device=device) % grid_w
    window_id = (rows // win_h) * (-(-grid_w // win_w)) + cols // win_w
    n_windows = int(torch.unique(window_id[available]).numel())
    per_window = (budget // 2) // n_windows
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    if per_window:
        order = torch.sort(shallow.float(), descending=True, stable=True).indices.tolist()
        seen: dict[int, int] = {}
        for i in order:  # the first per_window available tokens of each window, in shallow order
            if not available[i]:
                continue
            w = int(window_id[i])
            if seen.get(w, 0) < per_window:
                chosen[i] = True
                seen[w] = seen.get(w, 0) + 1
    rest = budget - int(chosen.sum())
    if rest > 0:
        deep_rest = deep.float().masked_fill(chosen | ~available, float("-inf"))
        order = torch.sort(deep_rest, descending=True, stable=True).indices
        chosen[order[:rest]] = True
    return chosen.nonzero().flatten()


def merge_dropped(features: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Kept features after merging (SPEC 4): every dropped token joins its most cosine-similar
    kept token; a kept token becomes the mean of itself and the tokens merged into it.

    Args: features (N, D) of one image, kept (k,) ascending indices. Returns (k, D) in the
    dtype of ``features`` (computed in fp32; cosine ties go to the lower kept index).
    """
    n = features.shape[0]
    x = features.float()
    is_kept = torch.zeros(n, dtype=torch.bool, device=features.device)
    is_kept[kept] = True
    dropped = (~is_kept).nonzero().flatten()
    sums = x[kept].clone()
    counts = torch.ones(kept.numel(), device=features.device)
    if dropped.numel():
        unit = torch.nn.functional.normalize(x, dim=-1, eps=1e-12)
        target = (unit[dropped] @ unit[kept].T).argmax(dim=1)
        sums.index_add_(0, target, x[dropped])
        counts.index_add_(0, target, torch.ones(dropped.numel(), device=features.device))
    return (sums / counts[:, None]).to(features.dtype)
