"""The lmms-eval plugin on tiny random-weight checkpoints (pio_kernels.eval.lmms_plugin).

In process: batching with padding gives what one request at a time gives, loglikelihood
equals a plain unbatched forward, the per-sample accounting equals the schedule's, and every
supported family loads by detection. Then the real CLI: ``torchrun --nproc_per_node 2 -m
lmms_eval --model pio ... --batch_size 2`` on a local generation task and a local
multiple-choice task, checked through the results JSON and the logged samples.

Needs lmms-eval (``pip install -e .[eval] && pip install --no-deps lmms-eval==0.7.3``); without it
the module is skipped, unless ``PIO_REQUIRE_EVAL=1`` (CI), which makes that a failure.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

try:
    import lmms_eval  # noqa: F401
except ImportError:
    if os.environ.get("PIO_REQUIRE_EVAL") == "1":
        raise
    pytest.skip("lmms-eval is not installed (pip install -e .[eval] && pip install --no-deps lmms-eval==0.7.3)",
                allow_module_level=True)

from lmms_eval.api.instance import GenerationResult, Instance  # noqa: E402

from pio_kernels.eval.accounting import resolve_budget, schedule_retention  # noqa: E402
from pio_kernels.eval.lmms_plugin import PioLMM, summarize  # noqa: E402
from pio_kernels.eval.schedules import make_config  # noqa: E402
from pio_kernels.eval.tasks.local import Sample, doc_to_visual, write_task  # noqa: E402
from pio_kernels.eval.tiny import sample_images, write_checkpoint  # noqa: E402
from pio_kernels.eval.vlm import FAMILIES, detect_family  # noqa: E402

pytestmark = pytest.mark.eval

SCHEDULE = dict(layers="[2,4]", keep="[16,8]")  # on the tiny LLaVA: 64 visual tokens, 8 layers
NEW_FAMILIES = ("qwen2-vl", "qwen3-vl", "qwen3-vl-moe", "llava-onevision")
QUESTIONS = ["What is shown in this image?", "Is there a person?", "Describe it briefly.", "Which color dominates?"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: write_checkpoint(str(root / f), f) for f in ("llava-1.5", "llava-next", "qwen2.5-vl") + NEW_FAMILIES}


def _docs():
    images = sample_images()
    return [{"image": images[i % len(images)], "question": q} for i, q in enumerate(QUESTIONS)]


def _lmm(path, batch_size, **kwargs):
    lm = PioLMM(pretrained=path, dtype="float32", batch_size=batch_size, **kwargs)
    lm.task_dict = {"t": {"test": _docs()}}
    return lm


def _gen_requests(max_new_tokens=6):
    gen = {"max_new_tokens": max_new_tokens, "temperature": 0, "until": ["\n"]}
    return [Instance("generate_until", (d["question"], dict(gen), doc_to_visual, i, "t", "test"), idx=0,
                     metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(_docs())]


def _ll_requests(continuations=(" yes", " no", " a woman in uniform", "B")):
    return [Instance("loglikelihood", (d["question"], c, doc_to_visual, i, "t", "test"), idx=0,
                     metadata={"task": "t", "doc_id": i, "repeats": 1})
            for i, (d, c) in enumerate(zip(_docs(), continuations))]


def _unwrap(results):
    assert all(isinstance(r, GenerationResult) for r in results)
    return [r.text for r in results], [r.token_counts.to_dict()["pio"] for r in results]


def test_entry_point_resolves_the_plugin():
    from lmms_eval.models import get_model
    assert get_model("pio") is PioLMM and get_model("pio_vlm") is PioLMM


@pytest.mark.parametrize("family", ["llava-1.5", "qwen2.5-vl", "llava-next", *NEW_FAMILIES])
def test_batched_requests_equal_one_at_a_time(checkpoints, family):
    schedule = SCHEDULE if family == "llava-1.5" else dict(layers="[2,4]", keep="[0.5,0.25]")
    if family in NEW_FAMILIES:  # their encoder side too (OneVision: per base crop and high-resolution grid)
        schedule = dict(schedule, encoder_keep="0.5")
    one, two = _lmm(checkpoints[family], 1, **schedule), _lmm(checkpoints[family], 2, **schedule)
    assert one.vlm.family == family
    texts1, stats1 = _unwrap(one.generate_until(_gen_requests()))
    texts2, stats2 = _unwrap(two.generate_until(_gen_requests()))
    assert texts1 == texts2
    strip = lambda stats: [{k: v for k, v in s.items() if k != "selection_ms"} for s in stats]
    assert strip(stats1) == strip(stats2)
    ll1, _ = _unwrap(one.loglikelihood(_ll_requests()))
    ll2, _ = _unwrap(two.loglikelihood(_ll_requests()))
    torch.testing.assert_close(torch.tensor([x[0] for x in ll1]), torch.tensor([x[0] for x in ll2]),
                               rtol=1e-5, atol=1e-4)
    assert [x[1] for x in ll1] == [x[1] for x in ll2]
    if family == "llava-1.5":  # 64 tokens per image: the counts are the schedule's
        want = schedule_retention(make_config(**SCHEDULE), 64, 8)
        assert all(s["visual_tokens"] == 64 and s["kept"] == [16, 8] for s in stats2)
        assert all(s["retained_fraction"] == pytest.approx(want) for s in stats2)
        assert all(len(s["selection_ms"]) == 2 and s["tflops"] < s["tflops_stock"] for s in stats2)
    if family in NEW_FAMILIES:  # the stages keep their fractions of what the encoder side kept, per image
        for s in stats2:
            encoder, first, second = s["kept"]
            assert s["visual_tokens"] >= 16 and encoder in (s["visual_tokens"] // 2, s["visual_tokens"] // 2 - 1)
            assert (first, second) == (resolve_budget(0.5, encoder), resolve_budget(0.25, resolve_budget(0.5, encoder)))
            assert len(s["selection_ms"]) == 3 and 0 < s["tflops"] < s["tflops_stock"]


def test_loglikelihood_equals_a_plain_forward(checkpoints):
    """Stock model, batch 2 with left padding, against one unpadded forward per request."""
    lm = _lmm(checkpoints["llava-1.5"], 2)
    got, stats = _unwrap(lm.loglikelihood(_ll_requests()))
    vlm = lm.vlm
    for (loss, greedy), request in zip(got, _ll_requests()):
        context, cont, _, doc_id, _, _ = request.args
        prompt = vlm.prompt(context, 1)
        image = doc_to_visual(_docs()[doc_id])
        full = vlm.processor(text=[prompt + cont], images=image, return_tensors="pt")
        n_ctx = vlm.processor(text=[prompt], images=image, return_tensors="pt")["input_ids"].shape[1]
        with torch.no_grad():
            logits = vlm.model(**full).logits[0].float()
        ids = full["input_ids"][0]
        logp = torch.log_softmax(logits[n_ctx - 1:-1], dim=-1)
        target = ids[n_ctx:]
        # lmms-eval's convention: the mean negative log-likelihood of the continuation's tokens
        assert loss == pytest.approx(-float(logp.gather(1, target[:, None]).mean()), rel=1e-5, abs=1e-5)
        assert greedy == bool((logp.argmax(-1) == target).all())
    assert all(s["retained_fraction"] == 1.0 and s["kept"] == [] and s["selection_ms"] is None for s in stats)


def test_detection_names_every_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported") as err:
        detect_family(str(tmp_path))
    for model_type, family in FAMILIES.items():
        assert f"{model_type} ({family})" in str(err.value)
    assert {"qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision"} <= set(FAMILIES)


def test_default_preset_fits_the_model(checkpoints, tmp_path):
    """``preset=default``: the family's preset set for the model's depth as it is, else scaled to it."""
    deep = write_checkpoint(str(tmp_path / "ov24"), "llava-onevision", layers=24)
    lm = _lmm(deep, 2, preset="default")
    assert lm.pio_config == make_config("llava-onevision-0.5b-ve")  # set for 24 layers
    _, stats = _unwrap(lm.generate_until(_gen_requests(max_new_tokens=1)[:2]))
    assert all(len(s["kept"]) == 2 and 0.08 < s["retained_fraction"] < 0.15 for s in stats)  # about 11.1%
    lm = _lmm(checkpoints["qwen2-vl"], 1, preset="default", keep="[0.5]")
    assert lm.pio_config == make_config(layers="[4]", keep="[0.5]", encoder_keep=0.167)  # 14 of 28 -> 4 of 8
    with pytest.raises(ValueError, match="layers must be < the model's 8 decoder layers"):
        PioLMM(pretrained=checkpoints["qwen3-vl"], preset="qwen3-vl-ve")


def test_bad_model_args_name_the_problem(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="unknown model_args"):
        PioLMM(pretrained=checkpoints["llava-1.5"], temprature=0)
    with pytest.raises(ValueError, match="local checkpoint folder"):
        PioLMM(pretrained=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="preset must be one of"):
        PioLMM(pretrained=checkpoints["llava-1.5"], preset="llava-2")
    lm = _lmm(checkpoints["llava-1.5"], 1)
    lm.task_dict = {"t": {"test": [{"video": "clip.mp4", "question": "?"}]}}
    request = Instance("generate_until", ("?", {}, lambda doc: [doc["video"]], 0, "t", "test"), idx=0,
                       metadata={"task": "t", "doc_id": 0, "repeats": 1})
    with pytest.raises(ValueError, match="only image inputs"):
        lm.generate_until([request])


def test_model_args_choose_the_baseline(checkpoints):
    lm = PioLMM(pretrained=checkpoints["llava-1.5"], dtype="float32", preset="llava-1.5-128", layers="[2,4]",
                keep="[16,8]", scoring="attention", selection="topk", seed=3, tau=0.5)
    c = lm.pio_config
    assert (c.layers, c.keep, c.scoring, c.selection, c.seed, c.tau) == ((2, 4), (16, 8), "attention", "topk", 3, 0.5)
    lm.task_dict = {"t": {"test": _docs()}}
    _, stats = _unwrap(lm.generate_until(_gen_requests(max_new_tokens=2)[:2]))
    assert all(s["kept"] == [16, 8] for s in stats)
    assert PioLMM(pretrained=checkpoints["llava-1.5"], dtype="float32", preset="stock").pio_config is None


def test_summarize_means_overall_and_per_task():
    rec = lambda task, r, f: {"task": task, "pio": {"visual_tokens": 10, "retained_fraction": r, "tflops": f,
                                                      "tflops_stock": 2.0, "selection_ms": [1.0, 2.0]}}
    s = summarize([rec("a", 0.5, 1.0), rec("a", 0.25, 0.5), rec("b", 1.0, 2.0)])
    assert s["pio_responses"] == 3 and s["pio_retained_fraction"] == pytest.approx(1.75 / 3)
    assert s["pio_a_retained_fraction"] == 0.375 and s["pio_b_flops_fraction"] == 1.0
    assert s["pio_flops_fraction"] == pytest.approx(3.5 / 6) and s["pio_selection_ms"] == 3.0


def test_lmms_eval_cli_torchrun_two_processes_batch_two(checkpoints, tmp_path):
    """The done criterion: the real CLI, offline, 2 processes, batch size 2, a generation task and
    a multiple-choice task; the results JSON and the logged samples are checked against the
    same model run in this process."""
    path = checkpoints["llava-1.5"]
    images = sample_images()
    lm = _lmm(path, 1, **SCHEDULE)
    texts, _ = _unwrap(lm.generate_until(_gen_requests(max_new_tokens=8)))
    # two answers are what the model says (exact match 1), two are not
    gen = [Sample(images[i % 3], q, texts[i] if i < 2 else "zzz") for i, q in enumerate(QUESTIONS)]
    mc = [Sample(images[0], "Is there a person?", "yes", ["yes", "no"]),
          Sample(images[1], "Which shape is it?", "B", ["A", "B", "C"]),
          Sample(images[2], "Is it blue?", "no", ["yes", "no"])]
    task_dir = tmp_path / "tasks"
    write_task(str(task_dir), "pio_gen", gen, max_new_tokens=8)
    write_task(str(task_dir), "pio_mc", mc, multiple_choice=True)
    # what the multiple-choice docs score here, one request at a time
    lm.task_dict = {"m": {"test": [{"image": s.image, "question": s.prompt} for s in mc]}}
    want_acc = []
    for i, s in enumerate(mc):
        reqs = [Instance("loglikelihood", (s.prompt, " " + c, doc_to_visual, i, "m", "test"), idx=0,
                         metadata={"task": "m", "doc_id": i, "repeats": 1}) for c in s.choices]
        losses = [r[0] for r in _unwrap(lm.loglikelihood(reqs))[0]]
        want_acc.append(float(losses.index(min(losses)) == s.choices.index(s.answer)))  # lmms-eval: argmin

    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    model_args = f"pretrained={path},dtype=float32,layers={SCHEDULE['layers']},keep={SCHEDULE['keep']}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmms_eval",
           "--model", "pio", "--model_args", model_args, "--include_path", str(task_dir), "--tasks", "pio_gen,pio_mc",
           "--batch_size", "2", "--output_path", str(out), "--log_samples", "--verbosity", "DEBUG"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Running on rank 1" in log, log[-4000:]  # two processes ran
    results = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert len(results) == 1, log[-4000:]  # lmms-eval exits 0 on failure too: the JSON must exist
    report = json.load(open(results[0]))
    assert report["config"]["model"] == "pio" and report["config"]["batch_size"] == "2"
    assert report["n-samples"]["pio_gen"]["effective"] == 4 and report["n-samples"]["pio_mc"]["effective"] == 3
    assert report["results"]["pio_gen"]["exact_match,none"] == pytest.approx(0.5)
    assert report["results"]["pio_mc"]["acc,none"] == pytest.approx(sum(want_acc) / 3)
    retention = schedule_retention(make_config(**SCHEDULE), 64, 8)
    throughput = report["throughput"]
    assert throughput["avg_pio_retained_fraction"] == pytest.approx(retention)
    assert throughput["avg_pio_responses"] == 4 + 7  # 4 generations, 2 + 3 + 2 choices, from both processes
    assert throughput["avg_pio_pio_mc_visual_tokens"] == 64 and throughput["avg_pio_selection_ms"] > 0
    for task, n_docs in (("pio_gen", 4), ("pio_mc", 3)):
        files = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
        rows = [json.loads(line) for line in open(files[0])]
        assert sorted(r["doc_id"] for r in rows) == list(range(n_docs))
        for r in rows:
            for counts in r["token_counts"]:
                assert counts["pio"]["retained_fraction"] == pytest.approx(retention)
                assert counts["pio"]["kept"] == [16, 8] and counts["pio"]["tflops"] > 0
        if task == "pio_mc":
            assert [r["acc"] for r in sorted(rows, key=lambda r: r["doc_id"])] == want_acc
