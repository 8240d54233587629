"""The Triton backend of the probe on short samples and Qwen3 layers, under ``TRITON_INTERPRET=1``.

Slots without a loss row reach the head kernel with ``row_scale`` 0 and the epilogue as
repeated rows ``S - 1`` with a zero residual; the kernels are not changed for them. The
interpreter must be enabled before Triton is first imported, hence a fresh process (as in
``tests/test_triton_kernels.py``).
"""
import os
import textwrap

import pytest

from triton_interpreter import run_interpreted

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))

_CASE = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, {here!r})
    from layer_factory import MROPE_FAMILIES, make_stage, mrope_positions, padded_batch, positions_from_mask
    from pio_kernels import proxy_saliency, reference

    for family, side in (("llama", "left"), ("qwen3", "right"), ("qwen3_vl", "left")):
        stage = make_stage(family, hidden=32, heads=2, mlp=40, vocab=70, seed=51)
        mask = padded_batch([9, 4, 2, 1, 0], 9, side)
        hidden = torch.randn(5, 9, 32, generator=torch.Generator().manual_seed(51))
        pos = mrope_positions(mask, (1, 5)) if family in MROPE_FAMILIES else positions_from_mask(mask)
        pe = stage.rope(hidden, pos)
        args = (stage.layer, stage.final_norm, stage.lm_head, hidden, pe)
        want = reference.proxy_saliency(*args, attention_mask=mask, num_positions=4)
        got = proxy_saliency(*args, attention_mask=mask, num_positions=4, backend="triton")
        err = ((got - want).abs().max() / want.max()).item()
        assert torch.isfinite(got).all() and err <= 1e-4, (family, side, err)
        assert (got[2:5, :] == 0).sum() >= 9 * 3 - 1, (family, side)
        print("ok", family, side, err)
""")


def test_triton_backend_short_samples_under_interpreter():
    out = run_interpreted(["-c", _CASE.format(here=HERE)])
    assert out.count("ok ") == 3, out[-6000:]
