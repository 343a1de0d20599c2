"""Partitions of BERT/Llama names, chapter-1 statistics, and every bad input raising
(or warning) with a message that names the problem."""
import math

import pytest
import torch

from merging_helpers.deltas import (apply_delta, check_compatible, cosine_similarity_matrix, delta_quantiles,
                                    rms_by_partition, sign_disagreement, task_vector, task_vectors)
from merging_helpers.drop import magnitude_keep_mask, magprune_keep_prob, random_keep_mask, threshold_keep_mask
from merging_helpers.partitions import LEVELS, ParamInfo, describe, group_by, partition_key, rate_for, validate_rates
from merging_helpers.recipes import merge_state_dicts, merge_tensor
from merging_helpers.rng import EntryRandoms
from merging_helpers.selection import kth_largest_abs

BERT = {
    "bert.embeddings.word_embeddings.weight": ParamInfo(None, "embedding", None),
    "embeddings.position_embeddings.weight": ParamInfo(None, "embedding", None),
    "embeddings.LayerNorm.weight": ParamInfo(None, "norm", None),
    "bert.encoder.layer.3.attention.self.query.weight": ParamInfo(3, "attention", "q"),
    "encoder.layer.3.attention.self.key.bias": ParamInfo(3, "attention", "k"),
    "encoder.layer.11.attention.self.value.weight": ParamInfo(11, "attention", "v"),
    "encoder.layer.3.attention.output.dense.weight": ParamInfo(3, "attention", "o"),
    "encoder.layer.3.attention.output.LayerNorm.bias": ParamInfo(3, "norm", None),
    "encoder.layer.3.intermediate.dense.weight": ParamInfo(3, "ffn", "up"),
    "encoder.layer.3.output.dense.weight": ParamInfo(3, "ffn", "down"),
    "encoder.layer.3.output.LayerNorm.weight": ParamInfo(3, "norm", None),
    "bert.pooler.dense.weight": ParamInfo(None, "head", None),
    "classifier.weight": ParamInfo(None, "head", None),
}
LLAMA = {
    "model.embed_tokens.weight": ParamInfo(None, "embedding", None),
    "model.layers.3.self_attn.q_proj.weight": ParamInfo(3, "attention", "q"),
    "model.layers.3.self_attn.k_proj.weight": ParamInfo(3, "attention", "k"),
    "model.layers.3.self_attn.v_proj.weight": ParamInfo(3, "attention", "v"),
    "model.layers.3.self_attn.o_proj.weight": ParamInfo(3, "attention", "o"),
    "model.layers.30.mlp.gate_proj.weight": ParamInfo(30, "ffn", "gate"),
    "model.layers.3.mlp.up_proj.weight": ParamInfo(3, "ffn", "up"),
    "model.layers.3.mlp.down_proj.weight": ParamInfo(3, "ffn", "down"),
    "model.layers.3.input_layernorm.weight": ParamInfo(3, "norm", None),
    "model.layers.3.post_attention_layernorm.weight": ParamInfo(3, "norm", None),
    "model.norm.weight": ParamInfo(None, "norm", None),
    "lm_head.weight": ParamInfo(None, "head", None),
}


@pytest.mark.parametrize("name,info", list(BERT.items()) + list(LLAMA.items()))
def test_describe_bert_and_llama_names(name, info):
    assert describe(name) == info


def test_partition_keys_and_unknown_names():
    name = "model.layers.3.self_attn.q_proj.weight"
    assert [partition_key(name, level) for level in LEVELS] == [
        "model", "layer.3", "attention", "q", "layer.3.attention", "layer.3.q", name]
    assert partition_key("lm_head.weight", "layer_linear") == "head"
    assert describe("rotary.inv_freq") == ParamInfo(None, "other", None)
    with pytest.raises(ValueError, match="rotary.inv_freq"):
        describe("rotary.inv_freq", strict=True)
    with pytest.raises(ValueError, match="level"):
        partition_key(name, "block")


@pytest.mark.parametrize("level", LEVELS)
def test_group_by_partitions_names_exactly(level):
    names = list(BERT) + list(LLAMA) + ["something.else"]
    groups = group_by(names, level)
    flat = [n for members in groups.values() for n in members]
    assert sorted(flat) == sorted(names)  # every name exactly once
    assert all(partition_key(n, level) == key for key, members in groups.items() for n in members)


def test_rate_for_and_validation():
    rates = {"layer.3.attention": 0.9, "layer.3.ffn": 0.2}
    assert rate_for("encoder.layer.3.attention.self.query.weight", rates, "layer_role") == 0.9
    assert rate_for("encoder.layer.3.output.dense.weight", 0.5) == 0.5
    assert rate_for("embeddings.word_embeddings.weight", rates, "layer_role", default=0.1) == 0.1
    with pytest.raises(KeyError, match="embedding"):
        rate_for("embeddings.word_embeddings.weight", rates, "layer_role")
    with pytest.raises(ValueError, match=r"drop_rate\['layer.3.ffn'\] = 1.0 .*\[0, 1\)"):
        validate_rates({"layer.3.attention": 0.9, "layer.3.ffn": 1.0})
    with pytest.raises(ValueError, match=r"density = 0.0 .*\(0, 1\]"):
        validate_rates(0.0, "density")
    with pytest.raises(TypeError, match="float"):
        validate_rates({"q": "0.5"})


# ---- chapter-1 statistics ------------------------------------------------------------


def test_task_vector_apply_delta_round_trip():
    base = {"a": torch.randn(4, 3).to(torch.bfloat16), "ids": torch.arange(3)}
    expert = {"a": (base["a"].float() + 0.25).to(torch.bfloat16), "ids": torch.arange(3)}
    delta = task_vector(base, expert)
    assert set(delta) == {"a"} and delta["a"].dtype == torch.float32
    back = apply_delta(base, delta)
    assert torch.equal(back["a"], expert["a"]) and back["a"].dtype == torch.bfloat16
    assert back["ids"] is not base["ids"] and torch.equal(back["ids"], base["ids"])
    assert len(task_vectors(base, {"x": expert, "y": base})) == 2


def test_delta_statistics_by_hand():
    d1 = {"encoder.layer.0.attention.self.query.weight": torch.tensor([1.0, -2.0, 0.0, 3.0]),
          "encoder.layer.0.output.dense.weight": torch.tensor([4.0, 0.0])}
    d2 = {"encoder.layer.0.attention.self.query.weight": torch.tensor([1.0, 2.0, 5.0, -3.0]),
          "encoder.layer.0.output.dense.weight": torch.tensor([-4.0, 0.0])}
    torch.testing.assert_close(delta_quantiles(d1, [0.0, 0.5, 1.0]), torch.tensor([0.0, 1.5, 4.0]))
    # entries with ≥ 2 nonzero deltas: 1,2,4 of the first tensor and 1 of the second; 3 disagree
    assert sign_disagreement([d1, d2]) == pytest.approx(3 / 4)
    cos = cosine_similarity_matrix([d1, d2])
    assert cos[0, 1].item() == pytest.approx((1 - 4 - 9 - 16) / (math.sqrt(30) * math.sqrt(55)), rel=1e-6)
    rms = rms_by_partition(d1, ("layer", "role"))
    assert rms == pytest.approx({"layer.0.attention": math.sqrt(14 / 4), "layer.0.ffn": math.sqrt(16 / 2)})


def test_delta_quantiles_sampled_for_big_models():
    g = torch.Generator().manual_seed(0)
    delta = {"a": torch.randn(300_000, generator=g), "b": torch.randn(100_000, generator=g)}
    exact = delta_quantiles(delta, [0.5, 0.9])
    sampled = delta_quantiles(delta, [0.5, 0.9], max_exact=1000, sample_size=50_000)
    torch.testing.assert_close(sampled, exact, atol=0.02, rtol=0)
    torch.testing.assert_close(exact, torch.tensor([0.6745, 1.6449]), atol=0.01, rtol=0)  # half-normal quantiles


# ---- bad inputs ----------------------------------------------------------------------


def _pair():
    base = {"encoder.layer.0.output.dense.weight": torch.randn(8, 4), "embeddings.LayerNorm.weight": torch.ones(4)}
    expert = {k: v + 0.01 for k, v in base.items()}
    return base, expert


def test_check_compatible_errors_name_the_problem():
    base, expert = _pair()
    with pytest.raises(ValueError, match="empty"):
        check_compatible(base, [])
    with pytest.raises(ValueError, match="math.*missing.*embeddings.LayerNorm.weight"):
        check_compatible(base, {"math": {"encoder.layer.0.output.dense.weight": expert["encoder.layer.0.output.dense.weight"]}})
    with pytest.raises(ValueError, match=r"expert 1: tensor 'embeddings.LayerNorm.weight' has shape \(5,\)"):
        check_compatible(base, [expert, expert | {"embeddings.LayerNorm.weight": torch.ones(5)}])
    with pytest.raises(TypeError, match="float16"):
        check_compatible(base, [expert | {"embeddings.LayerNorm.weight": torch.ones(4, dtype=torch.float16)}])
    bad = expert | {"encoder.layer.0.output.dense.weight": expert["encoder.layer.0.output.dense.weight"].clone()}
    bad["encoder.layer.0.output.dense.weight"][2, 1] = float("nan")
    with pytest.raises(ValueError, match="encoder.layer.0.output.dense.weight.*NaN"):
        check_compatible(base, [bad], ["code"])
    with pytest.warns(UserWarning, match="really this expert's base"):
        check_compatible(base, {"unrelated": {k: torch.randn_like(v) * 3 for k, v in base.items()}})


def test_drop_rules_reject_bad_rates():
    x = torch.randn(10)
    with pytest.raises(ValueError, match=r"drop_rate = 1.0 .*\[0, 1\)"):
        random_keep_mask(x, 1.0, EntryRandoms(0, "x", 0))
    with pytest.raises(ValueError, match=r"density = 0 .*\(0, 1\]"):
        magnitude_keep_mask(x, 0)
    with pytest.raises(ValueError, match="epsilon = 0.3"):
        magprune_keep_prob(x, 0.8, 0.3)
    with pytest.raises(ValueError, match="threshold"):
        threshold_keep_mask(x, -1.0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        kth_largest_abs(x, 11)
    with pytest.raises(TypeError, match="torch.Tensor"):
        magnitude_keep_mask([1.0, 2.0], 0.5)


def test_merge_entry_points_reject_bad_options_before_work():
    base, expert = _pair()
    name, b = "encoder.layer.0.output.dense.weight", base["encoder.layer.0.output.dense.weight"]
    cases = [
        (dict(method="tiess", density=0.5), ValueError, "method must be one of"),
        (dict(method="ties"), ValueError, "needs density or drop_rate"),
        (dict(method="ties", density=0.5, drop_rate=0.5), ValueError, "not both"),
        (dict(method="dare_linear", drop_rate=1.0), ValueError, r"drop_rate = 1.0 .*\[0, 1\)"),
        (dict(method="dare_linear", drop_rate={"layer.0.ffn": 1.5}), ValueError, r"drop_rate\['layer.0.ffn'\]"),
        (dict(method="ties", density=0.5, weights=[1.0, 2.0]), ValueError, "one weight per expert"),
        (dict(method="ties", density=0.5, election="majority"), ValueError, "election must be one of"),
        (dict(method="ties", density=0.5, election_weights="torch"), ValueError, "election_weights"),
        (dict(method="dare_linear", drop_rate=0.5, rescale="l2"), ValueError, "rescale must be one of"),
        (dict(method="dare_linear", drop_rate=0.5, rescale="factor"), ValueError, "rescale_factor"),
        (dict(method="ties", density=0.5, lam=float("nan")), ValueError, "lam"),
        (dict(method="ties", density=[0.5, 0.5]), ValueError, "2 rates for 1 experts"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            merge_tensor(name, b, [expert[name]], **kwargs)
    with pytest.raises(ValueError, match=r"expert 0: tensor '.*' has shape \(4, 8\)"):
        merge_tensor(name, b, [b.T.contiguous()], "ties", density=0.5)
    with pytest.raises(ValueError, match=r"keys \['layer.9.ffn'\] match no tensor"):
        merge_state_dicts(base, [expert], "dare_linear", drop_rate={"layer.0.ffn": 0.5, "layer.9.ffn": 0.5, "norm": 0.1},
                          progress=False)
    with pytest.raises(KeyError, match="no rate for partition 'norm'"):
        merge_state_dicts(base, [expert], "dare_linear", drop_rate={"layer.0.ffn": 0.5}, progress=False)
    with pytest.raises(ValueError, match="magnitude_scope"):
        merge_state_dicts(base, [expert], "dare_ties", drop_rate=0.5, magnitude_scope="model", progress=False)
    with pytest.raises(ValueError, match="empty"):
        merge_state_dicts(base, [], "ties", density=0.5, progress=False)
