"""The fused CPU path and its compiled kernel (merging_helpers.fast.fused / .compiled):
bit for bit the reference engine's numbers (recipes.merge_tensor) on every option the
kernel implements, every dtype, the exact and the sampled top-k threshold, several
random blocks, any worker count, signed zeros; build errors and the fallback."""
import pytest
import torch
from conftest import heavy_tailed

from merging_helpers.config import MergeConfig
from merging_helpers.fast import compiled
from merging_helpers.fast import fused as fused_mod
from merging_helpers.fast.fused import FusedMerge, fused_supported
from merging_helpers.fast.streaming import merge_folders
from merging_helpers.recipes import merge_tensor


def _has_compiler():
    return compiled._compiler() is not None and compiled._cpu_ok()


needs_kernel = pytest.mark.skipif(not _has_compiler(), reason="no C compiler / AVX2")
NAME = "model.layers.0.mlp.up_proj.weight"


FUSED_CASES = [
    ("ties", dict(density=0.3)),
    ("ties", dict(density=0.3, weighted_election=True)),
    ("ties", dict(density=[0.2, 0.5, 0.9], weights=[0.5, 1.2, 0.8], lam=0.7, election="frequency")),
    ("ties", dict(drop_rate=0.8, weights=[0.5, 1.2, 0.8], weighted_election=True, rescale="inverse")),
    ("ties", dict(density=0.3, divide_by="nothing")),
    ("ties", dict(density=[0.30003, 0.7, 0.11111], count_rounding="floor")),  # mergekit's int(d·n) kept
    ("ties", dict(density=0.3, weights=[0.5, 1.2, 0.8], divide_by="weight_sum")),
    ("magnitude", dict(density=0.5, weights=[1.0, -0.5, 0.3])),
    ("magnitude", dict(density=1e-7)),  # k = 0: nothing kept
    ("magnitude", dict(density=1.0)),
    ("dare_ties", dict(drop_rate=0.9, seed=3)),
    ("dare_ties", dict(density=0.3, weighted_election=True, weights=[1.0, 0.6, 1.4])),
    ("dare_ties", dict(density=0.3, rescale=None, election="frequency")),
    ("dare_ties", dict(density=0.3, weighted_election=True)),  # the benchmark's: sum of agreeing deltas
    ("dare_linear", dict(density=[0.5, 0.3, 0.2], lam=1.3)),
    ("dare_ties", dict(drop_rate=[0.9, 0.7, 0.8], rescale="smallest", seed=2)),  # chapter 7's RMS-adaptive
    ("task_arithmetic", dict(weights=[0.3, 0.3, 0.4])),
]


def _fused_merge(method, kw, base, experts, piece=None, workers=2):
    config = MergeConfig.build(method, len(experts), **kw)
    assert fused_supported(config, "cpu")
    fused = FusedMerge(config, compiled.load(), workers=workers)
    if piece is not None:
        fused.piece = piece  # smaller pieces: only for methods without random numbers
    out = torch.empty_like(base)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fused(NAME, base, experts, out)
    finally:
        torch.set_num_threads(threads)
        fused.close()
    return out


@needs_kernel
@pytest.mark.parametrize("path", ["exact", "bracket", "bracket-overflow"])
@pytest.mark.parametrize("shape, dtype", [((300, 70), torch.bfloat16), ((300, 70), torch.float32),
                                          ((210, 50), torch.float16), ((2570,), torch.bfloat16)],
                         ids=["bf16", "fp32", "fp16", "1d-bf16"])
def test_fused_equals_merge_tensor(shape, dtype, path, monkeypatch):
    """The fused path gives merge_tensor's numbers exactly. "bracket": the one-pass
    sampled top-k threshold over several pieces (made small here), "exact": whole tensor."""
    if path.startswith("bracket"):
        monkeypatch.setattr(fused_mod, "EXACT_MAX", 1000)
        monkeypatch.setattr(fused_mod, "_SAMPLE", 512)
    if path == "bracket-overflow":  # the kernel scan's first candidate buffer is too small: it scans again
        monkeypatch.setattr(fused_mod, "_SCAN_SLACK", -10**9)
    base, experts = heavy_tailed(shape, dtype, seed=sum(shape))
    for method, kw in FUSED_CASES:
        ref = merge_tensor(NAME, base, experts, method, **kw)
        piece = 1536 if path.startswith("bracket") and not method.startswith("dare") else None
        out = _fused_merge(method, kw, base, experts, piece)
        assert torch.equal(out, ref), (method, kw, int((out != ref).sum()))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [4099, 512, 7])  # a tile tail of 3 entries; one whole tile; shorter than 8
def test_bracket_scan_counts_and_copies_like_numpy(dtype, n):
    """bracket_scan, checked directly: per expert, how many |Δ| > hi, and the |Δ| in
    [lo, hi] in flat order; -1 where a tile might not fit the buffer."""
    import ctypes

    import numpy as np

    base, experts = heavy_tailed((n,), dtype, seed=n)
    absd = [(e.float() - base.float()).abs().numpy() for e in experts]
    mid = float(absd[1][n // 2])  # expert 1: a bracket of one value (with its ties)
    lo = [float(np.quantile(absd[0], 0.4)), mid, 0.0]  # expert 2: everything
    hi = [float(np.quantile(absd[0], 0.6)), mid, float("inf")]
    config = MergeConfig.build("ties", 3, density=0.3)
    fused = FusedMerge(config, compiled.load())
    args = fused._piece_args(fused._kernel_args(base, [0.0] * 3, [1.0] * 3), base, experts, None, 0, n)
    T = ctypes.c_float * 3
    cands = [np.full(n + compiled.SCAN_PAST, np.nan, dtype=np.float32) for _ in range(3)]
    ptrs = (ctypes.c_void_p * 3)(*[c.ctypes.data for c in cands])
    above, count = (ctypes.c_int64 * 3)(), (ctypes.c_int64 * 3)()
    rc = fused.lib.bracket_scan(ctypes.byref(args), T(*lo), T(*hi), above, ptrs, count, n + compiled.SCAN_PAST)
    assert rc == 0
    for t, a in enumerate(absd):
        assert above[t] == int((a > hi[t]).sum())
        want = a[(a >= lo[t]) & (a <= hi[t])]
        assert count[t] == want.size and np.array_equal(cands[t][:count[t]], want)
    assert count[2] == n  # the whole tensor
    # a buffer one entry short of a whole tile's room is refused before anything is written
    assert fused.lib.bracket_scan(ctypes.byref(args), T(*lo), T(*hi), above, ptrs, count,
                                  min(n, 512) + compiled.SCAN_PAST - 1) == -1


@needs_kernel
def test_fused_dare_over_several_random_blocks():
    from merging_helpers.rng import BLOCK

    base, experts = heavy_tailed((BLOCK // 1000 + 30, 1000), torch.bfloat16, seed=1)  # > 1 block
    for method, kw in [("dare_ties", dict(drop_rate=0.9, seed=3)), ("dare_linear", dict(density=[0.5, 0.3, 0.2]))]:
        ref = merge_tensor(NAME, base, experts, method, **kw)
        assert torch.equal(_fused_merge(method, kw, base, experts), ref), method


@needs_kernel
def test_fused_bracket_miss_falls_back_to_exact(monkeypatch):
    base, experts = heavy_tailed((300, 70), torch.bfloat16, seed=5)
    monkeypatch.setattr(fused_mod, "EXACT_MAX", 1000)
    monkeypatch.setattr(fused_mod, "_SAMPLE", 512)
    monkeypatch.setattr(fused_mod, "_BRACKET_SIGMAS", -1000.0)  # an empty bracket: always misses
    kw = dict(density=0.3)
    ref = merge_tensor(NAME, base, experts, "ties", **kw)
    assert torch.equal(_fused_merge("ties", kw, base, experts, piece=4000), ref)


@needs_kernel
def test_fused_dare_does_not_depend_on_worker_count():
    from merging_helpers.rng import BLOCK

    base, experts = heavy_tailed((2 * BLOCK // 1000 + 7, 1000), torch.bfloat16, seed=2)  # 3 random blocks
    kw = dict(drop_rate=0.7, seed=5)
    outs = [_fused_merge("dare_ties", kw, base, experts, workers=w) for w in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_kernel
def test_fused_signed_zeros_and_zero_deltas():
    """Where every delta is zero, and where the base holds -0.0, the result's sign of zero
    follows merge_tensor (a -0 base plus a +0 merged delta is +0, plus -0 stays -0)."""
    base, experts = heavy_tailed((40, 50), torch.bfloat16, seed=9)
    base[::3] = -0.0
    for e in experts:
        e[::2] = base[::2]  # rows with no change at all, some on a -0 base
    experts[1][1::6] = -0.0
    for method, kw in FUSED_CASES:
        ref = merge_tensor(NAME, base, experts, method, **kw)
        out = _fused_merge(method, kw, base, experts)
        same_bits = torch.equal(out.view(torch.int16), ref.view(torch.int16))
        assert same_bits, (method, kw, int((out.view(torch.int16) != ref.view(torch.int16)).sum()))


@needs_kernel
@pytest.mark.parametrize("where", ["base", "expert"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fused_refuses_nan_and_inf_like_the_reference(where, bad):
    base, experts = heavy_tailed((30, 20), torch.bfloat16, seed=4)
    (base if where == "base" else experts[2])[7, 3] = bad
    who = "base" if where == "base" else "expert 2"
    for method, kw in [("dare_ties", dict(drop_rate=0.9)), ("task_arithmetic", {})]:
        with pytest.raises(ValueError, match=f"{who}: tensor '{NAME}' has NaN or inf"):
            _fused_merge(method, kw, base, experts)
        with pytest.raises(ValueError, match="NaN or inf"):
            merge_tensor(NAME, base, experts, method, **kw)


@needs_kernel
def test_fused_refuses_unlike_tensors():
    base, experts = heavy_tailed((30, 20), torch.bfloat16, seed=4)
    fused = FusedMerge(MergeConfig.build("ties", 3, density=0.3), compiled.load())
    try:
        with pytest.raises(ValueError, match="expert 1 is torch.float32"):
            fused("w", base, [experts[0], experts[1].float(), experts[2]], torch.empty_like(base))
        with pytest.raises(ValueError, match="expert 2 is torch.bfloat16 with 580 entries"):
            fused("w", base, [experts[0], experts[1], experts[2][:29, :]], torch.empty_like(base))
        with pytest.raises(ValueError, match="contiguous"):
            fused("w", base, experts, torch.empty(20, 30, dtype=torch.bfloat16).t())
    finally:
        fused.close()


def test_fused_supported_reads_the_method_records():
    yes = [("ties", dict(density=0.3)), ("dare_linear", dict(drop_rate=0.5, rescale=None)), ("task_arithmetic", {})]
    no = [("della", dict(density=0.3)), ("dare_ties", dict(drop_rate=0.5, rescale="l1")),
          ("magnitude", dict(density=0.5, rescale="factor", rescale_factor=2.0))]
    for method, kw in yes:
        assert fused_supported(MergeConfig.build(method, 2, **kw), "cpu"), method
        assert not fused_supported(MergeConfig.build(method, 2, **kw), "cuda"), method
    for method, kw in no:
        assert not fused_supported(MergeConfig.build(method, 2, **kw), "cpu"), (method, kw)
    assert not fused_supported(MergeConfig.build("ties", compiled.MAXT + 1, density=0.3), "cpu")


def test_compiled_kernel_build_errors_and_fallback(families, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no C compiler found"):
        compiled.build(tmp_path / "k")
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    with pytest.raises(RuntimeError, match="compiling fused_merge.c failed"):
        compiled.build(tmp_path / "k")
    assert not list((tmp_path / "k").glob("*"))  # no half-written library left behind

    # without a kernel: "auto" falls back to the reference engine (same numbers), "c" refuses
    monkeypatch.setattr(compiled, "_LIB", None)
    monkeypatch.setattr(compiled, "_TRIED", True)
    monkeypatch.setattr(compiled, "ERROR", "no C compiler found")
    base_dir, expert_dirs = families["llama-bf16-sharded"]
    kw = dict(drop_rate=0.7, seed=1)
    auto = merge_folders(base_dir, expert_dirs, tmp_path / "auto", "dare_ties", progress=False, **kw)
    ref = merge_folders(base_dir, expert_dirs, tmp_path / "ref", "dare_ties", progress=False, kernel="reference", **kw)
    files = sorted(f.name for f in ref.iterdir())
    assert files == sorted(f.name for f in auto.iterdir()) and any(f.endswith(".safetensors") for f in files)
    for f in files:
        assert (auto / f).read_bytes() == (ref / f).read_bytes(), f
    with pytest.raises(RuntimeError, match=r"kernel='c'.*no C compiler found"):
        merge_folders(base_dir, expert_dirs, tmp_path / "c", "dare_ties", progress=False, kernel="c", **kw)
    with pytest.raises(ValueError, match="at most 16"):
        fused_mod.kernel_for("c", MergeConfig.build("ties", 17, density=0.3), torch.device("cpu"))
    with pytest.raises(ValueError, match="kernel must be"):
        merge_folders(base_dir, expert_dirs, tmp_path / "o", "ties", density=0.3, kernel="cuda")


@needs_kernel
def test_portable_kernel_build_gives_the_same_numbers(tmp_path, monkeypatch):
    """Without -mavx2 (as on ARM) the kernel takes its portable branches (8-byte tie
    search, branch-free candidate copy): still merge_tensor's numbers."""
    monkeypatch.setattr(compiled, "CFLAGS", [f for f in compiled.CFLAGS if f not in ("-mavx2", "-mf16c", "-mpopcnt")])
    monkeypatch.setattr(compiled, "_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(compiled, "_LIB", None)
    monkeypatch.setattr(compiled, "_TRIED", False)
    monkeypatch.setattr(fused_mod, "EXACT_MAX", 1000)
    monkeypatch.setattr(fused_mod, "_SAMPLE", 512)
    assert compiled.load() is not None and list(tmp_path.glob("*.so"))
    for dtype in (torch.bfloat16, torch.float16):
        base, experts = heavy_tailed((300, 70), dtype, seed=11)
        for method, kw in FUSED_CASES:
            ref = merge_tensor(NAME, base, experts, method, **kw)
            piece = None if method.startswith("dare") else 1536
            assert torch.equal(_fused_merge(method, kw, base, experts, piece), ref), (method, kw)


@needs_kernel
def test_compiled_kernel_is_cached(tmp_path):
    lib = compiled.build(tmp_path)
    stamp = lib.stat().st_mtime_ns
    assert compiled.build(tmp_path) == lib and lib.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]


@needs_kernel
@pytest.mark.parametrize("method, kw", [("ties", dict(density=0.4)), ("dare_ties", dict(drop_rate=0.6, seed=2)),
                                        ("task_arithmetic", dict(weights=[0.2] * 6))])
def test_fused_with_six_experts_equals_merge_tensor(method, kw):
    base, experts = heavy_tailed((50, 40), torch.bfloat16, seed=8, n_experts=6)
    assert torch.equal(_fused_merge(method, kw, base, experts), merge_tensor(NAME, base, experts, method, **kw))
