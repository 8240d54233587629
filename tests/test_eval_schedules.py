"""Presets, the schedule-field syntax, and the SPEC accounting (pio_kernels.eval.schedules / .accounting)."""
from __future__ import annotations

import pytest

from pio_kernels.eval.accounting import (layer_flops, resolve_budget, retention, schedule_retention,
                                         schedule_tokens_per_layer)
from pio_kernels.eval.schedules import FAMILY_PRESETS, default_preset, make_config, parse_list, preset, presets
from pio_kernels.integrations import PioConfig


@pytest.mark.parametrize("name, n, layers, want", [
    ("llava-1.5-ve", 576, 32, 64 / 576), ("llava-1.5", 576, 32, 64 / 576), ("llava-1.5-128", 576, 32, 128 / 576),
    ("qwen2.5-vl-ve", 1296, 28, 0.1107), ("qwen2.5-vl", 1296, 28, 0.1111), ("llava-next-ve", 576, 32, 64 / 576)])
def test_presets_average_their_retention(name, n, layers, want):
    assert schedule_retention(make_config(name), n, layers) == pytest.approx(want, abs=5e-5)


def test_llava_published_counts_and_spec_flops():
    """SPEC 1: 64 average tokens of 576 over 32 layers; SPEC 6: 2.98 TFLOPs for the stock 7B."""
    counts = schedule_tokens_per_layer(make_config("llava-1.5"), 576, 32)
    assert counts[:1] == [576] and counts[1:10] == [92] * 9 and counts[10:15] == [54] * 5 and counts[15:] == [22] * 17
    assert sum(counts) == 64 * 32
    ve = schedule_tokens_per_layer(make_config("llava-1.5-ve"), 576, 32)
    assert ve == [96] * 16 + [32] * 16  # the encoder side counts as what layer 0 sees
    stock = layer_flops([576] * 32, 4096, 11008)
    assert round(stock / 1e12, 2) == 2.99  # SPEC 6 prints 2.98 (truncated)
    assert schedule_tokens_per_layer(None, 576, 32) == [576] * 32
    assert retention([], 0) is None and retention([0, 0], 0) is None


def test_qwen_preset_stays_near_eleven_percent_over_resolutions():
    config = make_config("qwen2.5-vl")
    for n in (256, 576, 1024, 1296, 2048, 4096):
        assert 0.1075 <= schedule_retention(config, n, 28) <= 0.1115


def test_resolve_budget_is_the_engines_rule():
    assert resolve_budget(0.5, 9) == 4 and resolve_budget(0.001, 9) == 1 and resolve_budget(40, 9) == 9  # floor
    assert resolve_budget(3, 0) == 0


@pytest.mark.parametrize("text, want", [("[1,10,15]", (1, 10, 15)), ("1;10;15", (1, 10, 15)), ("1 10 15", (1, 10, 15)),
                                        ("[0.16, 0.587,0.407]", (0.16, 0.587, 0.407)), (16, (16,)), (0.333, (0.333,)),
                                        ("(92,54)", (92, 54)), ([92, "54"], (92, 54)), ("16", (16,))])
def test_parse_list(text, want):
    assert parse_list(text) == want


@pytest.mark.parametrize("bad", ["", "[]", "[1,x]", True])
def test_parse_list_rejects(bad):
    with pytest.raises(ValueError, match="layers"):
        parse_list(bad, "layers")


def test_make_config_from_presets_and_fields():
    assert make_config("stock") is None and make_config() is None
    assert make_config("llava-1.5") == PioConfig(layers=(1, 10, 15), keep=(92, 54, 22))
    c = make_config("llava-1.5-ve", encoder_keep="none", tau="0.9")
    assert c.encoder_keep is None and c.tau == 0.9 and c.layers == (16,)
    c = make_config(layers="[2,4]", keep="[16,0.5]", encoder_keep="32", num_positions="2")
    assert c == PioConfig(layers=(2, 4), keep=(16, 0.5), encoder_keep=32, num_positions=2)
    assert preset("llava-1.5") == dict(layers=(1, 10, 15), keep=(92, 54, 22)) and preset("stock") is None
    assert set(presets()) >= {"llava-1.5-ve", "llava-1.5", "qwen2.5-vl-ve", "qwen2.5-vl", "llava-next", "llava-next-ve"}
    from pio_kernels.integrations import PRESETS as published
    for name, config in published.items():  # the published ones come from the integrations, unchanged
        assert make_config(name) == config


@pytest.mark.parametrize("kwargs, match", [
    (dict(preset_name="llava-2"), "preset must be one of"),
    (dict(layers="[2]"), "keep is required"),
    (dict(keep="[2]"), "keep need layers"),
    (dict(tau=0.5, encoder_keep=3), "encoder_keep, tau need layers"),
    (dict(preset_name="stock", layers="[2]", keep="[3]"), "stock model takes no schedule fields"),
    (dict(layers="[2]", keep="[3]", bogus=1), "unknown schedule field"),
    (dict(layers="[2]", keep="[3]", scoring="fastv"), "scoring must be one of"),
    (dict(layers="[2]", keep="[3]", selection="best"), "selection must be one of"),
    (dict(layers="[0]", keep="[3]"), "layers must be >= 1"),
])
def test_make_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_config(**kwargs)


def test_method_fields_reach_the_config():
    c = make_config("llava-1.5", scoring="random", selection="topk", seed="7")
    assert (c.scoring, c.selection, c.seed, c.layers) == ("random", "topk", 7, (1, 10, 15))
    assert make_config(layers="[2]", keep="[3]") == PioConfig(layers=(2,), keep=(3,), scoring="saliency",
                                                              selection="nms", seed=0)


def test_default_preset_per_family_and_depth():
    # every preset belongs to a family, with the depth it was set for; every family has a default
    named = {name for names in FAMILY_PRESETS.values() for name, _ in names}
    assert named == set(presets()) - {"stock"}
    from pio_kernels.eval.vlm import FAMILIES
    assert set(FAMILY_PRESETS) == set(FAMILIES.values())
    # at a preset's own depth: that preset as it is
    assert default_preset("qwen2-vl", 28) == ("qwen2-vl-ve", preset("qwen2-vl-ve"))
    assert default_preset("qwen3-vl", 64) == ("qwen3-vl-32b-ve", preset("qwen3-vl-32b-ve"))
    assert default_preset("llava-onevision", 24)[0] == "llava-onevision-0.5b-ve"
    assert default_preset("llava-1.5", 32, encoder=False) == ("llava-1.5", preset("llava-1.5"))
    # elsewhere: the nearest depth's, its middle layer scaled to the middle (the README's L // 2)
    label, fields = default_preset("qwen3-vl-moe", 48)  # Qwen3-VL-30B-A3B
    assert label == "qwen3-vl-ve (scaled to 48 layers)" and fields == dict(layers=(24,), keep=(0.333,),
                                                                            encoder_keep=0.167)
    assert default_preset("llava-onevision", 26)[1]["layers"] == (13,)
    label, fields = default_preset("llava-1.5", 8, visual_tokens=64)
    assert fields == dict(layers=(4,), keep=(4,), encoder_keep=11) and "64 tokens" in label
    assert default_preset("qwen2.5-vl", 36, encoder=False)[1]["layers"] == (1, 10, 15)
    # no schedule without the encoder side: the family's default stands in, and says so
    label, fields = default_preset("llava-onevision", 28, encoder=False)
    assert fields["encoder_keep"] == 0.167 and "no preset without the encoder side" in label
    assert make_config("default", family="qwen2-vl", num_layers=8, keep="[0.5]") == PioConfig(
        layers=(4,), keep=(0.5,), encoder_keep=0.167)
    with pytest.raises(ValueError, match="preset=default needs the model's family"):
        make_config("default")
    with pytest.raises(ValueError, match="family must be one of"):
        default_preset("llama", 32)
