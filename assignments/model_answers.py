"""The numbers behind the written questions' model answers, computed on the grading zoo:
``python assignments/model_answers.py`` (``make model-answers``).

Each master is run as a solved notebook (its setup, solutions and the cells between questions, in
this process), once per rule an offering may draw (make_masters.VARIANTS' ``*_RULE`` tokens); what
the cells just before a written question print is what its model answer reads. The outputs go to
``assignments/model_answers.json`` and, between markers, into the instructors' page
(``book/assignments.md``); a test checks that the two agree. Never typed: re-run this after a change.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build  # noqa: E402  (assignments/ is not a package)

ANSWERS = HERE / "model_answers.json"
START, END = "<!-- model-answers -->", "<!-- /model-answers -->"


def run_cell(source: str, env: dict) -> None:
    """Run a cell as Jupyter does: a last line that is an expression has its value shown."""
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<master>", "exec"), env)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "<master>", "eval"), env)
        if value is not None:
            print(repr(value))


def printed_before_written_questions(text: str) -> dict[str, str]:
    """Run a master's program cells (not its tests) and return, for each written question, what the
    code cells since the previous question printed."""
    env, out, printed, in_tests, question = {"__name__": "__main__"}, {}, [], False, None
    for cell in json.loads(text)["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "raw":
            if source.startswith("# BEGIN QUESTION"):
                question = re.search(r"name: (\w+)", source).group(1)
                if "manual: true" in source:
                    out[question] = "".join(printed).rstrip()
                printed = []
            in_tests = source.startswith("# BEGIN TESTS") or (in_tests and not source.startswith("# END TESTS"))
        elif cell["cell_type"] == "code" and not in_tests:
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                run_cell(source, env)
            printed.append(buffer.getvalue() if question else "")   # the setup's lines are not an answer's
    return out


def compute() -> dict:
    """Every written question's printed numbers, per assignment and rule."""
    make = build.make_masters()
    answers = {}
    for name in make.MASTERS:
        rules = make.rules(name)   # one rule token at most: the committed rule, then each other one
        choices = [(values[0], {}) for values in rules.values()] or [("", {})]
        choices += [(rule, {token: rule}) for token, values in rules.items() for rule in values[1:]]
        for label, fixed in choices:
            for question, printed in printed_before_written_questions(make.master(name, **fixed)).items():
                answers.setdefault(name, {}).setdefault(question, {})[label] = printed
        print(name, "done", flush=True)
    return answers


def section(data: dict) -> str:
    """The instructors' page's section: one block of printed numbers per written question and rule."""
    lines = []
    for name, questions in data["answers"].items():
        for question, by_rule in questions.items():
            for rule, printed in by_rule.items():
                title = f"**{name} {question}**" + (f" (rule `{rule}`)" if rule else "")
                body = printed or "(this question reads the printed cells of the student's own run only)"
                lines += [title, "", "```text", body, "```", ""]
    return "\n".join(lines) + f"Computed by `python assignments/model_answers.py`: {data['note']}."


def main() -> None:
    start = time.perf_counter()
    answers = compute()
    note = f"grading zoo, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s"
    data = {"note": note, "answers": answers}
    build.write_atomically(ANSWERS, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    build.splice(build.PAGE, START, END, section(data))
    print("wrote", ANSWERS.relative_to(HERE.parent), "and the section of", build.PAGE.relative_to(HERE.parent))


if __name__ == "__main__":
    main()
