"""Introduced in chapter 6: DPPA — dynamic pruning (DP) and partition amplification (DPA).

Zhu, Xia & Zhang's *DPPA* (its Eqs. 1–5 and the readings chosen here are in chapter 6 and
the book's appendix "The sources' equations, and our readings") prunes a *complex*
fine-tune (a delta far from its base) by magnitude, at a rate per linear map that depends
on how significant that map's delta is, and then amplifies the entries it keeps, band by
band.

DP (Eqs. 1–5). The *significance* of a block of delta entries is the sum of |δ| over its
outliers, the entries with |δ| > N · mean|δ| of the block. Per layer l and per linear map j
of that layer:

    dif_l   = −sig(Δ_l) + mean_l sig(Δ_l)                              (Eq. 1)
    dif'_lj = −sig(Δ_lj) + Σ_l Σ_j sig(Δ_lj)·n_lj / Σ_l Σ_j n_lj        (Eqs. 2–3)
    norm(x) = x · λ / max|x|                                            (Eq. 4)
    Θ_lj    = α + norm(dif_l) + norm(dif'_lj)                          (Eq. 5)

and each linear map is magnitude-pruned at its own Θ_lj (no rescale). Eq. 2's mean is, as
printed, one size-weighted mean over every linear map of the model (``eq2_mean="model"``,
the default); ``eq2_mean="layer"`` takes it within each layer instead (a reading this book
used before, kept as a named variant: chapter 6 shows how far Θ moves between the two).
Readings used here (the paper leaves them open): N = 5 for layers and for linear maps (the paper
gives no value; 3 for layers, described for the authors' code, is ``n_layer=3``); norm runs over all layers for dif
and over all linear maps of the model for dif'; a linear map is its weight and bias
together; every tensor outside the linear maps (embeddings, norms, heads, pooler) is pruned
at α. With equal layer sizes the kept count is then α's, to rounding, unless rates are
clipped (dif sums to 0 over layers, dif' to 0 over the model — or within a layer, for the
per-layer reading — when weighted by size). Clipping moves the achieved rate towards the
middle: a Θ ≥ 1 prunes only the whole map, a Θ < 0 prunes nothing.

OWL (the paper's baseline), on deltas: per layer the outlier ratio D_l (the fraction of
entries with |δ| > M · mean|δ|, OWL's score |W|·‖X‖ without activations), mapped to [0, 2λ],
shifted to mean 1 − α as a *density*; layers with more outliers are pruned less.

DPA. The *bands* of a tensor are the entries kept at the first pruning rate (e.g. 0.9: the
top 10 % |δ|), then those added between it and the next rate (0.9 → 0.8), and so on;
:func:`amplify` scales each band by its own factor. The factors are searched on validation
data (:func:`greedy_factor`, :func:`search_method1`, :func:`search_method2`).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

from .drop import magnitude_keep_mask
from .partitions import describe

LAMBDA = 0.08  # the paper's λ of Eq. 4 (and OWL's)
N_SIGNIFICANT = 5.0  # an entry is an outlier above N × the block's mean |δ|


def _check(alpha: float, lam: float, n: float = 1.0, what: str = "dp_rates") -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"{what}: the target pruning rate alpha must be in [0, 1), got {alpha}")
    if lam < 0:
        raise ValueError(f"{what}: the fluctuation lam must be >= 0, got {lam}")
    if n <= 0:
        raise ValueError(f"{what}: the outlier multiple N must be > 0, got {n}")


def significance(tensors: torch.Tensor | Sequence[torch.Tensor], n: float = N_SIGNIFICANT) -> float:
    """sig(Δ): Σ |δ| over the entries with |δ| > n · mean|δ| of the block (all given tensors
    together); 0 for a block of zeros (chapter 6)."""
    if n <= 0:
        raise ValueError(f"significance: the outlier multiple N must be > 0, got {n}")
    values = torch.cat([t.detach().abs().flatten().double() for t in ([tensors] if isinstance(tensors, torch.Tensor) else tensors)])
    if values.numel() == 0:
        return 0.0
    mean = values.mean()
    return float(values[values > n * mean].sum())


def normalise(x: torch.Tensor, lam: float = LAMBDA) -> torch.Tensor:
    """Eq. 4: x · λ / max|x| (all zeros stay zeros) (chapter 6)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    top = x.abs().max() if x.numel() else torch.tensor(0.0)
    return torch.zeros_like(x) if float(top) == 0.0 else x * lam / top


def layer_fluctuation(sig: torch.Tensor) -> torch.Tensor:
    """Eq. 1: dif_l = −sig_l + mean sig over layers (chapter 6)."""
    sig = torch.as_tensor(sig, dtype=torch.float64)
    return -sig + sig.mean()


def linear_fluctuation(sig: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Eqs. 2–3 over the given linear maps: dif'_j = −sig_j + Σ_j sig_j n_j / Σ_j n_j (chapter 6)."""
    sig, sizes = torch.as_tensor(sig, dtype=torch.float64), torch.as_tensor(sizes, dtype=torch.float64)
    return -sig + (sig * sizes).sum() / sizes.sum()


def _structure(names):
    """layer → names, and (layer, linear) → names, for the names inside the blocks."""
    layers: dict[int, list[str]] = {}
    linears: dict[tuple[int, str], list[str]] = {}
    for name in names:
        info = describe(name)
        if info.layer is None:
            continue
        layers.setdefault(info.layer, []).append(name)
        if info.linear is not None:
            linears.setdefault((info.layer, info.linear), []).append(name)
    return dict(sorted(layers.items())), linears


def _clipped(rates: dict[str, float], what: str) -> dict[str, float]:
    bad = {n: r for n, r in rates.items() if not 0.0 <= r < 1.0}
    if bad:
        name, rate = next(iter(bad.items()))
        warnings.warn(f"{what}: {len(bad)} rates fell outside [0, 1) (e.g. {name!r}: {rate:.4f}) and were clipped; "
                      "lower lam or move alpha away from the ends", stacklevel=3)
    return {n: min(max(r, 0.0), 1.0 - 1e-6) for n, r in rates.items()}


EQ2_MEANS = ("model", "layer")  # Eq. 2's mean: over every linear map (as printed), or within each layer
BUDGETS = ("clip", "exact")  # a rate outside [0, 1): clipped (the achieved rate may miss α), or all shifted to meet α
_TOP = 1.0 - 1e-6  # the highest rate: nothing of the tensor is kept


def at_budget(rates: Mapping[str, float], sizes: Mapping[str, int], alpha: float) -> dict[str, float]:
    """The rates shifted by one constant s, clip(rate + s) to [0, 1), with s chosen by bisection so
    that their size-weighted mean is ``alpha`` (chapter 6: DP's budget kept exactly where Eq. 5
    sends rates past the ends). The order of the rates is kept, and no warning is needed."""
    names = list(rates)
    r = torch.tensor([rates[n] for n in names], dtype=torch.float64)
    w = torch.tensor([float(sizes[n]) for n in names], dtype=torch.float64)

    def achieved(shift: float) -> float:
        return float((w * (r + shift).clamp(0.0, _TOP)).sum() / w.sum())

    low, high = -1.0 - float(r.max()), 1.0 - float(r.min())  # achieved: 0 at low, _TOP at high
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if achieved(middle) < alpha else (low, middle)
    return dict(zip(names, (r + high).clamp(0.0, _TOP).tolist()))


def _check_budget(budget: str, what: str) -> None:
    if budget not in BUDGETS:
        raise ValueError(f"{what}: budget must be one of {BUDGETS}, got {budget!r}")


def _within_range(rates: dict[str, float], sizes, members, alpha: float, budget: str, what: str) -> dict[str, float]:
    """The rates brought back into [0, 1): clipped (``budget="clip"``, with a warning) or, for the
    tensors in ``members``, shifted together so they still prune ``alpha`` (``"exact"``)."""
    if budget == "exact":
        moved = {name: rates[name] for name in members}
        return {**rates, **at_budget(moved, {n: sizes[n] for n in moved}, alpha)}
    return _clipped(rates, what)


def dp_rates(deltas: Mapping[str, torch.Tensor], alpha: float, lam: float = LAMBDA, n_layer: float = N_SIGNIFICANT,
             n_linear: float = N_SIGNIFICANT, eq2_mean: str = "model", budget: str = "clip") -> dict[str, float]:
    """DP's pruning rate of every tensor (Eqs. 1–5): Θ_lj for the tensors of linear map j of
    layer l, α for the rest (chapter 6). ``eq2_mean``: Eq. 2's size-weighted mean of sig over
    every linear map of the model (``"model"``, as printed) or within each layer (``"layer"``).
    Rates outside [0, 1): ``budget="clip"`` clips them, with a warning (the achieved rate then
    misses α near the ends); ``"exact"`` shifts the linear maps' rates by one constant so that
    they still prune α of their entries (:func:`at_budget`)."""
    _check(alpha, lam, min(n_layer, n_linear))
    layers, linears = _structure(deltas)
    sig_layers = [significance([deltas[n] for n in names], n_layer) for names in layers.values()]
    sig_linears = [significance([deltas[n] for n in names], n_linear) for names in linears.values()]
    sizes = {n: d.numel() for n, d in deltas.items()}
    return rates_from_significance(sizes, sig_layers, sig_linears, alpha, lam, eq2_mean, budget)


def rates_from_significance(sizes: Mapping[str, int], sig_layers: Sequence[float], sig_linears: Sequence[float],
                            alpha: float, lam: float = LAMBDA, eq2_mean: str = "model",
                            budget: str = "clip") -> dict[str, float]:
    """Eqs. 1–5 from the significances (chapter 6): ``sizes`` {tensor name: entries}, one sig per
    layer and per linear map in :func:`_structure`'s order. :func:`dp_rates` and DP's plan (which
    streams the significances from disk) both end here."""
    _check(alpha, lam)
    if eq2_mean not in EQ2_MEANS:
        raise ValueError(f"dp_rates: eq2_mean must be one of {EQ2_MEANS}, got {eq2_mean!r}")
    _check_budget(budget, "dp_rates")
    layers, linears = _structure(sizes)
    rates = {name: float(alpha) for name in sizes}
    if not layers:
        return rates
    layer_ids, keys = list(layers), list(linears)
    dif = normalise(layer_fluctuation(list(sig_layers)), lam)
    sig = torch.tensor(list(sig_linears), dtype=torch.float64)
    n = torch.tensor([sum(sizes[name] for name in linears[k]) for k in keys], dtype=torch.float64)
    groups = [list(range(len(keys)))] if eq2_mean == "model" else \
        [[i for i, k in enumerate(keys) if k[0] == layer] for layer in layer_ids]
    dif_lin = torch.zeros(len(keys), dtype=torch.float64)
    for idx in (g for g in groups if g):
        dif_lin[idx] = linear_fluctuation(sig[idx], n[idx])
    dif_lin = normalise(dif_lin, lam)
    by_layer = dict(zip(layer_ids, dif.tolist()))
    for i, (layer, _) in enumerate(keys):
        for name in linears[keys[i]]:
            rates[name] = alpha + by_layer[layer] + float(dif_lin[i])
    return _within_range(rates, sizes, [name for k in keys for name in linears[k]], alpha, budget, "dp_rates")


def owl_rates(deltas: Mapping[str, torch.Tensor], alpha: float, lam: float = LAMBDA, m: float = N_SIGNIFICANT,
              budget: str = "clip") -> dict[str, float]:
    """OWL's layer-wise pruning rates computed on the deltas (chapter 6): per layer, the outlier
    ratio D_l (entries with |δ| > m · the layer's mean |δ|) mapped to [0, 2λ] and shifted so
    that the densities average 1 − α; tensors outside the blocks get α. Rates outside [0, 1):
    ``budget`` as in :func:`dp_rates`."""
    _check(alpha, lam, m, "owl_rates")
    _check_budget(budget, "owl_rates")
    layers, _ = _structure(deltas)
    rates = {name: float(alpha) for name in deltas}
    if not layers:
        return rates
    ratios = []
    for names in layers.values():
        values = torch.cat([deltas[n].detach().abs().flatten().double() for n in names])
        ratios.append(float((values > m * values.mean()).double().mean()) if values.numel() else 0.0)
    ratios = torch.tensor(ratios, dtype=torch.float64)
    spread = ratios.max() - ratios.min()
    scaled = torch.zeros_like(ratios) if float(spread) == 0 else (ratios - ratios.min()) / spread * 2 * lam
    density = scaled - scaled.mean() + (1 - alpha)
    for layer_density, names in zip(density.tolist(), layers.values()):
        for name in names:
            rates[name] = 1 - layer_density
    return _within_range(rates, {n: d.numel() for n, d in deltas.items()}, [n for names in layers.values() for n in names],
                         alpha, budget, "owl_rates")


def magnitude_prune(deltas: Mapping[str, torch.Tensor], rates: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Each tensor magnitude-pruned at its own rate (top-k |δ| per tensor, no rescale) (chapter 6)."""
    missing = [n for n in deltas if n not in rates]
    if missing:
        raise KeyError(f"magnitude_prune: no rate for {missing[:3]}")
    return {n: d * magnitude_keep_mask(d, 1.0 - float(rates[n])) for n, d in deltas.items()}


def _check_levels(levels: Sequence[float]) -> list[float]:
    levels = [float(v) for v in levels]
    if not levels or any(not 0.0 <= v < 1.0 for v in levels):
        raise ValueError(f"bands: pruning rates must be in [0, 1), got {levels}")
    if any(b >= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"bands: pruning rates must be strictly decreasing (keep more in each band), got {levels}")
    return levels


def bands(delta: torch.Tensor, levels: Sequence[float]) -> list[torch.Tensor]:
    """DPA's partitions of one tensor (chapter 6): band 0 = the entries kept at pruning rate
    ``levels[0]``, band b = those added between ``levels[b-1]`` and ``levels[b]``; disjoint
    bool masks, their union = magnitude pruning at ``levels[-1]``."""
    return _nested_bands(delta, _check_levels(levels))


def _nested_bands(delta: torch.Tensor, rates: Sequence[float]) -> list[torch.Tensor]:
    # band b = the entries magnitude pruning at rates[b] keeps and no earlier rate kept
    out, kept = [], torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    for rate in rates:
        keep = magnitude_keep_mask(delta, 1.0 - rate)
        out.append(keep & ~kept)
        kept |= keep
    return out


def amplify(delta: torch.Tensor, masks: Sequence[torch.Tensor], factors: Sequence[float]) -> torch.Tensor:
    """δ with band b scaled by ``factors[b]`` and every entry outside the bands dropped (chapter 6)."""
    if len(masks) != len(factors):
        raise ValueError(f"amplify: {len(masks)} bands but {len(factors)} factors")
    scale = torch.zeros(delta.shape, dtype=delta.dtype, device=delta.device)
    for mask, factor in zip(masks, factors):
        scale = torch.where(mask, torch.as_tensor(float(factor), dtype=delta.dtype, device=delta.device), scale)
    return delta * scale


def greedy_factor(score: Callable[[float], float], start: float = 1.0, step: float = 0.1,
                  max_steps: int = 30) -> tuple[float, list[tuple[float, float]]]:
    """DPA's factor search (chapter 6): from ``start``, move by ±``step`` while the score rises
    and stop on a tie, at most ``max_steps`` steps each way (from 1.0: a cap at 4.0). The paper
    says only "rise then fall"; the ±0.1 step is the one described for the authors' code, the
    cap and the tie rule are the book's readings.
    Returns the best factor and every (factor, score) tried."""
    if step <= 0:
        raise ValueError(f"greedy_factor: step must be > 0, got {step}")
    tried = {round(start, 6): score(start)}
    best = round(start, 6)
    for direction in (+1, -1):
        current = best
        for _ in range(max_steps):
            nxt = round(current + direction * step, 6)
            if nxt < 0:
                break
            if nxt not in tried:
                tried[nxt] = score(nxt)
            if tried[nxt] <= tried[current]:
                break
            current = nxt
        if tried[current] > tried[best]:
            best = current
    return best, sorted(tried.items())


def search_method1(score: Callable[[list[float]], float], n_bands: int, **greedy) -> tuple[list[float], list]:
    """Method 1 (chapter 6): tune band 0 alone (later bands dropped), fix it, add band 1 and
    tune only it, and so on. ``score(factors)`` gets one factor per band present."""
    factors, paths = [], []
    for b in range(n_bands):
        best, path = greedy_factor(lambda f, fixed=list(factors): score(fixed + [f]), **greedy)
        factors.append(best)
        paths.append(path)
    return factors, paths


def search_method2(score: Callable[[list[float]], float], n_bands: int, **greedy) -> tuple[list[float], list]:
    """Method 2 (chapter 6): tune band 0 with every later band present at factor 1, then each
    later band in turn with the earlier factors fixed."""
    factors, paths = [1.0] * n_bands, []
    for b in range(n_bands):
        best, path = greedy_factor(lambda f, b=b: score(factors[:b] + [f] + factors[b + 1:]), **greedy)
        factors[b] = best
        paths.append(path)
    return factors, paths


def dp_bands(deltas: Mapping[str, torch.Tensor], levels: Sequence[float], lam: float = LAMBDA,
             n_layer: float = N_SIGNIFICANT, n_linear: float = N_SIGNIFICANT) -> dict[str, list[torch.Tensor]]:
    """DPA's bands under DP's rates (chapter 6): band 0 of a tensor = the entries DP keeps at
    target rate ``levels[0]``, band b = those it adds between ``levels[b-1]`` and ``levels[b]``.
    DP's rate of a tensor is α plus an offset that does not depend on α (unless clipped), so
    the kept sets are nested and the bands disjoint; their union is DP at ``levels[-1]``."""
    per_level = [dp_rates(deltas, level, lam, n_layer, n_linear) for level in _check_levels(levels)]
    return {n: _nested_bands(d, [rates[n] for rates in per_level]) for n, d in deltas.items()}


def dare_bands(deltas: Mapping[str, torch.Tensor], dropped: Mapping[str, torch.Tensor], level: float = 0.9,
               lam: float = LAMBDA) -> dict[str, list[torch.Tensor]]:
    """DARE + DPA's partitions (chapter 6, the paper's Table 3): the entries a DARE-pruned delta
    ``dropped`` kept, split into those DP keeps at ``level`` (band 0, the most significant) and
    the rest (band 1). :func:`amplified` of ``dropped`` with factors below 1 then *reduces*
    DARE's 1/(1 − p) rescale band by band; with factors 1 it gives ``dropped`` back."""
    missing = [n for n in deltas if n not in dropped]
    if missing:
        raise KeyError(f"dare_bands: no DARE-pruned tensor for {missing[:3]}")
    shapes = [n for n in deltas if dropped[n].shape != deltas[n].shape]
    if shapes:
        n = shapes[0]
        raise ValueError(f"dare_bands: {n} is {tuple(deltas[n].shape)} but its DARE-pruned delta "
                         f"{tuple(dropped[n].shape)}")
    significant = dp_bands(deltas, [level], lam)
    return {n: [(dropped[n] != 0) & significant[n][0], (dropped[n] != 0) & ~significant[n][0]] for n in deltas}


def amplified(deltas: Mapping[str, torch.Tensor], masks: Mapping[str, Sequence[torch.Tensor]],
              factors: Sequence[float]) -> dict[str, torch.Tensor]:
    """Every tensor's delta with its bands scaled by ``factors`` (:func:`amplify`); with all
    factors 1 it is the pruned delta of the last band's rate (chapter 6)."""
    return {n: amplify(d, masks[n], factors) for n, d in deltas.items()}


# ------------------------------------------------------------------ DP as a plan (method "dp")

PLAN_OPTIONS = {"alpha": None, "fluctuation": LAMBDA, "n_layer": N_SIGNIFICANT, "n_linear": N_SIGNIFICANT,
                "eq2_mean": "model", "budget": "clip"}  # DP's own options (fluctuation: Eq. 4's λ) and defaults
MERGE_OPTIONS = {"lam", "weights"}  # the merge's: λ scales the summed pruned deltas, weights as Task Arithmetic


def _plan_options(options: Mapping) -> tuple[dict, dict]:
    unknown = sorted(set(options) - set(PLAN_OPTIONS) - MERGE_OPTIONS)
    if unknown:
        raise TypeError(f"dp: unknown option(s) {unknown}; the options are {sorted(set(PLAN_OPTIONS) | MERGE_OPTIONS)}")
    if "alpha" not in options:
        raise TypeError("dp needs alpha (the target pruning rate, in [0, 1))")
    own = {k: options.get(k, default) for k, default in PLAN_OPTIONS.items()}
    _check(own["alpha"], own["fluctuation"], min(own["n_layer"], own["n_linear"]), "dp")
    _check_budget(own["budget"], "dp")
    if own["eq2_mean"] not in EQ2_MEANS:
        raise ValueError(f"dp: eq2_mean must be one of {EQ2_MEANS}, got {own['eq2_mean']!r}")
    return own, {k: options[k] for k in MERGE_OPTIONS if k in options}


def _sum_above(a: torch.Tensor, threshold: float) -> float:
    """Σ of the float32 entries of ``a`` above the float64 ``threshold``, summed in float64: x > t holds
    for a float32 x exactly when x > t rounded down to float32, so no float64 copy of ``a`` is made."""
    t = torch.tensor(threshold, dtype=torch.float32)
    if float(t) > threshold:
        t = torch.nextafter(t, torch.tensor(float("-inf")))
    return float(torch.where(a > t, a, 0.0).sum(dtype=torch.float64))


SIG_CHUNK = 1 << 18  # entries of |δ| computed at a time by the streamed significances (reused buffers)


def _abs_delta_blocks(base: torch.Tensor, experts, buffers):
    """``(expert index, |δ| of one block)`` over a tensor, ``SIG_CHUNK`` entries at a time, in two
    reused float32 buffers: no tensor-sized temporaries (each would cost page faults at 1B parameters)."""
    b = base.reshape(-1)
    for s in range(0, b.numel(), SIG_CHUNK):
        m = min(SIG_CHUNK, b.numel() - s)
        base_block = buffers[0][:m].copy_(b[s:s + m])
        for t, e in enumerate(experts):
            yield t, buffers[1][:m].copy_(e.reshape(-1)[s:s + m]).sub_(base_block).abs_()


def streamed_significances(source, n_layer: float = N_SIGNIFICANT, n_linear: float = N_SIGNIFICANT) -> list[tuple]:
    """Per expert of a :class:`~merging_helpers.tensor_source.TensorSource`: ``(sig per layer, sig per
    linear map)`` in :func:`_structure`'s order, as :func:`significance` computes them on the whole
    blocks, in two passes over the blocks' tensors (the means first, then the outliers' sums; chapter 6)."""
    layers, linears = _structure(source.shapes)
    layer_of = {n: l for l, names in layers.items() for n in names}
    linear_of = {n: k for k, names in linears.items() for n in names}
    experts = range(len(source.expert_names))
    buffers = (torch.empty(SIG_CHUNK), torch.empty(SIG_CHUNK))
    abs_sum = {n: [0.0 for _ in experts] for n in layer_of}
    for name, base, ex in source.triples(list(layer_of)):  # pass 1: Σ|δ| of every tensor
        for t, block in _abs_delta_blocks(base, ex, buffers):
            abs_sum[name][t] += float(block.sum(dtype=torch.float64))

    def means(blocks):
        return {k: [sum(abs_sum[n][t] for n in names) / max(1, sum(math.prod(source.shapes[n]) for n in names))
                    for t in experts] for k, names in blocks.items()}

    layer_mean, linear_mean = means(layers), means(linears)
    sig_l = {l: [0.0 for _ in experts] for l in layers}
    sig_k = {k: [0.0 for _ in experts] for k in linears}
    for name, base, ex in source.triples(list(layer_of)):  # pass 2: Σ|δ| over each block's outliers
        layer, k = layer_of[name], linear_of.get(name)
        for t, block in _abs_delta_blocks(base, ex, buffers):
            sig_l[layer][t] += _sum_above(block, n_layer * layer_mean[layer][t])
            if k is not None:
                sig_k[k][t] += _sum_above(block, n_linear * linear_mean[k][t])
    return [([sig_l[l][t] for l in layers], [sig_k[k][t] for k in linears]) for t in experts]


def plan(n_experts: int, options: Mapping):
    """DP as a method (``merge_state_dicts(..., "dp", alpha=...)`` or ``merge_folders``; chapter 6):
    ``(config, finish)`` as :mod:`merging_helpers.methods` describes. ``finish(source)`` streams
    every expert's significances and returns a magnitude merge (no rescale, Task Arithmetic's sum)
    with each tensor pruned at its own Θ_lj (α outside the blocks)."""
    from .config import MergeConfig
    own, merge = _plan_options(options)
    first = MergeConfig.build("magnitude", n_experts, drop_rate=own["alpha"], **merge)

    def finish(source):
        sizes = {n: math.prod(shape) for n, shape in source.shapes.items()}
        rates = [rates_from_significance(sizes, sig_layers, sig_linears, own["alpha"], own["fluctuation"],
                                         own["eq2_mean"], own["budget"])
                 for sig_layers, sig_linears in streamed_significances(source, own["n_layer"], own["n_linear"])]
        return MergeConfig.build("magnitude", n_experts, drop_rate=rates, rate_level="tensor",
                                 rate_default=own["alpha"], **merge)
    return first, finish
