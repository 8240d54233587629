import torch

from layer_factory import FAMILIES, make_stage, mrope_positions, padded_batch, positions_from_mask


def test_every_family_runs_forward():
    for family in FAMILIES:
        st = make_stage(family)
        mask = padded_batch([7, 5], 7, "left")
        h = torch.randn(2, 7, st.hidden_size)
        pos = mrope_positions(mask, (1, 5)) if family == "qwen2_5_vl" else positions_from_mask(mask)
        cos, sin = st.rope(h, pos)
        assert cos.shape[-2:] == (7, st.hidden_size // 4)
        y = st.layer(h, attention_mask=None, position_embeddings=(cos, sin))
        y = y[0] if isinstance(y, tuple) else y
        assert y.shape == h.shape and torch.isfinite(y).all()
