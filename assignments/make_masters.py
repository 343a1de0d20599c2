"""Writes the master notebooks of the course assignments (otter-grader's format) from the
cell lists below: ``python assignments/make_masters.py``. Edit here, not in the .ipynb.

Each master is: a raw ASSIGNMENT CONFIG cell, then per question a raw BEGIN QUESTION cell,
the prompt, a solution cell (the lines between ``# BEGIN SOLUTION`` and ``# END SOLUTION``
become ``...`` in the student's copy), a BEGIN TESTS block of exception-based tests (a
function and its call; a first line ``# HIDDEN`` keeps it out of the student's copy) and
END QUESTION. The tests call ``merging_helpers.grading``, which says what was expected.
"""

from __future__ import annotations

import json
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


SETUP = code("""
    import copy
    import torch
    from merging_helpers import deltas, evaluation, zoo as zoo_lib
    from merging_helpers.evaluation import Evaluator
    from merging_helpers.notebook import setup

    device = setup(seed=0, quiet=True)
    zoo = zoo_lib.load_zoo(tier="grading", progress=False)   # 3 small experts; built on first use (≈ 2 min)
    evaluator = Evaluator(zoo)
    print("tasks:", zoo.task_names)
    """)


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
        Δ_t = θ_t − θ_b, the merge θ = θ_b + λ Σ_t Δ_t, and the choice of λ **on the
        validation split only**. Use only `torch`; the package's own versions are what the
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
            delta = grading.expect_state_dict(grading.call(task_vector, "task_vector", base, expert), "task_vector", base)
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
        **Question 2.** Write `task_arithmetic(base, vectors, lam)`: the merged state dict
        θ_b + λ Σ_t Δ_t, where `vectors` is a list of task vectors. Names a task vector
        does not have (integer buffers) are copied from the base; every tensor keeps the
        base's dtype. Do not modify `base`.
        """, '''
        def task_arithmetic(base, vectors, lam):
            """θ_b + λ · Σ_t Δ_t (chapter 2), in the base's dtypes."""
            # BEGIN SOLUTION
            merged = {}
            for name, tensor in base.items():
                if name in vectors[0]:
                    total = sum(v[name] for v in vectors)
                    merged[name] = (tensor.float() + lam * total).to(tensor.dtype)
                else:
                    merged[name] = tensor.clone()
            return merged
            # END SOLUTION
        ''', [
        test("test_task_arithmetic_on_a_toy", "task_arithmetic", setup=TOY, body="""
            grading.expect_signature(task_arithmetic, "task_arithmetic", ("base", "vectors", "lam"))
            vectors = [{k: expert[k] - base[k] for k in base}, {k: torch.ones_like(base[k]) for k in base}]
            merged = grading.call(task_arithmetic, "task_arithmetic", base, vectors, 0.5)
            merged = grading.expect_state_dict(merged, "task_arithmetic", base)
            grading.expect_close(merged["w"], torch.tensor([[1.75, 2.5], [3.0, 4.625]]), "task_arithmetic(λ=0.5)['w']")
            zero = grading.call(task_arithmetic, "task_arithmetic", base, vectors, 0.0)
            zero = grading.expect_state_dict(zero, "task_arithmetic", base)
            grading.expect_close(zero["b"], base["b"], "task_arithmetic(λ=0)['b'] (λ = 0 is the base)")
            """),
        test("test_task_arithmetic_on_the_zoo", "task_arithmetic, zoo", """
            before = copy.deepcopy(zoo.base)
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            ours = grading.call(task_arithmetic, "task_arithmetic", zoo.base, vectors, 0.3)
            want = evaluation.task_arithmetic_state(zoo.base, zoo.experts, 0.3)
            grading.expect_state_dicts_close(ours, want, "task_arithmetic(zoo, λ=0.3)")
            grading.expect_unchanged(before, zoo.base, "task_arithmetic")
            """, hidden=True)]),
    *question("q3_choose_lambda", 3, """
        **Question 3.** Write `choose_lambda(evaluator, base, vectors, grid)`: merge with each
        λ of `grid`, score the merge with `evaluator.accuracy(merged, "validation")` (a dict
        task → accuracy) and return `(best_lambda, scores)`, where `scores[lam]` is the mean
        validation accuracy over the tasks and `best_lambda` the λ with the highest mean
        (ties: the smallest λ). Never look at the test split here.
        """, '''
        def choose_lambda(evaluator, base, vectors, grid):
            """The λ of ``grid`` with the best mean validation accuracy, and every λ's mean."""
            # BEGIN SOLUTION
            scores = {}
            for lam in grid:
                accuracy = evaluator.accuracy(task_arithmetic(base, vectors, lam), "validation")
                scores[lam] = sum(accuracy.values()) / len(accuracy)
            best = max(scores.values())
            return min(lam for lam, s in scores.items() if s == best), scores
            # END SOLUTION
        ''', [
        test("test_choose_lambda_returns_a_grid_value", "choose_lambda, zoo, evaluator", """
            grading.expect_signature(choose_lambda, "choose_lambda", ("evaluator", "base", "vectors", "grid"))
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            result = grading.call(choose_lambda, "choose_lambda", evaluator, zoo.base, vectors, (0.2, 0.6))
            grading.expect_pair(result, "choose_lambda", "(best_lambda, scores)")
            best, scores = result
            assert best in (0.2, 0.6), f"best_lambda should be one of the grid (0.2, 0.6), got {best!r}"
            assert set(scores) == {0.2, 0.6}, f"scores should have one entry per λ of the grid, got keys {list(scores)}"
            """),
        test("test_choose_lambda_uses_the_validation_split", "choose_lambda, zoo, evaluator", """
            grid = (0.2, 0.4, 0.8)
            want_best, want_scores = evaluation.best_lambda(evaluator, grid, "validation")
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            result = grading.call(choose_lambda, "choose_lambda", evaluator, zoo.base, vectors, grid)
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
        print("test:", evaluator.accuracy(task_arithmetic(zoo.base, vectors, best), "test"))
        """),
]

# ----------------------------------------------------------------------------- assignment 2

A2 = [
    config("a2_dare"),
    md("""
        # Assignment 2 — DARE: drop and rescale

        Chapter 2 of the book. DARE drops each entry of a task vector independently with
        probability p and divides the survivors by 1 − p, so that the expected delta is
        unchanged. You will write the drop, the merge built on it, and say in words why
        the rescale works and where it stops working. Use only `torch`.

        The tests are statistical: they check the drop fraction and the unbiasedness over
        many draws (a correct answer fails them with a chance below one in a million), not
        equality with the package's own random numbers. Expected time: 1–1.5 hours.
        """),
    SETUP,
    *question("q1_dare", 4, """
        **Question 1.** Write `dare(delta, p, generator)`: a new tensor where each entry of
        `delta` is set to 0 with probability `p` (independently; draw the uniform numbers
        with `torch.rand(..., generator=generator)` on the CPU) and every kept entry is
        divided by 1 − p. Keep the shape, dtype and device of `delta`. Raise a
        `ValueError` naming `p` when p is not in [0, 1). Do not modify `delta`.
        """, '''
        def dare(delta, p, generator):
            """DARE (chapter 2): drop each entry with probability p, rescale the rest by 1 / (1 − p)."""
            # BEGIN SOLUTION
            if not 0 <= p < 1:
                raise ValueError(f"dare: the drop rate p must be in [0, 1), got {p}")
            keep = torch.rand(delta.shape, generator=generator) >= p
            return torch.where(keep.to(delta.device), delta / (1 - p), torch.zeros_like(delta))
            # END SOLUTION
        ''', [
        test("test_dare_shapes_values_and_bad_p", "dare", """
            grading.expect_signature(dare, "dare", ("delta", "p", "generator"))
            delta = torch.linspace(-1, 1, 20).reshape(4, 5) + 0.01
            out = grading.expect_tensor(grading.call(dare, "dare", delta, 0.5, torch.Generator().manual_seed(0)),
                                        "dare(delta, 0.5)", delta.shape, delta.dtype)
            kept = out != 0
            grading.expect_close(out[kept], 2 * delta[kept], "the kept entries of dare(delta, 0.5) (Δ / (1 − p))")
            same = grading.call(dare, "dare", delta, 0.0, torch.Generator().manual_seed(0))
            grading.expect_close(grading.expect_tensor(same, "dare(delta, 0)"), delta, "dare(delta, p=0) (nothing dropped)")
            for bad in (1.0, -0.1):
                grading.expect_raises(lambda p: dare(delta, p, torch.Generator()), "dare(delta, p)", (bad,),
                                      ValueError, "(p must be in [0, 1))")
            """),
        test("test_dare_drops_a_fraction_p", "dare", """
            delta = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
            before = delta.clone()
            for p in (0.3, 0.9):
                out = grading.expect_tensor(grading.call(dare, "dare", delta, p, torch.Generator().manual_seed(2)),
                                            f"dare(delta, {p})", delta.shape)
                grading.expect_rate(int((out == 0).sum()), delta.numel(), p, f"entries dropped by dare(p={p})")
            grading.expect_unchanged({"delta": before}, {"delta": delta}, "dare")
            """, hidden=True),
        test("test_dare_is_unbiased", "dare", """
            delta = torch.linspace(-1, 1, 50)
            p, draws = 0.8, 4000
            generator = torch.Generator().manual_seed(3)
            total = sum(grading.expect_tensor(grading.call(dare, "dare", delta, p, generator), "dare", delta.shape)
                        for _ in range(draws))
            mean = total / draws
            # one draw's entry has standard deviation |Δ| · sqrt(p / (1 − p)); the mean of n draws, that / sqrt(n)
            standard_error = delta.abs() * (p / (1 - p)) ** 0.5 / draws ** 0.5
            worst = float(((mean - delta).abs() / standard_error.clamp_min(1e-12)).max())
            assert worst < 5.5, (f"the mean of {draws} dare draws is {worst:.1f} standard errors from Δ at its worst "
                                 f"entry: dare is biased (did you divide the kept entries by 1 − p?)")
            again = [grading.call(dare, "dare", delta, p, torch.Generator().manual_seed(7)) for _ in range(2)]
            assert torch.equal(again[0], again[1]), "dare should draw from the generator it is given (same seed, same mask)"
            """, hidden=True)]),
    *question("q2_dare_merge", 3, """
        **Question 2.** Write `dare_merge(base, vectors, p, lam, seed)`: make one
        `torch.Generator().manual_seed(seed)`, apply your `dare` to every tensor of every
        task vector (in the order of `base`'s names, then the vectors' order), and return
        θ_b + λ Σ_t DARE(Δ_t) in the base's dtypes (names the vectors lack: copied from the base).
        """, '''
        def dare_merge(base, vectors, p, lam, seed):
            """DARE + Task Arithmetic (chapter 2): θ_b + λ Σ_t DARE_p(Δ_t)."""
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
            ours = grading.call(dare_merge, "dare_merge", zoo.base, vectors, 0.0, 0.4, 0)
            want = evaluation.task_arithmetic_state(zoo.base, zoo.experts, 0.4)
            grading.expect_state_dicts_close(ours, want, "dare_merge(p=0, λ=0.4)")
            """),
        test("test_dare_merge_keeps_what_survives_any_expert", "dare_merge, zoo", """
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            p = 0.9
            ours = grading.expect_state_dict(grading.call(dare_merge, "dare_merge", zoo.base, vectors, p, 1.0, 0),
                                             "dare_merge", zoo.base)
            names = [n for n in zoo.base if n.startswith("encoder.layer.") and n.endswith("dense.weight")]
            count = expected = variance = 0
            for name in names:
                nonzero = sum((v[name] != 0).double() for v in vectors)   # experts that changed the entry
                survive = 1 - p ** nonzero                                # some expert's entry is kept
                count += int(((ours[name].float() - zoo.base[name].float()) != 0).sum())
                expected += float(survive.sum())
                variance += float((survive * (1 - survive)).sum())
            assert abs(count - expected) < 5 * variance ** 0.5 + 1, (
                f"dare_merge(p={p}) changed {count} entries of the dense maps, expected about {expected:.0f} "
                f"(an entry changes when any of the {len(vectors)} experts keeps it)")
            """, hidden=True)]),
    *question("q3_why_rescale", 2, """
        **Question 3 (written).** In three to five sentences: why does dividing the kept
        entries by 1 − p keep the merge's expected delta equal to Δ? The chapter's heavy
        tier shows DARE failing at p = 0.9 although it is unbiased: what does unbiased
        not promise, and which property of the delta decides whether that matters?
        """, """
        Each entry is kept with probability 1 − p and then equals Δ_i / (1 − p), otherwise 0,
        so E[DARE(Δ)_i] = (1 − p) · Δ_i / (1 − p) = Δ_i: the expected delta, and so (to first
        order) the expected change of every pre-activation, is unchanged. Unbiased says nothing
        about the variance: each entry's variance is Δ_i² p / (1 − p), ×9 of Δ_i² at p = 0.9, and a
        layer's output sums many such terms. When the deltas are small next to the weights and
        their effect is spread over many entries (light fine-tunes), the noise averages out; when
        the deltas are large and dense (the heavy tier, where |Δ| approaches the weights
        themselves), the rescaled survivors move the weights far from anything the model saw,
        and the second-order terms the expectation ignores dominate.
        """, [], manual=True),
]

# ----------------------------------------------------------------------------- assignment 3

A3 = [
    config("a3_ties"),
    md("""
        # Assignment 3 — TIES: trim, elect, disjoint merge

        Chapter 3 of the book. TIES merges task vectors in three steps: **trim** each to its
        largest-magnitude entries, **elect** a sign per entry from the trimmed deltas' sum,
        and average only the deltas that agree with it (**disjoint merge**). You will write
        each step on tensors, then the whole merge on state dicts; the hidden tests compare
        your merge with the package's `ties` (the peft convention: unweighted election,
        divide by the number of agreeing experts). Use only `torch`. Expected time: 1.5–2 hours.
        """),
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
            for density in (0.05, 0.2, 1.0):
                out = grading.expect_tensor(grading.call(trim, "trim", delta, density), f"trim(delta, {density})",
                                            delta.shape)
                grading.expect_close(out, delta * magnitude_keep_mask(delta, density), f"trim(delta, {density})")
            """, hidden=True)]),
    *question("q2_elect_sign", 2, """
        **Question 2.** Write `elect_sign(deltas)`: for a list of same-shaped tensors, the
        tensor of elected signs, +1.0 where their sum is ≥ 0 and −1.0 where it is < 0.
        """, '''
        def elect_sign(deltas):
            """TIES step 2 (chapter 3): γ = sign(Σ_t Δ_t), with +1 for a sum of exactly 0."""
            # BEGIN SOLUTION
            total = torch.stack(list(deltas)).sum(dim=0)
            return torch.where(total >= 0, 1.0, -1.0)
            # END SOLUTION
        ''', [
        test("test_elect_sign_on_a_toy", "elect_sign", """
            grading.expect_signature(elect_sign, "elect_sign", ("deltas",))
            deltas_ = [torch.tensor([0.5, -0.2, 0.0, 0.1]), torch.tensor([-0.1, -0.3, 0.0, -0.4])]
            out = grading.expect_tensor(grading.call(elect_sign, "elect_sign", deltas_), "elect_sign", (4,))
            grading.expect_close(out, torch.tensor([1.0, -1.0, 1.0, -1.0]), "elect_sign (a zero sum elects +1)")
            """),
        test("test_elect_sign_matches_the_package", "elect_sign", """
            from merging_helpers.consensus import elect_sign as reference
            g = torch.Generator().manual_seed(1)
            deltas_ = [torch.randn(30, 20, generator=g) for _ in range(3)]
            out = grading.expect_tensor(grading.call(elect_sign, "elect_sign", deltas_), "elect_sign", (30, 20))
            grading.expect_close(out, reference(deltas_, "total"), "elect_sign on three random deltas")
            """, hidden=True)]),
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
            signs = elect(deltas_, "total")
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
        test("test_ties_merge_is_a_state_dict", "ties_merge, zoo", """
            grading.expect_signature(ties_merge, "ties_merge", ("base", "vectors", "density", "lam"))
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            grading.expect_state_dict(grading.call(ties_merge, "ties_merge", zoo.base, vectors, 0.2, 1.0),
                                      "ties_merge", zoo.base)
            """),
        test("test_ties_merge_matches_the_package", "ties_merge, zoo", """
            from merging_helpers.recipes import merge_state_dicts
            vectors = deltas.task_vectors(zoo.base, zoo.experts)
            ours = grading.call(ties_merge, "ties_merge", zoo.base, vectors, 0.2, 0.8)
            want = merge_state_dicts(zoo.base, zoo.experts, "ties", density=0.2, lam=0.8, progress=False)
            grading.expect_state_dicts_close(ours, want, "ties_merge(density=0.2, λ=0.8)")
            """, hidden=True)]),
    md("""
        Your TIES against Task Arithmetic on the validation split (λ = 1, density 0.2):
        """),
    code("""
        vectors = deltas.task_vectors(zoo.base, zoo.experts)
        print("TIES:", evaluator.accuracy(ties_merge(zoo.base, vectors, 0.2, 1.0), "validation"))
        print("TA (λ = 0.4):", evaluator.accuracy(evaluation.task_arithmetic_state(zoo.base, zoo.experts, 0.4), "validation"))
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
        is a short written verdict. Expected time: 2–3 hours.

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
        test("test_keep_probability_on_a_toy", "magprune_keep_prob", """
            grading.expect_signature(magprune_keep_prob, "magprune_keep_prob", ("delta", "density", "epsilon"))
            out = grading.call(magprune_keep_prob, "magprune_keep_prob", torch.tensor([0.3, -0.1, 0.2]), 0.5, 0.2)
            out = grading.expect_tensor(out, "magprune_keep_prob", (3,))
            grading.expect_close(out, torch.tensor([0.7, 0.3, 0.5]), "magprune_keep_prob([0.3, -0.1, 0.2], 0.5, 0.2)")
            grading.expect_raises(lambda e: magprune_keep_prob(torch.ones(3), 0.5, e),
                                  "magprune_keep_prob(delta, 0.5, epsilon)", (0.6,), ValueError,
                                  "(density − ε must stay above 0)")
            """),
        test("test_keep_probability_matches_the_package", "magprune_keep_prob", """
            from merging_helpers.drop import magprune_keep_prob as reference
            delta = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
            out = grading.expect_tensor(grading.call(magprune_keep_prob, "magprune_keep_prob", delta, 0.3, 0.1),
                                        "magprune_keep_prob", delta.shape)
            grading.expect_close(out, reference(delta, 0.3, 0.1), "magprune_keep_prob(16×40 matrix, 0.3, 0.1)")
            grading.expect_close(out.mean(dim=1), torch.full((16,), 0.3), "each row's mean keep probability")
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
        test("test_magprune_keeps_or_rescales", "magprune, magprune_keep_prob", """
            grading.expect_signature(magprune, "magprune", ("delta", "density", "epsilon", "generator"))
            delta = torch.randn(8, 30, generator=torch.Generator().manual_seed(4))
            out = grading.call(magprune, "magprune", delta, 0.4, 0.1, torch.Generator().manual_seed(0))
            out = grading.expect_tensor(out, "magprune", delta.shape)
            prob = magprune_keep_prob(delta, 0.4, 0.1)
            kept = out != 0
            grading.expect_close(out[kept], (delta / prob)[kept], "the kept entries of magprune (Δ_i / p_i)")
            """),
        test("test_magprune_is_unbiased_and_keeps_a_fraction_density", "magprune", """
            delta = torch.linspace(-1, 1, 60).reshape(3, 20) + 0.005
            draws, generator = 3000, torch.Generator().manual_seed(5)
            outs = [grading.expect_tensor(grading.call(magprune, "magprune", delta, 0.3, 0.1, generator), "magprune",
                                          delta.shape) for _ in range(draws)]
            kept = sum(int((o != 0).sum()) for o in outs)
            grading.expect_rate(kept, draws * delta.numel(), 0.3, "entries kept by magprune(density=0.3)")
            from merging_helpers.drop import magprune_keep_prob as reference
            prob = reference(delta, 0.3, 0.1)
            mean = sum(outs) / draws
            standard_error = delta.abs() * ((1 - prob) / prob).sqrt() / draws ** 0.5
            worst = float(((mean - delta).abs() / standard_error).max())
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
        test("test_compare_returns_both_methods", "compare_at_density, zoo, evaluator", """
            grading.expect_signature(compare_at_density, "compare_at_density",
                                     ("evaluator", "zoo", "density", "grid", "epsilon", "seed"))
            result = grading.call(compare_at_density, "compare_at_density", evaluator, zoo, 0.2, (1.0,))
            grading.expect_keys(result, "compare_at_density", ("ties", "della"))
            for method, pair in result.items():
                grading.expect_pair(pair, f"compare_at_density(...)[{method!r}]", "(lam, test_mean)")
                assert pair[0] == 1.0, f"{method}: λ = {pair[0]!r}, but the grid is (1.0,)"
                assert 0 <= pair[1] <= 1, f"{method}: the test mean {pair[1]!r} is not an accuracy"
            """),
        test("test_compare_chooses_on_validation", "compare_at_density, zoo, evaluator", """
            from merging_helpers.recipes import merge_state_dicts
            grid = (0.6, 1.0)
            result = grading.call(compare_at_density, "compare_at_density", evaluator, zoo, 0.2, grid)
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

MASTERS = {"a1_task_arithmetic": A1, "a2_dare": A2, "a3_ties": A3, "a4_magprune": A4}


def notebook(cells: list[dict]) -> dict:
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i:03d}"
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                        "name": "python3"},
                                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def main(argv=None) -> None:
    names = argv or list(MASTERS)
    for name in names:
        path = HERE / f"{name}.ipynb"
        path.write_text(json.dumps(notebook(MASTERS[name]), indent=1, ensure_ascii=False) + "\n")
        print("wrote", path.relative_to(HERE.parent))


if __name__ == "__main__":
    main(sys.argv[1:])
