"""merging_helpers.llm_tail: APL's corrupted runs from the corrupted block on, against the whole
model's forward pass (merging_helpers.llm.prompt_logits), on the tiny two-block Llama tier."""
import pytest
import torch

from merging_helpers import apl, llm
from merging_helpers.llm_tail import first_block, logits_from_block, record_block_inputs
from merging_helpers.tasks import few_shot
from merging_helpers.llm_evaluator import LLMEvaluator, Sizes
from tiny_llm import smollm_tokenizer, tiny_tier


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    return tiny_tier(tmp_path_factory.mktemp("tier"), smollm_tokenizer(), initializer_range=0.5)


@pytest.fixture(scope="module")
def evaluator(tier):
    return LLMEvaluator(tier, Sizes(validation=10, test=12, shots=3), batch_size=5)


@pytest.mark.parametrize("task", ["sign", "sum"])
def test_corrupted_runs_from_the_first_changed_block_give_the_whole_models_probabilities(tier, task, monkeypatch):
    """The fast path (llm_tail) against the whole model on every corrupted run of a layer trace,
    a prompt set larger than one batch (several recorded batches) and its shared prefix; for a
    generative task (sum), the answer's probability read at its last positions."""
    evaluator = LLMEvaluator(tier, Sizes(validation=10, test=12, shots=3), ["sign", "sum"], batch_size=5)
    base, expert = llm.read_state_dict(tier.base_dir), llm.read_state_dict(tier.expert_dirs["sign"])
    examples = few_shot(tier.tasks[task], 4)  # 8 prompts, batches of 5
    variants = [apl.corrupt(expert, base, group) for group in apl.groups(expert, "layer").values()]
    variants.append({n: t for n, t in variants[-1].items() if ".mlp." in n})  # part of a block
    assert [first_block(v, 2) for v in variants] == [0, 1, 1]
    fast = evaluator.true_label_probabilities(expert, variants, task, examples)
    monkeypatch.setattr(evaluator, "from_block", False)
    whole = evaluator.true_label_probabilities(expert, variants, task, examples)
    torch.testing.assert_close(fast, whole, rtol=1e-5, atol=1e-9)
    assert len(set(whole.tolist())) == 3
    assert all(torch.equal(evaluator.scorer.model.state_dict()[n].cpu(), t) for n, t in expert.items())


def test_a_run_from_a_block_reads_the_clean_runs_states_before_it(tier, evaluator):
    """logits_from_block(start) is the whole model's only while no block before ``start`` changed:
    with block 0 changed, the run from block 1 still gives the clean model's logits."""
    base, expert = llm.read_state_dict(tier.base_dir), llm.read_state_dict(tier.expert_dirs["sign"])
    task = tier.tasks["sign"]
    prompts = evaluator._inputs("sign", few_shot(task, 4)).prompts
    model, pad = evaluator.scorer.model, evaluator.scorer.tokenizer.pad_token_id
    evaluator.scorer.load(expert)
    clean = record_block_inputs(model, prompts, pad, batch_size=3)
    assert clean.n > 0 and len(clean.batches) == 3

    def by_row(batches):
        with torch.no_grad():
            return torch.stack([r for _, r in sorted((i, r) for rows, logits in batches for i, r in zip(rows, logits))])

    torch.testing.assert_close(by_row(logits_from_block(model, clean, 1)), by_row(llm.prompt_logits(model, prompts, pad)),
                               rtol=1e-4, atol=1e-5)
    with evaluator.scorer.swapped(expert, apl.corrupt(expert, base, apl.groups(expert, "layer")["layer.0"])):
        changed = by_row(llm.prompt_logits(model, prompts, pad))
        stale = by_row(logits_from_block(model, clean, 1))
    assert not torch.allclose(changed, stale, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match=r"start must be a block index in \[0, 2\), got 2"):
        next(logits_from_block(model, clean, 2))
    assert first_block({"model.norm.weight": None}, 2) is None and first_block({}, 2) is None
