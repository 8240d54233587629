"""torch.ops.pio.select_tokens (CPU) against pio_kernels.reference.select_tokens (SPEC section 3)."""
import pytest
import torch
import torch.nn.functional as F

import pio_kernels
from pio_kernels import ops, reference

TAUS = [-1.0, 0.5, 0.8, 0.95, 2.0]


def clustered(batch, n, d, *, seed, dtype=torch.float32, clusters=4, noise=0.3, tau=0.8, margin=1e-4):
    """Features in a few tight clusters (so NMS suppresses), redrawn until no pair's cosine
    lies within ``margin`` of ``tau``: summation order may then not flip a decision."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(100):
        centers = torch.randn(batch, clusters, d, generator=g)
        assign = torch.randint(0, clusters, (batch, n), generator=g)
        x = centers.gather(1, assign[..., None].expand(-1, -1, d)) + noise * torch.randn(batch, n, d, generator=g)
        x = x.to(dtype)
        xn = F.normalize(x.double(), dim=-1)
        cos = xn @ xn.transpose(1, 2)
        if not ((cos - tau).abs() < margin).any():
            return x
    raise RuntimeError("could not draw features clear of tau")


def check_against_reference(features, scores, budget, tau, lengths=None):
    got = pio_kernels.select_tokens(features, scores, budget, tau, lengths)
    want = reference.select_tokens(features, scores, budget, tau, lengths)
    assert got.dtype == torch.int64 and got.shape == (features.shape[0], budget)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    return got


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("n,d", [(1, 4), (7, 3), (33, 16), (130, 64)])
def test_matches_reference(n, d, tau):
    for seed in range(3):
        x = clustered(3, n, d, seed=seed, tau=tau)
        s = torch.rand(3, n, generator=torch.Generator().manual_seed(100 + seed))
        for budget in sorted({1, max(1, n // 3), n, n + 2}):
            check_against_reference(x, s, budget, tau)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_features(dtype):
    x = clustered(2, 60, 32, seed=7, dtype=dtype)
    s = torch.rand(2, 60)
    for budget in (1, 9, 30):
        check_against_reference(x, s, budget, 0.8)
    check_against_reference(x, s.to(dtype), 9, 0.8)


def test_ties_and_nans():
    g = torch.Generator().manual_seed(3)
    x = clustered(4, 50, 8, seed=3)
    s = torch.randint(0, 3, (4, 50), generator=g).float()  # heavy ties
    s[torch.rand(4, 50, generator=g) < 0.2] = float("nan")
    s[3] = float("nan")  # a row of NaNs: index order
    for budget in (1, 5, 20, 49):
        check_against_reference(x, s, budget, 0.8)
    out = pio_kernels.select_tokens(torch.eye(5)[None], torch.ones(1, 5), 3, 0.8)
    assert out.tolist() == [[0, 1, 2]]


def test_exact_duplicates_are_suppressed():
    x = torch.randn(1, 1, 16).expand(1, 10, 16).contiguous()
    s = torch.arange(10.0)[None]
    out = check_against_reference(x, s, 3, 0.95)
    assert out.tolist() == [[7, 8, 9]]  # one strict pick (9), then the fill pass


def test_ragged_lengths():
    x = clustered(5, 40, 16, seed=11)
    s = torch.rand(5, 40)
    lengths = torch.tensor([40, 17, 5, 0, 6])
    out = check_against_reference(x, s, 6, 0.8, lengths)
    assert out[3].tolist() == [-1] * 6
    assert out[2].tolist() == [0, 1, 2, 3, 4, -1]
    assert ((out < lengths[:, None]) | (out == -1)).all()


def test_non_contiguous_inputs():
    base = clustered(3, 64, 24, seed=5)
    x = base.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided (B, D, N) storage
    assert not x.is_contiguous()
    s = torch.rand(3, 128)[:, ::2]
    check_against_reference(x, s, 10, 0.8)
    check_against_reference(base[:, ::2], s[:, ::2], 7, 0.5)


def test_output_sorted_unique_and_within_budget():
    x = clustered(2, 90, 12, seed=9)
    s = torch.randn(2, 90)
    out = pio_kernels.select_tokens(x, s, 25, 0.8)
    for row in out:
        assert row.tolist() == sorted(set(row.tolist()))


def test_unbatched_input():
    x = clustered(1, 20, 8, seed=2)[0]
    s = torch.rand(20)
    got = pio_kernels.select_tokens(x, s, 4)
    assert got.shape == (4,)
    assert got.tolist() == reference.select_tokens(x[None], s[None], 4)[0].tolist()


def test_pytorch_fallback_path_matches():
    # The path a build without the compiled extension runs.
    x = clustered(2, 30, 8, seed=4)
    s = torch.rand(2, 30)
    lengths = torch.tensor([30, 12])
    got = ops._select_tokens_torch(x, s, 8, 0.8, lengths)
    torch.testing.assert_close(got, pio_kernels.select_tokens(x, s, 8, 0.8, lengths), rtol=0, atol=0)
    with pytest.raises(ValueError, match="lengths"):
        ops._select_tokens_torch(x, s, 8, 0.8, torch.tensor([31, 1]))


def test_opcheck():
    x = clustered(2, 12, 8, seed=1)
    s = torch.rand(2, 12)
    for args in [(x, s, 3, 0.8, None), (x, s, 20, 0.5, torch.tensor([12, 4])), (x.half(), s, 1, 2.0, None)]:
        torch.library.opcheck(torch.ops.pio.select_tokens.default, args)


def test_torch_compile_fullgraph():
    def f(features, scores):
        return pio_kernels.select_tokens(features * 2.0, scores, 5, 0.8) + 0

    x = clustered(2, 16, 8, seed=6)
    s = torch.rand(2, 16)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, s), f(x, s), rtol=0, atol=0)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, s: pio_kernels.select_tokens(x, s, 0), ValueError, "budget must be >= 1, got 0"),
    (lambda x, s: pio_kernels.select_tokens(x, s, 2.5), TypeError, "budget must be an int"),
    (lambda x, s: pio_kernels.select_tokens(x, s[:, :-1], 2), ValueError, "scores must be"),
    (lambda x, s: pio_kernels.select_tokens(x[0, 0], s[0, 0], 2), ValueError, "features must be"),
    (lambda x, s: pio_kernels.select_tokens(x.long(), s, 2), TypeError, "features must be floating"),
    (lambda x, s: pio_kernels.select_tokens(x, s.long(), 2), TypeError, "scores must be floating"),
    (lambda x, s: pio_kernels.select_tokens(x, s, 2, float("nan")), ValueError, "tau must not be NaN"),
    (lambda x, s: pio_kernels.select_tokens(x, s, 2, "0.8"), TypeError, "tau must be a real number, got str"),
    (lambda x, s: pio_kernels.select_tokens(x, s, 2, lengths=torch.tensor([3])), ValueError, "lengths must be"),
    (lambda x, s: pio_kernels.select_tokens(x, s, 2, lengths=torch.tensor([3.0, 1.0])), TypeError, "lengths must be int64"),
    (lambda x, s: pio_kernels.select_tokens(x, s, 2, lengths=torch.tensor([3, 9])), ValueError, r"lengths must lie in \[0, 6\]"),
    (lambda x, s: pio_kernels.select_tokens(x, s, 2, lengths=torch.tensor([-1, 2])), ValueError, "lengths must lie"),
    (lambda x, s: pio_kernels.select_tokens(x, s, 2, lengths=[3, 2]), TypeError, "lengths must be a Tensor"),
    (lambda x, s: pio_kernels.select_tokens(x, s.to("meta"), 2), ValueError, "scores must be on the device"),
    (lambda x, s: pio_kernels.select_tokens(x[0], s, 2), ValueError, r"scores must be \(N,\)"),
])
def test_bad_input_errors(call, exc, match):
    x = torch.randn(2, 6, 4)
    s = torch.rand(2, 6)
    with pytest.raises(exc, match=match):
        call(x, s)


def test_raw_op_checks_too():
    # torch.ops.pio.select_tokens called directly still refuses bad input with the right type.
    x = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="budget"):
        torch.ops.pio.select_tokens(x, torch.rand(2, 6), 0)
    with pytest.raises(ValueError, match="lengths"):
        torch.ops.pio.select_tokens(x, torch.rand(2, 6), 2, 0.8, torch.tensor([7, 1]))


def test_package_works_without_the_extension():
    # A build without a compiler: the schema comes from Python and the op still answers.
    import subprocess
    import sys
    script = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import pio_kernels\n"
        "assert not pio_kernels.HAS_EXTENSION\n"
        "assert any('PIO_NO_EXTENSION' in str(x.message) for x in w)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(2, 9, 4, generator=g); s = torch.rand(2, 9, generator=g)\n"
        "got = torch.ops.pio.select_tokens(x, s, 3, 0.5, torch.tensor([9, 4]))\n"
        "want = pio_kernels.reference.select_tokens(x, s, 3, 0.5, torch.tensor([9, 4]))\n"
        "assert torch.equal(got, want), (got, want)\n"
        "try:\n"
        "    torch.ops.pio.select_tokens(x, s, 0)\n"
        "except ValueError as e:\n"
        "    assert 'budget' in str(e)\n"
        "else:\n"
        "    raise AssertionError('budget 0 accepted')\n"
    )
    env = {**__import__("os").environ, "PIO_NO_EXTENSION": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
