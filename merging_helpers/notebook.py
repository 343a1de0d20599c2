"""The first cell of every chapter (chapter 0 on): detect Colab, choose the device, seed everything."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

REPO_URL = os.environ.get("MERGING_BOOK_REPO", "https://github.com/OWNER/model-merging-book")


def in_colab() -> bool:
    """True when running on Google Colab (every chapter's first cell, chapter 0)."""
    return "google.colab" in sys.modules


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU) (chapter 0)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(prefer: str | None = None) -> torch.device:
    """``prefer`` if given, else the GPU when there is one, else the CPU (chapter 0)."""
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup(seed: int = 0, device: str | None = None, quiet: bool = False) -> torch.device:
    """Seed everything, quiet the libraries' chatter, style the plots; return the device (chapter 0)."""
    import warnings
    seed_everything(seed)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import seaborn as sns
        sns.set_theme(style="whitegrid", context="notebook")
    except ImportError:
        pass
    dev = pick_device(device)
    if not quiet:
        print(f"torch {torch.__version__} | device: {dev} | colab: {in_colab()} | seed: {seed}")
    return dev
