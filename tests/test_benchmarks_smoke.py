"""The demo and the benchmark scripts stay working: tiny shapes on CPU, files written with their keys.

Runs in-process (one import of transformers for all of them), results into a temporary folder
so the committed ``benchmarks/results/`` is never touched. Nothing here times anything: the
figures are checked for presence and consistency (a reduced KV cache, one selection time per
stage), not for speed.
"""
from __future__ import annotations

import json
import os
import sys
import types

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("transformers")
if not hasattr(pytest.importorskip("pio_kernels.integrations"), "apply_pio"):
    pytest.skip("pio_kernels.integrations.apply_pio is not on this branch yet", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for sub in ("benchmarks", "examples"):
    if os.path.join(ROOT, sub) not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, sub))

import e2e  # noqa: E402
import kernels  # noqa: E402
import plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes run fastest on one thread (and do not fight the rest of the suite for cores)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_published_schedules_and_flop_formula():
    # SPEC 6: 2.98 T for LLaVA-1.5-7B's 576 visual tokens over 32 layers (d 4096, m 11008).
    assert e2e.visual_tflops([576] * 32, 4096, 11008) == pytest.approx(2.98, abs=0.01)
    ve, no_ve = e2e.schedules("llava-1.5-7b", 576, 32, 1 / 9)
    assert (ve.layers, ve.keep, ve.encoder_keep, ve.source) == ((16,), (32,), 96, "published")
    assert (no_ve.layers, no_ve.keep, no_ve.source) == ((1, 10, 15), (92, 54, 22), "published")
    for schedule in (ve, no_ve):  # both average 64 of 576 tokens over the 32 layers
        assert sum(schedule.tokens_per_layer(576, 32)) == 64 * 32
    _, no_ve_128 = e2e.schedules("llava-1.5-7b", 576, 32, 2 / 9)
    assert no_ve_128.keep == (218, 128, 54)
    qwen_ve, qwen_no_ve = e2e.schedules("qwen2.5-vl-7b", 1296, 28, 1 / 9)
    assert (qwen_ve.layers, qwen_ve.keep, qwen_ve.encoder_keep) == ((14,), (0.333,), 0.167)
    assert sum(qwen_no_ve.tokens_per_layer(1296, 28)) / (1296 * 28) == pytest.approx(1 / 9, abs=0.002)


def test_demo_writes_png(tmp_path):
    import demo

    out = demo.main(["--out", str(tmp_path)])
    png = tmp_path / "demo.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    expected = {"w/ VE": ["encoder", "layer 8"], "w/o VE": ["layer 1", "layer 5", "layer 8"]}
    budgets = {"w/ VE": [96, 32], "w/o VE": [92, 54, 22]}
    assert [r["name"] for r in out["results"]] == list(expected)
    for result in out["results"]:
        assert [label for label, _ in result["panels"]] == expected[result["name"]]
        kept = [sorted(p for p in positions if p >= 0) for _, positions in result["panels"]]
        assert [len(k) for k in kept] == budgets[result["name"]]
        for before, after in zip(kept, kept[1:]):  # every stage keeps a subset of the previous one
            assert set(after) <= set(before)
        # An encoder stage's time is net of the stock vision tower, so only the decoder stages must be > 0.
        assert len(result["stage_ms"]) == len(kept)
        assert all(ms > 0 for (label, _), ms in zip(result["panels"], result["stage_ms"]) if label != "encoder")
        assert 0 < result["kv_mb"] < out["stock_kv_mb"]


def test_demo_local_checkpoint(tmp_path):
    """``--model PATH``: a saved checkpoint and processor, loaded from local files only."""
    import demo
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    prep = demo.tiny_llava(demo._image_path(None), torch.device("cpu"))
    words = ["<unk>", "<s>", "</s>", "USER:", "ASSISTANT:", "What", "is", "shown", "in", "this", "image?"]
    vocab = {w: i for i, w in enumerate(words)} | {"<image>": prep.model.config.image_token_id}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                                                  crop_size={"height": 336, "width": 336}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               image_token="<image>", num_additional_image_tokens=1)
    checkpoint = tmp_path / "tiny-llava"
    processor.save_pretrained(checkpoint)
    prep.model.save_pretrained(checkpoint)
    out = demo.main(["--model", str(checkpoint), "--max-new-tokens", "2", "--out", str(tmp_path)])
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG_MAGIC
    kept = {r["name"]: [len([p for p in positions if p >= 0]) for _, positions in r["panels"]]
            for r in out["results"]}
    assert kept == {"w/ VE": [96, 32], "w/o VE": [92, 54, 22]}
    assert all(isinstance(r["answer"], str) for r in out["results"])


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    rows = e2e.main(["--quick", "--models", "llava-1.5-7b", "--batches", "1", "--retentions", str(1 / 9),
                     "--repeat", "1", "--warmup", "0", "--new-tokens", "2",
                     "--results-dir", str(folder), "--tag", "smoke"])
    return folder, rows


def test_e2e_quick_writes_json(e2e_run):
    folder, _ = e2e_run
    (path,) = folder.glob("e2e-*-smoke.json")
    data = json.loads(path.read_text())
    for key in ("benchmark", "device", "torch", "triton", "transformers", "date", "size", "dtype", "rows"):
        assert key in data
    assert data["benchmark"] == "e2e" and data["size"] == "tiny"
    rows = {(r["schedule"], r["path"]): r for r in data["rows"]}
    assert set(rows) == {("stock", "stock"), ("w/o VE", "ours"), ("w/o VE", "reference"), ("w/ VE", "ours"),
                         ("w/ VE", "reference")}
    stock = rows["stock", "stock"]
    for row in rows.values():
        assert "error" not in row, row.get("error")
        for key in ("prefill_ms", "total_ms", "kv_cache_mb", "tflops", "retention", "batch", "model"):
            assert key in row
    stages = {"w/o VE": ["decoder"] * 3, "w/ VE": ["encoder", "decoder"]}
    for (schedule, path), row in rows.items():
        if path == "stock":
            continue
        assert row["retention"] == pytest.approx(1 / 9, abs=1e-3)
        assert row["selection_stages"] == stages[schedule] and len(row["selection_ms"]) == len(stages[schedule])
        assert row["tower_ms"] > 0 and all(ms > 0 for ms in row["selection_ms"])
        assert row["counts_from"] == "measured"
        assert row["kv_cache_mb"] < stock["kv_cache_mb"] and row["tflops"] < stock["tflops"]
        assert row["prefill_speedup"] == pytest.approx(stock["prefill_ms"] / row["prefill_ms"])
    assert rows["w/o VE", "ours"]["keep"] == [92, 54, 22] and rows["w/o VE", "ours"]["layers"] == [1, 10, 15]
    assert rows["w/ VE", "ours"]["encoder_keep"] == 96 and rows["w/ VE", "ours"]["keep"] == [32]
    # The KV cache is what the schedule leaves: 64 prompt text tokens plus the visual tokens of each layer.
    per_token_layer = stock["kv_cache_mb"] / (stock["seq_len"] * 32)
    for schedule in stages:
        row = rows[schedule, "ours"]
        cached = sum(64 + n for n in e2e.schedules("llava-1.5-7b", 576, 32, 1 / 9)[schedule == "w/o VE"]
                     .tokens_per_layer(576, 32))
        assert row["kv_cache_mb"] == pytest.approx(per_token_layer * cached)


def test_plot_and_readme_section(e2e_run):
    folder, _ = e2e_run
    section = folder / "section.md"
    pngs = plot.main(["--results", str(folder), "--markdown-out", str(section)])
    assert len(pngs) == 1
    (written,) = folder.glob("speedup-*-tiny.png")
    assert written.read_bytes()[:8] == PNG_MAGIC
    text = section.read_text()
    assert "## Results" in text and "tiny CPU shapes" in text and "still to be measured" in text
    assert "| llava-1.5-7b | 1 | w/o VE | ours |" in text


def test_kernels_survives_absent_and_failing_suites(tmp_path, monkeypatch):
    def failing(device, quick):
        raise RuntimeError("boom")

    suites = {"saliency": None,  # absent
              "nms": types.SimpleNamespace(run=lambda device, quick: [{"shape": "tiny", "ms": 1.0}])}
    monkeypatch.setattr(kernels, "load_suite", lambda name: suites[name])
    rows = kernels.main(["--device", "cpu", "--results-dir", str(tmp_path), "--tag", "smoke"])
    assert rows == [{"suite": "nms", "shape": "tiny", "ms": 1.0}]
    data = json.loads(next(tmp_path.glob("kernels-*-smoke.json")).read_text())
    assert data["benchmark"] == "kernels" and data["suites"] == {"saliency": "absent", "nms": "ran"}
    suites["saliency"] = types.SimpleNamespace(run=failing)
    kernels.main(["--device", "cpu", "--results-dir", str(tmp_path), "--tag", "smoke"])
    data = json.loads(next(tmp_path.glob("kernels-*-smoke.json")).read_text())
    assert data["suites"]["saliency"].startswith("failed: RuntimeError: boom") and len(data["rows"]) == 1


def test_schedules_follow_the_depth():
    """Half depth (16 of 32 layers): the published stage layers scaled, the averages kept."""
    ve, no_ve = e2e.schedules("llava-1.5-7b", 576, 16, 1 / 9)
    assert (ve.layers, ve.keep, ve.encoder_keep, ve.source) == ((8,), (32,), 96, "scaled")
    assert no_ve.layers == (1, 5, 8) and no_ve.source == "scaled"
    for schedule in (ve, no_ve):
        assert sum(schedule.tokens_per_layer(576, 16)) / (576 * 16) == pytest.approx(1 / 9, abs=0.003)
    qwen_ve, _ = e2e.schedules("qwen2.5-vl-7b", 576, 10, 1 / 9)
    assert (qwen_ve.layers, qwen_ve.keep, qwen_ve.encoder_keep) == ((5,), (0.333,), 0.167)
    # Too shallow for three distinct stages: the w/o VE schedule is left out, w/ VE stays.
    assert [s.name for s in e2e.schedules("llava-1.5-7b", 576, 2, 1 / 9)] == ["w/ VE"]
    assert e2e.schedules("llava-1.5-7b", 576, 2, 1 / 9)[0].layers == (1,)


def test_half_size_shapes_on_meta(monkeypatch):
    """The ``half`` size: full 7B widths, the stated depths, a tied head, within ~14 GiB of fp32."""
    import torch
    import vlm_shapes

    real = vlm_shapes._instantiate
    monkeypatch.setattr(vlm_shapes, "_instantiate", lambda cls, config, device, dtype:
                        real(cls, config, torch.device("meta"), dtype))
    for name, layers, vision, gib in (("llava-1.5-7b", 16, 24, 13.8), ("qwen2.5-vl-7b", 10, 16, 12.1)):
        built = vlm_shapes.build(name, "half", "cpu", torch.float32)
        config = built.model.config
        assert (built.num_layers, built.hidden, built.visual_tokens) == (layers, 4096 if "llava" in name else 3584, 576)
        vision_depth = getattr(config.vision_config, "depth", None) or config.vision_config.num_hidden_layers
        assert vision_depth == vision
        assert built.model.lm_head.weight is built.model.get_input_embeddings().weight
        params = {id(p): p.numel() for p in built.model.parameters()}
        assert sum(params.values()) * 4 / 2**30 == pytest.approx(gib, abs=0.1)
    small = vlm_shapes.build("qwen2.5-vl-7b", "half", "cpu", torch.float32, layers=2, vision_layers=2)
    assert small.num_layers == 2 and small.model.config.vision_config.fullatt_block_indexes == [1]
    with pytest.raises(ValueError, match="layers must be >= 1"):
        vlm_shapes.build("llava-1.5-7b", "half", "cpu", layers=0)


def test_nms_benchmark_plumbing(tmp_path, monkeypatch):
    """benchmarks/nms.py at a tiny shape: every CPU path, both kinds, the JSON and its keys."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import nms as nms_bench

    shapes = {n for _, n, _, _, _ in nms_bench._shapes("gpu-check")}
    assert shapes == {576, 2880, 16384} and {k for *_, k in nms_bench._shapes("gpu-check")} == {"clustered", "heavy"}
    assert {b for b, *_ in nms_bench._shapes("gpu-check")} == {1, 8}
    x, _ = nms_bench._features(1, 300, 64, "cpu", kind="heavy")
    xn = torch.nn.functional.normalize(x[0].float(), dim=-1)
    cos = xn @ xn.T
    distinct = (xn[:, 1:17].abs().sum(1) > 0)
    assert int(distinct.sum()) == 16 and cos[~distinct][:, ~distinct].min() > 0.9
    monkeypatch.setattr(nms_bench, "_shapes", lambda preset: [(2, 300, 64, 8, "clustered"), (1, 300, 64, 8, "heavy")])
    rows = nms_bench.main(["--device", "cpu", "--results-dir", str(tmp_path), "--tag", "smoke"])
    assert {r["path"] for r in rows} == set(pio_kernels_backends("cpu"))
    assert all(r["identical"] and r["identical_to"] == "reference" for r in rows)
    data = json.loads(next(tmp_path.glob("nms-*-smoke.json")).read_text())
    assert data["benchmark"] == "nms" and len(data["rows"]) == len(rows) and "date" in data


def pio_kernels_backends(device):
    from pio_kernels.ops import available_backends

    return available_backends(device)
