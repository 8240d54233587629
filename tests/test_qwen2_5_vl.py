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
