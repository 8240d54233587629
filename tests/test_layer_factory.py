import pytest
import torch

from layer_factory import (FAMILIES, MOE_FAMILIES, MROPE_FAMILIES, QWEN3_FAMILIES, make_stage, mrope_positions,
                           padded_batch, positions_from_mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_forward(family):
    st = make_stage(family)
    mask = padded_batch([7, 5], 7, "left")
    h = torch.randn(2, 7, st.hidden_size)
    pos = mrope_positions(mask, (1, 5)) if family in MROPE_FAMILIES else positions_from_mask(mask)
    cos, sin = st.rope(h, pos)
    assert cos.shape == sin.shape == (2, 7, st.head_dim)
    y = st.layer(h, attention_mask=None, position_embeddings=(cos, sin))
    y = y[0] if isinstance(y, tuple) else y
    assert y.shape == h.shape and torch.isfinite(y).all()
    attn = st.layer.self_attn
    assert hasattr(attn, "q_norm") == (family in QWEN3_FAMILIES)
    assert attn.q_proj.out_features == st.head_dim * 4
    if family in MOE_FAMILIES:
        assert hasattr(st.layer.mlp, "experts") and st.layer.mlp.gate.weight.abs().sum() > 0
    if family == "qwen3":
        assert st.head_dim * 4 != st.hidden_size and attn.q_proj.bias is not None


def test_mrope_tables_depend_on_the_spatial_positions():
    """The Qwen3-VL rotary (interleaved sections) gives different tables for an image grid."""
    for family in ("qwen2_5_vl", "qwen3_vl"):
        st = make_stage(family)
        mask = padded_batch([9], 9, "left")
        h = torch.randn(1, 9, st.hidden_size)
        plain, grid = st.rope(h, positions_from_mask(mask)), st.rope(h, mrope_positions(mask, (1, 9)))
        assert not torch.equal(plain[0], grid[0])
