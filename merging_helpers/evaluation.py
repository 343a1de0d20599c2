"""Introduced in chapter 0: how a merged model is scored.

* accuracy per task — each expert's own head on top of the (merged) encoder;
* normalized accuracy — merged accuracy / the expert's own accuracy;
* DPPA's Task-Ratio (score of the pruned or merged model / score of the dense expert)
  and Domain-Ratio (geometric mean of a domain's Task-Ratios);
* the mean true-label probability on a few-shot set — the quantity APL intervenes on.

Everything runs on any device. :class:`Evaluator` keeps one encoder on that device
and scores a state dict *without loading it*: the parameters are passed to the module
with ``torch.func.functional_call``, so the same code gives accuracies, the few-shot
loss as a differentiable function of given parameters (its gradient with respect to
the base: APL's Taylor importance, chapter 5), and the true-label probability of K
parameter variants in one batched call (``torch.func.vmap``: APL's causal
interventions, chapter 4). :class:`Scorer` is that interface; a causal-LM scorer
(next-token probability of a label word) implements the same four methods.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .metrics import accuracy, check_finite_gradient, mean_pool, mean_true_label_probability  # noqa: F401 (re-exported)
from .zoo import Zoo, default_device, load_encoder, load_tokenizer


# ----------------------------------------------------------------------------- metrics

def majority_accuracy(train_labels, test_labels) -> float:
    """Accuracy of always predicting the most frequent training label (chapter 0)."""
    train_labels, test_labels = list(train_labels), list(test_labels)
    majority = max(set(train_labels), key=train_labels.count)
    return sum(y == majority for y in test_labels) / len(test_labels)


def normalized_accuracy(merged: Mapping[str, float], expert: Mapping[str, float]) -> dict[str, float]:
    """merged / expert accuracy per task (1.0 = the merge is as good as the expert) (chapter 0)."""
    missing = set(merged) - set(expert)
    if missing:
        raise KeyError(f"no expert accuracy for task(s) {sorted(missing)}")
    return {t: merged[t] / expert[t] for t in merged}


def task_ratio(score: float, dense_score: float) -> float:
    """DPPA Eq. 7: R(pruned model, task) / R(dense fine-tuned model, task) (chapter 0)."""
    if dense_score <= 0:
        raise ValueError(f"task_ratio needs a positive dense score, got {dense_score}")
    return score / dense_score


def domain_ratio(task_ratios) -> float:
    """DPPA Eq. 8: geometric mean of the Task-Ratios of one domain (chapter 0)."""
    ratios = list(task_ratios.values()) if isinstance(task_ratios, Mapping) else list(task_ratios)
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(f"domain_ratio needs positive Task-Ratios, got {ratios}")
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


# ----------------------------------------------------------------------------- the evaluator

@runtime_checkable
class Scorer(Protocol):
    """What every chapter scores models with (chapter 0; chapters 4–5 rely on the last three).

    ``params`` is a state dict (name → tensor) of the scored model; nothing is loaded
    into a module, so a caller can score many variants without copying the model.
    """

    def accuracy(self, params: Mapping[str, torch.Tensor], split: str = "test", tasks=None,
                 heads=None) -> dict[str, float]: ...

    def true_label_probability(self, params: Mapping[str, torch.Tensor], task: str, examples,
                               head=None) -> float: ...

    def loss(self, params: Mapping[str, torch.Tensor], task: str, examples, head=None) -> torch.Tensor: ...

    def true_label_probabilities(self, params: Mapping[str, torch.Tensor], variants, task: str, examples,
                                 head=None, chunk: int | None = None) -> torch.Tensor: ...


def native_bf16_cpu() -> bool:
    """True when this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles): only then is
    the evaluator's bfloat16 scoring faster than float32 (chapter 0)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


class Evaluator:
    """Scores encoder state dicts of the zoo's architecture on the zoo's tasks (chapter 0);
    implements :class:`Scorer`.

    Tokenized batches are built once per (task, split) and per few-shot set, and reused;
    texts are sorted by length so that padding is small.

    ``bf16_accuracy``: run the encoder's matrix products in bfloat16 (``torch.autocast``)
    when scoring accuracy (:meth:`accuracy`, :meth:`correct`): about 1.6× faster on a CPU
    with AVX512-BF16, and on the zoo it changed 1 of 2,419 test predictions of the merges
    and experts we compared (tests/test_evaluation.py bounds it). The head, the
    probabilities of APL and every loss and gradient stay float32. Default: on a CPU with
    native bfloat16 products (AVX512-BF16 or AMX) only; elsewhere bfloat16 is emulated and
    about 5× *slower* than float32 (:func:`native_bf16_cpu`).
    """

    def __init__(self, zoo: Zoo, device=None, batch_size: int = 256, bf16_accuracy: bool | None = None):
        self.zoo = zoo
        self.device = torch.device(default_device(device))
        default = self.device.type == "cpu" and native_bf16_cpu()
        self.bf16_accuracy = default if bf16_accuracy is None else bool(bf16_accuracy)
        self.encoder = load_encoder(zoo.base_dir, device=self.device)
        self.tokenizer = load_tokenizer(zoo.base_dir)
        self.batch_size = batch_size
        self._batches = {}
        self._shapes = {n: tuple(p.shape) for n, p in self.encoder.named_parameters()}

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
            self._batches[task, split] = self._tokenized(self.zoo.task(task).splits[split])
        return self._batches[task, split]

    def few_shot_batches(self, examples):
        """The tokenized batches of a few-shot set (a list of (text, label)), cached."""
        examples = [(str(t), int(y)) for t, y in examples]
        if not examples:
            raise ValueError("the few-shot set is empty: give at least one (text, label) example")
        key = ("few-shot", tuple(examples))
        if key not in self._batches:
            self._batches[key] = self._tokenized(examples)
        return self._batches[key]

    def params(self, state_dict: Mapping[str, torch.Tensor], dtype=torch.float32) -> dict[str, torch.Tensor]:
        """The encoder's parameters from ``state_dict``, on the device in float32 (not
        copied where they already are); names the first missing or unexpected tensor and
        a shape that does not fit."""
        missing = [n for n in self._shapes if n not in state_dict]
        unexpected = [n for n in state_dict if n not in self._shapes and not n.endswith("position_ids")]
        if missing or unexpected:
            raise KeyError(f"state dict does not fit the zoo encoder: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
        out = {}
        for n, shape in self._shapes.items():
            t = state_dict[n]
            if tuple(t.shape) != shape:
                raise ValueError(f"state dict does not fit the zoo encoder: {n!r} has shape {tuple(t.shape)}, "
                                 f"the encoder's is {shape}")
            out[n] = t.to(self.device, dtype)
        return out

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Put an encoder state dict into the evaluation model (any dtype, any device)."""
        missing, unexpected = self.encoder.load_state_dict(dict(state_dict), strict=False)
        if missing or unexpected:
            raise KeyError(f"state dict does not fit the zoo encoder: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")

    def _logits(self, params, head, ids, mask, bf16: bool = False):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = functional_call(self.encoder, params, (), {"input_ids": ids, "attention_mask": mask},
                                     strict=False).last_hidden_state
        return mean_pool(hidden.to(head[0].dtype), mask) @ head[0].T + head[1]

    def _head(self, task, head, dtype=torch.float32):
        head = head or self.zoo.heads[task]
        return head["weight"].to(self.device, dtype), head["bias"].to(self.device, dtype)

    @torch.no_grad()
    def logits(self, task: str, head: Mapping[str, torch.Tensor], batches, params=None,
               bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of ``batches`` with ``params`` (default: the encoder's own weights);
        ``bf16``: the encoder's products in bfloat16 (float32 logits)."""
        params = dict(self.encoder.named_parameters()) if params is None else params
        w = self._head(task, head)
        outs, labels = [], []
        for ids, mask, y in batches:
            outs.append(self._logits(params, w, ids, mask, bf16))
            labels.append(y)
        return torch.cat(outs), torch.cat(labels)

    def _split_logits(self, state_dict, split, tasks, heads):
        """(task, logits, labels) of ``split`` for each task, each read by its head."""
        params = self.params(state_dict)
        heads = heads or self.zoo.heads
        for t in (tasks or self.zoo.task_names):
            yield t, *self.logits(t, heads[t], self.batches(t, split), params, self.bf16_accuracy)

    def accuracy(self, state_dict, split: str = "test", tasks=None, heads=None) -> dict[str, float]:
        """Accuracy per task of ``state_dict`` with each task's head (the experts' by default)."""
        return {t: accuracy(logits, labels) for t, logits, labels in self._split_logits(state_dict, split, tasks, heads)}

    def correct(self, state_dict, split: str = "test", tasks=None, heads=None) -> dict[str, torch.Tensor]:
        """Per task, a bool vector on the CPU: each example of ``split`` right or wrong, in
        the evaluator's order (sorted by length; the same for every state dict, so two
        merges' vectors pair up). The input of chapter 3's paired comparisons
        (:mod:`~merging_helpers.paired`)."""
        return {t: (logits.argmax(-1) == labels).cpu()
                for t, logits, labels in self._split_logits(state_dict, split, tasks, heads)}

    def true_label_probability(self, state_dict, task: str, examples, head=None) -> float:
        """APL's P_t: mean probability of the true label on ``examples`` (a few-shot set)."""
        logits, labels = self.logits(task, head, self.few_shot_batches(examples), self.params(state_dict))
        return mean_true_label_probability(logits, labels)

    def loss(self, params, task: str, examples, head=None) -> torch.Tensor:
        """Mean cross-entropy on ``examples`` as a differentiable function of ``params``
        (chapter 5: ``torch.func.grad`` of it, or ``.backward()`` with params that require grad).
        ``params`` must already be on the device (see :meth:`params`); the head and the
        loss are computed in their dtype (float32, or float64 for finite-difference checks)."""
        return self._mean_over(params, task, examples, head,
                               lambda logits, y: torch.nn.functional.cross_entropy(logits, y, reduction="sum"))

    def _mean_over(self, params, task, examples, head, summed) -> torch.Tensor:
        # Σ over the batches of summed(logits, labels), divided by the number of examples
        w = self._head(task, head, next(iter(params.values())).dtype)
        total, count = 0.0, 0
        for ids, mask, y in self.few_shot_batches(examples):
            total = total + summed(self._logits(params, w, ids, mask), y)
            count += len(y)
        return total / count

    def entropy(self, params, task: str, texts, head=None) -> torch.Tensor:
        """Mean Shannon entropy (nats) of the predicted label distribution on ``texts`` (no
        labels are read), a differentiable function of ``params`` like :meth:`loss`: what
        AdaMerging minimises (chapter 6)."""
        texts = [str(t) for t in texts]
        if not texts:
            raise ValueError(f"entropy: no input texts for task {task!r}")
        def summed_entropy(logits, _):  # the placeholder labels are not read
            logp = logits.log_softmax(-1)
            return -(logp.exp() * logp).sum()

        return self._mean_over(params, task, [(t, 0) for t in texts], head, summed_entropy)

    def loss_gradient(self, state_dict, task: str, examples, head=None,
                      dtype=torch.float32) -> dict[str, torch.Tensor]:
        """∇ of :meth:`loss` with respect to every parameter, at ``state_dict`` (chapter 5);
        ``dtype=torch.float64`` needs the encoder in float64 too (``scorer.encoder.double()``)."""
        params = self.params(state_dict, dtype)
        grads = torch.func.grad(lambda p: self.loss(p, task, examples, head))(params)
        check_finite_gradient(grads, "the gradient of the few-shot loss")
        return grads

    @torch.no_grad()
    def true_label_probabilities(self, state_dict, variants: Sequence[Mapping[str, torch.Tensor]], task: str,
                                 examples, head=None, chunk: int | None = None) -> torch.Tensor:
        """P_t of K variants of ``state_dict`` in batched forward passes (chapter 4's causal
        interventions): ``variants[k]`` maps some parameter names to replacement tensors.
        Only the replaced tensors are stacked (``chunk`` variants at a time, all by default);
        equals K calls of :meth:`true_label_probability` (a test checks it)."""
        params = self.params(state_dict)
        variants = list(variants)
        if not variants:
            return torch.empty(0)
        names = sorted(set().union(*variants))
        for k, v in enumerate(variants):
            for n, t in v.items():
                if n not in params:
                    raise KeyError(f"variant {k}: {n!r} is not a parameter of the zoo encoder")
                if tuple(t.shape) != tuple(params[n].shape):
                    raise ValueError(f"variant {k}: {n!r} has shape {tuple(t.shape)}, the encoder's is "
                                     f"{tuple(params[n].shape)}")
        if not names:  # no variant replaces anything: every one is the clean run
            return torch.full((len(variants),), self.true_label_probability(state_dict, task, examples, head))
        w, batches = self._head(task, head), self.few_shot_batches(examples)
        fixed = {n: t for n, t in params.items() if n not in names}

        def probability(varied):
            p, count = 0.0, 0
            for ids, mask, y in batches:
                probs = self._logits({**fixed, **varied}, w, ids, mask).softmax(-1)
                p = p + probs.gather(1, y.view(-1, 1)).sum()
                count += len(y)
            return p / count

        out, step = [], chunk or len(variants)
        for start in range(0, len(variants), step):
            part = variants[start:start + step]
            stacked = {n: torch.stack([v[n].to(self.device, torch.float32) if n in v else params[n] for v in part])
                       for n in names}
            # vmap batches attention through the math backend: CUDA's fused kernels reject a
            # vmapped attention mask ("attn_bias: wrong shape"), and the CPU falls back to it anyway
            with warnings.catch_warnings(), sdpa_kernel(SDPBackend.MATH):
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                out.append(vmap(probability)(stacked))
        return torch.cat(out).cpu()


# ----------------------------------------------------------------------------- chapter 0's table

def task_arithmetic_state(base, experts, lam: float):
    """θ_b + λ Σ_t Δ_t: the plain Task Arithmetic merge (weight averaging is λ = 1/T) (chapter 0)."""
    from .recipes import merge_state_dicts
    experts = list(experts.values()) if isinstance(experts, Mapping) else list(experts)
    return merge_state_dicts(base, experts, "task_arithmetic", lam=lam, progress=False)


# The book's one λ ladder: multiples of LAMBDA_STEP. LAMBDA_GRID is its first ten rungs, the grid of
# every chapter's Task Arithmetic (chapter 2 adds λ = 0, the untouched base); chapter 3's scans
# start from windows of the same ladder and widen along it (ablations.evaluate_variants).
LAMBDA_STEP = 0.1
LAMBDA_GRID = tuple(round(LAMBDA_STEP * i, 1) for i in range(1, 11))


def choose_lambda(mean_accuracy: Mapping[float, float]) -> float:
    """The one λ-selection rule of the book (chapter 0): the λ with the best mean
    accuracy (over tasks, and seeds), ties to the smallest λ. Feed it validation scores."""
    if not mean_accuracy:
        raise ValueError("choose_lambda: no λ was scored")
    best = max(mean_accuracy.values())
    return float(min(lam for lam, m in mean_accuracy.items() if m == best))


def best_lambda(evaluator: "Evaluator", lambdas=LAMBDA_GRID, split: str = "validation"):
    """The λ of Task Arithmetic chosen by :func:`choose_lambda` on ``split``, and all scores (chapter 0)."""
    zoo = evaluator.zoo
    scores = {lam: evaluator.accuracy(task_arithmetic_state(zoo.base, zoo.experts, lam), split)
              for lam in lambdas}
    return choose_lambda({lam: sum(s.values()) / len(s) for lam, s in scores.items()}), scores


def zoo_table(evaluator: "Evaluator", lambdas=LAMBDA_GRID):
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
