"""Triton kernels of the saliency probe under the CPU interpreter (small shapes).

Not collected by the main pytest run (the name does not start with ``test_``):
``tests/test_triton_kernels.py`` runs this file in a fresh process with
``TRITON_INTERPRET=1``, which Triton reads when it is first imported. Run by hand with
``TRITON_INTERPRET=1 python -m pytest tests/triton_interpreter_cases.py``.
"""
import os
import sys

import pytest

_KERNELS = ("pio_kernels.triton.head_loss", "pio_kernels.triton.saliency_epilogue")
if os.environ.get("TRITON_INTERPRET") != "1" or any(name in sys.modules for name in _KERNELS):
    # triton.jit reads the variable when a kernel is defined: the kernels must be imported after it.
    pytest.skip("needs a fresh process with TRITON_INTERPRET=1 (see tests/test_triton_kernels.py)",
                allow_module_level=True)

import torch  # noqa: E402

triton = pytest.importorskip("triton")

from layer_factory import make_stage, padded_batch, positions_from_mask  # noqa: E402
from pio_kernels import proxy_saliency, reference  # noqa: E402
from pio_kernels.saliency import _epilogue_torch, _head_loss_grad_torch  # noqa: E402
from pio_kernels.triton.head_loss import head_loss_grad  # noqa: E402
from pio_kernels.triton.saliency_epilogue import saliency_epilogue  # noqa: E402


# (rows, vocab, dim, bias): odd sizes; rows reach every BLOCK_R the launcher picks (16: rows 1-16,
# 32: 17-32, 64: 33-64, and several blocks of 64 beyond); dims not multiples of BLOCK_D.
HEAD_CASES = [(1, 130, 33, True), (4, 300, 70, False), (16, 128, 64, True), (21, 257, 48, True),
              (40, 97, 40, False), (70, 140, 20, False)]
EPILOGUE_DIMS = [70, 200, 300, 1100]  # every BLOCK_D: 128, 256, 512 and 1024 (1100 also loops over D)


def test_cases_reach_every_launch_config():
    from pio_kernels.triton import head_loss, saliency_epilogue as epilogue
    assert {head_loss.launch_configs(rows) for rows, *_ in HEAD_CASES} == set(head_loss.possible_configs())
    assert {epilogue.launch_config(dim) for dim in EPILOGUE_DIMS} == set(epilogue.possible_configs())
    assert any(rows > 64 for rows, *_ in HEAD_CASES)  # several row blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab,dim,bias", HEAD_CASES)
def test_head_loss_grad_matches_torch(dtype, rows, vocab, dim, bias):
    gen = torch.Generator().manual_seed(rows + vocab)
    normed = torch.randn(rows, dim, generator=gen)
    weight = (0.3 * torch.randn(vocab, dim, generator=gen)).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    scale = torch.rand(rows, generator=gen)
    got = head_loss_grad(normed, weight, b, scale)
    want = _head_loss_grad_torch(normed, weight, b, scale)
    assert got.dtype == torch.float32 and got.shape == (rows, dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_head_loss_grad_ties_go_to_lowest_index():
    # Head rows 5 and 200 (different vocabulary tiles) give exactly equal, maximal logits:
    # they agree on the 16 dims the inputs use and differ on the 16 they do not. The
    # gradient then depends on the pseudo-label; it must be the lower index, as torch.argmax.
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(16, generator=gen)
    normed = torch.zeros(3, 32)
    normed[:, :16] = base + 0.1 * torch.randn(3, 16, generator=gen)
    weight = 0.1 * torch.randn(260, 32, generator=gen)
    weight[5, :16] = weight[200, :16] = 2.0 * base
    logits = normed @ weight.T
    assert (logits[:, 5] == logits[:, 200]).all() and (logits.argmax(-1) == 5).all()
    got = head_loss_grad(normed, weight, None, torch.ones(3))
    want = _head_loss_grad_torch(normed, weight, None, torch.ones(3))
    other_label = want + (weight[5] - weight[200])  # what label 200 would give
    assert (other_label - want).abs().max() > 0.05
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,gain_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                              (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float64, torch.float64)])
@pytest.mark.parametrize("dim", EPILOGUE_DIMS)
def test_epilogue_matches_torch(dtype, gain_dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    grad = torch.randn(2, 9, dim, generator=gen)
    hidden = torch.randn(2, 9, dim, generator=gen).to(dtype)
    gain = torch.rand(dim, generator=gen).to(gain_dtype)
    rows = torch.tensor([[3, 4, 5], [0, 2, 7]])
    extra = torch.randn(2, 3, dim, generator=gen)
    got = saliency_epilogue(grad, hidden, gain, 1e-6, rows, extra)
    want = _epilogue_torch(grad, hidden, gain, 1e-6, rows, extra)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_launchers_validate_inputs():
    x, w, s = torch.randn(4, 8), torch.randn(10, 8), torch.ones(4)
    with pytest.raises(ValueError, match="weight"):
        head_loss_grad(x, torch.randn(10, 9), None, s)
    with pytest.raises(ValueError, match="normed"):
        head_loss_grad(x.double(), w, None, s)
    with pytest.raises(ValueError, match="row_scale"):
        head_loss_grad(x, w, None, torch.ones(5))
    with pytest.raises(TypeError, match="weight"):
        head_loss_grad(x, w.double(), None, s)
    g, h, rows = torch.randn(1, 5, 8), torch.randn(1, 5, 8), torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="gain"):
        saliency_epilogue(g, h, torch.ones(7), 1e-6, rows, torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="grad_residual"):
        saliency_epilogue(g, h, torch.ones(8), 1e-6, rows, torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="gain"):
        saliency_epilogue(g, h, torch.ones(8, dtype=torch.int64), 1e-6, rows, torch.zeros(1, 2, 8))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_proxy_saliency_triton_backend_matches_reference(family):
    stage = make_stage(family, seed=2)
    mask = padded_batch([10, 7], 10, "left")
    hidden = torch.randn(2, 10, stage.hidden_size, generator=torch.Generator().manual_seed(2))
    pe = stage.rope(hidden, positions_from_mask(mask))
    args = (stage.layer, stage.final_norm, stage.lm_head, hidden, pe)
    want = reference.proxy_saliency(*args, attention_mask=mask)
    got = proxy_saliency(*args, attention_mask=mask, backend="triton")
    assert ((got - want).abs().max() / want.max()).item() <= 1e-4


def test_launchers_accept_empty_inputs():
    got = head_loss_grad(torch.zeros(0, 8), torch.randn(10, 8), None, torch.ones(0))
    assert got.shape == (0, 8) and got.dtype == torch.float32
    got = saliency_epilogue(torch.zeros(2, 0, 8), torch.zeros(2, 0, 8), torch.ones(8), 1e-6,
                            torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0, 8))
    assert got.shape == (2, 0) and got.dtype == torch.float32
