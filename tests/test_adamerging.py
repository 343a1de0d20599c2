"""AdaMerging (chapter 6): the merged parameters, the entropy it minimises, and that learning lowers it."""
import math

import pytest
import torch

from merging_helpers import zoo as zoo_lib
from merging_helpers.adamerging import adamerging, merge, merged_params
from merging_helpers.deltas import task_vector
from merging_helpers.evaluation import Evaluator, task_arithmetic_state
from merging_helpers.partitions import partition_key


@pytest.fixture(scope="module")
def scorer():
    return Evaluator(zoo_lib.load_zoo(device="cpu"), device="cpu")


@pytest.fixture(scope="module")
def deltas(scorer):
    zoo = scorer.zoo
    return {t: task_vector(zoo.base, zoo.experts[t]) for t in ("news", "sign")}


def test_merged_params_by_hand():
    base = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    stacked = {"a": torch.tensor([[1.0, 0.0], [0.0, 4.0]]), "b": torch.tensor([[2.0], [3.0]])}
    lam = torch.tensor([[0.5, 1.0], [0.25, 0.0]], requires_grad=True)  # experts × groups; a → group 0, b → 1
    out = merged_params(base, stacked, lam, {"a": 0, "b": 1})
    assert torch.equal(out["a"], torch.tensor([1.5, 3.0]))
    assert torch.equal(out["b"], torch.tensor([2.0]))
    out["a"].sum().backward()
    assert torch.equal(lam.grad, torch.tensor([[1.0, 0.0], [4.0, 0.0]]))  # ∂/∂λ_t^g = Σ Δ_t over group g


def test_entropy_matches_torch_distributions(scorer):
    zoo = scorer.zoo
    texts = [t for t, _ in zoo.tasks["news"].splits["test"][:20]]
    params = scorer.params(zoo.experts["news"])
    ours = float(scorer.entropy(params, "news", texts))
    logits, _ = scorer.logits("news", None, scorer.few_shot_batches([(t, 0) for t in texts]), params)
    reference = float(torch.distributions.Categorical(logits=logits).entropy().mean())
    assert ours == pytest.approx(reference, rel=1e-5)
    assert 0 < ours < math.log(zoo.tasks["news"].num_labels)


def test_constant_coefficients_are_task_arithmetic(scorer, deltas):
    zoo = scorer.zoo
    keys = {partition_key(n, "layer") for n in deltas["news"]}
    coefficients = {t: {k: 0.4 for k in keys} for t in deltas}
    ours = merge(zoo.base, deltas, coefficients, level="layer")
    reference = task_arithmetic_state(zoo.base, {t: zoo.experts[t] for t in deltas}, 0.4)
    for n in deltas["news"]:
        torch.testing.assert_close(ours[n], reference[n], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_learned_coefficients_lower_the_entropy_on_their_inputs(scorer, deltas):
    zoo = scorer.zoo
    inputs = {t: zoo.tasks[t].splits["test"][:48] for t in deltas}
    result = adamerging(scorer, zoo.base, deltas, inputs, level="layer", steps=12, lr=0.05, progress=False)
    assert result.final_entropy < result.initial_entropy - 0.01
    assert len(result.entropy) == 12
    values = [v for per in result.coefficients.values() for v in per.values()]
    assert all(0.0 <= v <= 1.0 for v in values) and max(values) > 0.3  # moved, and clipped to [0, 1]
    untrained = adamerging(scorer, zoo.base, deltas, inputs, level="model", steps=0, progress=False)
    assert untrained.coefficients == {t: {"model": pytest.approx(0.3)} for t in deltas}
    assert untrained.final_entropy == pytest.approx(untrained.initial_entropy)


def test_bad_input_is_named(scorer, deltas):
    zoo = scorer.zoo
    inputs = {"news": ["a headline"]}
    with pytest.raises(ValueError, match="level"):
        adamerging(scorer, zoo.base, deltas, inputs, level="block")
    with pytest.raises(ValueError, match="lr"):
        adamerging(scorer, zoo.base, deltas, inputs, lr=0)
    with pytest.raises(ValueError, match="init"):
        adamerging(scorer, zoo.base, deltas, inputs, init=1.5)
    with pytest.raises(ValueError, match="'news' has no unlabeled inputs"):
        adamerging(scorer, zoo.base, deltas, {"news": []}, steps=1)
    broken = {"news": deltas["news"], "sign": {**deltas["sign"], "embeddings.word_embeddings.weight": torch.zeros(3)}}
    with pytest.raises(ValueError, match="'sign'.*word_embeddings"):
        adamerging(scorer, zoo.base, broken, inputs)
