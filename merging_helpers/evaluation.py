"""Introduced in chapter 0: how a merged model is scored.

* accuracy per task — each expert's own head on top of the (merged) encoder;
* normalized accuracy — merged accuracy / the expert's own accuracy;
* DPPA's Task-Ratio (score of the pruned or merged model / score of the dense expert)
  and Domain-Ratio (geometric mean of a domain's Task-Ratios);
* the mean true-label probability on a few-shot set — the quantity APL intervenes on.

Everything runs on any device: :class:`Evaluator` keeps one encoder on that device and
loads each state dict to be scored into it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .zoo import Zoo, load_encoder, load_tokenizer, mean_pool


# ----------------------------------------------------------------------------- metrics

def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"accuracy: {logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return (logits.argmax(-1) == labels.to(logits.device)).float().mean().item()


def mean_true_label_probability(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over examples of softmax(logits)[label]: APL's P_t (chapter 4)."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    probs = logits.float().softmax(-1)
    return probs.gather(1, labels.to(probs.device).view(-1, 1)).mean().item()


def majority_accuracy(train_labels, test_labels) -> float:
    """Accuracy of always predicting the most frequent training label."""
    train_labels, test_labels = list(train_labels), list(test_labels)
    majority = max(set(train_labels), key=train_labels.count)
    return sum(y == majority for y in test_labels) / len(test_labels)


def normalized_accuracy(merged: Mapping[str, float], expert: Mapping[str, float]) -> dict[str, float]:
    """merged / expert accuracy per task (1.0 = the merge is as good as the expert)."""
    missing = set(merged) - set(expert)
    if missing:
        raise KeyError(f"no expert accuracy for task(s) {sorted(missing)}")
    return {t: merged[t] / expert[t] for t in merged}


def task_ratio(score: float, dense_score: float) -> float:
    """DPPA Eq. 7: R(pruned model, task) / R(dense fine-tuned model, task)."""
    if dense_score <= 0:
        raise ValueError(f"task_ratio needs a positive dense score, got {dense_score}")
    return score / dense_score


def domain_ratio(task_ratios) -> float:
    """DPPA Eq. 8: geometric mean of the Task-Ratios of one domain."""
    ratios = list(task_ratios.values()) if isinstance(task_ratios, Mapping) else list(task_ratios)
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(f"domain_ratio needs positive Task-Ratios, got {ratios}")
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


# ----------------------------------------------------------------------------- the evaluator

class Evaluator:
    """Scores encoder state dicts of the zoo's architecture on the zoo's tasks.

    Tokenized batches are built once per (task, split) and reused; texts are sorted by
    length so that padding is small.
    """

    def __init__(self, zoo: Zoo, device=None, batch_size: int = 256):
        self.zoo = zoo
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = load_encoder(zoo.base_dir, device=self.device)
        self.tokenizer = load_tokenizer(zoo.base_dir)
        self.batch_size = batch_size
        self._batches = {}

    def _tokenized(self, examples):
        examples = sorted(examples, key=lambda e: len(e[0]))
        out = []
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start:start + self.batch_size]
            enc = self.tokenizer([t for t, _ in chunk], padding=True, truncation=True,
                                 max_length=self.zoo.config.max_length, return_tensors="pt")
            out.append((enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device),
                        torch.tensor([y for _, y in chunk], device=self.device)))
        return out

    def batches(self, task: str, split: str):
        if (task, split) not in self._batches:
            self._batches[task, split] = self._tokenized(self.zoo.tasks[task].splits[split])
        return self._batches[task, split]

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Put an encoder state dict into the evaluation model (any dtype, any device)."""
        missing, unexpected = self.encoder.load_state_dict(dict(state_dict), strict=False)
        if missing or unexpected:
            raise KeyError(f"state dict does not fit the zoo encoder: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")

    @torch.no_grad()
    def logits(self, task: str, head: Mapping[str, torch.Tensor], batches) -> tuple[torch.Tensor, torch.Tensor]:
        weight = head["weight"].to(self.device, torch.float32)
        bias = head["bias"].to(self.device, torch.float32)
        outs, labels = [], []
        for ids, mask, y in batches:
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            outs.append(mean_pool(hidden.float(), mask) @ weight.T + bias)
            labels.append(y)
        return torch.cat(outs), torch.cat(labels)

    def accuracy(self, state_dict, split: str = "test", tasks=None, heads=None) -> dict[str, float]:
        """Accuracy per task of ``state_dict`` with each task's head (the experts' by default)."""
        self.load(state_dict)
        heads = heads or self.zoo.heads
        return {t: accuracy(*self.logits(t, heads[t], self.batches(t, split)))
                for t in (tasks or self.zoo.task_names)}

    def true_label_probability(self, state_dict, task: str, examples, head=None) -> float:
        """APL's P_t: mean probability of the true label on ``examples`` (a few-shot set)."""
        self.load(state_dict)
        logits, labels = self.logits(task, head or self.zoo.heads[task], self._tokenized(examples))
        return mean_true_label_probability(logits, labels)


# ----------------------------------------------------------------------------- chapter 0's table

def task_arithmetic_state(base, experts, lam: float):
    """θ_b + λ Σ_t Δ_t: the plain Task Arithmetic merge (weight averaging is λ = 1/T)."""
    from .recipes import merge_state_dicts
    experts = list(experts.values()) if isinstance(experts, Mapping) else list(experts)
    return merge_state_dicts(base, experts, "task_arithmetic", lam=lam, progress=False)


def best_lambda(evaluator: "Evaluator", lambdas, split: str = "validation"):
    """The λ of Task Arithmetic with the best mean accuracy on ``split``, and all scores."""
    zoo = evaluator.zoo
    scores = {lam: evaluator.accuracy(task_arithmetic_state(zoo.base, zoo.experts, lam), split)
              for lam in lambdas}
    mean = {lam: sum(s.values()) / len(s) for lam, s in scores.items()}
    return max(mean, key=mean.get), scores


def zoo_table(evaluator: "Evaluator", lambdas=tuple(round(0.1 * i, 1) for i in range(1, 11))):
    """Chapter 0's table: test accuracy per task of (a) the majority class, (b) a head on the
    frozen base, (c) the expert, (d) weight averaging and (e) Task Arithmetic (λ chosen on
    the validation split), each merged encoder read by each expert's own head."""
    import pandas as pd
    zoo = evaluator.zoo
    lam, _ = best_lambda(evaluator, lambdas)
    columns = {
        "majority": {t: majority_accuracy(task.targets("train"), task.targets("test")) for t, task in zoo.tasks.items()},
        "frozen base + head": evaluator.accuracy(zoo.base, heads=zoo.frozen_heads),
        "expert": {t: evaluator.accuracy(zoo.experts[t], tasks=[t])[t] for t in zoo.task_names},
        "weight average": evaluator.accuracy(task_arithmetic_state(zoo.base, zoo.experts, 1 / len(zoo.experts))),
        f"task arithmetic (λ={lam})": evaluator.accuracy(task_arithmetic_state(zoo.base, zoo.experts, lam)),
    }
    table = 100 * pd.DataFrame(columns)
    table.loc["mean"] = table.mean()
    return table.round(1), lam
