"""The memory-lean gradient importance (chapter 5) gives the reference's sums on a tiny Llama:
the whole model and its gradient in memory, Σ Δ·g per partition by taylor.partition_products."""
import pytest
import torch

from merging_helpers import apl, taylor
from merging_helpers.fast.checkpoints import load_state_dict
from merging_helpers.fast.lean_importance import lean_gradient_importances

from conftest import make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("lean"), "llama", torch.float32, shard_size=6000, n_experts=2)


def prompts_for(seed, n=3, tokens=7, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, tokens), generator=g), torch.randint(0, vocab, (n,), generator=g)


def reference(base_dir, expert_dir, ids, answers):
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir)).float()
    base, expert = load_state_dict(base_dir), load_state_dict(expert_dir)
    model.load_state_dict(base)
    loss = torch.nn.functional.cross_entropy(model(ids).logits[:, -1], answers)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    delta = {n: expert[n].float() - base[n].float() for n in grads}
    return {level: taylor.partition_products(delta, grads, apl.groups(base, level)) for level in apl.LEVELS}, float(loss.detach())


def test_lean_sums_equal_the_whole_model_backward(family):
    base_dir, expert_dirs = family
    prompts = {"a": prompts_for(0), "b": prompts_for(1, n=2, tokens=5)}
    lean = lean_gradient_importances(base_dir, {"a": expert_dirs[0], "b": expert_dirs[1]}, prompts, signed=True,
                                     progress=False)
    for task, expert_dir in (("a", expert_dirs[0]), ("b", expert_dirs[1])):
        expected, loss = reference(base_dir, expert_dir, *prompts[task])
        for level in apl.LEVELS:
            torch.testing.assert_close(lean[task][level].values, expected[level], rtol=1e-4, atol=1e-9)
            assert lean[task][level].keys == list(apl.groups(load_state_dict(base_dir), level))
        assert lean[task]["model"].clean == pytest.approx(loss, rel=1e-5)
    plain = lean_gradient_importances(base_dir, {"a": expert_dirs[0]}, {"a": prompts["a"]}, ("layer",), progress=False)
    torch.testing.assert_close(plain["a"]["layer"].values, -lean["a"]["layer"].values.abs())


def test_lean_bad_input_is_named(family):
    base_dir, expert_dirs = family
    with pytest.raises(KeyError, match="prompts for"):
        lean_gradient_importances(base_dir, {"a": expert_dirs[0]}, {"b": prompts_for(0)}, progress=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lean_gradient_importances(base_dir, {"a": expert_dirs[0]}, {"a": (torch.full((2, 4), 500), torch.zeros(2, dtype=torch.long))},
                                  progress=False)
    with pytest.raises(ValueError, match="answers of shape"):
        lean_gradient_importances(base_dir, {"a": expert_dirs[0]}, {"a": (torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))},
                                  progress=False)
    with pytest.raises(ValueError, match="APL level"):
        lean_gradient_importances(base_dir, {"a": expert_dirs[0]}, {"a": prompts_for(0)}, ("block",), progress=False)


def test_lean_encoder_equals_the_whole_model_backward_on_the_zoo():
    """The zoo's BERT encoder: the same sums as taylor.gradient_importances at every level, for
    two experts in one sweep (one with a two-label head, one with four)."""
    from merging_helpers import zoo as zoo_lib
    from merging_helpers.evaluation import Evaluator
    from merging_helpers.fast.lean_importance import lean_encoder_importances
    from merging_helpers.tasks import few_shot
    zoo = zoo_lib.load_zoo(device="cpu", progress=False)
    scorer = Evaluator(zoo, device="cpu")
    tasks = ("news", "sentiment")
    shots = {t: few_shot(zoo.tasks[t], 3, seed=1) for t in tasks}
    lean = lean_encoder_importances(zoo.base_dir, {t: zoo.expert_dir(t) for t in tasks}, shots, zoo.heads,
                                    max_length=zoo.config.max_length, signed=True, progress=False)
    for t in tasks:
        expected = taylor.gradient_importances(scorer, zoo.base, zoo.experts[t], t, shots[t], signed=True)
        for level in apl.LEVELS:
            assert lean[t][level].keys == expected[level].keys
            torch.testing.assert_close(lean[t][level].values, expected[level].values, rtol=1e-4, atol=1e-8)
        assert lean[t]["model"].clean == pytest.approx(expected["model"].clean, rel=1e-5)
    with pytest.raises(ValueError, match="outside its head"):
        lean_encoder_importances(zoo.base_dir, {"news": zoo.expert_dir("news")}, {"news": [("a text", 7)]}, zoo.heads,
                                 progress=False)
    with pytest.raises(ValueError, match="few-shot set of 'news' is empty"):
        lean_encoder_importances(zoo.base_dir, {"news": zoo.expert_dir("news")}, {"news": []}, zoo.heads, progress=False)
    with pytest.raises(KeyError, match="every expert needs"):
        lean_encoder_importances(zoo.base_dir, {"news": zoo.expert_dir("news")}, {"sign": shots["news"]}, zoo.heads,
                                 progress=False)
