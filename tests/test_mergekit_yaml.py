"""mergekit YAML ↔ MergeConfig: hand-worked translations, refusals, and (with mergekit installed)
our merge of an imported config against mergekit's own output on a tiny Llama family."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_family

from merging_helpers.config import MergeConfig
from merging_helpers.mergekit_yaml import NotRepresentable, from_mergekit, to_mergekit

MODELS = ["org/a", "org/b"]


def test_a_mergekit_ties_config_reads_as_ours():
    text = """
merge_method: ties
base_model: org/base
models:
  - model: org/base
  - model: org/a
    parameters: {weight: 1.0, density: 0.5}
  - model: org/b
    parameters: {weight: 0.5, density: 0.3}
parameters: {lambda: 0.8}
dtype: bfloat16
"""
    config, base, models, dtype = from_mergekit(text)
    assert (base, models, dtype) == ("org/base", MODELS, "bfloat16")
    assert config.method.name == "ties" and config.weights == (1.0, 0.5) and config.lam == 0.8
    assert list(config.density) == [0.5, 0.3] and config.weighted_election
    assert config.divisor == "weight_sum" and config.rescale == "auto"  # ties: normalize on, no rescale


@pytest.mark.parametrize("method, divisor, rescale", [("dare_ties", "nothing", "l1"), ("della", "weight_sum", "l1")])
def test_mergekit_defaults_per_method(method, divisor, rescale):
    text = yaml.safe_dump({"merge_method": method, "base_model": "b",
                           "models": [{"model": m, "parameters": {"weight": 1, "density": 0.4}} for m in MODELS]})
    config = from_mergekit(text)[0]
    assert config.divisor == divisor and config.rescale == rescale
    if method == "della":
        assert config.epsilon == 0.15  # mergekit's default


def test_normalize_on_a_sum_method_divides_the_weights():
    text = yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "b", "parameters": {"normalize": True},
                           "models": [{"model": "x", "parameters": {"weight": 3}}, {"model": "y", "parameters": {"weight": 1}}]})
    assert from_mergekit(text)[0].weights == (0.75, 0.25)


@pytest.mark.parametrize("options", [
    dict(method="ties", density=0.3, weights=[1.0, 0.5], weighted_election=True, divide_by="weight_sum", lam=0.7),
    dict(method="dare_ties", density=[0.4, 0.6], rescale="l1", weighted_election=True, seed=3),
    dict(method="dare_linear", drop_rate=0.9, rescale="l1", weights=[0.5, 0.5]),
    dict(method="task_arithmetic", weights=[1.0, 2.0], lam=0.4),
    dict(method="della", density=0.5, epsilon=0.1, rescale="l1", weighted_election=True),
])
def test_export_then_import_gives_the_same_merge(options):
    method = options.pop("method")
    config = MergeConfig.build(method, 2, **options)
    back, base, models, dtype = from_mergekit(to_mergekit(config, "org/base", MODELS, "float32"))
    assert (base, models, dtype) == ("org/base", MODELS, "float32")
    if config.weights is not None and config.seed == 0 and config.drop_rate is None:
        assert back == config  # the very same config, field by field
    assert back.method == config.method and back.lam == config.lam
    assert list(back.weights) == list(config.weights or [1.0, 1.0])
    if config.method.needs_rate:
        name = "model.layers.0.mlp.up_proj.weight"
        assert back.densities(name) == pytest.approx(config.densities(name))
    if config.method.elects:
        assert back.divisor == config.divisor


@pytest.mark.parametrize("options, match", [
    (dict(method="magnitude", density=0.2), "no mergekit counterpart"),
    (dict(method="dare_linear", drop_rate=0.9), r"rescale='auto'.*L1 norm"),
    (dict(method="ties", density=0.2, election="frequency"), "elects by the total"),
    (dict(method="ties", density=0.2, weights=[1.0, 0.5]), "weighted_election=False"),
    (dict(method="ties", density={"layer.0": 0.2}, rate_default=0.5, rate_level="layer"), "per-partition"),
])
def test_what_mergekit_cannot_say_is_refused_by_name(options, match):
    method = options.pop("method")
    config = MergeConfig.build(method, 2, **options)
    with pytest.raises(NotRepresentable, match=match):
        to_mergekit(config, "b", MODELS)


@pytest.mark.parametrize("text, match", [
    ("merge_method: slerp\nbase_model: b\nmodels: [{model: a}]", "no counterpart"),
    ("slices: []\nmerge_method: ties", "slices"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]", "need a base_model"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, gamma: 0.1}}]", r"\['gamma'\]"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: [0, 1]}}]", "gradient"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: 0.5}}]", "needs a weight"),
    ("- just a list", "YAML mapping"),
])
def test_what_we_cannot_run_is_refused_by_name(text, match):
    with pytest.raises(ValueError, match=match):
        from_mergekit(text)


HEAD = "merge_method: ties\nbase_model: b\n"


@pytest.mark.parametrize("text, match", [
    (HEAD + "models: [a, c]", r"models\[0\]: expected a mapping with a 'model' key .* got 'a'"),
    (HEAD + "models: [{parameters: {weight: 1}}]", r"models\[0\]: expected a mapping with a 'model' key"),
    (HEAD + "models: [{model: a, parameters: [1]}]", r"models\[0\] \('a'\): parameters must be a mapping"),
    (HEAD + "models: [{model: a, parameters: {weight: abc}}]", r"model 'a': weight: expected a finite number, got 'abc'"),
    (HEAD + "models: [{model: a, parameters: {weight: null}}]", r"model 'a': weight: expected a finite number, got None"),
    (HEAD + "models: [{model: a, parameters: {weight: 1, density: half}}]", r"density: expected a finite number, got 'half'"),
    (HEAD + "parameters: {lambda: x}\nmodels: [{model: a, parameters: {weight: 1}}]", r"parameters.lambda: .* got 'x'"),
    (HEAD + "parameters: {normalize: 'false'}\nmodels: [{model: a, parameters: {weight: 1}}]",
     r"parameters.normalize: expected true or false \(an unquoted YAML boolean\), got 'false'"),
    (HEAD + "parameters: {rescale: 'false'}\nmodels: [{model: a, parameters: {weight: 1}}]", r"parameters.rescale"),
    (HEAD + "parameters: [1]\nmodels: [{model: a, parameters: {weight: 1}}]", r"parameters must be a mapping"),
])
def test_badly_typed_yaml_values_are_refused_by_name(text, match):
    with pytest.raises(ValueError, match=match):
        from_mergekit(text)


def test_a_document_that_is_not_text_and_keys_that_are_not_applied():
    with pytest.raises(TypeError, match="takes the YAML text .* got a dict"):
        from_mergekit({"merge_method": "ties"})
    text = HEAD + "tokenizer_source: base\nchat_template: chatml\nmodels: [{model: a, parameters: {weight: 1}}]"
    with pytest.warns(UserWarning, match=r"\['chat_template', 'tokenizer_source'\] are not applied"):
        config, base, models, _ = from_mergekit(text)
    assert base == "b" and models == ["a"]
    config, _, _, _ = from_mergekit(HEAD + "parameters: {normalize: false}\nmodels: [{model: a, parameters: {weight: 1}}]")
    assert config.divide_by == "nothing"  # a real YAML false is still read as false


def test_yaml_is_read_safely():
    with pytest.raises(yaml.YAMLError):
        from_mergekit("merge_method: !!python/object/apply:os.system ['echo pwned']")


# ---- against mergekit itself ------------------------------------------------------------------

def _mergekit(config_path, out):
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    run = subprocess.run([exe, str(config_path), str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("yaml_params", [
    {"merge_method": "ties", "density": [0.5, 0.25], "weight": [1.0, 0.5], "lambda": 0.8},  # density·n whole: see below
    {"merge_method": "task_arithmetic", "weight": [0.7, 0.4], "lambda": 1.0},
    {"merge_method": "dare_ties", "density": [1.0, 1.0], "weight": [1.0, 1.0], "lambda": 0.9},  # no entry dropped
])
def test_our_merge_of_an_imported_config_equals_mergekits(tmp_path, yaml_params):
    # TIES keeps round(density·n) entries per tensor, mergekit int(density·n): with densities 0.5 and
    # 0.25 every tensor of this family has a whole density·n, so both keep the same entries; DARE-TIES
    # at density 1 drops nothing (the masks' generators differ), which checks weights, λ and the election.
    pytest.importorskip("mergekit", reason="mergekit is only in the benchmark environment (requirements-bench.txt)")
    from merging_helpers.fast.checkpoints import CheckpointFolder
    from merging_helpers.fast.streaming import merge_folders
    base, experts = make_family(tmp_path / "family", "llama", torch.float32, n_experts=2)
    for folder in (base, *experts):  # mergekit reads the architecture from config.json
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    models = []
    for t, e in enumerate(experts):
        params = {"weight": yaml_params["weight"][t]}
        if "density" in yaml_params:
            params["density"] = yaml_params["density"][t]
        models.append({"model": str(e), "parameters": params})
    text = yaml.safe_dump({"merge_method": yaml_params["merge_method"], "base_model": str(base), "models": models,
                           "parameters": {"lambda": yaml_params["lambda"]}, "dtype": "float32"})
    (tmp_path / "mk.yml").write_text(text)
    _mergekit(tmp_path / "mk.yml", tmp_path / "theirs")
    config, base_path, model_paths, _ = from_mergekit(text)
    merge_folders(base_path, model_paths, tmp_path / "ours", config=config, progress=False)
    with CheckpointFolder(tmp_path / "ours") as a, CheckpointFolder(tmp_path / "theirs") as b:
        names = a.names()
        assert set(names) == set(b.names())
        for name in names:
            torch.testing.assert_close(a.read(name), b.read(name), rtol=1e-5, atol=1e-6, msg=name)


def test_a_della_config_whose_band_leaves_0_1_is_refused_on_import_not_midway():
    text = "merge_method: della\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 1.0, epsilon: 0.15}}]"
    with pytest.raises(ValueError, match=r"della: epsilon = 0.15 does not fit density 1: .* epsilon must be < 1 and <= 0"):
        from_mergekit(text)
    config, _, _, _ = from_mergekit(text.replace("density: 1.0", "density: 0.5"))
    assert config.epsilon == 0.15


def _linear_yaml(entries: str, parameters: str = "", base: str = "base_model: org/base\n") -> str:
    return f"merge_method: linear\n{base}models:\n{entries}{parameters}"


def test_a_mergekit_linear_config_is_task_arithmetic_with_normalised_weights():
    """mergekit's linear, Σ w θ / Σ w over the listed models (the base's weight too), against that
    formula computed here on state dicts."""
    from conftest import bert_like, expert_of

    from merging_helpers.recipes import merge_state_dicts
    base = bert_like()
    a, b = expert_of(base, 1), expert_of(base, 2)
    text = _linear_yaml("  - model: org/base\n    parameters: {weight: 1.0}\n"
                        "  - model: org/a\n    parameters: {weight: 2.0}\n"
                        "  - model: org/b\n    parameters: {weight: 1.0}\n")
    config, base_name, models, _ = from_mergekit(text)
    assert (base_name, models, config.method.name, config.weights) == ("org/base", MODELS, "task_arithmetic", (0.5, 0.25))
    ours = merge_state_dicts(base, [a, b], config=config, progress=False)
    for name, t in base.items():
        want = (1.0 * t.double() + 2.0 * a[name].double() + 1.0 * b[name].double()) / 4.0
        assert torch.allclose(ours[name].double(), want.to(t.dtype).double(), atol=1e-6), name


def test_an_unnormalised_linear_is_read_only_when_it_does_not_scale_the_base():
    entries = "  - model: org/a\n    parameters: {weight: 0.7}\n  - model: org/b\n    parameters: {weight: 0.3}\n"
    config, *_ = from_mergekit(_linear_yaml(entries, "parameters: {normalize: false}\n"))
    assert config.weights == (0.7, 0.3)
    heavy = entries.replace("0.3}", "0.9}")
    with pytest.raises(NotRepresentable, match="summing to 1.6 scales the base model"):
        from_mergekit(_linear_yaml(heavy, "parameters: {normalize: false}\n"))
    with pytest.raises(ValueError, match="need a base_model .*common base"):
        from_mergekit(_linear_yaml(entries, base=""))
    with pytest.raises(ValueError, match="sum to 0, so normalize divides by 0"):
        from_mergekit(_linear_yaml(entries.replace("0.3}", "-0.7}")))
    with pytest.raises(NotRepresentable, match="linear takes only a weight"):
        from_mergekit(_linear_yaml(entries.replace("{weight: 0.7}", "{weight: 0.7, density: 0.5}")))


def test_breadcrumbs_without_outliers_is_magnitude_pruning_and_outliers_are_refused():
    """breadcrumbs at γ = 0 against mergekit's rule computed here: keep the int(d·n) largest |Δ| of
    each tensor (d·n whole here), sum the weighted deltas, no normalising, no rescale."""
    from conftest import bert_like, expert_of

    from merging_helpers.recipes import merge_state_dicts
    text = """
merge_method: breadcrumbs
base_model: org/base
models:
  - model: org/a
    parameters: {weight: 1.0, density: 0.5}
  - model: org/b
    parameters: {weight: 0.5, density: 0.5}
parameters: {gamma: 0}
"""
    config, _, models, _ = from_mergekit(text)
    assert (config.method.name, models, config.weights, config.rescale) == ("magnitude", MODELS, (1.0, 0.5), "auto")
    base = bert_like()
    experts = [expert_of(base, 1), expert_of(base, 2)]
    ours = merge_state_dicts(base, experts, config=config, progress=False)
    for name, t in base.items():
        if not t.is_floating_point():
            continue
        total = torch.zeros_like(t, dtype=torch.float64)
        for w, e in zip((1.0, 0.5), experts):
            d = (e[name] - t).double().reshape(-1)
            keep = torch.zeros_like(d)
            keep[d.abs().argsort(descending=True)[: int(0.5 * d.numel())]] = 1
            total += w * (d * keep).reshape(t.shape)
        assert torch.allclose(ours[name].double(), t.double() + total, atol=1e-6), name
    with pytest.raises(NotRepresentable, match=r"mergekit's default γ = 0.01.*got no gamma"):
        from_mergekit(text.replace("parameters: {gamma: 0}\n", ""))
    with pytest.raises(NotRepresentable, match=r"got \[0.05\]"):
        from_mergekit(text.replace("{gamma: 0}", "{gamma: 0.05}"))
    with pytest.raises(NotRepresentable, match="merge_method 'magnitude' has no counterpart"):
        from_mergekit(text.replace("breadcrumbs", "magnitude"))
