"""Introduced in chapter 4: APL — which parameters an expert uses, found by causal intervention.

Kong, Zhang & Wang's *Activated Parameter Locating* (its equations, and the readings chosen
here where it leaves them open, are in chapter 4 and the book's appendix "The sources'
equations, and our readings"):

1. **Trace.** Run expert t on a few-shot set D_t (clean run, P_t = mean probability of the
   true label), then once per *partition* with that partition's parameters put back to the
   base's values (corrupted run, P_t^*). The importance of the partition is
   I = P_t^* − P_t (Eq. 5): negative when the expert needs those parameters.
2. **Calibrate.** A partition's drop rate moves away from the plain DARE rate λ by
   tanh(I/τ₁), clipped to [λ − ε, λ + ε] (Eq. 11), or linearly in its importance rank
   (the paper's Fig. 3 comparison, same expected kept count as DARE at λ).
3. **Weigh.** Expert weights are a softmax of the model-level importances (Eq. 12).

Partitions, at three levels (:data:`LEVELS`):

* ``model``: every encoder parameter at once (Eq. 6; P_t^* = P_b);
* ``layer``: the parameters of one transformer block (Eq. 7);
* ``hidden``: hidden state h = the entries that write dimension h of the residual stream
  inside the blocks — row h of every block's attention-output and FFN-down weights, entry h
  of their biases and entry h of the block's LayerNorms (Eq. 8; the paper does not define
  it, this is the book's reading). The embeddings, the query/key/value and FFN-up maps
  (which *read* the residual stream) and the pooler belong to no hidden-state group: they
  keep the plain rate λ.

A group is a ``{parameter name: row}`` mapping, ``row=None`` meaning the whole tensor.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .metrics import accuracy
from .partitions import PerRow, describe, partition_key

LEVELS = ("model", "layer", "hidden")


def _check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"APL level must be one of {LEVELS}, got {level!r}")
    return level


# ----------------------------------------------------------------------------- partitions

def writes_residual(name: str) -> bool:
    """True for the tensors whose row h writes residual dimension h inside a block: attention
    output and FFN down maps (weight and bias) and the block's norms (chapter 4)."""
    info = describe(name)
    return info.layer is not None and (info.linear in ("o", "down") or info.role == "norm")


def groups(shapes: Mapping[str, Sequence[int]], level: str) -> dict[str, dict[str, int | None]]:
    """The partitions of one level as ``{key: {name: row or None}}`` (chapter 4).

    ``shapes`` maps parameter names to shapes (a state dict works too). Keys: ``"model"``;
    ``"layer.l"``; ``"hidden.h"`` for h in 0..H−1 with H the blocks' hidden size."""
    _check_level(level)
    shapes = {n: tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t) for n, t in shapes.items()}
    if level == "model":
        return {"model": {n: None for n in shapes}}
    if level == "layer":
        out: dict[str, dict] = {}
        for n in shapes:
            if describe(n).layer is not None:
                out.setdefault(partition_key(n, "layer"), {})[n] = None
        return dict(sorted(out.items(), key=lambda kv: int(kv[0].split(".")[1])))
    writers = [n for n in shapes if writes_residual(n)]
    if not writers:
        raise ValueError("no tensor writes the residual stream inside a block: the names do not look like "
                         "a BERT- or Llama-style transformer")
    sizes = {shapes[n][0] for n in writers}
    if len(sizes) != 1:
        raise ValueError(f"hidden-state groups need one hidden size; the writers' first dimensions are {sorted(sizes)}")
    (hidden,) = sizes
    return {f"hidden.{h}": {n: h for n in writers} for h in range(hidden)}


def covered_mask(shapes: Mapping[str, Sequence[int]], group: Mapping[str, int | None]) -> dict[str, torch.Tensor]:
    """Bool masks of the entries one group covers (chapter 4: its drawing, and the partition tests)."""
    out = {}
    for n, row in group.items():
        m = torch.zeros(tuple(shapes[n].shape) if isinstance(shapes[n], torch.Tensor) else tuple(shapes[n]),
                        dtype=torch.bool)
        if row is None:
            m[...] = True
        else:
            m[row] = True
        out[n] = m
    return out


def corrupt(expert: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
            group: Mapping[str, int | None]) -> dict[str, torch.Tensor]:
    """The replaced tensors of one corrupted run: the group's entries of ``expert`` set back to
    ``base`` (chapter 4). Tensors outside the group are not in the result."""
    out = {}
    for n, row in group.items():
        if row is None:
            out[n] = base[n]
        else:
            t = expert[n].clone()
            t[row] = base[n][row]
            out[n] = t
    return out


# ----------------------------------------------------------------------------- tracing

@dataclass
class Importance:
    """Result of tracing one expert at one level (chapter 4): ``values[i]`` = P_t^* − P_t of
    partition ``keys[i]`` (Eq. 5), with the clean P_t and the few-shot accuracy. ``units``:
    ``"probability"`` for tracing's P* − P; ``"loss"`` for chapter 5's gradient scores −|Σ Δ g|,
    which Eq. 11's tanh(I/τ₁) cannot read as they are (:func:`drop_rates` says so)."""

    task: str
    level: str
    keys: list[str]
    values: torch.Tensor
    clean: float
    few_shot_accuracy: float
    units: str = "probability"

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.keys, self.values.tolist()))


def _few_shot_accuracy(scorer, params, task, examples, head=None) -> float:
    own = getattr(scorer, "few_shot_accuracy", None)  # the language model's: exact match for a generative task
    if own is not None:
        return own(params, task, examples, head)
    return accuracy(*scorer.logits(task, head, scorer.few_shot_batches(examples), scorer.params(params)))


@dataclass(frozen=True)
class TraceOptions:
    """How :func:`trace` runs (chapter 4): ``chunk`` corrupted runs at a time, a progress bar,
    the ``naive`` one-at-a-time reference, ``only`` these partition keys, the ``head`` that scores."""

    chunk: int = 32
    progress: bool = False
    naive: bool = False
    only: Sequence[str] | None = None
    head: object = None


def trace(scorer, base, expert, task: str, examples, level: str, options: TraceOptions | None = None,
          **given) -> Importance:
    """Causal tracing of ``expert`` on the few-shot ``examples`` of ``task`` at ``level`` (chapter 4);
    the knobs of :class:`TraceOptions` as an object or by name (``chunk=64, head=probe``).

    The corrupted runs are independent and run ``chunk`` at a time: at the hidden-state
    level by :func:`patched_hidden_probabilities` (one forward pass, shared weights), at the
    other levels through the scorer's batched path (stacked replaced tensors).
    ``naive=True`` scores them one at a time, each a whole corrupted state dict (the
    reference the batched paths are tested and timed against). ``only``: trace just these
    partition keys (e.g. a sample of hidden states), in this order. ``head``: the classifier
    that reads the encoder (default: expert ``task``'s own; a held-out task's probe for the
    out-of-domain setting)."""
    from .options import options_from
    how = options_from(TraceOptions, options, given, "trace")
    chunk, progress, naive, only, head = how.chunk, how.progress, how.naive, how.only, how.head
    _check_level(level)
    examples = list(examples)
    if not examples:
        raise ValueError(f"trace: the few-shot set of {task!r} is empty")
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"trace: chunk must be an int >= 1, got {chunk!r}")
    parts = groups(expert, level)
    keys = list(parts) if only is None else list(only)
    unknown = [k for k in keys if k not in parts]
    if unknown:
        raise KeyError(f"trace: {unknown[:3]} are not {level}-level partitions (e.g. {list(parts)[:2]})")
    clean = scorer.true_label_probability(expert, task, examples, head)
    accuracy = _few_shot_accuracy(scorer, expert, task, examples, head)
    traced = scorer.zoo.task(task) if hasattr(scorer, "zoo") else None
    # a generative task (chapter 8b) has no chance level: its P_t, the answer's probability, is read even at 0 right
    chance = 1 / traced.num_labels if traced is not None and not getattr(traced, "generative", False) else None
    if chance is not None and accuracy <= chance:
        warnings.warn(f"the traced model is at chance on the few-shot set of {task!r} (accuracy {accuracy:.2f} <= "
                      f"{chance:.2f}): its importances are noise", stacklevel=2)
    bar = tqdm(total=len(keys), desc=f"trace {task} ({level})", disable=not progress, leave=False)
    values = []
    patch = level == "hidden" and not naive and hasattr(scorer, "encoder")
    for start in range(0, len(keys), 1 if naive else chunk):
        some = keys[start:start + (1 if naive else chunk)]
        if patch:
            values.append(patched_hidden_probabilities(scorer, base, expert, task, examples, map(_hidden_row, some),
                                                       head))
        elif naive:
            corrupted = {**expert, **corrupt(expert, base, parts[some[0]])}
            values.append(torch.tensor([scorer.true_label_probability(corrupted, task, examples, head)]))
        else:
            values.append(scorer.true_label_probabilities(expert, [corrupt(expert, base, parts[k]) for k in some],
                                                          task, examples, head))
        bar.update(len(some))
    bar.close()
    return Importance(task, level, keys, torch.cat(values).double() - clean, clean, accuracy)


def _hidden_row(key: str) -> int:
    return int(key.split(".")[1])


@torch.no_grad()
def patched_hidden_probabilities(scorer, base, expert, task: str, examples, rows, head=None) -> torch.Tensor:
    """P_t^* of hidden-state groups ``rows``, all in one forward pass per few-shot batch (chapter 4).

    Putting row h of a writer's weights (and entry h of its bias or norm) back to the base's
    values changes one thing: coordinate h of that module's output becomes what the base's
    module computes from the same input. So the batch is repeated once per group and, in
    every writer, coordinate h_k of copy k is swapped for the base module's (activation
    patching; for a linear map only row h_k of the base's weight is applied). The weights are
    shared by all copies: no stacked per-variant tensors."""
    params, base_params = scorer.params(expert), scorer.params(base)
    paths = sorted({n.rsplit(".", 1)[0] for n in params if writes_residual(n)})
    hidden = params[paths[0] + ".weight"].shape[0]
    rows = torch.as_tensor(list(rows), device=scorer.device)
    onehot = torch.zeros(len(rows), hidden, device=scorer.device)
    onehot[torch.arange(len(rows)), rows] = 1.0
    k, copies = len(rows), torch.arange(len(rows), device=scorer.device)
    current = {"inside": False}

    def hook_for(path):
        own = {n[len(path) + 1:]: t for n, t in base_params.items() if n.rsplit(".", 1)[0] == path}

        def hook(module, inputs, output):
            if current["inside"]:  # the base's run of this very module, below
                return None
            if isinstance(module, torch.nn.Linear):  # only row h_k of the base's map is needed for copy k
                x = inputs[0].reshape(k, -1, inputs[0].shape[-1])
                reference = torch.einsum("kti,ki->kt", x, own["weight"][rows])
                if "bias" in own:
                    reference = reference + own["bias"][rows][:, None]
                output.view(k, -1, output.shape[-1])[copies, :, rows] = reference.to(output.dtype)
                return output
            current["inside"] = True
            try:
                reference = torch.func.functional_call(module, own, inputs)
            finally:
                current["inside"] = False
            return output + current["mask"] * (reference - output)
        return hook

    handles = [scorer.encoder.get_submodule(p).register_forward_hook(hook_for(p)) for p in paths]
    try:
        total, count = torch.zeros(k, dtype=torch.float64), 0
        for ids, mask, y in scorer.few_shot_batches(examples):
            n = len(y)
            current["mask"] = onehot.repeat_interleave(n, 0)[:, None, :]  # copy k = rows k*n .. k*n+n-1
            logits, labels = scorer.logits(task, head, [(ids.repeat(k, 1), mask.repeat(k, 1), y.repeat(k))], params)
            probs = logits.softmax(-1).gather(1, labels[:, None]).view(k, n)
            total += probs.sum(1).double().cpu()
            count += n
    finally:
        for h in handles:
            h.remove()
    return total / count


# ----------------------------------------------------------------------------- drop rates

def _check_rate_band(lam: float, eps: float) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"epsilon must be a number >= 0, got {eps!r}")
    if not (0 <= lam - eps and lam + eps < 1):
        raise ValueError(f"drop rates λ ± ε must lie in [0, 1): λ = {lam}, ε = {eps} gives "
                         f"[{lam - eps:g}, {lam + eps:g}]")


def _check_tau(tau) -> None:
    if not (isinstance(tau, (int, float)) and tau > 0):
        raise ValueError(f"tau must be > 0, got {tau!r}")


def _checked_importance(values) -> torch.Tensor:
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"importances must be a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("importances contain NaN or inf")
    if not bool(values.ne(0).any()):
        raise ValueError("every importance is zero: replacing any partition changed nothing, so there is "
                         "nothing to calibrate the drop rates with (is the expert equal to the base?)")
    return values


def calibrated_drop_rates(importance, lam: float, eps: float, tau: float = 5.0, normalise: bool = False) -> torch.Tensor:
    """Eq. 11: p = clip(λ + tanh(I/τ₁), λ − ε, λ + ε), one rate per partition (chapter 4).

    I = P^* − P is negative for a partition the expert needs, so needed partitions get a
    rate *below* λ (fewer of their entries dropped). Causal importances are small
    probability differences; ``normalise=True`` first divides them by max |I| (the
    most important partition then has |I| = 1), the book's option, off in the paper."""
    values = _checked_importance(importance)
    _check_rate_band(lam, eps)
    _check_tau(tau)
    if normalise:
        values = values / values.abs().max()
    return (lam + torch.tanh(values / tau)).clamp(lam - eps, lam + eps)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n−1 in ascending order, ties sharing their mean rank (chapter 4)."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    for v in torch.unique(values):
        tied = values == v
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def linear_drop_rates(importance, lam: float, eps: float) -> torch.Tensor:
    """The paper's Fig. 3 mapping (chapter 4): rates linear in importance rank, λ − ε for
    the most important partition (most negative I), λ + ε for the least, λ at the median.
    The rates average to exactly λ, so on partitions of equal size the expected number of
    kept entries equals plain DARE's at λ."""
    values = _checked_importance(importance)
    _check_rate_band(lam, eps)
    if len(values) == 1:
        return torch.full((1,), float(lam), dtype=torch.float64)
    ranks = average_ranks(values)  # 0 = most negative = most important
    return lam - eps + 2 * eps * ranks / (len(values) - 1)


def expert_weights(model_importances, tau: float = 5.0, total: float = 1.0) -> torch.Tensor:
    """Eq. 12's expert weights, softmax(−I_t^m / τ₂) (chapter 4): I_t^m = P_b − P_t is more
    negative for an expert that carries more task information, which then weighs more.
    ``total``: what the weights sum to (T, the number of experts, makes equal importances
    give weight 1 each, i.e. plain Task Arithmetic: the book's MI-Task Arithmetic)."""
    values = torch.as_tensor(model_importances, dtype=torch.float64)
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"model importances must be a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    _check_tau(tau)
    if not (isinstance(total, (int, float)) and math.isfinite(total) and total > 0):
        raise ValueError(f"total must be a number > 0, got {total!r}")
    return total * torch.softmax(-values / tau, dim=0)


def cocktail_weights(losses, temperature: float = 5.0) -> torch.Tensor:
    """LM-Cocktail's merging weights (Xiao et al., 2023), chapter 4's out-of-domain baseline:
    softmax(−L_i / T) of the candidate models' losses on the new task's few shots, summing
    to 1 (its code's default T = 5). The same softmax as :func:`expert_weights`, fed losses."""
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"LM-Cocktail's temperature must be > 0, got {temperature!r}")
    return expert_weights(losses, tau=temperature)


def engine_rates(importance: Importance, rates: torch.Tensor, names) -> tuple[dict, str]:
    """Per-partition drop rates as the merge engine reads them: ``(rates, rate_level)`` for
    :class:`~merging_helpers.config.MergeConfig` (chapter 4). Layer rates become a
    ``{"layer.l": p}`` mapping; hidden-state rates one :class:`PerRow` vector per writer tensor."""
    if len(rates) != len(importance.keys):
        raise ValueError(f"{len(rates)} rates for {len(importance.keys)} partitions")
    if importance.level == "model":
        return {"model": float(rates[0])}, "model"
    if importance.level == "layer":
        return {k: float(p) for k, p in zip(importance.keys, rates)}, "layer"
    order = torch.tensor([int(k.split(".")[1]) for k in importance.keys])
    vector = torch.empty(len(rates), dtype=torch.float64)
    vector[order] = torch.as_tensor(rates, dtype=torch.float64)
    return {n: PerRow(vector.clone()) for n in names if writes_residual(n)}, "tensor"


def partition_sizes(importance: Importance, shapes: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """The number of parameter entries in each of ``importance``'s partitions, in its key order (chapter 4)."""
    shapes = {n: tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t) for n, t in shapes.items()}
    parts = groups(shapes, importance.level)
    sizes = []
    for key in importance.keys:
        if key not in parts:
            raise KeyError(f"partition {key!r} of the importances is not a {importance.level}-level partition here")
        sizes.append(sum(math.prod(shapes[n]) // (1 if row is None else shapes[n][0]) for n, row in parts[key].items()))
    return torch.tensor(sizes, dtype=torch.float64)


RATE_CEILING = 1.0 - 1e-6  # a budget-matched rate may not reach 1 (DARE's rescale divides by 1 − p)


def budget_matched_rates(rates, sizes, lam: float) -> torch.Tensor:
    """Shift per-partition drop rates by one constant so that the expected number of entries
    kept, Σ_s n_s (1 − p_s), equals plain DARE's at ``lam``, (1 − λ) Σ_s n_s (chapter 4.2).
    The order of the rates is kept (an important partition still drops less); rates are clipped
    to [0, 1) after the shift, and the shift is found by bisection so that the clipped rates
    meet the budget to float precision."""
    rates, sizes = torch.as_tensor(rates, dtype=torch.float64), torch.as_tensor(sizes, dtype=torch.float64)
    if rates.shape != sizes.shape or rates.dim() != 1 or bool((sizes <= 0).any()):
        raise ValueError(f"budget_matched_rates: one positive size per rate, got shapes {tuple(rates.shape)} and "
                         f"{tuple(sizes.shape)}")
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"budget_matched_rates: lam must be in [0, 1), got {lam}")

    def mean_rate(shift: float) -> float:
        return float((sizes * (rates + shift).clamp(0.0, RATE_CEILING)).sum() / sizes.sum())

    low, high = -1.0 - float(rates.max()), 1.0 - float(rates.min())  # mean_rate(low) = 0, mean_rate(high) = ceiling
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if mean_rate(mid) < lam else (low, mid)
    return (rates + (low + high) / 2).clamp(0.0, RATE_CEILING)


# ----------------------------------------------------------------------------- merging

MAPPINGS = ("tanh", "linear", "tanh-matched")


def drop_rates(importance: Importance, lam: float, eps: float, mapping: str = "tanh", tau: float = 5.0,
               normalise: bool = False, shapes: Mapping | None = None) -> torch.Tensor:
    """One expert's per-partition drop rates: Eq. 11 (``"tanh"``), Fig. 3's ``"linear"``, or Eq. 11
    shifted to plain DARE's expected kept count at ``lam`` (``"tanh-matched"``, which needs the
    model's ``shapes``: a budget-matched comparison with DARE) (chapter 4)."""
    if mapping != "linear" and not normalise and getattr(importance, "units", "probability") != "probability":
        raise ValueError(f"{importance.task}: these importances are in {importance.units} units (gradient scores, "
                         "chapter 5), and Eq. 11's tanh(I/τ₁) reads probability differences P* − P, so τ₁ = 5 means "
                         "nothing for them: pass normalise=True (each expert's scores divided by their largest "
                         "magnitude first) or mapping='linear' (ranks only)")
    if mapping == "tanh-matched":
        if shapes is None:
            raise ValueError("mapping='tanh-matched' needs the model's shapes to count each partition's entries")
        rates = calibrated_drop_rates(importance.values, lam, eps, tau, normalise)
        return budget_matched_rates(rates, partition_sizes(importance, shapes), lam)
    if mapping == "tanh":
        return calibrated_drop_rates(importance.values, lam, eps, tau, normalise)
    if mapping == "linear":
        return linear_drop_rates(importance.values, lam, eps)
    raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")


# apl.merge's knobs (by name); their defaults are the plan's (PLAN_OPTIONS), the merge's, scale 1, no progress bar
MERGE_KNOBS = ("mapping", "tau", "normalise", "weights", "scale", "rescale", "seed", "progress")


def merge(base, experts: Mapping[str, Mapping[str, torch.Tensor]], importances: Mapping[str, Importance],
          lam: float, eps: float, **knobs):
    """APL merge (Eq. 12, chapter 4): θ_b + scale · Σ_t w_t · DARE(Δ_t; calibrated rates); the
    knobs (:data:`MERGE_KNOBS`: ``mapping``, ``tau``, ``normalise``, ``weights``, ``scale``,
    ``rescale``, ``seed``, ``progress``) go by name.

    ``importances[t]`` is expert t's :class:`Importance` (any level); partitions it does
    not cover keep the plain rate λ. ``weights``: one per expert (default 1 each: "APL on
    Task Arithmetic"; :func:`expert_weights` for MI-Task Arithmetic). ``rescale``: divide the
    survivors by 1 − p as DARE does (Eq. 12 as printed has no rescale: ``rescale=False``).
    ``mapping="tanh-matched"`` keeps plain DARE's expected count of entries (:func:`drop_rates`).
    The same merge by name, in memory or streamed from folders: method ``"apl"`` with
    ``drop_rate=lam`` and ``lam=scale`` (:func:`plan`)."""
    from .recipes import merge_state_dicts
    unknown = sorted(set(knobs) - set(MERGE_KNOBS))
    if unknown:
        raise TypeError(f"apl.merge: unknown option(s) {unknown}; the options are {list(MERGE_KNOBS)}")
    k = dict(knobs)
    scale, progress = k.pop("scale", 1.0), k.pop("progress", False)
    return merge_state_dicts(base, dict(experts), "apl", importances=importances, drop_rate=lam, eps=eps,
                             lam=scale, progress=progress, **k)


# ------------------------------------------------------------------ APL as a plan (method "apl")

PLAN_OPTIONS = {"importances": None, "drop_rate": None, "eps": None, "mapping": "tanh", "tau": 5.0,
                "normalise": False, "rescale": True}  # APL's own (drop_rate: Eq. 11's λ, the DARE rate)
MERGE_OPTIONS = {"lam", "weights", "seed"}  # the merge's: λ scales Σ_t w_t DARE(Δ_t)


def _plan_options(options: Mapping) -> tuple[dict, dict]:
    unknown = sorted(set(options) - set(PLAN_OPTIONS) - MERGE_OPTIONS)
    if unknown:
        raise TypeError(f"apl: unknown option(s) {unknown}; the options are {sorted(set(PLAN_OPTIONS) | MERGE_OPTIONS)}")
    missing = [k for k in ("importances", "drop_rate", "eps") if options.get(k) is None]
    if missing:
        raise TypeError(f"apl needs {missing} (importances: one Importance per expert; drop_rate: Eq. 11's λ; "
                        "eps: its ε)")
    own = {k: options.get(k, default) for k, default in PLAN_OPTIONS.items()}
    _check_rate_band(own["drop_rate"], own["eps"])
    _check_tau(own["tau"])
    if own["mapping"] not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {own['mapping']!r}")
    return own, {k: options[k] for k in MERGE_OPTIONS if k in options}


def _by_expert(importances, names: Sequence[str]) -> list[Importance]:
    """One Importance per expert, in ``names``' order (a mapping by expert name, or a list)."""
    if isinstance(importances, Mapping):
        missing = [t for t in names if t not in importances]
        if missing:
            raise KeyError(f"APL merge: no importances for expert(s) {missing}")
        importances = [importances[t] for t in names]
    if len(importances) != len(names):
        raise ValueError(f"APL merge: {len(importances)} importances for {len(names)} experts")
    levels = {i.level for i in importances}
    if len(levels) != 1:
        raise ValueError(f"APL merge: all experts' importances must be of one level, got {sorted(levels)}")
    return list(importances)


def plan(n_experts: int, options: Mapping):
    """APL as a method (``merge_state_dicts(..., "apl", ...)`` or ``merge_folders``; chapter 4):
    ``(config, finish)`` as :mod:`merging_helpers.methods` describes. ``finish(source)`` reads only
    the model's shapes: each expert's calibrated per-partition rates (:func:`drop_rates`) as a
    DARE merge with Task Arithmetic's weighted sum."""
    from .config import MergeConfig
    own, merge = _plan_options(options)
    rescale = "inverse" if own["rescale"] else None
    first = MergeConfig.build("dare_linear", n_experts, drop_rate=own["drop_rate"], rescale=rescale, **merge)

    def finish(source):
        rates, level = [], "model"
        for importance in _by_expert(own["importances"], source.expert_names):
            calibrated = drop_rates(importance, own["drop_rate"], own["eps"], own["mapping"], own["tau"],
                                    own["normalise"], source.shapes)
            r, level = engine_rates(importance, calibrated, list(source.shapes))
            rates.append(r)
        return MergeConfig.build("dare_linear", n_experts, drop_rate=rates, rate_level=level,
                                 rate_default=own["drop_rate"], rescale=rescale, **merge)
    return first, finish
