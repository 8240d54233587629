"""Install / uninstall, and the hooks that drive one forward pass (DESIGN.md "One forward pass").

``install`` registers hooks on the stock model and keeps their handles; ``uninstall`` removes
them, so the model is the stock one again (no parameter, module or forward is replaced; two
instance attributes wrap ``generate`` and the image-feature function and are deleted). Every
hook is a small object holding the model's :class:`~.state.PioState`, so ``copy.deepcopy`` of
the model copies the state with it.

One forward, as the hooks see it:

1. the top-level model's pre-hook clones ``labels`` (labels of rows predicted by a dropped row
   are ignored, see :func:`_mask_labels`);
2. the multimodal module's pre-hook records its named kwargs (``input_ids``, pixels, ...);
3. ``get_image_features`` (wrapped) records each call, and the adapter's encoder probes (pre-hooks
   in the vision tower) record score maps while it runs;
4. the language model's pre-hook decides what the call is:
   * a **prefill** (empty cache) with images: it opens a :class:`~.state.Prefill`; with
     ``encoder_keep`` it makes the encoder cut and hands the language model the kept rows;
   * a **continuation** of a prefill pio made (decoding steps, a multi-turn continuation: the
     record sits on the cache): it maps the caller's mask and positions onto the rows stored;
   * a **replay**: a call from an empty cache that repeats the last prompt plus new tokens
     (``use_cache=False`` decoding, assisted decoding's first call): the prompt's selection is
     reused (one selection per prompt), every new row is kept;
5. the pre-hooks of decoder layers ``layers[0]`` on run a stage (prefill; a replay gathers the
   rows its prompt kept), or hand each layer the mask and positions of the rows its cache holds;
6. the language model's forward hook scatters the last hidden state back onto the caller's
   rows (rows of dropped tokens are NaN), writes the record onto the cache, and makes the cache
   report lengths in the caller's numbering (:func:`~..hf.report_caller_lengths`).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from .. import hf
from . import encoder as encoder_side
from .adapter import Adapter
from .masks import all_valid, build_attention_mask
from .stage import cut_inputs, extend_prefill, gather_rows, run_stage, step_inputs
from .state import Cut, PioState, Prefill, Step, VisionRun, time_mark

__all__ = ["install", "uninstall"]

_RECORD = "_pio_prefill"  # attribute of a cache that pio filled: its Prefill


def install(model: nn.Module, adapter: Adapter, config) -> PioState:
    state = PioState(model, adapter, config)
    mm = adapter.multimodal_module(model)
    lm = adapter.language_model(model)
    hooks = [(model, _TopHook(state), True), (mm, _CallHook(state), False), (lm, _LanguageModelHook(state), True)]
    for module, hook, post in hooks:
        state.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        if post:
            state.handles.append(module.register_forward_hook(hook.post, with_kwargs=True))
    for idx in range(config.layers[0], len(lm.layers)):
        state.handles.append(lm.layers[idx].register_forward_pre_hook(_LayerHook(state, idx), with_kwargs=True))
    owner = hf.image_feature_owner(model)
    _patch(state, owner, "get_image_features", _ImageFeatures(state, owner.get_image_features))
    _patch(state, model, "generate", _Generate(state, model.generate))
    if config.encoder_keep is not None:
        for key, module in adapter.encoder_probes(model).items():
            state.handles.append(module.register_forward_pre_hook(_ProbeHook(state, key), with_kwargs=True))
    state.handles.extend(adapter.extra_hooks(model, state))
    model._pio = state
    return state


def uninstall(model: nn.Module) -> None:
    state: PioState | None = getattr(model, "_pio", None)
    if state is None:
        raise ValueError("pio is not applied to this model")
    for handle in state.handles:
        handle.remove()
    for owner, name in state.patched:
        if name in vars(owner):
            delattr(owner, name)
    del model._pio


def _patch(state: PioState, owner: Any, name: str, replacement: Any) -> None:
    setattr(owner, name, replacement)  # an instance attribute, deleted by uninstall
    state.patched.append((owner, name))


class _Hook:
    def __init__(self, state: PioState) -> None:
        self.state = state


# ----------------------------------------------------------------------------------------------
# generate and the image-feature function
# ----------------------------------------------------------------------------------------------
class _Generate(_Hook):
    """``model.generate`` with a check, before any compute, of the modes pio cannot serve."""

    def __init__(self, state: PioState, original) -> None:
        super().__init__(state)
        self.original = original
        functools.update_wrapper(self, original)

    def __call__(self, *args, **kwargs):
        modes = hf.generation_modes(self.state.model, args, kwargs)
        if modes["prefill_chunk_size"]:
            raise NotImplementedError("pio does not support generate with prefill_chunk_size: a chunked prefill "
                                      "would select in its first chunk only; generate without it")
        prompt = kwargs.get("input_ids", args[0] if args else None)
        if prompt is None:
            prompt = kwargs.get("inputs_embeds")
        outer, self.state.prompt_len = self.state.prompt_len, None if prompt is None else int(prompt.shape[1])
        try:
            return self.original(*args, **kwargs)
        finally:
            self.state.prompt_len = outer


class _ImageFeatures(_Hook):
    """The model's ``get_image_features``, recording each call for the encoder side and the
    image sizes (the stock function runs unchanged)."""

    def __init__(self, state: PioState, original) -> None:
        super().__init__(state)
        self.original = original
        functools.update_wrapper(self, original)  # keeps the signature: generate inspects it
        self.signature = inspect.signature(original)

    def __call__(self, *args, **kwargs):
        state = self.state
        named = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        named.update(named.pop("kwargs", {}))
        run = VisionRun(kwargs=named)
        outer, state.run = state.run, run
        try:
            out = self.original(*args, **kwargs)
        finally:
            state.run = outer
        run.output = out
        state.runs.append(run)
        return out


class _ProbeHook(_Hook):
    def __init__(self, state: PioState, key: str) -> None:
        super().__init__(state)
        self.key = key

    def __call__(self, module, args, kwargs):
        state = self.state
        run = state.run
        if run is None:
            return None
        timed = not torch.compiler.is_compiling()  # traced with the tower: a clock read would break the graph
        device = next(iter(module.parameters())).device
        start = time_mark(device) if timed else None
        with torch.no_grad():
            run.maps[self.key] = state.adapter.encoder_probe(state.model, self.key, module, args, kwargs)
        if timed:
            run.time_marks.append((start, time_mark(device)))
        return None


# ----------------------------------------------------------------------------------------------
# The top-level model and the multimodal module
# ----------------------------------------------------------------------------------------------
class _TopHook(_Hook):
    """Clones the caller's ``labels`` so the language model's hook can ignore the rows whose
    predicting row was dropped; the caller's tensor is never written."""

    def __call__(self, module, args, kwargs):
        if hf.router_logits_requested(module, kwargs) and not self.state.config.keeps_everything():
            raise NotImplementedError(
                "pio with a pruning schedule does not support output_router_logits=True: the layers after a "
                "stage route fewer rows than the prompt has, which the model's load-balancing loss cannot "
                "take; call without it (or with a full budget: keep=[1.0, ...], encoder_keep None or 1.0)")
        labels = kwargs.get("labels")
        if labels is None:
            return None
        kwargs = dict(kwargs)
        kwargs["labels"] = self.state.labels = labels.clone()
        return args, kwargs

    def post(self, module, args, kwargs, output):
        self.state.labels = None
        return None


class _CallHook(_Hook):
    """Records the multimodal module's named kwargs: the adapter finds the images there."""

    def __call__(self, module, args, kwargs):
        if args:  # e.g. LLaVA-NeXT passes input_ids positionally: name every argument
            named = dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
            named.update(named.pop("kwargs", {}))
        else:
            named = dict(kwargs)
        self.state.call = named
        return None


# ----------------------------------------------------------------------------------------------
# The language model
# ----------------------------------------------------------------------------------------------
class _LanguageModelHook(_Hook):
    def __call__(self, module, args, kwargs):
        state = self.state
        call, state.call = state.call, None
        runs, state.runs = state.runs, []
        state.pending = state.step = None
        hidden = kwargs.get("inputs_embeds")
        if hidden is None:  # called with input_ids: not from the multimodal forward, no images
            return None
        cache = hf.get_cache(kwargs)
        if hf.stored_length(cache, 0) == 0:
            return self._prefill(module, kwargs, hidden, cache, call, runs)
        return self._continuation(kwargs, hidden, cache, call, runs)

    # a new prompt -------------------------------------------------------------------------
    @torch.compiler.disable  # data-dependent selection: one graph break, not one per host read
    def _prefill(self, module, kwargs, hidden, cache, call, runs):
        state, adapter, model = self.state, self.state.adapter, self.state.model
        if call is None:
            return None
        image_map = adapter.image_map(model, call, runs, kwargs)
        if image_map is None or not bool((image_map >= 0).any()):
            return None  # no image: the stock model runs untouched
        batch, q = hidden.shape[:2]
        device = hidden.device
        mask = kwargs.get("attention_mask")
        valid, standard = hf.key_validity(mask, batch, q, q, device)
        if not standard:
            raise NotImplementedError("pio supports the standard causal padding mask only (a 2-D mask, None, or the "
                                      "4-D mask transformers builds from them); got a custom 4-D attention_mask")
        last = state.prefill
        if last is not None and self._repeats(last, hidden, valid):
            return self._replay(kwargs, hidden, cache, last, valid, mask)
        kind = hf.mask_kind(hf.attention_implementation(module.config))
        prefill = Prefill(seq_len=q, image_map=image_map.to(device), prompt_valid=valid, mask_kind=kind,
                          static_len=hf.max_cache_length(cache))
        if state.prompt_len is not None and q > state.prompt_len:  # assisted decoding: prompt + candidates
            prefill.prompt_len = state.prompt_len
        positions = adapter.prompt_positions(model, kwargs, batch, q, device)
        index = torch.arange(q, device=device).expand(batch, q)
        prefill.cuts.append(Cut(layer=0, index=index, valid=valid, positions=positions,
                                shift=torch.zeros(batch, dtype=torch.long, device=device)))
        prefill.fingerprint = _fingerprint(hidden)
        state.pending = prefill
        if state.config.encoder_keep is None:
            return None
        slot = prefill.stats.start("encoder", device)
        for run in runs:
            for mark in run.time_marks:
                prefill.stats.add(slot, mark)
        with torch.profiler.record_function("pio::encoder"):
            made = encoder_side.encoder_cut(state, prefill, call, hidden, runs)
        prefill.stats.stop(slot, device)
        prefill.encoder_ran = True
        if made is None:
            return None
        cut, rows = made
        prefill.cuts[0] = cut
        prefill.encoder_embeds = rows
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = rows
        kwargs["attention_mask"] = _lm_mask(prefill, mask, cut.valid, cut.width, rows.dtype)
        kwargs["position_ids"] = adapter.lm_position_ids(cut.positions)
        return (), kwargs

    @staticmethod
    def _repeats(last: Prefill, hidden: torch.Tensor, valid: torch.Tensor) -> bool:
        """Whether this call from an empty cache is the last prompt plus new tokens (same padding,
        same rows up to rounding: the image features may come from another batch of images)."""
        s0 = last.seq_len
        if hidden.shape[0] != last.image_map.shape[0] or hidden.shape[1] <= s0 or last.fingerprint is None:
            return False
        if not torch.equal(valid[:, :s0], last.prompt_valid):
            return False
        # The same rows, up to the rounding of computing the image features in another batch.
        now, then = _fingerprint(hidden[:, :s0]).float(), last.fingerprint.float()
        scale = then.abs().amax().clamp_min(1e-30)
        return bool(((now - then).abs() <= 1e-4 * scale + 1e-4 * then.abs()).all())

    def _replay(self, kwargs, hidden, cache, last: Prefill, valid, mask):
        """An uncached call that repeats the last prompt: the prompt's selection again, new rows kept."""
        state, adapter = self.state, self.state.adapter
        batch, q = hidden.shape[:2]
        s0 = last.seq_len
        positions = adapter.step_positions(state.model, _sliced_positions(kwargs, q - s0), batch, s0, q - s0,
                                           hidden.device)
        prefill = extend_prefill(state, last, valid, positions, hf.max_cache_length(cache))
        prefill.fingerprint = _fingerprint(hidden)
        state.pending = prefill
        if last.encoder_embeds is None:
            return None
        cut0 = prefill.cuts[0]
        prefill.encoder_embeds = torch.cat([last.encoder_embeds, hidden[:, s0:]], dim=1)
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = prefill.encoder_embeds
        kwargs["attention_mask"] = _lm_mask(prefill, mask, cut0.valid, cut0.width, hidden.dtype)
        kwargs["position_ids"] = adapter.lm_position_ids(cut0.positions)
        return (), kwargs

    # a continuation of a cache pio filled ---------------------------------------------------
    def _continuation(self, kwargs, hidden, cache, call, runs):
        state, adapter = self.state, self.state.adapter
        prefill: Prefill | None = cache.__dict__.get(_RECORD)
        if prefill is None:
            if call is not None and _has_images(call, runs):
                raise NotImplementedError("pio selects visual tokens in a prefill that starts from an empty cache; "
                                          "this call continues a cache pio did not fill and holds image tokens")
            return None
        batch, q = hidden.shape[:2]
        device = hidden.device
        past = int(cache.get_seq_length())  # the caller's numbering (the cache reports it)
        mask = kwargs.get("attention_mask")
        valid, standard = hf.key_validity(mask, batch, q, past + q, device)
        if not standard:
            raise NotImplementedError("pio supports the standard causal padding mask only; got a custom 4-D "
                                      "attention_mask in a decoding step")
        positions = adapter.step_positions(state.model, kwargs, batch, past, q, device)
        step = Step(prefill=prefill, past=past, q=q, new_valid=valid[:, prefill.seq_len:], positions=positions,
                    hidden=hidden)
        state.step = step
        cut0 = prefill.cuts[0]
        if prefill.encoder_embeds is None:
            return None
        _check_stored(cache, 0, cut0, step)
        kv_valid = torch.cat([cut0.valid, step.new_valid], dim=1)
        kwargs = dict(kwargs)
        # The model's own mask would place the new rows after the length the cache reports (the
        # caller's numbering); the rows cached are fewer, so the layers get the mask built here.
        built = build_attention_mask(prefill.mask_kind, kv_valid, q, hidden.dtype, prefill.static_len)
        kwargs["attention_mask"] = built if mask is None else hf.layer_mask_like(mask, built)
        kwargs["position_ids"] = adapter.lm_position_ids(adapter.decode_positions(positions, cut0.shift))
        return (), kwargs

    # after the language model -----------------------------------------------------------------
    def post(self, module, args, kwargs, output):
        state = self.state
        prefill = state.pending
        state.pending = state.step = None
        if prefill is not None:
            return self._end_prefill(prefill, kwargs, output)
        return None

    @torch.compiler.disable
    def _end_prefill(self, prefill: Prefill, kwargs, output):
        """Records the prefill on its cache (which then reports the caller's numbering) and
        returns the output on the caller's rows."""
        state = self.state
        for cut in prefill.cuts:  # prefill-only inputs (masks can be (B, 1, S, S)): decoding builds its own
            cut.mask = cut.embeddings = None
        if not prefill.decided:  # a replay leaves the prompt's own record as the last prefill
            state.prefill = prefill
        cache = _output_cache(output, kwargs)
        if cache is not None:
            cache.__dict__[_RECORD] = prefill
            layers = len(state.adapter.language_model(state.model).layers)
            hf.report_caller_lengths(cache, [prefill.seq_len - prefill.cut_for_layer(i).width
                                             for i in range(layers)])
        return self._scatter(output, prefill, prefill.cuts[-1].index, prefill.seq_len)

    def _scatter(self, output, prefill: Prefill, index: torch.Tensor, length: int):
        """Puts the last hidden state back onto the caller's ``length`` rows (NaN where dropped)."""
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        if hidden.shape[1] == length and not any(c.replaces for c in prefill.cuts) \
                and prefill.encoder_embeds is None:
            return None
        batch, _, dim = hidden.shape
        present = torch.zeros(batch, length + 1, dtype=torch.bool, device=hidden.device)
        target = torch.where(index >= 0, index, torch.full_like(index, length))
        present.scatter_(1, target, True)
        full = hidden.new_full((batch, length + 1, dim), float("nan"))
        full.scatter_(1, target[..., None].expand(-1, -1, dim), hidden)
        full, present = full[:, :length], present[:, :length]
        caller_valid = prefill.prompt_valid
        full = torch.where(~present[..., None] & ~caller_valid[..., None], torch.zeros_like(full), full)
        _mask_labels(self.state.labels, present | ~caller_valid)
        if hasattr(output, "last_hidden_state"):
            output.last_hidden_state = full
            return output
        return (full,) + tuple(output[1:])


def _mask_labels(labels: torch.Tensor | None, present: torch.Tensor) -> None:
    """Ignores (-100) every label whose predicting row (the row before it) was dropped."""
    if labels is None or labels.shape != present.shape:
        return
    labels[:, 1:].masked_fill_(~present[:, :-1], -100)


def _has_images(call: dict, runs: list) -> bool:
    """Whether image features enter this call (computed in it, or handed over by generate)."""
    return bool(runs) or hf.precomputed_image_features(call) is not None


def _fingerprint(hidden: torch.Tensor) -> torch.Tensor:
    """(B, S) a fixed random projection of the rows: rows that differ give different values, rows
    equal up to rounding give values equal up to rounding."""
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)
    direction = torch.randn(hidden.shape[-1], generator=gen).to(hidden.device, hidden.dtype)
    return hidden.contiguous() @ direction


def _sliced_positions(kwargs: dict, q: int) -> dict:
    positions = kwargs.get("position_ids")
    if positions is None:
        return kwargs
    return dict(kwargs, position_ids=positions[..., -q:])


def _output_cache(output, kwargs):
    cache = hf.output_cache(output)
    return cache if cache is not None else hf.get_cache(kwargs)


def _check_stored(cache, layer_idx: int, cut: Cut, step: Step) -> None:
    expected = cut.width + step.past - step.prefill.seq_len
    stored = hf.stored_length(cache, layer_idx)
    if stored != expected:
        raise RuntimeError(f"pio: the KV cache of layer {layer_idx} holds {stored} tokens, expected {expected}; "
                           "was it filled by a prefill of this model, and left as generate left it?")


def _lm_mask(prefill: Prefill, template, kv_valid: torch.Tensor, q: int, dtype: torch.dtype):
    """The mask handed to the language model for the rows of ``cuts[0]``: a 2-D padding mask
    where the caller gave one (the model builds its own), else the layers' 4-D mask."""
    if template is None or (not isinstance(template, dict) and template.dim() == 2):
        if prefill.static_len is None and all_valid(kv_valid):
            return None
        return kv_valid.long()
    return hf.layer_mask_like(template, build_attention_mask(prefill.mask_kind, kv_valid, q, dtype,
                                                             prefill.static_len))


# ----------------------------------------------------------------------------------------------
# Decoder layers
# ----------------------------------------------------------------------------------------------
class _LayerHook(_Hook):
    def __init__(self, state: PioState, layer_idx: int) -> None:
        super().__init__(state)
        self.layer_idx = layer_idx
        self.stage = state.config.layers.index(layer_idx) if layer_idx in state.config.layers else None

    def __call__(self, module, args, kwargs):
        state = self.state
        if state.in_probe:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        prefill = state.pending
        if prefill is not None:
            gathered = self.stage is not None
            if gathered and prefill.decided:
                hidden = gather_rows(hidden, prefill.cuts[self.stage + 1].src)
            elif gathered:
                hidden = run_stage(state, prefill, module, self.stage, hidden, kwargs)
            cut = prefill.cut_for_layer(self.layer_idx)
            if not cut.replaces:
                return _replace(args, kwargs, hidden, None, None, None, keep=True) if gathered else None
            cut_inputs(state, prefill, cut, hidden)
            return _replace(args, kwargs, hidden, cut.mask, cut.embeddings,
                            state.adapter.layer_position_ids(cut.positions))
        step = state.step
        if step is None:
            return None
        cut = step.prefill.cut_for_layer(self.layer_idx)
        if not cut.replaces:
            return None
        _check_stored(hf.get_cache(kwargs), self.layer_idx, cut, step)
        mask, embeddings, position_ids = step_inputs(state, step, cut, hidden.dtype)
        return _replace(args, kwargs, hidden, mask, embeddings, position_ids)


def _replace(args, kwargs, hidden, mask, embeddings, position_ids, keep: bool = False):
    kwargs = dict(kwargs)
    if args:
        args = (hidden,) + tuple(args[1:])
    else:
        kwargs["hidden_states"] = hidden
    if keep:
        return args, kwargs
    kwargs["attention_mask"] = mask
    kwargs["position_embeddings"] = embeddings
    if "position_ids" in kwargs:
        kwargs["position_ids"] = position_ids
    return args, kwargs
