"""Measurements the chapters show: speed and memory, each in a child process of its own.

Chapters 5, 7 and 9 time merges and measure peak memory with these modules, run as
``python -m merging_helpers.bench.merge_speed`` and ``python -m merging_helpers.bench.apl_gradient_lean``
(a child process, so that its peak memory is its own). They ship with the package, so a
chapter opened alone (on Colab, from ``pip install``) runs them as the book's build does;
``benchmarks/`` in the repository holds thin command-line wrappers and the GPU check.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def module_command(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """``(command, environment)`` that runs ``python -m module *args`` in a child process that
    imports this very copy of ``merging_helpers`` (installed, editable, or a checkout on sys.path);
    chapters 5, 7 and the appendix run their measurements so."""
    package_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", module, *map(str, args)], env
