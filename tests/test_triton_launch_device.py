"""Triton launches run on the tensors' CUDA device, not on the current one.

Triton's launcher takes the current device and its current stream. With a model spread
over several GPUs (``device_map``), a stage on ``cuda:1`` would otherwise launch its
kernels on ``cuda:0``. Without a GPU: the tensors are fake ``cuda:1`` tensors
(``FakeTensorMode``), ``torch.cuda.device`` is replaced by a recorder of the device it is
entered with, and each kernel by a stub that records the device current at its launch.
With two GPUs: the real kernels on ``cuda:1`` while ``cuda:0`` is current.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from pio_kernels.triton import head_loss, saliency_epilogue  # noqa: E402


class _DeviceRecorder:
    """Stands in for ``torch.cuda.device``: tracks which device index is current."""

    def __init__(self):
        self.current: int | None = None  # None: whatever the process had (cuda:0 by default)

    def __call__(self, device):
        recorder = self

        @contextlib.contextmanager
        def enter():
            index = torch.device(device).index if not isinstance(device, int) else device
            before, recorder.current = recorder.current, index
            try:
                yield
            finally:
                recorder.current = before

        return enter()


class _KernelStub:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` records the current device."""

    def __init__(self, recorder: _DeviceRecorder, name: str, launches: list):
        self.recorder, self.name, self.launches = recorder, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            devices = {a.device for a in args if isinstance(a, torch.Tensor)}
            self.launches.append((self.name, self.recorder.current, devices))
        return launch


@pytest.fixture
def fake_launches(monkeypatch):
    recorder, launches = _DeviceRecorder(), []
    monkeypatch.setattr(torch.cuda, "device", recorder)
    for module, names in ((head_loss, ("_logits_kernel", "_grad_kernel")),
                          (saliency_epilogue, ("_epilogue_kernel",))):
        for name in names:
            monkeypatch.setattr(module, name, _KernelStub(recorder, name, launches))
    return launches


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode()


def test_head_loss_launches_on_the_tensors_device(fake_launches):
    with _fake_mode():
        dev = torch.device("cuda:1")
        normed, weight = torch.empty(5, 32, device=dev), torch.empty(100, 32, dtype=torch.bfloat16, device=dev)
        out = head_loss.head_loss_grad(normed, weight, torch.empty(100, dtype=torch.bfloat16, device=dev),
                                       torch.empty(5, device=dev))
        assert out.shape == (5, 32) and out.device == dev
    assert [name for name, *_ in fake_launches] == ["_logits_kernel", "_grad_kernel"]
    for name, current, devices in fake_launches:
        assert devices == {dev}, name
        assert current == 1, f"{name} launched with cuda:{current} current, its tensors are on {dev}"


def test_epilogue_launches_on_the_tensors_device(fake_launches):
    with _fake_mode():
        dev = torch.device("cuda:1")
        grad = torch.empty(2, 7, 48, device=dev)
        hidden = torch.empty(2, 7, 48, dtype=torch.bfloat16, device=dev)
        rows = torch.zeros(2, 3, dtype=torch.int64, device=dev)
        out = saliency_epilogue.saliency_epilogue(grad, hidden, torch.empty(48, dtype=torch.bfloat16, device=dev),
                                                  1e-6, rows, torch.empty(2, 3, 48, device=dev))
        assert out.shape == (2, 7) and out.device == dev
    assert len(fake_launches) == 1
    name, current, devices = fake_launches[0]
    assert devices == {dev} and current == 1, fake_launches


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_on_second_gpu_match_torch():
    """The real kernels on cuda:1 with cuda:0 current: same results as the torch fallbacks."""
    from pio_kernels.saliency import _epilogue_torch, _head_loss_grad_torch
    dev = torch.device("cuda:1")
    gen = torch.Generator(device="cpu").manual_seed(0)
    normed = torch.randn(6, 96, generator=gen).to(dev)
    weight = (0.3 * torch.randn(1000, 96, generator=gen)).to(dev, torch.bfloat16)
    scale = torch.rand(6, generator=gen).to(dev)
    grad = torch.randn(2, 40, 96, generator=gen).to(dev)
    hidden = torch.randn(2, 40, 96, generator=gen).to(dev, torch.bfloat16)
    gain = torch.rand(96, generator=gen).to(dev, torch.bfloat16)
    rows = torch.tensor([[3, 9, 20], [0, 5, 39]], device=dev)
    extra = torch.randn(2, 3, 96, generator=gen).to(dev)
    torch.cuda.set_device(0)
    got_head = head_loss.head_loss_grad(normed, weight, None, scale)
    got_epi = saliency_epilogue.saliency_epilogue(grad, hidden, gain, 1e-6, rows, extra)
    assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(dev)
    want_head = _head_loss_grad_torch(normed, weight, None, scale)
    torch.testing.assert_close(got_head, want_head, rtol=1e-5, atol=1e-5 * float(want_head.abs().max()))
    torch.testing.assert_close(got_epi, _epilogue_torch(grad, hidden, gain, 1e-6, rows, extra), rtol=1e-5, atol=1e-6)
