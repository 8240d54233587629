"""The Qwen family's side of :mod:`vlm_checks` (Qwen2-VL, Qwen3-VL): how the stock model lays out
each sample, one sample's inputs alone, and the encoder side from materialised attention maps.

Everything here reads the stock model (pio not applied): the language model's inputs, its 3-D
positions and DeepStack features as the model hands them over, the image and video-frame spans
from the grids, and the attention maps of the vision tower, recorded from its eager attention.
"""
from __future__ import annotations

import sys

import torch

from pio_kernels.integrations import hf
from pio_kernels.integrations.engine import resolve_budget, window_global
from vlm_checks import Family, Rows, capture_lm_call, merge_by, merge_literal

MERGED = 4  # patches per merged token (2 x 2)


def _images_and_videos(samples) -> tuple[list[int], list[int]]:
    images = [sum(isinstance(s, tuple) and len(s) == 2 for s in sample) for sample in samples]
    videos = [sum(isinstance(s, tuple) and len(s) == 3 for s in sample) for sample in samples]
    return images, videos


def single(inputs: dict, samples: list, b: int) -> dict:
    """The inputs of sample ``b`` alone, unpadded: its rows, grids and pixels."""
    valid = inputs["attention_mask"][b].bool()
    out = {key: inputs[key][b:b + 1, valid] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    images, videos = _images_and_videos(samples)
    for key, grid_key, counts in (("pixel_values", "image_grid_thw", images),
                                  ("pixel_values_videos", "video_grid_thw", videos)):
        if counts[b]:
            first, grids = sum(counts[:b]), inputs[grid_key]
            patches = grids.prod(-1).tolist()
            start = sum(patches[:first])
            out[grid_key] = grids[first:first + counts[b]]
            out[key] = inputs[key][start:start + sum(patches[first:first + counts[b]])]
    return out


def visual_ids(model, inputs) -> torch.Tensor:
    """(B, S) id of the image (``0 ..``) or video frame (after the images) of every row, -1 for text:
    the pad tokens filled in row-major order, each image or frame with its grid's token count."""
    ids = inputs["input_ids"]
    out = torch.full(ids.shape, -1, dtype=torch.long)
    next_id = 0
    cfg = model.config
    for token, key in ((cfg.image_token_id, "image_grid_thw"), (cfg.video_token_id, "video_grid_thw")):
        sizes = iter([] if key not in inputs else
                     [h * w // MERGED for t, h, w in inputs[key].tolist() for _ in range(t)])
        for b in range(ids.shape[0]):
            s = 0
            while s < ids.shape[1]:
                if ids[b, s] == token:
                    n = next(sizes)
                    out[b, s:s + n] = next_id
                    next_id += 1
                    s += n
                else:
                    s += 1
    return out


def eager_attention_weights(visual, pixel_values: torch.Tensor, grid: torch.Tensor, blocks) -> dict[int, list]:
    """``({block: [(H, n, n) float32 per attention segment]}, output)``: the attention weights the
    Qwen-family vision tower ``visual`` materialises at ``blocks`` when it runs eager attention,
    and the tower's output."""
    module = sys.modules[type(visual.blocks[0].attn).__module__]
    original = module.eager_attention_forward
    current, weights = {}, {block: [] for block in blocks}

    def recording(attn, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, w = original(attn, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if current.get("block") in weights:
            weights[current["block"]].append(w[0].float())
        return out, w

    handles = [blk.register_forward_pre_hook(lambda m, a, i=i: current.update(block=i))
               for i, blk in enumerate(visual.blocks)]
    module.eager_attention_forward = recording
    try:
        with hf.attention_implementation_as(visual.config, "eager"), torch.no_grad():
            out = visual(pixel_values, grid_thw=grid)
    finally:
        module.eager_attention_forward = original
        for handle in handles:
            handle.remove()
    return weights, out


def tower_column_means(model, pixel_values: torch.Tensor, grid: torch.Tensor, blocks) -> list[torch.Tensor]:
    """Per block of ``blocks``: (merged tokens,) the attention each merged token's patches receive,
    averaged over heads, over the queries of their frame and over the 2 x 2 patches (the tower's
    blocks run in output order: no windows)."""
    weights, _ = eager_attention_weights(model.model.visual, pixel_values, grid, blocks)
    return [torch.cat([w.mean(0).mean(0) for w in weights[block]]).view(-1, MERGED).mean(1) for block in blocks]


def reference_encoder(model, inputs, blocks, budget) -> list[list[int]]:
    """Per image (grids of one frame): the kept merged tokens of the window + global rule (SPEC 4)
    on the column means of ``blocks`` (local, global)."""
    grid = inputs["image_grid_thw"]
    local, global_ = tower_column_means(model, inputs["pixel_values"], grid, blocks)
    kept, start = [], 0
    for t, h, w in grid.tolist():
        assert t == 1, "the reference encoder takes single-frame images"
        h, w = h // 2, w // 2
        rows = slice(start, start + h * w)
        pick = window_global(local[None, rows], global_[None, rows], h, w, budget(h * w), 4)[0]
        kept.append(pick.nonzero().flatten().tolist())
        start += h * w
    return kept


def lm_rows(model, inputs, new_tokens=None, encoder_keep=None, blocks=None) -> list[Rows]:
    """Per sample, what the stock model hands its language model (unpadded), with ``new_tokens``
    appended; with ``encoder_keep``, reduced by the reference encoder side: each image keeps its
    chosen tokens, merged (main features and DeepStack features with the same assignment), at
    their own positions."""
    call = capture_lm_call(model, inputs)
    embeds = call["inputs_embeds"]
    batch, seq_len, _ = embeds.shape
    pos = call.get("position_ids")
    pos = torch.arange(seq_len).expand(3, batch, -1) if pos is None else (pos[1:] if pos.shape[0] == 4 else pos)
    deltas = model.model.rope_deltas
    deltas = torch.zeros(batch, 1, dtype=torch.long) if deltas is None else deltas.clone()
    mask = call.get("attention_mask")
    mask = torch.ones(batch, seq_len, dtype=torch.long) if mask is None else mask
    ids = visual_ids(model, inputs)
    levels = []
    if call.get("deepstack_visual_embeds") is not None:
        visual = call["visual_pos_masks"]
        for features in call["deepstack_visual_embeds"]:
            full = features.new_zeros(batch, seq_len, features.shape[-1])
            full[visual] = features
            levels.append(full)
    kept = None
    if encoder_keep is not None:
        kept = reference_encoder(model, inputs, blocks, lambda n: resolve_budget(encoder_keep, n))
    n_images = 0 if "image_grid_thw" not in inputs else inputs["image_grid_thw"].shape[0]
    out = []
    lm = model.model.language_model
    for b in range(batch):
        rows = mask[b].nonzero().flatten()
        x, p, i = embeds[b, rows], pos[:, b, rows], ids[b, rows]
        adds = [level[b, rows] for level in levels]
        present = torch.ones(rows.numel(), dtype=torch.bool)
        if kept is not None:
            x, adds = x.clone(), [a.clone() for a in adds]
            for image in i.unique().tolist():
                if 0 <= image < n_images:
                    r = (i == image).nonzero().flatten()
                    merged, target = merge_literal(x[r], kept[image])
                    x[r[kept[image]]] = merged
                    for a in adds:
                        a[r[kept[image]]] = merge_by(a[r], target, len(kept[image]))
                    present[r] = False
                    present[r[kept[image]]] = True
        n_prompt = rows.numel()
        caller = rows
        if new_tokens is not None:
            t = new_tokens.shape[1]
            with torch.no_grad():
                x = torch.cat([x, lm.embed_tokens(new_tokens[b])])
            p = torch.cat([p, (n_prompt + torch.arange(t) + deltas[b]).expand(3, t)], dim=1)
            i = torch.cat([i, torch.full((t,), -1)])
            caller = torch.cat([caller, seq_len + torch.arange(t)])
            adds = [torch.cat([a, a.new_zeros(t, a.shape[1])]) for a in adds]
            present = torch.cat([present, torch.ones(t, dtype=torch.bool)])
        out.append(Rows(x=x[present], caller=caller[present], ids=i[present], positions=p[:, present],
                        additions=[a[present] for a in adds], prompt_len=int(present[:n_prompt].sum())))
    return out


def family(make_model, make_inputs, blocks) -> Family:
    """The Qwen family for :mod:`vlm_checks`; ``blocks``: (model) -> the encoder side's (local, global) blocks."""
    return Family(make_model=make_model, make_inputs=make_inputs, single=single,
                  rows=lambda model, inputs, new, enc: lm_rows(model, inputs, new, enc, blocks(model)))
