"""Host synchronisation of the loss rows and of the fast probe (issue 11).

On CUDA every read of a tensor's value on the host (``item``, ``tolist``, ``bool``, ``int``,
``nonzero``, ``cpu``, ...) waits for the device. A counting shim over those methods shows that
``reference.loss_positions`` and the fast path's masked call read nothing back, whatever B
and S (but for the structure check of a layer, once per layer object), and that the
reference adds nothing of its own on top of the layer it runs.
"""
import contextlib

import pytest
import torch

from layer_factory import MROPE_FAMILIES, make_stage, mrope_positions, padded_batch, positions_from_mask
from pio_kernels import proxy_saliency, reference

_SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@contextlib.contextmanager
def _count_syncs(monkeypatch):
    counts = {"n": 0}
    for name in _SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        yield counts
    finally:
        monkeypatch.undo()


def _mask(batch, seq_len):
    lengths = [max(0, seq_len - 3 * b) for b in range(batch)]  # long, short, 1- and 0-token samples
    return padded_batch(lengths, seq_len, "left" if batch % 2 else "right")


def test_the_shim_counts(monkeypatch):
    with _count_syncs(monkeypatch) as counts:
        x = torch.ones(3)
        bool(x[0])
        x.tolist()
        x.nonzero()
    assert counts["n"] == 3


@pytest.mark.parametrize("batch,seq_len", [(1, 8), (3, 8), (5, 40), (8, 97)])
def test_loss_positions_never_sync(monkeypatch, batch, seq_len):
    mask = _mask(batch, seq_len)
    with _count_syncs(monkeypatch) as counts:
        rows, valid = reference.loss_positions(mask, batch, seq_len, 4)
        reference.loss_positions(None, batch, seq_len, 4)
        reference.loss_positions(mask.bool(), batch, seq_len, 50)
    assert counts["n"] == 0
    assert rows.shape == valid.shape == (batch, 4)


@pytest.mark.parametrize("family", ["qwen2", "qwen3_vl", "llama_geglu"])
def test_fast_path_masked_call_never_syncs(monkeypatch, family):
    """After the one-time structure check of a layer (two flags read back, then cached), nothing."""
    stage = make_stage(family, seed=41)
    seen = []
    for batch, seq_len in [(1, 8), (4, 8), (4, 33), (7, 50)]:
        mask = _mask(batch, seq_len)
        hidden = torch.randn(batch, seq_len, stage.hidden_size)
        pos = mrope_positions(mask, (1, 5)) if family in MROPE_FAMILIES else positions_from_mask(mask)
        pe = stage.rope(hidden, pos)
        with _count_syncs(monkeypatch) as counts:
            scores = proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, hidden, pe, attention_mask=mask,
                                    backend="torch")
        seen.append(counts["n"])
        assert torch.isfinite(scores).all()
    assert seen == [2, 0, 0, 0]


def test_reference_adds_no_sync_of_its_own(monkeypatch):
    """The reference's own steps (loss rows, mask, loss) read nothing back; only the layer may."""
    stage = make_stage("llama", seed=42)
    counts_by_size = []
    for batch, seq_len in [(1, 8), (5, 30)]:
        mask = _mask(batch, seq_len)
        hidden = torch.randn(batch, seq_len, stage.hidden_size)
        pe = stage.rope(hidden, positions_from_mask(mask))
        with _count_syncs(monkeypatch) as counts:
            reference.proxy_saliency(stage.layer, stage.final_norm, stage.lm_head, hidden, pe, attention_mask=mask)
        counts_by_size.append(counts["n"])
    assert counts_by_size[0] == counts_by_size[1]
