"""Baselines end to end through the engine's scoring hook: every scoring rule and selection on a
tiny LLaVA, checked against the rule computed by hand on the stage layer's input."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from pio_kernels.eval.fidelity import compare, plot
from pio_kernels.eval.schedules import make_config
from pio_kernels.eval.tasks.local import Sample
from pio_kernels.eval.tiny import sample_images, write_checkpoint
from pio_kernels.eval.vlm import LocalVLM
from pio_kernels.integrations import last_selection
from pio_kernels.scoring import StageInputs, attention_scores

LAYER, KEEP = 3, 12


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    path = write_checkpoint(str(tmp_path_factory.mktemp("base") / "llava"), "llava-1.5")
    return LocalVLM.load(path, dtype="float32", attn_implementation="sdpa")


def _batch(vlm):
    images = [[Image.open(p).convert("RGB")] for p in sample_images()[:2]]
    prompts = [vlm.prompt("What is shown?", 1), vlm.prompt("Is there a person in the image?", 1)]
    return vlm.encode(prompts, images)


def _kept(vlm, config, batch):
    with vlm.use(config), torch.no_grad():
        vlm.model(**batch)
        return last_selection(vlm.model)[0]


def _stage_input(vlm, batch):
    """Hidden states entering layer LAYER of the stock model, its (cos, sin) and the mask (a plain
    forward numbers positions 0..S-1 in every sample, padding included)."""
    with torch.no_grad():
        out = vlm.model(**batch, output_hidden_states=True)
    hidden = out.hidden_states[LAYER]
    mask = batch["attention_mask"]
    assert not bool(mask.all())  # the two prompts differ in length: left padding is exercised
    positions = torch.arange(hidden.shape[1])[None]
    lm = vlm.model.model.language_model
    return hidden, lm.rotary_emb(hidden, positions), mask, lm


def _top_rows(scores, batch, image_id):
    """Caller positions of the KEEP best-scoring image rows per sample, ascending (ties: lower row)."""
    rows = []
    for b in range(scores.shape[0]):
        image_rows = (batch["input_ids"][b] == image_id).nonzero().flatten()
        order = torch.sort(scores[b, image_rows], descending=True, stable=True).indices[:KEEP]
        rows.append(sorted(image_rows[order].tolist()))
    return rows


def test_norm_and_attention_topk_keep_the_rules_top_rows(vlm):
    batch = _batch(vlm)
    hidden, pe, mask, lm = _stage_input(vlm, batch)
    image_id = vlm.image_token_ids[0]
    norms = hidden.float().norm(dim=-1)
    got = _kept(vlm, make_config(layers=[LAYER], keep=[KEEP], scoring="norm", selection="topk"), batch)
    assert got.tolist() == _top_rows(norms, batch, image_id)
    inputs = StageInputs(layer=lm.layers[LAYER], final_norm=lm.norm, lm_head=vlm.model.lm_head, hidden_states=hidden,
                         position_embeddings=pe, attention_mask=mask, image_ids=torch.zeros_like(mask))
    got = _kept(vlm, make_config(layers=[LAYER], keep=[KEEP], scoring="attention", selection="topk"), batch)
    assert got.tolist() == _top_rows(attention_scores(inputs), batch, image_id)


def test_random_is_seeded_and_uniform_is_evenly_spaced(vlm):
    batch = _batch(vlm)
    pick = lambda **kw: _kept(vlm, make_config(layers=[LAYER], keep=[KEEP], **kw), batch).tolist()
    assert pick(scoring="random", seed=1) == pick(scoring="random", seed=1)
    assert pick(scoring="random", seed=1) != pick(scoring="random", seed=2)
    uniform = pick(selection="uniform")
    starts = [int((batch["input_ids"][b] == vlm.image_token_ids[0]).nonzero()[0]) for b in range(2)]
    local = [[p - s for p in row] for row, s in zip(uniform, starts)]
    assert local[0] == local[1]  # the same grid slots whatever the image
    assert local[0] == [int((j + 0.5) * 64 / KEEP) for j in range(KEEP)]
    nms, topk = pick(), pick(selection="topk")
    assert len(nms[0]) == len(topk[0]) == KEEP


@pytest.mark.parametrize("method", ["saliency-nms", "saliency-topk", "random-nms", "attention-nms", "norm-nms",
                                    "saliency-uniform"])
def test_every_baseline_runs_generate_with_the_same_accounting(vlm, method):
    scoring, selection = method.split("-")
    config = make_config(layers="[2,5]", keep="[16,6]", scoring=scoring, selection=selection)
    images = [[Image.open(p).convert("RGB")] for p in sample_images()[:2]]
    with vlm.use(config):
        texts, stats = vlm.generate([vlm.prompt("Describe it.", 1)] * 2, images, max_new_tokens=3)
    assert len(texts) == 2
    assert all(s.kept == [16, 6] and s.retained_fraction == pytest.approx((2 * 64 + 3 * 16 + 3 * 6) / (8 * 64))
               for s in stats)


def test_fidelity_curves_per_method(vlm, tmp_path):
    images = sample_images()
    samples = [Sample(images[0], "Who is this?"), Sample(images[1], "What color is it?"), Sample(images[2], "Logo?")]
    methods = {}
    for keep in (32, 8):
        for scoring in ("saliency", "random", "attention", "norm"):
            methods[f"{scoring}@{keep}"] = make_config(layers=[2], keep=[keep], scoring=scoring)
        methods[f"uniform@{keep}"] = make_config(layers=[2], keep=[keep], selection="uniform")
    report = compare(vlm, samples, methods, batch_size=3, generate=False, progress=False)
    assert len(report["runs"]) == 10 and all(r["kl"] >= 0 and r["retention"] < 1 for r in report["runs"])
    for scoring in ("saliency", "random", "uniform"):
        runs = {r["name"]: r for r in report["runs"]}
        assert runs[f"{scoring}@32"]["retention"] > runs[f"{scoring}@8"]["retention"]
    plot(report, str(tmp_path / "curves.png"))
