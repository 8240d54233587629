"""Proxy saliency (SPEC 2): the exact reduced probe against the reference, at real shapes.

One stage = one ``proxy_saliency`` call on one decoder layer with random weights:

    llava15    LLaVA-1.5-7B layer: D 4096, 32 heads (MHA), MLP 11008, V 32000, S 640, 576 visual
    llava_next LLaVA-NeXT-7B:      same layer, S 2950, 2880 visual
    qwen25vl   Qwen2.5-VL-7B:      D 3584, 28/4 heads (GQA), MLP 18944, V 152064, S 1350, 1296 visual (M-RoPE)
    qwen3vl8b  Qwen3-VL-8B:        D 4096, 32/8 heads (GQA), head_dim 128, q/k norms, MLP 12288, V 151936,
                                   S 1360, 1296 visual (interleaved M-RoPE)

For each shape: the reference and the fast path timed in the same run (median of
``--repeat``), their ratio, and the max relative error of the fast scores on the visual
tokens (``max |fast - ref| / max ref``). On CUDA the fast path is also timed with the torch
fallback (``backend="torch"``), and the two Triton kernels against their fallbacks with the
bandwidth they reach. ``--quick`` runs a small shape only (CI smoke test).

Results go to ``benchmarks/results/saliency-<device>[-<tag>].json``; the tag defaults to the
names of the shapes when ``--shapes`` is given (so a partial run never overwrites the full one).

    python benchmarks/saliency.py --device cpu                       # llava15, qwen25vl: saliency-cpu.json
    python benchmarks/saliency.py --device cpu --threads 2 --shapes qwen3vl8b   # saliency-cpu-qwen3vl8b.json
    python benchmarks/saliency.py --device cuda            # bf16, every shape
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from pio_kernels import proxy_saliency, reference  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # "llama", "qwen2_5_vl" or "qwen3_vl"
    hidden: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    seq_len: int
    visual: int
    visual_start: int
    grid_w: int  # width of the visual grid (M-RoPE positions)
    head_dim: int | None = None  # None: hidden // heads


SHAPES = {
    "llava15": Shape("llava15", "llama", 4096, 32, 32, 11008, 32000, 640, 576, 35, 24),
    "llava_next": Shape("llava_next", "llama", 4096, 32, 32, 11008, 32000, 2950, 2880, 35, 48),
    "qwen25vl": Shape("qwen25vl", "qwen2_5_vl", 3584, 28, 4, 18944, 152064, 1350, 1296, 15, 36),
    "qwen3vl8b": Shape("qwen3vl8b", "qwen3_vl", 4096, 32, 8, 12288, 151936, 1360, 1296, 15, 36, head_dim=128),
}
QUICK = Shape("quick", "qwen2_5_vl", 256, 4, 2, 512, 1000, 80, 64, 6, 8)


def build_stage(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(layer, final_norm, lm_head, hidden_states, (cos, sin), visual slice) with random weights."""
    torch.manual_seed(seed)
    common = dict(attn_implementation="sdpa", hidden_size=shape.hidden, intermediate_size=shape.mlp,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                  num_hidden_layers=1, rms_norm_eps=1e-6)
    s = shape.seq_len
    visual = slice(shape.visual_start, shape.visual_start + shape.visual)
    text_pos = torch.arange(s)
    if shape.family == "llama":
        from transformers import LlamaConfig
        from transformers.models.llama import modeling_llama as m
        cfg = LlamaConfig(**common)
        layer, norm, rotary = m.LlamaDecoderLayer(cfg, 0), m.LlamaRMSNorm(shape.hidden, 1e-6), m.LlamaRotaryEmbedding(cfg)
        position_ids = text_pos[None]
    elif shape.family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
        half = shape.hidden // shape.heads // 2
        section = [half - 2 * (half // 3), half // 3, half // 3]
        cfg = Qwen2_5_VLTextConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                              "mrope_section": section})
        layer, norm, rotary = m.Qwen2_5_VLDecoderLayer(cfg, 0), m.Qwen2_5_VLRMSNorm(shape.hidden, 1e-6), \
            m.Qwen2_5_VLRotaryEmbedding(cfg)
    else:  # Qwen3-VL text layer: per-head q/k RMSNorms, interleaved M-RoPE (the 8B model's sections)
        from transformers.models.qwen3_vl import modeling_qwen3_vl as m
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
        head_dim = shape.head_dim or shape.hidden // shape.heads
        section = [24, 20, 20] if head_dim == 128 else [head_dim // 2 - 2 * (head_dim // 6)] + [head_dim // 6] * 2
        cfg = Qwen3VLTextConfig(**common, head_dim=head_dim, rope_parameters={
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": section, "mrope_interleaved": True})
        layer, norm, rotary = m.Qwen3VLTextDecoderLayer(cfg, 0), m.Qwen3VLTextRMSNorm(shape.hidden, 1e-6), \
            m.Qwen3VLTextRotaryEmbedding(cfg)
    if shape.family != "llama":
        # M-RoPE: text tokens share (t, h, w); the image is a grid after its first position,
        # and the text after it continues from the grid's largest index.
        pos = torch.arange(s)[None].repeat(3, 1)
        i = torch.arange(shape.visual)
        start = shape.visual_start
        pos[0, visual] = start
        pos[1, visual] = start + i // shape.grid_w
        pos[2, visual] = start + i % shape.grid_w
        after = int(pos[:, visual].max()) + 1
        pos[:, visual.stop:] = after + torch.arange(s - visual.stop)
        position_ids = pos[:, None]
    head = nn.Linear(shape.hidden, shape.vocab, bias=False)
    with torch.no_grad():  # non-trivial norm gains, so that they matter
        for mod in (layer, norm):
            for name, p in mod.named_parameters():
                if p.dim() == 1 and not name.endswith("bias"):
                    p.uniform_(0.5, 1.5)
    layer, norm, head = (mod.to(device=device, dtype=dtype).eval() for mod in (layer, norm, head))
    hidden = torch.randn(1, s, shape.hidden, device=device).to(dtype)
    cos, sin = rotary.to(device)(hidden, position_ids.to(device))
    return layer, norm, head, hidden, (cos, sin), visual


def _rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.float() - truth.float()).abs().max() / truth.float().abs().max())


def bench_shape(shape: Shape, device: torch.device, dtype: torch.dtype, repeat: int) -> list[dict]:
    layer, norm, head, hidden, pe, visual = build_stage(shape, dtype, device)
    args = (layer, norm, head, hidden, pe)
    out: dict[str, torch.Tensor] = {}
    ref_fn = lambda: out.__setitem__("ref", reference.proxy_saliency(*args))  # noqa: E731
    fast_fn = lambda: out.__setitem__("fast", proxy_saliency(*args))  # noqa: E731
    # The reference takes minutes per call on CPU: no separate warm-up there; the scores
    # compared are those of the last timed call.
    warm = 1 if device.type == "cuda" else 0
    ref_ms = harness.time_ms(ref_fn, warmup=warm, repeat=repeat, device=device)
    fast_ms = harness.time_ms(fast_fn, warmup=1, repeat=repeat, device=device)
    ref_scores, fast_scores = out["ref"], out["fast"]
    base = dict(shape=shape.name, dtype=str(dtype).replace("torch.", ""), seq_len=shape.seq_len,
                visual=shape.visual, hidden=shape.hidden, vocab=shape.vocab)
    rows = [dict(base, kind="stage", ref_ms=ref_ms, fast_ms=fast_ms, speedup=ref_ms / fast_ms,
                 max_rel_err_visual=_rel_err(fast_scores[0, visual], ref_scores[0, visual]),
                 backend="auto")]
    if device.type == "cuda":
        torch_fn = lambda: proxy_saliency(*args, backend="torch")  # noqa: E731
        torch_ms = harness.time_ms(torch_fn, warmup=1, repeat=repeat, device=device)
        rows.append(dict(base, kind="stage", ref_ms=ref_ms, fast_ms=torch_ms, speedup=ref_ms / torch_ms,
                         max_rel_err_visual=_rel_err(torch_fn()[0, visual], ref_scores[0, visual]),
                         backend="torch"))
        rows += bench_kernels(shape, head, norm, hidden, device, repeat, base)
    del layer, norm, head, hidden, pe, ref_scores, fast_scores
    gc.collect()
    return rows


def bench_kernels(shape: Shape, head: nn.Linear, norm: nn.Module, hidden: torch.Tensor, device: torch.device,
                  repeat: int, base: dict) -> list[dict]:
    """The two Triton kernels against their torch fallbacks (CUDA only), K = 4 loss rows."""
    from pio_kernels.saliency import _epilogue_torch, _head_loss_grad_torch
    from pio_kernels.triton.head_loss import head_loss_grad
    from pio_kernels.triton.saliency_epilogue import saliency_epilogue
    k = 4
    normed = torch.randn(k, shape.hidden, device=device)
    scale = torch.full((k,), 1.0 / k, device=device)
    w = head.weight
    head_bytes = 2 * w.numel() * w.element_size()
    t_tri = harness.time_ms(lambda: head_loss_grad(normed, w, None, scale), warmup=2, repeat=repeat, device=device)
    t_ref = harness.time_ms(lambda: _head_loss_grad_torch(normed, w, None, scale), warmup=2, repeat=repeat,
                            device=device)
    rows = [dict(base, kind="kernel:head_loss", triton_ms=t_tri, torch_ms=t_ref, speedup=t_ref / t_tri,
                 triton_gb_s=head_bytes / t_tri / 1e6, bound_ms=head_bytes / 3.35e12 * 1e3)]
    grad = torch.randn(hidden.shape, device=device)
    rows_idx = torch.arange(shape.seq_len - 1 - k, shape.seq_len - 1, device=device)[None]
    extra = torch.randn(1, k, shape.hidden, device=device)
    gain, eps = norm.weight, norm.variance_epsilon
    epi_bytes = grad.numel() * 4 + hidden.numel() * hidden.element_size()
    t_tri = harness.time_ms(lambda: saliency_epilogue(grad, hidden, gain, eps, rows_idx, extra), warmup=2,
                            repeat=repeat, device=device)
    t_ref = harness.time_ms(lambda: _epilogue_torch(grad, hidden, gain, eps, rows_idx, extra), warmup=2,
                            repeat=repeat, device=device)
    rows.append(dict(base, kind="kernel:saliency_epilogue", triton_ms=t_tri, torch_ms=t_ref, speedup=t_ref / t_tri,
                     triton_gb_s=epi_bytes / t_tri / 1e6, bound_ms=epi_bytes / 3.35e12 * 1e3))
    return rows


def run(device: str | torch.device = "cpu", quick: bool = False, shapes: list[str] | None = None,
        dtype: torch.dtype | None = None, repeat: int = 3) -> list[dict]:
    """Benchmark rows for ``device``; ``quick`` runs one small shape (seconds)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quick:
        chosen = [QUICK]
    else:
        names = shapes or (list(SHAPES) if device.type == "cuda" else ["llava15", "qwen25vl"])
        chosen = [SHAPES[n] for n in names]
    rows: list[dict] = []
    for shape in chosen:
        rows += bench_shape(shape, device, dtype, repeat)
    return rows


COLUMNS = ["shape", "kind", "backend", "dtype", "seq_len", "visual", "ref_ms", "fast_ms", "speedup",
           "max_rel_err_visual", "triton_ms", "torch_ms", "triton_gb_s", "bound_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one small shape (CI smoke)")
    parser.add_argument("--shapes", default=None, help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tag", default=None,
                        help="suffix of the JSON file name (default: the --shapes names, or none)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    ns = parser.parse_args()
    shapes = ns.shapes.split(",") if ns.shapes else None
    for name in shapes or []:
        if name not in SHAPES:
            parser.error(f"--shapes: unknown shape {name!r}, expected one of {list(SHAPES)}")
    dtype = getattr(torch, ns.dtype) if ns.dtype else None
    if ns.threads:
        torch.set_num_threads(ns.threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = run(ns.device, quick=ns.quick, shapes=shapes, dtype=dtype, repeat=ns.repeat)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    harness.print_table(rows, [c for c in COLUMNS if any(c in r for r in rows)])
    if not ns.no_write:
        tag = ns.tag if ns.tag is not None else "quick" if ns.quick else "-".join(shapes or [])
        path = harness.write_results("saliency", ns.device, rows, tag=tag,
                                     extra={"threads": torch.get_num_threads(),
                                            "load_avg_1m": [load_before, load_after]})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
