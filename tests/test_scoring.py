"""The scoring-rule registry (pio_kernels.scoring): each built-in rule against a plain reference."""
from __future__ import annotations

import pytest
import torch

import pio_kernels
from layer_factory import make_stage, mrope_positions, padded_batch, positions_from_mask
from pio_kernels.scoring import (StageInputs, attention_scores, get_scoring, register_scoring, scoring_names)


def _inputs(stage, lengths, seq_len, side, seed=0, dtype=torch.float32, family="llama", generator=None):
    g = torch.Generator().manual_seed(seed)
    mask = padded_batch(lengths, seq_len, side)
    hidden = torch.randn(len(lengths), seq_len, stage.hidden_size, generator=g).to(dtype)
    pos = mrope_positions(mask) if family == "qwen2_5_vl" else positions_from_mask(mask)
    cos, sin = stage.rope(hidden, pos)
    image_ids = torch.where(mask.bool(), torch.zeros_like(mask), torch.full_like(mask, -1))
    return StageInputs(layer=stage.layer, final_norm=stage.final_norm, lm_head=stage.lm_head, hidden_states=hidden,
                       position_embeddings=(cos, sin), attention_mask=mask, image_ids=image_ids,
                       num_positions=4, generator=generator)


def _eager_last_query(stage, inputs: StageInputs) -> torch.Tensor:
    """The layer's own eager attention weights (output_attentions), row of the last real query,
    mean over heads: the definition of the ``attention`` rule."""
    layer = stage.layer
    hidden = inputs.hidden_states
    batch, seq_len, _ = hidden.shape
    mask = inputs.attention_mask.bool()
    dtype = hidden.dtype
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    allowed = causal[None] & mask[:, None, :]
    allowed |= torch.eye(seq_len, dtype=torch.bool)[None]  # padding queries: keep their rows finite
    additive = torch.zeros(batch, 1, seq_len, seq_len, dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    with torch.no_grad():
        _, weights = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=additive,
                                     position_embeddings=inputs.position_embeddings)
    last = torch.stack([m.nonzero().max() for m in mask])
    rows = weights[torch.arange(batch), :, last]  # (B, H, S)
    return rows.float().mean(dim=1)


def test_registry_names_errors_and_replace():
    assert scoring_names()[:4] == ("saliency", "random", "attention", "norm")
    with pytest.raises(ValueError, match="scoring must be one of saliency, random, attention, norm"):
        get_scoring("fastv")
    with pytest.raises(ValueError, match="already registered"):
        register_scoring("norm", lambda inputs: None)
    with pytest.raises(ValueError, match="callable"):
        register_scoring("mine", 3)
    with pytest.raises(ValueError, match="non-empty"):
        register_scoring("", lambda inputs: None)

    def mine(inputs):
        return inputs.hidden_states[..., 0].float()

    register_scoring("test-first-channel", mine)
    try:
        assert get_scoring("test-first-channel") is mine
        assert "test-first-channel" in scoring_names()
    finally:
        from pio_kernels import scoring
        scoring._RULES.pop("test-first-channel")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2_5_vl"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_matches_eager_attention_weights(family, side):
    stage = make_stage(family, attn="eager", heads=4, kv_heads=2 if family != "llama" else 4, seed=1)
    inputs = _inputs(stage, [13, 9, 6], 13, side, seed=2, family=family)
    got = attention_scores(inputs)
    want = _eager_last_query(stage, inputs)
    valid = inputs.attention_mask.bool()
    assert got.dtype == torch.float32 and got.shape == (3, 13)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-6)
    assert torch.all(got[~valid] == 0)
    torch.testing.assert_close(got.sum(1), torch.ones(3), rtol=1e-5, atol=1e-6)  # a distribution over real keys


def test_attention_uses_per_head_norms_when_present():
    """Qwen3-style layers normalise q and k per head before RoPE: the rule must too."""
    from transformers import Qwen3Config
    from transformers.models.qwen3 import modeling_qwen3 as m
    cfg = Qwen3Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, vocab_size=50, num_hidden_layers=1)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = m.Qwen3DecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        layer.self_attn.q_norm.weight.uniform_(0.2, 2.0)
        layer.self_attn.k_norm.weight.uniform_(0.2, 2.0)
    rotary = m.Qwen3RotaryEmbedding(cfg)

    class Stage:
        pass

    stage = Stage()
    stage.layer, stage.final_norm, stage.lm_head, stage.hidden_size = layer, torch.nn.Identity(), torch.nn.Identity(), 64
    stage.rope = rotary
    inputs = _inputs(stage, [10, 7], 10, "left", seed=3)
    torch.testing.assert_close(attention_scores(inputs)[inputs.attention_mask.bool()],
                               _eager_last_query(stage, inputs)[inputs.attention_mask.bool()], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_low_precision_within_twice_torch_error(dtype):
    """Against the fp32 rule, the low-precision rule errs at most ~2x what the layer's own eager
    attention errs at that precision (flash-attention's rule)."""
    ref_stage = make_stage("qwen2", attn="eager", seed=4)
    low_stage = make_stage("qwen2", attn="eager", seed=4, dtype=dtype)
    ref_inputs = _inputs(ref_stage, [16, 11], 16, "left", seed=5)
    low_inputs = _inputs(low_stage, [16, 11], 16, "left", seed=5, dtype=dtype)
    truth = attention_scores(ref_inputs)
    ours = attention_scores(low_inputs)
    torch_low = _eager_last_query(low_stage, low_inputs)
    valid = ref_inputs.attention_mask.bool()
    err_ours = (ours - truth)[valid].abs().max()
    err_torch = (torch_low - truth)[valid].abs().max()
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)


def test_attention_takes_positions_shared_by_the_batch():
    stage = make_stage("llama", seed=14)
    inputs = _inputs(stage, [9, 9], 9, "left", seed=15)
    shared = tuple(t[:1] for t in inputs.position_embeddings)  # (1, S, hd), as a plain forward hands them
    flat = tuple(t[0] for t in inputs.position_embeddings)     # (S, hd)
    want = attention_scores(inputs)
    for pe in (shared, flat):
        got = attention_scores(StageInputs(**{**inputs.__dict__, "position_embeddings": pe}))
        assert torch.equal(got, want)


def test_attention_is_batch_invariant():
    stage = make_stage("qwen2", seed=6)
    batch = _inputs(stage, [12, 8], 12, "left", seed=7)
    scores = attention_scores(batch)
    for b, n in enumerate([12, 8]):
        alone = StageInputs(layer=stage.layer, final_norm=stage.final_norm, lm_head=stage.lm_head,
                            hidden_states=batch.hidden_states[b:b + 1, -n:],
                            position_embeddings=tuple(t[b:b + 1, -n:] for t in batch.position_embeddings),
                            attention_mask=None, image_ids=batch.image_ids[b:b + 1, -n:])
        torch.testing.assert_close(scores[b, -n:], attention_scores(alone)[0], rtol=1e-5, atol=1e-7)


def test_saliency_is_proxy_saliency():
    stage = make_stage("llama", seed=8)
    inputs = _inputs(stage, [10, 6], 10, "right", seed=9)
    want = pio_kernels.proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, inputs.hidden_states,
                                      inputs.position_embeddings, attention_mask=inputs.attention_mask)
    assert torch.equal(get_scoring("saliency")(inputs), want)


def test_norm_is_row_norm_and_zero_on_padding():
    stage = make_stage("llama", seed=10)
    inputs = _inputs(stage, [9, 5], 9, "left", seed=11, dtype=torch.bfloat16)
    got = get_scoring("norm")(inputs)
    want = inputs.hidden_states.double().norm(dim=-1).float()
    valid = inputs.attention_mask.bool()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-6, atol=1e-6)
    assert torch.all(got[~valid] == 0)


def test_random_is_deterministic_given_the_seed():
    stage = make_stage("llama", seed=12)
    draw = lambda seed: get_scoring("random")(_inputs(stage, [8, 8], 8, "left", generator=torch.Generator().manual_seed(seed)))
    a, b, c = draw(3), draw(3), draw(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and bool(((a >= 0) & (a < 1)).all())
    default = get_scoring("random")(_inputs(stage, [8, 8], 8, "left"))
    assert torch.equal(default, draw(0))  # None means seed 0
    padded = get_scoring("random")(_inputs(stage, [8, 3], 8, "left", generator=torch.Generator().manual_seed(3)))
    assert torch.all(padded[1, :5] == 0)


def test_attention_rejects_layers_without_projections():
    stage = make_stage("llama", seed=13)
    inputs = _inputs(stage, [4], 4, "left")
    bad = StageInputs(**{**inputs.__dict__, "layer": torch.nn.Linear(4, 4)})
    with pytest.raises(ValueError, match="input_layernorm"):
        attention_scores(bad)
