"""pio-tune (pio_kernels.eval.tune): exact retention, determinism, and a search that beats chance."""
from __future__ import annotations

import json
import random

import pytest

from eval_setup import tiny_llava_and_images
from pio_kernels.eval.accounting import schedule_tokens_per_layer
from pio_kernels.eval.cli import tune_main
from pio_kernels.eval.fidelity import fidelity, objective, reference_outputs
from pio_kernels.eval.tiny import write_checkpoint
from pio_kernels.eval.tune import Candidate, SearchSpace, published_default, search
from pio_kernels.integrations import PioConfig

TARGET = 0.25  # on the tiny LLaVA (64 tokens, 8 layers): 128 token-layers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_llava_and_images(tmp_path_factory.mktemp("tune"))


@pytest.mark.parametrize("n, layers, stages, encoder", [(576, 32, (1, 2, 3), False), (576, 32, (1, 2), True),
                                                        (64, 8, (2, 3), True), (1296, 28, (3,), False)])
def test_every_candidate_meets_the_target_exactly(n, layers, stages, encoder):
    total = round(n * layers / 9)
    for ints in (True, False):
        space = SearchSpace(n=n, num_layers=layers, total=total, stages=stages, encoder=encoder, ints=ints)
        rng = random.Random(1)
        cands = [space.sample(rng) for _ in range(30)]
        cands += [space.neighbour(rng, c) for c in cands[:10] if c is not None]
        cands = [c for c in cands if c is not None]
        assert len(cands) >= 30
        for cand in cands:
            config = space.config(cand)
            assert sum(schedule_tokens_per_layer(config, n, layers)) == total
            assert len(config.layers) in stages and (config.encoder_keep is not None) == encoder
            assert all(isinstance(k, int if ints else float) for k in config.keep)


def test_published_schedules_are_in_the_space():
    """LLaVA-1.5's published schedules meet 1/9 exactly: the accounting the search uses."""
    space = SearchSpace(n=576, num_layers=32, total=2048)
    assert space.feasible(Candidate((1, 10, 15), (92, 54, 22)))
    assert space.feasible(Candidate((16,), (32,), 96))
    assert not space.feasible(Candidate((1, 10, 15), (92, 54, 23)))
    label, config = published_default("llava-1.5", 32, 576, encoder=False)
    assert label == "llava-1.5" and config == PioConfig(layers=(1, 10, 15), keep=(92, 54, 22))
    label, config = published_default("llava-1.5", 8, 64, encoder=True)
    assert "scaled" in label and config.layers == (4,) and config.encoder_keep == 11
    label, config = published_default("qwen2-vl", 8, 64, encoder=False)  # its default has the encoder side
    assert config == PioConfig(layers=(4,), keep=(0.333,), encoder_keep=0.167) and "no preset without" in label


def test_search_meets_target_is_deterministic_and_beats_random(setup, tmp_path):
    _, _, vlm, samples = setup
    kwargs = dict(stages=(1, 2, 3), budget=6, seed=3, batch_size=3, progress=False)
    a = search(vlm, samples, TARGET, out=str(tmp_path / "a"), **kwargs)
    b = search(vlm, samples, TARGET, **kwargs)
    assert a["target_token_layers"] == 128 and a["retention"] == TARGET
    assert [c["candidate"] for c in a["candidates"]] == [c["candidate"] for c in b["candidates"]]
    assert [c["objective"] for c in a["candidates"]] == [c["objective"] for c in b["candidates"]]
    assert a["best"]["config"] == b["best"]["config"]
    assert len(a["candidates"]) == 6 and {c["phase"] for c in a["candidates"]} == {"random", "local"}
    for c in a["candidates"]:
        assert c["token_layers"] == 128
        assert c["retention"] == pytest.approx(TARGET)  # what the prefills really kept
    best = a["best"]
    assert best["objective"] == min(c["objective"] for c in a["candidates"])
    saved = json.load(open(tmp_path / "a" / "best_config.json"))
    config = PioConfig(**saved)
    assert saved == best["config"]
    # the search beats schedules drawn at random from the same space, on its own objective
    ref = reference_outputs(vlm, samples, batch_size=3, generate=False, progress=False)
    space = SearchSpace(n=64, num_layers=8, total=128, stages=(1, 2, 3))
    rng = random.Random(12345)
    for _ in range(3):
        cand = space.sample(rng)
        run = fidelity(vlm, samples, space.config(cand), ref, batch_size=3, generate=False, progress=False)
        assert best["objective"] <= objective(run, "kl"), cand
    assert a["published_default"]["objective"] > 0 and "retention_at_n" in a["published_default"]
    assert sum(schedule_tokens_per_layer(config, 64, 8)) == 128


def test_cli_writes_best_config_and_candidates(setup, tmp_path, capsys):
    path, folder, _, _ = setup
    out = tmp_path / "out"
    rc = tune_main([path, folder, "--dtype", "float32", "--target", "0.3", "--budget", "2", "--stages", "1",
                    "--encoder", "--batch-size", "3", "--no-progress", "--out", str(out)])
    assert rc == 0
    report = json.load(open(out / "tune.json"))
    config = PioConfig(**json.load(open(out / "best_config.json")))
    assert config.encoder_keep is not None and len(config.layers) == 1
    assert report["target_token_layers"] == round(0.3 * 64 * 8) == 154
    assert all(c["token_layers"] == 154 for c in report["candidates"])
    assert "published_default" in report and "default" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tune_main([path, folder, "--target", "1.5", "--out", str(out)])


@pytest.mark.parametrize("family", ["qwen3-vl", "llava-onevision"])
def test_cli_on_the_other_families(setup, family, tmp_path):
    """Dynamic token counts (fraction budgets), the encoder side, and the family's default beside."""
    _, folder, _, _ = setup
    path = write_checkpoint(str(tmp_path / family), family)
    out = tmp_path / "out"
    assert tune_main([path, folder, "--dtype", "float32", "--target", "0.3", "--budget", "2", "--stages", "1",
                      "--encoder", "--batch-size", "3", "--no-progress", "--out", str(out)]) == 0
    report = json.load(open(out / "tune.json"))
    assert report["budgets_are"] == "fractions of each stage's input" and len(report["visual_tokens_seen"]) >= 2
    total = report["target_token_layers"]
    assert total == round(0.3 * report["visual_tokens"] * 8)
    assert all(c["token_layers"] == total for c in report["candidates"])
    config = PioConfig(**json.load(open(out / "best_config.json")))
    assert config.encoder_keep is not None and len(config.layers) == 1
    assert report["published_default"]["name"].startswith(
        "qwen3-vl-ve (scaled to 8 layers)" if family == "qwen3-vl" else "llava-onevision-0.5b-ve (scaled to 8 layers)")
