"""Writes the master notebooks of the course assignments (otter-grader's format) from the
cell lists below: ``python assignments/make_masters.py``. Edit here, not in the .ipynb.

The hidden tests' parameters are tokens (``⟨A2_PS⟩``) with several values each (:data:`VARIANTS`):
the committed masters take the first value; an offering built with a seed
(``python assignments/build.py --seed n``) draws one value per token, so its hidden tests
expect values no other offering's do.

Each master is: a raw ASSIGNMENT CONFIG cell, then per question a raw BEGIN QUESTION cell,
the prompt, a solution cell (the lines between ``# BEGIN SOLUTION`` and ``# END SOLUTION``
become ``...`` in the student's copy), a BEGIN TESTS block of exception-based tests (a
function and its call; a first line ``# HIDDEN`` keeps it out of the student's copy) and
END QUESTION. The tests call ``merging_helpers.grading``, which says what was expected.
"""

from __future__ import annotations

import json
import random
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _cell(kind: str, source: str) -> dict:
    source = textwrap.dedent(source).strip("\n")
    cell = {"cell_type": kind, "metadata": {}, "source": source}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def raw(s):
    return _cell("raw", s)


def md(s):
    return _cell("markdown", s)


def code(s):
    return _cell("code", s)


def config(name: str) -> dict:
    return raw(f"""
        # ASSIGNMENT CONFIG
        name: {name}
        init_cell: true
        check_all_cell: true
        export_cell: false
        solutions_pdf: false
        template_pdf: false
        run_tests: false
        requirements: requirements.txt
        tests:
          ok_format: false
        """)


IMPORTS = "import copy\nimport torch\nfrom merging_helpers import deltas, evaluation, grading"


def test(name: str, params: str, body: str, hidden: bool = False, setup: str = "") -> str:
    """An exception-based test cell: ``def name(params)`` (otter passes the notebook's variables of
    those names) and its call. The test runs apart from the notebook, so it imports what it uses."""
    lines = [IMPORTS, textwrap.dedent(setup).strip("\n"), textwrap.dedent(body).strip("\n")]
    body = textwrap.indent("\n".join(line for line in lines if line), "    ")
    cell = f"def {name}({params}):\n{body}\n\n{name}({params})"
    return ("# HIDDEN\n" if hidden else "") + cell


def question(name: str, points, prompt: str, solution: str, tests: list[str], manual: bool = False) -> list[dict]:
    """One question: its config, prompt, solution cell and tests (each a test function and its call)."""
    cells = [raw(f"# BEGIN QUESTION\nname: {name}\npoints: {points}" + ("\nmanual: true" if manual else "")),
             md(prompt)]
    if manual:
        return cells + [raw("# BEGIN SOLUTION"), md(solution), raw("# END SOLUTION"), raw("# END QUESTION")]
    cells += [raw("# BEGIN SOLUTION"), code(solution), raw("# END SOLUTION"), raw("# BEGIN TESTS")] + [code(t) for t in tests] + [raw("# END TESTS"),
                                                                                  raw("# END QUESTION")]
    return cells


def choose(token: str, **rules: list[dict]) -> dict:
    """Cells that depend on a rule drawn per offering: ``rules`` maps each of the token's values
    (a rule's name, :data:`VARIANTS`) to the cells written for it; :func:`fill` keeps one list."""
    return {"choose": token, "rules": rules}


SETUP = code("""
    import copy
    import torch
    from merging_helpers import zoo as zoo_lib
    from merging_helpers.evaluation import Evaluator
    from merging_helpers.notebook import setup

    device = setup(seed=0, quiet=True)
    zoo = zoo_lib.load_zoo(tier="grading", progress=False)   # 3 small experts; built on first use (≈ 2 min)
    evaluator = Evaluator(zoo)
    print("tasks:", zoo.task_names)
    """)


# Question 1's rule, for grading a later question apart from the student's question 1 (hidden tests only)
REFERENCE_DARE_SOURCE = """
def REFERENCE_DARE(delta, p, generator, rule="⟨A2_RULE⟩"):
    n = delta.numel() if rule == "tensor" else delta.shape[-1]   # the count is per tensor or per row
    k = round(p * n)
    rows = delta.reshape(-1, n)
    dropped = torch.rand(rows.shape, generator=generator).argsort(dim=1) < k
    return torch.where(dropped, 0.0, rows * n / (n - k)).view(delta.shape)
"""

# The package's TIES steps, for grading the whole merge apart from the student's steps
REFERENCE_TIES_STEPS = """
from merging_helpers import consensus
from merging_helpers.drop import magnitude_keep_mask
def max_election(ds):   # the sign of the largest-magnitude delta (the first among equals); +1 where all are 0
    stacked = torch.stack(list(ds))
    sign = stacked.gather(0, stacked.abs().argmax(dim=0, keepdim=True))[0].sign()
    return torch.where(sign < 0, -1.0, 1.0)
elections = {"frequency": lambda ds: consensus.elect_sign(ds, "frequency"), "max": max_election}
steps = dict(trim=lambda delta, density: delta * magnitude_keep_mask(delta, density),
             elect_sign=elections["⟨A3_RULE⟩"],
             disjoint_merge=lambda ds, signs: consensus.disjoint_merge(ds, signs, "count"))
"""

# Assignment 4's subject is MagPrune and the comparison, not TIES: its answers may use TIES's steps
# and the package's TIES as the comparator
A4_PERMITS = """
grading.permit("merging_helpers.consensus.elect_sign", "merging_helpers.consensus.disjoint_merge",
               "merging_helpers.recipes.merge_state_dicts", "merging_helpers.deltas.task_vector",
               "merging_helpers.deltas.task_vectors", "merging_helpers.deltas.apply_delta")
"""
REFERENCE_MAGPRUNE = A4_PERMITS + """
from merging_helpers.drop import magprune_keep_prob as reference_keep_prob
def reference_magprune(delta, density, epsilon, generator):
    prob = reference_keep_prob(delta, density, epsilon)
    keep = torch.rand(delta.shape, generator=generator) < prob
    return torch.where(keep, delta / prob, torch.zeros_like(delta))
"""

TOY = """
base = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5])}
expert = {"w": torch.tensor([[1.5, 2.0], [2.0, 4.25]]), "b": torch.tensor([0.5, 0.5])}
"""

# ----------------------------------------------------------------------------- assignment 1

A1 = [
    config("a1_task_arithmetic"),
    md("""
        # Assignment 1 — task vectors and Task Arithmetic

        Chapters 1 and 2 of the book. You will write, from scratch on plain state dicts
        (dicts name → tensor), the three pieces of a Task Arithmetic merge: the task vector
        Δ_t = θ_t − θ_b, the weighted merge θ = θ_b + Σ_t λ_t Δ_t (the chapter's merge is
        every λ_t equal), and the choice of λ **on the validation split only**. Use only `torch`; the package's own versions are what the
        hidden tests compare you with.

        The experts come from the book's *grading zoo*: three small fine-tunes of
        all-MiniLM-L6-v2 (news topic, sentiment, the sign of a sum), built on first use.
        Expected time: 1–1.5 hours.
        """),
    SETUP,
    *question("q1_task_vector", 2, """
        **Question 1.** Write `task_vector(base, expert)`: a new dict with, for every name of
        `base` whose tensor is floating point, `expert[name] − base[name]` in float32. Skip
        integer tensors (buffers such as `position_ids`). Do not modify the inputs.
        """, '''
        def task_vector(base, expert):
            """Δ = θ_expert − θ_base for every floating-point tensor of the base, in float32."""
            # BEGIN SOLUTION
            return {name: expert[name].float() - tensor.float()
                    for name, tensor in base.items() if tensor.is_floating_point()}
            # END SOLUTION
        ''', [
        test("test_task_vector_on_a_toy", "task_vector", setup=TOY, body="""
            grading.expect_signature(task_vector, "task_vector", ("base", "expert"))
            base["position_ids"] = expert["position_ids"] = torch.arange(3)   # an integer buffer: no delta
            delta = grading.call(task_vector, "task_vector", base, expert)
            delta = grading.expect_state_dict(delta, "task_vector", {"w": base["w"], "b": base["b"]})
            grading.expect_close(delta["w"], torch.tensor([[0.5, 0.0], [-1.0, 0.25]]), "task_vector(...)['w']")
            grading.expect_close(delta["b"], torch.tensor([0.0, 1.0]), "task_vector(...)['b']")
            """),
        test("test_task_vector_on_the_zoo", "task_vector, zoo", """
            name = zoo.task_names[0]
            before = copy.deepcopy(zoo.experts[name])
            ours = grading.call(task_vector, "task_vector", zoo.base, zoo.experts[name])
            want = deltas.task_vector(zoo.base, zoo.experts[name])
            grading.expect_state_dicts_close(ours, want, "task_vector(zoo)")
            grading.expect_unchanged(before, zoo.experts[name], "task_vector")
            """, hidden=True)]),
    *question("q2_task_arithmetic", 3, """
        **Question 2.** The chapter scales every task vector by one λ. Write the weighted
        form, `task_arithmetic(base, vectors, lams)`: the merged state dict θ_b + Σ_t λ_t Δ_t,
        where `vectors` is a list of task vectors and `lams` a list of as many scales (raise a
        `ValueError` naming `lams` when the lengths differ). Sum in float32. Names a task vector
        does not have (integer buffers) are copied from the base; every tensor keeps the
        base's dtype. Do not modify `base`.
        """, '''
        def task_arithmetic(base, vectors, lams):
            """θ_b + Σ_t λ_t Δ_t, in the base's dtypes."""
            # BEGIN SOLUTION
            if len(lams) != len(vectors):
                raise ValueError(f"task_arithmetic: {len(lams)} lams for {len(vectors)} task vectors")
            merged = {}
            for name, tensor in base.items():
                if name in vectors[0]:
                    total = sum(lam * v[name].float() for lam, v in zip(lams, vectors))
                    merged[name] = (tensor.float() + total).to(tensor.dtype)
                else:
                    merged[name] = tensor.clone()
            return merged
            # END SOLUTION
        ''', [
        test("test_task_arithmetic_on_a_toy", "task_arithmetic", setup=TOY, body="""
            grading.expect_signature(task_arithmetic, "task_arithmetic", ("base", "vectors", "lams"))
            vectors = [{k: expert[k] - base[k] for k in base}, {k: torch.ones_like(base[k]) for k in base}]
            base["position_ids"] = torch.arange(3)   # an integer buffer the vectors lack: copied from the base
            merged = grading.call(task_arithmetic, "task_arithmetic", base, vectors, [0.5, 0.25])
            merged = grading.expect_state_dict(merged, "task_arithmetic", base)
            assert torch.equal(merged["position_ids"], base["position_ids"]), "position_ids should be the base's"
            grading.expect_close(merged["w"], torch.tensor([[1.5, 2.25], [2.75, 4.375]]),
                                 "task_arithmetic(lams=[0.5, 0.25])['w']")
            zero = grading.call(task_arithmetic, "task_arithmetic", base, vectors, [0.0, 0.0])
            zero = grading.expect_state_dict(zero, "task_arithmetic", base)
            grading.expect_close(zero["b"], base["b"], "task_arithmetic(lams=[0, 0])['b'] (all λ = 0 is the base)")
            grading.expect_raises(lambda lams: task_arithmetic(base, vectors, lams), "task_arithmetic(base, vectors, lams)",
                                  ([0.5],), ValueError, "(one λ per task vector)")
            """),
        test("test_task_arithmetic_on_the_zoo", "task_arithmetic, zoo", """
            before = copy.deepcopy(zoo.base)
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            ours = grading.call(task_arithmetic, "task_arithmetic", zoo.base, vectors, [0.3] * len(vectors))
            want = evaluation.task_arithmetic_state(zoo.base, zoo.experts, 0.3)
            grading.expect_state_dicts_close(ours, want, "task_arithmetic(zoo, every λ = 0.3)")
            lams = ⟨A1_LAMS⟩[:len(vectors)]
            ours = grading.call(task_arithmetic, "task_arithmetic", zoo.base, vectors, lams)
            want = deltas.apply_delta(zoo.base, {n: sum(lam * v[n] for lam, v in zip(lams, vectors)) for n in vectors[0]})
            grading.expect_state_dicts_close(ours, want, f"task_arithmetic(zoo, lams={lams})")
            grading.expect_unchanged(before, zoo.base, "task_arithmetic")
            """, hidden=True)]),
    *question("q3_choose_lambda", 3, """
        **Question 3.** Write `choose_lambda(evaluator, base, vectors, grid)`: merge with each
        λ of `grid` (the same λ for every task vector, with your `task_arithmetic`), score the merge with `evaluator.accuracy(merged, "validation")` (a dict
        task → accuracy) and return `(best_lambda, scores)`, where `scores[lam]` is the mean
        validation accuracy over the tasks and `best_lambda` the λ with the highest mean
        (ties: the smallest λ). Never look at the test split here.
        """, '''
        def choose_lambda(evaluator, base, vectors, grid):
            """The λ of ``grid`` with the best mean validation accuracy, and every λ's mean."""
            # BEGIN SOLUTION
            scores = {}
            for lam in grid:
                accuracy = evaluator.accuracy(task_arithmetic(base, vectors, [lam] * len(vectors)), "validation")
                scores[lam] = sum(accuracy.values()) / len(accuracy)
            best = max(scores.values())
            return min(lam for lam, s in scores.items() if s == best), scores
            # END SOLUTION
        ''', [
        test("test_choose_lambda_returns_a_grid_value", "choose_lambda, zoo, evaluator", """
            grading.expect_signature(choose_lambda, "choose_lambda", ("evaluator", "base", "vectors", "grid"))
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            merge = lambda base, vectors, lams: evaluation.task_arithmetic_state(zoo.base, zoo.experts, lams[0])
            choose = grading.using(choose_lambda, task_arithmetic=merge)   # graded apart from your question 2
            result = grading.call(choose, "choose_lambda", evaluator, zoo.base, vectors, (0.2, 0.6))
            grading.expect_pair(result, "choose_lambda", "(best_lambda, scores)")
            best, scores = result
            assert best in (0.2, 0.6), f"best_lambda should be one of the grid (0.2, 0.6), got {best!r}"
            assert set(scores) == {0.2, 0.6}, f"scores should have one entry per λ of the grid, got keys {list(scores)}"
            """),
        test("test_choose_lambda_takes_the_mean_and_breaks_ties_low", "choose_lambda", """
            # a fake merge that is just its λ, and a fake evaluator with exact (dyadic) accuracies per λ
            table = {0.8: (0.25, 0.75), 0.2: (0.5, 0.5), 0.4: (0.25, 0.5), 1.0: (0.75, 0.25)}
            class Fake:
                def accuracy(self, merged, split="test"):
                    a, b = table[merged["lam"]]
                    return {"a": a, "b": b} if split == "validation" else {"a": 1.0 - a, "b": 1.0 - b}
            recorder = grading.SplitRecorder(Fake())
            choose = grading.using(choose_lambda, task_arithmetic=lambda base, vectors, lams: {"lam": lams[0]})
            result = grading.call(choose, "choose_lambda", recorder, {}, [{}, {}], tuple(table))
            grading.expect_pair(result, "choose_lambda", "(best_lambda, scores)")
            grading.expect_splits(recorder, "choose_lambda", validation=len(table), test=0)
            best, scores = result
            grading.expect_keys(scores, "choose_lambda's scores", tuple(table))
            grading.expect_close(torch.tensor([float(scores[lam]) for lam in table]), torch.tensor([0.5, 0.5, 0.375, 0.5]),
                                 "scores (the mean over the tasks, per λ of the grid (0.8, 0.2, 0.4, 1.0))")
            assert best == 0.2, f"three λs tie at a mean of 0.5: the smallest, 0.2, should win, not {best}"
            """, hidden=True),
        test("test_choose_lambda_uses_the_validation_split", "choose_lambda, zoo, evaluator", """
            grid = ⟨A1_GRID⟩
            want_best, want_scores = evaluation.best_lambda(evaluator, grid, "validation")
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            recorder = grading.SplitRecorder(evaluator)
            merge = lambda base, vectors, lams: evaluation.task_arithmetic_state(zoo.base, zoo.experts, lams[0])
            choose = grading.using(choose_lambda, task_arithmetic=merge)   # the merge best_lambda scores
            result = grading.call(choose, "choose_lambda", recorder, zoo.base, vectors, grid)
            grading.expect_splits(recorder, "choose_lambda", validation=len(grid), test=0)
            grading.expect_pair(result, "choose_lambda", "(best_lambda, scores)")
            best, scores = result
            for lam in grid:
                want = sum(want_scores[lam].values()) / len(want_scores[lam])
                assert abs(scores[lam] - want) < 1e-6, (f"scores[{lam}] = {scores[lam]:.4f}, but the mean "
                                                        f"validation accuracy at λ = {lam} is {want:.4f}")
            assert best == want_best, f"choose_lambda picked λ = {best}; the best validation mean is at λ = {want_best}"
            """, hidden=True)]),
    md("""
        Your merge on the test split, with the λ you chose (look at it only now):
        """),
    code("""
        vectors = [task_vector(zoo.base, zoo.experts[name]) for name in zoo.task_names]
        best, scores = choose_lambda(evaluator, zoo.base, vectors, (0.2, 0.5, 0.8))
        print("validation means:", {lam: round(s, 3) for lam, s in scores.items()}, "→ λ =", best)
        print("test:", evaluator.accuracy(task_arithmetic(zoo.base, vectors, [best] * len(vectors)), "test"))
        """),
]

# ----------------------------------------------------------------------------- assignment 2

# The other rule an offering may draw (A2_RULE = "row"): the fixed count per row, not per tensor
A2_ROW_INTRO = [md("""
    # Assignment 2 — DARE with a fixed count per row: drop, rescale, merge

    Chapter 2 of the book. DARE drops each entry of a task vector *independently* with
    probability p and divides the survivors by 1 − p, so the expected delta is unchanged but
    the number of dropped entries varies from draw to draw, and from row to row. Here you
    build a variant the chapter does not print: drop **exactly** k = round(p · c) entries of
    **each row** (c the length of the last dimension: a row of a weight matrix is one output
    unit's weights), chosen uniformly at random within the row, and find the rescale that keeps
    the expected delta unchanged. Then the merge built on it, and, in words, why the rescale
    works. Use only `torch`.

    The tests are statistical: they check the counts, the reproducibility and the
    unbiasedness over many draws (a correct answer fails them with a chance below one in a
    million), not equality with a particular way of drawing. Expected time: 1–1.5 hours.
    """)]

A2_ROW_Q1 = question("q1_dare", 4, """
    **Question 1.** Write `dare(delta, p, generator)`: a new tensor in which exactly
    k = round(p · c) entries of **every row** of `delta` (c = `delta.shape[-1]`, Python's
    `round`; a 1-D tensor is one row), chosen uniformly at random within the row without
    replacement, are set to 0, and every other entry is multiplied by the factor that makes
    the expected output equal to `delta` (derive it: each entry survives with probability
    (c − k) / c). Draw every random number from `generator` on the CPU (e.g. one
    `torch.rand(rows, c, generator=generator)` for all rows). Keep the shape, dtype and device
    of `delta`. Raise a `ValueError` naming `p` when p is not in [0, 1) or when k = c (nothing
    of a row would survive). Do not modify `delta`.
    """, '''
    def dare(delta, p, generator):
        """DARE with a fixed count per row: drop exactly round(p · c) entries of each row, rescale by c / (c − k)."""
        # BEGIN SOLUTION
        c = delta.shape[-1]
        k = round(p * c)
        if not 0 <= p < 1 or k >= c:
            raise ValueError(f"dare: the drop rate p must be in [0, 1) and leave an entry of each row, got p = {p} "
                             f"for rows of {c}")
        rows = delta.reshape(-1, c)
        ranks = torch.rand(rows.shape, generator=generator).argsort(dim=1).to(delta.device)
        return torch.where(ranks < k, torch.zeros_like(rows), rows * (c / (c - k))).reshape(delta.shape)
        # END SOLUTION
    ''', [
    test("test_dare_count_rescale_and_bad_p", "dare", """
        grading.expect_signature(dare, "dare", ("delta", "p", "generator"))
        delta = torch.linspace(-1, 1, 7) + 0.01                  # one row, c = 7, p = 0.3: k = round(2.1) = 2
        before = delta.clone()
        out = grading.expect_tensor(grading.call(dare, "dare", delta, 0.3, torch.Generator().manual_seed(0)),
                                    "dare(delta, 0.3)", delta.shape, delta.dtype)
        assert int((out == 0).sum()) == 2, f"dare(7 entries, p=0.3) should drop exactly round(2.1) = 2, dropped {int((out == 0).sum())}"
        kept = out != 0
        grading.expect_close(out[kept], delta[kept] * 7 / 5, "the kept entries of dare(7 entries, p=0.3) (× c / (c − k))")
        grading.expect_unchanged({"delta": before}, {"delta": delta}, "dare")
        matrix = torch.arange(1.0, 16.0).reshape(3, 5)            # p = 0.4: 2 of each row's 5 entries
        out = grading.expect_tensor(grading.call(dare, "dare", matrix, 0.4, torch.Generator().manual_seed(1)),
                                    "dare(a 3 × 5 matrix, 0.4)", matrix.shape)
        assert (out == 0).sum(dim=1).tolist() == [2, 2, 2], (
            f"dare(3 × 5, p=0.4) should drop 2 entries of every row, dropped {(out == 0).sum(dim=1).tolist()}")
        for bad in (1.0, -0.1, 0.95):   # 0.95 of 7 entries rounds to all 7
            grading.expect_raises(lambda p: dare(delta, p, torch.Generator()), "dare(delta, p)", (bad,),
                                  ValueError, "(p must be in [0, 1) and leave an entry of each row)")
        """),
    test("test_dare_drops_exactly_k_per_row_reproducibly", "dare", """
        delta = torch.randn(50, 41, generator=torch.Generator().manual_seed(1))   # c = 41
        for p in ⟨A2_PS⟩:
            out = grading.expect_tensor(grading.call(dare, "dare", delta, p, torch.Generator().manual_seed(2)),
                                        f"dare(delta, {p})", delta.shape)
            k, counts = round(p * 41), (out == 0).sum(dim=1)
            assert bool((counts == k).all()), (f"dare(p={p}) should drop {k} of each row's 41 entries; rows dropped "
                                               f"between {int(counts.min())} and {int(counts.max())}")
            kept = out != 0
            grading.expect_close(out[kept], delta[kept] * 41 / (41 - k), f"the kept entries of dare(delta, {p})")
        again = [grading.call(dare, "dare", delta, 0.5, torch.Generator().manual_seed(7)) for _ in range(2)]
        assert torch.equal(again[0], again[1]), "dare should draw from the generator it is given (same seed, same drop)"
        columns = torch.stack([grading.call(dare, "dare", delta, 0.5, torch.Generator().manual_seed(s)) == 0
                               for s in range(40)]).double().mean(dim=(0, 1))   # how often each column is dropped
        # each of 41 columns: 40 × 50 draws at rate 21/41, sd 0.011; 6 sd apart at the worst column
        assert float((columns - 21 / 41).abs().max()) < 0.07, "within a row, every entry should be equally likely to drop"
        """, hidden=True),
    test("test_dare_is_unbiased_and_uniform", "dare", """
        delta = torch.linspace(-1, 1, 7) + 0.01
        p, draws = ⟨A2_P⟩, 6000
        n = 7
        k = round(p * n)
        generator = torch.Generator().manual_seed(3)
        outs = torch.stack([grading.expect_tensor(grading.call(dare, "dare", delta, p, generator), "dare", delta.shape)
                            for _ in range(draws)])
        mean = outs.mean(0)
        # an entry survives with probability q = (c − k) / c; its value is Δ / q; sd of one draw |Δ| sqrt(1/q − 1)
        q = (n - k) / n
        standard_error = delta.abs() * (1 / q - 1) ** 0.5 / draws ** 0.5
        worst = float(((mean - delta).abs() / standard_error).max())
        # 5.5 standard errors over 7 entries: a correct answer fails with a chance below 1e-6
        assert worst < 5.5, (f"the mean of {draws} dare draws is {worst:.1f} standard errors from Δ at its worst "
                             "entry: dare is biased (is the rescale c / (c − k), and is every entry equally likely "
                             "to be dropped?)")
        for i in range(n):
            grading.expect_rate(int((outs[:, i] == 0).sum()), draws, k / n, f"draws in which entry {i} was dropped")
        """, hidden=True)])

A2 = [
    config("a2_dare"),
    choose("A2_RULE", tensor=[md("""
        # Assignment 2 — DARE with a fixed count: drop, rescale, merge

        Chapter 2 of the book. DARE drops each entry of a task vector *independently* with
        probability p and divides the survivors by 1 − p, so the expected delta is unchanged but
        the number of dropped entries varies from draw to draw. Here you build the variant the
        chapter does not print: drop **exactly** k = round(p · n) entries of each tensor (n its
        number of entries), chosen uniformly at random, and find the rescale that keeps the
        expected delta unchanged. Then the merge built on it, and, in words, why the rescale
        works. Use only `torch`.

        The tests are statistical: they check the count, the reproducibility and the
        unbiasedness over many draws (a correct answer fails them with a chance below one in a
        million), not equality with a particular way of drawing. Expected time: 1–1.5 hours.
        """)], row=A2_ROW_INTRO),
    SETUP,
    choose("A2_RULE", tensor=question("q1_dare", 4, """
        **Question 1.** Write `dare(delta, p, generator)`: a new tensor in which exactly
        k = round(p · n) entries of `delta` (n = `delta.numel()`, Python's `round`), chosen
        uniformly at random without replacement, are set to 0, and every other entry is
        multiplied by the factor that makes the expected output equal to `delta` (derive it:
        each entry survives with probability (n − k) / n). Draw every random number from
        `generator` on the CPU (`torch.randperm(n, generator=generator)` or `torch.rand(...,
        generator=generator)`). Keep the shape, dtype and device of `delta`. Raise a `ValueError`
        naming `p` when p is not in [0, 1) or when k = n (nothing would survive). Do not modify
        `delta`.
        """, '''
        def dare(delta, p, generator):
            """DARE with a fixed count: drop exactly round(p · n) entries, rescale the rest by n / (n − k)."""
            # BEGIN SOLUTION
            n = delta.numel()
            k = round(p * n)
            if not 0 <= p < 1 or k >= n:
                raise ValueError(f"dare: the drop rate p must be in [0, 1) and leave an entry, got p = {p} for {n} entries")
            dropped = torch.randperm(n, generator=generator)[:k].to(delta.device)
            out = delta.reshape(-1) * (n / (n - k))
            out[dropped] = 0
            return out.reshape(delta.shape)
            # END SOLUTION
        ''', [
        test("test_dare_count_rescale_and_bad_p", "dare", """
            grading.expect_signature(dare, "dare", ("delta", "p", "generator"))
            delta = torch.linspace(-1, 1, 7) + 0.01                  # n = 7, p = 0.3: k = round(2.1) = 2
            before = delta.clone()
            out = grading.expect_tensor(grading.call(dare, "dare", delta, 0.3, torch.Generator().manual_seed(0)),
                                        "dare(delta, 0.3)", delta.shape, delta.dtype)
            assert int((out == 0).sum()) == 2, f"dare(7 entries, p=0.3) should drop exactly round(2.1) = 2, dropped {int((out == 0).sum())}"
            kept = out != 0
            grading.expect_close(out[kept], delta[kept] * 7 / 5, "the kept entries of dare(7 entries, p=0.3) (× n / (n − k))")
            grading.expect_unchanged({"delta": before}, {"delta": delta}, "dare")
            same = grading.call(dare, "dare", delta, 0.0, torch.Generator().manual_seed(0))
            grading.expect_close(grading.expect_tensor(same, "dare(delta, 0)"), delta, "dare(delta, p=0) (nothing dropped)")
            for bad in (1.0, -0.1, 0.95):   # 0.95 of 7 entries rounds to all 7
                grading.expect_raises(lambda p: dare(delta, p, torch.Generator()), "dare(delta, p)", (bad,),
                                      ValueError, "(p must be in [0, 1) and leave an entry)")
            """),
        test("test_dare_drops_exactly_k_reproducibly", "dare", """
            delta = torch.randn(50, 41, generator=torch.Generator().manual_seed(1))   # n = 2050
            for p in ⟨A2_PS⟩:
                out = grading.expect_tensor(grading.call(dare, "dare", delta, p, torch.Generator().manual_seed(2)),
                                            f"dare(delta, {p})", delta.shape)
                k = round(p * delta.numel())
                assert int((out == 0).sum()) == k, f"dare(p={p}) dropped {int((out == 0).sum())} of 2050 entries, expected {k}"
            again = [grading.call(dare, "dare", delta, 0.5, torch.Generator().manual_seed(7)) for _ in range(2)]
            assert torch.equal(again[0], again[1]), "dare should draw from the generator it is given (same seed, same drop)"
            """, hidden=True),
        test("test_dare_is_unbiased_and_uniform", "dare", """
            delta = torch.linspace(-1, 1, 7) + 0.01
            p, draws = ⟨A2_P⟩, 6000
            n = 7
            k = round(p * n)
            generator = torch.Generator().manual_seed(3)
            outs = torch.stack([grading.expect_tensor(grading.call(dare, "dare", delta, p, generator), "dare", delta.shape)
                                for _ in range(draws)])
            mean = outs.mean(0)
            # an entry survives with probability q = (n − k) / n; its value is Δ / q; sd of one draw |Δ| sqrt(1/q − 1)
            q = (n - k) / n
            standard_error = delta.abs() * (1 / q - 1) ** 0.5 / draws ** 0.5
            worst = float(((mean - delta).abs() / standard_error).max())
            # 5.5 standard errors over 7 entries: a correct answer fails with a chance below 1e-6
            assert worst < 5.5, (f"the mean of {draws} dare draws is {worst:.1f} standard errors from Δ at its worst "
                                 "entry: dare is biased (is the rescale n / (n − k), and is every entry equally likely "
                                 "to be dropped?)")
            for i in range(n):
                grading.expect_rate(int((outs[:, i] == 0).sum()), draws, k / n, f"draws in which entry {i} was dropped")
            """, hidden=True)]), row=A2_ROW_Q1),
    *question("q2_dare_merge", 3, """
        **Question 2.** Write `dare_merge(base, vectors, p, lam, seed)`: make one
        `torch.Generator().manual_seed(seed)`, apply your `dare` to every tensor of every
        task vector (in the order of `base`'s names, then the vectors' order), and return
        θ_b + λ Σ_t DARE(Δ_t) in the base's dtypes (names the vectors lack: copied from the base).
        """, '''
        def dare_merge(base, vectors, p, lam, seed):
            """Fixed-count DARE + Task Arithmetic (chapter 2): θ_b + λ Σ_t DARE_p(Δ_t)."""
            # BEGIN SOLUTION
            generator = torch.Generator().manual_seed(seed)
            merged = {}
            for name, tensor in base.items():
                if name in vectors[0]:
                    total = sum(dare(v[name], p, generator) for v in vectors)
                    merged[name] = (tensor.float() + lam * total).to(tensor.dtype)
                else:
                    merged[name] = tensor.clone()
            return merged
            # END SOLUTION
        ''', [
        test("test_dare_merge_without_a_drop_is_task_arithmetic", "dare_merge, zoo", """
            grading.expect_signature(dare_merge, "dare_merge", ("base", "vectors", "p", "lam", "seed"))
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            nothing_dropped = lambda delta, p, generator: delta   # p = 0: graded apart from your question 1
            ours = grading.call(grading.using(dare_merge, dare=nothing_dropped), "dare_merge", zoo.base, vectors, 0.0, 0.4, 0)
            want = evaluation.task_arithmetic_state(zoo.base, zoo.experts, 0.4)
            grading.expect_state_dicts_close(ours, want, "dare_merge(p=0, λ=0.4)")
            """),
        test("test_dare_merge_draws_in_order_and_rescales_once", "dare_merge", setup=REFERENCE_DARE_SOURCE, body="""
            # with the reference DARE (question 1's rule), the merge is determined by the seed and the order
            g = torch.Generator().manual_seed(5)
            base = {"a": torch.randn(6, 4, generator=g), "n": torch.arange(3), "b": torch.randn(7, generator=g).double()}
            vectors = [{k: torch.randn(base[k].shape, generator=g) for k in ("a", "b")} for _ in range(3)]
            p, lam = ⟨A2_MERGE⟩
            generator, want = torch.Generator().manual_seed(11), {}
            for name, tensor in base.items():
                if name in vectors[0]:
                    total = sum(REFERENCE_DARE(v[name], p, generator) for v in vectors)
                    want[name] = (tensor.float() + lam * total).to(tensor.dtype)
                else:
                    want[name] = tensor
            ours = grading.call(grading.using(dare_merge, dare=REFERENCE_DARE), "dare_merge", base, vectors, p, lam, 11)
            ours = grading.expect_state_dict(ours, "dare_merge", base)
            for name in base:
                assert ours[name].dtype == base[name].dtype, f"dare_merge(...)[{name!r}] should keep the base's dtype"
                grading.expect_close(ours[name], want[name], f"dare_merge(...)[{name!r}] (one generator, drawn in the "
                                     "order of the base's names, then the vectors'; each survivor rescaled once)")
            """, hidden=True),
        test("test_dare_merge_keeps_what_survives_any_expert", "dare_merge, zoo", setup=REFERENCE_DARE_SOURCE, body="""
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            p = 0.9
            ours = grading.call(grading.using(dare_merge, dare=REFERENCE_DARE), "dare_merge", zoo.base, vectors, p, 1.0, 0)
            ours = grading.expect_state_dict(ours, "dare_merge", zoo.base)
            names = [n for n in zoo.base if n.startswith("encoder.layer.") and n.endswith("dense.weight")]
            count = expected = variance = 0
            for name in names:
                nonzero = sum((v[name] != 0).double() for v in vectors)   # experts that changed the entry
                n = ours[name].numel() if "⟨A2_RULE⟩" == "tensor" else ours[name].shape[-1]
                survive = 1 - (round(p * n) / n) ** nonzero              # some expert's entry is kept
                count += int(((ours[name].float() - zoo.base[name].float()) != 0).sum())
                expected += float(survive.sum())
                variance += float((survive * (1 - survive)).sum())
            assert abs(count - expected) < 5 * variance ** 0.5 + 1, (
                f"dare_merge(p={p}) changed {count} entries of the dense maps, expected about {expected:.0f} "
                f"(an entry changes when any of the {len(vectors)} experts keeps it)")
            """, hidden=True)]),
    md("""
        How much the number of kept entries varies under your rule and under the chapter's independent
        drops, on a 300 × 7 matrix (200 draws each), and the two rescales where p · 7 is not whole:
        """),
    code("""
        generator = torch.Generator().manual_seed(0)
        matrix = torch.randn(300, 7, generator=generator)
        for p in (0.3, 0.9):
            fixed = torch.stack([(dare(matrix, p, generator) != 0).sum() for _ in range(200)]).float()
            independent = torch.stack([(torch.rand(matrix.shape, generator=generator) >= p).sum() for _ in range(200)]).float()
            print(f"p = {p}: entries kept of 2100, your rule {fixed.mean():.1f} ± {fixed.std():.1f}, "
                  f"independent drops {independent.mean():.1f} ± {independent.std():.1f}")
        k = round(0.3 * 7)
        print(f"7 entries at p = 0.3: k = {k}, rescale 7 / (7 − k) = {7 / (7 - k):.4f}, 1 / (1 − p) = {1 / 0.7:.4f}")
        """),
    *question("q3_why_rescale", 2, """
        **Question 3 (written).** In three to five sentences: why does your factor keep the
        expected delta equal to Δ, and how does it differ from DARE's 1/(1 − p) when p times your
        count (n entries of the tensor, or c of the row) is not a whole number? Is one entry's variance smaller or larger than under independent drops?
        The chapter's heavy tier shows DARE failing at p = 0.9 although it is unbiased: what does
        unbiased not promise, and which property of the delta decides whether that matters?
        """, """
        (Per row, read c for n.) k entries of n are dropped uniformly, so each survives with probability q = (n − k)/n and
        then equals Δ_i · n/(n − k) = Δ_i / q: E = q · Δ_i / q = Δ_i. With k = round(p n), q differs
        from 1 − p by the rounding (at most 1/(2n)), so 1/(1 − p) would be biased by that much;
        for large tensors the two agree. One entry's variance, Δ_i² (1/q − 1), is the same as
        under independent drops at rate k/n; what the fixed count removes is the variation of the
        number kept, so the tensor's total mass varies less. Unbiased says nothing about the
        variance: at p = 0.9 each entry's variance is 9 Δ_i², and a layer's output sums many such
        terms; when deltas are small and spread out (light fine-tunes) the noise averages out,
        when they are large and dense (the heavy tier) the rescaled survivors move the weights
        far from anything the model saw.
        """, [], manual=True),
]

# ----------------------------------------------------------------------------- assignment 3

# The other election an offering may draw (A3_RULE = "max"): the largest-magnitude delta decides
A3_MAX_INTRO = [md("""
    # Assignment 3 — TIES with the max election: trim, elect, disjoint merge

    Chapter 3 of the book. TIES merges task vectors in three steps: **trim** each to its
    largest-magnitude entries, **elect** a sign per entry, and average only the deltas that
    agree with it (**disjoint merge**). The chapter builds the paper's election, the sign of
    the trimmed deltas' *sum* (the mass); here you build another one: the **max** election,
    in which, per entry, the single expert with the largest |Δ| decides the sign, however
    many smaller deltas disagree. You will write each step on tensors, then the whole merge on
    state dicts; the hidden tests compare your merge with the package's trim and disjoint merge
    (divide by the number of agreeing experts) around a reference max election. Use only
    `torch`. Expected time: 1.5–2 hours.
    """)]

A3_MAX_Q2 = question("q2_elect_sign", 2, """
    **Question 2.** Write `elect_sign(deltas)`: for a list of same-shaped tensors, the
    tensor of elected signs by the max rule: per entry, the sign of the delta with the
    largest magnitude |Δ| across the experts (among equal magnitudes, the first expert in the
    list); +1.0 where every delta is 0. The result holds only +1.0 and −1.0.
    """, '''
    def elect_sign(deltas):
        """TIES step 2, max election: the sign of the largest-|Δ| expert's delta, +1 where all are 0."""
        # BEGIN SOLUTION
        stacked = torch.stack(list(deltas))
        largest = stacked.abs().argmax(dim=0, keepdim=True)
        return torch.where(stacked.gather(0, largest)[0] < 0, -1.0, 1.0)
        # END SOLUTION
    ''', [
    test("test_elect_sign_on_a_toy", "elect_sign", """
        grading.expect_signature(elect_sign, "elect_sign", ("deltas",))
        deltas_ = [torch.tensor([0.5, -0.2, 0.0, 0.1, 0.2, 0.6]), torch.tensor([-0.1, -0.3, 0.0, -0.4, -0.9, -0.35]),
                   torch.tensor([0.2, 0.1, 0.0, 0.0, 0.3, -0.35])]
        out = grading.expect_tensor(grading.call(elect_sign, "elect_sign", deltas_), "elect_sign", (6,))
        # largest |Δ|: 0.5, −0.3, none, −0.4, −0.9, 0.6 (the mass says −, two experts say −: the largest decides)
        grading.expect_close(out, torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0]), "elect_sign (by the largest |Δ|)")
        """),
    test("test_elect_sign_matches_the_reference", "elect_sign", setup=REFERENCE_TIES_STEPS, body="""
        g = torch.Generator().manual_seed(1)
        deltas_ = [torch.randn(30, 20, generator=g) * (torch.rand(30, 20, generator=g) > 0.3) for _ in range(4)]
        deltas_[1][:5] = -deltas_[0][:5]   # equal magnitudes, opposite signs: the first expert decides
        out = grading.expect_tensor(grading.call(elect_sign, "elect_sign", deltas_), "elect_sign", (30, 20))
        grading.expect_close(out, max_election(deltas_), "elect_sign on four sparse random deltas")
        """, hidden=True)])


A3 = [
    config("a3_ties"),
    choose("A3_RULE", frequency=[md("""
        # Assignment 3 — TIES with the frequency election: trim, elect, disjoint merge

        Chapter 3 of the book. TIES merges task vectors in three steps: **trim** each to its
        largest-magnitude entries, **elect** a sign per entry, and average only the deltas that
        agree with it (**disjoint merge**). The chapter builds the paper's election, the sign of
        the trimmed deltas' *sum* (the mass); here you build the other one it compares, the
        **frequency** election (mergekit's `consensus_method: count`): the sign that *more
        experts* vote for, whatever their sizes. You will write each step on tensors, then the
        whole merge on state dicts; the hidden tests compare your merge with the package's
        `ties` at `election="frequency"` (unweighted votes, divide by the number of agreeing
        experts). Use only `torch`. Expected time: 1.5–2 hours.
        """)], max=A3_MAX_INTRO),
    SETUP,
    *question("q1_trim", 2, """
        **Question 1.** Write `trim(delta, density)`: a new tensor that keeps the
        k = round(density · n) entries of `delta` with the largest |Δ| (n = `delta.numel()`,
        over the whole tensor) and sets the others to 0; among equal |Δ| at the threshold,
        keep the lower flat indices (a stable sort does it). Raise a `ValueError` naming
        `density` when it is not in (0, 1].
        """, '''
        def trim(delta, density):
            """TIES step 1 (chapter 3): keep the round(density · n) largest-|Δ| entries."""
            # BEGIN SOLUTION
            if not 0 < density <= 1:
                raise ValueError(f"trim: density must be in (0, 1], got {density}")
            k = round(density * delta.numel())
            flat = delta.reshape(-1)
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[torch.argsort(flat.abs(), descending=True, stable=True)[:k]] = True
            return torch.where(keep, flat, torch.zeros_like(flat)).reshape(delta.shape)
            # END SOLUTION
        ''', [
        test("test_trim_on_a_toy", "trim", """
            grading.expect_signature(trim, "trim", ("delta", "density"))
            delta = torch.tensor([[0.1, -0.5], [0.3, -0.2]])
            out = grading.expect_tensor(grading.call(trim, "trim", delta, 0.5), "trim(delta, 0.5)", delta.shape)
            grading.expect_close(out, torch.tensor([[0.0, -0.5], [0.3, 0.0]]), "trim(delta, 0.5)")
            grading.expect_raises(lambda d: trim(delta, d), "trim(delta, density)", (0.0,), ValueError,
                                  "(density must be in (0, 1])")
            """),
        test("test_trim_matches_the_package", "trim", """
            from merging_helpers.drop import magnitude_keep_mask
            delta = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
            for density in ⟨A3_DENSITIES⟩:
                out = grading.expect_tensor(grading.call(trim, "trim", delta, density), f"trim(delta, {density})",
                                            delta.shape)
                grading.expect_close(out, delta * magnitude_keep_mask(delta, density), f"trim(delta, {density})")
            """, hidden=True)]),
    choose("A3_RULE", frequency=question("q2_elect_sign", 2, """
        **Question 2.** Write `elect_sign(deltas)`: for a list of same-shaped tensors, the
        tensor of elected signs by frequency: per entry, count the experts whose delta is
        positive and those whose delta is negative (a zero votes for neither); +1.0 where the
        positive votes are at least as many, −1.0 where the negative votes are more.
        """, '''
        def elect_sign(deltas):
            """TIES step 2, frequency election: γ = sign(Σ_t sign(Δ_t)), with +1 for a tied vote."""
            # BEGIN SOLUTION
            votes = torch.stack(list(deltas)).sign().sum(dim=0)
            return torch.where(votes >= 0, 1.0, -1.0)
            # END SOLUTION
        ''', [
        test("test_elect_sign_on_a_toy", "elect_sign", """
            grading.expect_signature(elect_sign, "elect_sign", ("deltas",))
            deltas_ = [torch.tensor([0.5, -0.2, 0.0, 0.1, 0.2]), torch.tensor([-0.1, -0.3, 0.0, -0.4, -0.9]),
                       torch.tensor([0.2, 0.1, 0.0, 0.0, 0.3])]
            out = grading.expect_tensor(grading.call(elect_sign, "elect_sign", deltas_), "elect_sign", (5,))
            # votes: 2+ 1−, 1+ 2−, none, 1+ 1− (a tie), 2+ 1− (the mass says −, the experts +)
            grading.expect_close(out, torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]), "elect_sign (by the number of votes)")
            """),
        test("test_elect_sign_matches_the_package", "elect_sign", """
            from merging_helpers.consensus import elect_sign as reference
            g = torch.Generator().manual_seed(1)
            deltas_ = [torch.randn(30, 20, generator=g) * (torch.rand(30, 20, generator=g) > 0.3) for _ in range(4)]
            out = grading.expect_tensor(grading.call(elect_sign, "elect_sign", deltas_), "elect_sign", (30, 20))
            grading.expect_close(out, reference(deltas_, "frequency"), "elect_sign on four sparse random deltas")
            """, hidden=True)]), max=A3_MAX_Q2),
    *question("q3_disjoint_merge", 2, """
        **Question 3.** Write `disjoint_merge(deltas, signs)`: per entry, the mean of the
        deltas that are nonzero and have the elected sign; 0 where none does.
        """, '''
        def disjoint_merge(deltas, signs):
            """TIES step 3 (chapter 3): average the deltas that agree with the elected sign."""
            # BEGIN SOLUTION
            stacked = torch.stack(list(deltas))
            agree = stacked.sign() == signs
            count = agree.sum(dim=0)
            total = (stacked * agree).sum(dim=0)
            return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
            # END SOLUTION
        ''', [
        test("test_disjoint_merge_on_a_toy", "disjoint_merge", """
            grading.expect_signature(disjoint_merge, "disjoint_merge", ("deltas", "signs"))
            deltas_ = [torch.tensor([0.5, -0.2, 0.0]), torch.tensor([0.3, 0.4, 0.0]), torch.tensor([-0.1, -0.6, 0.0])]
            out = grading.call(disjoint_merge, "disjoint_merge", deltas_, torch.tensor([1.0, -1.0, 1.0]))
            out = grading.expect_tensor(out, "disjoint_merge", (3,))
            grading.expect_close(out, torch.tensor([0.4, -0.4, 0.0]), "disjoint_merge (mean of the agreeing deltas)")
            """),
        test("test_disjoint_merge_matches_the_package", "disjoint_merge", """
            from merging_helpers.consensus import disjoint_merge as reference, elect_sign as elect
            g = torch.Generator().manual_seed(2)
            deltas_ = [torch.randn(30, 20, generator=g) * (torch.rand(30, 20, generator=g) > 0.5) for _ in range(3)]
            signs = elect(deltas_, "frequency")
            out = grading.expect_tensor(grading.call(disjoint_merge, "disjoint_merge", deltas_, signs),
                                        "disjoint_merge", (30, 20))
            grading.expect_close(out, reference(deltas_, signs, "count"), "disjoint_merge on sparse random deltas")
            """, hidden=True)]),
    *question("q4_ties_merge", 3, """
        **Question 4.** Write `ties_merge(base, vectors, density, lam)`: for every tensor of
        the task vectors, trim each expert's delta (question 1), elect the signs of the
        trimmed deltas (2), merge them disjointly (3), and return θ_b + λ · merged in the
        base's dtypes (names the vectors lack: copied from the base).
        """, '''
        def ties_merge(base, vectors, density, lam):
            """TIES (chapter 3): trim → elect → disjoint merge, tensor by tensor."""
            # BEGIN SOLUTION
            merged = {}
            for name, tensor in base.items():
                if name in vectors[0]:
                    trimmed = [trim(v[name], density) for v in vectors]
                    combined = disjoint_merge(trimmed, elect_sign(trimmed))
                    merged[name] = (tensor.float() + lam * combined).to(tensor.dtype)
                else:
                    merged[name] = tensor.clone()
            return merged
            # END SOLUTION
        ''', [
        test("test_ties_merge_is_a_state_dict", "ties_merge, zoo", setup=REFERENCE_TIES_STEPS, body="""
            grading.expect_signature(ties_merge, "ties_merge", ("base", "vectors", "density", "lam"))
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            ties = grading.using(ties_merge, **steps)   # with the package's steps: graded apart from questions 1–3
            grading.expect_state_dict(grading.call(ties, "ties_merge", zoo.base, vectors, 0.2, 1.0), "ties_merge", zoo.base)
            """),
        test("test_ties_merge_matches_the_package", "ties_merge, zoo", setup=REFERENCE_TIES_STEPS, body="""
            from merging_helpers.recipes import merge_state_dicts
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            density, lam = ⟨A3_MERGE⟩
            ours = grading.call(grading.using(ties_merge, **steps), "ties_merge", zoo.base, vectors, density, lam)
            if "⟨A3_RULE⟩" == "frequency":
                want = merge_state_dicts(zoo.base, zoo.experts, "ties", density=density, lam=lam, election="frequency",
                                         progress=False)
            else:   # the package has no max election: its trim and disjoint merge around the reference election
                want = {}
                for name, tensor in zoo.base.items():
                    trimmed = [steps["trim"](v[name], density) for v in vectors] if name in vectors[0] else None
                    want[name] = tensor if trimmed is None else (tensor.float() + lam * steps["disjoint_merge"](
                        trimmed, steps["elect_sign"](trimmed))).to(tensor.dtype)
            grading.expect_state_dicts_close(ours, want, f"ties_merge(density={density}, λ={lam})")
            """, hidden=True)]),
    md("""
        Your TIES (⟨A3_RULE⟩ election) against the chapter's (mass election) and Task Arithmetic on
        the validation split (λ = 1, density 0.2), and how many entries the two elections decide
        differently:
        """),
    code("""
        from merging_helpers import deltas, evaluation
        from merging_helpers.recipes import merge_state_dicts
        vectors = deltas.task_vectors(zoo.base, zoo.experts)
        print("TIES, ⟨A3_RULE⟩:", evaluator.accuracy(ties_merge(zoo.base, vectors, 0.2, 1.0), "validation"))
        mass = merge_state_dicts(zoo.base, zoo.experts, "ties", density=0.2, lam=1.0, progress=False)
        print("TIES, mass:     ", evaluator.accuracy(mass, "validation"))
        print("TA (λ = 0.4):   ", evaluator.accuracy(evaluation.task_arithmetic_state(zoo.base, zoo.experts, 0.4), "validation"))
        name = "encoder.layer.5.output.dense.weight"
        trimmed = [trim(v[name], 0.2) for v in vectors]
        differ = (elect_sign(trimmed) != torch.where(sum(trimmed) >= 0, 1.0, -1.0)).float().mean()
        print(f"{name}: the elections differ on {float(differ):.1%} of the entries")
        """),
]

# ----------------------------------------------------------------------------- assignment 4

A4 = [
    config("a4_magprune"),
    md("""
        # Assignment 4 (open-ended) — DELLA's MagPrune against TIES at equal density

        Chapter 3 of the book, and one method it only mentions. DELLA replaces TIES's
        deterministic trim with a *random* drop whose keep probability grows with the
        entry's magnitude rank (MagPrune), and divides each survivor by its own keep
        probability. You will write MagPrune, build DELLA from it and the TIES steps, and
        compare the two at the same density with λ chosen on validation. Part of the grade
        is a short written verdict. MagPrune is yours to write with `torch`; TIES is not this
        assignment's subject, so its steps (`consensus.elect_sign`, `consensus.disjoint_merge`),
        the package's TIES as the comparator and `deltas` may be used. Expected time: 2–3 hours.

        MagPrune, per row of a matrix (a 1-D tensor is one row) with n entries: rank the
        entries by |Δ| (rank 0 the smallest, ties by position), and keep entry i with
        probability p_i = (density − ε) + 2ε · rank_i / (n − 1), so the probabilities run
        from density − ε to density + ε and average `density`.
        """),
    SETUP,
    *question("q1_keep_probability", 3, """
        **Question 1.** Write `magprune_keep_prob(delta, density, epsilon)`: the tensor of
        keep probabilities above, with `delta`'s shape. Raise a `ValueError` naming
        `epsilon` unless 0 ≤ ε, density − ε > 0 and density + ε ≤ 1.
        """, '''
        def magprune_keep_prob(delta, density, epsilon):
            """DELLA's MagPrune (chapter 3): keep probabilities from the |Δ| rank within each row."""
            # BEGIN SOLUTION
            if not (epsilon >= 0 and density - epsilon > 0 and density + epsilon <= 1):
                raise ValueError(f"magprune: epsilon = {epsilon} must keep density ± epsilon in (0, 1]")
            rows = delta.abs().reshape(delta.shape[0] if delta.dim() > 1 else 1, -1)
            n = rows.shape[1]
            if n == 1:
                return torch.full(delta.shape, float(density))
            order = torch.argsort(rows, dim=1, stable=True)
            ranks = torch.empty_like(rows).scatter_(1, order, torch.arange(n, dtype=rows.dtype).expand_as(rows))
            return ((density - epsilon) + 2 * epsilon * ranks / (n - 1)).reshape(delta.shape)
            # END SOLUTION
        ''', [
        test("test_keep_probability_on_a_toy", "magprune_keep_prob", setup=A4_PERMITS, body="""
            grading.expect_signature(magprune_keep_prob, "magprune_keep_prob", ("delta", "density", "epsilon"))
            out = grading.call(magprune_keep_prob, "magprune_keep_prob", torch.tensor([0.3, -0.1, 0.2]), 0.5, 0.2)
            out = grading.expect_tensor(out, "magprune_keep_prob", (3,))
            grading.expect_close(out, torch.tensor([0.7, 0.3, 0.5]), "magprune_keep_prob([0.3, -0.1, 0.2], 0.5, 0.2)")
            grading.expect_raises(lambda e: magprune_keep_prob(torch.ones(3), 0.5, e),
                                  "magprune_keep_prob(delta, 0.5, epsilon)", (0.6,), ValueError,
                                  "(density − ε must stay above 0)")
            """),
        test("test_keep_probability_matches_the_package", "magprune_keep_prob", setup=A4_PERMITS, body="""
            from merging_helpers.drop import magprune_keep_prob as reference
            delta = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
            density, epsilon = ⟨A4_KEEP⟩
            out = grading.expect_tensor(grading.call(magprune_keep_prob, "magprune_keep_prob", delta, density, epsilon),
                                        "magprune_keep_prob", delta.shape)
            grading.expect_close(out, reference(delta, density, epsilon),
                                 f"magprune_keep_prob(16×40 matrix, {density}, {epsilon})")
            grading.expect_close(out.mean(dim=1), torch.full((16,), density), "each row's mean keep probability")
            """, hidden=True)]),
    *question("q2_magprune", 3, """
        **Question 2.** Write `magprune(delta, density, epsilon, generator)`: keep entry i
        when a uniform number drawn with `torch.rand(..., generator=generator)` is below
        p_i, divide each kept entry by its p_i, set the rest to 0.
        """, '''
        def magprune(delta, density, epsilon, generator):
            """MagPrune (chapter 3): a rank-dependent random drop, each survivor divided by its keep probability."""
            # BEGIN SOLUTION
            prob = magprune_keep_prob(delta, density, epsilon)
            keep = torch.rand(delta.shape, generator=generator) < prob
            return torch.where(keep, delta / prob, torch.zeros_like(delta))
            # END SOLUTION
        ''', [
        test("test_magprune_keeps_or_rescales", "magprune", setup=A4_PERMITS, body="""
            from merging_helpers.drop import magprune_keep_prob as reference
            grading.expect_signature(magprune, "magprune", ("delta", "density", "epsilon", "generator"))
            delta = torch.randn(8, 30, generator=torch.Generator().manual_seed(4))
            pruned = grading.using(magprune, magprune_keep_prob=reference)   # graded apart from your question 1
            out = grading.call(pruned, "magprune", delta, 0.4, 0.1, torch.Generator().manual_seed(0))
            out = grading.expect_tensor(out, "magprune", delta.shape)
            prob = reference(delta, 0.4, 0.1)
            kept = out != 0
            grading.expect_close(out[kept], (delta / prob)[kept], "the kept entries of magprune (Δ_i / p_i)")
            """),
        test("test_magprune_is_unbiased_and_keeps_a_fraction_density", "magprune", setup=A4_PERMITS, body="""
            from merging_helpers.drop import magprune_keep_prob as reference
            pruned = grading.using(magprune, magprune_keep_prob=reference)
            delta = torch.linspace(-1, 1, 60).reshape(3, 20) + 0.005
            draws, generator = 3000, torch.Generator().manual_seed(5)
            outs = [grading.expect_tensor(grading.call(pruned, "magprune", delta, 0.3, 0.1, generator), "magprune",
                                          delta.shape) for _ in range(draws)]
            kept = sum(int((o != 0).sum()) for o in outs)
            grading.expect_rate(kept, draws * delta.numel(), 0.3, "entries kept by magprune(density=0.3)")
            prob = reference(delta, 0.3, 0.1)
            mean = sum(outs) / draws
            standard_error = delta.abs() * ((1 - prob) / prob).sqrt() / draws ** 0.5
            worst = float(((mean - delta).abs() / standard_error).max())
            # 5.5 standard errors over 60 entries: a correct answer fails with a chance below 1e-6
            assert worst < 5.5, f"the mean of {draws} magprune draws is {worst:.1f} standard errors from Δ: biased"
            """, hidden=True)]),
    *question("q3_compare", 4, """
        **Question 3.** Write `compare_at_density(evaluator, zoo, density, grid, epsilon=0.1, seed=0)`.
        For each of two merges of the zoo's experts at the same `density`:

        * `"ties"`: the package's TIES, `merge_state_dicts(zoo.base, zoo.experts, "ties", density=density, lam=lam, progress=False)`;
        * `"della"`: your MagPrune on every tensor of every task vector (one generator seeded
          with `seed`), then the TIES election and disjoint merge of the pruned deltas
          (`merging_helpers.consensus.elect_sign(pruned, "total")` and
          `disjoint_merge(pruned, signs, "count")`), θ_b + λ · merged;

        choose λ from `grid` by the mean validation accuracy over the tasks (ties: the
        smallest λ), then score that merge on the test split. The merged delta does not
        depend on λ: merge once at λ = 1 and get every λ as θ_b + λ (θ_1 − θ_b)
        (`deltas.apply_delta(zoo.base, deltas.task_vector(zoo.base, merged_at_1), lam)`). Return
        `{"ties": (lam, test_mean), "della": (lam, test_mean)}`.
        """, '''
        from merging_helpers import deltas   # this question may use these parts of the package (TIES is not its subject)
        from merging_helpers.consensus import disjoint_merge, elect_sign
        from merging_helpers.recipes import merge_state_dicts


        def della_merge(base, vectors, density, epsilon, lam, seed):
            """DELLA (chapter 3): MagPrune each delta, then TIES's election and disjoint merge."""
            # BEGIN SOLUTION
            generator = torch.Generator().manual_seed(seed)
            merged = {}
            for name, tensor in base.items():
                if name in vectors[0]:
                    pruned = [magprune(v[name], density, epsilon, generator) for v in vectors]
                    combined = disjoint_merge(pruned, elect_sign(pruned, "total"), "count")
                    merged[name] = (tensor.float() + lam * combined).to(tensor.dtype)
                else:
                    merged[name] = tensor.clone()
            return merged
            # END SOLUTION


        def compare_at_density(evaluator, zoo, density, grid, epsilon=0.1, seed=0):
            """TIES and DELLA at one density, each with λ chosen on validation; their test means."""
            # BEGIN SOLUTION
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            at_1 = {"ties": merge_state_dicts(zoo.base, zoo.experts, "ties", density=density, lam=1.0, progress=False),
                    "della": della_merge(zoo.base, vectors, density, epsilon, 1.0, seed)}
            mean = lambda scores: sum(scores.values()) / len(scores)
            out = {}
            for method, merged in at_1.items():
                delta = deltas.task_vector(zoo.base, merged)
                merge = lambda lam: deltas.apply_delta(zoo.base, delta, lam)
                validation = {lam: mean(evaluator.accuracy(merge(lam), "validation")) for lam in grid}
                best = min(lam for lam, s in validation.items() if s == max(validation.values()))
                out[method] = (best, mean(evaluator.accuracy(merge(best), "test")))
            return out
            # END SOLUTION
        ''', [
        test("test_compare_returns_both_methods", "compare_at_density, zoo, evaluator", setup=A4_PERMITS, body="""
            grading.expect_signature(compare_at_density, "compare_at_density",
                                     ("evaluator", "zoo", "density", "grid", "epsilon", "seed"))
            result = grading.call(compare_at_density, "compare_at_density", evaluator, zoo, 0.2, (1.0,))
            grading.expect_keys(result, "compare_at_density", ("ties", "della"))
            for method, pair in result.items():
                grading.expect_pair(pair, f"compare_at_density(...)[{method!r}]", "(lam, test_mean)")
                assert pair[0] == 1.0, f"{method}: λ = {pair[0]!r}, but the grid is (1.0,)"
                assert 0 <= pair[1] <= 1, f"{method}: the test mean {pair[1]!r} is not an accuracy"
            """),
        test("test_compare_chooses_on_validation", "compare_at_density, della_merge, zoo, evaluator",
             setup=REFERENCE_MAGPRUNE, body="""
            from merging_helpers.recipes import merge_state_dicts
            grid = (0.6, 1.0)
            grading.expect_own_code(della_merge, "della_merge")
            della = grading.using(della_merge, magprune=reference_magprune)   # graded apart from question 2
            recorder = grading.SplitRecorder(evaluator)
            compare = grading.using(compare_at_density, della_merge=della)
            result = grading.call(compare, "compare_at_density", recorder, zoo, 0.2, grid)
            grading.expect_splits(recorder, "compare_at_density", validation=2 * len(grid), test=2)
            grading.expect_keys(result, "compare_at_density", ("ties", "della"))
            for method in result:
                grading.expect_pair(result[method], f"compare_at_density(...)[{method!r}]", "(lam, test_mean)")
            mean = lambda scores: sum(scores.values()) / len(scores)
            at_1 = merge_state_dicts(zoo.base, zoo.experts, "ties", density=0.2, lam=1.0, progress=False)
            ties = {lam: deltas.apply_delta(zoo.base, deltas.task_vector(zoo.base, at_1), lam) for lam in grid}
            validation = {lam: mean(evaluator.accuracy(ties[lam], "validation")) for lam in grid}
            best = min(lam for lam, s in validation.items() if s == max(validation.values()))
            assert result["ties"][0] == best, f"TIES: λ = {result['ties'][0]}, but validation picks λ = {best}"
            want = mean(evaluator.accuracy(ties[best], "test"))
            # the same merge scored by the same evaluator: equal up to summation order, far below 0.003
            assert abs(result["ties"][1] - want) < 0.003, f"TIES's test mean is {want:.4f}, you report {result['ties'][1]:.4f}"
            della = merge_state_dicts(zoo.base, zoo.experts, "della", density=0.2, epsilon=0.1,
                                      lam=result["della"][0], seed=0, progress=False)
            want = mean(evaluator.accuracy(della, "test"))
            assert abs(result["della"][1] - want) < 0.05, (
                f"DELLA at λ = {result['della'][0]}: your test mean {result['della'][1]:.4f} is far from the package's "
                f"{want:.4f} (another random mask moves it by a point or two, not five)")
            """, hidden=True)]),
    md("""
        Your comparison (λ from the grid below, chosen on validation):
        """),
    code("""
        result = compare_at_density(evaluator, zoo, 0.2, (0.6, 1.0, 1.4))
        result
        """),
    *question("q4_verdict", 3, """
        **Question 4 (written).** From your numbers: which merge is better at density 0.2 on
        this zoo, and by how much? Is the difference larger than what another seed of
        DELLA's mask could make (rerun with two more seeds and say what you saw)? Name one
        reason MagPrune might help or hurt compared with a deterministic trim. Four to six sentences.
        """, """
        A full answer quotes both test means and λs from `result`, reruns DELLA with
        seeds 1 and 2 (`compare_at_density(..., seed=s)`) and compares the spread of the three
        DELLA numbers with the TIES − DELLA gap: a gap inside that spread is not evidence for
        either method. Reasons: MagPrune keeps some small entries (which a trim always drops)
        and rescales survivors by 1/p_i, which keeps each delta unbiased but adds variance;
        TIES's trim is biased (it shrinks the delta) but has no variance. On a zoo of light
        fine-tunes with small, spread-out deltas, either can win by a point; a gap under a
        point is noise at this test size.
        """, [], manual=True),
]

# ----------------------------------------------------------------------------- assignment 5

A5 = [
    config("a5_rms_rates"),
    md("""
        # Assignment 5 — RMS-adaptive drop rates

        Chapter 7 of the book. The RMS-adaptive method gives every delta *matrix* its own
        DARE drop rate from its size: p_k^t = p_default − λ (rms_k^t − rms_mean) / σ, where
        rms = ‖δ‖_F / √N and rms_mean is the mean RMS of the matrices of the same role
        (attention or ffn) over all experts — or over the expert's own matrices when the
        experts differ a lot (their average RMS values have a coefficient of variation
        above 50 %). You will compute the RMS, the dispersion and the rates, and check them
        against the package on the grading zoo. Use only `torch` and `math`. Expected time: 1–1.5 hours.

        A matrix's role is `describe(name).role` (`from merging_helpers.partitions import describe`).
        """),
    SETUP,
    *question("q1_matrix_rms", 2, """
        **Question 1.** Write `matrix_rms(delta)`: ‖δ‖_F / √N as a Python float (N =
        number of entries; compute in float64 so large matrices do not lose digits).
        """, '''
        def matrix_rms(delta):
            """The root mean square of a delta matrix (chapter 7)."""
            # BEGIN SOLUTION
            values = delta.detach().double()
            return float(values.pow(2).sum().sqrt() / values.numel() ** 0.5)
            # END SOLUTION
        ''', [
        test("test_matrix_rms_on_a_toy", "matrix_rms", """
            grading.expect_signature(matrix_rms, "matrix_rms", ("delta",))
            got = grading.call(matrix_rms, "matrix_rms", torch.tensor([[3.0, -4.0], [0.0, 0.0]]))
            grading.expect_close(grading.expect_number(got, "matrix_rms"), torch.tensor(2.5), "matrix_rms([[3, -4], [0, 0]]) = 5 / √4")
            """),
        test("test_matrix_rms_matches_the_package", "matrix_rms, zoo", """
            from merging_helpers.rms_adaptive import matrix_rms as reference
            delta = deltas.task_vector(zoo.base, zoo.experts[zoo.task_names[0]])
            for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.5.output.dense.weight"):
                got = grading.call(matrix_rms, "matrix_rms", delta[name])
                grading.expect_close(grading.expect_number(got, "matrix_rms"), torch.tensor(reference(delta[name])), f"matrix_rms({name})")
            """, hidden=True)]),
    *question("q2_cv", 2, """
        **Question 2.** Write `cv_percent(table)`: `table` maps expert → {matrix name → rms};
        return σ/μ × 100 of the experts' *average* RMS (σ the sample standard deviation, with
        n − 1, as the slides compute it).
        """, '''
        def cv_percent(table):
            """The experts' dispersion: σ/μ of their average RMS, in percent (chapter 7)."""
            # BEGIN SOLUTION
            averages = torch.tensor([sum(v.values()) / len(v) for v in table.values()], dtype=torch.float64)
            return float(averages.std(unbiased=True) / averages.mean() * 100)
            # END SOLUTION
        ''', [
        test("test_cv_on_a_toy", "cv_percent", """
            grading.expect_signature(cv_percent, "cv_percent", ("table",))
            table = {"a": {"m1": 1.0, "m2": 3.0}, "b": {"m1": 4.0, "m2": 8.0}, "c": {"m1": 3.0, "m2": 5.0}}  # averages 2, 6, 4: σ = 2, μ = 4
            got = grading.call(cv_percent, "cv_percent", table)
            grading.expect_close(grading.expect_number(got, "cv_percent"), torch.tensor(50.0), "cv_percent of averages 2, 6 and 4 (sample σ)")
            """),
        test("test_cv_matches_the_package", "cv_percent, zoo", """
            from merging_helpers import rms_adaptive
            table = rms_adaptive.rms_table({n: deltas.task_vector(zoo.base, zoo.experts[n]) for n in zoo.task_names})
            got = grading.call(cv_percent, "cv_percent", table)
            grading.expect_close(grading.expect_number(got, "cv_percent"), torch.tensor(rms_adaptive.cv_percent(table)), "cv_percent(zoo)")
            """, hidden=True)]),
    *question("q3_rates", 4, """
        **Question 3.** Write `adaptive_rates(table, p_default, lam, cv_threshold=50.0)`:
        expert → {matrix name → p}, with p = p_default − λ (rms − mean) / σ clipped to
        [0, 0.99] — λ in units of 1/σ, as chapter 7 reads it, so that λ = 0.05 moves a matrix
        one standard deviation above the mean by 0.05. Here `mean` is the mean RMS of the
        matrices of the same role over *all* experts when `cv_percent(table)` ≤ `cv_threshold`,
        and over that expert's own matrices of the role when it is larger; σ is the population
        standard deviation (divide by n) of the RMS values of that role over all experts'
        matrices, whichever mean is used (where σ = 0, the rate is p_default).
        """, '''
        from merging_helpers.partitions import describe


        def adaptive_rates(table, p_default, lam, cv_threshold=50.0):
            """One DARE drop rate per matrix from its RMS (chapter 7)."""
            # BEGIN SOLUTION
            own = cv_percent(table) > cv_threshold
            role = {n: describe(n).role for v in table.values() for n in v}

            def by_role(pairs):
                out = {}
                for n, x in pairs:
                    out.setdefault(role[n], []).append(x)
                return out

            pooled = by_role((n, x) for v in table.values() for n, x in v.items())
            sigma = {r: torch.tensor(v, dtype=torch.float64).std(unbiased=False).item() for r, v in pooled.items()}
            rates = {}
            for t, values in table.items():
                means = {r: sum(v) / len(v) for r, v in (by_role(values.items()) if own else pooled).items()}
                rates[t] = {}
                for n, x in values.items():
                    r = role[n]
                    step = lam * (x - means[r]) / sigma[r] if sigma[r] > 0 else 0.0
                    rates[t][n] = min(max(p_default - step, 0.0), 0.99)
            return rates
            # END SOLUTION
        ''', [
        test("test_rates_on_a_toy", "adaptive_rates", """
            grading.expect_signature(adaptive_rates, "adaptive_rates", ("table", "p_default", "lam", "cv_threshold"))
            q, f = "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight"
            table = {"a": {q: 0.010, f: 0.020}, "b": {q: 0.014, f: 0.030}, "c": {q: 0.015, f: 0.022}}  # CV 18.9 %
            cv = lambda table: 18.9   # the global means: graded apart from your question 2
            rates = grading.call(grading.using(adaptive_rates, cv_percent=cv), "adaptive_rates", table, 0.9, 0.05)
            grading.expect_keys(rates, "adaptive_rates", ("a", "b", "c"))
            got = torch.tensor([rates[t][n] for t in "abc" for n in (q, f)])
            # query: mean 0.013, σ 0.00216; ffn: mean 0.024, σ 0.00432 (population σ over the three experts)
            want = torch.tensor([0.969444, 0.946291, 0.876852, 0.830564, 0.853704, 0.923146])
            grading.expect_close(got, want, "adaptive_rates (a-q, a-ffn, b-q, b-ffn, c-q, c-ffn)")
            """),
        test("test_rates_match_the_package", "adaptive_rates, zoo", """
            import warnings
            from merging_helpers import rms_adaptive
            table = rms_adaptive.rms_table({n: deltas.task_vector(zoo.base, zoo.experts[n]) for n in zoo.task_names})
            spread = {t: {n: x * (1 + 3 * i) for n, x in v.items()} for i, (t, v) in enumerate(table.items())}  # CV > 50
            rates = grading.using(adaptive_rates, cv_percent=rms_adaptive.cv_percent)   # apart from question 2
            p_default, lams = ⟨A5_RATES⟩
            for case, tab, lam in (("the zoo", table, lams[0]), ("experts far apart (CV > 50 %)", spread, lams[1])):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    want, _ = rms_adaptive.adaptive_rates(tab, p_default, lam, scale="std")
                got = grading.call(rates, "adaptive_rates", tab, p_default, lam)
                grading.expect_keys(got, "adaptive_rates", tuple(tab))
                for t in tab:
                    grading.expect_keys(got[t], f"adaptive_rates(...)[{t!r}]", tuple(tab[t]))
                    grading.expect_close(torch.tensor([got[t][n] for n in tab[t]]), torch.tensor([want[t][n] for n in tab[t]]),
                                         f"the rates of expert {t!r} on {case}")
            """, hidden=True)]),
    md("""
        The rates of the grading zoo's experts, layer by layer:
        """),
    code("""
        from merging_helpers import deltas, rms_adaptive
        table = rms_adaptive.rms_table({n: deltas.task_vector(zoo.base, zoo.experts[n]) for n in zoo.task_names})
        print(f"CV = {cv_percent(table):.1f} %")
        rates = adaptive_rates(table, 0.9, 0.05)
        for t, r in rates.items():
            print(t, "lowest drop rate:", min(r, key=r.get), round(min(r.values()), 3))
        """),
    *question("q4_reading", 2, """
        **Question 4 (written).** Which matrices get the lowest drop rates on this zoo, and
        why does "a larger RMS → drop less" make sense given the variance of DARE's rescale
        (assignment 2)? What would the per-expert branch (CV > 50 %) protect against? Three to five sentences.
        """, """
        Matrices whose deltas are large (high RMS) get lower rates: DARE's rescaled survivors have
        variance Δ² p / (1 − p), which grows with the delta's size and explodes as p → 1, so the
        matrices where the fine-tune put the most change are the ones where dropping 90 % hurts
        most; keeping more of them trades sparsity where it is cheap for accuracy where it is not.
        The per-expert branch protects an expert whose deltas are all small (e.g. a light
        fine-tune merged with a heavy one): against the global mean every one of its matrices
        would look small and be dropped hardest, although within that expert some matter most.
        """, [], manual=True),
]

# ----------------------------------------------------------------------------- assignment 6

A6 = [
    config("a6_dppa_rates"),
    md("""
        # Assignment 6 — DPPA's dynamic pruning rates Θ_lj

        Chapter 6 of the book. DP prunes each linear map j of layer l by magnitude at its own
        rate Θ_lj = α + norm(dif_l) + norm(dif'_lj), where

        * sig(block) = Σ |δ| over the block's *outliers*, the entries with |δ| > N · mean|δ| (N = 5);
        * dif_l = −sig_l + mean_l sig_l (a layer with more outlier mass is pruned less);
        * dif'_lj = −sig_lj + Σ_j sig_lj n_lj / Σ_j n_lj within layer l (n_lj: the map's entry count) —
          the *per-layer* reading of the paper's Eq. 2; chapter 6 uses the printed one, a mean over
          every linear map of the model, and `dp_rates(..., eq2_mean="layer")` gives this one;
        * norm(x) = x · λ / max|x|, over all layers for dif and over all linear maps of the model for dif'.

        You will write sig and Θ and check them against the package's per-layer `dp_rates` on the
        grading zoo. Use only `torch`. Expected time: 1–1.5 hours.
        """),
    SETUP,
    *question("q1_significance", 2, """
        **Question 1.** Write `significance(tensors, n=5.0)`: for a list of tensors taken
        together as one block, Σ |δ| over the entries with |δ| > n · mean|δ| (in float64; 0 for an empty block).
        """, '''
        def significance(tensors, n=5.0):
            """DP's sig (chapter 6): the |δ| mass of a block's outliers."""
            # BEGIN SOLUTION
            values = torch.cat([t.detach().abs().flatten().double() for t in tensors])
            if values.numel() == 0:
                return 0.0
            return float(values[values > n * values.mean()].sum())
            # END SOLUTION
        ''', [
        test("test_significance_on_a_toy", "significance", """
            grading.expect_signature(significance, "significance", ("tensors", "n"))
            block = [torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 30.0])]   # mean |δ| = 3.9
            got = grading.call(significance, "significance", block, 5.0)
            grading.expect_close(grading.expect_number(got, "significance"), torch.tensor(30.0), "significance (only 30 > 5 · 3.9)")
            """),
        test("test_significance_matches_the_package", "significance", """
            from merging_helpers.dppa import significance as reference
            g = torch.Generator().manual_seed(0)
            block = [torch.randn(50, 40, generator=g) ** 3, torch.randn(40, generator=g) ** 3]   # heavy tails
            for n in ⟨A6_NS⟩:
                got = grading.call(significance, "significance", block, n)
                grading.expect_close(grading.expect_number(got, "significance"), torch.tensor(reference(block, n)), f"significance(n={n})")
            """, hidden=True)]),
    *question("q2_theta", 4, """
        **Question 2.** Write `theta(layer_sig, linear_sig, sizes, alpha, lam=0.08)`: given
        the significance of each layer (a tensor of L values), of each linear map (an L × J
        tensor) and the maps' entry counts (L × J), return the L × J tensor of Θ_lj.
        """, '''
        def theta(layer_sig, linear_sig, sizes, alpha, lam=0.08):
            """DP's pruning rate of every linear map of every layer (chapter 6, Eqs. 1–5)."""
            # BEGIN SOLUTION
            def norm(x):
                top = x.abs().max()
                return torch.zeros_like(x) if float(top) == 0 else x * lam / top

            layer_sig, linear_sig, sizes = (torch.as_tensor(x, dtype=torch.float64) for x in (layer_sig, linear_sig, sizes))
            dif = -layer_sig + layer_sig.mean()
            weighted = (linear_sig * sizes).sum(dim=1, keepdim=True) / sizes.sum(dim=1, keepdim=True)
            dif_linear = -linear_sig + weighted
            return alpha + norm(dif)[:, None] + norm(dif_linear)
            # END SOLUTION
        ''', [
        test("test_theta_on_a_toy", "theta", """
            grading.expect_signature(theta, "theta", ("layer_sig", "linear_sig", "sizes", "alpha", "lam"))
            got = grading.call(theta, "theta", torch.tensor([1.0, 3.0]), torch.tensor([[1.0, 3.0], [2.0, 2.0]]),
                               torch.tensor([[1.0, 1.0], [1.0, 1.0]]), 0.5, 0.1)
            got = grading.expect_tensor(got, "theta", (2, 2))
            # dif = [1, −1] → norm [0.1, −0.1]; dif' = [[1, −1], [0, 0]] → norm [[0.1, −0.1], [0, 0]]
            grading.expect_close(got, torch.tensor([[0.7, 0.5], [0.4, 0.4]], dtype=got.dtype), "theta on two layers")
            """),
        test("test_theta_matches_dp_rates_on_the_zoo", "theta, significance, zoo", """
            from merging_helpers import dppa
            delta = deltas.task_vector(zoo.base, zoo.experts[zoo.task_names[0]])
            layers, linears = dppa._structure(delta)
            ids = list(layers)
            maps = sorted({j for (_, j) in linears})
            layer_sig = torch.tensor([dppa.significance([delta[n] for n in layers[l]]) for l in ids])
            linear_sig = torch.tensor([[dppa.significance([delta[n] for n in linears[l, j]]) for j in maps] for l in ids])
            sizes = torch.tensor([[float(sum(delta[n].numel() for n in linears[l, j])) for j in maps] for l in ids])
            alpha, lam = ⟨A6_THETA⟩
            got = grading.expect_tensor(grading.call(theta, "theta", layer_sig, linear_sig, sizes, alpha, lam), "theta",
                                        (len(ids), len(maps)))
            want = dppa.dp_rates(delta, alpha, lam, eq2_mean="layer")
            expected = torch.tensor([[want[linears[l, j][0]] for j in maps] for l in ids])
            grading.expect_close(got, expected, f"theta on the zoo's first expert (α = {alpha}, λ = {lam}) against "
                                 "dp_rates(eq2_mean='layer')")
            """, hidden=True)]),
    md("""
        Your Θ on the first expert at α = 0.5: the size-weighted mean rate (the budget), and the
        maps pruned least and most:
        """),
    code("""
        from merging_helpers.partitions import describe
        expert = zoo.experts[zoo.task_names[0]]
        delta = {n: expert[n].float() - t.float() for n, t in zoo.base.items() if describe(n).layer is not None}
        layer_ids = sorted({describe(n).layer for n in delta})
        kinds = sorted({describe(n).linear for n in delta if describe(n).linear})
        group = lambda l, j=None: [d for n, d in delta.items() if describe(n).layer == l and (j is None or describe(n).linear == j)]
        layer_sig = torch.tensor([significance(group(l)) for l in layer_ids])
        linear_sig = torch.tensor([[significance(group(l, j)) for j in kinds] for l in layer_ids])
        sizes = torch.tensor([[float(sum(d.numel() for d in group(l, j))) for j in kinds] for l in layer_ids])
        rates = theta(layer_sig, linear_sig, sizes, 0.5)
        print(f"size-weighted mean Θ: {float((rates * sizes).sum() / sizes.sum()):.4f} (α = 0.5)")
        order = sorted(((float(rates[i, k]), f"layer {l} {j}") for i, l in enumerate(layer_ids) for k, j in enumerate(kinds)))
        print("pruned least:", ", ".join(f"{w} {r:.3f}" for r, w in order[:3]))
        print("pruned most: ", ", ".join(f"{w} {r:.3f}" for r, w in order[-3:]))
        """),
    *question("q3_budget", 2, """
        **Question 3 (written).** Show that, when all linear maps of a layer have the same
        size and all layers the same number of entries, DP keeps the same number of entries
        as pruning everything at α. Which layers and maps does it prune *less*, and why is
        that a sensible use of a fixed budget on a fine-tune with outliers? Three to five sentences.
        """, """
        dif_l sums to zero over layers (−sig_l + mean sig) and dif'_lj sums to zero within a layer
        when weighted by size (Σ_j n_lj(−sig_lj) + Σ_j n_lj · Σ_j sig_lj n_lj / Σ_j n_lj = 0); norm only
        rescales, so with equal sizes Σ Θ_lj n_lj = α Σ n_lj: the same kept count as α everywhere,
        to rounding. Layers and maps whose outliers carry more |δ| mass get negative dif and so a
        lower pruning rate: they keep more. Outlier entries are where a fine-tune put its largest
        changes, so spending the budget there loses the least of the delta's effect.
        """, [], manual=True),
]

# ----------------------------------------------------------------------------- assignment 7

# The other level an offering may draw (A7_RULE = "block"): attention, FFN and norms of each layer apart
A7_BLOCK_INTRO = [md("""
    # Assignment 7 — APL: which blocks of which layers carry a task, by causal intervention

    Chapter 4 of the book. APL measures how much a *partition* of an expert's parameters
    matters by reverting it to the base and watching the expert's probability of the
    true label on a few-shot set drop: importance(s) = P_t* − P_t, where P_t is the
    clean expert's mean true-label probability and P_t* the one with partition s set back
    to θ_b (more negative = more important). The chapter traces whole layers; you will write
    a finer level it does not print, each layer's **attention**, **FFN** and **norm**
    parameters apart, and a tracing with a *graded* corruption (a fraction of the partition's
    delta kept). Expected time: 1–1.5 hours.

    A parameter's layer and role are `describe(name).layer` and `describe(name).role`
    (`from merging_helpers.partitions import describe`; the layer is `None` outside the
    transformer blocks, the role one of `"attention"`, `"ffn"`, `"norm"`, … ).
    `evaluator.true_label_probability(state_dict, task, examples)` scores a state dict on a
    few-shot set.
    """)]

A7_BLOCK = [
    *question("q1_block_partitions", 2, """
        **Question 1.** Write `block_partitions(names)`: a dict `"layer.l.role"` → the list of
        names of layer l with that role (in the order given), for every (layer, role) that has
        a name, sorted by l and then by role name. Names outside the blocks (embeddings,
        pooler) are in no partition.
        """, '''
        from merging_helpers.partitions import describe


        def block_partitions(names):
            """APL's partitions at the level of blocks: each layer's attention, FFN and norm parameters."""
            # BEGIN SOLUTION
            out = {}
            for name in names:
                info = describe(name)
                if info.layer is not None:
                    out.setdefault((info.layer, info.role), []).append(name)
            return {f"layer.{layer}.{role}": out[layer, role] for layer, role in sorted(out)}
            # END SOLUTION
        ''', [
        test("test_block_partitions_on_the_zoo", "block_partitions, zoo", """
            grading.expect_signature(block_partitions, "block_partitions", ("names",))
            parts = grading.call(block_partitions, "block_partitions", list(zoo.base))
            want = tuple(f"layer.{l}.{role}" for l in range(6) for role in ("attention", "ffn", "norm"))
            grading.expect_keys(parts, "block_partitions", want)
            assert list(parts) == list(want), f"sorted by layer, then role: expected {list(want)[:4]}…, got {list(parts)[:4]}…"
            assert "encoder.layer.3.attention.self.query.weight" in parts["layer.3.attention"], "layer.3.attention lacks its query weight"
            """),
        test("test_block_partitions_match_the_package", "block_partitions, zoo", """
            from merging_helpers import partitions
            names = list(zoo.experts[zoo.task_names[0]])
            want = {k: v for k, v in partitions.group_by(names, "layer_role").items() if k.startswith("layer.")}
            got = grading.call(block_partitions, "block_partitions", names)
            grading.expect_keys(got, "block_partitions", tuple(want))
            for key in want:
                assert got[key] == want[key], f"{key}: the names (in their given order) differ from the package's"
            """, hidden=True)]),
    *question("q2_trace_blocks", 4, """
        **Question 2.** The chapter corrupts a partition by reverting it to the base. Here you
        trace with a *graded* corruption: keep a fraction `keep` of the partition's delta. Write
        `trace_blocks(evaluator, base, expert, task, examples, keep=0.0)`: a dict `"layer.l.role"`
        → P_t* − P_t for every partition of question 1, where P_t =
        `evaluator.true_label_probability(expert, task, examples)` and P_t* is the same for
        `expert` with each tensor of that partition set to θ_b + keep · (θ_t − θ_b) (computed in
        float32). Do not modify `expert`.
        """, '''
        def trace_blocks(evaluator, base, expert, task, examples, keep=0.0):
            """Causal tracing per block of each layer with a graded corruption: P* − P per partition."""
            # BEGIN SOLUTION
            clean = evaluator.true_label_probability(expert, task, examples)
            out = {}
            for key, names in block_partitions(list(expert)).items():
                moved = {n: torch.lerp(base[n].float(), expert[n].float(), keep) for n in names}
                out[key] = evaluator.true_label_probability({**expert, **moved}, task, examples) - clean
            return out
            # END SOLUTION
        ''', [
        test("test_trace_blocks_returns_one_value_per_block", "trace_blocks, zoo, evaluator, examples", """
            from merging_helpers import partitions
            grading.expect_signature(trace_blocks, "trace_blocks", ("evaluator", "base", "expert", "task", "examples",
                                                                    "keep"))
            task = zoo.task_names[0]
            trace = grading.using(trace_blocks, block_partitions=lambda names: {k: v for k, v in partitions.group_by(
                names, "layer_role").items() if k.startswith("layer.")})   # graded apart from your question 1
            before = copy.deepcopy(zoo.experts[task])
            got = grading.call(trace, "trace_blocks", evaluator, zoo.base, zoo.experts[task], task, examples[task])
            grading.expect_unchanged(before, zoo.experts[task], "trace_blocks")
            grading.expect_keys(got, "trace_blocks", tuple(f"layer.{l}.{r}" for l in range(6) for r in ("attention", "ffn", "norm")))
            assert all(-1 <= float(v) <= 1 for v in got.values()), "a difference of two probabilities is in [−1, 1]"
            """),
        test("test_trace_blocks_matches_a_reference", "trace_blocks, zoo, evaluator, examples", """
            from merging_helpers import partitions
            parts = {k: v for k, v in partitions.group_by(list(zoo.base), "layer_role").items() if k.startswith("layer.")}
            trace = grading.using(trace_blocks, block_partitions=lambda names: {k: [n for n in v if n in names]
                                                                                for k, v in parts.items()})
            for task, keep in ((zoo.task_names[⟨A7_TASK⟩], 0.0), (zoo.task_names[⟨A7_TASK⟩], ⟨A7_KEEP⟩)):
                expert = zoo.experts[task]
                before = copy.deepcopy(expert)
                got = grading.call(trace, "trace_blocks", evaluator, zoo.base, expert, task, examples[task], keep)
                clean = evaluator.true_label_probability(expert, task, examples[task])
                want = {k: evaluator.true_label_probability({**expert, **{n: zoo.base[n].float() + keep * (
                        expert[n].float() - zoo.base[n].float()) for n in names}}, task, examples[task]) - clean
                        for k, names in parts.items()}
                grading.expect_keys(got, "trace_blocks", tuple(want))
                # float32 probabilities summed in another order differ by < 1e-5
                grading.expect_close(torch.tensor([float(got[k]) for k in want]), torch.tensor(list(want.values())),
                                     f"trace_blocks on {task!r} at keep = {keep}", atol=1e-4)
                grading.expect_unchanged(before, expert, "trace_blocks")
            """, hidden=True)]),
    code("""
        for name in zoo.task_names:
            for keep in (0.0, 0.5):
                importance = trace_blocks(evaluator, zoo.base, zoo.experts[name], name, examples[name], keep)
                top = sorted(importance, key=importance.get)[:4]
                print(f"{name:10s} keep {keep}  most important:", "  ".join(f"{k}: {importance[k]:+.3f}" for k in top))
        """),
    *question("q3_reading", 2, """
        **Question 3 (written).** Which blocks matter most for each task: attention or FFN, and
        in which layers? Are the norms ever important, given how few parameters they hold? Does
        keeping half of a block's delta recover half of its importance, more, or less? APL turns
        these importances into drop rates (important partitions dropped less): what could go
        wrong if you used them, measured on 16 examples per label? Three to five sentences.
        """, """
        Read the printed rows (and the numbers on the instructors' page, computed on the grading
        zoo): the answer names, per task, the blocks with the most negative P* − P and whether
        they are attention or FFN, and notes that the leading layer is not the same for every
        task. The norms hold a few hundred parameters each: whether they rank high or not, the
        answer should say that importance is not proportional to size, which is why APL's rates
        are per partition, not per parameter. Where P* − P at keep 0.5 is less than half of it at keep 0, half of the
        delta recovers more than half of the probability (the effect saturates); about half means
        the block acts close to linearly. With three times more partitions than the layer level
        and 16 examples per label, many importances are within noise of each other; rates built
        from them can protect the wrong block; several few-shot seeds, or the gradient
        approximation on more examples, address it.
        """, [], manual=True),
]


A7 = [
    config("a7_apl_tracing"),
    choose("A7_RULE", layer=[md("""
        # Assignment 7 — APL: which layers carry a task, by causal intervention

        Chapter 4 of the book. APL measures how much a *partition* of an expert's parameters
        matters by reverting it to the base and watching the expert's probability of the
        true label on a few-shot set drop: importance(s) = P_t* − P_t, where P_t is the
        clean expert's mean true-label probability and P_t* the one with partition s set back
        to θ_b (more negative = more important). You will write the layer-level partitions and
        a tracing with a *graded* corruption the chapter does not print (a fraction of the
        layer's delta kept), and compare it with the package's `apl.trace` where the two
        meet. Expected time: 1–1.5 hours.

        A parameter's layer is `describe(name).layer` (`from merging_helpers.partitions import
        describe`; `None` outside the transformer blocks). `evaluator.true_label_probability(state_dict,
        task, examples)` scores a state dict on a few-shot set.
        """)], block=A7_BLOCK_INTRO),
    SETUP,
    code("""
        from merging_helpers.tasks import few_shot
        examples = {name: few_shot(zoo.task(name), 16, seed=0) for name in zoo.task_names}   # 16 per label
        """),
    choose("A7_RULE", layer=[*question("q1_layer_partitions", 2, """
        **Question 1.** Write `layer_partitions(names)`: a dict `"layer.l"` → the list of
        names of layer l (in the order given), for every layer l that has a name, sorted by
        l. Names outside the blocks (embeddings, pooler) are in no partition.
        """, '''
        from merging_helpers.partitions import describe


        def layer_partitions(names):
            """APL's layer-level partitions (chapter 4): the parameter names of each transformer block."""
            # BEGIN SOLUTION
            out = {}
            for name in names:
                layer = describe(name).layer
                if layer is not None:
                    out.setdefault(layer, []).append(name)
            return {f"layer.{layer}": out[layer] for layer in sorted(out)}
            # END SOLUTION
        ''', [
        test("test_layer_partitions_on_the_zoo", "layer_partitions, zoo", """
            grading.expect_signature(layer_partitions, "layer_partitions", ("names",))
            parts = grading.call(layer_partitions, "layer_partitions", list(zoo.base))
            grading.expect_keys(parts, "layer_partitions", tuple(f"layer.{l}" for l in range(6)))
            assert list(parts) == [f"layer.{l}" for l in range(6)], f"the layers should be sorted, got {list(parts)}"
            assert "encoder.layer.3.attention.self.query.weight" in parts["layer.3"], "layer.3 lacks its query weight"
            """),
        test("test_layer_partitions_match_the_package", "layer_partitions, zoo", """
            from merging_helpers import apl
            want = apl.groups(zoo.experts[zoo.task_names[0]], "layer")
            got = grading.call(layer_partitions, "layer_partitions", list(zoo.experts[zoo.task_names[0]]))
            grading.expect_keys(got, "layer_partitions", tuple(want))
            for key in want:
                assert sorted(got[key]) == sorted(want[key]), f"{key}: the names differ from apl.groups(..., 'layer')"
            """, hidden=True)]),
    *question("q2_trace_layers", 4, """
        **Question 2.** The chapter corrupts a partition by reverting it to the base. Here you
        trace with a *graded* corruption: keep a fraction `keep` of the layer's delta. Write
        `trace_layers(evaluator, base, expert, task, examples, keep=0.0)`: a dict `"layer.l"` →
        P_t* − P_t for every layer partition, where P_t =
        `evaluator.true_label_probability(expert, task, examples)` and P_t* is the same for
        `expert` with each tensor of that layer set to θ_b + keep · (θ_t − θ_b) (computed in
        float32); `keep = 0` is the chapter's tracing. Do not modify `expert`.
        """, '''
        def trace_layers(evaluator, base, expert, task, examples, keep=0.0):
            """Causal tracing at the layer level with a graded corruption: P* − P per layer."""
            # BEGIN SOLUTION
            clean = evaluator.true_label_probability(expert, task, examples)
            out = {}
            for key, names in layer_partitions(list(expert)).items():
                corrupted = {**expert, **{n: base[n].float() + keep * (expert[n].float() - base[n].float()) for n in names}}
                out[key] = evaluator.true_label_probability(corrupted, task, examples) - clean
            return out
            # END SOLUTION
        ''', [
        test("test_trace_layers_returns_one_value_per_layer", "trace_layers, zoo, evaluator, examples", """
            from merging_helpers import apl
            grading.expect_signature(trace_layers, "trace_layers", ("evaluator", "base", "expert", "task", "examples",
                                                                    "keep"))
            task = zoo.task_names[0]
            trace = grading.using(trace_layers, layer_partitions=lambda names: {k: list(v) for k, v in apl.groups(
                {n: zoo.base[n] for n in names}, "layer").items()})   # graded apart from your question 1
            got = grading.call(trace, "trace_layers", evaluator, zoo.base, zoo.experts[task], task, examples[task])
            grading.expect_keys(got, "trace_layers", tuple(f"layer.{l}" for l in range(6)))
            assert all(-1 <= float(v) <= 1 for v in got.values()), "a difference of two probabilities is in [−1, 1]"
            """),
        test("test_trace_layers_matches_the_package", "trace_layers, zoo, evaluator, examples", """
            from merging_helpers import apl
            trace = grading.using(trace_layers, layer_partitions=lambda names: {k: list(v) for k, v in apl.groups(
                {n: zoo.base[n] for n in names}, "layer").items()})   # graded apart from your question 1
            for task in zoo.task_names:
                before = copy.deepcopy(zoo.experts[task])
                got = grading.call(trace, "trace_layers", evaluator, zoo.base, zoo.experts[task], task, examples[task])
                want = apl.trace(evaluator, zoo.base, zoo.experts[task], task, examples[task], "layer", naive=True).as_dict()
                grading.expect_keys(got, "trace_layers", tuple(want))
                grading.expect_close(torch.tensor([float(got[k]) for k in want]), torch.tensor(list(want.values())),
                                     f"trace_layers on {task!r} at keep = 0 (the chapter's tracing)",
                                     atol=1e-4)   # float32 probabilities summed in another order differ by < 1e-5
                grading.expect_unchanged(before, zoo.experts[task], "trace_layers")
            # keep = 0.25: a quarter of each layer's delta kept (the same scorer, state dicts built here)
            task, keep = zoo.task_names[⟨A7_TASK⟩], ⟨A7_KEEP⟩
            expert = zoo.experts[task]
            got = grading.call(trace, "trace_layers", evaluator, zoo.base, expert, task, examples[task], keep)
            clean = evaluator.true_label_probability(expert, task, examples[task])
            parts = apl.groups(expert, "layer")
            want = {k: evaluator.true_label_probability({**expert, **{n: zoo.base[n].float() + keep * (expert[n].float()
                    - zoo.base[n].float()) for n in names}}, task, examples[task]) - clean for k, names in parts.items()}
            grading.expect_keys(got, "trace_layers", tuple(want))
            grading.expect_close(torch.tensor([float(got[k]) for k in want]), torch.tensor(list(want.values())),
                                 f"trace_layers on {task!r} at keep = {keep}", atol=1e-4)   # as above
            """, hidden=True)]),
    code("""
        for name in zoo.task_names:
            for keep in (0.0, 0.5):
                importance = trace_layers(evaluator, zoo.base, zoo.experts[name], name, examples[name], keep)
                print(f"{name:10s} keep {keep}", "  ".join(f"{k}: {v:+.3f}" for k, v in importance.items()))
        """),
    *question("q3_reading", 2, """
        **Question 3 (written).** Which layers matter most for each task, and is the pattern
        the same across tasks? Does keeping half of a layer's delta recover half of its
        importance, more, or less, and what does that say about how the delta acts? APL turns
        these importances into drop rates (important partitions dropped less): what could go
        wrong if you used layer-level importances measured on 16 examples per label? Three to
        five sentences.
        """, """
        The answer names, per task, the layer whose P* − P is the most negative in the printed
        table; on the grading zoo (numbers on the instructors' page) it is not the same layer for
        every task, so the pattern is task-specific. Read the keep = 0.5 rows against
        the keep = 0 rows: where P* − P at keep 0.5 is less than half of it at keep 0 (on the
        grading zoo, every layer of news and sign), half of the delta recovers more than half of
        the probability: the effect saturates, so a drop that keeps part of a partition loses
        less than its share; where it is about half (sentiment), the layer acts close to
        linearly. Reverting one whole layer is a
        large intervention, so the importances mix the layer's own contribution with how the
        later layers react to its removal; and 16 examples per label give noisy probabilities,
        so small differences between layers are not reliable. Turning noisy, coarse scores into
        drop rates can protect the wrong layer; the chapter's hidden-state level and several
        few-shot seeds address both.
        """, [], manual=True)], block=A7_BLOCK),
]

# ----------------------------------------------------------------------------- assignment 8

# The other expansion point an offering may draw (A8_RULE = "midpoint"): halfway along the move
A8_MIDPOINT_INTRO = [md("""
    # Assignment 8 — gradient importance at the midpoint, and the Taylor check

    Chapter 5 of the book. Tracing needs one forward pass per partition; APL's
    approximation needs one backward pass. The chapter expands the loss at the **base**:
    with g = ∇L(θ_b), *adding* partition s of Δ to the base changes the loss by about
    Σ_{i∈s} Δ_i g_i, with an error of second order in Δ. Here you take the gradient
    **halfway** instead (the midpoint rule): with m = θ_b + ½ Δ and g_m = ∇L(m), the whole
    move from base to expert changes the loss by about Σ_i Δ_i (g_m)_i, and the error is of
    *third* order, because the second-order terms of the two halves cancel. The partition's
    score is −|Σ_{i∈s} Δ_i (g_m)_i|. You will compute it per layer and check the midpoint rule
    numerically on a move of one partition: for a step t, with the gradient halfway along the
    step, L(θ_t − t Δ_s) − L(θ_t) ≈ −t Σ_{i∈s} Δ_i ∇L(θ_t − ½ t Δ_s)_i. Expected time: 1–1.5 hours.

    `evaluator.loss_gradient(state_dict, task, examples)` returns the gradient (a dict
    name → tensor); `evaluator.loss(evaluator.params(state_dict), task, examples)` the loss.
    """)]

A8_MIDPOINT = [
    *question("q1_gradient_importance", 4, """
        **Question 1.** Write `gradient_importance(evaluator, base, expert, task, examples, layers)`:
        the midpoint m (every floating-point tensor θ_b + 0.5 · (θ_t − θ_b) in float32; any other
        tensor the expert's), the gradient g_m of the few-shot loss at m, then, for every key of
        `layers` (a dict key → list of names), −|Σ_{i∈s} Δ_i (g_m)_i| with Δ = expert − base (in
        float64). Return a dict key → float.
        """, """
        def gradient_importance(evaluator, base, expert, task, examples, layers):
            \"\"\"Gradient importance at the midpoint θ_b + Δ/2: −|Σ_{i∈s} Δ_i (g_m)_i| per partition.\"\"\"
            # BEGIN SOLUTION
            middle = {n: base[n].float() + 0.5 * (t.float() - base[n].float()) if t.is_floating_point() else t
                      for n, t in expert.items()}
            gradient = evaluator.loss_gradient(middle, task, examples)
            out = {}
            for key, names in layers.items():
                products = [(expert[n].double() - base[n].double()) * gradient[n].double().cpu() for n in names]
                out[key] = -abs(float(sum(p.sum() for p in products)))
            return out
            # END SOLUTION
        """, [
        test("test_gradient_importance_is_not_positive", "gradient_importance, zoo, evaluator, examples, layers", """
            grading.expect_signature(gradient_importance, "gradient_importance",
                                     ("evaluator", "base", "expert", "task", "examples", "layers"))
            task = zoo.task_names[0]
            got = grading.call(gradient_importance, "gradient_importance", evaluator, zoo.base, zoo.experts[task], task,
                               examples[task], layers)
            grading.expect_keys(got, "gradient_importance", tuple(layers))
            assert all(float(v) <= 0 for v in got.values()), "−|Σ Δ g| is never positive"
            """),
        test("test_gradient_importance_matches_the_package", "gradient_importance, zoo, evaluator, examples, layers", """
            from merging_helpers import taylor
            for task in zoo.task_names:
                expert = zoo.experts[task]
                got = grading.call(gradient_importance, "gradient_importance", evaluator, zoo.base, expert,
                                   task, examples[task], layers)
                middle = {n: zoo.base[n].float() + 0.5 * (t.float() - zoo.base[n].float()) if t.is_floating_point()
                          else t for n, t in expert.items()}
                # the package expands at its first argument with the delta second − first = base − m = −Δ/2
                half = taylor.gradient_importance(evaluator, middle, zoo.base, task, examples[task], "layer").as_dict()
                want = {k: 2 * v for k, v in half.items()}
                grading.expect_keys(got, "gradient_importance", tuple(want))
                # Δ/2 rounds to float32 in the package (1e-7 relative); sums in another order: ≪ 1e-6
                grading.expect_close(torch.tensor([float(got[k]) for k in want]), torch.tensor(list(want.values())),
                                     f"gradient_importance on {task!r} (g at the midpoint)", rtol=1e-4)
            """, hidden=True)]),
    *question("q2_taylor_check", 4, """
        **Question 2.** Write `taylor_check(evaluator, base, expert, task, examples, names, t)`:
        return `(predicted, actual)`, where predicted = −t Σ_{i∈s} Δ_i (g)_i over the tensors
        `names`, with g the gradient at the middle of the step (the expert with only those
        tensors moved to θ_t − ½ t Δ), and actual = L(θ_t − t Δ_s) − L(θ_t), the loss change when
        only those tensors move from the expert back toward the base by t Δ (computed without
        gradients).
        """, """
        def taylor_check(evaluator, base, expert, task, examples, names, t):
            \"\"\"The midpoint rule against the real loss change of moving `names` back by t Δ.\"\"\"
            # BEGIN SOLUTION
            delta = {n: expert[n].float() - base[n].float() for n in names}
            halfway = {**expert, **{n: expert[n] - 0.5 * t * delta[n] for n in names}}
            gradient = evaluator.loss_gradient(halfway, task, examples)
            predicted = -t * sum(float((delta[n].double() * gradient[n].double().cpu()).sum()) for n in names)
            moved = {**expert, **{n: expert[n] - t * delta[n] for n in names}}
            with torch.no_grad():
                actual = float(evaluator.loss(evaluator.params(moved), task, examples)
                               - evaluator.loss(evaluator.params(expert), task, examples))
            return predicted, actual
            # END SOLUTION
        """, [
        test("test_taylor_check_agrees_closely_for_a_moderate_step", "taylor_check, zoo, evaluator, examples, layers", """
            grading.expect_signature(taylor_check, "taylor_check",
                                     ("evaluator", "base", "expert", "task", "examples", "names", "t"))
            task = zoo.task_names[0]
            result = grading.call(taylor_check, "taylor_check", evaluator, zoo.base, zoo.experts[task], task,
                                  examples[task], layers["layer.5"], 0.1)
            grading.expect_pair(result, "taylor_check", "(predicted, actual)")
            predicted, actual = (float(grading.expect_number(x, "taylor_check's result")) for x in result)
            # the midpoint rule's error is O(t³): 0.2 % at t = 0.1 on the grading zoo, where the expansion at
            # the expert (O(t²)) misses by 10 %; 1 % tells the two apart
            assert abs(actual - predicted) <= 0.01 * abs(actual), (
                f"at t = 0.1 the midpoint prediction {predicted:.3e} and the loss change {actual:.3e} should agree "
                "within 1 % (is the gradient taken halfway along the step?)")
            """),
        test("test_taylor_check_matches_the_package", "taylor_check, zoo, evaluator, examples, layers", """
            from merging_helpers import apl, taylor
            task, layer = zoo.task_names[⟨A8_TASK⟩], "layer.⟨A8_LAYER⟩"
            expert = zoo.experts[task]
            delta = deltas.task_vector(zoo.base, expert)
            parts = apl.groups(expert, "layer")
            for t in (0.01, 0.3):
                halfway = {**expert, **{n: expert[n] - 0.5 * t * delta[n] for n in parts[layer]}}
                gradient = evaluator.loss_gradient(halfway, task, examples[task])
                want = -float(taylor.partition_products(delta, gradient, {layer: parts[layer]})[0])
                result = grading.call(taylor_check, "taylor_check", evaluator, zoo.base, expert, task,
                                      examples[task], layers[layer], t)
                grading.expect_pair(result, "taylor_check", "(predicted, actual)")
                predicted, actual = (float(grading.expect_number(x, "taylor_check's result")) for x in result)
                # float64 dot products in another order: ≪ 1e-6; the halfway point rounded otherwise: ~1e-7 relative
                grading.expect_close(torch.tensor(predicted), torch.tensor(t * want), f"predicted at t = {t}",
                                     atol=1e-6, rtol=1e-4)
                moved = {**expert, **{n: expert[n] - t * delta[n] for n in parts[layer]}}
                with torch.no_grad():
                    real = float(evaluator.loss(evaluator.params(moved), task, examples[task])
                                 - evaluator.loss(evaluator.params(expert), task, examples[task]))
                grading.expect_close(torch.tensor(actual), torch.tensor(real), f"actual at t = {t}", atol=1e-5)
            """, hidden=True)]),
]

A8_MIDPOINT_Q3 = question("q3_reading", 2, """
    **Question 3 (written).** How does the relative error of your prediction change as t
    shrinks from 1 to 0.1, and what order is the neglected term? Below some t the error
    stops shrinking: why (think of how the loss difference is computed)? Your importance
    takes one gradient at θ_b + Δ/2 for every partition, while the check takes it halfway
    along each partition's own move: when is the first a good stand-in for the second, and
    would you trust it to rank partitions for tracing? Three to five sentences.
    """, """
    From t = 1 to t = 0.1 the relative error falls roughly like t² (about a hundredfold; see the
    numbers on the instructors' page), so the neglected term is of third order: the midpoint
    rule cancels the second-order term that the expansions at the base or the expert keep.
    Where the error stops falling at the smallest t (for some layers and tasks it does), the
    loss change is a difference of two float32 losses of similar size whose rounding (~1e-7 of
    the loss) has become comparable with the shrinking error. One gradient at θ_b + Δ/2 stands in for each partition's own
    midpoint when the partitions interact weakly (the gradient in one layer changes little when
    the others move), which holds for light fine-tunes and less for heavy ones; it then ranks
    partitions better than the one-sided expansions, but tracing stays the reference where
    the scores are close.
    """, [], manual=True)


A8 = [
    config("a8_gradient_importance"),
    choose("A8_RULE", expert=[md("""
        # Assignment 8 — gradient importance at the other expansion point, and the Taylor check

        Chapter 5 of the book. Tracing needs one forward pass per partition; APL's
        approximation needs one backward pass. The chapter expands the loss at the **base**:
        with g = ∇L(θ_b), *adding* partition s of Δ to the base changes the loss by about
        Σ_{i∈s} Δ_i g_i. Tracing, though, *removes* a partition from the **expert**; so here you
        expand at the expert instead: with g_t = ∇L(θ_t), removing s from the expert changes the
        loss by about −Σ_{i∈s} Δ_i (g_t)_i, and the partition's score is −|Σ_{i∈s} Δ_i (g_t)_i|.
        You will compute it per layer and check the first-order term numerically: for small t,
        L(θ_t − t Δ_s) − L(θ_t) ≈ −t Σ_{i∈s} Δ_i (g_t)_i. Expected time: 1–1.5 hours.

        `evaluator.loss_gradient(state_dict, task, examples)` returns the gradient (a dict
        name → tensor); `evaluator.loss(evaluator.params(state_dict), task, examples)` the loss.
        """)], midpoint=A8_MIDPOINT_INTRO),
    SETUP,
    code("""
        from merging_helpers.partitions import describe
        from merging_helpers.tasks import few_shot
        examples = {name: few_shot(zoo.task(name), 16, seed=0) for name in zoo.task_names}
        layers = {}
        for name in zoo.base:
            if describe(name).layer is not None:
                layers.setdefault(f"layer.{describe(name).layer}", []).append(name)
        """),
    choose("A8_RULE", expert=[*question("q1_gradient_importance", 4, """
        **Question 1.** Write `gradient_importance(evaluator, base, expert, task, examples, layers)`:
        the gradient g_t of the few-shot loss at `expert`, then, for every key of `layers` (a dict
        key → list of names), −|Σ_{i∈s} Δ_i (g_t)_i| with Δ = expert − base (in float64). Return a
        dict key → float.
        """, """
        def gradient_importance(evaluator, base, expert, task, examples, layers):
            \"\"\"Gradient importance expanded at the expert: −|Σ_{i∈s} Δ_i (g_t)_i| per partition.\"\"\"
            # BEGIN SOLUTION
            gradient = evaluator.loss_gradient(expert, task, examples)
            out = {}
            for key, names in layers.items():
                total = sum(float(((expert[n].double() - base[n].double()) * gradient[n].double().cpu()).sum())
                            for n in names)
                out[key] = -abs(total)
            return out
            # END SOLUTION
        """, [
        test("test_gradient_importance_is_not_positive", "gradient_importance, zoo, evaluator, examples, layers", """
            grading.expect_signature(gradient_importance, "gradient_importance",
                                     ("evaluator", "base", "expert", "task", "examples", "layers"))
            task = zoo.task_names[0]
            got = grading.call(gradient_importance, "gradient_importance", evaluator, zoo.base, zoo.experts[task], task,
                               examples[task], layers)
            grading.expect_keys(got, "gradient_importance", tuple(layers))
            assert all(float(v) <= 0 for v in got.values()), "−|Σ Δ g| is never positive"
            """),
        test("test_gradient_importance_matches_the_package", "gradient_importance, zoo, evaluator, examples, layers", """
            from merging_helpers import taylor
            for task in zoo.task_names:
                got = grading.call(gradient_importance, "gradient_importance", evaluator, zoo.base, zoo.experts[task],
                                   task, examples[task], layers)
                # the package expands at its first argument: at the expert, with the delta base − expert
                want = taylor.gradient_importance(evaluator, zoo.experts[task], zoo.base, task, examples[task],
                                                  "layer").as_dict()
                grading.expect_keys(got, "gradient_importance", tuple(want))
                grading.expect_close(torch.tensor([float(got[k]) for k in want]), torch.tensor(list(want.values())),
                                     f"gradient_importance on {task!r} (g at the expert)")
            """, hidden=True)]),
    *question("q2_taylor_check", 4, """
        **Question 2.** Write `taylor_check(evaluator, base, expert, task, examples, names, t)`:
        return `(predicted, actual)`, where predicted = −t Σ_{i∈s} Δ_i (g_t)_i over the tensors
        `names` (g_t at the expert, as above) and actual = L(θ_t − t Δ_s) − L(θ_t), the loss
        change when only those tensors move from the expert back toward the base by t Δ
        (computed without gradients).
        """, """
        def taylor_check(evaluator, base, expert, task, examples, names, t):
            \"\"\"The first-order Taylor term at the expert against the real loss change.\"\"\"
            # BEGIN SOLUTION
            gradient = evaluator.loss_gradient(expert, task, examples)
            delta = {n: expert[n].float() - base[n].float() for n in names}
            predicted = -t * sum(float((delta[n].double() * gradient[n].double().cpu()).sum()) for n in names)
            moved = {**expert, **{n: expert[n] - t * delta[n] for n in names}}
            with torch.no_grad():
                actual = float(evaluator.loss(evaluator.params(moved), task, examples)
                               - evaluator.loss(evaluator.params(expert), task, examples))
            return predicted, actual
            # END SOLUTION
        """, [
        test("test_taylor_check_agrees_for_a_small_step", "taylor_check, zoo, evaluator, examples, layers", """
            grading.expect_signature(taylor_check, "taylor_check",
                                     ("evaluator", "base", "expert", "task", "examples", "names", "t"))
            task = zoo.task_names[0]
            result = grading.call(taylor_check, "taylor_check", evaluator, zoo.base, zoo.experts[task], task,
                                  examples[task], layers["layer.5"], 0.01)
            grading.expect_pair(result, "taylor_check", "(predicted, actual)")
            predicted, actual = (float(grading.expect_number(x, "taylor_check's result")) for x in result)
            # the neglected term is O(t²): at t = 0.01 the relative error is ~1e-3 on the zoo, so 2 % leaves room
            assert abs(actual - predicted) <= 0.02 * abs(predicted), (
                f"at t = 0.01 the first-order term {predicted:.3e} and the loss change {actual:.3e} should agree "
                "within 2 %")
            """),
        test("test_taylor_check_matches_the_package", "taylor_check, zoo, evaluator, examples, layers", """
            from merging_helpers import apl, taylor
            task, layer = zoo.task_names[⟨A8_TASK⟩], "layer.⟨A8_LAYER⟩"
            expert = zoo.experts[task]
            gradient = evaluator.loss_gradient(expert, task, examples[task])
            delta = deltas.task_vector(zoo.base, expert)
            parts = apl.groups(expert, "layer")
            want = -float(taylor.partition_products(delta, gradient, {layer: parts[layer]})[0])
            for t in (0.01, 0.1):
                result = grading.call(taylor_check, "taylor_check", evaluator, zoo.base, expert, task,
                                      examples[task], layers[layer], t)
                grading.expect_pair(result, "taylor_check", "(predicted, actual)")
                predicted, actual = (float(grading.expect_number(x, "taylor_check's result")) for x in result)
                # float64 dot products in another order: ≪ 1e-6; a float32 loss difference: ≪ 1e-5
                grading.expect_close(torch.tensor(predicted), torch.tensor(t * want), f"predicted at t = {t}", atol=1e-6)
                moved = {**expert, **{n: expert[n] - t * delta[n] for n in parts[layer]}}
                with torch.no_grad():
                    real = float(evaluator.loss(evaluator.params(moved), task, examples[task])
                                 - evaluator.loss(evaluator.params(expert), task, examples[task]))
                grading.expect_close(torch.tensor(actual), torch.tensor(real), f"actual at t = {t}", atol=1e-5)
            """, hidden=True)])], midpoint=A8_MIDPOINT),
    code("""
        task = zoo.task_names[0]
        for t in (1.0, 0.3, 0.1, 0.03, 0.01):
            predicted, actual = taylor_check(evaluator, zoo.base, zoo.experts[task], task, examples[task], layers["layer.5"], t)
            print(f"t = {t:<5} predicted {predicted:+.3e}  actual {actual:+.3e}  relative error {abs(actual - predicted) / abs(predicted):.1e}")
        """),
    choose("A8_RULE", expert=question("q3_reading", 2, """
        **Question 3 (written).** How does the relative error of the first-order term change
        as t shrinks, and what does that tell you about the order of the neglected term? At
        t = 1 the two expansions (at the base, the chapter's; at the expert, yours) estimate the
        same change from opposite ends: when would they agree, and which would you trust to rank
        partitions for tracing, which removes partitions from the expert? Three to five sentences.
        """, """
        The relative error shrinks roughly in proportion to t (the absolute error like t²), as
        it should when the neglected term is the second-order one, ½ t² Δ_sᵀ H Δ_s. At t = 1 the
        two expansions agree when the loss is close to quadratic along Δ_s with small curvature
        (light fine-tunes: g_t ≈ g_b + H Δ small); they differ by about Δ_sᵀ H Δ_s, which for
        large, dense deltas (the heavy tier) can dominate and flip the ranking. Tracing removes a
        partition from the expert, so the expansion at the expert describes the same move and is
        the better first-order stand-in for it; the expansion at the base describes adding the
        partition to the base, which is what APL's Eq. 5 writes. Where they disagree, trust tracing.
        """, [], manual=True), midpoint=A8_MIDPOINT_Q3),
]

# The hidden tests' parameters per offering: the first value is the committed masters'; a seed
# draws one of the others (all keep the tests' tolerances and the solutions' cost about the same).
# A token named *_RULE picks cells written for each rule (:func:`choose`): what the students must write.
VARIANTS = {
    "a1_task_arithmetic": {"A1_LAMS": ("[0.5, 0.1, 0.3]", "[0.2, 0.6, 0.4]", "[0.7, 0.3, 0.1]", "[0.1, 0.4, 0.8]"),
                           "A1_GRID": ("(0.2, 0.4, 0.8)", "(0.3, 0.5, 0.9)", "(0.1, 0.6, 1.0)", "(0.2, 0.7, 1.2)")},
    "a2_dare": {"A2_RULE": ("tensor", "row"),
                "A2_PS": ("(0.3, 0.9, 0.5005)", "(0.2, 0.75, 0.6003)", "(0.45, 0.95, 0.3337)", "(0.1, 0.8, 0.7001)"),
                "A2_P": ("0.3", "0.4", "0.6", "0.2"),
                "A2_MERGE": ("0.6, 0.7", "0.5, 0.9", "0.8, 1.2", "0.3, 0.5")},
    "a3_ties": {"A3_RULE": ("frequency", "max"),
                "A3_DENSITIES": ("(0.05, 0.2, 1.0)", "(0.1, 0.3, 0.9)", "(0.02, 0.5, 1.0)", "(0.15, 0.4, 0.7)"),
                "A3_MERGE": ("0.2, 0.8", "0.3, 1.0", "0.1, 0.6", "0.5, 1.2")},
    "a4_magprune": {"A4_KEEP": ("0.3, 0.1", "0.5, 0.2", "0.2, 0.15", "0.7, 0.25")},
    "a5_rms_rates": {"A5_RATES": ("0.9, (0.05, 0.03)", "0.8, (0.1, 0.05)", "0.7, (0.08, 0.02)", "0.95, (0.02, 0.04)")},
    "a6_dppa_rates": {"A6_NS": ("(3.0, 5.0)", "(2.0, 4.0)", "(2.5, 6.0)", "(3.5, 4.5)"),
                      "A6_THETA": ("0.5, 0.08", "0.7, 0.05", "0.3, 0.1", "0.6, 0.12")},
    "a7_apl_tracing": {"A7_RULE": ("layer", "block"),
                       "A7_TASK": ("0", "1", "2"), "A7_KEEP": ("0.25", "0.4", "0.75", "0.1")},
    "a8_gradient_importance": {"A8_RULE": ("expert", "midpoint"),
                               "A8_TASK": ("1", "0", "2"), "A8_LAYER": ("2", "3", "4", "1")},
}


def draw(seed: int | None) -> dict[str, dict[str, str]]:
    """Each assignment's token values for an offering: the first values (the committed, public masters')
    without a seed; else drawn from the others, so an offering never uses a public rule or parameter
    (one random stream per assignment: a token added to one leaves the others' draws as they were)."""
    out = {}
    for name, tokens in VARIANTS.items():
        rng = random.Random(f"{name}/offering {seed}")
        out[name] = {token: values[0] if seed is None else rng.choice(values[1:]) for token, values in tokens.items()}
    return out


def rules(name: str) -> dict[str, tuple[str, ...]]:
    """The rule tokens of assignment ``name`` (those whose values pick cells) and their rules."""
    return {token: values for token, values in VARIANTS[name].items() if token.endswith("_RULE")}


def fill(cells: list[dict], values: dict[str, str]) -> list[dict]:
    """The cells with each rule's chosen cells in place of its :func:`choose` block and every token
    ``⟨NAME⟩`` replaced by its value (a token left over is an error)."""
    out = []
    for cell in cells:
        if "choose" in cell:
            out += fill(cell["rules"][values[cell["choose"]]], values)
            continue
        source = cell["source"]
        for token, value in values.items():
            source = source.replace(f"⟨{token}⟩", value)
        if "⟨" in source:
            raise ValueError(f"a token has no value: {source[source.index('⟨'):][:30]}")
        out.append({**cell, "source": source})
    return out


MASTERS = {"a1_task_arithmetic": A1, "a2_dare": A2, "a3_ties": A3, "a4_magprune": A4, "a5_rms_rates": A5,
           "a6_dppa_rates": A6, "a7_apl_tracing": A7, "a8_gradient_importance": A8}


def notebook(cells: list[dict]) -> dict:
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i:03d}"
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                        "name": "python3"},
                                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def master(name: str, seed: int | None = None, **fixed: str) -> str:
    """The master notebook ``name`` as written to disk, for the offering of ``seed`` (None: committed);
    ``fixed``: tokens set by hand (``A2_RULE="row"``), e.g. to test every rule."""
    cells = fill(MASTERS[name], {**draw(seed)[name], **fixed})
    return json.dumps(notebook(cells), indent=1, ensure_ascii=False) + "\n"


def write(folder: Path, seed: int | None = None, names=None) -> list[Path]:
    """Write the masters (all, or ``names``) into ``folder``, atomically each; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or list(MASTERS):
        path = folder / f"{name}.ipynb"
        tmp = path.with_suffix(".ipynb.tmp")
        tmp.write_text(master(name, seed))
        tmp.replace(path)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    for path in write(HERE, None, argv or None):
        print("wrote", path.relative_to(HERE.parent))


if __name__ == "__main__":
    main(sys.argv[1:])
