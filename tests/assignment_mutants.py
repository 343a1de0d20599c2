"""Answers to the course assignments that the hidden tests must tell apart (tests/test_assignments.py).

For every auto-graded question: realistic *wrong* answers (each must fail one of the question's
tests, public or hidden, with a readable AssertionError) and a correct *alternative* (another
order of summation, another idiom; it must pass every test). They live here, not in the student
copies. Each is the source of the answer cell as a student might write it: plain torch.
"""

A1 = {
    "q1_task_vector": {
        "wrong": {
            "base minus expert": """
def task_vector(base, expert):
    return {n: base[n].float() - expert[n].float() for n, t in base.items() if t.is_floating_point()}
""",
            "integer buffers kept": """
def task_vector(base, expert):
    return {n: (expert[n] - base[n]).float() for n in base}
""",
            "the expert modified in place": """
def task_vector(base, expert):
    return {n: expert[n].sub_(t).float() for n, t in base.items() if t.is_floating_point()}
""",
        },
        "alternative": """
def task_vector(base, expert):
    out = {}
    for name in base:
        if torch.is_floating_point(base[name]):
            out[name] = torch.sub(expert[name], base[name]).to(torch.float32)
    return out
""",
    },
    "q2_task_arithmetic": {
        "wrong": {
            "the weighted mean, not the weighted sum": """
def task_arithmetic(base, vectors, lams):
    if len(lams) != len(vectors):
        raise ValueError("lams")
    return {n: (t.float() + sum(l * v[n] for l, v in zip(lams, vectors)) / len(vectors)).to(t.dtype)
            if n in vectors[0] else t.clone() for n, t in base.items()}
""",
            "the first λ for every vector": """
def task_arithmetic(base, vectors, lams):
    if len(lams) != len(vectors):
        raise ValueError("lams")
    return {n: (t.float() + lams[0] * sum(v[n] for v in vectors)).to(t.dtype) if n in vectors[0] else t.clone()
            for n, t in base.items()}
""",
            "buffers the vectors lack are left out": """
def task_arithmetic(base, vectors, lams):
    if len(lams) != len(vectors):
        raise ValueError("lams")
    return {n: (base[n].float() + sum(l * v[n] for l, v in zip(lams, vectors))).to(base[n].dtype) for n in vectors[0]}
""",
            "the base modified in place": """
def task_arithmetic(base, vectors, lams):
    if len(lams) != len(vectors):
        raise ValueError("lams")
    for n in vectors[0]:
        base[n] += sum(l * v[n] for l, v in zip(lams, vectors))
    return dict(base)
""",
            "zip stops at the shorter list (no ValueError)": """
def task_arithmetic(base, vectors, lams):
    return {n: (t.float() + sum(l * v[n] for l, v in zip(lams, vectors))).to(t.dtype) if n in vectors[0]
            else t.clone() for n, t in base.items()}
""",
        },
        "alternative": """
def task_arithmetic(base, vectors, lams):
    if len(vectors) != len(lams):
        raise ValueError(f"lams has {len(lams)} entries for {len(vectors)} vectors")
    merged = {n: t.clone() for n, t in base.items()}
    for lam, v in reversed(list(zip(lams, vectors))):
        for n, d in v.items():
            merged[n] = (merged[n].double() + lam * d.double()).to(base[n].dtype)
    return merged
""",
    },
    "q3_choose_lambda": {
        "wrong": {
            "ties go to the first λ of the grid": """
def choose_lambda(evaluator, base, vectors, grid):
    scores = {}
    for lam in grid:
        acc = evaluator.accuracy(task_arithmetic(base, vectors, [lam] * len(vectors)), "validation")
        scores[lam] = sum(acc.values()) / len(acc)
    return max(scores, key=scores.get), scores
""",
            "chosen on the test split": """
def choose_lambda(evaluator, base, vectors, grid):
    scores = {}
    for lam in grid:
        acc = evaluator.accuracy(task_arithmetic(base, vectors, [lam] * len(vectors)), "test")
        scores[lam] = sum(acc.values()) / len(acc)
    best = max(scores.values())
    return min(lam for lam in scores if scores[lam] == best), scores
""",
            "the sum over tasks reported as the score": """
def choose_lambda(evaluator, base, vectors, grid):
    scores = {lam: sum(evaluator.accuracy(task_arithmetic(base, vectors, [lam] * len(vectors)), "validation").values()) for lam in grid}
    best = max(scores.values())
    return min(lam for lam in scores if scores[lam] == best), scores
""",
        },
        "alternative": """
import statistics
def choose_lambda(evaluator, base, vectors, grid):
    scores = {lam: statistics.fmean(evaluator.accuracy(task_arithmetic(base, vectors, [lam] * len(vectors)), "validation").values())
              for lam in grid}
    best = None
    for lam in sorted(grid):
        if best is None or scores[lam] > scores[best]:
            best = lam
    return best, scores
""",
    },
}

A2 = {
    "q1_dare": {
        "wrong": {
            "DARE's 1 / (1 − p), not n / (n − k)": """
def dare(delta, p, generator):
    n = delta.numel()
    k = round(p * n)
    if not 0 <= p < 1 or k >= n:
        raise ValueError(f"p = {p}")
    out = delta.reshape(-1) / (1 - p)
    out[torch.randperm(n, generator=generator)[:k]] = 0
    return out.reshape(delta.shape)
""",
            "the k smallest entries dropped, not k at random": """
def dare(delta, p, generator):
    n = delta.numel()
    k = round(p * n)
    if not 0 <= p < 1 or k >= n:
        raise ValueError(f"p = {p}")
    out = delta.reshape(-1) * (n / (n - k))
    out[delta.reshape(-1).abs().argsort()[:k]] = 0
    return out.reshape(delta.shape)
""",
            "independent drops (the chapter's DARE)": """
def dare(delta, p, generator):
    if not 0 <= p < 1:
        raise ValueError(f"p = {p}")
    keep = torch.rand(delta.shape, generator=generator) >= p
    return torch.where(keep, delta / (1 - p), torch.zeros_like(delta))
""",
            "the generator ignored": """
def dare(delta, p, generator):
    n = delta.numel()
    k = round(p * n)
    if not 0 <= p < 1 or k >= n:
        raise ValueError(f"p = {p}")
    out = delta.reshape(-1) * (n / (n - k))
    out[torch.randperm(n)[:k]] = 0
    return out.reshape(delta.shape)
""",
        },
        # the dropped positions from sorting uniform numbers, not from randperm
        "alternative": """
def dare(delta, p, generator):
    n = delta.numel()
    k = int(round(p * n))
    if p < 0 or p >= 1 or n - k <= 0:
        raise ValueError(f"dare: bad p = {p}")
    order = torch.argsort(torch.rand(n, generator=generator))
    keep = torch.ones(n, dtype=torch.bool)
    keep[order[:k]] = False
    flat = delta.flatten()
    return torch.where(keep.to(delta.device), flat * n / (n - k), torch.zeros_like(flat)).view(delta.shape)
""",
    },
    "q2_dare_merge": {
        "wrong": {
            "divided by 1 − p a second time": """
def dare_merge(base, vectors, p, lam, seed):
    generator = torch.Generator().manual_seed(seed)
    merged = {}
    for name, tensor in base.items():
        if name in vectors[0]:
            total = sum(dare(v[name], p, generator) for v in vectors) / (1 - p)
            merged[name] = (tensor.float() + lam * total).to(tensor.dtype)
        else:
            merged[name] = tensor.clone()
    return merged
""",
            "a new generator for every tensor": """
def dare_merge(base, vectors, p, lam, seed):
    merged = {}
    for name, tensor in base.items():
        if name in vectors[0]:
            generator = torch.Generator().manual_seed(seed)
            total = sum(dare(v[name], p, generator) for v in vectors)
            merged[name] = (tensor.float() + lam * total).to(tensor.dtype)
        else:
            merged[name] = tensor.clone()
    return merged
""",
            "the dropped task vectors averaged": """
def dare_merge(base, vectors, p, lam, seed):
    generator = torch.Generator().manual_seed(seed)
    merged = {}
    for name, tensor in base.items():
        if name in vectors[0]:
            total = sum(dare(v[name], p, generator) for v in vectors) / len(vectors)
            merged[name] = (tensor.float() + lam * total).to(tensor.dtype)
        else:
            merged[name] = tensor.clone()
    return merged
""",
        },
        "alternative": """
def dare_merge(base, vectors, p, lam, seed):
    generator = torch.Generator().manual_seed(seed)
    merged = dict(base)
    for name in base:
        if name in vectors[0]:
            dropped = torch.stack([dare(v[name], p, generator) for v in vectors])
            merged[name] = (base[name].double() + lam * dropped.double().sum(0)).to(base[name].dtype)
    return merged
""",
    },
}

A3 = {
    "q1_trim": {
        "wrong": {
            "the smallest entries kept": """
def trim(delta, density):
    if not 0 < density <= 1:
        raise ValueError("density")
    k = round(density * delta.numel())
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs(), stable=True)[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(delta.shape)
""",
            "each row trimmed on its own": """
def trim(delta, density):
    if not 0 < density <= 1:
        raise ValueError("density")
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(1, -1)
    k = max(1, round(density * rows.shape[1]))
    threshold = rows.abs().topk(k, dim=1).values[:, -1:]
    return torch.where(rows.abs() >= threshold, rows, torch.zeros_like(rows)).reshape(delta.shape)
""",
            "k rounded down": """
def trim(delta, density):
    if not 0 < density <= 1:
        raise ValueError("density")
    k = int(density * delta.numel())
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs(), descending=True, stable=True)[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(delta.shape)
""",
        },
        # topk instead of a stable sort: the tests' deltas have no ties at the threshold
        "alternative": """
def trim(delta, density):
    if density <= 0 or density > 1:
        raise ValueError(f"density = {density}")
    flat = delta.flatten()
    out = torch.zeros_like(flat)
    index = flat.abs().topk(round(density * flat.numel())).indices
    out[index] = flat[index]
    return out.view_as(delta)
""",
    },
    "q2_elect_sign": {
        "wrong": {
            "the mass election (the chapter's)": """
def elect_sign(deltas):
    total = torch.stack(list(deltas)).sum(dim=0)
    return torch.where(total >= 0, 1.0, -1.0)
""",
            "a tied vote elects 0": """
def elect_sign(deltas):
    return torch.stack(list(deltas)).sign().sum(dim=0).sign()
""",
            "a zero delta counted as a vote for +": """
def elect_sign(deltas):
    stacked = torch.stack(list(deltas))
    votes = (stacked >= 0).sum(dim=0) - (stacked < 0).sum(dim=0)
    return torch.where(votes >= 0, 1.0, -1.0)
""",
        },
        "alternative": """
def elect_sign(deltas):
    positive = sum((d > 0).int() for d in deltas)
    negative = sum((d < 0).int() for d in deltas)
    return (positive >= negative).float() * 2 - 1
""",
    },
    "q3_disjoint_merge": {
        "wrong": {
            "divided by the number of experts": """
def disjoint_merge(deltas, signs):
    stacked = torch.stack(list(deltas))
    agree = stacked.sign() == signs
    return (stacked * agree).sum(dim=0) / len(deltas)
""",
            "the agreeing deltas summed": """
def disjoint_merge(deltas, signs):
    stacked = torch.stack(list(deltas))
    return (stacked * (stacked.sign() == signs)).sum(dim=0)
""",
        },
        "alternative": """
def disjoint_merge(deltas, signs):
    stacked = torch.stack(list(deltas))
    agree = (stacked * signs) > 0
    total = torch.where(agree, stacked, 0.0).sum(0)
    count = agree.sum(0)
    out = torch.zeros_like(total)
    out[count > 0] = total[count > 0] / count[count > 0]
    return out
""",
    },
    "q4_ties_merge": {
        "wrong": {
            "signs elected before the trim": """
def ties_merge(base, vectors, density, lam):
    merged = {}
    for name, tensor in base.items():
        if name in vectors[0]:
            signs = elect_sign([v[name] for v in vectors])
            trimmed = [trim(v[name], density) for v in vectors]
            merged[name] = (tensor.float() + lam * disjoint_merge(trimmed, signs)).to(tensor.dtype)
        else:
            merged[name] = tensor.clone()
    return merged
""",
            "no trim": """
def ties_merge(base, vectors, density, lam):
    merged = {}
    for name, tensor in base.items():
        if name in vectors[0]:
            ds = [v[name] for v in vectors]
            merged[name] = (tensor.float() + lam * disjoint_merge(ds, elect_sign(ds))).to(tensor.dtype)
        else:
            merged[name] = tensor.clone()
    return merged
""",
        },
        "alternative": """
def ties_merge(base, vectors, density, lam):
    out = {name: tensor.clone() for name, tensor in base.items()}
    for name in vectors[0]:
        trimmed = [trim(v[name], density) for v in vectors]
        update = disjoint_merge(trimmed, elect_sign(trimmed))
        out[name] = (base[name].double() + lam * update.double()).to(base[name].dtype)
    return out
""",
    },
}

A4 = {
    "q1_keep_probability": {
        "wrong": {
            "the largest entry kept least": """
def magprune_keep_prob(delta, density, epsilon):
    if not (epsilon >= 0 and density - epsilon > 0 and density + epsilon <= 1):
        raise ValueError("epsilon")
    rows = delta.abs().reshape(delta.shape[0] if delta.dim() > 1 else 1, -1)
    n = rows.shape[1]
    ranks = rows.argsort(dim=1, descending=True, stable=True).argsort(dim=1).to(rows.dtype)
    return ((density - epsilon) + 2 * epsilon * ranks / (n - 1)).reshape(delta.shape)
""",
            "ranked over the whole tensor, not per row": """
def magprune_keep_prob(delta, density, epsilon):
    if not (epsilon >= 0 and density - epsilon > 0 and density + epsilon <= 1):
        raise ValueError("epsilon")
    flat = delta.abs().reshape(-1)
    n = flat.numel()
    ranks = flat.argsort(stable=True).argsort().to(flat.dtype)
    return ((density - epsilon) + 2 * epsilon * ranks / (n - 1)).reshape(delta.shape)
""",
            "ranks divided by n, not n − 1": """
def magprune_keep_prob(delta, density, epsilon):
    if not (epsilon >= 0 and density - epsilon > 0 and density + epsilon <= 1):
        raise ValueError("epsilon")
    rows = delta.abs().reshape(delta.shape[0] if delta.dim() > 1 else 1, -1)
    n = rows.shape[1]
    ranks = rows.argsort(dim=1, stable=True).argsort(dim=1).to(rows.dtype)
    return ((density - epsilon) + 2 * epsilon * ranks / n).reshape(delta.shape)
""",
        },
        "alternative": """
def magprune_keep_prob(delta, density, epsilon):
    if epsilon < 0 or density - epsilon <= 0 or density + epsilon > 1:
        raise ValueError(f"epsilon = {epsilon}")
    rows = delta.abs().reshape(-1, delta.shape[-1]) if delta.dim() > 1 else delta.abs().reshape(1, -1)
    if delta.dim() > 2:
        rows = delta.abs().reshape(delta.shape[0], -1)
    n = rows.shape[1]
    ranks = torch.stack([torch.argsort(torch.argsort(r, stable=True)) for r in rows]).double()
    low, high = density - epsilon, density + epsilon
    return (low + (high - low) * ranks / max(n - 1, 1)).to(delta.dtype).reshape(delta.shape)
""",
    },
    "q2_magprune": {
        "wrong": {
            "survivors divided by the density": """
def magprune(delta, density, epsilon, generator):
    prob = magprune_keep_prob(delta, density, epsilon)
    keep = torch.rand(delta.shape, generator=generator) < prob
    return torch.where(keep, delta / density, torch.zeros_like(delta))
""",
            "kept where the draw is above p": """
def magprune(delta, density, epsilon, generator):
    prob = magprune_keep_prob(delta, density, epsilon)
    keep = torch.rand(delta.shape, generator=generator) > prob
    return torch.where(keep, delta / prob, torch.zeros_like(delta))
""",
        },
        "alternative": """
def magprune(delta, density, epsilon, generator):
    prob = magprune_keep_prob(delta, density, epsilon)
    mask = torch.bernoulli(prob, generator=generator)
    return delta * mask / prob
""",
    },
    "q3_compare": {
        "wrong": {
            "λ chosen on the test split": """
from merging_helpers import deltas
from merging_helpers.consensus import disjoint_merge, elect_sign
from merging_helpers.recipes import merge_state_dicts
def compare_at_density(evaluator, zoo, density, grid, epsilon=0.1, seed=0):
    vectors = deltas.task_vectors(zoo.base, zoo.experts)
    at_1 = {"ties": merge_state_dicts(zoo.base, zoo.experts, "ties", density=density, lam=1.0, progress=False),
            "della": della_merge(zoo.base, vectors, density, epsilon, 1.0, seed)}
    mean = lambda scores: sum(scores.values()) / len(scores)
    out = {}
    for method, merged in at_1.items():
        delta = deltas.task_vector(zoo.base, merged)
        test = {lam: mean(evaluator.accuracy(deltas.apply_delta(zoo.base, delta, lam), "test")) for lam in grid}
        best = max(test, key=test.get)
        out[method] = (best, test[best])
    return out
""",
            "the validation mean reported as the test mean": """
from merging_helpers import deltas
from merging_helpers.consensus import disjoint_merge, elect_sign
from merging_helpers.recipes import merge_state_dicts
def compare_at_density(evaluator, zoo, density, grid, epsilon=0.1, seed=0):
    vectors = deltas.task_vectors(zoo.base, zoo.experts)
    at_1 = {"ties": merge_state_dicts(zoo.base, zoo.experts, "ties", density=density, lam=1.0, progress=False),
            "della": della_merge(zoo.base, vectors, density, epsilon, 1.0, seed)}
    mean = lambda scores: sum(scores.values()) / len(scores)
    out = {}
    for method, merged in at_1.items():
        delta = deltas.task_vector(zoo.base, merged)
        validation = {lam: mean(evaluator.accuracy(deltas.apply_delta(zoo.base, delta, lam), "validation"))
                      for lam in grid}
        best = min(lam for lam, s in validation.items() if s == max(validation.values()))
        out[method] = (best, validation[best])
    return out
""",
        },
        # the λ chosen by a sorted scan with a strict >, the means by statistics.fmean
        "alternative": """
import statistics
from merging_helpers import deltas
from merging_helpers.consensus import disjoint_merge, elect_sign
from merging_helpers.recipes import merge_state_dicts
def compare_at_density(evaluator, zoo, density, grid, epsilon=0.1, seed=0):
    vectors = deltas.task_vectors(zoo.base, zoo.experts)
    merged = {"ties": merge_state_dicts(zoo.base, zoo.experts, "ties", density=density, lam=1.0, progress=False),
              "della": della_merge(zoo.base, vectors, density, epsilon, 1.0, seed)}
    out = {}
    for method in ("ties", "della"):
        delta = deltas.task_vector(zoo.base, merged[method])
        best, best_score = None, -1.0
        for lam in sorted(grid):
            score = statistics.fmean(evaluator.accuracy(deltas.apply_delta(zoo.base, delta, lam), "validation").values())
            if score > best_score:
                best, best_score = lam, score
        out[method] = (best, statistics.fmean(evaluator.accuracy(deltas.apply_delta(zoo.base, delta, best), "test").values()))
    return out
""",
    },
}

A5 = {
    "q1_matrix_rms": {
        "wrong": {
            "the slide's ‖δ‖_F / N": """
def matrix_rms(delta):
    return float(delta.double().norm() / delta.numel())
""",
            "the mean |δ|": """
def matrix_rms(delta):
    return float(delta.double().abs().mean())
""",
        },
        "alternative": """
import math
def matrix_rms(delta):
    return math.sqrt(float(delta.double().square().mean()))
""",
    },
    "q2_cv": {
        "wrong": {
            "the population σ": """
def cv_percent(table):
    averages = torch.tensor([sum(v.values()) / len(v) for v in table.values()], dtype=torch.float64)
    return float(averages.std(unbiased=False) / averages.mean() * 100)
""",
            "over every matrix, not the experts' averages": """
def cv_percent(table):
    values = torch.tensor([x for v in table.values() for x in v.values()], dtype=torch.float64)
    return float(values.std() / values.mean() * 100)
""",
        },
        "alternative": """
import math
def cv_percent(table):
    averages = [sum(v.values()) / len(v) for v in table.values()]
    mu = sum(averages) / len(averages)
    sigma = math.sqrt(sum((a - mu) ** 2 for a in averages) / (len(averages) - 1))
    return 100 * sigma / mu
""",
    },
    "q3_rates": {
        "wrong": {
            "λ read raw (no 1/σ)": """
from merging_helpers.partitions import describe
def adaptive_rates(table, p_default, lam, cv_threshold=50.0):
    own = cv_percent(table) > cv_threshold
    role = {n: describe(n).role for v in table.values() for n in v}
    rates = {}
    for t, values in table.items():
        source = values.items() if own else [(n, x) for v in table.values() for n, x in v.items()]
        groups = {}
        for n, x in source:
            groups.setdefault(role[n], []).append(x)
        means = {r: sum(v) / len(v) for r, v in groups.items()}
        rates[t] = {n: min(max(p_default - lam * (x - means[role[n]]), 0.0), 0.99) for n, x in values.items()}
    return rates
""",
            "always the global mean": """
from merging_helpers.partitions import describe
def adaptive_rates(table, p_default, lam, cv_threshold=50.0):
    role = {n: describe(n).role for v in table.values() for n in v}
    groups = {}
    for v in table.values():
        for n, x in v.items():
            groups.setdefault(role[n], []).append(x)
    means = {r: sum(v) / len(v) for r, v in groups.items()}
    sigma = {r: torch.tensor(v, dtype=torch.float64).std(unbiased=False).item() for r, v in groups.items()}
    return {t: {n: min(max(p_default - lam * (x - means[role[n]]) / sigma[role[n]], 0.0), 0.99)
                for n, x in values.items()} for t, values in table.items()}
""",
            "one σ over both roles": """
from merging_helpers.partitions import describe
def adaptive_rates(table, p_default, lam, cv_threshold=50.0):
    own = cv_percent(table) > cv_threshold
    role = {n: describe(n).role for v in table.values() for n in v}
    sigma = torch.tensor([x for v in table.values() for x in v.values()], dtype=torch.float64).std(unbiased=False).item()
    rates = {}
    for t, values in table.items():
        source = values.items() if own else [(n, x) for v in table.values() for n, x in v.items()]
        groups = {}
        for n, x in source:
            groups.setdefault(role[n], []).append(x)
        means = {r: sum(v) / len(v) for r, v in groups.items()}
        rates[t] = {n: min(max(p_default - lam * (x - means[role[n]]) / sigma, 0.0), 0.99) for n, x in values.items()}
    return rates
""",
        },
        "alternative": """
import statistics
from merging_helpers.partitions import describe
def adaptive_rates(table, p_default, lam, cv_threshold=50.0):
    roles = {n: describe(n).role for v in table.values() for n in v}
    everyone = [(n, x) for v in table.values() for n, x in v.items()]
    sigma = {r: statistics.pstdev([x for n, x in everyone if roles[n] == r]) for r in set(roles.values())}
    own = cv_percent(table) > cv_threshold
    rates = {}
    for t, values in table.items():
        pool = list(values.items()) if own else everyone
        mean = {r: statistics.fmean([x for n, x in pool if roles[n] == r]) for r in set(roles.values())
                if any(roles[n] == r for n, _ in pool)}
        rates[t] = {}
        for n, x in values.items():
            s = sigma[roles[n]]
            p = p_default - (lam * (x - mean[roles[n]]) / s if s else 0.0)
            rates[t][n] = 0.0 if p < 0 else 0.99 if p > 0.99 else p
    return rates
""",
    },
}

A6 = {
    "q1_significance": {
        "wrong": {
            "the mean of the outliers, not their sum": """
def significance(tensors, n=5.0):
    values = torch.cat([t.abs().flatten().double() for t in tensors])
    return float(values[values > n * values.mean()].mean())
""",
            "the threshold from the signed mean": """
def significance(tensors, n=5.0):
    signed = torch.cat([t.flatten().double() for t in tensors])
    return float(signed.abs()[signed.abs() > n * signed.mean()].sum())
""",
        },
        "alternative": """
def significance(tensors, n=5.0):
    total, count = 0.0, 0
    for t in tensors:
        total, count = total + float(t.double().abs().sum()), count + t.numel()
    if count == 0:
        return 0.0
    threshold = n * total / count
    return sum(float(torch.where(t.double().abs() > threshold, t.double().abs(), 0.0).sum()) for t in tensors)
""",
    },
    "q2_theta": {
        "wrong": {
            "an unweighted mean within the layer": """
def theta(layer_sig, linear_sig, sizes, alpha, lam=0.08):
    layer_sig, linear_sig = torch.as_tensor(layer_sig).double(), torch.as_tensor(linear_sig).double()
    norm = lambda x: x * lam / x.abs().max() if float(x.abs().max()) else torch.zeros_like(x)
    dif = -layer_sig + layer_sig.mean()
    dif_linear = -linear_sig + linear_sig.mean(dim=1, keepdim=True)
    return alpha + norm(dif)[:, None] + norm(dif_linear)
""",
            "the signs of dif flipped": """
def theta(layer_sig, linear_sig, sizes, alpha, lam=0.08):
    layer_sig, linear_sig, sizes = (torch.as_tensor(x).double() for x in (layer_sig, linear_sig, sizes))
    norm = lambda x: x * lam / x.abs().max() if float(x.abs().max()) else torch.zeros_like(x)
    dif = layer_sig - layer_sig.mean()
    weighted = (linear_sig * sizes).sum(dim=1, keepdim=True) / sizes.sum(dim=1, keepdim=True)
    return alpha + norm(dif)[:, None] + norm(linear_sig - weighted)
""",
            "dif' normalised within each layer": """
def theta(layer_sig, linear_sig, sizes, alpha, lam=0.08):
    layer_sig, linear_sig, sizes = (torch.as_tensor(x).double() for x in (layer_sig, linear_sig, sizes))
    norm = lambda x: x * lam / x.abs().max() if float(x.abs().max()) else torch.zeros_like(x)
    dif = -layer_sig + layer_sig.mean()
    weighted = (linear_sig * sizes).sum(dim=1, keepdim=True) / sizes.sum(dim=1, keepdim=True)
    return alpha + norm(dif)[:, None] + torch.stack([norm(row) for row in (weighted - linear_sig)])
""",
        },
        "alternative": """
def theta(layer_sig, linear_sig, sizes, alpha, lam=0.08):
    s_l = torch.as_tensor(layer_sig, dtype=torch.float64)
    s_lj = torch.as_tensor(linear_sig, dtype=torch.float64)
    n_lj = torch.as_tensor(sizes, dtype=torch.float64)
    dif = s_l.mean() - s_l
    dif_j = torch.einsum("lj,lj->l", s_lj, n_lj)[:, None] / n_lj.sum(1, keepdim=True) - s_lj
    scaled = [torch.zeros_like(x) if x.abs().max() == 0 else lam * x / x.abs().max() for x in (dif, dif_j)]
    return alpha + scaled[0].unsqueeze(1) + scaled[1]
""",
    },
}

A7 = {
    "q1_layer_partitions": {
        "wrong": {
            "integer keys, not 'layer.l'": """
from merging_helpers.partitions import describe
def layer_partitions(names):
    out = {}
    for name in names:
        if describe(name).layer is not None:
            out.setdefault(describe(name).layer, []).append(name)
    return dict(sorted(out.items()))
""",
            "names outside the blocks put in a partition": """
from merging_helpers.partitions import describe
def layer_partitions(names):
    out = {}
    for name in names:
        layer = describe(name).layer
        out.setdefault(f"layer.{layer if layer is not None else 0}", []).append(name)
    return dict(sorted(out.items()))
""",
        },
        "alternative": """
import re
def layer_partitions(names):
    found = {}
    for name in names:
        match = re.match(r"encoder\\.layer\\.(\\d+)\\.", name)
        if match:
            found.setdefault(int(match.group(1)), []).append(name)
    return {f"layer.{l}": found[l] for l in sorted(found)}
""",
    },
    "q2_trace_layers": {
        "wrong": {
            "keep ignored (the layer always reverted)": """
def trace_layers(evaluator, base, expert, task, examples, keep=0.0):
    clean = evaluator.true_label_probability(expert, task, examples)
    out = {}
    for key, names in layer_partitions(list(expert)).items():
        corrupted = {**expert, **{n: base[n] for n in names}}
        out[key] = evaluator.true_label_probability(corrupted, task, examples) - clean
    return out
""",
            "θ_b + (1 − keep) Δ": """
def trace_layers(evaluator, base, expert, task, examples, keep=0.0):
    clean = evaluator.true_label_probability(expert, task, examples)
    out = {}
    for key, names in layer_partitions(list(expert)).items():
        corrupted = {**expert, **{n: base[n] + (1 - keep) * (expert[n] - base[n]) for n in names}}
        out[key] = evaluator.true_label_probability(corrupted, task, examples) - clean
    return out
""",
            "P − P* (the sign flipped)": """
def trace_layers(evaluator, base, expert, task, examples, keep=0.0):
    clean = evaluator.true_label_probability(expert, task, examples)
    out = {}
    for key, names in layer_partitions(list(expert)).items():
        corrupted = {**expert, **{n: base[n] + keep * (expert[n] - base[n]) for n in names}}
        out[key] = clean - evaluator.true_label_probability(corrupted, task, examples)
    return out
""",
            "the expert modified in place": """
def trace_layers(evaluator, base, expert, task, examples, keep=0.0):
    clean = evaluator.true_label_probability(expert, task, examples)
    out = {}
    for key, names in layer_partitions(list(expert)).items():
        for n in names:
            expert[n] = base[n] + keep * (expert[n] - base[n])
        out[key] = evaluator.true_label_probability(expert, task, examples) - clean
    return out
""",
        },
        "alternative": """
def trace_layers(evaluator, base, expert, task, examples, keep=0.0):
    work = dict(expert)
    clean = evaluator.true_label_probability(work, task, examples)
    out = {}
    for key, names in layer_partitions(list(expert)).items():
        saved = {n: work[n] for n in names}
        work.update({n: torch.lerp(base[n].float(), expert[n].float(), keep) for n in names})
        out[key] = evaluator.true_label_probability(work, task, examples) - clean
        work.update(saved)
    return out
""",
    },
}

A8 = {
    "q1_gradient_importance": {
        "wrong": {
            "|Σ Δ g| without the minus": """
def gradient_importance(evaluator, base, expert, task, examples, layers):
    g = evaluator.loss_gradient(expert, task, examples)
    return {k: abs(sum(float(((expert[n].double() - base[n].double()) * g[n].double()).sum()) for n in names))
            for k, names in layers.items()}
""",
            "Σ |Δ g| (the absolute value inside the sum)": """
def gradient_importance(evaluator, base, expert, task, examples, layers):
    g = evaluator.loss_gradient(expert, task, examples)
    return {k: -sum(float(((expert[n].double() - base[n].double()) * g[n].double()).abs().sum()) for n in names)
            for k, names in layers.items()}
""",
            "the gradient at the base (the chapter's expansion)": """
def gradient_importance(evaluator, base, expert, task, examples, layers):
    g = evaluator.loss_gradient(base, task, examples)
    return {k: -abs(sum(float(((expert[n].double() - base[n].double()) * g[n].double()).sum()) for n in names))
            for k, names in layers.items()}
""",
        },
        "alternative": """
def gradient_importance(evaluator, base, expert, task, examples, layers):
    g = evaluator.loss_gradient(expert, task, examples)
    out = {}
    for key in layers:
        flat_delta = torch.cat([(expert[n].double() - base[n].double()).flatten() for n in layers[key]])
        flat_grad = torch.cat([g[n].double().cpu().flatten() for n in layers[key]])
        out[key] = -float(torch.dot(flat_delta, flat_grad).abs())
    return out
""",
    },
    "q2_taylor_check": {
        "wrong": {
            "the prediction without the minus": """
def taylor_check(evaluator, base, expert, task, examples, names, t):
    g = evaluator.loss_gradient(expert, task, examples)
    delta = {n: expert[n].float() - base[n].float() for n in names}
    predicted = t * sum(float((delta[n].double() * g[n].double()).sum()) for n in names)
    moved = {**expert, **{n: expert[n] - t * delta[n] for n in names}}
    with torch.no_grad():
        actual = float(evaluator.loss(evaluator.params(moved), task, examples)
                       - evaluator.loss(evaluator.params(expert), task, examples))
    return predicted, actual
""",
            "the chapter's expansion at the base": """
def taylor_check(evaluator, base, expert, task, examples, names, t):
    g = evaluator.loss_gradient(base, task, examples)
    delta = {n: expert[n].float() - base[n].float() for n in names}
    predicted = t * sum(float((delta[n].double() * g[n].double()).sum()) for n in names)
    moved = {**base, **{n: base[n] + t * delta[n] for n in names}}
    with torch.no_grad():
        actual = float(evaluator.loss(evaluator.params(moved), task, examples)
                       - evaluator.loss(evaluator.params(base), task, examples))
    return predicted, actual
""",
            "every tensor moved, not only names": """
def taylor_check(evaluator, base, expert, task, examples, names, t):
    g = evaluator.loss_gradient(expert, task, examples)
    delta = {n: expert[n].float() - base[n].float() for n in expert if expert[n].is_floating_point()}
    predicted = -t * sum(float((delta[n].double() * g[n].double()).sum()) for n in names)
    moved = {**expert, **{n: expert[n] - t * d for n, d in delta.items()}}
    with torch.no_grad():
        actual = float(evaluator.loss(evaluator.params(moved), task, examples)
                       - evaluator.loss(evaluator.params(expert), task, examples))
    return predicted, actual
""",
        },
        "alternative": """
def taylor_check(evaluator, base, expert, task, examples, names, t):
    g = evaluator.loss_gradient(expert, task, examples)
    predicted = 0.0
    moved = dict(expert)
    for n in names:
        step = t * (expert[n].double() - base[n].double())
        predicted -= float(torch.sum(step * g[n].double().cpu()))
        moved[n] = (expert[n].double() - step).to(expert[n].dtype)
    with torch.no_grad():
        before = evaluator.loss(evaluator.params(expert), task, examples)
        after = evaluator.loss(evaluator.params(moved), task, examples)
    return predicted, float(after - before)
""",
    },
}

MUTANTS = {"a1_task_arithmetic": A1, "a2_dare": A2, "a3_ties": A3, "a4_magprune": A4, "a5_rms_rates": A5,
           "a6_dppa_rates": A6, "a7_apl_tracing": A7, "a8_gradient_importance": A8}

# The other rules an offering may draw (make_masters.VARIANTS' *_RULE tokens): (assignment, token, rule)
# → the answers of the questions whose specification that rule changes; the other questions keep theirs.
A2_ROW = {
    "q1_dare": {
        "wrong": {
            "the count over the whole tensor, not per row": """
def dare(delta, p, generator):
    n = delta.numel()
    k = round(p * n)
    if not 0 <= p < 1 or k >= n:
        raise ValueError(f"p = {p}")
    out = delta.reshape(-1) * (n / (n - k))
    out[torch.randperm(n, generator=generator)[:k]] = 0
    return out.reshape(delta.shape)
""",
            "DARE's 1 / (1 − p), not c / (c − k)": """
def dare(delta, p, generator):
    c = delta.shape[-1]
    k = round(p * c)
    if not 0 <= p < 1 or k >= c:
        raise ValueError(f"p = {p}")
    rows = delta.reshape(-1, c)
    ranks = torch.rand(rows.shape, generator=generator).argsort(dim=1)
    return torch.where(ranks < k, 0.0, rows / (1 - p)).reshape(delta.shape)
""",
            "per column (the first dimension), not per row": """
def dare(delta, p, generator):
    c = delta.shape[0]
    k = round(p * c)
    if not 0 <= p < 1 or k >= c:
        raise ValueError(f"p = {p}")
    columns = delta.reshape(c, -1)
    ranks = torch.rand(columns.shape, generator=generator).argsort(dim=0)
    return torch.where(ranks < k, 0.0, columns * (c / (c - k))).reshape(delta.shape)
""",
        },
        # a randperm per row, in a loop
        "alternative": """
def dare(delta, p, generator):
    c = delta.shape[-1]
    k = int(round(p * c))
    if p < 0 or p >= 1 or k == c:
        raise ValueError(f"dare: bad p = {p}")
    out = delta.clone().reshape(-1, c) * c / (c - k)
    for row in out:
        row[torch.randperm(c, generator=generator)[:k].to(delta.device)] = 0
    return out.reshape(delta.shape)
""",
    },
}

A3_MAX = {
    "q2_elect_sign": {
        "wrong": {
            "the largest signed value, not the largest magnitude": """
def elect_sign(deltas):
    return torch.where(torch.stack(deltas).max(dim=0).values < 0, -1.0, 1.0)
""",
            "the mass election (the chapter's)": """
def elect_sign(deltas):
    return torch.where(sum(deltas) < 0, -1.0, 1.0)
""",
            "0 where every delta is 0": """
def elect_sign(deltas):
    stacked = torch.stack(deltas)
    return stacked.gather(0, stacked.abs().argmax(dim=0, keepdim=True))[0].sign()
""",
            "the last expert among equal magnitudes": """
def elect_sign(deltas):
    stacked = torch.stack(deltas).flip(0)
    return torch.where(stacked.gather(0, stacked.abs().argmax(dim=0, keepdim=True))[0] < 0, -1.0, 1.0)
""",
        },
        # a running maximum over the experts, strict > so the first among equals stays
        "alternative": """
def elect_sign(deltas):
    best = torch.zeros_like(deltas[0])
    for d in deltas:
        best = torch.where(d.abs() > best.abs(), d, best)
    return torch.where(best >= 0, 1.0, -1.0)
""",
    },
}

A7_BLOCK = {
    "q1_block_partitions": {
        "wrong": {
            "by role only, not per layer": """
from merging_helpers.partitions import describe
def block_partitions(names):
    out = {}
    for name in names:
        if describe(name).layer is not None:
            out.setdefault(describe(name).role, []).append(name)
    return dict(sorted(out.items()))
""",
            "the norms left out": """
from merging_helpers.partitions import describe
def block_partitions(names):
    out = {}
    for name in names:
        info = describe(name)
        if info.layer is not None and info.role != "norm":
            out.setdefault(f"layer.{info.layer}.{info.role}", []).append(name)
    return out
""",
            "keys sorted as strings (layer.10 before layer.2)": """
from merging_helpers.partitions import describe
def block_partitions(names):
    out = {}
    for name in names:
        info = describe(name)
        if info.layer is not None:
            out.setdefault(f"layer.{info.layer}.{info.role}", []).append(name)
    return dict(sorted(out.items(), reverse=True))
""",
        },
        # string keys first, sorted by the numbers and roles read back from them
        "alternative": """
from collections import defaultdict
from merging_helpers import partitions
def block_partitions(names):
    groups = defaultdict(list)
    for name in names:
        info = partitions.describe(name)
        if info.layer is not None:
            groups["layer.%d.%s" % (info.layer, info.role)].append(name)
    order = lambda key: (int(key.split(".")[1]), key.split(".")[2])
    return {key: groups[key] for key in sorted(groups, key=order)}
""",
    },
    # the layer-level answers' mistakes, made at the block level
    "q2_trace_blocks": {
        "wrong": {label: answer.replace("trace_layers", "trace_blocks").replace("layer_partitions", "block_partitions")
                  for label, answer in A7["q2_trace_layers"]["wrong"].items()},
        "alternative": A7["q2_trace_layers"]["alternative"].replace("trace_layers", "trace_blocks").replace(
            "layer_partitions", "block_partitions"),
    },
}

A8_MIDPOINT = {
    "q1_gradient_importance": {
        "wrong": {
            "the gradient at the expert": """
def gradient_importance(evaluator, base, expert, task, examples, layers):
    g = evaluator.loss_gradient(expert, task, examples)
    return {k: -abs(sum(float(((expert[n].double() - base[n].double()) * g[n].double()).sum()) for n in names))
            for k, names in layers.items()}
""",
            "the gradient at the base": """
def gradient_importance(evaluator, base, expert, task, examples, layers):
    g = evaluator.loss_gradient(base, task, examples)
    return {k: -abs(sum(float(((expert[n].double() - base[n].double()) * g[n].double()).sum()) for n in names))
            for k, names in layers.items()}
""",
            "half the delta in the product": """
def gradient_importance(evaluator, base, expert, task, examples, layers):
    middle = {n: base[n].float() + 0.5 * (t.float() - base[n].float()) if t.is_floating_point() else t
              for n, t in expert.items()}
    g = evaluator.loss_gradient(middle, task, examples)
    return {k: -abs(sum(float(((middle[n].double() - base[n].double()) * g[n].double()).sum()) for n in names))
            for k, names in layers.items()}
""",
        },
        # the midpoint as (θ_b + θ_t) / 2, products with torch.dot
        "alternative": """
def gradient_importance(evaluator, base, expert, task, examples, layers):
    middle = dict(expert)
    for n, t in expert.items():
        if torch.is_floating_point(t):
            middle[n] = ((base[n].double() + t.double()) / 2).float()
    g = evaluator.loss_gradient(middle, task, examples)
    out = {}
    for k, names in layers.items():
        out[k] = -abs(sum(torch.dot((expert[n].double() - base[n].double()).flatten(), g[n].double().cpu().flatten()).item()
                          for n in names))
    return out
""",
    },
    "q2_taylor_check": {
        "wrong": {
            "the gradient at the expert (first order only)": """
def taylor_check(evaluator, base, expert, task, examples, names, t):
    g = evaluator.loss_gradient(expert, task, examples)
    delta = {n: expert[n].float() - base[n].float() for n in names}
    predicted = -t * sum(float((delta[n].double() * g[n].double()).sum()) for n in names)
    moved = {**expert, **{n: expert[n] - t * delta[n] for n in names}}
    with torch.no_grad():
        actual = float(evaluator.loss(evaluator.params(moved), task, examples) - evaluator.loss(evaluator.params(expert), task, examples))
    return predicted, actual
""",
            "the whole model's midpoint θ_b + Δ/2, not the step's": """
def taylor_check(evaluator, base, expert, task, examples, names, t):
    middle = {n: base[n].float() + 0.5 * (x.float() - base[n].float()) if x.is_floating_point() else x for n, x in expert.items()}
    g = evaluator.loss_gradient(middle, task, examples)
    delta = {n: expert[n].float() - base[n].float() for n in names}
    predicted = -t * sum(float((delta[n].double() * g[n].double()).sum()) for n in names)
    moved = {**expert, **{n: expert[n] - t * delta[n] for n in names}}
    with torch.no_grad():
        actual = float(evaluator.loss(evaluator.params(moved), task, examples) - evaluator.loss(evaluator.params(expert), task, examples))
    return predicted, actual
""",
            "the prediction without its minus": """
def taylor_check(evaluator, base, expert, task, examples, names, t):
    delta = {n: expert[n].float() - base[n].float() for n in names}
    g = evaluator.loss_gradient({**expert, **{n: expert[n] - 0.5 * t * delta[n] for n in names}}, task, examples)
    predicted = t * sum(float((delta[n].double() * g[n].double()).sum()) for n in names)
    moved = {**expert, **{n: expert[n] - t * delta[n] for n in names}}
    with torch.no_grad():
        actual = float(evaluator.loss(evaluator.params(moved), task, examples) - evaluator.loss(evaluator.params(expert), task, examples))
    return predicted, actual
""",
        },
        # the halfway point by torch.lerp, sums in float64 step by step
        "alternative": """
def taylor_check(evaluator, base, expert, task, examples, names, t):
    halfway, moved = dict(expert), dict(expert)
    for n in names:
        halfway[n] = torch.lerp(expert[n].float(), base[n].float(), 0.5 * t)
        moved[n] = expert[n].float() - t * (expert[n].float() - base[n].float())
    g = evaluator.loss_gradient(halfway, task, examples)
    predicted = 0.0
    for n in names:
        predicted -= t * float(((expert[n].double() - base[n].double()) * g[n].double()).sum())
    with torch.no_grad():
        before = evaluator.loss(evaluator.params(expert), task, examples)
        after = evaluator.loss(evaluator.params(moved), task, examples)
    return predicted, float(after - before)
""",
    },
}

RULE_MUTANTS = {("a2_dare", "A2_RULE", "row"): A2_ROW, ("a3_ties", "A3_RULE", "max"): A3_MAX,
                ("a7_apl_tracing", "A7_RULE", "block"): A7_BLOCK,
                ("a8_gradient_importance", "A8_RULE", "midpoint"): A8_MIDPOINT}
