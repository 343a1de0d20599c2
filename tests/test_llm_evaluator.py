"""merging_helpers.llm_evaluator: the language-model tier read through chapter 8's evaluator and
APL's scorer, each answer checked against the model's own full forward pass (every position's
logits, no prefix reuse), on a tiny two-expert Llama tier."""
import os

import pytest
import torch

from merging_helpers import apl, compare, llm
from merging_helpers.llm_evaluator import LLMEvaluator, Sizes
from merging_helpers.tasks import few_shot
from tiny_llm import smollm_tokenizer, tiny_tier

DEVICE = os.environ.get("MERGING_TEST_DEVICE", "cpu")  # benchmarks/gpu_check.sh sets "cuda"


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    return tiny_tier(tmp_path_factory.mktemp("tier"), smollm_tokenizer(), initializer_range=0.5)


@pytest.fixture(scope="module")
def evaluator(tier):
    return LLMEvaluator(tier, Sizes(validation=10, test=12, shots=3), batch_size=5, device=DEVICE)


def _full_forward(tier, state_dict, task, examples):
    """(answer-token logits at the last position, full-vocabulary logits) of each example, one prompt at a time."""
    model, tokenizer = llm.load_folder(tier.base_dir)
    model.load_state_dict(state_dict, strict=False)
    model.tie_weights()
    answers = llm.answer_tokens(tokenizer, task)
    rows = [model(torch.tensor([p])).logits[0, -1]
            for p in llm.prompt_ids(tokenizer, task, [t for t, _ in examples], tier.config.max_text_tokens)]
    return torch.stack(rows)[:, answers], torch.stack(rows)


def test_right_and_wrong_per_example_are_the_full_forward_passes_argmax_over_the_verbalisers(tier, evaluator):
    expert = llm.read_state_dict(tier.expert_dirs["sign"])
    correct = evaluator.correct(expert, "test")
    assert set(correct) == {"compare", "sign"} and len(correct["sign"]) == 12
    with torch.no_grad():
        for t in correct:
            examples = tier.tasks[t].splits["test"][:12]
            logits, _ = _full_forward(tier, expert, tier.tasks[t], examples)
            assert correct[t].tolist() == (logits.argmax(-1) == torch.tensor([y for _, y in examples])).tolist()
    accuracy = evaluator.accuracy(expert, "validation", ["sign"])
    assert list(accuracy) == ["sign"] and 0 <= accuracy["sign"] <= 1
    with pytest.raises(KeyError, match=r"tasks \[.news.\] are not scored here"):
        evaluator.accuracy(expert, "test", ["news"])
    with pytest.raises(ValueError, match="Sizes.test = 500: task 'compare' has"):
        LLMEvaluator(tier, Sizes(validation=10, test=500))


def test_the_loss_gradient_is_autograd_of_the_full_forward_passes_cross_entropy(tier, evaluator):
    """The tied embedding's gradient includes the LM head's part: the reference model shares the tensor too."""
    base = llm.read_state_dict(tier.base_dir)
    task = tier.tasks["compare"]
    examples = few_shot(task, 3)
    assert sorted(y for _, y in examples) == [0, 0, 0, 1, 1, 1]
    got = evaluator.loss_gradient(base, "compare", examples)
    model, tokenizer = llm.load_folder(tier.base_dir)
    answers = torch.tensor(llm.answer_tokens(tokenizer, task))
    logits = torch.stack([model(torch.tensor([p])).logits[0, -1]
                          for p in llm.prompt_ids(tokenizer, task, [t for t, _ in examples])])
    torch.nn.functional.cross_entropy(logits, answers[torch.tensor([y for _, y in examples])]).backward()
    reference = {n: p.grad for n, p in model.named_parameters()}
    assert set(got) == set(reference) and "model.embed_tokens.weight" in got
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=1e-3, atol=1e-6)
    with torch.no_grad():
        assert float(evaluator.loss(base, "compare", examples)) == pytest.approx(
            float(torch.nn.functional.cross_entropy(logits, answers[torch.tensor([y for _, y in examples])])), rel=1e-4)


def test_tracing_a_layer_puts_its_weights_back_to_the_bases_and_reads_the_true_labels_probability(tier, evaluator):
    base, expert = llm.read_state_dict(tier.base_dir), llm.read_state_dict(tier.expert_dirs["sign"])
    examples = few_shot(tier.tasks["sign"], 3)
    importance = apl.trace(evaluator, base, expert, "sign", examples, "layer")
    assert importance.keys == ["layer.0", "layer.1"]
    with torch.no_grad():
        for key, value in importance.as_dict().items():
            corrupted = {n: (base[n] if n.startswith(f"model.layers.{key[6:]}.") else t) for n, t in expert.items()}
            answer_logits, full = _full_forward(tier, corrupted, tier.tasks["sign"], examples)
            answers = llm.answer_tokens(evaluator.scorer.tokenizer, tier.tasks["sign"])
            p_star = full.softmax(-1)[torch.arange(len(examples)), [answers[y] for _, y in examples]].mean()
            assert value == pytest.approx(float(p_star) - importance.clean, rel=1e-3, abs=1e-10)
            assert abs(value) > 1e-3 * importance.clean  # putting a block back changes P_t
    with pytest.raises(ValueError, match="no heads"):
        evaluator.true_label_probability(expert, "sign", examples, head={"w": 1})


def test_a_corrupted_run_swaps_only_its_tensors_in_and_puts_them_back(tier, evaluator, monkeypatch):
    """APL's corrupted runs (true_label_probabilities, the whole model) give the bits of loading each corrupted model whole."""
    monkeypatch.setattr(evaluator, "from_block", False)
    base, expert = llm.read_state_dict(tier.base_dir), llm.read_state_dict(tier.expert_dirs["sign"])
    examples = few_shot(tier.tasks["sign"], 3)
    variants = [apl.corrupt(expert, base, group) for level in ("layer", "hidden")
                for group in list(apl.groups(expert, level).values())[:3]]
    swapped = evaluator.true_label_probabilities(expert, variants, "sign", examples)

    def held():
        return evaluator.scorer.model.state_dict()

    assert all(torch.equal(held()[n].cpu(), t) for n, t in expert.items())  # the expert again, every tensor
    whole = [evaluator.true_label_probability({**expert, **v}, "sign", examples) for v in variants]
    assert swapped.tolist() == whole and len(set(whole)) > 1
    name = next(iter(variants[0]))
    with pytest.raises(RuntimeError, match="inside"):
        with evaluator.scorer.swapped(expert, variants[0]):
            assert torch.equal(held()[name].cpu(), variants[0][name])
            raise RuntimeError("inside the block")
    assert torch.equal(held()[name].cpu(), expert[name])  # put back after a failure too
    with pytest.raises(ValueError, match="not the tier's model's"):
        with evaluator.scorer.swapped(expert, {"model.nope.weight": torch.zeros(1)}):
            pass


def test_every_method_of_chapter_8_runs_on_the_tier_through_its_protocol(tier, evaluator):
    """Task Arithmetic's test accuracy at its chosen λ is θ_b + λ(Δ_1 + Δ_2) scored by hand;
    the APL contenders (causal at the layer level, gradient at the hidden-state level) merge and score."""
    base = llm.read_state_dict(tier.base_dir)
    experts = {t: llm.read_state_dict(tier.expert_dirs[t]) for t in ("compare", "sign")}
    deltas = [{n: e[n] - base[n] for n in base} for e in experts.values()]
    shots = {t: few_shot(tier.tasks[t], 2) for t in experts}
    ta = compare.tune_and_test(evaluator, base, deltas, compare.CONTENDERS["Task Arithmetic"], None,
                               lambdas=(0.5, 1.0), seeds=(0,))
    by_hand = {n: base[n] + ta.lam * (deltas[0][n] + deltas[1][n]) for n in base}
    assert ta.test == pytest.approx(100 * sum(evaluator.accuracy(by_hand, "test").values()) / 2)
    for contender in (compare.apl_contender(evaluator, base, experts, shots, "causal", "TA", "layer"),
                      compare.apl_contender(evaluator, base, experts, shots, "gradient", "TA", "hidden")):
        outcome = compare.tune_and_test(evaluator, base, deltas, contender, 0.5, lambdas=(1.0,), seeds=(0, 1))
        assert len(outcome.test_per_seed) == 2 and set(outcome.shares) == {"compare", "sign"}
