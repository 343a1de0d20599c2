"""Moved: ``merging_helpers.checkpoints`` is now ``merging_helpers.fast.checkpoints`` (second edition).

A deprecated alias, kept so that readers' code of the first edition keeps working; it
is not part of the reference engine (which never imports the fast tier).
"""
import warnings

from .fast import checkpoints as _moved
from .fast.checkpoints import *  # noqa: F401,F403

warnings.warn("merging_helpers.checkpoints moved to merging_helpers.fast.checkpoints", DeprecationWarning, stacklevel=2)
__all__ = list(getattr(_moved, "__all__", []))
