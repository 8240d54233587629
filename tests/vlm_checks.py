"""The exactness checks of the integrations of Qwen2-VL, Qwen3-VL and LLaVA-OneVision, and the
from-scratch reference they compare with (SPEC sections 1-5).

The reference (:func:`reduced_lm`) recomputes the reduced language model one unpadded sample at
a time, with no cache, from the stock modules only: the rows entering layer 0 (after the
encoder side, when on), a causal mask, the family's positions (M-RoPE ids kept by every stage,
or 1-D positions renumbered over the rows present), DeepStack features added after the first
layers, and at every stage the kept visual rows: chosen by ``pio_kernels.reference`` (proxy
saliency and NMS per image), or taken from ``last_selection`` when a test checks decoding.

A family (:class:`Family`) tells the checks how to build its model and inputs and how its
stock model lays out the rows of each sample (:class:`Rows`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from pio_kernels import reference
from pio_kernels.integrations import PRESETS, PioConfig, apply_pio, hf, last_selection, last_stats, remove_pio
from pio_kernels.integrations.engine import resolve_budget


@dataclass
class Rows:
    """One sample as its language model sees it (unpadded)."""

    x: torch.Tensor                   # (n, D) rows entering layer 0
    caller: torch.Tensor              # (n,) row of each in the caller's numbering
    ids: torch.Tensor                 # (n,) image (or frame) id of each visual row, -1 for text
    positions: torch.Tensor | None    # (3, n) M-RoPE ids, or None: 1-D, renumbered at every layer
    additions: list = field(default_factory=list)  # per DeepStack level, (n, D) on the visual rows
    prompt_len: int | None = None     # rows of the prompt (new tokens follow)


@dataclass
class Family:
    """What the checks need to know about a model family."""

    make_model: Callable              # (attn=..., dtype=...) -> a stock model
    make_inputs: Callable             # (samples, padding_side=..., seed=...) -> model inputs
    single: Callable                  # (inputs, samples, b) -> the inputs of sample b alone, unpadded
    rows: Callable                    # (model, inputs, new_tokens, encoder_keep) -> [Rows] per sample


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def selection_lists(model) -> list[list[list[int]]]:
    """Per stage, per sample: the kept visual rows (caller numbering)."""
    return [[[int(v) for v in row if v >= 0] for row in stage] for stage in last_selection(model)]


@contextlib.contextmanager
def pio(model, config: PioConfig):
    apply_pio(model, config)
    try:
        yield model
    finally:
        remove_pio(model)


def capture_lm_call(model, inputs) -> dict:
    """The keyword arguments the stock model hands its language model for ``inputs``."""
    captured = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
    try:
        logits(model, inputs)
    finally:
        handle.remove()
    return captured


def merge_literal(features: torch.Tensor, kept: list[int]) -> tuple[torch.Tensor, list[int]]:
    """SPEC 4 merging of one span, literally: ``(merged kept rows, target)``; ``target[i]``: the slot
    in ``kept`` that row ``i`` joins (the most cosine-similar kept row, the lowest on ties)."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    target = [kept.index(i) if i in kept else int((unit[kept] @ unit[i]).argmax()) for i in range(len(features))]
    return merge_by(features, target, len(kept)), target


def merge_by(values: torch.Tensor, target: list[int], n_kept: int) -> torch.Tensor:
    """(n_kept, E): the mean of the rows of ``values`` that join each kept slot."""
    return torch.stack([values[[i for i, t in enumerate(target) if t == j]].float().mean(0)
                        for j in range(n_kept)]).to(values.dtype)


def _causal(n: int, dtype, device) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]


def _positions(positions: torch.Tensor | None, cur: torch.Tensor) -> torch.Tensor:
    if positions is None:
        return torch.arange(cur.numel(), device=cur.device)[None]
    return positions[:, cur][:, None]


@torch.no_grad()
def reduced_lm(model, rows: Rows, layers: list[int], keep: list | None = None, selection: list | None = None,
               tau: float = 0.8, k: int = 4) -> tuple[dict, list]:
    """Logits of one sample through the reduced language model, from scratch (module docstring).

    ``selection``: per stage, the kept visual caller rows of this sample; without it the stage
    selects by the reference (prompt rows only). Returns ``({caller row: logits (V,)}, per stage
    the sorted kept visual caller rows)``.
    """
    lm, head = model.model.language_model, model.lm_head
    ids, caller = rows.ids, rows.caller
    n = rows.x.shape[0]
    prompt_len = n if rows.prompt_len is None else rows.prompt_len
    if selection is None and prompt_len < n:
        raise ValueError("the reference selects in a prompt only: pass selection with new tokens")
    cur = torch.arange(n, device=rows.x.device)
    h = rows.x[None]
    kept = []
    for li, layer in enumerate(lm.layers):
        if li in layers:
            s = layers.index(li)
            present = ids[cur]
            if selection is None:
                cos, sin = lm.rotary_emb(h, _positions(rows.positions, cur))
                scores = reference.proxy_saliency(layer, lm.norm, head, h, (cos, sin), num_positions=k)[0]
                keep_rows = present < 0
                for image in present.unique().tolist():
                    if image >= 0:
                        r = (present == image).nonzero().flatten()
                        picked = reference.select_tokens(h[:, r], scores[None, r],
                                                         resolve_budget(keep[s], r.numel()), tau)[0]
                        keep_rows[r[picked[picked >= 0]]] = True
            else:
                wanted = set(selection[s])
                keep_rows = torch.tensor([i < 0 or int(caller[c]) in wanted for i, c in
                                          zip(present.tolist(), cur.tolist())], device=cur.device)
            cur, h = cur[keep_rows], h[:, keep_rows]
            kept.append(sorted(int(caller[c]) for c in cur.tolist() if ids[c] >= 0))
        pe = lm.rotary_emb(h, _positions(rows.positions, cur))
        y = layer(h, attention_mask=_causal(cur.numel(), h.dtype, h.device), position_embeddings=pe)
        h = y[0] if isinstance(y, tuple) else y
        if li < len(rows.additions):
            visual = ids[cur] >= 0
            h = h.clone()
            h[0, visual] = h[0, visual] + rows.additions[li][cur[visual]].to(h.dtype)
    out = head(lm.norm(h))[0]
    return {int(caller[c]): out[i] for i, c in enumerate(cur.tolist())}, kept


def reference_batch(model, family: Family, inputs, layers, keep=None, selection=None, new_tokens=None,
                    encoder_keep=None) -> tuple[list[dict], list]:
    """:func:`reduced_lm` for every sample: per sample the logits, per stage per sample the kept rows."""
    out, kept = [], [[] for _ in layers]
    for b, rows in enumerate(family.rows(model, inputs, new_tokens, encoder_keep)):
        sel = None if selection is None else [stage[b] for stage in selection]
        lg, kb = reduced_lm(model, rows, layers, keep, sel)
        out.append(lg)
        for s, r in enumerate(kb):
            kept[s].append(r)
    return out, kept


def assert_rows_close(out: torch.Tensor, ref: list[dict], **tol) -> None:
    for b, rows in enumerate(ref):
        for r, expected in rows.items():
            torch.testing.assert_close(out[b, r].float(), expected.float(), **tol)


def _hooks(model) -> list:
    return [(name, list(m._forward_pre_hooks.values()), list(m._forward_hooks.values()))
            for name, m in model.named_modules()]


# ------------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------------
def check_full_budget_is_stock(model, inputs, encoder: bool) -> None:
    """A full budget gives the stock logits bit for bit; ``remove_pio`` restores the stock model (the
    same hooks, the same logits) after a schedule that drops tokens."""
    stock = logits(model, inputs)
    hooks = _hooks(model)
    configs = [PioConfig(layers=[1, 2], keep=[1.0, 1000])]
    if encoder:
        configs.append(PioConfig(layers=[2], keep=[1.0], encoder_keep=1.0))
    for config in configs:
        with pio(model, config):
            torch.testing.assert_close(logits(model, inputs), stock, rtol=0, atol=0)
    with pio(model, PioConfig(layers=[1], keep=[0.34], encoder_keep=0.5 if encoder else None)):
        reduced = logits(model, inputs)
    assert not torch.equal(reduced.nan_to_num(), stock)
    assert _hooks(model) == hooks and not hasattr(model, "_pio")
    torch.testing.assert_close(logits(model, inputs), stock, rtol=0, atol=0)


def check_prefill_matches_reference(model, family: Family, inputs, layers, keep, encoder_keep=None) -> list:
    """The prefill's selection and logits equal the reference's (which selects by itself)."""
    ref, ref_sel = reference_batch(model, family, inputs, layers, keep, encoder_keep=encoder_keep)
    with pio(model, PioConfig(layers=layers, keep=keep, encoder_keep=encoder_keep)):
        out = logits(model, inputs)
        sel = selection_lists(model)
    assert sel == ref_sel
    assert_rows_close(out, ref, rtol=1e-4, atol=1e-4)
    return sel


def generate(model, inputs, steps: int = 3, **kwargs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


def check_cached_decode_matches_reference(model, family: Family, inputs, layers, keep, encoder_keep=None,
                                          steps: int = 3) -> None:
    """Every cached ``generate`` step equals the reduced model recomputed from scratch, and greedy
    decoding follows the reference's own argmax."""
    seq_len = inputs["input_ids"].shape[1]
    with pio(model, PioConfig(layers=layers, keep=keep, encoder_keep=encoder_keep)):
        seq, lg = generate(model, inputs, steps)
        sel = selection_lists(model)
    new = seq[:, seq_len:]
    ref, _ = reference_batch(model, family, inputs, layers, selection=sel, new_tokens=new[:, :-1],
                             encoder_keep=encoder_keep)
    for b in range(seq.shape[0]):
        for step in range(steps):
            expected = ref[b][seq_len - 1 + step]
            torch.testing.assert_close(lg[b, step], expected, rtol=1e-4, atol=1e-4)
            assert int(new[b, step]) == int(expected.argmax())


def check_padded_batch_equals_singles(model, family: Family, samples, layers, keep, encoder_keep=None,
                                      padding_side: str = "left", seed: int = 0) -> None:
    """``generate`` on a padded batch equals ``generate`` on each sample alone: the same kept rows
    (shifted by the padding), the same new tokens, the same logits."""
    batch = family.make_inputs(samples, padding_side=padding_side, seed=seed)
    width = batch["input_ids"].shape[1]
    config = PioConfig(layers=layers, keep=keep, encoder_keep=encoder_keep)
    with pio(model, config):
        seq, lg = generate(model, batch)
        sel = selection_lists(model)
        enc = last_selection(model, encoder=True)
        for b in range(len(samples)):
            alone = family.single(batch, samples, b)
            offset = int(batch["attention_mask"][b].nonzero()[0])
            seq_a, lg_a = generate(model, alone)
            assert selection_lists(model) == [[[r - offset for r in stage[b]]] for stage in sel]
            if encoder_keep is not None:
                mine = enc[b][enc[b] >= 0] - offset
                assert mine.tolist() == last_selection(model, encoder=True)[0].tolist()
            assert seq[b, width:].tolist() == seq_a[0, alone["input_ids"].shape[1]:].tolist()
            torch.testing.assert_close(lg[b], lg_a[0], rtol=1e-4, atol=1e-4)


def check_cache_shrinks(model, inputs, layers, keep, encoder_keep=None) -> None:
    """The KV cache of every layer holds the rows that layer saw (the widest sample's: its text and
    the visual tokens ``last_stats`` counts for it): fewer after every stage, and already fewer
    from layer 0 with the encoder side; ``get_seq_length`` still reports the caller's numbering."""
    seq_len = inputs["input_ids"].shape[1]
    with pio(model, PioConfig(layers=layers, keep=keep, encoder_keep=encoder_keep)):
        with torch.no_grad():
            cache = hf.output_cache(model(**inputs, use_cache=True))
        stats = last_stats(model)
    n_layers = len(model.model.language_model.layers)
    mask = inputs.get("attention_mask")
    valid = [seq_len] * len(stats.visual_tokens) if mask is None else mask.sum(1).tolist()
    expected = [max(v - n + seen[i] for v, n, seen in zip(valid, stats.visual_tokens, stats.tokens_per_layer))
                for i in range(n_layers)]
    stored = [hf.stored_length(cache, i) for i in range(n_layers)]
    assert stored == expected
    assert all(stored[layer - 1] > stored[layer] for layer in layers), stored
    if encoder_keep is not None:
        assert stored[0] < max(valid)
    assert cache.get_seq_length() == seq_len


def check_preset(model, inputs, name: str) -> None:
    """A default schedule (``PRESETS[name]``) on a model of its depth: one stage at the middle layer,
    and about 11.1% of the visual tokens per layer on average (the SPEC 1 accounting, which the
    floor of small budgets pulls a little lower on tiny images)."""
    config = PRESETS[name]
    depth = len(model.model.language_model.layers)
    assert list(config.layers) == [depth // 2] and config.encoder_keep is not None
    with pio(model, config):
        logits(model, inputs)
        stats = last_stats(model)
    assert all(0.10 <= r <= 0.115 for r in stats.retention), stats.retention


def check_bf16_within_twice_torch(model, family: Family, inputs, layers, keep) -> None:
    """Flash-attention's rule: the bf16 integration is no further from fp32 than PyTorch's own bf16
    is. ``model`` is bf16; the fp32 model is the same weights upcast; both references drop the rows
    the bf16 run dropped."""
    import copy
    model32 = copy.deepcopy(model).float()
    inputs16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    inputs32 = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs16.items()}
    with pio(model, PioConfig(layers=layers, keep=keep)):
        out = logits(model, inputs16)
        sel = selection_lists(model)
    ref32, _ = reference_batch(model32, family, inputs32, layers, selection=sel)
    ref16, _ = reference_batch(model, family, inputs16, layers, selection=sel)
    for b, rows in enumerate(ref32):
        for r, expected in rows.items():
            ours = (out[b, r].float() - expected.float()).abs().max()
            torch_err = (ref16[b][r].float() - expected.float()).abs().max()
            assert ours <= 2 * torch_err + 1e-2, (b, r, float(ours), float(torch_err))
