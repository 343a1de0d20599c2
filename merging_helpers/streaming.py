"""Moved: ``merging_helpers.streaming`` is now ``merging_helpers.fast.streaming`` (second edition).

A deprecated alias, kept so that readers' code of the first edition keeps working; it
is not part of the reference engine (which never imports the fast tier).
"""
import warnings

from .fast import streaming as _moved
from .fast.streaming import *  # noqa: F401,F403

warnings.warn("merging_helpers.streaming moved to merging_helpers.fast.streaming", DeprecationWarning, stacklevel=2)
__all__ = list(getattr(_moved, "__all__", []))
