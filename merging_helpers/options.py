"""Options objects: a function's knobs as one small dataclass (chapter 3 on).

A function with many knobs takes its few essential arguments plus an options object (or
the same knobs by name): ``trace(scorer, base, expert, task, examples, level, chunk=64)``
and ``trace(..., level, TraceOptions(chunk=64))`` are the same call. :func:`options_from`
merges the two and refuses a name that is not a knob, listing the knobs. Imports nothing
of the package.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping


def options_from(cls, options, given: Mapping, what: str):
    """``options`` (an instance of the dataclass ``cls``, or None for its defaults) with the knobs
    named in ``given`` replaced; an unknown name raises TypeError naming ``what`` and the knobs (chapter 3)."""
    if options is not None and not isinstance(options, cls):
        raise TypeError(f"{what}: options must be a {cls.__name__}, got a {type(options).__name__}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f"{what}: unknown option(s) {unknown}; the options are {allowed}")
    return dataclasses.replace(options or cls(), **given)
