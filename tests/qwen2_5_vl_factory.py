"""Tiny random-weight Qwen2.5-VL models and valid inputs for the integration tests (no downloads).

``make_model`` builds a stock ``Qwen2_5_VLForConditionalGeneration`` from a config: a
window-attention vision tower with full-attention blocks, the 2x2 spatial merge and the
merger, and a small M-RoPE decoder with an untied ``lm_head``.

``make_inputs`` builds what the processor would hand the model: ``input_ids`` with one
image pad token per merged patch, ``mm_token_type_ids`` (without it the stock model
silently falls back to 1-D positions), ``pixel_values`` and ``image_grid_thw`` (and the
video counterparts), and a left- or right-padded ``attention_mask``.

A sample is a list of segments: an ``int`` is a run of that many text tokens, a pair
``(h, w)`` an image of ``h x w`` patches, a triple ``(t, h, w)`` a video of ``t`` temporal
patches (``h`` and ``w`` even: the merger joins 2x2 patches into one token).
"""
from __future__ import annotations

import torch

PAD, IMAGE, VIDEO, VISION_START, VISION_END = 0, 90, 91, 92, 93
VOCAB = 96
PATCH, TEMPORAL_PATCH, MERGE = 2, 2, 2


def make_model(*, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vision_depth: int = 4,
               fullatt_blocks: tuple[int, ...] = (1, 3), window_merged: int = 2, attn: str = "sdpa",
               dtype: torch.dtype = torch.float32, seed: int = 0):
    """A stock Qwen2.5-VL with random weights.

    ``window_merged``: side, in merged tokens, of the vision tower's attention windows.
    Norm gains and biases are randomised too, so a path that ignores them cannot pass.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    half = hidden // heads // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         rms_norm_eps=1e-6, max_position_embeddings=512, pad_token_id=PAD,
                         bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}),
        vision_config=dict(depth=vision_depth, hidden_size=32, num_heads=2, intermediate_size=48,
                           patch_size=PATCH, temporal_patch_size=TEMPORAL_PATCH, spatial_merge_size=MERGE,
                           window_size=window_merged * MERGE * PATCH, out_hidden_size=hidden,
                           fullatt_block_indexes=list(fullatt_blocks), tokens_per_second=2),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=False,
    )
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    torch.manual_seed(seed)
    model = randomise(Qwen2_5_VLForConditionalGeneration(config), seed)
    return model.to(dtype).eval()


def randomise(model, seed: int):
    """Random weights, norm gains and biases too (a path that ignores them cannot pass)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
            elif "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model



def _sample_tokens(segments, generator):
    """(ids, types, images, videos) of one unpadded sample."""
    ids, types, images, videos = [], [], [], []
    for seg in segments:
        if isinstance(seg, int):
            ids += torch.randint(3, IMAGE - 2, (seg,), generator=generator).tolist()
            types += [0] * seg
            continue
        t, h, w = (1, *seg) if len(seg) == 2 else seg
        if h % MERGE or w % MERGE:
            raise ValueError(f"image/video grids must be multiples of {MERGE}, got {seg}")
        n = t * h * w // MERGE ** 2
        kind, token = (1, IMAGE) if len(seg) == 2 else (2, VIDEO)
        ids += [VISION_START] + [token] * n + [VISION_END]
        types += [0] + [kind] * n + [0]
        (images if kind == 1 else videos).append((t, h, w))
    return ids, types, images, videos


def make_inputs(samples: list[list], *, padding_side: str = "left", seed: int = 0,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Model inputs for a batch of samples (see the module docstring for the segment format).

    Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (B, S) and, when there
    are images (videos), ``pixel_values`` (patches, 3*2*2*2) and ``image_grid_thw`` (n, 3)
    (``pixel_values_videos``, ``video_grid_thw``), images ordered sample by sample.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    generator = torch.Generator().manual_seed(seed)
    built = [_sample_tokens(s, generator) for s in samples]
    seq_len = max(len(ids) for ids, *_ in built)
    input_ids = torch.full((len(samples), seq_len), PAD, dtype=torch.long)
    types = torch.zeros(len(samples), seq_len, dtype=torch.long)
    mask = torch.zeros(len(samples), seq_len, dtype=torch.long)
    for b, (ids, tt, _, _) in enumerate(built):
        n = len(ids)
        span = slice(seq_len - n, seq_len) if padding_side == "left" else slice(0, n)
        input_ids[b, span] = torch.tensor(ids)
        types[b, span] = torch.tensor(tt)
        mask[b, span] = 1
    out = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": types}
    patch_dim = 3 * TEMPORAL_PATCH * PATCH * PATCH
    for key, grid_key, index in (("pixel_values", "image_grid_thw", 2), ("pixel_values_videos", "video_grid_thw", 3)):
        grids = [g for item in built for g in item[index]]
        if grids:
            out[grid_key] = torch.tensor(grids, dtype=torch.long)
            patches = sum(t * h * w for t, h, w in grids)
            out[key] = torch.randn(patches, patch_dim, generator=generator).to(dtype)
    return out
