"""Every path of ``select_tokens`` against the reference (SPEC section 3): identical indices.

Paths: the compiled CPU kernel ("cpp"), the compiled CUDA kernel ("cuda", GPU only), the
Triton path ("triton": on a GPU, and on CPU in a subprocess under TRITON_INTERPRET=1) and
the device-side PyTorch path ("torch", pio_kernels/nms.py).

Identical indices are only a fair demand when no pair of tokens has a cosine within
rounding of ``tau`` (the paths sum in different orders). The data here is built so that
every pairwise cosine lies in bands away from every tested ``tau``, and ``_assert_margin``
checks it on the very values the op sees, so a test cannot pass or fail by rounding.
"""
from __future__ import annotations

import functools
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pio_kernels
from pio_kernels import reference
from pio_kernels.ops import available_backends
from triton_interpreter import run_interpreted

TAUS = (-1.0, 0.5, 0.8, 0.95, 2.0)
# Within-cluster cosine levels: with noise orthogonal to the centre, members of one
# cluster have cosines level +- (1 - level) * 5.5 / sqrt(D), away from every tau.
LEVELS = (0.2, 0.65, 0.88, 0.98)
MARGIN = 1e-4
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cpu_paths() -> list[str]:
    """Paths testable in this process on CPU (Triton's interpreter runs in a subprocess)."""
    return [p for p in available_backends("cpu") if p in ("cpp", "torch")]


def clustered(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32, dup_every: int = 20) -> torch.Tensor:
    """(n, d) features in clusters of known tightness, rows scaled at random, with exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    n_clusters = max(1, n // 8)
    centres = F.normalize(torch.randn(n_clusters, d, generator=g, dtype=torch.float64), dim=-1)
    assign = torch.randint(0, n_clusters, (n,), generator=g)
    level = torch.tensor(LEVELS, dtype=torch.float64)[torch.randint(0, len(LEVELS), (n_clusters,), generator=g)]
    level = level[assign][:, None]
    c = centres[assign]
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = F.normalize(noise - (noise * c).sum(-1, keepdim=True) * c, dim=-1)
    x = level.sqrt() * c + (1 - level).sqrt() * noise
    x = x * torch.exp(torch.randn(n, 1, generator=g, dtype=torch.float64))
    if n > 1 and dup_every:
        dst = torch.randperm(n, generator=g)[: max(1, n // dup_every)]
        x[dst] = x[torch.randint(0, n, (len(dst),), generator=g)]
    return x.to(dtype)


def make_scores(n: int, seed: int, dtype: torch.dtype = torch.float32, ties: bool = False, nans: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    s = torch.randn(n, generator=g)
    if ties:
        s = (s * 2).round() / 2
    s = s.to(dtype)
    if nans:
        s[torch.randperm(n, generator=g)[:nans]] = float("nan")
    return s


def _assert_margin(x: torch.Tensor, taus=TAUS, margin: float = MARGIN) -> None:
    """No pair (i != j) of rows of x (..., N, D) has a cosine within ``margin`` of a tau."""
    xn = F.normalize(x.double().reshape(-1, x.shape[-2], x.shape[-1]), dim=-1)
    for row in xn:
        for start in range(0, row.shape[0], 1024):
            cos = row[start:start + 1024] @ row.T
            idx = torch.arange(start, start + cos.shape[0])
            cos[torch.arange(cos.shape[0]), idx] = float("nan")  # the diagonal never decides
            for tau in taus:
                gap = (cos - tau).abs().nan_to_num(float("inf")).min()
                assert gap > margin, f"test data has a pair within {margin} of tau={tau}: fix the generator"


@functools.lru_cache(maxsize=None)
def _case(n: int, d: int, batch: int, seed: int, dtype: torch.dtype, ties: bool, nans: int):
    x = torch.stack([clustered(n, d, seed + 7 * b, dtype) for b in range(batch)])
    s = torch.stack([make_scores(n, seed + 7 * b, dtype, ties, nans) for b in range(batch)])
    _assert_margin(x)
    return x, s


@functools.lru_cache(maxsize=None)
def _expected(key, budget: int, tau: float, lengths: tuple | None):
    x, s = _case(*key)
    lens = None if lengths is None else torch.tensor(lengths)
    return reference.select_tokens(x, s, budget, tau, lens)


def _run(path: str, device: str, key, budget: int, tau: float, lengths: tuple | None = None) -> None:
    x, s = _case(*key)
    lens = None if lengths is None else torch.tensor(lengths, device=device)
    got = pio_kernels.select_tokens(x.to(device), s.to(device), budget, tau, lens, backend=path)
    want = _expected(key, budget, tau, lengths)
    assert got.device.type == torch.device(device).type
    assert got.dtype == torch.long and got.shape == want.shape
    assert torch.equal(got.cpu(), want), f"{path} differs from the reference (budget={budget}, tau={tau})"


def _small_budgets(n: int) -> list[int]:
    return sorted({1, 2, max(1, n // 3), max(1, n - 1), n, n + 3})


# ---------------------------------------------------------------- compiled CPU kernel

@pytest.mark.parametrize("n", [1, 7, 576])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_small_matches_reference(n, tau, dtype):
    key = (n, 67 if n < 100 else 515, 2, 11 * n, dtype, dtype != torch.float32, 0)
    for path in cpu_paths():
        for budget in _small_budgets(n):
            _run(path, "cpu", key, budget, tau)


@pytest.mark.parametrize("n", [2880, 5000])
@pytest.mark.parametrize("tau", TAUS)
def test_cpu_large_matches_reference(n, tau):
    key = (n, 257, 1, 3, torch.float32, False, 0)
    for path in cpu_paths():
        for budget in (1, 64, n // 9, n):
            _run(path, "cpu", key, budget, tau)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tau", (0.5, 0.8, 0.95))
def test_cpu_ragged_nans_ties(seed, tau):
    """Ragged lengths (0, short, long, full), NaN scores and score ties, over seeds."""
    key = (97, 131, 4, 100 + seed, torch.float32, True, 9)
    lengths = (97, 0, 13 + seed, 60)
    for path in cpu_paths():
        for budget in (1, 5, 14, 40, 97, 120):
            _run(path, "cpu", key, budget, tau, lengths)


@pytest.mark.parametrize("tau", (0.3, 0.5, 0.8, 0.95, 0.99))
@pytest.mark.parametrize("delta", (-2e-3, 2e-3))
def test_pairs_just_around_tau(tau, delta):
    """Pairs at cos = tau +- 2e-3 in orthogonal planes: suppressed exactly when cos >= tau."""
    pairs = 8
    x = torch.zeros(2 * pairs, 2 * pairs, dtype=torch.float64)
    angle = torch.arccos(torch.tensor(tau + delta, dtype=torch.float64))
    for p in range(pairs):
        scale = 0.5 + p
        x[2 * p, 2 * p] = scale
        x[2 * p + 1, 2 * p] = scale * 3 * torch.cos(angle)
        x[2 * p + 1, 2 * p + 1] = scale * 3 * torch.sin(angle)
    x = x.float()[None]
    s = torch.linspace(1, 0, 2 * pairs)[None]  # the first of every pair ranks first
    budget = pairs  # the strict pass alone decides: partners appear only if not suppressed
    want = reference.select_tokens(x, s, budget, tau)
    expect_partners = delta < 0
    firsts = torch.arange(0, 2 * pairs, 2)
    if expect_partners:  # nobody suppressed: the top `pairs` by score
        assert torch.equal(want[0], torch.arange(pairs))
    else:
        assert torch.equal(want[0], firsts)
    for path in cpu_paths():
        assert torch.equal(pio_kernels.select_tokens(x, s, budget, tau, backend=path), want)
    for path in _gpu_paths() if torch.cuda.is_available() else []:
        assert torch.equal(pio_kernels.select_tokens(x.cuda(), s.cuda(), budget, tau, backend=path).cpu(), want)


# A cosine exactly equal to tau suppresses (SPEC 3: ``cos >= tau``), on every path: the
# cosines here are exact in fp32 (1 * 1 = 1; [3, 4] / 5 = [0.6f, 0.8f], so 1 * 0.6f = 0.6f,
# which is float(0.6), the fp32 tau every path compares with).
TAU_EQUALITY = [
    ([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [3.0, 2.0, 1.0], 2, 1.0, [0, 2]),
    ([[1.0, 0.0], [3.0, 4.0], [0.0, 1.0]], [3.0, 2.0, 1.0], 2, 0.6, [0, 2]),
]


def _tau_equality_checks(run) -> int:
    """Runs every TAU_EQUALITY case through ``run(features (1, N, D), scores (1, N), budget, tau)``."""
    for features, scores, budget, tau, kept in TAU_EQUALITY:
        x, s = torch.tensor([features]), torch.tensor([scores])
        got = run(x, s, budget, tau)
        assert got.cpu().tolist() == [kept], f"cos == tau={tau} must suppress: kept {got.tolist()}, want {[kept]}"
    return len(TAU_EQUALITY)


def test_cosine_equal_to_tau_is_suppressed_on_cpu_paths():
    assert _tau_equality_checks(reference.select_tokens) == 2
    for path in cpu_paths():
        _tau_equality_checks(lambda x, s, k, t: pio_kernels.select_tokens(x, s, k, t, backend=path))


def test_backend_argument_errors():
    x, s = torch.randn(1, 5, 3), torch.rand(1, 5)
    with pytest.raises(ValueError, match="backend"):
        pio_kernels.select_tokens(x, s, 2, backend="numpy")
    with pytest.raises(ValueError, match="backend"):
        pio_kernels.select_tokens(x, s, 2, backend="cuda")  # CPU tensors
    for path in cpu_paths():
        with pytest.raises(ValueError, match="lengths"):
            pio_kernels.select_tokens(x, s, 2, lengths=torch.tensor([6]), backend=path)
        assert torch.equal(pio_kernels.select_tokens(x[0], s[0], 2, backend=path),
                           reference.select_tokens(x, s, 2)[0])


# ---------------------------------------------------------------- properties (hypothesis)

def _check_properties(x, s, budget, tau, lengths, out, eps=1e-5):
    """Structure of the output, and the greedy walk re-done in fp64 wherever it is unambiguous."""
    batch, n, _ = x.shape
    for b in range(batch):
        valid = n if lengths is None else int(lengths[b])
        row = out[b].tolist()
        keep = min(budget, valid)
        assert row[keep:] == [-1] * (budget - keep)
        kept = row[:keep]
        assert kept == sorted(set(kept)) and all(0 <= i < valid for i in kept)
        if valid == 0:
            continue
        xn = F.normalize(x[b, :valid].double(), dim=-1, eps=1e-12)
        order = reference.saliency_order(s[b, :valid]).tolist()
        chosen, strict = set(kept), []
        decided = True
        for i in order:
            if len(strict) == budget:
                break
            c = max((float(xn[p] @ xn[i]) for p in strict), default=float("-inf"))
            if tau - eps <= c < tau + eps:
                decided = False  # within rounding of tau: either decision is right
                break
            if c < tau:
                assert i in chosen, f"token {i} survives the strict pass but was not kept"
                strict.append(i)
        for p in range(len(strict)):
            for q in range(p):
                assert float(xn[strict[p]] @ xn[strict[q]]) < tau + eps
        if decided:
            fill = [i for i in order if i not in strict][: budget - len(strict)]
            assert chosen == set(strict) | set(fill)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40), d=st.integers(1, 12), batch=st.integers(1, 3), budget=st.integers(1, 45),
    tau=st.floats(-1.5, 2.0), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
    ragged=st.booleans(), dup=st.booleans(), nans=st.booleans(),
)
def test_properties(n, d, batch, budget, tau, dtype, seed, ragged, dup, nans):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=g)
    if dup and n > 1:
        x[:, n // 2] = x[:, 0]
    x = x.to(dtype)
    s = torch.randint(0, 4, (batch, n), generator=g).to(dtype)  # plenty of ties
    if nans:
        s[:, ::3] = float("nan")
    lengths = torch.randint(0, n + 1, (batch,), generator=g) if ragged else None
    for path in cpu_paths():
        out = pio_kernels.select_tokens(x, s, budget, tau, lengths, backend=path)
        _check_properties(x, s, budget, tau, lengths, out)


# ---------------------------------------------------------------- Triton (interpreter, subprocess)

_TRITON_SCRIPT = textwrap.dedent(r"""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, {tests!r})
    import torch
    import pio_kernels
    from pio_kernels import reference
    from pio_kernels.ops import available_backends
    from test_select_tokens_paths import _case, _run, _tau_equality_checks
    assert "triton" in available_backends("cpu"), available_backends("cpu")
    cases = [
        ((1, 67, 1, 1, torch.float32, False, 0), (1, 2), (0.8,), None),
        ((7, 67, 2, 77, torch.float32, False, 0), (1, 3, 7, 9), (-1.0, 0.8, 2.0), None),
        ((40, 131, 3, 5, torch.float32, True, 4), (1, 6, 39), (0.5, 0.95), (40, 0, 17)),
        ((70, 131, 2, 9, torch.bfloat16, True, 0), (8, 69), (0.8,), (70, 33)),
        ((70, 131, 1, 13, torch.float16, False, 3), (10,), (0.5, 0.95), None),
    ]
    checked = _tau_equality_checks(lambda x, s, k, t: pio_kernels.select_tokens(x, s, k, t, backend="triton"))
    for key, budgets, taus, lengths in cases:
        for budget in budgets:
            for tau in taus:
                _run("triton", "cpu", key, budget, tau, lengths)
                checked += 1
    print("checked", checked)
""")


@pytest.mark.skipif(not pio_kernels.ops._HAS_TRITON, reason="triton not installed")
def test_triton_interpreter_matches_reference():
    out = run_interpreted(["-c", _TRITON_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))])
    assert "checked 26" in out, out


# ---------------------------------------------------------------- CUDA

def _gpu_paths() -> list[str]:
    """The CUDA paths, the compiled kernel first; a GPU test with no compiled CUDA kernel fails
    (it must not pass on the Triton and PyTorch paths alone)."""
    paths = available_backends("cuda")
    assert "cuda" in paths, _missing_cuda_kernel()
    return [p for p in paths if p in ("cuda", "triton", "torch")]


def _missing_cuda_kernel() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    return (f"the compiled CUDA kernel of select_tokens is missing (available: {available_backends('cuda')}, "
            f"extension loaded: {pio_kernels.HAS_EXTENSION}, CUDA_HOME: {CUDA_HOME}); rebuild with "
            "PIO_REQUIRE_EXTENSION=1 pip install --no-deps --no-build-isolation -e . to see why")


@cuda
@needs_gpu
def test_gpu_has_the_compiled_cuda_kernel():
    """A failed CUDA build only warns at install time: on a machine with a GPU, fail here."""
    assert "cuda" in available_backends("cuda"), _missing_cuda_kernel()
    x, s = torch.randn(2, 40, 8, device="cuda"), torch.rand(2, 40, device="cuda")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pio::select_tokens", "CUDA")
    got = pio_kernels.select_tokens(x, s, 5, 0.5)  # the dispatcher's choice: the compiled kernel
    assert torch.equal(got.cpu(), reference.select_tokens(x.cpu(), s.cpu(), 5, 0.5))


@cuda
@needs_gpu
def test_gpu_cosine_equal_to_tau_is_suppressed():
    for path in _gpu_paths():
        _tau_equality_checks(lambda x, s, k, t: pio_kernels.select_tokens(x.cuda(), s.cuda(), k, t, backend=path))


@cuda
@needs_gpu
@pytest.mark.parametrize("n", [1, 7, 576, 2880, 5000])
@pytest.mark.parametrize("tau", TAUS)
def test_gpu_matches_reference(n, tau):
    big = n >= 2880
    for dtype in (torch.float32,) if big else DTYPES:
        key = (n, 257 if big else 515, 1 if big else 2, 11 * n, dtype, dtype != torch.float32, 0)
        budgets = (1, 64, n // 9 or 1, n) if big else _small_budgets(n)
        for path in _gpu_paths():
            for budget in budgets:
                _run(path, "cuda", key, budget, tau)


@cuda
@needs_gpu
@pytest.mark.parametrize("seed", range(4))
def test_gpu_ragged_nans_ties(seed):
    key = (97, 131, 4, 100 + seed, torch.float32, True, 9)
    lengths = (97, 0, 13 + seed, 60)
    for path in _gpu_paths():
        for tau in (0.5, 0.8, 0.95):
            for budget in (1, 5, 14, 40, 97, 120):
                _run(path, "cuda", key, budget, tau, lengths)


@cuda
@needs_gpu
def test_gpu_prefix_overflow():
    """Heavy suppression (one tight cluster): the walk must go past the CUDA kernel's prefix."""
    n, d = 3000, 64
    g = torch.Generator().manual_seed(0)
    centre = F.normalize(torch.randn(1, d, generator=g), dim=-1)
    x = (centre + 0.01 * torch.randn(n, d, generator=g))[None]
    x[0, ::500] = torch.randn(6, d, generator=g)  # a few independent tokens late in the order
    s = torch.linspace(1, 0, n)[None]
    want = reference.select_tokens(x, s, 8, 0.8)
    for path in _gpu_paths():
        assert torch.equal(pio_kernels.select_tokens(x.cuda(), s.cuda(), 8, 0.8, backend=path).cpu(), want)


@cuda
@needs_gpu
def test_gpu_matches_cpu_kernel():
    key = (576, 515, 3, 5, torch.bfloat16, True, 5)
    x, s = _case(*key)
    lengths = torch.tensor([576, 100, 3])
    for budget in (1, 64, 320):
        cpu = pio_kernels.select_tokens(x, s, budget, 0.8, lengths)
        for path in _gpu_paths():
            got = pio_kernels.select_tokens(x.cuda(), s.cuda(), budget, 0.8, lengths.cuda(), backend=path)
            assert torch.equal(got.cpu(), cpu)


@cuda
@needs_gpu
def test_gpu_cuda_graph_capture_and_replay():
    x, s = (t.cuda() for t in _case(576, 515, 2, 5, torch.float32, False, 0))
    lengths = torch.tensor([576, 200], device="cuda")
    for path in _gpu_paths():
        fn = lambda: pio_kernels.select_tokens(x, s, 64, 0.8, lengths, backend=path)  # noqa: E731
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up outside the capture (Triton compiles here)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        for seed in (1, 2):  # new inputs in place, replay, compare with the reference
            xn, sn = _case(576, 515, 2, seed, torch.float32, False, 0)
            x.copy_(xn)
            s.copy_(sn)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out.cpu(), reference.select_tokens(xn, sn, 64, 0.8, lengths.cpu()))


@cuda
@needs_gpu
def test_gpu_out_of_range_lengths_are_clamped():
    x, s = torch.randn(2, 10, 4, device="cuda"), torch.rand(2, 10, device="cuda")
    for path in _gpu_paths():
        got = pio_kernels.select_tokens(x, s, 3, 0.8, torch.tensor([-4, 99], device="cuda"), backend=path)
        want = reference.select_tokens(x.cpu(), s.cpu(), 3, 0.8, torch.tensor([0, 10]))
        assert torch.equal(got.cpu(), want)
