"""The engine's arithmetic and its host-sync budget, checked against hand-computed values.

* budgets: fractions keep ``floor(ratio * n)`` (at least 1), ints are counts capped at ``n``;
* the encoder-side windows: the window size of each family changes which tokens are kept on a
  grid large enough to hold several windows (so a changed default cannot pass);
* a prefill reads back a fixed number of values from the device, whatever the number of tokens
  and images (issue 11): counted on CPU with a shim over the sync-prone tensor methods, and on
  CUDA with ``torch.cuda.set_sync_debug_mode``.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import llava_factory as lf
import qwen2_5_vl_factory as qf
from pio_kernels.integrations import PioConfig, apply_pio, last_selection, remove_pio
from pio_kernels.integrations.engine import resolve_budget, split_local_global, window_global
from pio_kernels.integrations.models.llava import LlavaAdapter
from pio_kernels.integrations.models.qwen2_5_vl import Qwen2_5_VLAdapter

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("keep,n,expected", [
    (0.25, 126, 31),     # the released Qwen code: int(0.25 * 126) = 31 (rounding half up would give 32)
    (0.333, 1296, 431),  # int(431.568)
    (0.167, 576, 96),    # int(96.19): the published LLaVA encoder budget as a fraction
    (0.5, 7, 3),
    (0.001, 10, 1),      # at least one token
    (1.0, 37, 37),
    (32, 576, 32),       # an int is a count
    (32, 20, 20),        # capped at the image's tokens
])
def test_budgets_round_like_the_released_code(keep, n, expected):
    assert resolve_budget(keep, n) == expected


def test_llava_window_size_changes_the_split():
    """24 x 24 grid, the LLaVA-1.5 rule: windows of 6 x 6 (a quarter per side), 16 of them, so a
    budget of 64 takes 2 tokens per window by the shallow map and 32 by the deep map. Windows of
    8 x 8 (9 windows, 3 each) keep other tokens: the window size is part of the result."""
    grid = 24
    g = torch.Generator().manual_seed(0)
    shallow, deep = torch.rand(1, grid * grid, generator=g), torch.rand(1, grid * grid, generator=g)
    kept = split_local_global(shallow, deep, (grid, grid), 64, (6, 6))[0]
    cells = torch.arange(grid * grid)
    window = (cells // grid // 6) * 4 + cells % grid // 6
    local = []
    for w in range(16):
        members = sorted((c for c in range(grid * grid) if window[c] == w), key=lambda c: (-float(shallow[0, c]), c))
        local += members[:2]
    rest = sorted((c for c in range(grid * grid) if c not in local), key=lambda c: (-float(deep[0, c]), c))[:32]
    assert kept.nonzero().flatten().tolist() == sorted(local + rest)
    assert not torch.equal(split_local_global(shallow, deep, (grid, grid), 64, (8, 8))[0], kept)
    assert LlavaAdapter.__name__ and max(1, round(grid / 4)) == 6  # the adapter's window for a 24 x 24 grid


def test_qwen_window_size_changes_the_split():
    """An 8 x 8 merged grid: the default window of 4 merged tokens gives 4 windows; 3 would give 4
    windows of other shapes (the last row and column join their neighbour) and another result."""
    assert Qwen2_5_VLAdapter.window == 4
    g = torch.Generator().manual_seed(1)
    local, global_ = torch.rand(1, 64, generator=g), torch.rand(1, 64, generator=g)
    kept = window_global(local, global_, 8, 8, 16, window=4)[0]
    cells = torch.arange(64)
    window = (cells // 8 // 4) * 2 + cells % 8 // 4
    taken = []
    for c in sorted(range(64), key=lambda c: (-float(local[0, c]), c)):
        if len(taken) < 8 and sum(window[t] == window[c] for t in taken) < 2:  # cap ceil(8 / 4) per window
            taken.append(c)
    rest = sorted((c for c in range(64) if c not in taken), key=lambda c: (-float(global_[0, c]), c))[:8]
    assert kept.nonzero().flatten().tolist() == sorted(taken + rest)
    assert not torch.equal(window_global(local, global_, 8, 8, 16, window=3)[0], kept)


# ------------------------------------------------------------------------------------------------
# Host syncs
_SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "unique", "cpu")


@contextlib.contextmanager
def count_syncs():
    """Counts calls of the tensor methods that wait for the device (on CUDA) while active."""
    counts = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in _SYNCING}
    functions = {name: getattr(torch, name) for name in ("nonzero", "unique")}

    def counted(fn):
        def wrapper(*args, **kwargs):
            counts["n"] += 1
            return fn(*args, **kwargs)
        return wrapper

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, counted(fn))
        for name, fn in functions.items():
            setattr(torch, name, counted(fn))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in functions.items():
            setattr(torch, name, fn)


def _syncs(model, inputs, config) -> int:
    """Syncs pio adds to one prefill: with pio minus the stock model's own (each after a warm-up
    run, so one-time initialisation is not counted)."""
    with torch.no_grad():
        model(**inputs)
        with count_syncs() as stock:
            model(**inputs)
    apply_pio(model, config)
    try:
        with torch.no_grad():
            model(**inputs)
            with count_syncs() as pio:
                model(**inputs)
        assert last_selection(model)
    finally:
        remove_pio(model)
    return pio["n"] - stock["n"]


@pytest.mark.parametrize("encoder_keep", [None, 16])
def test_llava_prefill_syncs_do_not_grow_with_tokens_or_images(encoder_keep):
    model = lf.make_llava_encoder(layers=4)
    config = PioConfig(layers=[1, 3], keep=[8, 4], encoder_keep=encoder_keep)
    added = []
    for images, batch in ((1, 1), (3, 1), (3, 2)):
        rows = [lf.prompt([1, 2, 3], images, [4, 5, 6, 7], tokens=64)] * batch
        inputs = {"input_ids": torch.tensor(rows), "pixel_values": lf.pixels(images * batch, size=56)}
        added.append(_syncs(model, inputs, config))
    assert added[0] == added[1] == added[2], added
    assert added[0] <= (30 if encoder_keep else 20), added


@pytest.mark.parametrize("encoder_keep", [None, 0.5])
def test_qwen_prefill_syncs_do_not_grow_with_tokens_or_images(encoder_keep):
    model = qf.make_model(layers=4)
    config = PioConfig(layers=[1, 3], keep=[6, 3], encoder_keep=encoder_keep)
    added = []
    for sample in ([3, (8, 8), 5], [3, (8, 8), 2, (8, 8), 2, (8, 8), 5], [3, (12, 8), 2, (8, 8), 5]):
        added.append(_syncs(model, qf.make_inputs([sample], seed=3), config))
    assert added[0] == added[1], added  # 1 or 3 images of one size
    assert max(added) - min(added) <= 2, added  # images of other sizes: one more grid to select on
    assert max(added) <= 40, added


@pytest.mark.cuda
def test_cuda_prefill_syncs_are_a_fixed_few():
    """On a GPU, pio's prefill syncs only where it reads image sizes and row counts back: the
    number of synchronising calls does not grow with the number of images."""
    model = lf.make_llava_encoder(layers=4).cuda()
    config = PioConfig(layers=[1, 3], keep=[8, 4], encoder_keep=16)
    warnings_per_run = []
    for images in (1, 3):
        inputs = {"input_ids": torch.tensor([lf.prompt([1, 2, 3], images, [4, 5, 6], tokens=64)]).cuda(),
                  "pixel_values": lf.pixels(images, size=56).cuda()}
        with torch.no_grad():
            model(**inputs)
        apply_pio(model, config)
        import warnings
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(**inputs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        remove_pio(model)
        warnings_per_run.append(sum("synchroniz" in str(w.message) for w in caught))
    assert warnings_per_run[0] == warnings_per_run[1], warnings_per_run
