"""The main demo: visual-token selection on a real photograph, with a picture of what was kept.

    python examples/demo.py                                   # built-in tiny LLaVA, no download
    python examples/demo.py --model PATH --image PATH         # a local LLaVA-1.5 checkpoint
    python examples/demo.py --device cuda --out demo_out

Without ``--model`` it builds a tiny LLaVA from a config (CLIP tower with the real 336 px /
14 px patch grid, so 576 visual tokens; a 16-layer Llama of width 128; random weights, seed
0) and runs it on Grace Hopper's portrait that ships with matplotlib. The published
LLaVA-1.5-7B schedules (SPEC section 1) are scaled to it: the token budgets stay (the
grid is the real one), the layer indices follow the depth (16 of 32 layers, so halved):

* ``w/ VE``:  96 tokens leave the vision encoder, layer 8 keeps 32 (published: layer 16);
* ``w/o VE``: layers 1, 5, 8 keep 92, 54, 22 (published: layers 1, 10, 15).

With random weights the scores carry no meaning; what the demo shows is the mechanics:
which patches each stage kept (the NMS spreads them over distinct regions), how long
selection took (for the encoder stage: beyond the vision tower the stock model runs too) and
how much KV cache it saved. It prints that and writes
``<out>/demo.png``: the model's input image, then the kept patches of every stage.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from e2e import kv_cache_bytes  # noqa: E402
from selection import StageTimer  # noqa: E402

from pio_kernels.integrations import hf  # noqa: E402

PUBLISHED_LAYERS, PUBLISHED_TOKENS = 32, 576
# LLaVA-1.5-7B, SPEC section 1.
PUBLISHED = {"w/ VE": dict(layers=(16,), keep=(32,), encoder_keep=96),
             "w/o VE": dict(layers=(1, 10, 15), keep=(92, 54, 22), encoder_keep=None)}


@dataclass
class Prepared:
    model: torch.nn.Module
    inputs: dict
    image: "object"          # HxWx3 float array in [0, 1]: what the vision tower sees
    grid: int                # patches per side
    describe: str
    tokenizer: object | None = None


def scaled_schedule(name: str, num_layers: int, visual_tokens: int) -> dict:
    """The published schedule ``name`` scaled to a model's depth and visual-token count."""
    spec = PUBLISHED[name]
    layers, last = [], 0
    for layer in spec["layers"]:  # proportional, rounded half up, strictly increasing, >= 1
        layer = max(last + 1, int(layer * num_layers / PUBLISHED_LAYERS + 0.5))
        layers.append(min(layer, num_layers - 1))
        last = layers[-1]
    ratio = visual_tokens / PUBLISHED_TOKENS
    keep = tuple(max(1, round(k * ratio)) for k in spec["keep"])
    encoder = None if spec["encoder_keep"] is None else max(1, round(spec["encoder_keep"] * ratio))
    return dict(layers=tuple(layers), keep=keep, encoder_keep=encoder)


def _image_path(path: str | None) -> str:
    if path:
        return path
    from matplotlib import cbook
    return str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def _unnormalise(pixel_values: torch.Tensor, mean, std):
    pixels = pixel_values[0].float().cpu()
    pixels = pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return pixels.clamp(0, 1).permute(1, 2, 0).numpy()


def tiny_llava(image_path: str, device: torch.device, seed: int = 0) -> Prepared:
    """A tiny LLaVA from a config, random weights, with the real 24x24 CLIP patch grid."""
    from PIL import Image
    import transformers
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    try:  # the PIL processor where transformers has it (no torchvision needed, no fallback warning)
        CLIPImageProcessor = transformers.CLIPImageProcessorPil
    except (AttributeError, ImportError, ModuleNotFoundError):
        CLIPImageProcessor = transformers.CLIPImageProcessor

    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                  num_attention_heads=4, image_size=336, patch_size=14, projection_dim=64)
    text = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=16,
                num_attention_heads=4, num_key_value_heads=4, vocab_size=32064, max_position_embeddings=2048)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = hf.build_model(LlavaForConditionalGeneration, config, attn_implementation="sdpa").to(device)
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    pixels = processor(images=Image.open(image_path).convert("RGB"), return_tensors="pt")["pixel_values"]
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 30000, (1, 36), generator=g)  # stands in for the system prompt + "USER:"
    prefix[0, 0] = 1
    question = torch.randint(3, 30000, (1, 28), generator=g)  # stands in for the question + "ASSISTANT:"
    input_ids = torch.cat([prefix, torch.full((1, 576), 32000), question], dim=1)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
              "pixel_values": pixels.to(device)}
    image = _unnormalise(pixels, processor.image_mean, processor.image_std)
    return Prepared(model, inputs, image, 24, "tiny LLaVA (random weights, CLIP 8x64 + Llama 16x128)")


def local_llava(model_path: str, image_path: str, device: torch.device, prompt: str) -> Prepared:
    """A LLaVA-1.5 checkpoint from a local folder (no download)."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(model_path, local_files_only=True, dtype=dtype,
                                                          attn_implementation="sdpa").to(device).eval()
    processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
    inputs = processor(images=Image.open(image_path).convert("RGB"), text=prompt, return_tensors="pt")
    inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
              for k, v in inputs.items()}
    ip = processor.image_processor
    vision = model.config.vision_config
    image = _unnormalise(inputs["pixel_values"], ip.image_mean, ip.image_std)
    return Prepared(model, inputs, image, vision.image_size // vision.patch_size, f"{model_path} ({dtype})",
                    tokenizer=processor.tokenizer)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model, inputs, device) -> tuple[float, float]:
    """(ms, KV cache MiB) of one prefill."""
    _sync(device)
    t0 = time.perf_counter()
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, kv_cache_bytes(hf.output_cache(out)) / 2**20


def run_schedule(prep: Prepared, name: str, schedule: dict, device: torch.device, new_tokens: int) -> dict:
    """Applies ``schedule``, runs one timed prefill, returns what each stage kept and its time.

    Stage times are the engine's own: for the encoder stage, what selection adds to the stock
    vision tower (its probes, selection and merging).
    """
    from pio_kernels.integrations import PioConfig, apply_pio, last_selection, remove_pio

    model = prep.model
    config = PioConfig(tau=0.8, num_positions=4, **schedule)
    apply_pio(model, config)
    try:
        with torch.no_grad():
            prefill(model, prep.inputs, device)  # warm-up
            with StageTimer(model, device) as timer:
                timer.new_forward()
                ms, kv = prefill(model, prep.inputs, device)
            stages = [s[0].tolist() for s in last_selection(model)]
            encoder = last_selection(model, encoder=True) if schedule["encoder_keep"] is not None else None
            answer = decoding = None
            if new_tokens:
                decoding = cached_generation(model, prep, new_tokens, device)
                answer = decoding.pop("answer")
    finally:
        remove_pio(model)
    timings = list((timer.stages_ms() or [[]])[0])
    panels = []
    if encoder is not None:
        panels.append(("encoder", encoder[0].tolist()))
    panels += [(f"layer {layer}", kept) for layer, kept in zip(schedule["layers"], stages)]
    return {"name": name, "schedule": schedule, "prefill_ms": ms, "kv_mb": kv, "panels": panels,
            "stage_ms": timings, "answer": answer, "decoding": decoding}


def cached_generation(model, prep: Prepared, new_tokens: int, device: torch.device) -> dict:
    """Greedy decoding through the KV cache the prefill left (the layers after a stage cache fewer
    rows), and the same tokens recomputed from scratch at every step (``use_cache=False``: the
    prompt's selection is reused): cached decoding is the reduced model, step by step."""
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=model.generation_config.pad_token_id or 0)
    start = time.perf_counter()
    cached = model.generate(**prep.inputs, **options)
    _sync(device)
    ms = (time.perf_counter() - start) * 1e3
    recomputed = model.generate(**prep.inputs, **options, use_cache=False)
    new = cached[0, prep.inputs["input_ids"].shape[1]:]
    if prep.tokenizer is not None:
        answer = repr(prep.tokenizer.decode(new, skip_special_tokens=True))
    else:
        answer = f"token ids {new.tolist()}"
    return {"answer": answer, "ms": ms, "same_uncached": bool(torch.equal(cached, recomputed)), "tokens": new_tokens}


def draw(prep: Prepared, image_start: int, results: list[dict], out_path: str, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid, n = prep.grid, prep.grid * prep.grid
    columns = 1 + max(len(r["panels"]) for r in results)
    fig, axes = plt.subplots(len(results), columns, figsize=(3.1 * columns, 3.4 * len(results)), squeeze=False)
    h, w = prep.image.shape[:2]
    for row, result in enumerate(results):
        ax = axes[row][0]
        ax.imshow(prep.image)
        ax.set_title(f"{result['name']}: input, {n} patches", fontsize=9)
        for col in range(columns - 1):
            ax = axes[row][col + 1]
            if col >= len(result["panels"]):
                ax.axis("off")
                continue
            label, positions = result["panels"][col]
            patches = [p - image_start for p in positions if p >= 0]
            kept = np.zeros(n, dtype=bool)
            kept[[p for p in patches if 0 <= p < n]] = True
            shade = np.where(kept.reshape(grid, grid), 0.0, 0.75)
            ax.imshow(prep.image)
            ax.imshow(np.dstack([np.zeros((grid, grid, 3)), shade]), extent=(0, w, h, 0), interpolation="nearest")
            for p in np.flatnonzero(kept):
                r, c = divmod(int(p), grid)
                ax.add_patch(plt.Rectangle((c * w / grid, r * h / grid), w / grid, h / grid, fill=False,
                                           edgecolor="yellow", linewidth=0.35, alpha=0.8))
            ms = result["stage_ms"][col] if col < len(result["stage_ms"]) else None
            timing = "" if ms is None else f", {ms:.1f} ms"
            ax.set_title(f"{label}: kept {int(kept.sum())}{timing}", fontsize=9)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local LLaVA-1.5 checkpoint folder (LlavaForConditionalGeneration)")
    parser.add_argument("--image", help="image file (default: matplotlib's grace_hopper.jpg)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=os.path.join(ROOT, "demo_out"), help="folder of demo.png")
    parser.add_argument("--schedules", nargs="+", default=["w/ VE", "w/o VE"], choices=list(PUBLISHED))
    parser.add_argument("--prompt", default="USER: <image>\nWhat is shown in this image? ASSISTANT:",
                        help="prompt for --model (with the processor's image placeholder)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens generated through the cache per schedule "
                        "(default 24 with --model, 6 for the tiny model; 0: none)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads of torch (default: 1 for the tiny model, whose ops are too small to share)")
    args = parser.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 24 if args.model else 6
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" and not args.model else None)
    if threads:
        torch.set_num_threads(threads)
    image_path = _image_path(args.image)
    t0 = time.perf_counter()
    if args.model:
        prep = local_llava(args.model, image_path, device, args.prompt)
    else:
        prep = tiny_llava(image_path, device)
    model = prep.model
    image_token = model.config.image_token_id
    ids = prep.inputs["input_ids"][0]
    visual = int((ids == image_token).sum())
    image_start = int((ids == image_token).nonzero()[0, 0])
    num_layers = model.config.text_config.num_hidden_layers
    print(f"model: {prep.describe}; {num_layers} decoder layers, {visual} visual tokens "
          f"({prep.grid}x{prep.grid} patches), prompt of {ids.numel()} tokens")
    print(f"image: {image_path}")

    with torch.no_grad():
        prefill(model, prep.inputs, device)  # warm-up
        with StageTimer(model, device) as timer:
            timer.new_forward()
            stock_ms, stock_kv = prefill(model, prep.inputs, device)
        stock_tower_ms = (timer.tower_ms() or [0.0])[0]
        stock_answer = None
        if args.model and args.max_new_tokens:
            out = model.generate(**prep.inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=model.generation_config.pad_token_id or 0)
            stock_answer = prep.tokenizer.decode(out[0, ids.numel():], skip_special_tokens=True)
    print(f"stock: prefill {stock_ms:.1f} ms (vision tower {stock_tower_ms:.1f} ms), KV cache {stock_kv:.2f} MiB")
    if stock_answer is not None:
        print(f"  answer: {stock_answer!r}")

    results = []
    for name in args.schedules:
        schedule = scaled_schedule(name, num_layers, visual)
        try:
            result = run_schedule(prep, name, schedule, device, args.max_new_tokens)
        except (ValueError, NotImplementedError) as exc:
            print(f"{name}: not available here ({type(exc).__name__}: {exc})")
            continue
        results.append(result)
        print(f"\n{name}: layers={list(schedule['layers'])} keep={list(schedule['keep'])} "
              f"encoder_keep={schedule['encoder_keep']} (published for 32 layers: {PUBLISHED[name]})")
        before = visual
        for (label, positions), ms in zip(result["panels"], result["stage_ms"] + [None] * 9):
            kept = sorted(p - image_start for p in positions if p >= 0)
            shown = ", ".join(map(str, kept[:12])) + (", ..." if len(kept) > 12 else "")
            timing = "" if ms is None else f" in {ms:.2f} ms" + (" beyond the vision tower" if label == "encoder" else "")
            print(f"  {label:>9}: kept {len(kept):3d} of {before:3d} visual tokens{timing}: patches [{shown}]")
            before = len(kept)
        saved = stock_kv - result["kv_mb"]
        print(f"  selection {sum(result['stage_ms']):.2f} ms in all; prefill {result['prefill_ms']:.1f} ms "
              f"(stock {stock_ms:.1f}); KV cache {result['kv_mb']:.2f} MiB, {saved:.2f} MiB saved "
              f"({stock_kv / result['kv_mb']:.1f}x smaller)")
        if result["decoding"] is not None:
            d = result["decoding"]
            check = "the same" if d["same_uncached"] else "DIFFERENT"
            print(f"  generated {d['tokens']} tokens through the cache in {d['ms']:.1f} ms: {result['answer']}; "
                  f"recomputed without the cache: {check}")
    if not results:
        raise SystemExit("no schedule could be applied")
    title = (f"{prep.describe}: kept patches per stage (yellow), tau 0.8\n"
             f"{os.path.basename(image_path)}, {device.type}; random weights: mechanics, not meaning"
             if not args.model else f"{prep.describe}: kept patches per stage, tau 0.8")
    path = draw(prep, image_start, results, os.path.join(args.out, "demo.png"), title)
    print(f"\nwrote {path} ({time.perf_counter() - t0:.1f} s in all)")
    return {"png": path, "results": results, "stock_kv_mb": stock_kv}


if __name__ == "__main__":
    main()
