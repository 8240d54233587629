"""The block scheme of the GPU NMS paths (SPEC section 3), checked on CPU.

The CUDA kernel (``csrc/cuda/select_tokens.cu``) and the Triton path resolve the strict pass
block by block over the saliency order (``pio_kernels.nms.block_plan``): a prefix, then
blocks whose candidates are first tested against the picks so far (``cross``), then against
each other (``mask``, only the 64 x 64 tiles with a live row and a live column), then walked
(``scan``). No GPU here: :func:`emulate_cuda` replays those kernels step by step in torch,
word for word where it matters (the alive set is cleared from the pick's 32-bit word on, and
tiles that a kernel skips keep whatever bits an earlier block or nobody left there), and is
compared with the reference on inputs that exhaust the prefix. The Triton path, which
follows the same plan, is compared with the reference under the Triton interpreter.

Identical indices are a fair demand only when no cosine is within rounding of ``tau``: every
input here either has such a margin (checked) or exact values (one-hot rows, cos 0 or 1).
"""
from __future__ import annotations

import contextlib

import os
import re
import subprocess
import textwrap

import pytest
import torch
import torch.nn.functional as F

import pio_kernels
from pio_kernels import nms, reference
from test_select_tokens_paths import _assert_margin, clustered
from triton_interpreter import run_interpreted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE = 64


# ---------------------------------------------------------------- the emulation

# Bugs emulate_cuda can plant, one at a time.
PLANTED = ("cos > tau", "no cross step", "skip tiles with a dead column", "suppress from the next word")


def _tiles(m: int) -> range:
    return range(0, m, TILE)


def emulate_cuda(features: torch.Tensor, scores: torch.Tensor, budget: int, tau: float,
                 lengths: torch.Tensor | None = None, garbage: str = "ones", seed: int = 0,
                 plant: str | None = None) -> torch.Tensor:
    """What the CUDA launch sequence computes, kernel by kernel, on CPU.

    features (B, N, D), scores (B, N), lengths (B,) int64 or None. ``garbage`` fills the mask
    and ``sup`` buffers before the first kernel ("ones", "zeros" or "random"): the kernels
    allocate them uninitialised and must never depend on a bit they did not write for the
    current block (or that cannot matter). ``plant`` introduces one known bug (see
    :data:`PLANTED`), to show that the comparisons below catch it.
    """
    batch, n_all, d = features.shape
    lengths = nms.clamp_lengths(lengths, batch, n_all, features.device)
    if batch == 0 or n_all == 0:
        return torch.full((batch, budget), -1, dtype=torch.long)
    xn = F.normalize(features.float(), dim=-1, eps=1e-12)
    order = nms.saliency_order(scores, lengths)
    blocks = nms.block_plan(n_all, budget)
    t_pad = -(-max(size for _, size in blocks) // TILE) * TILE
    k = min(budget, n_all)
    tau_f = float(torch.tensor(tau, dtype=torch.float64).to(torch.float32))
    hits = (lambda c: c > tau_f) if plant == "cos > tau" else (lambda c: c >= tau_f)
    g = torch.Generator().manual_seed(seed)

    def fill(shape):
        if garbage == "ones":
            return torch.ones(shape, dtype=torch.bool)
        if garbage == "zeros":
            return torch.zeros(shape, dtype=torch.bool)
        return torch.rand(shape, generator=g) < 0.5

    mask = fill((batch, t_pad, t_pad))   # bit j of row i, block positions
    sup = torch.zeros(batch, t_pad, dtype=torch.bool)  # at::zeros in the launcher
    picks: list[list[int]] = [[] for _ in range(batch)]

    def positions(b: int, start: int, size: int) -> int:  # block_positions() in the .cu
        n = int(lengths[b])
        if n <= k or len(picks[b]) >= k or start >= n:
            return 0
        return min(n - start, size)

    def sims(b: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return xn[b, order[b, rows]] @ xn[b, order[b, cols]].T  # fp32

    for start, size in blocks:
        use_sup = start > 0
        if use_sup and plant != "no cross step":  # cross_kernel
            for b in range(batch):
                m = positions(b, start, size)
                for row0 in _tiles(m):
                    rows = torch.arange(row0, min(row0 + TILE, m))
                    hit = torch.zeros(TILE, dtype=torch.bool)
                    if picks[b]:
                        hit[: len(rows)] = hits(sims(b, start + rows, torch.tensor(picks[b]))).any(dim=1)
                    sup[b, row0:row0 + TILE] = hit  # both words of the tile, bits >= m zero
        for b in range(batch):  # similarity_mask_kernel
            m = positions(b, start, size)
            live = (~sup[b, :t_pad] if use_sup else torch.ones(t_pad, dtype=torch.bool)) & (torch.arange(t_pad) < m)
            for row0 in _tiles(m):
                for col0 in _tiles(m):
                    if col0 < row0:
                        continue
                    if use_sup:
                        live_cols = live[col0:col0 + TILE]
                        if plant == "skip tiles with a dead column":
                            live_cols = live_cols | (torch.arange(col0, col0 + TILE) >= m)
                            live_cols = live_cols.all()
                        if not (live[row0:row0 + TILE].any() and live_cols.any()):
                            continue  # skipped: the mask keeps its earlier bits there
                    rows = torch.arange(row0, row0 + TILE)
                    cols = torch.arange(col0, col0 + TILE)
                    ok_r, ok_c = rows < m, cols < m
                    val = hits(sims(b, start + rows.clamp(max=m - 1), start + cols.clamp(max=m - 1)))
                    val &= ok_r[:, None] & ok_c[None, :] & (cols[None, :] > rows[:, None])
                    mask[b, row0:row0 + TILE][ok_r, col0:col0 + TILE] = val[ok_r]  # rows >= m not stored
        for b in range(batch):  # scan_kernel
            m = positions(b, start, size)
            if m == 0:
                continue
            wm = -(-m // 32)
            alive = torch.zeros(wm * 32, dtype=torch.bool)
            alive[:m] = True
            if use_sup:
                alive &= ~sup[b, :wm * 32]
            pos = 0
            while len(picks[b]) < k:
                free = alive[pos:].nonzero()
                if len(free) == 0:
                    break
                nxt = pos + int(free[0, 0])
                picks[b].append(start + nxt)
                pos = nxt + 1
                w0 = (nxt // 32 + (plant == "suppress from the next word")) * 32  # from the pick's own word
                alive[w0:] &= ~mask[b, nxt, w0:wm * 32]

    out = torch.full((batch, budget), -1, dtype=torch.long)  # finish_kernel
    for b in range(batch):
        n = int(lengths[b])
        if n <= budget:
            out[b, :n] = torch.arange(n)
            continue
        chosen = set(picks[b])
        for r in range(n):
            if len(chosen) == budget:
                break
            chosen.add(r)
        out[b] = torch.tensor(sorted(int(order[b, r]) for r in chosen))
    return out


# ---------------------------------------------------------------- inputs that exhaust the prefix

def near_duplicates(n: int, d: int, seed: int, distinct: tuple[int, ...]) -> torch.Tensor:
    """One tight cluster (pairwise cos > 0.95) with mutually orthogonal rows at ``distinct``
    (orthogonal to the cluster too): with descending scores by index, the walk picks row 0,
    suppresses the cluster and must reach every distinct row, wherever it lies."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, d, dtype=torch.float64)
    x[:, 0] = 1.0
    x[:, 1:d // 2] = 0.02 * torch.randn(n, d // 2 - 1, generator=g, dtype=torch.float64)
    for i, row in enumerate(distinct):
        x[row] = 0
        x[row, d // 2 + i] = 1.0 + i
    return (x * torch.exp(torch.randn(n, 1, generator=g, dtype=torch.float64))).float()


def consecutive_clusters(n: int, d: int, size: int, seed: int) -> torch.Tensor:
    """Clusters of ``size`` rows, consecutive in index, cos > 0.95 inside and |cos| < 0.5
    across: with descending scores by index, one pick per cluster, spread over every block."""
    g = torch.Generator().manual_seed(seed)
    clusters = -(-n // size)
    centres = F.normalize(torch.randn(clusters, d, generator=g, dtype=torch.float64), dim=-1)
    x = centres.repeat_interleave(size, dim=0)[:n] + 0.04 * torch.randn(n, d, generator=g, dtype=torch.float64) / d ** 0.5
    return x.float()


def one_hot_copies(n: int, d: int, distinct: tuple[int, ...]) -> torch.Tensor:
    """Every row e_0 (cos exactly 1 between copies) except ``distinct`` rows e_1, e_2, ...:
    with tau = 1.0 a copy is suppressed only by ``cos >= tau`` at equality."""
    x = torch.zeros(n, d)
    x[:, 0] = 1.0
    for i, row in enumerate(distinct):
        x[row] = 0
        x[row, 1 + i] = 1.0
    return x


def _descending(n: int) -> torch.Tensor:
    return torch.linspace(1, 0, n)


@pytest.fixture
def small_blocks(monkeypatch):
    """A plan with many small blocks at small N: prefix >= 64, tail blocks of 64."""
    monkeypatch.setattr(nms, "PREFIX_MIN", 64)
    monkeypatch.setattr(nms, "TAIL_BLOCK_MAX", 64)
    monkeypatch.setattr(nms, "TAIL_BLOCKS", 64)


def _cases(n: int) -> list[tuple[str, torch.Tensor, torch.Tensor, int, float, torch.Tensor | None]]:
    """(name, features (B, N, D), scores, budget, tau, lengths) that walk past the prefix."""
    late = (n // 3, n // 2 + 1, n - 70, n - 1)
    cases = [
        ("near duplicates", near_duplicates(n, 32, 0, late)[None], _descending(n)[None], 8, 0.8, None),
        ("one-hot copies at tau", one_hot_copies(n, 8, late)[None], _descending(n)[None], 6, 1.0, None),
        ("consecutive clusters", consecutive_clusters(n, 48, max(8, n // 40), 1)[None], _descending(n)[None],
         45, 0.8, None),
        ("everything suppresses", torch.randn(1, n, 16, generator=torch.Generator().manual_seed(2)),
         torch.rand(1, n, generator=torch.Generator().manual_seed(3)), 7, -1.0, None),
        ("top-k", torch.randn(1, n, 16, generator=torch.Generator().manual_seed(4)),
         torch.rand(1, n, generator=torch.Generator().manual_seed(5)), 9, 2.0, None),
    ]
    # A ragged batch of clustered rows at a low tau, with NaN scores and ties.
    x = torch.stack([clustered(n, 64, 10 + b) for b in range(3)])
    s = torch.randint(0, 50, (3, n), generator=torch.Generator().manual_seed(6)).float()
    s[:, ::17] = float("nan")
    cases.append(("ragged clusters", x, s, n // 12, 0.5, torch.tensor([n, n // 2, 40])))
    return cases


def _check_case(name, x, s, budget, tau, lengths, run) -> None:
    if name not in ("one-hot copies at tau", "everything suppresses", "top-k"):
        _assert_margin(x, taus=(tau,))
    want = reference.select_tokens(x, s, budget, tau, lengths)
    got = run(x, s, budget, tau, lengths)
    assert torch.equal(got.cpu(), want), f"{name}: {got.tolist()} != {want.tolist()}"


# ---------------------------------------------------------------- tests

def test_plan_constants_match_the_cuda_source():
    """pio_kernels.nms mirrors the block plan of csrc/cuda/select_tokens.cu: the same numbers."""
    source = open(os.path.join(ROOT, "csrc", "cuda", "select_tokens.cu")).read()
    names = {"kPrefixPerBudget": "PREFIX_PER_BUDGET", "kPrefixMin": "PREFIX_MIN", "kPrefixMax": "PREFIX_MAX",
             "kTailBlocks": "TAIL_BLOCKS", "kTailBlockMax": "TAIL_BLOCK_MAX", "kBlockAlign": "BLOCK_ALIGN",
             "kTile": None}
    for cpp, py in names.items():
        found = re.search(rf"constexpr int(?:64_t)? {cpp} = (\d+);", source)
        assert found, f"{cpp} not found in the CUDA source"
        assert int(found.group(1)) == (TILE if py is None else getattr(nms, py)), cpp


@pytest.mark.parametrize("n", [1, 2, 63, 576, 1024, 1025, 2880, 3000, 16384, 100_000])
@pytest.mark.parametrize("budget", [1, 8, 64, 320, 1819, 9000, 200_000])
def test_block_plan_covers_the_order(n, budget):
    blocks = nms.block_plan(n, budget)
    assert blocks[0] == (0, min(n, max(4 * min(budget, n), 1024), 32768))
    assert [start for start, _ in blocks] == [0] + [s + z for s, z in blocks[:-1]]  # contiguous
    assert sum(size for _, size in blocks) == n and all(size >= 1 for _, size in blocks)
    tail = blocks[1:]
    if tail:
        size = tail[0][1]
        assert all(z == size for _, z in tail[:-1]) and tail[-1][1] <= size
        assert size % 64 == 0 or size == blocks[0][1] or len(tail) == 1
        assert size >= blocks[0][1] or len(tail) == 1
        assert size <= max(blocks[0][1], nms.TAIL_BLOCK_MAX)
        assert len(tail) <= max(nms.TAIL_BLOCKS, -(-(n - blocks[0][1]) // nms.TAIL_BLOCK_MAX))
    # N = 16384, k = 64 (Qwen2.5-VL at high resolution): 1 + 8 blocks, not 15k serial steps.
    if (n, budget) == (16384, 64):
        assert len(blocks) == 9


def test_block_plan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="budget"):
        nms.block_plan(10, 0)


@pytest.mark.parametrize("garbage", ["ones", "zeros", "random"])
def test_emulation_with_small_blocks_matches_reference(small_blocks, garbage):
    """Many blocks of 64 at N = 700: picks in the prefix, in later blocks, across blocks."""
    assert len(nms.block_plan(700, 8)) > 5
    for case in _cases(700):
        _check_case(*case, run=lambda x, s, k, t, ln: emulate_cuda(x, s, k, t, ln, garbage=garbage))


def test_emulation_with_the_real_plan_matches_reference():
    """The plan the CUDA kernel uses, at N = 3000: prefix 1024 and two more blocks."""
    assert len(nms.block_plan(3000, 8)) == 3
    for case in _cases(3000):
        _check_case(*case, run=emulate_cuda)


@pytest.mark.parametrize("plant", PLANTED)
def test_emulation_cases_catch_planted_bugs(small_blocks, plant):
    """The comparisons have teeth: each planted bug makes some case differ from the reference."""
    caught = []
    for name, x, s, budget, tau, lengths in _cases(700):
        want = reference.select_tokens(x, s, budget, tau, lengths)
        if not torch.equal(emulate_cuda(x, s, budget, tau, lengths, plant=plant), want):
            caught.append(name)
    assert caught, f"no case catches {plant!r}"


# ---------------------------------------------------------------- the Triton path, same plan

_TRITON_SCRIPT = textwrap.dedent(r"""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, {tests!r})
    import torch
    import pio_kernels
    from pio_kernels import nms
    from pio_kernels.ops import available_backends
    from test_select_tokens_blocks import _cases, _check_case
    assert "triton" in available_backends("cpu"), available_backends("cpu")
    run = lambda x, s, k, t, ln: pio_kernels.select_tokens(x, s, k, t, ln, backend="triton")
    checked = 0
    # Small plans (the interpreter takes about a second per 64 x 64 tile program).
    from pio_kernels.triton import select_tokens as ts
    # The first plan has blocks of 128 that the Triton path cuts in two (its _BLOCK_MAX).
    for prefix_min, tail_max, tail_blocks, block_max, blocks in ((128, 4096, 3, 64, 5), (128, 4096, 3, 16384, 3)):
        nms.PREFIX_MIN, nms.TAIL_BLOCK_MAX, nms.TAIL_BLOCKS = prefix_min, tail_max, tail_blocks
        ts._BLOCK_MAX = block_max
        assert len(ts._blocks(300, 8)) == blocks, ts._blocks(300, 8)
        for case in _cases(300):
            _check_case(*case, run=run)
            checked += 1
    print("checked", checked)
""")


@pytest.mark.skipif(not pio_kernels.ops._HAS_TRITON, reason="triton not installed")
def test_triton_blocks_match_reference_under_interpreter():
    """The Triton path on inputs that walk past the prefix, under two block plans."""
    out = run_interpreted(["-c", _TRITON_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))],
                          timeout=900)
    assert "checked 12" in out, out


# ---------------------------------------------------------------- Triton: launch choices, sm_90 compile

triton_select = pytest.importorskip("pio_kernels.triton.select_tokens") if pio_kernels.ops._HAS_TRITON else None


@pytest.mark.skipif(triton_select is None, reason="triton not installed")
@pytest.mark.parametrize("n,budget", [(1, 1), (300, 8), (16384, 64), (40000, 9000), (100_000, 30_000)])
def test_triton_blocks_split_the_plan(n, budget):
    blocks = triton_select._blocks(n, budget)
    assert [start for start, _ in blocks] == [0] + [s + z for s, z in blocks[:-1]]
    assert sum(z for _, z in blocks) == n and max(z for _, z in blocks) <= triton_select._BLOCK_MAX
    assert {start for start, _ in nms.block_plan(n, budget)} <= {start for start, _ in blocks}


_SIG_TAIL = {"N": "i32", "D": "i32", "W": "i32", "budget": "i32", "start": "i32", "size": "i32"}
_CROSS_SIG = {"xn_ptr": "*fp32", "order_ptr": "*i32", "len_ptr": "*i64", "picks_ptr": "*i32", "count_ptr": "*i32",
              "sup_ptr": "*i32", **_SIG_TAIL, "tau": "fp32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
              "BLOCK_K": "constexpr"}
_MASK_SIG = {"xn_ptr": "*fp32", "order_ptr": "*i32", "len_ptr": "*i64", "count_ptr": "*i32", "sup_ptr": "*i32",
             "mask_ptr": "*i32", **_SIG_TAIL, "tau": "fp32", "HAS_SUP": "constexpr", "BLOCK_M": "constexpr",
             "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
_SCAN_SIG = {"mask_ptr": "*i32", "sup_ptr": "*i32", "len_ptr": "*i64", "picks_ptr": "*i32", "count_ptr": "*i32",
             "picked_ptr": "*i8", "N": "i32", "W": "i32", "budget": "i32", "start": "i32", "size": "i32",
             "HAS_SUP": "constexpr", "BLOCK_T": "constexpr"}


def _launch_configs() -> set[tuple]:
    """Every (tile, block_k, block_t, scan_warps) the launcher picks, over N, D and blocks."""
    out = set()
    for n in (1, 32, 33, 576, 2880, 16384, 100_000):
        for d in (1, 16, 17, 64, 4096):
            for budget in (1, 64, 1819, 9000):
                blocks = triton_select._blocks(n, budget)
                t_pad = -(-max(z for _, z in blocks) // 64) * 64
                cfg = triton_select._launch_config(n, d, t_pad)
                out.add((cfg["tile"], cfg["block_k"], cfg["block_t"], cfg["scan_warps"], len(blocks) > 1))
    return out


@pytest.mark.skipif(triton_select is None, reason="triton not installed")
def test_triton_kernels_compile_for_sm90_without_spills():
    """Ahead-of-time compilation for an H100 of every configuration the launcher can choose
    (no GPU needed). Where Triton ships cuobjdump, the cubin must use no stack (no spills)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    import shutil

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    configs = _launch_configs()
    gemm = {(tile, block_k, multi) for tile, block_k, _, _, multi in configs}
    scans = {(block_t, warps, multi) for _, _, block_t, warps, multi in configs}
    assert max(block_t for block_t, _, _ in scans) <= triton_select._BLOCK_MAX
    cases = []
    for tile, block_k, multi in sorted(gemm):
        consts = {"BLOCK_M": tile, "BLOCK_N": tile, "BLOCK_K": block_k}
        cases.append((triton_select._similarity_mask_kernel, _MASK_SIG, {"HAS_SUP": multi, **consts},
                      triton_select._GEMM_WARPS))
        if multi:
            cases.append((triton_select._cross_kernel, _CROSS_SIG, consts, triton_select._GEMM_WARPS))
    for block_t, warps, multi in sorted(scans):
        cases.append((triton_select._scan_kernel, _SCAN_SIG, {"HAS_SUP": multi, "BLOCK_T": block_t}, warps))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cuobjdump = cuobjdump if os.path.exists(cuobjdump) else shutil.which("cuobjdump")
    for fn, signature, constexprs, warps in cases:
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        except Exception as exc:  # noqa: BLE001 - only a missing toolchain is a skip
            if "ptxas" in str(exc).lower() or "nvidia" in str(exc).lower() and "backend" in str(exc).lower():
                pytest.skip(f"no NVIDIA toolchain for AOT compilation: {exc}")
            raise
        assert compiled.metadata.shared <= 228 * 1024
        if cuobjdump:
            cubin = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pio-{os.getpid()}-{fn.__name__}.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            try:
                usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True).stdout
            finally:
                os.remove(cubin)
            stack = re.search(r"STACK:(\d+)", usage)
            assert stack, usage
            assert int(stack.group(1)) == 0, f"{fn.__name__} {constexprs} num_warps={warps} spills: {usage.strip()}"


# ---------------------------------------------------------------- Triton: launches on the tensors' device

_GUARD_SCRIPT = textwrap.dedent(r"""
    import contextlib, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, {tests!r})
    import torch
    import pio_kernels
    from pio_kernels import nms
    from pio_kernels.triton import select_tokens as ts
    from test_select_tokens_blocks import _cases

    current = []  # the device _on_device made current, innermost last
    launched = []

    @contextlib.contextmanager
    def recording_guard(device):
        current.append(torch.device(device))
        try:
            yield
        finally:
            current.pop()

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                devices = {{a.device for a in args if isinstance(a, torch.Tensor)}}
                assert current, f"{{self.name}} launched outside _on_device"
                assert devices == {{current[-1]}}, f"{{self.name}}: tensors on {{devices}}, current {{current[-1]}}"
                launched.append(self.name)
                return launch(*args, **kwargs)
            return run

    ts._on_device = recording_guard
    for name in ("_cross_kernel", "_similarity_mask_kernel", "_scan_kernel"):
        setattr(ts, name, Spy(name, getattr(ts, name)))
    nms.PREFIX_MIN, nms.TAIL_BLOCK_MAX, nms.TAIL_BLOCKS = 64, 64, 64
    name, x, s, budget, tau, lengths = _cases(200)[0]
    pio_kernels.select_tokens(x, s, budget, tau, lengths, backend="triton")
    assert set(launched) == {{"_cross_kernel", "_similarity_mask_kernel", "_scan_kernel"}}, launched
    print("guarded", len(launched))
""")


@pytest.mark.skipif(not pio_kernels.ops._HAS_TRITON, reason="triton not installed")
def test_triton_launches_run_under_the_tensors_device():
    """Triton launches on the current device: every launch of the NMS kernels must sit inside
    ``_on_device(features.device)``. CPU tensors under the interpreter, with the guard swapped
    for a recorder; fails when a launch is not guarded."""
    out = run_interpreted(["-c", _GUARD_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))])
    assert "guarded" in out, out


def test_on_device_switches_only_for_cuda(monkeypatch):
    if not pio_kernels.ops._HAS_TRITON:
        pytest.skip("triton not installed")
    from pio_kernels.triton import select_tokens as ts

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    with ts._on_device(torch.device("cuda", 1)):
        pass
    with ts._on_device(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


# ---------------------------------------------------------------- CUDA (GPU machine)

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@needs_gpu
@pytest.mark.parametrize("n", [700, 3000])
def test_gpu_paths_past_the_prefix_match_reference(n):
    """The compiled kernel's real plan (prefix >= 1024, then blocks) and the Triton path's, on
    inputs that exhaust the prefix; the equality-at-tau case goes through the cross step."""
    from test_select_tokens_paths import _gpu_paths

    for path in _gpu_paths():
        if path == "torch" and n > 1000:
            continue  # N sequential steps of small launches: slow, and not a block scheme
        run = lambda x, s, k, t, ln: pio_kernels.select_tokens(  # noqa: E731
            x.cuda(), s.cuda(), k, t, None if ln is None else ln.cuda(), backend=path)
        for case in _cases(n):
            _check_case(*case, run=run)


@cuda
@needs_gpu
def test_gpu_heavy_suppression_at_16384_matches_cpu_kernel():
    """N = 16384 (Qwen2.5-VL, high resolution), one cluster with a few distinct tokens late in
    the order: every block is walked. Checked against the compiled CPU kernel (itself checked
    against the reference), which is fast here: every candidate stops at its first pick."""
    from test_select_tokens_paths import _gpu_paths

    n = 16384
    x = torch.stack([near_duplicates(n, 64, 1, (3000, 9000, n - 5)), one_hot_copies(n, 64, (5000, n - 1))])
    s = torch.stack([_descending(n), _descending(n)])
    lengths = torch.tensor([n, n - 2])
    for budget, tau in ((8, 0.8), (64, 0.8), (4, 1.0)):
        want = pio_kernels.select_tokens(x, s, budget, tau, lengths, backend="cpp") \
            if "cpp" in pio_kernels.available_backends("cpu") else reference.select_tokens(x, s, budget, tau, lengths)
        for path in _gpu_paths():
            if path == "torch":
                continue
            got = pio_kernels.select_tokens(x.cuda(), s.cuda(), budget, tau, lengths.cuda(), backend=path)
            assert torch.equal(got.cpu(), want), (path, budget, tau)


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_triton_on_a_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the Triton path launches on cuda:1."""
    x = torch.stack([near_duplicates(700, 32, 0, (300, 650))])
    s = _descending(700)[None]
    want = reference.select_tokens(x, s, 6, 0.8)
    with torch.cuda.device(0):
        for path in ("triton", "cuda"):
            got = pio_kernels.select_tokens(x.to("cuda:1"), s.to("cuda:1"), 6, 0.8, backend=path)
            assert got.device == torch.device("cuda", 1) and torch.equal(got.cpu(), want)
