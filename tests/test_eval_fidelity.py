"""Label-free fidelity (pio_kernels.eval.fidelity) and its CLI, on a tiny random-weight LLaVA."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from eval_setup import tiny_llava_and_images
from pio_kernels.eval.cli import eval_main, parse_spec
from pio_kernels.eval.fidelity import compare, fidelity, objective, plot, reference_outputs
from pio_kernels.eval.schedules import make_config
from pio_kernels.eval.tasks.local import DEFAULT_PROMPT, load_folder, write_task
from pio_kernels.eval.tiny import sample_images, write_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_llava_and_images(tmp_path_factory.mktemp("fid"), [
        ("grace_hopper.jpg", "Who is this?"), ("logo2.png", "What does the logo say?"),
        ("Minduka_Present_Blue_Pack.png", "What color is the box?"), ("grace_hopper.jpg", "Describe the uniform.")])


def test_identical_inputs_give_zero_divergence(setup):
    _, _, vlm, samples = setup
    ref = reference_outputs(vlm, samples, batch_size=2, max_new_tokens=4, progress=False)
    for config in (None, make_config(layers="[2]", keep="[1.0]")):  # stock, and a schedule that keeps all
        run = fidelity(vlm, samples, config, ref, batch_size=2, max_new_tokens=4, progress=False)
        assert run["kl"] == 0.0 and run["hidden_drift"] == 0.0 and run["agreement"] == 1.0
        assert run["hidden_cosine"] == pytest.approx(1.0) and run["retention"] == 1.0
        assert all(r["kl"] == 0.0 and r["answer"] == r["reference_answer"] for r in run["per_sample"])
    pruned = fidelity(vlm, samples, make_config(layers="[1]", keep="[4]"), ref, batch_size=2, max_new_tokens=4,
                      progress=False)
    assert pruned["kl"] > 0 and pruned["hidden_drift"] > 0
    assert pruned["retention"] == pytest.approx((64 + 7 * 4) / (8 * 64))
    assert 0 < pruned["flops_fraction"] < 1
    assert objective(pruned, "kl") == pruned["kl"] and objective(pruned, "drift") == pruned["hidden_drift"]
    assert objective(pruned, "disagreement") == 1 - pruned["agreement"]


def test_kl_is_the_definition(setup):
    """KL(P_ref || P_run) from the first-token log-probabilities, checked against torch's kl_div."""
    _, _, vlm, samples = setup
    ref = reference_outputs(vlm, samples[:2], batch_size=2, generate=False, progress=False)
    config = make_config(layers="[2]", keep="[8]")
    run = fidelity(vlm, samples[:2], config, ref, batch_size=2, generate=False, progress=False)
    with vlm.use(config):
        lp = vlm.first_token([vlm.prompt(s.prompt, 1) for s in samples[:2]],
                             [[Image.open(s.image).convert("RGB")] for s in samples[:2]]).logprobs
    want = torch.nn.functional.kl_div(lp, ref.logprobs, log_target=True, reduction="none").sum(-1)
    assert [r["kl"] for r in run["per_sample"]] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-9)
    assert run["agreement"] is None and "answer" not in run["per_sample"][0]
    with pytest.raises(ValueError, match="disagreement"):
        objective(run, "disagreement")
    with pytest.raises(ValueError, match="reference holds 2"):
        fidelity(vlm, samples, config, ref, progress=False)


def test_compare_and_plot(setup, tmp_path):
    _, _, vlm, samples = setup
    report = compare(vlm, samples[:2], {"stock@100": None, "ours@50": make_config(layers="[2]", keep="[0.5]"),
                                        "ours@25": make_config(layers="[2]", keep="[0.25]")},
                     batch_size=2, max_new_tokens=3, progress=False)
    assert [r["name"] for r in report["runs"]] == ["stock@100", "ours@50", "ours@25"]
    assert report["runs"][1]["retention"] > report["runs"][2]["retention"]
    path = plot(report, str(tmp_path / "f.png"))
    assert os.path.getsize(path) > 1000


def test_cli_over_a_folder(setup, tmp_path, capsys):
    path, folder, _, _ = setup
    out = tmp_path / "out"
    rc = eval_main(["fidelity", path, folder, "--dtype", "float32", "--batch-size", "2", "--max-new-tokens", "3",
                    "--method", "stock=preset=stock", "--method", "ours@25=layers=[2],keep=[16]",
                    "--no-progress", "--out", str(out), "--limit", "3"])
    assert rc == 0
    report = json.load(open(out / "fidelity.json"))
    assert report["samples"] == 3 and [r["name"] for r in report["runs"]] == ["stock", "ours@25"]
    assert report["runs"][0]["kl"] == 0.0 and report["runs"][1]["schedule"]["keep"] == [16]
    assert os.path.exists(out / "fidelity.png")
    assert "ours@25" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        eval_main(["fidelity", path, folder, "--method", "preset=llava-1.5", "--out", str(out)])


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl", "qwen3-vl-moe", "llava-onevision"])
def test_cli_on_the_other_families(setup, family, tmp_path):
    """Keeping every token (the encoder side and a stage) is the stock model exactly; the family's
    default (``preset=default``, scaled to 8 layers) prunes."""
    _, folder, _, _ = setup
    path = write_checkpoint(str(tmp_path / family), family)
    out = tmp_path / "out"
    rc = eval_main(["fidelity", path, folder, "--dtype", "float32", "--batch-size", "2", "--max-new-tokens", "3",
                    "--method", "stock=preset=stock", "--method", "all=layers=[2],keep=[1.0],encoder_keep=1.0",
                    "--method", "default=preset=default", "--no-progress", "--no-plot", "--out", str(out)])
    assert rc == 0
    stock, keep_all, default = json.load(open(out / "fidelity.json"))["runs"]
    for run in (stock, keep_all):
        assert run["kl"] == 0.0 and run["hidden_drift"] == 0.0 and run["agreement"] == 1.0 and run["retention"] == 1.0
    assert default["schedule"]["layers"] == [4] and default["schedule"]["encoder_keep"] == 0.167
    assert default["kl"] > 0 and default["retention"] < 0.2 and 0 < default["flops_fraction"] < 0.2


def test_folder_format_and_task_writer(tmp_path):
    images = sample_images()
    folder = tmp_path / "f"
    folder.mkdir()
    shutil.copy(images[0], folder / "a.jpg")
    shutil.copy(images[1], folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    samples = load_folder(str(folder))
    assert [os.path.basename(s.image) for s in samples] == ["a.jpg", "b.png"]
    assert all(s.prompt == DEFAULT_PROMPT for s in samples)
    (folder / "prompts.jsonl").write_text(json.dumps({"image": "a.jpg", "prompt": "Q?", "answer": "yes",
                                                      "choices": ["yes", "no"]}) + "\n")
    (sample,) = load_folder(str(folder))
    assert (sample.prompt, sample.answer, sample.choices) == ("Q?", "yes", ["yes", "no"])
    yaml = write_task(str(tmp_path / "t"), "my_mc", [sample], multiple_choice=True)
    text = open(yaml).read()
    assert "output_type: multiple_choice" in text and "dataset_path: json" in text
    row = json.loads(open(tmp_path / "t" / "my_mc.jsonl").read())
    assert row["label"] == 0 and os.path.isabs(row["image"])
    (folder / "prompts.jsonl").write_text(json.dumps({"image": "zzz.jpg", "prompt": "Q?"}) + "\n")
    with pytest.raises(ValueError, match="not found"):
        load_folder(str(folder))
    with pytest.raises(ValueError, match="no answer"):
        write_task(str(tmp_path / "t"), "gen", [sample.__class__(sample.image, "Q?")])
    with pytest.raises(ValueError, match="no image found"):
        load_folder(str(tmp_path / "t"))
    assert parse_spec("layers=[2,4],keep=[16,8],scoring=random") == {"layers": "[2,4]", "keep": "[16,8]",
                                                                      "scoring": "random"}
