"""The workflow that publishes the book online (.github/workflows/book.yml), checked by actionlint."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"
ACTIONLINT = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")

needs_actionlint = pytest.mark.skipif(ACTIONLINT is None, reason="actionlint (requirements.txt) is not installed")


@needs_actionlint
def test_actionlint_accepts_the_workflow():
    run = subprocess.run([ACTIONLINT, "-no-color", str(WORKFLOW)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@needs_actionlint
def test_actionlint_would_catch_a_broken_workflow(tmp_path):
    broken = WORKFLOW.read_text().replace("needs: build", "needs: biuld")
    (tmp_path / "book.yml").write_text(broken)
    run = subprocess.run([ACTIONLINT, "-no-color", str(tmp_path / "book.yml")], capture_output=True, text=True)
    assert run.returncode != 0 and "biuld" in run.stdout


def test_the_workflow_builds_with_the_readmes_command_and_deploys_the_html():
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    build = [s for s in jobs["build"]["steps"] if "run" in s]
    assert [s["run"] for s in build] == ["make book"]
    assert "make book" in (ROOT / "README.md").read_text()
    upload = next(s for s in jobs["build"]["steps"] if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    assert any(s.get("uses", "").startswith("actions/deploy-pages") for s in jobs["deploy"]["steps"])
