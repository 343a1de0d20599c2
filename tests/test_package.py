"""The package reads like the book's table of contents, and the two tiers go one way.

* the package docstring lists every module on disk, in chapter order, and each chapter
  it names is in ``_toc.yml`` (or marked planned);
* every public function and class names the chapter that introduces it;
* no reference module imports the fast tier (``merging_helpers.fast``);
* the package's imports (function-level ones included) have no cycle, and no method module
  imports the book's infrastructure.
"""
import ast
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import merging_helpers

ROOT = Path(merging_helpers.__file__).resolve().parent
LINE = re.compile(r"^\* ``(\w+)``\s+– (?:chapter (\d)( \(planned)?|(the course assignments))")
ASSIGNMENTS = 99  # modules of the course assignments' page come after every chapter


def _docstring_modules():
    rows = [LINE.match(line) for line in merging_helpers.__doc__.splitlines()]
    return [(m.group(1), ASSIGNMENTS if m.group(4) else int(m.group(2)), bool(m.group(3))) for m in rows if m]


def _toc_chapters():
    toc = (ROOT.parent / "_toc.yml").read_text()
    return {int(n) for n in re.findall(r"file: book/(\d\d)_", toc)}


def test_docstring_lists_the_modules_on_disk_in_chapter_order():
    listed = _docstring_modules()
    names = [m for m, _, _ in listed]
    on_disk = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__") + ["fast", "bench"]
    assert sorted(names) == sorted(on_disk), set(names) ^ set(on_disk)
    chapters = [c for _, c, _ in listed]
    assert chapters == sorted(chapters), "modules are not in chapter order"
    toc = _toc_chapters()
    for module, chapter, planned in listed:
        if chapter == ASSIGNMENTS:
            assert "book/assignments" in (ROOT.parent / "_toc.yml").read_text(), "the instructors' page is not in _toc.yml"
            continue
        assert chapter in toc or planned, f"{module}: chapter {chapter} is not in _toc.yml and not marked planned"


def test_each_module_docstring_names_its_chapter():
    for module, chapter, _ in _docstring_modules():
        doc = importlib.import_module(f"merging_helpers.{module}").__doc__ or ""
        if chapter == ASSIGNMENTS:
            assert "course assignments" in doc, module
            continue
        assert re.search(rf"[Cc]hapters? (\d[–-])?{chapter}\b|chapters? {chapter}[–-]", doc), module


def test_every_public_function_and_class_names_a_chapter():
    missing = []
    assignments = {m for m, chapter, _ in _docstring_modules() if chapter == ASSIGNMENTS}  # their module says so
    for info in pkgutil.walk_packages(merging_helpers.__path__, "merging_helpers."):
        short = info.name.rsplit(".", 1)[-1]
        if short in assignments and info.name.count(".") == 1:
            continue
        if info.name.startswith("merging_helpers.bench."):  # measurement scripts: the module names its chapter
            assert re.search(r"[Cc]hapters? \d", importlib.import_module(info.name).__doc__ or ""), info.name
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != info.name:
                continue
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not re.search(
                    r"[Cc]hapters? \d|appendix", inspect.getdoc(obj) or ""):
                missing.append(f"{info.name}.{name}")
    assert not missing, missing


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            yield base, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


@pytest.mark.slow
def test_reference_modules_never_import_the_fast_tier():
    """The engine and the seed methods (the reference a reader reads) never import the fast tier; the
    book's infrastructure may choose the fused executor for its loops (compare, sweeps)."""
    reference = set(WINGS["engine"]) | set(WINGS["methods"])
    for path in sorted(ROOT.glob("*.py")):
        if path.stem not in reference:
            continue
        for module, names in _imports(path):
            assert not (module in (".fast", "merging_helpers.fast") or module.startswith((".fast.", "merging_helpers.fast."))
                        or (module == "." and "fast" in names)), f"{path.name} imports the fast tier"
    # and at run time: importing the whole reference loads nothing of it
    code = ("import sys, " + ", ".join(f"merging_helpers.{m}" for m in sorted(reference)) + ";"
            "print([m for m in sys.modules if m.startswith('merging_helpers.fast')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_aliases_retired_in_0_3_are_gone():
    for old in ("merging_helpers.streaming", "merging_helpers.checkpoints"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)


# the wings, from the package (merging_helpers.WINGS); each may import only the wings before it
WINGS = merging_helpers.WINGS
ORDER = list(WINGS)
METHODS = set(WINGS["engine"]) | set(WINGS["methods"]) | set(WINGS["fast"])  # what merges
BOOK = set(WINGS["book"])


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module → the package's modules it imports anywhere in its file (dotted, without the package name)."""
    graph = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - (node.level - 1)] + ([node.module] if node.module else [])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("merging_helpers"):
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                candidate = base + [alias.name]
                exists = (root.joinpath(*candidate).with_suffix(".py").exists() or root.joinpath(*candidate).is_dir())
                found.add(".".join(candidate if exists else base))
        graph[name] = {m for m in found if m and m != name}
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    return next((c for m in sorted(graph) if m not in state for c in [visit(m)] if c), None)


def _wing(module: str) -> str:
    top = module.split(".")[0]
    return next((w for w, members in WINGS.items() if top in members), "other")


def test_the_imports_have_no_cycle_and_go_only_down_the_wings():
    graph = import_graph()
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
    upward = sorted(f"{m} ({_wing(m)}) -> {d} ({_wing(d)})" for m, deps in graph.items() for d in deps
                    if "other" not in (_wing(m), _wing(d)) and ORDER.index(_wing(d)) > ORDER.index(_wing(m)))
    assert not upward, f"imports against the wings' order {ORDER}: {upward}"
    unplaced = sorted(m for m in graph if "." not in m and m and _wing(m) == "other" and m != "__init__")
    assert not unplaced, f"modules in no wing (add them to merging_helpers.WINGS): {unplaced}"


def test_the_structure_check_finds_a_cycle_and_a_crossing(tmp_path):
    """The check above fails on a tree like the second edition's (notebook <-> results; apl -> evaluation)."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "notebook.py").write_text("from . import results\n")
    (package / "results.py").write_text("def f():\n    from .notebook import quick_mode\n")
    (package / "apl.py").write_text("from .evaluation import accuracy\n")
    (package / "evaluation.py").write_text("")
    graph = import_graph(package)
    assert _cycle(graph) in (["notebook", "results", "notebook"], ["results", "notebook", "results"])
    assert [f"{m} -> {d}" for m, deps in graph.items() for d in deps
            if ORDER.index(_wing(d)) > ORDER.index(_wing(m))] == ["apl -> evaluation"]


# modules whose tests live in another module's file (the file named, and why)
TESTED_ELSEWHERE = {
    "fast.reader": "test_checkpoints.py",        # fast.checkpoints' three parts are tested through it
    "fast.writer": "test_checkpoints.py",
    "fast.output_path": "test_checkpoints.py",
    "fast.compiled": "test_fused.py",            # the kernel is tested bit for bit against the reference there
    "bench.apl_gradient_lean": "test_chapters_alone.py",  # measurement scripts: chapters 5 and 9 run them
}


def test_every_module_has_a_test_file_named_after_it():
    """Tests mirror modules: tests/test_<module>.py for every module, or the file named in TESTED_ELSEWHERE."""
    tests = ROOT.parent / "tests"
    missing = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if path.stem == "__init__":
            continue
        expected = TESTED_ELSEWHERE.get(module, f"test_{path.stem}.py")
        if not (tests / expected).exists():
            missing.append(f"{module} (expected tests/{expected})")
    assert not missing, missing
