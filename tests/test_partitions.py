"""Parameter names → partitions, and per-partition rates (merging_helpers.partitions, chapter 1)."""
import pytest

from merging_helpers.partitions import LEVELS, ParamInfo, describe, group_by, partition_key, rate_for, validate_rates

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
