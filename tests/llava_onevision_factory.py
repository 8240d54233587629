"""Tiny random-weight LLaVA-OneVision models and inputs, and its side of :mod:`vlm_checks`.

``make_model`` builds a stock ``LlavaOnevisionForConditionalGeneration``: a 7-layer SigLIP tower
on 56 x 56 crops of 7 x 7 patches (an 8 x 8 patch grid, so the encoder side's windows are 2 x 2
patches), anyres tiling on 56 x 112, 112 x 56 and 112 x 112, a Qwen2 decoder. ``vision_aspect_ratio`` sets the anyres-max limit: ``"anyres_max_1"``
makes the model downscale (bilinearly) every high-resolution grid larger than one crop.

``make_inputs(model, samples)`` builds what the processor hands the model: a sample is a list of
segments, an ``int`` a run of text, ``("image", i)`` an image of size ``SIZES[i]`` (5 crops of
pixels; the token count, newline tokens included, is the model's own), ``("video", f)`` a video of
``f`` frames (16 tokens a frame, then a newline token). With several images in a sample,
``batch_num_images`` is passed (the model then takes each image's base crop only).
"""
from __future__ import annotations

import torch

from llava_factory import eager_tower_attentions

from pio_kernels.integrations.engine import resolve_budget, split_local_global
from vlm_checks import Family, Rows, capture_lm_call, merge_literal

PAD, IMAGE, VIDEO, VOCAB = 0, 97, 98, 100
SIZES = torch.tensor([[56, 112], [100, 60], [112, 112]])
SIDE = 8  # patches per crop side
FRAME = 16  # tokens of a video frame (8 x 8 pooled 2 x 2)
CROP = 56


def make_model(*, layers: int = 4, attn: str = "sdpa", vision_aspect_ratio: str = "anyres_max_9",
               dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)
    from qwen2_vl_factory import randomise

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=4,
                                image_size=CROP, patch_size=7)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=VIDEO,
                                  image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]], vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio=vision_aspect_ratio,
                                  tie_word_embeddings=False)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn
    model = randomise(LlavaOnevisionForConditionalGeneration(config), seed)
    return model.to(dtype).eval()


def _kinds(samples, kind: str) -> list[list]:
    return [[seg[1] for seg in sample if isinstance(seg, tuple) and seg[0] == kind] for sample in samples]


def make_inputs(model, samples: list[list], *, padding_side: str = "left", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images, videos = _kinds(samples, "image"), _kinds(samples, "video")
    out = {}
    counts = iter([])
    if any(images):
        n = sum(map(len, images))
        out["pixel_values"] = torch.randn(n, 5, 3, CROP, CROP, generator=g)
        out["image_sizes"] = SIZES[[i for per in images for i in per]]
        if any(len(per) > 1 for per in images):
            out["batch_num_images"] = torch.tensor([len(per) for per in images])
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=out["pixel_values"], image_sizes=out["image_sizes"],
                batch_num_images=out.get("batch_num_images")).pooler_output
        counts = iter([f.shape[0] for f in features])
    frames = [f for per in videos for f in per]
    if frames:
        if len(set(frames)) != 1:
            raise ValueError(f"videos of one batch have the same number of frames, got {frames}")
        out["pixel_values_videos"] = torch.randn(len(frames), frames[0], 3, CROP, CROP, generator=g)
    rows = []
    for sample in samples:
        ids = []
        for seg in sample:
            if isinstance(seg, int):
                ids += torch.randint(3, 90, (seg,), generator=g).tolist()
            elif seg[0] == "image":
                ids += [IMAGE] * next(counts)
            else:
                ids += [VIDEO] * (seg[1] * FRAME + 1)
        rows.append(ids)
    width = max(map(len, rows))
    out["input_ids"] = torch.full((len(rows), width), PAD, dtype=torch.long)
    out["attention_mask"] = torch.zeros(len(rows), width, dtype=torch.long)
    for b, ids in enumerate(rows):
        span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
        out["input_ids"][b, span] = torch.tensor(ids)
        out["attention_mask"][b, span] = 1
    return out


def single(inputs: dict, samples: list, b: int) -> dict:
    """The inputs of sample ``b`` alone, unpadded: its rows, its images' crops and sizes, its videos."""
    valid = inputs["attention_mask"][b].bool()
    out = {key: inputs[key][b:b + 1, valid] for key in ("input_ids", "attention_mask")}
    images, videos = _kinds(samples, "image"), _kinds(samples, "video")
    first = sum(map(len, images[:b]))
    if images[b]:
        out["pixel_values"] = inputs["pixel_values"][first:first + len(images[b])]
        out["image_sizes"] = inputs["image_sizes"][first:first + len(images[b])]
        if "batch_num_images" in inputs:
            out["batch_num_images"] = inputs["batch_num_images"][b:b + 1]
    if videos[b]:
        first = sum(map(len, videos[:b]))
        out["pixel_values_videos"] = inputs["pixel_values_videos"][first:first + len(videos[b])]
    return out


def image_features(model, inputs) -> list[torch.Tensor]:
    """The stock features of every image, newline tokens included."""
    if "pixel_values" not in inputs:
        return []
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                   image_sizes=inputs["image_sizes"],
                                                   batch_num_images=inputs.get("batch_num_images")).pooler_output)


def visual_ids(model, inputs) -> torch.Tensor:
    """(B, S) image id (then video-frame id) of every visual row, -1 for text and newline tokens.
    Images fill the image rows in order with the stock features' counts, and a newline token is a
    row whose feature is the model's ``image_newline``; a video is a run of video rows, its frames
    of ``FRAME`` rows, then its newline token."""
    ids = inputs["input_ids"]
    out = torch.full(ids.shape, -1, dtype=torch.long)
    image_rows = (ids == IMAGE).nonzero()
    start = 0
    features = image_features(model, inputs)
    for image, f in enumerate(features):
        rows = image_rows[start:start + len(f)]
        out[rows[:, 0], rows[:, 1]] = torch.where((f == model.model.image_newline).all(-1), -1, image)
        start += len(f)
    frame = len(features)
    for b in range(ids.shape[0]):
        video = (ids[b] == VIDEO).tolist() + [False]
        run = []
        for s, is_video in enumerate(video):
            if is_video:
                run.append(s)
            elif run:
                for j in range(0, len(run) - 1, FRAME):  # the last row of a run is its newline
                    out[b, run[j:j + FRAME]] = frame
                    frame += 1
                run = []
    return out


def tower_received_attention(model, pixels: torch.Tensor, layers: tuple[int, int]) -> list[torch.Tensor]:
    """Per layer of ``layers``: (crops, N) the attention each patch receives, averaged over heads and
    queries, from the full maps the eager tower materialises."""
    maps = eager_tower_attentions(model, pixels)
    return [maps[layer].mean(1).mean(1) for layer in layers]


def reference_encoder(model, inputs, budget) -> list[list[tuple[torch.Tensor, list[int]]]]:
    """Per image: per span (base crop, then the high-resolution grid), the span's token positions
    within the image's features and the kept ones (SPEC 4 with the received-attention maps)."""
    from pio_kernels.integrations import hf
    config = model.config
    crops = hf.llava_onevision_crops(config, inputs["image_sizes"], inputs.get("batch_num_images"))
    pixels = torch.cat([p[:c] for p, c in zip(inputs["pixel_values"], crops)])
    shallow, deep = tower_received_attention(model, pixels, (5, 6))
    maps = torch.stack([shallow, deep, torch.ones_like(shallow)], -1)
    packed, _ = model.model.pack_image_features(list(torch.split(maps, crops)), inputs["image_sizes"],
                                                image_newline=torch.tensor([0.0, 0.0, -1.0]),
                                                vision_aspect_ratio=config.vision_aspect_ratio)
    out = []
    for p in packed:
        spans = [(torch.arange(SIDE * SIDE), (SIDE, SIDE))]
        high = p[SIDE * SIDE:]
        if len(high) > 1:
            tokens = (high[:, 2] > -0.5).nonzero().flatten()
            grid_h = len(high) - tokens.numel()
            spans.append((SIDE * SIDE + tokens, (grid_h, len(high) // grid_h - 1)))
        image = []
        for positions, grid in spans:
            n = positions.numel()
            kept = split_local_global(p[positions, 0][None], p[positions, 1][None], grid, budget(n), (SIDE // 4, SIDE // 4))[0]
            image.append((positions, kept.nonzero().flatten().tolist()))
        out.append(image)
    return out


def lm_rows(model, inputs, new_tokens=None, encoder_keep=None) -> list[Rows]:
    """Per sample, the stock language model's input rows (unpadded), 1-D positions renumbered;
    with ``encoder_keep``, every span keeps its chosen tokens, merged (newline tokens stay)."""
    call = capture_lm_call(model, inputs)
    embeds = call["inputs_embeds"]
    batch, seq_len, _ = embeds.shape
    mask = call.get("attention_mask")
    mask = torch.ones(batch, seq_len, dtype=torch.long) if mask is None else mask
    ids = visual_ids(model, inputs)
    x_all = embeds.clone()
    present_all = mask.bool().clone()
    if encoder_keep is not None:
        image_rows = (inputs["input_ids"] == IMAGE).nonzero()
        start = 0
        spans = reference_encoder(model, inputs, lambda n: resolve_budget(encoder_keep, n))
        for image, f in zip(spans, image_features(model, inputs)):
            rows_of = image_rows[start:start + len(f)]
            start += len(f)
            for positions, kept in image:
                b, s = rows_of[positions, 0], rows_of[positions, 1]
                merged, _ = merge_literal(x_all[b, s], kept)
                x_all[b[kept], s[kept]] = merged
                dropped = torch.ones(len(positions), dtype=torch.bool)
                dropped[kept] = False
                present_all[b[dropped], s[dropped]] = False
    out = []
    lm = model.model.language_model
    for b in range(batch):
        rows = present_all[b].nonzero().flatten()
        x, caller, i = x_all[b, rows], rows, ids[b, rows]
        prompt_len = rows.numel()
        if new_tokens is not None:
            t = new_tokens.shape[1]
            with torch.no_grad():
                x = torch.cat([x, lm.embed_tokens(new_tokens[b])])
            caller = torch.cat([caller, seq_len + torch.arange(t)])
            i = torch.cat([i, torch.full((t,), -1)])
        out.append(Rows(x=x, caller=caller, ids=i, positions=None, prompt_len=prompt_len))
    return out


def family(model) -> Family:
    return Family(make_model=make_model, make_inputs=lambda samples, **kw: make_inputs(model, samples, **kw),
                  single=single, rows=lambda m, inputs, new, enc: lm_rows(m, inputs, new, enc))


__all__ = ["IMAGE", "SIZES", "VIDEO", "family", "image_features", "make_inputs", "make_model", "reference_encoder",
           "single", "visual_ids"]
