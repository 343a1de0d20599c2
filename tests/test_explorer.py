"""Chapter 1's delta explorer: the right tensors are selected, bad names are refused
with the valid ones listed, and the histogram counts every selected entry."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from merging_helpers.explorer import (  # noqa: E402
    delta_histogram,
    explore,
    layer_choices,
    layer_role_frame,
    role_choices,
    select_delta,
)
from merging_helpers.partitions import group_by  # noqa: E402

NAMES = [
    "embeddings.word_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.attention.output.dense.bias",
    "encoder.layer.0.attention.output.LayerNorm.weight",
    "encoder.layer.0.intermediate.dense.weight",
    "encoder.layer.0.output.dense.weight",
    "encoder.layer.1.attention.self.key.weight",
    "encoder.layer.1.output.LayerNorm.bias",
    "encoder.layer.1.output.dense.weight",
    "pooler.dense.weight",
]


def _deltas():
    g = torch.Generator().manual_seed(0)
    one = {name: torch.randn(3, 2, generator=g) for name in NAMES}
    return {"news": one, "sign": {name: -t for name, t in one.items()}}


def test_choices():
    d = _deltas()["news"]
    assert layer_choices(d) == ["all", 0, 1, "outside"]
    assert role_choices(d) == ["all", "attention", "embedding", "ffn", "head", "norm"]


def test_select_exact_tensors_by_hand():
    deltas = _deltas()
    assert set(select_delta(deltas, "news", 0, "attention")) == {
        "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.output.dense.bias"}
    # the attention block's LayerNorm is a norm, not attention; output.dense is the FFN's down map
    assert set(select_delta(deltas, "news", 0, "norm")) == {"encoder.layer.0.attention.output.LayerNorm.weight"}
    assert set(select_delta(deltas, "news", "layer.1", "ffn")) == {"encoder.layer.1.output.dense.weight"}
    assert set(select_delta(deltas, "news", "outside", "all")) == {
        "embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight", "pooler.dense.weight"}
    assert set(select_delta(deltas, "news", "all", "norm")) == {
        "embeddings.LayerNorm.weight", "encoder.layer.0.attention.output.LayerNorm.weight",
        "encoder.layer.1.output.LayerNorm.bias"}
    assert set(select_delta(deltas, "news")) == set(NAMES)
    # the tensors are the expert's own (not copies, not another expert's)
    chosen = select_delta(deltas, "sign", 1, "attention")
    assert chosen["encoder.layer.1.attention.self.key.weight"] is deltas["sign"]["encoder.layer.1.attention.self.key.weight"]


def test_selection_agrees_with_partitions():
    deltas = _deltas()
    for key, names in group_by(NAMES, "layer_role").items():
        if key.startswith("layer."):
            _, layer, role = key.split(".")
            assert sorted(select_delta(deltas, "news", int(layer), role)) == sorted(names)
    # the (layer, role) cells partition the model: every tensor lands in exactly one
    seen = []
    for layer in layer_choices(deltas["news"])[1:]:
        for role in role_choices(deltas["news"])[1:]:
            try:
                seen += list(select_delta(deltas, "news", layer, role))
            except ValueError:
                pass
    assert sorted(seen) == sorted(NAMES)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"expert": "law"}, r"expert 'law' is not valid; choose one of \['news', 'sign'\]"),
    ({"layer": 7}, r"layer 7 is not valid; choose one of \['all', 0, 1, 'outside'\]"),
    ({"layer": "seven"}, r"layer 'seven' is not valid; choose one of"),
    ({"layer": True}, r"layer True is not valid"),
    ({"layer": 0.5}, r"layer 0.5 is not valid"),
    ({"role": "mlp"}, r"role 'mlp' is not valid; choose one of \['all', 'attention', 'embedding', 'ffn', 'head', 'norm'\]"),
    ({"layer": 1, "role": "embedding"}, r"no parameter .* layer 1 with role 'embedding'; the roles in layer 1 are \['attention', 'ffn', 'norm'\]"),
])
def test_bad_names_raise_listing_valid_ones(kwargs, pattern):
    args = {"expert": "news", "layer": "all", "role": "all", **kwargs}
    with pytest.raises(ValueError, match=pattern):
        select_delta(_deltas(), **args)
    with pytest.raises(ValueError, match=pattern):
        delta_histogram(_deltas(), **args)


def test_histogram_counts_every_selected_entry():
    deltas = _deltas()
    deltas["news"]["encoder.layer.0.output.dense.weight"] = torch.tensor([[-2.0, -1.0], [0.0, 0.0], [1.0, 2.0]])
    fig, ax = plt.subplots()
    delta_histogram(deltas, "news", 0, "ffn", bins=5, ax=ax)
    (patch,) = ax.patches  # one StepPatch
    counts = patch.get_data().values
    edges = patch.get_data().edges
    assert counts.sum() == 6 + 6  # intermediate (3x2) + output (3x2)
    assert edges[0] == pytest.approx(-edges[-1]) and len(counts) == 5
    assert edges[-1] == pytest.approx(float(torch.cat([t.reshape(-1) for t in select_delta(deltas, "news", 0, "ffn").values()]).abs().max()))
    assert ax.get_yscale() == "log"
    plt.close(fig)


def test_histogram_of_an_all_zero_slice_does_not_fail():
    deltas = {"x": {"pooler.dense.weight": torch.zeros(4, 4)}}
    fig, ax = plt.subplots()
    delta_histogram(deltas, "x", "outside", "head", ax=ax, log_counts=False)
    assert ax.patches[0].get_data().values.sum() == 16
    plt.close(fig)


def test_explore_builds_a_widget():
    pytest.importorskip("ipywidgets")
    box = explore(_deltas())
    expert, layer, role = box.children[0].children
    assert list(expert.options) == ["news", "sign"] and layer.options[-1] == ("outside blocks", "outside")
    role.value = "embedding"  # layer "all": valid; then an impossible pair must not raise
    layer.value = 0
    plt.close("all")


def test_layer_role_frame_by_hand():
    values = {"layer.10.ffn": 3.0, "layer.2.attention": 1.0, "layer.2.ffn": 2.0, "embedding": 0.5, "head": 0.0}
    frame = layer_role_frame(values, columns=["attention", "ffn", "embedding", "head"])
    assert list(frame.index) == ["layer 2", "layer 10", "outside blocks"]  # numeric, not string order
    assert list(frame.columns) == ["attention", "ffn", "embedding", "head"]
    assert frame.loc["layer 10", "ffn"] == 3.0 and frame.loc["outside blocks", "head"] == 0.0
    assert frame.isna().sum().sum() == 12 - 5
    assert list(layer_role_frame({"layer.0.q": 1.0}).columns) == ["q"]
    with pytest.raises(ValueError, match="not a layer_role key"):
        layer_role_frame({"layer.x.ffn": 1.0})


def test_layer_role_frame_of_rms_by_partition_matches_select_delta():
    from merging_helpers.deltas import rms_by_partition
    deltas = _deltas()
    frame = layer_role_frame(rms_by_partition(deltas["news"], "layer_role"))
    chosen = torch.cat([t.reshape(-1) for t in select_delta(deltas, "news", 0, "attention").values()])
    assert frame.loc["layer 0", "attention"] == pytest.approx(chosen.pow(2).mean().sqrt().item(), rel=1e-6)


def test_histogram_title_names_the_slice():
    fig, ax = plt.subplots()
    delta_histogram(_deltas(), "news", "layer.1", "ffn", ax=ax)
    assert ax.get_title().startswith("news, layer 1, role ffn: 6 entries in 1 tensors")
    delta_histogram(_deltas(), "news", "outside", "embedding", ax=ax)
    assert "outside the blocks" in ax.get_title()
    plt.close(fig)
