"""mergekit YAML ↔ MergeConfig: hand-worked translations, refusals, and (with mergekit installed)
our merge of an imported config against mergekit's own output on a tiny Llama family."""
import dataclasses
import json
import os
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
    dict(method="breadcrumbs", density=0.3, gamma=0.05, weights=[1.0, 0.5]),
    dict(method="breadcrumbs_ties", density=0.3, gamma=0.02, weights=[1.0, 0.5], weighted_election=True,
         divide_by="nothing"),
])
def test_export_then_import_gives_the_same_merge(options):
    method = options.pop("method")
    config = MergeConfig.build(method, 2, **options)
    back, base, models, dtype = from_mergekit(to_mergekit(config, "org/base", MODELS, "float32"))
    assert (base, models, dtype) == ("org/base", MODELS, "float32")
    if config.weights is not None and config.seed == 0 and config.drop_rate is None:
        # the very same config, field by field, but for what the import takes from mergekit: the count a
        # magnitude trim keeps (int(d·n)) and the dtype the merge is written in (the YAML's)
        floor = {"count_rounding": "floor"} if config.method.drop in ("magnitude", "breadcrumbs") else {}
        assert back == dataclasses.replace(config, out_dtype="float32", **floor)
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

# mergekit 0.1.5 runs from a venv of its own (`make mergekit`: .venv-mergekit, torch held to our pin),
# named by $MERGING_BOOK_MERGEKIT (make test sets it); else a mergekit-yaml on the PATH, else skipped
MERGEKIT = os.environ.get("MERGING_BOOK_MERGEKIT") or shutil.which("mergekit-yaml")


def _mergekit(config_path, out):
    if not MERGEKIT:
        pytest.skip("mergekit-yaml not found: `make mergekit` makes its venv, and make test runs this")
    run = subprocess.run([MERGEKIT, str(config_path), str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


# One YAML per method the import reads, run by mergekit and by us on the same tiny Llama family:
# (merge_method, each expert's parameters, the shared parameters, how the two must agree).
# "exact": every tensor equal to float32 rounding. "random": the masks come from different generators
# (mergekit's global torch one, our counter-based words), so the changed fraction and the L1 size of
# the merged delta must agree in distribution. A magnitude trim keeps int(d·n) entries in mergekit,
# round(d·n) in our default: the import sets count_rounding="floor" (the "not whole" cases need it).
CROSS_CHECKS = {
    "task_arithmetic": ("task_arithmetic", [{"weight": 0.7}, {"weight": 0.4}], {"lambda": 1.0}, "exact"),
    "linear": ("linear", [{"weight": 0.6}, {"weight": 0.4}], {}, "exact"),
    "ties": ("ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.25}], {"lambda": 0.8}, "exact"),
    "ties, density·n not whole": ("ties", [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.7}],
                                  {"lambda": 0.8}, "exact"),
    "breadcrumbs, density·n not whole": ("breadcrumbs", [{"weight": 1.0, "density": 0.3},
                                                         {"weight": 0.5, "density": 0.3}], {"gamma": 0.0}, "exact"),
    "breadcrumbs, gamma 0": ("breadcrumbs", [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}],
                             {"gamma": 0.0}, "exact"),
    "breadcrumbs, gamma 0.05": ("breadcrumbs", [{"weight": 1.0, "density": 0.3, "gamma": 0.05},
                                                {"weight": 0.5, "density": 0.3, "gamma": 0.05}], {}, "exact"),
    "breadcrumbs_ties, gamma 0.1": ("breadcrumbs_ties", [{"weight": 1.0, "density": 0.4},
                                                         {"weight": 0.7, "density": 0.4}], {"gamma": 0.1}, "exact"),
    "dare_ties, density 1": ("dare_ties", [{"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}],
                             {"lambda": 0.9}, "exact"),
    "dare_ties, density 0.5": ("dare_ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.5}],
                               {}, "random"),
    "dare_linear, density 0.3": ("dare_linear", [{"weight": 0.6, "density": 0.3}, {"weight": 0.4, "density": 0.3}],
                                 {}, "random"),
    "della, density 0.5": ("della", [{"weight": 1.0, "density": 0.5, "epsilon": 0.1},
                                     {"weight": 1.0, "density": 0.5, "epsilon": 0.1}], {"lambda": 1.0}, "random"),
}


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    base, experts = make_family(tmp_path_factory.mktemp("family"), "llama", torch.float32, n_experts=2)
    for folder in (base, *experts):  # mergekit reads the architecture from config.json
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    return base, experts


def _both(text: str, tmp_path) -> tuple[dict, dict, dict]:
    """mergekit's merge of the YAML ``text`` and ours of its import: (theirs, ours, base) state dicts."""
    from merging_helpers.fast.checkpoints import CheckpointFolder
    from merging_helpers.fast.streaming import merge_folders
    (tmp_path / "mk.yml").write_text(text)
    _mergekit(tmp_path / "mk.yml", tmp_path / "theirs")
    config, base_path, model_paths, _ = from_mergekit(text)
    merge_folders(base_path, model_paths, tmp_path / "ours", config=config, progress=False)
    out = []
    for folder in (tmp_path / "theirs", tmp_path / "ours", Path(base_path)):
        with CheckpointFolder(folder) as f:
            out.append({n: f.read(n) for n in f.names()})
    return tuple(out)


def _agreement(theirs: dict, ours: dict, base: dict, kind: str) -> dict[str, float]:
    """How far the two merges are apart (printed for the record), checked against the kind's bounds."""
    assert set(theirs) == set(ours)
    floating = [n for n in ours if ours[n].is_floating_point()]
    worst = max(float((ours[n].double() - theirs[n].double()).abs().max()) for n in floating)
    if kind == "exact":
        for n in floating:
            torch.testing.assert_close(ours[n], theirs[n], rtol=1e-5, atol=1e-6, msg=n)
        return {"max |ours − mergekit|": worst}
    moved = {who: [sd[n].double() - base[n].double() for n in floating] for who, sd in (("ours", ours), ("theirs", theirs))}
    changed = {who: sum(int((d != 0).sum()) for d in ds) / sum(d.numel() for d in ds) for who, ds in moved.items()}
    size = {who: sum(float(d.abs().sum()) for d in ds) for who, ds in moved.items()}
    # ~21 k entries: the changed fraction's sd is < 0.004, the L1 size's (DARE's rescale noise) ~1 %
    assert abs(changed["ours"] - changed["theirs"]) < 0.02, changed
    assert abs(size["ours"] / size["theirs"] - 1) < 0.05, size
    return {"max |ours − mergekit|": worst, "changed, ours": changed["ours"], "changed, mergekit": changed["theirs"],
            "L1 ours / mergekit": size["ours"] / size["theirs"]}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CROSS_CHECKS))
def test_our_merge_of_an_imported_config_agrees_with_mergekits(case, llama_family, tmp_path):
    method, each, shared, kind = CROSS_CHECKS[case]
    base, experts = llama_family
    models = [{"model": str(e), "parameters": p} for e, p in zip(experts, each)]
    if method == "linear":  # mergekit's linear averages the listed models: the base is one of them
        models.insert(0, {"model": str(base), "parameters": {"weight": 0.2}})
    text = yaml.safe_dump({"merge_method": method, "base_model": str(base), "models": models,
                           **({"parameters": shared} if shared else {}), "dtype": "float32"})
    found = _agreement(*_both(text, tmp_path), kind)
    print(f"\n{case} ({kind}): " + ", ".join(f"{k} {v:.3g}" for k, v in found.items()))


@pytest.mark.slow
def test_a_bf16_yaml_is_written_in_bf16_like_mergekits(llama_family, tmp_path):
    """dtype: bfloat16 on float32 models: both tools write bf16; mergekit computes in bf16, we in float32
    with one rounding at the end, so they agree to a few bf16 steps (before the import honoured dtype,
    ours stayed float32, ~2e-2 apart)."""
    base, experts = llama_family
    models = [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, (0.7, 0.4))]
    text = yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base), "models": models,
                           "dtype": "bfloat16"})
    theirs, ours, _ = _both(text, tmp_path)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype == torch.bfloat16, name
        # mergekit rounds the inputs to bf16 before subtracting: errors of a step of the tensor's largest values
        step = torch.finfo(torch.bfloat16).eps * float(theirs[name].double().abs().max())
        worst = float((ours[name].double() - theirs[name].double()).abs().max()) / step
        assert worst <= 2, f"{name}: {worst:.1f} bf16 steps (of its largest entry) apart"
    print(f"\nbf16: max |ours − mergekit| {max(float((ours[n].double() - theirs[n].double()).abs().max()) for n in ours):.3g}")


@pytest.mark.parametrize("options", [dict(method="ties", density=0.5, lam=0.8),
                                     dict(method="task_arithmetic", weights=(0.7, 0.4)),
                                     dict(method="dare_ties", density=1.0, lam=0.9, rescale="l1")])
@pytest.mark.slow
def test_mergekit_runs_our_export_to_our_result(options, llama_family, tmp_path):
    base, experts = llama_family
    config = MergeConfig.build(options.pop("method"), 2, **options)
    text = to_mergekit(config, str(base), [str(e) for e in experts], dtype="float32")
    found = _agreement(*_both(text, tmp_path), "exact")
    print(f"\nexport {config.method.name}: max |ours − mergekit| {found['max |ours − mergekit|']:.3g}")


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


def test_breadcrumbs_reads_as_ours_and_gamma_0_is_magnitude_pruning():
    """breadcrumbs against mergekit's rule computed here: at γ = 0 keep the int(d·n) largest |Δ| of each
    tensor (d·n whole here), sum the weighted deltas, no normalising, no rescale; γ defaults to mergekit's 0.01."""
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
    assert (config.method.name, models, config.weights, config.gamma) == ("breadcrumbs", MODELS, (1.0, 0.5), 0)
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
    assert from_mergekit(text.replace("parameters: {gamma: 0}\n", ""))[0].gamma == 0.01
    with pytest.raises(NotRepresentable, match=r"one gamma for every model, got \[0.0, 0.05\]"):
        from_mergekit(text.replace("{weight: 0.5, density: 0.5}", "{weight: 0.5, density: 0.5, gamma: 0.05}"))
    with pytest.raises(NotRepresentable, match="merge_method 'magnitude' has no counterpart"):
        from_mergekit(text.replace("breadcrumbs", "magnitude"))


def test_the_yaml_dtype_is_the_merged_models_dtype(tmp_path):
    """mergekit writes its merge in out_dtype, else dtype: so does a merge of the imported config, in
    memory and streamed; a dtype the import cannot write is refused by name."""
    from merging_helpers.fast.checkpoints import CheckpointFolder
    from merging_helpers.fast.streaming import merge_folders
    from merging_helpers.recipes import merge_state_dicts
    base, experts = make_family(tmp_path / "family", "llama", torch.float32, n_experts=2)
    text = (f"merge_method: ties\nbase_model: {base}\ndtype: float32\nout_dtype: bfloat16\nmodels:\n"
            + "".join(f"  - model: {e}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for e in experts))
    config, base_path, paths, _ = from_mergekit(text)
    assert config.out_dtype == "bfloat16"
    merge_folders(base_path, paths, tmp_path / "ours", config=config, progress=False)
    states = []
    for folder in (base, *experts):
        with CheckpointFolder(folder) as f:
            states.append({n: f.read(n) for n in f.names()})
    in_memory = merge_state_dicts(states[0], states[1:], config=config, progress=False)
    wide = merge_state_dicts(states[0], states[1:], config=dataclasses.replace(config, out_dtype=None), progress=False)
    with CheckpointFolder(tmp_path / "ours") as out:
        for name in out.names():
            streamed = out.read(name)
            assert streamed.dtype == in_memory[name].dtype == torch.bfloat16, name
            assert torch.equal(streamed, in_memory[name]) and torch.equal(streamed, wide[name].to(torch.bfloat16)), name
    with pytest.raises(ValueError, match=r"out_dtype: 'int8' is not a dtype this import writes"):
        from_mergekit(text.replace("out_dtype: bfloat16", "out_dtype: int8"))

