"""One merge configuration, validated once (merging_helpers.config): every bad option
fails before any work with a message that names it, in memory and in the streaming
merge alike; renamed options still work; rates at any granularity."""
import warnings

import pytest
import torch
from conftest import bert_like, expert_of

from merging_helpers.config import MergeConfig
from merging_helpers.fast.streaming import merge_folders
from merging_helpers.partitions import PerColumn, PerRow
from merging_helpers.recipes import merge_state_dicts, merge_tensor

BAD = [
    (dict(method="ties", density=0.5, weights=[1.0, float("nan")]), ValueError, r"weights\[1\] must be finite"),
    (dict(method="ties", density=0.5, weights=[1.0, float("inf")]), ValueError, r"weights\[1\] must be finite"),
    (dict(method="ties", density=0.5, weights=0.5), TypeError, "weights must be a list of 2 numbers"),
    (dict(method="ties", density=0.5, weights="11"), TypeError, "weights must be a list of 2 numbers"),
    (dict(method="ties", density=0.5, weights=[1.0, "2"]), TypeError, r"weights\[1\] must be a number"),
    (dict(method="ties", density=0.5, seed=1.5), TypeError, "seed must be an int"),
    (dict(method="ties", density=0.5, seed=True), TypeError, "seed must be an int"),
    (dict(method="task_arithmetic", density=0.5), ValueError, "drops nothing"),
    (dict(method="magnitude", density=0.5, rescale="factor", rescale_factor=float("nan")), ValueError,
     r"factor = nan is outside"),
    (dict(method="magnitude", density=0.5, rescale="factor", rescale_factor={"ffn": float("inf")}), ValueError,
     r"factor\['ffn'\]"),
    (dict(method="magnitude", density=0.5, rescale_factor=2.0), ValueError, "go together"),
    (dict(method="ties", density=0.5, epsilon=0.1), ValueError, "epsilon is della's"),
    (dict(method="ties", density=0.5, election_weigths=True), TypeError, "unknown merge option"),
    (dict(method="ties", density=float("nan")), ValueError, "density = nan"),
    (dict(method="ties", density=0.5, divide_by="mean"), ValueError, "divide_by must be one of"),
    (dict(method="ties", density=0.5, weighted_election="yes"), TypeError, "weighted_election"),
]


@pytest.mark.parametrize("options, error, match", BAD, ids=[m for _, _, m in BAD])
def test_bad_options_are_refused_in_memory_and_streaming(options, error, match, families, tmp_path):
    base = bert_like()
    experts = [expert_of(base, 1), expert_of(base, 2)]
    with pytest.raises(error, match=match):
        merge_state_dicts(base, experts, progress=False, **options)
    base_dir, expert_dirs = families["llama-fp32-single"]
    with pytest.raises(error, match=match):
        merge_folders(base_dir, expert_dirs, tmp_path / "o", progress=False, **options)
    assert not (tmp_path / "o").exists()


def test_nan_inside_an_expert_is_refused_everywhere(tmp_path):
    from merging_helpers.fast.checkpoints import save_state_dict

    base = bert_like(dtype=torch.bfloat16)
    bad = expert_of(base, 1)
    bad["encoder.layer.1.output.dense.weight"][3, 5] = float("nan")
    name = "encoder.layer.1.output.dense.weight"
    with pytest.raises(ValueError, match="NaN or inf"):
        merge_state_dicts(base, [expert_of(base, 2), bad], "ties", density=0.5, progress=False)
    with pytest.raises(ValueError, match=rf"expert 1: tensor '{name}' has NaN or inf"):
        merge_tensor(name, base[name], [expert_of(base, 2)[name], bad[name]], "dare_ties", drop_rate=0.9)
    dirs = [save_state_dict(sd, tmp_path / n) for n, sd in [("b", base), ("e0", expert_of(base, 2)), ("e1", bad)]]
    for kernel in ("auto", "reference"):
        for method, kw in [("dare_ties", dict(drop_rate=0.9)), ("task_arithmetic", {}), ("della", dict(density=0.5))]:
            with pytest.raises(ValueError, match=rf"expert 1.*{name}.*NaN or inf"):
                merge_folders(dirs[0], dirs[1:], tmp_path / "o", method, kernel=kernel, progress=False, **kw)
            assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


@pytest.mark.parametrize("dtype, big", [(torch.float16, 60000.0), (torch.float32, 3e38)])
def test_an_overflowing_merge_is_refused_naming_the_tensor_in_memory_and_streaming(tmp_path, dtype, big):
    from merging_helpers.fast.checkpoints import save_state_dict

    base = {"w": torch.full((4, 4), big, dtype=dtype), "ok": torch.zeros(3, dtype=dtype)}
    expert = {"w": torch.full((4, 4), big * 1.08, dtype=dtype), "ok": torch.ones(3, dtype=dtype)}
    message = rf"tensor 'w': 16 merged entries overflow {dtype} \(finite inputs, an infinite result\)"
    with pytest.raises(OverflowError, match=message):
        merge_state_dicts(base, [expert, expert], "task_arithmetic", lam=20.0, progress=False)
    dirs = [save_state_dict(sd, tmp_path / n) for n, sd in [("b", base), ("e0", expert), ("e1", expert)]]
    for kernel in ("auto", "reference"):  # the fused path and the reference engine refuse it alike
        with pytest.raises(OverflowError, match=message):
            merge_folders(dirs[0], dirs[1:], tmp_path / "o", "task_arithmetic", lam=20.0, kernel=kernel, progress=False)
        assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))  # nothing written


def test_a_lambda_float32_cannot_hold_is_refused():
    base = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match=r"lam = 1e\+40 is beyond float32's range"):
        merge_state_dicts(base, [base], "task_arithmetic", lam=1e40, progress=False)


def test_streaming_warns_when_the_base_is_not_the_experts_base(tmp_path):
    from merging_helpers.fast.checkpoints import save_state_dict

    base = bert_like()
    stranger = bert_like(seed=7)  # an unrelated model used as the "base"
    dirs = [save_state_dict(sd, tmp_path / n) for n, sd in [("b", stranger), ("e0", expert_of(base, 1))]]
    with pytest.warns(UserWarning, match="is the base really this expert's base"):
        merge_folders(dirs[0], dirs[1:], tmp_path / "o", "task_arithmetic", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real base: no warning
        dirs2 = [save_state_dict(sd, tmp_path / n) for n, sd in [("b2", base), ("e2", expert_of(base, 1, 0.001))]]
        merge_folders(dirs2[0], dirs2[1:], tmp_path / "o2", "task_arithmetic", progress=False)


def test_della_on_an_empty_tensor():
    base = {"empty": torch.zeros(0, 4), "w": torch.randn(3, 4)}
    experts = [{k: v + 0.1 for k, v in base.items()} for _ in range(2)]
    out = merge_state_dicts(base, experts, "della", density=0.5, epsilon=0.2, progress=False)
    assert out["empty"].shape == (0, 4)


def test_the_names_retired_in_0_3_are_refused_with_the_options_listed():
    base = bert_like()
    experts = [expert_of(base, 1), expert_of(base, 2)]
    for old in (dict(election_weights="mergekit"), dict(merge_mode="sum")):
        with pytest.raises(TypeError, match=r"unknown merge option.*weighted_election"):
            merge_state_dicts(base, experts, "ties", density=0.4, progress=False, **old)


def test_config_is_reusable_and_checked_against_the_experts():
    base = bert_like()
    experts = [expert_of(base, 1), expert_of(base, 2)]
    config = MergeConfig.build("dare_ties", 2, drop_rate=0.7, seed=3)
    a = merge_state_dicts(base, experts, config=config, progress=False)
    b = merge_state_dicts(base, experts, "dare_ties", drop_rate=0.7, seed=3, progress=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="for 2 experts, got 3"):
        merge_state_dicts(base, experts + [expert_of(base, 3)], config=config, progress=False)
    with pytest.raises(ValueError, match="not both"):
        merge_state_dicts(base, experts, "dare_ties", config=config, seed=4, progress=False)


# ---- rates at any granularity ----------------------------------------------------------


NAME = "encoder.layer.0.intermediate.dense.weight"


@pytest.mark.parametrize("method, what", [("dare_linear", "drop_rate"), ("magnitude", "density"),
                                          ("ties", "density"), ("dare_ties", "drop_rate"), ("della", "density")])
def test_per_row_rates_reproduce_the_per_tensor_rate_row_by_row(method, what):
    """Row r merged with PerRow rates equals row r merged alone (as a 1-row tensor at the
    same flat position, so DARE draws the same words) at the float rate of that row."""
    base = bert_like()
    experts = [expert_of(base, 1), expert_of(base, 2)]
    b, es = base[NAME], [e[NAME] for e in experts]
    rows, cols = b.shape
    rates = torch.linspace(0.1, 0.9, rows, dtype=torch.float64)
    extra = dict(epsilon=0.05) if method == "della" else {}
    whole = merge_tensor(NAME, b, es, method, **{what: {NAME: PerRow(rates)}}, rate_level="tensor", seed=4, **extra)
    for r in range(rows):
        one = merge_tensor(NAME, b[r:r + 1], [e[r:r + 1] for e in es], method, **{what: float(rates[r])}, seed=4,
                           offset=r * cols, **extra)
        assert torch.equal(whole[r:r + 1], one), (method, r)


def test_per_column_rates_are_per_row_rates_of_the_transpose():
    base = bert_like()
    experts = [expert_of(base, 1), expert_of(base, 2)]
    b, es = base[NAME], [e[NAME] for e in experts]
    dens = torch.linspace(0.2, 0.8, b.shape[1], dtype=torch.float64)
    by_col = merge_tensor(NAME, b, es, "ties", density={NAME: PerColumn(dens)}, rate_level="tensor")
    for c in range(b.shape[1]):
        col = merge_tensor(NAME, b[:, c:c + 1].contiguous(), [e[:, c:c + 1].contiguous() for e in es], "ties",
                           density=float(dens[c]))
        assert torch.equal(by_col[:, c:c + 1], col), c
    # and the kept fraction of each column is its density
    kept = (merge_tensor(NAME, b, es[:1], "magnitude", density={NAME: PerColumn(dens)}, rate_level="tensor") != b)
    counts = kept.sum(0)
    assert torch.equal(counts, torch.round(dens * b.shape[0]).long())


def test_per_row_rates_bad_length_and_wrong_granularity_are_named(families, tmp_path):
    base = bert_like()
    experts = [expert_of(base, 1)]
    with pytest.raises(ValueError, match=rf"PerRow for '{NAME}' has 3 values, the tensor has 64 rows"):
        merge_state_dicts(base, experts, "dare_linear", drop_rate={NAME: PerRow(torch.full((3,), 0.5))},
                          rate_level="tensor", rate_default=0.1, progress=False)
    with pytest.raises(ValueError, match=r"entry 1 = 1.0 is outside the allowed range \[0, 1\)"):
        merge_state_dicts(base, experts, "dare_linear", drop_rate={NAME: PerRow(torch.tensor([0.5, 1.0]))},
                          rate_level="tensor", rate_default=0.1, progress=False)
    with pytest.raises(ValueError, match=r"match no tensor at rate_level 'role'; they are 'layer_role' keys"):
        merge_state_dicts(base, experts, "dare_linear", drop_rate={"layer.0.ffn": 0.5, "layer.1.ffn": 0.5},
                          rate_level="role", rate_default=0.1, progress=False)
    base_dir, expert_dirs = families["llama-fp32-single"]
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=rf"PerRow for '{name}' has 3 values, the tensor has 48 rows"):
        merge_folders(base_dir, expert_dirs, tmp_path / "o", "dare_ties", drop_rate={name: PerRow(torch.ones(3) / 2)},
                      rate_level="tensor", rate_default=0.1, progress=False)


def test_streaming_honours_per_row_rates(families, tmp_path):
    from merging_helpers.fast.checkpoints import load_state_dict

    base_dir, expert_dirs = families["llama-bf16-sharded"]
    name = "model.layers.1.mlp.down_proj.weight"
    rows = load_state_dict(base_dir)[name].shape[0]
    kw = dict(drop_rate={name: PerRow(torch.linspace(0.0, 0.95, rows, dtype=torch.float64))}, rate_level="tensor",
              rate_default=0.5, seed=1)
    out = merge_folders(base_dir, expert_dirs, tmp_path / "o", "dare_ties", progress=False, **kw)
    ref = merge_state_dicts(load_state_dict(base_dir), [load_state_dict(d) for d in expert_dirs], "dare_ties",
                            progress=False, **kw)
    got = load_state_dict(out)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_float8_result_beyond_its_range_is_refused_not_clamped():
    dtype = torch.float8_e4m3fn  # largest finite value 448: a plain cast of 512 gives 448
    base, expert = {"w": torch.zeros(2).to(dtype)}, {"w": torch.full((2,), 256.0).to(dtype)}
    with pytest.raises(OverflowError, match=r"tensor 'w': 2 merged entries overflow torch.float8_e4m3fn"):
        merge_state_dicts(base, [expert, expert], "task_arithmetic", progress=False)  # 0 + 256 + 256 = 512


def test_a_float64_model_merges_in_float64():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50, generator=g, dtype=torch.float64)}
    expert = {"w": base["w"] + 1e-3 * torch.randn(50, generator=g, dtype=torch.float64)}
    same = merge_state_dicts(base, [base], "task_arithmetic", progress=False)
    assert torch.equal(same["w"], base["w"])  # an expert equal to the base gives the base back, to the bit
    merged = merge_state_dicts(base, [expert], "task_arithmetic", lam=0.5, progress=False)
    assert merged["w"].dtype == torch.float64
    # float64 rounding, not float32's (whose error here would be ~1e-7)
    assert torch.allclose(merged["w"], base["w"] + 0.5 * (expert["w"] - base["w"]), rtol=0, atol=1e-14)


def test_a_finite_expert_whose_delta_overflows_is_named_as_such_in_both_paths(tmp_path):
    from merging_helpers.fast.checkpoints import save_state_dict

    base, expert = {"w": torch.tensor([-3e38, 1.0])}, {"w": torch.tensor([3e38, 1.0])}  # finite; Δ = 6e38: inf
    message = r"tensor 'w' is finite, but its delta \(expert − base\) overflows torch.float32"
    with pytest.raises(ValueError, match=message):
        merge_state_dicts(base, [expert], "task_arithmetic", progress=False)
    dirs = [save_state_dict(sd, tmp_path / n) for n, sd in [("b", base), ("e0", expert)]]
    for kernel in ("auto", "reference"):
        with pytest.raises(ValueError, match=message):
            merge_folders(dirs[0], dirs[1:], tmp_path / "o", "task_arithmetic", kernel=kernel, progress=False)
    with pytest.raises(ValueError, match=r"tensor 'w' has NaN or inf entries"):  # a real NaN is still called one
        merge_state_dicts(base, [{"w": torch.tensor([float("nan"), 1.0])}], "task_arithmetic", progress=False)
    big = {"w": torch.tensor([1e300, 1.0], dtype=torch.float64)}  # finite float64 merges in float64
    assert merge_state_dicts(big, [big], "task_arithmetic", progress=False)["w"][0] == 1e300
