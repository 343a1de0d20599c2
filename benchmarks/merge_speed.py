#!/usr/bin/env python
"""Command-line wrapper of ``merging_helpers.bench.merge_speed`` (see its docstring and ``--help``).

The measurement lives in the package so that a chapter opened alone, from an installed
package, runs it too; this file keeps the old command working from a checkout:
``python benchmarks/merge_speed.py ...`` = ``python -m merging_helpers.bench.merge_speed ...``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without an install
from merging_helpers.bench.merge_speed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
