"""Merging checkpoints larger than memory, one tensor at a time.

:func:`merge_folders` merges Hugging Face model folders (a base and T experts) into
a new folder without ever holding a whole model in memory:

1. **validate everything first**: every folder exists and has the same tensor names,
   shapes and dtypes (errors name the tensor and the expert), the merge arguments
   are in range (also checked by one call of the merge on a 4-entry dummy tensor),
   the output path is not an input and is empty (or ``overwrite=True``);
2. plan the output shards from the names, dtypes and shapes (see
   :class:`~merging_helpers.checkpoints.ShardedSafetensorsWriter`);
3. for every tensor, in the base's on-disk order: read it from the base and every
   expert (a prefetch thread reads the next tensors while the current one is merged),
   merge it on ``device`` with :func:`merging_helpers.recipes.merge_tensor` (float32
   arithmetic), cast it back to the input dtype and hand it to a writer thread that
   writes it at its final offset;
4. move the finished folder into place atomically.

Peak memory is about (T+1) input tensors being merged + the float32 temporaries of
``merge_tensor`` + ``prefetch_bytes`` of read-ahead: set by the largest tensor, not
by the model size.

**Chunking, honestly.** A tensor is split into row chunks of ``chunk_elems`` entries
only when the method is element-wise *and* deterministic without per-tensor
statistics, so that merging the chunks gives exactly the whole-tensor result: that is
``task_arithmetic``.  Every other method needs the whole tensor: TIES / magnitude
keep the top-k |Δ| *of the tensor* (the threshold depends on all its entries),
``dare_*`` / ``della`` draw their random masks from one generator per
(seed, tensor name, expert), whose stream would restart in every chunk, and the
``"l1"`` rescale matches the norm of the whole tensor.  For those the largest tensor
(the embedding / LM head) sets the peak memory.

Because each tensor's random stream depends only on (seed, tensor name, expert index)
(:mod:`merging_helpers.rng`), the streaming result equals
:func:`merging_helpers.recipes.merge_state_dicts` on the same inputs, bit for bit.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .checkpoints import CheckpointFolder, ShardedSafetensorsWriter, check_output_path

__all__ = ["merge_folders", "validate_folders", "validate_merge_kwargs", "ELEMENTWISE_METHODS", "METHODS"]

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude", "della")
# Methods whose result at an entry depends only on the inputs at that entry (no
# per-tensor statistic, no random stream): safe to merge in row chunks.
ELEMENTWISE_METHODS = ("task_arithmetic",)


# --------------------------------------------------------------------------- validation


def _expert_names(expert_dirs) -> tuple[list[str], list[Path]]:
    if isinstance(expert_dirs, (str, os.PathLike)):
        raise TypeError("expert_dirs must be a list of folders (or a dict name -> folder), not one path")
    if isinstance(expert_dirs, Mapping):
        names, dirs = [str(k) for k in expert_dirs], [Path(v) for v in expert_dirs.values()]
    else:
        dirs = [Path(d) for d in expert_dirs]
        names = [f"expert {i} ({d})" for i, d in enumerate(dirs)]
    if not dirs:
        raise ValueError("merge_folders: no expert folders given; merging needs at least one expert")
    return names, dirs


def validate_folders(base: CheckpointFolder, experts: Sequence[CheckpointFolder],
                     expert_names: Sequence[str]) -> None:
    """Same tensor names, shapes and dtypes in every expert as in the base."""
    for who, ex in zip(expert_names, experts):
        missing = [n for n in base.tensors if n not in ex.tensors]
        extra = [n for n in ex.tensors if n not in base.tensors]
        if missing or extra:
            raise ValueError(f"{who}: tensor names differ from the base: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, extra {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        for name, bi in base.tensors.items():
            ei = ex.tensors[name]
            if ei.shape != bi.shape:
                raise ValueError(f"{who}: tensor {name!r} has shape {ei.shape}, the base has {bi.shape}")
            if ei.dtype != bi.dtype:
                raise TypeError(f"{who}: tensor {name!r} has dtype {ei.dtype}, the base has {bi.dtype}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_merge_kwargs(method: str, n_experts: int, kwargs: Mapping) -> None:
    """Range checks of the common merge arguments, with messages that say what is wrong."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    def check_rate(key, lo_open, hi_open):
        v = kwargs.get(key)
        if v is None:
            return
        values = list(v) if isinstance(v, (list, tuple)) else [v]
        if isinstance(v, (list, tuple)) and len(values) != n_experts:
            raise ValueError(f"{key}: expected one value per expert ({n_experts}), got {len(values)}")
        for x in values:
            if not _is_number(x):
                raise ValueError(f"{key} must be a finite number, got {x!r}")
            if (x <= 0 if lo_open else x < 0) or (x >= 1 if hi_open else x > 1):
                rng = f"{'(' if lo_open else '['}0, 1{')' if hi_open else ']'}"
                raise ValueError(f"{key} must lie in {rng}, got {x}")

    check_rate("density", True, False)
    check_rate("drop_rate", False, True)
    if kwargs.get("density") is not None and kwargs.get("drop_rate") is not None:
        raise ValueError("give either density or drop_rate, not both")
    w = kwargs.get("weights")
    if w is not None:
        w = list(w.tolist() if isinstance(w, torch.Tensor) else w)
        if len(w) != n_experts:
            raise ValueError(f"weights: expected one weight per expert ({n_experts}), got {len(w)}")
        if not all(_is_number(x) for x in w):
            raise ValueError(f"weights must be finite numbers, got {w}")
    if "lam" in kwargs and not _is_number(kwargs["lam"]):
        raise ValueError(f"lam must be a finite number, got {kwargs['lam']!r}")
    if "seed" in kwargs and not (isinstance(kwargs["seed"], int) and not isinstance(kwargs["seed"], bool)):
        raise ValueError(f"seed must be an int, got {kwargs['seed']!r}")


def _default_merge_fn() -> Callable:
    from .recipes import merge_tensor

    return merge_tensor


# --------------------------------------------------------------------------- prefetch


class _Prefetcher:
    """Reads (base, *experts) tensors in a background thread, ahead of use, keeping at
    most ``budget`` bytes of read-ahead (always at least the next tensor)."""

    _DONE = object()

    def __init__(self, folders: Sequence[CheckpointFolder], names: Sequence[str], budget: int):
        self.folders, self.names, self.budget = folders, list(names), budget
        self.q: queue.Queue = queue.Queue()
        self.cv = threading.Condition()
        self.pending = 0  # bytes read but not yet released by the consumer
        self.stop = False
        self.thread = threading.Thread(target=self._run, name="merge-prefetch", daemon=True)
        self.thread.start()

    def _size(self, name):
        return sum(f.tensors[name].nbytes for f in self.folders)

    def _run(self):
        try:
            for name in self.names:
                size = self._size(name)
                with self.cv:
                    self.cv.wait_for(lambda: self.stop or self.pending == 0 or self.pending + size <= self.budget)
                    if self.stop:
                        return
                    self.pending += size
                self.q.put((name, [f.read(name) for f in self.folders], size))
        except BaseException as e:  # hand the error to the consumer
            self.q.put((self._DONE, e, 0))
            return
        self.q.put((self._DONE, None, 0))

    def __iter__(self):
        while True:
            name, tensors, size = self.q.get()
            if name is self._DONE:
                if tensors is not None:
                    raise tensors
                return
            yield name, tensors
            with self.cv:
                self.pending -= size
                self.cv.notify_all()

    def close(self):
        with self.cv:
            self.stop = True
            self.cv.notify_all()
        # drain so a blocked put() cannot keep the thread alive (the queue is unbounded, so it never blocks)
        self.thread.join(timeout=60)


# --------------------------------------------------------------------------- merge


def _row_chunks(shape: tuple[int, ...], chunk_elems: int):
    """Row ranges (dim 0) of about ``chunk_elems`` entries each."""
    rows = shape[0]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, chunk_elems // per_row)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def merge_folders(
    base_dir: str | os.PathLike,
    expert_dirs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    method: str = "ties",
    *,
    device: str | torch.device = "cpu",
    chunk_elems: int = 1 << 22,
    max_shard_size: int | str = "2GB",
    progress: bool = True,
    overwrite: bool = False,
    prefetch_bytes: int = 1 << 29,
    merge_fn: Callable | None = None,
    **merge_kwargs,
) -> Path:
    """Merge the experts' folders onto the base folder, tensor by tensor, into ``out_dir``.

    Args:
        base_dir: Hugging Face folder of the base model (safetensors, sharded or not;
            a pickled ``pytorch_model.bin`` is read with ``weights_only=True``).
        expert_dirs: list of expert folders (or dict name -> folder, for messages).
        out_dir: output folder; must not be, contain or lie inside an input folder.
        method: one of ``METHODS``; the remaining keyword arguments (``density``,
            ``drop_rate``, ``weights``, ``lam``, ``seed``, ``rescale``, ``election``,
            ``election_weights``, ...) go to :func:`merging_helpers.recipes.merge_tensor`.
        device: where the arithmetic runs ("cpu", "cuda", "cuda:1", ...).
        chunk_elems: row-chunk size for element-wise methods (see module docstring).
        max_shard_size: largest output shard ("2GB", "500MB" or bytes).
        progress: show a tqdm bar over input bytes.
        overwrite: replace an existing non-empty ``out_dir``.
        prefetch_bytes: read-ahead budget of the prefetch thread.
        merge_fn: replaces ``recipes.merge_tensor`` (same signature); for tests.

    Returns: the output folder (resolved). Integer tensors are copied from the base.
    Output dtypes equal the input dtypes; config and tokenizer files come from the base.
    """
    merge_fn = merge_fn or _default_merge_fn()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but torch.cuda.is_available() is False")
    if not (isinstance(chunk_elems, int) and chunk_elems > 0):
        raise ValueError(f"chunk_elems must be a positive int, got {chunk_elems!r}")

    # ---- 1. validate everything before any work
    base_dir = Path(base_dir)
    expert_names, dirs = _expert_names(expert_dirs)
    for d, who in [(base_dir, "base")] + list(zip(dirs, expert_names)):
        if not d.is_dir():
            raise FileNotFoundError(f"{who}: folder not found: {d}")
    check_output_path(out_dir, [base_dir, *dirs], overwrite)
    validate_merge_kwargs(method, len(dirs), merge_kwargs)
    base = CheckpointFolder(base_dir)
    experts = [CheckpointFolder(d) for d in dirs]
    folders = [base, *experts]
    try:
        validate_folders(base, experts, expert_names)
        probe = torch.zeros(4, device=device)
        merge_fn("__validation_probe__", probe, [probe + 0.001 * (t + 1) for t in range(len(dirs))],
                 method, **merge_kwargs)  # raises on bad arguments before any I/O

        names = base.names()
        specs = [(n, base.tensors[n].dtype, base.tensors[n].shape) for n in names]
        total_bytes = sum(f.total_bytes for f in folders)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"merge {method}")
        chunkable = method in ELEMENTWISE_METHODS
        pin = device.type == "cuda"

        def to_device(t):
            if device.type == "cpu":
                return t
            return (t.pin_memory() if pin else t).to(device, non_blocking=pin)

        # ---- 2.-4. stream: prefetch -> merge -> write
        with ShardedSafetensorsWriter(out_dir, specs, max_shard_size, copy_from=base_dir,
                                      input_dirs=dirs, overwrite=overwrite) as writer, \
                ThreadPoolExecutor(1, thread_name_prefix="merge-write") as pool:
            pending: list = []
            prefetch = _Prefetcher(folders, names, prefetch_bytes)
            try:
                for name, (b, *ex) in prefetch:
                    dtype = b.dtype
                    if not dtype.is_floating_point:
                        out = b  # integer buffers (e.g. position_ids) are copied from the base
                    elif chunkable and b.dim() >= 1 and b.numel() > chunk_elems:
                        out = torch.empty_like(b)
                        for r0, r1 in _row_chunks(tuple(b.shape), chunk_elems):
                            m = merge_fn(name, to_device(b[r0:r1]), [to_device(e[r0:r1]) for e in ex],
                                         method, **merge_kwargs)
                            out[r0:r1].copy_(m)
                            del m
                    else:
                        m = merge_fn(name, to_device(b), [to_device(e) for e in ex], method, **merge_kwargs)
                        out = m.to(dtype) if m.dtype != dtype else m
                        del m
                    if tuple(out.shape) != tuple(b.shape):
                        raise RuntimeError(f"merge of {name!r} returned shape {tuple(out.shape)}, expected {tuple(b.shape)}")
                    del b, ex
                    # at most two writes in flight: bounds memory, keeps the disk busy
                    while len(pending) >= 2:
                        pending.pop(0).result()
                    pending.append(pool.submit(writer.write, name, out))
                    del out
                    if bar is not None:
                        bar.update(sum(f.tensors[name].nbytes for f in folders))
                for fut in pending:
                    fut.result()
            finally:
                prefetch.close()
        if bar is not None:
            bar.close()
        return writer.out_dir
    finally:
        for f in folders:
            f.close()
