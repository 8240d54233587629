"""Qwen2.5-VL integration (issue 6) on tiny random-weight models built from configs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pio_kernels.integrations import qwen2_5_vl as qwen
from qwen2_5_vl_factory import IMAGE, make_inputs, make_model


# ---------------------------------------------------------------- encoder side, pieces

def _brute_window_global(local, global_, h, w, budget, window):
    """The greedy walk of SPEC section 4 written out literally."""
    n_local = budget // 2
    windows_h, windows_w = max(1, h // window), max(1, w // window)
    cap = math.ceil(n_local / (windows_h * windows_w))
    count, keep = {}, []
    by_local = sorted(range(h * w), key=lambda i: (-float(local[i]), i))
    for i in by_local:
        if len(keep) == n_local:
            break
        win = (min(i // w // window, windows_h - 1), min(i % w // window, windows_w - 1))
        if count.get(win, 0) < cap:
            count[win] = count.get(win, 0) + 1
            keep.append(i)
    for i in by_local:
        if len(keep) == n_local:
            break
        if i not in keep:
            keep.append(i)
    for i in sorted(range(h * w), key=lambda i: (-float(global_[i]), i)):
        if len(keep) == budget:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


@pytest.mark.parametrize("h,w,budget,window", [(6, 10, 12, 4), (2, 2, 3, 4), (8, 8, 20, 4), (4, 6, 7, 2),
                                               (6, 6, 35, 4), (10, 3, 9, 4), (5, 7, 1, 4), (4, 4, 16, 4)])
def test_window_global_selection_matches_greedy_walk(h, w, budget, window):
    g = torch.Generator().manual_seed(h * 100 + w)
    local = torch.rand(h * w, generator=g)
    global_ = torch.rand(h * w, generator=g)
    local[3 % (h * w)] = local[0]  # a tie
    kept = qwen.window_global_selection(local, global_, h, w, budget, window)
    assert kept.tolist() == _brute_window_global(local, global_, h, w, min(budget, h * w), window)


def test_window_global_selection_spreads_local_half():
    # The local map is largest in one window; the local half still takes one token per window
    # (the lowest index where a window is all ties), the global half the top of its own map.
    h = w = 8
    local = torch.zeros(h, w)
    local[:4, :4] = 10 + torch.arange(16.0).view(4, 4)
    kept = qwen.window_global_selection(local.flatten(), torch.arange(h * w, dtype=torch.float), h, w,
                                        budget=8, window=4)
    assert kept.tolist() == [4, 27, 32, 36, 60, 61, 62, 63]


def test_merge_into_kept_is_mean_of_nearest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g)
    keep = torch.tensor([1, 4, 7])
    out = qwen.merge_into_kept(x, keep)
    groups = {int(k): [x[k]] for k in keep}
    for i in range(9):
        if i in keep.tolist():
            continue
        sims = [float(F.cosine_similarity(x[i], x[k], dim=0)) for k in keep]
        groups[int(keep[max(range(3), key=lambda j: sims[j])])].append(x[i])
    expected = torch.stack([torch.stack(groups[int(k)]).mean(0) for k in keep])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(qwen.merge_into_kept(x, torch.arange(9)), x)


def test_vision_column_scores_match_full_attention_map():
    model = make_model(attn="eager")
    block = model.model.visual.blocks[1]
    n, cu = 40, torch.tensor([0, 16, 40], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 32, generator=g)
    angles = torch.randn(n, 8, generator=g)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    scores = qwen.vision_column_scores(block.attn, x, cu, (cos, sin))
    # Reference: the whole block-diagonal map, materialised.
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    q, k, _ = block.attn.qkv(x).reshape(n, 3, 2, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    logits = torch.einsum("qhd,khd->hqk", q, k) * block.attn.scaling
    same = torch.zeros(n, n, dtype=torch.bool)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        same[s:e, s:e] = True
    probs = logits.masked_fill(~same, float("-inf")).softmax(-1)  # (H, N, N)
    seg_len = same.sum(0).float()
    expected = probs.sum(dim=(0, 1)) / (2 * seg_len)
    torch.testing.assert_close(scores, expected)
    old = qwen._SCORE_CHUNK_ELEMENTS
    try:  # several query chunks per segment
        qwen._SCORE_CHUNK_ELEMENTS = 2 * 2 * 24
        torch.testing.assert_close(qwen.vision_column_scores(block.attn, x, cu, (cos, sin)), expected)
    finally:
        qwen._SCORE_CHUNK_ELEMENTS = old


# ---------------------------------------------------------------- a from-scratch reduced model

def _lm_inputs(model, inputs):
    """What the stock model hands its language model: embeddings, (3, B, S) positions, mask."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    pos = captured["position_ids"]
    pos = pos[1:] if pos.shape[0] == 4 else pos
    return captured["inputs_embeds"], pos, captured["attention_mask"], model.model.rope_deltas.clone()


def _visual_ids(model, inputs):
    """(B, S) id of the image or video frame of each row, -1 for text: from runs and grids."""
    ids = inputs["input_ids"]
    out = torch.full(ids.shape, -1, dtype=torch.long)
    next_id = 0
    cfg = model.config
    for token, key in ((cfg.image_token_id, "image_grid_thw"), (cfg.video_token_id, "video_grid_thw")):
        sizes = [] if key not in inputs else \
            [h * w // 4 for t, h, w in inputs[key].tolist() for _ in range(t)]
        it = iter(sizes)
        for b in range(ids.shape[0]):
            s = 0
            while s < ids.shape[1]:
                if ids[b, s] == token:
                    n = next(it)
                    out[b, s:s + n] = next_id
                    next_id += 1
                    s += n
                else:
                    s += 1
    return out


def _causal(n, dtype):
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def reference_reduced(model, inputs, layers, keep, *, new_tokens=None, selection=None, tau=0.8, k=4):
    """Logits of the reduced model computed from scratch, one unpadded sample at a time, no cache.

    Uses the stock modules only and ``pio_kernels.reference`` for the selection (when
    ``selection`` is None). Returns ``(logits, selection)``: per sample a dict
    {caller row: logits (V,)} for the rows reaching the head (new tokens are rows
    S, S+1, ...), and per stage per sample the kept visual caller rows (sorted list).
    """
    from pio_kernels import reference
    from pio_kernels.integrations.engine import resolve_budget
    lm = model.model.language_model
    embeds, pos, mask, deltas = _lm_inputs(model, inputs)
    vis = _visual_ids(model, inputs)
    batch, seq_len = mask.shape
    out_logits, out_sel = [], [[] for _ in layers]
    for b in range(batch):
        rows = mask[b].nonzero().flatten()
        x = embeds[b, rows]
        p = pos[:, b, rows]
        caller = rows.clone()
        ids = vis[b, rows]
        n_prompt = rows.numel()
        if new_tokens is not None:
            t = new_tokens.shape[1]
            x = torch.cat([x, lm.embed_tokens(new_tokens[b])])
            p_new = (n_prompt + torch.arange(t) + deltas[b]).expand(3, t)
            p = torch.cat([p, p_new], dim=1)
            caller = torch.cat([caller, seq_len + torch.arange(t)])
            ids = torch.cat([ids, torch.full((t,), -1)])
        cur = torch.arange(x.shape[0])  # rows of this sample still present
        h = x[None]
        with torch.no_grad():
            for li, layer in enumerate(lm.layers):
                if li in layers:
                    s = layers.index(li)
                    cos, sin = lm.rotary_emb(h, p[:, None, cur])
                    is_prompt = cur < n_prompt
                    if selection is None:
                        hp = h[:, is_prompt]
                        scores = reference.proxy_saliency(layer, lm.norm, model.lm_head, hp,
                                                          (cos[:, is_prompt], sin[:, is_prompt]), num_positions=k)[0]
                        keep_rows = torch.ones(cur.numel(), dtype=torch.bool)
                        for image in ids[cur].unique().tolist():
                            if image < 0:
                                continue
                            r = (ids[cur] == image).nonzero().flatten()
                            budget = resolve_budget(keep[s], r.numel())
                            picked = reference.select_tokens(hp[:, r], scores[None, r], budget, tau)[0]
                            keep_rows[r] = False
                            keep_rows[r[picked[picked >= 0]]] = True
                    else:
                        wanted = set(selection[s][b])
                        keep_rows = torch.tensor([ids[c] < 0 or int(caller[c]) in wanted for c in cur.tolist()])
                    cur = cur[keep_rows]
                    h = h[:, keep_rows]
                    out_sel[s].append(sorted(int(caller[c]) for c in cur.tolist() if ids[c] >= 0))
                pe = lm.rotary_emb(h, p[:, None, cur])
                y = layer(h, attention_mask=_causal(h.shape[1], h.dtype), position_embeddings=pe)
                h = y[0] if isinstance(y, tuple) else y
            logits = model.lm_head(lm.norm(h))[0]
        out_logits.append({int(caller[c]): logits[i] for i, c in enumerate(cur.tolist())})
    return out_logits, out_sel


def _selection_lists(model):
    from pio_kernels.integrations import last_selection
    return [[[int(v) for v in row if v >= 0] for row in stage] for stage in last_selection(model)]
