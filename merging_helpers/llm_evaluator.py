"""Introduced in chapter 8b (the section after chapter 8): the language-model tier scored through chapter 8's protocol.

Chapter 8's comparison (:mod:`merging_helpers.compare`: one λ grid tuned on validation, seeds,
paired intervals) and APL's importances (:func:`merging_helpers.apl.trace`, chapter 4, and
:func:`merging_helpers.taylor.gradient_importances`, chapter 5) read an evaluator of the
encoder zoo: accuracy and right/wrong per example on a split; for APL, the true label's
probability P_t on a few-shot set, the few-shot loss and its gradient. :class:`LLMEvaluator`
answers the same questions for the causal language model of :mod:`merging_helpers.llm`, so
every method of the book runs on it through the same code, none of it written again:

* accuracy over the task's verbalisers and P_t: :func:`merging_helpers.llm.score` (the true
  verbaliser's first token at the assistant's first position); of a generative task, exact
  match and the answer's sequence probability (one teacher-forced pass);
* the loss: cross-entropy of those tokens over the whole vocabulary (the experts' training loss);
* a state dict is *loaded* into one model skeleton (0.4 s for 135M parameters) rather than
  passed through a functional call: the tier's models are scored one at a time, on the GPU when
  there is one (the state dicts stay on the CPU; what comes back is on the CPU too).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .metrics import check_finite_gradient
from .llm import (LLMTier, Scorer, exact_match, generate, greedy_tokens, prompt_logits, score, scores_of,
                  target_loss, targets, task_inputs)
from .llm_tail import first_block, logits_from_block, record_block_inputs


@dataclass(frozen=True)
class Sizes:
    """How many examples of each split are scored (the first ones; the tier's splits are
    shuffled when built), and the few-shot set APL traces on (``shots`` per label, from train) (chapter 8b)."""

    validation: int = 64
    test: int = 200
    shots: int = 4


@dataclass
class TierTasks:
    """What :func:`merging_helpers.compare.run_comparison` reads of a zoo: where it lives and its
    tasks, with the splits cut to the evaluator's sizes (chapter 8b)."""

    root: Path
    tasks: dict

    def task(self, name: str):
        return self.tasks[name]


def cut(task, sizes: Sizes):
    """``task`` with its validation and test splits cut to ``sizes`` (train kept whole) (chapter 8b)."""
    splits = dict(task.splits)
    for split in ("validation", "test"):
        n = getattr(sizes, split)
        if n < 1 or n > len(task.splits[split]):
            raise ValueError(f"Sizes.{split} = {n}: task {task.name!r} has {len(task.splits[split])} {split} examples")
        splits[split] = task.splits[split][:n]
    return replace(task, splits=splits)


class LLMEvaluator:
    """Scores state dicts of the tier's model on its tasks, as chapter 8's evaluator does the
    encoder's (chapter 8b). ``tasks``: the tasks scored (default: the experts' and the held-out one);
    ``device``: where the model runs (default: the GPU when there is one)."""

    from_block = True  # APL's corrupted runs start at the first block they change (False: the whole model)

    def __init__(self, tier: LLMTier, sizes: Sizes = Sizes(), tasks: Sequence[str] | None = None,
                 batch_size: int = 32, device=None):
        self.tier, self.sizes = tier, sizes
        names = list(tasks or (*tier.config.tasks, tier.config.held_out))
        self.zoo = TierTasks(tier.root, {n: cut(tier.tasks[n], sizes) for n in names})
        self.scorer = Scorer(tier, batch_size, device, self.zoo.tasks)

    # ---- chapter 8's side: a split's accuracy, right / wrong per example

    def _load(self, state_dict) -> None:
        self.scorer.load(state_dict)

    def scores(self, state_dict, split: str = "test", tasks=None) -> dict:
        """task → :class:`merging_helpers.llm.Scores` of ``state_dict`` on ``split`` (default: the experts' tasks)."""
        return self.scorer.scores(state_dict, split, tasks)

    def accuracy(self, state_dict, split: str = "test", tasks=None) -> dict[str, float]:
        return {t: s.accuracy for t, s in self.scores(state_dict, split, tasks).items()}

    def correct(self, state_dict, split: str = "test", tasks=None) -> dict[str, torch.Tensor]:
        return {t: torch.tensor(s.right) for t, s in self.scores(state_dict, split, tasks).items()}

    def generate(self, state_dict, task: str, texts, max_new_tokens: int = 6) -> list[str]:
        """The greedy answers of the model ``state_dict`` to ``texts`` as ``task``'s prompts (chapter 8b)."""
        self._load(state_dict)
        return generate(self.scorer.model, self.scorer.tokenizer, self.zoo.tasks[task], list(texts), max_new_tokens,
                        self.tier.config.max_text_tokens)

    def greedy_tokens(self, state_dict, task: str, texts, max_new_tokens: int = 6) -> list[list[int]]:
        """The same answers as tokens, each up to its first end of turn, kept (chapter 8b)."""
        self._load(state_dict)
        return greedy_tokens(self.scorer.model, self.scorer.tokenizer, self.zoo.tasks[task], list(texts),
                             max_new_tokens, self.tier.config.max_text_tokens)

    def targets(self, task: str, examples) -> list[list[int]]:
        """The tokens each example's answer is scored on (:func:`merging_helpers.llm.targets`) (chapter 8b)."""
        return targets(self.scorer.tokenizer, self.zoo.tasks[task], [y for _, y in examples])

    def exact_match(self, state_dict, task: str, split: str = "test", limit: int | None = None) -> float:
        """The share of the first ``limit`` examples of ``split`` whose free greedy answer starts with
        the true label's name (chapter 8b)."""
        self._load(state_dict)
        return exact_match(self.scorer.model, self.scorer.tokenizer, self.zoo.tasks[task],
                           self.zoo.tasks[task].splits[split][:limit])

    # ---- APL's side (chapters 4-5): a few-shot set's P_t, logits, loss and gradient

    @staticmethod
    def _no_head(head) -> None:
        if head is not None:
            raise ValueError("the language model reads every task through its instruction: it has no heads to pass")

    def params(self, state_dict):
        return state_dict

    def few_shot_batches(self, examples):
        examples = list(examples)
        if not examples:
            raise ValueError("the few-shot set is empty: give at least one (text, label) example")
        return [examples]

    def true_label_probability(self, params, task: str, examples, head=None) -> float:
        self._no_head(head)
        self._load(params)
        return self._p_true(task, examples)

    def _scores(self, task: str, examples):
        """:class:`merging_helpers.llm.Scores` of the model as it is loaded now on ``examples``."""
        return score(self.scorer.model, self.scorer.tokenizer, self.zoo.tasks[task], list(examples),
                     self.scorer.batch_size, self.tier.config.max_text_tokens)

    def _p_true(self, task: str, examples) -> float:
        """P_t of the model as it is loaded now."""
        return self._scores(task, examples).p_true

    def true_label_probabilities(self, params, variants: Sequence[Mapping], task: str, examples, head=None,
                                 chunk=None) -> torch.Tensor:
        """P_t of each variant of ``params`` (``variants[k]`` replaces some tensors), one at a time, each
        swapped into the loaded ``params`` (:meth:`merging_helpers.llm.Scorer.swapped`). A variant that
        changes blocks only runs from the first block it changes (:mod:`merging_helpers.llm_tail`;
        ``from_block = False``: the whole model, the readable path)."""
        examples = list(examples)
        self._no_head(head)
        model, blocks = self.scorer.model, self.scorer.model.config.num_hidden_layers
        starts = [first_block(v, blocks) for v in variants]
        clean = None
        if self.from_block and any(starts):  # a run from block 0 saves nothing: the whole model runs
            self._load(params)
            inputs = self._inputs(task, examples)
            clean = record_block_inputs(model, inputs.prompts, self.scorer.tokenizer.pad_token_id,
                                        self.scorer.batch_size, inputs.tails)
        out = []
        for variant, start in zip(variants, starts):
            with self.scorer.swapped(params, variant):
                fast = clean is not None and start
                out.append(scores_of(logits_from_block(model, clean, start), inputs).p_true if fast
                           else self._p_true(task, examples))
        return torch.tensor(out, dtype=torch.float64)

    def few_shot_accuracy(self, params, task: str, examples, head=None) -> float:
        """Accuracy over the verbalisers (a generative task: exact match) of ``params`` on ``examples``
        (what :func:`merging_helpers.apl.trace` reports beside the clean P_t)."""
        self._no_head(head)
        self._load(params)
        return self._scores(task, examples).accuracy

    @torch.no_grad()
    def logits(self, task: str, head, batches, params=None):
        """Logits over the task's verbalisers (first tokens) and the labels of ``batches``, in their order
        (a generative task has no verbalisers: it is refused, naming the task)."""
        self._no_head(head)
        if params is not None:
            self._load(params)
        examples = [e for batch in batches for e in batch]
        inputs = self._inputs(task, examples)
        if inputs.choices is None:
            raise ValueError(f"task {task!r} is generative: it has no verbalisers to give logits over "
                             "(read its Scores: exact match and P_t)")
        out = torch.empty(len(examples), len(inputs.choices))
        for rows, logits in prompt_logits(self.scorer.model, inputs.prompts, self.scorer.tokenizer.pad_token_id,
                                          self.scorer.batch_size):
            out[rows] = logits[:, -1, inputs.choices]
        return out, torch.tensor([y for _, y in examples])

    def _inputs(self, task: str, examples):
        return task_inputs(self.scorer.tokenizer, self.zoo.tasks[task], examples, self.tier.config.max_text_tokens)

    def loss(self, params, task: str, examples, head=None) -> torch.Tensor:
        """Mean cross-entropy of the target tokens (the true verbaliser's first token; a generative task's
        answer and end of turn) over the vocabulary: the experts' training loss."""
        self._no_head(head)
        self._load(params)
        return target_loss(self.scorer.model, self.scorer.tokenizer, self._inputs(task, list(examples)))

    def loss_gradient(self, state_dict, task: str, examples, head=None) -> dict[str, torch.Tensor]:
        """∇ of :meth:`loss` at ``state_dict``, by the state dict's names (the tied LM head's
        gradient is the embedding's: one tensor, stored once), each where its tensor of ``state_dict`` is (chapter 8b)."""
        model = self.scorer.model
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            self.loss(state_dict, task, examples, head).backward()
        grads = {n: p.grad.detach().to(state_dict[n].device, copy=True) for n, p in model.named_parameters()
                 if n in state_dict}
        model.zero_grad(set_to_none=True)
        check_finite_gradient(grads, "the gradient of the few-shot loss")
        return grads
