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
    from merging_helpers import deltas, zoo as zoo_lib
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

MASTERS = {"a1_task_arithmetic": A1}


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
