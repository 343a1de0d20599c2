"""tensor_source: the in-memory source a plan reads (the folder source is tested with the streamed merges,
tests/test_streaming.py::test_every_planned_method_streams_like_in_memory)."""
import torch

from merging_helpers.tensor_source import StateDictSource


def test_the_state_dict_source_gives_the_floating_tensors_in_order_as_often_as_asked():
    base = {"b": torch.zeros(2, 3), "step": torch.tensor(3), "a": torch.ones(4)}
    experts = [{k: v + 1 for k, v in base.items()}, {k: v + 2 for k, v in base.items()}]
    source = StateDictSource(base, experts, ["x", "y"])
    assert source.shapes == {"b": (2, 3), "a": (4,)} and source.expert_names == ["x", "y"]
    for _ in range(2):  # a plan may read twice (DP's significances do)
        (name, b, ex), = list(source.triples(["a"]))
        assert name == "a" and b is base["a"] and [e is x["a"] for e, x in zip(ex, experts)] == [True, True]
