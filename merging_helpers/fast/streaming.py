"""Merging checkpoints larger than memory, one tensor at a time.

:func:`merge_folders` merges Hugging Face model folders (a base and T experts) into
a new folder without ever holding a whole model in memory:

1. **validate everything first**: every folder exists and has the same tensor names,
   shapes and dtypes (errors name the tensor and the expert), the merge options
   (one :class:`~merging_helpers.config.MergeConfig`, as in memory: ranges, every
   tensor finds its rate, per-row vectors fit), the output path is not an input, is
   empty (or ``overwrite=True``) and its parent is writable;
2. plan the output shards from the names, dtypes and shapes (see
   :class:`~merging_helpers.fast.checkpoints.ShardedSafetensorsWriter`);
3. for every tensor, in the base's on-disk order: read it from the base and every
   expert (a prefetch thread reads ahead while the current one is merged; on the CPU
   it maps the tensor's pages instead of copying them where they are in the page
   cache already, :meth:`~merging_helpers.fast.checkpoints.CheckpointFolder.map`), merge it
   in float32 on ``device``, cast it back to the input dtype and hand it to a writer
   thread that writes it at its final offset (through the page cache, unflushed, by
   default; ``fsync=True`` flushes every shard first);
4. move the finished folder into place atomically.

Two ways to merge a tensor, with the same result:

* :func:`merging_helpers.recipes.merge_tensor`, the book's readable engine (whole-
  tensor float32 temporaries, ~100 ns per parameter on a 2-core CPU);
* on the CPU, for the options it supports (:func:`~merging_helpers.fast.fused.fused_supported`:
  the methods whose drop rule is none, magnitude or random, float or per-partition
  rates, ``rescale`` "auto", "inverse" or None), the fused path
  (:mod:`merging_helpers.fast.fused`): worker threads, one-pass exact top-k
  threshold, and the arithmetic in a small compiled kernel
  (:mod:`merging_helpers.fast.compiled`). It reproduces ``merge_tensor`` exactly
  (tests compare them bit for bit) in a few ns per parameter. Where no C compiler is
  found, the reference engine merges (one warning says so).

**Chunking, honestly.** The engine path splits a tensor into row chunks of
``chunk_elems`` entries only where that gives exactly the whole-tensor result:
``task_arithmetic`` (element-wise) and ``dare_*`` without the ``"l1"`` rescale
(their random numbers are addressed by flat position, ``rng.EntryRandoms``, so a chunk
passes ``offset``).  TIES / magnitude keep the top-k |Δ| *of the tensor* (the
threshold depends on all of its entries), ``della`` ranks within rows and the ``"l1"``
rescale matches the norm of the whole tensor, so they get the whole tensor and the
largest tensor (embedding / LM head) sets the peak memory.  The fused path handles
top-k in two passes over pieces: one that finds the exact threshold of the whole
tensor, one that merges.

Peak memory ≈ (T+1) input tensors + the merge's temporaries (engine path: several
float32 copies of the tensor; fused path: a few MB) + ``prefetch_bytes`` of read-ahead
+ two outputs being written: set by the largest tensor, not by the model size.

Because each tensor's random numbers depend only on (seed, tensor name, expert,
position) (:mod:`merging_helpers.rng`), the streaming result equals
:func:`merging_helpers.recipes.merge_state_dicts` on the same inputs, bit for bit
(``magnitude_scope="model"`` included: its whole-model thresholds are computed by
streaming the deltas twice per expert first).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..config import start_config
from ..deltas import far_from_base
from ..recipes import merge_tensor, model_thresholds
from .output_path import check_output_path, recover_leftovers
from .reader import CheckpointFolder, ShortFileError
from .writer import ShardedSafetensorsWriter
from .fused import KERNELS, FusedMerge, fused_supported, kernel_for
from .input_guard import InputGuard

__all__ = ["merge_folders", "RunOptions", "validate_folders", "fused_supported", "KERNELS"]


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
    """Same tensor names, shapes and dtypes in every expert as in the base (appendix, chapter 8)."""
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


# --------------------------------------------------------------------------- prefetch


class _BufferPool:
    """Reusable uint8 buffers by exact size (a model repeats the same shapes layer
    after layer), so reads and outputs do not page-fault fresh memory every time.
    Keeps at most ``cap`` bytes of idle buffers: 1 GiB holds the embedding matrices
    of base and experts until the LM head (same shape) reuses them. ``put`` takes
    back only buffers that ``get`` gave out (not, e.g., a memory-mapped input)."""

    def __init__(self, cap: int = 1 << 30, pin: bool = False):
        self.cap, self.idle, self.free, self.pin = cap, 0, {}, pin
        self.mine: set[int] = set()  # data pointers of the buffers made here
        self.lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            lst = self.free.get(nbytes)
            if lst:
                self.idle -= nbytes
                return lst.pop()
        # pinned (page-locked) buffers when merging on a GPU: reads land where the GPU's copy
        # engine can fetch them asynchronously, at full PCIe speed
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        with self.lock:
            self.mine.add(buf.data_ptr())
        return buf

    def put(self, buf: torch.Tensor) -> None:
        n = buf.numel()
        with self.lock:
            if buf.data_ptr() not in self.mine:
                return
            if self.idle + n <= self.cap:
                self.free.setdefault(n, []).append(buf)
                self.idle += n
            else:  # dropped: its address may come back as someone else's memory
                self.mine.discard(buf.data_ptr())


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


class _Prefetcher:
    """Reads (base, *experts) tensors in a background thread, ahead of use, keeping at
    most ``budget`` bytes of read-ahead (always at least the next tensor). The T + 1
    copies of a tensor are read concurrently, one thread per folder: a virtual disk
    serves several requests in flight faster than one (1.9 against 1.4 GB/s measured
    here for the benchmark's files)."""

    _DONE = object()

    def __init__(self, folders: Sequence[CheckpointFolder], names: Sequence[str], budget: int,
                 pool: _BufferPool | None = None, mapped: bool = False):
        self.folders, self.names, self.budget, self.pool, self.mapped = folders, list(names), budget, pool, mapped
        self.q: queue.Queue = queue.Queue()
        self.cv = threading.Condition()
        self.pending = 0  # bytes read but not yet released by the consumer
        self.stop = False
        self.readers = ThreadPoolExecutor(len(self.folders), thread_name_prefix="merge-read")
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
                # one folder per reader thread: a CheckpointFolder is never read by two threads at once
                self.q.put((name, list(self.readers.map(lambda f: self._read(f, name), self.folders)), size))
        except BaseException as e:  # hand the error to the consumer
            self.q.put((self._DONE, e, 0))
            return
        self.q.put((self._DONE, None, 0))

    def _read(self, folder: CheckpointFolder, name: str) -> torch.Tensor:
        if folder.format != "safetensors" or not folder.tensors[name].nbytes:
            return folder.read(name)
        if self.mapped:  # in the page cache already: map it, no copy
            try:
                t = folder.map(name, cached_only=True)
                if t is not None:
                    return t
            except ShortFileError:
                raise
            except OSError:  # a file system that cannot map files: read instead
                pass
        if self.pool is None:
            return folder.read(name)
        return folder.read(name, buffer=self.pool.get(folder.tensors[name].nbytes))

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
        self.readers.shutdown()


# --------------------------------------------------------------------------- merge


def _model_thresholds(base: CheckpointFolder, experts: Sequence[CheckpointFolder], names: Sequence[str],
                      config, progress: bool) -> tuple[float, ...]:
    """``recipes.model_thresholds`` on deltas streamed from the folders (two passes per expert)."""
    def deltas_of(cf):
        return lambda: (cf.read(name).float() - base.read(name).float() for name in names)

    if progress:
        print(f"magnitude_scope='model': thresholds of {len(experts)} experts (2 passes over base + each expert)",
              flush=True)
    return model_thresholds([deltas_of(cf) for cf in experts], config)


class FolderSource:
    """The :class:`~merging_helpers.tensor_source.TensorSource` of checkpoint folders: a plan's reads,
    prefetched (mapped where cached); each triple's buffers go back to the pool once the plan has read
    it, so a plan's pass over the model holds about ``prefetch_bytes`` (appendix, chapter 8)."""

    def __init__(self, base: CheckpointFolder, experts: Sequence[CheckpointFolder], expert_names: Sequence[str],
                 floating: Sequence[str], run: "RunOptions"):
        self.base, self.experts, self.expert_names, self.run = base, list(experts), list(expert_names), run
        self.shapes = {n: tuple(base.tensors[n].shape) for n in floating}

    def triples(self, names):
        from tqdm.auto import tqdm
        names = list(names)
        pool = _BufferPool()
        prefetch = _Prefetcher([self.base, *self.experts], names, self.run.prefetch_bytes, pool, mapped=True)
        try:
            for name, (b, *ex) in tqdm(prefetch, total=len(names), desc="plan: statistics",
                                       disable=not self.run.progress):
                yield name, b, ex
                for t in (b, *ex):
                    if t.numel():
                        pool.put(_as_bytes(t))
        finally:
            prefetch.close()


def _row_chunks(shape: tuple[int, ...], chunk_elems: int):
    """Row ranges (dim 0) of about ``chunk_elems`` entries each."""
    rows = shape[0]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, chunk_elems // per_row)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _warn_if_not_the_base(base: CheckpointFolder, experts, expert_names, names, sample: int = 8) -> None:
    """The in-memory merge's "is this really the base?" check, on the ``sample`` smallest
    weight matrices (reading every tensor twice would double the merge; norms and biases
    say little, as every model's are close to 1 or 0)."""
    matrices = [n for n in names if len(base.tensors[n].shape) >= 2] or list(names)
    picked = sorted(matrices, key=lambda n: (base.tensors[n].numel, n))[:sample]
    for who, cf in zip(expert_names, experts):
        far = sum(far_from_base(base.read(n), cf.read(n).float() - base.read(n).float()) for n in picked)
        if picked and far > len(picked) / 2:
            warnings.warn(f"{who}: ‖Δ‖/‖θ_b‖ > 0.5 on {far} of {len(picked)} sampled tensors; is the base really "
                          "this expert's base?", stacklevel=3)


def _check_run_options(prefetch_bytes, workers, **flags) -> None:
    """merge_folders' switches are booleans (``overwrite="no"`` would be true), its sizes whole numbers."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"merge_folders: {name} must be True or False, got {value!r}")
    if isinstance(prefetch_bytes, bool) or not (isinstance(prefetch_bytes, int) and prefetch_bytes >= 0):
        raise TypeError(f"merge_folders: prefetch_bytes must be a whole number of bytes >= 0, got {prefetch_bytes!r}")
    if workers is not None and (isinstance(workers, bool) or not (isinstance(workers, int) and workers > 0)):
        raise TypeError(f"merge_folders: workers must be None or a whole number > 0, got {workers!r}")


@dataclass(frozen=True)
class RunOptions:
    """How a streamed merge runs, not what it computes (appendix, chapter 8). ``device``: where the
    arithmetic runs; ``chunk_elems``: row-chunk size of the reference path; ``max_shard_size``: the
    largest output shard; ``progress``: tqdm bars; ``overwrite``: replace a non-empty output;
    ``prefetch_bytes``: read-ahead; ``fused``/``kernel``/``workers``: the fused CPU path;
    ``merge_fn``: replaces ``recipes.merge_tensor`` (tests); ``direct_io``/``fsync``: how the
    output is written (:class:`~merging_helpers.fast.writer.ShardedSafetensorsWriter`)."""

    device: str | torch.device = "cpu"
    chunk_elems: int = 1 << 22
    max_shard_size: int | str = "2GB"
    progress: bool = True
    overwrite: bool = False
    prefetch_bytes: int = 1 << 29
    fused: bool = True
    kernel: str = "auto"
    workers: int | None = None
    merge_fn: Callable | None = None
    direct_io: bool = False
    fsync: bool = False

    def checked(self) -> "RunOptions":
        """These options with ``device`` as a ``torch.device``; a clear error for any out of range."""
        device = torch.device(self.device)
        if device.type == "meta":
            raise ValueError("device='meta' holds no data, so nothing could be merged: use 'cpu' or 'cuda'")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' requested but torch.cuda.is_available() is False")
        if not (isinstance(self.chunk_elems, int) and self.chunk_elems > 0):
            raise ValueError(f"chunk_elems must be a positive int, got {self.chunk_elems!r}")
        _check_run_options(progress=self.progress, overwrite=self.overwrite, fused=self.fused,
                           direct_io=self.direct_io, fsync=self.fsync, prefetch_bytes=self.prefetch_bytes,
                           workers=self.workers)
        return replace(self, device=device)


RUN_OPTIONS = frozenset(f.name for f in fields(RunOptions))


def merge_folders(base_dir: str | os.PathLike, expert_dirs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
                  out_dir: str | os.PathLike, method: str | None = None, *, config=None,
                  run: RunOptions | None = None, **options) -> Path:
    """Merge the experts' folders onto the base folder, tensor by tensor, into ``out_dir``
    (appendix "Merging at scale", chapter 8).

    Args:
        base_dir: Hugging Face folder of the base model (safetensors, sharded or not;
            a pickled ``pytorch_model.bin`` is read with ``weights_only=True``).
        expert_dirs: list of expert folders (or dict name -> folder, for messages).
        out_dir: output folder; must not be, contain or lie inside an input folder.
        method, options: the merge, as for :func:`merging_helpers.recipes.merge_state_dicts`
            (``density``, ``drop_rate``, ``weights``, ``lam``, ``seed``, ``rescale``, ...), or a
            ready ``config`` (:class:`~merging_helpers.config.MergeConfig`). A planned method
            (:data:`merging_helpers.methods.PLANNED`: ``"apl"``, ``"dp"``, ``"rms_adaptive"``, each with
            its own options) runs its plan over the folders first (:class:`FolderSource`), for the
            statistics its config needs.
        run: how it runs (:class:`RunOptions`); its fields may also be passed by name
            (``device="cuda"``, ``progress=False``, ...).

    Returns: the output folder (resolved). Integer tensors are copied from the base.
    Output dtypes equal the input dtypes (or the config's ``out_dtype`` for floating tensors);
    config and tokenizer files come from the base. An input that another process opens for
    writing or truncates meanwhile stops the merge with ``InputChangedError`` naming it (read
    leases on Linux, :mod:`~merging_helpers.fast.input_guard`), never a crash.
    """
    run = replace(run or RunOptions(), **{k: options.pop(k) for k in list(options) if k in RUN_OPTIONS}).checked()
    base_dir = Path(base_dir)
    expert_names, dirs = _expert_names(expert_dirs)
    config, finish = start_config(method, len(dirs), config, options)
    for d, who in [(base_dir, "base")] + list(zip(dirs, expert_names)):
        if not d.is_dir():
            raise FileNotFoundError(f"{who}: folder not found: {d}")
    recover_leftovers(out_dir)
    check_output_path(out_dir, [base_dir, *dirs], run.overwrite)
    lib = _kernel_if_fused(run, config)  # an unavailable kernel='c' fails here, before any reading
    base, experts = CheckpointFolder(base_dir), [CheckpointFolder(d) for d in dirs]
    folders = [base, *experts]
    guard = InputGuard().start()  # another process that writes an input stops the merge, not SIGBUS
    for f in folders:
        f.guard = guard
    try:
        validate_folders(base, experts, expert_names)
        floating = [n for n in base.names() if base.tensors[n].dtype.is_floating_point]
        config.check_tensors({n: base.tensors[n].shape for n in floating})
        _warn_if_not_the_base(base, experts, expert_names, floating)
        if finish is not None:
            config = finish(FolderSource(base, experts, expert_names, floating, run))
            lib = _kernel_if_fused(run, config)
        if config.magnitude_scope == "model":
            config = config.replace(thresholds=_model_thresholds(base, experts, floating, config, run.progress))
        return _Executor(config, run, lib, guard).write(base, experts, base_dir, dirs, out_dir)
    finally:
        for f in folders:
            f.close()
        guard.stop()


def _kernel_if_fused(run: RunOptions, config):
    """The compiled library where the fused path may run this config, else None."""
    return kernel_for(run.kernel, config, run.device) if run.fused and run.merge_fn is None else None


def _chunkable(config) -> bool:
    """Row chunks give the whole tensor's result only without per-tensor statistics: no top-k
    (unless thresholds are given), no L1 norm, no ranking within rows, no per-row rates."""
    drop = config.method.drop
    return (config.rescale_rule != "l1" and not config.has_vector_rates()
            and (drop in (None, "random") or (drop == "magnitude" and config.thresholds is not None)))


class _Executor:
    """The per-tensor loop of a streamed merge (appendix, chapter 8): prefetch → merge → write,
    for any method's config; it names no method."""

    def __init__(self, config, run: RunOptions, lib, guard):
        self.config, self.run, self.guard = config, run, guard
        self.merge_fn = run.merge_fn or merge_tensor
        self.chunkable = _chunkable(config)
        self.threads = torch.get_num_threads()
        self.fused = FusedMerge(config, lib, run.workers or self.threads) if lib is not None else None
        self.pool = _BufferPool(pin=run.device.type == "cuda")

    def write(self, base, experts, base_dir, dirs, out_dir) -> Path:
        """Merge every tensor of ``base`` and ``experts`` into ``out_dir``; returns the output folder."""
        folders, names = [base, *experts], base.names()
        specs = [(n, self.config.output_dtype(base.tensors[n].dtype), base.tensors[n].shape) for n in names]
        bar = None
        if self.run.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=sum(f.total_bytes for f in folders), unit="B", unit_scale=True,
                       desc=f"merge {self.config.method.name}")
        if self.fused is not None:
            torch.set_num_threads(1)  # parallel over pieces instead (see the fused path)
        with ShardedSafetensorsWriter(out_dir, specs, self.run.max_shard_size, copy_from=base_dir, input_dirs=dirs,
                                      overwrite=self.run.overwrite, direct=self.run.direct_io,
                                      fsync=self.run.fsync) as writer, \
                ThreadPoolExecutor(1, thread_name_prefix="merge-write") as wpool:
            # on the CPU, inputs already in the page cache are mapped, not copied: no buffer to fill
            prefetch = _Prefetcher(folders, names, self.run.prefetch_bytes, self.pool,
                                   mapped=self.run.device.type == "cpu")
            try:
                self._stream(prefetch, writer, wpool, folders, bar)
            finally:
                prefetch.close()
                if self.fused is not None:
                    self.fused.close()
                    torch.set_num_threads(self.threads)
        if bar is not None:
            bar.close()
        return writer.out_dir

    def _stream(self, prefetch, writer, wpool, folders, bar) -> None:
        pending: list = []
        for name, (b, *ex) in prefetch:
            self.guard.check()
            out = self._merge_one(name, b, ex)
            # input buffers go back to the pool now, the output's once it is written
            # (an output that aliases an input, e.g. a copied integer buffer, waits too)
            release = [_as_bytes(out)] if out.numel() and out.is_contiguous() and out.device.type == "cpu" else []
            for t in (b, *ex):
                if t.numel() and t.data_ptr() != out.data_ptr():
                    self.pool.put(_as_bytes(t))
            del b, ex
            while len(pending) >= 2:  # at most two writes in flight: bounds memory, keeps the disk busy
                pending.pop(0).result()
            pending.append(wpool.submit(self._write, writer, name, out, release))
            del out
            if bar is not None:
                bar.update(sum(f.tensors[name].nbytes for f in folders))
        for fut in pending:
            fut.result()

    def _write(self, writer, name, out, release) -> None:
        writer.write(name, out)
        for buf in release:  # the buffers are free once written
            self.pool.put(buf)

    def _merge_one(self, name, b, ex) -> torch.Tensor:
        """One tensor merged, in the output dtype, on the CPU: copied (integers), fused, by row
        chunks, or whole through the reference engine."""
        config = self.config
        dtype = config.output_dtype(b.dtype)
        if not dtype.is_floating_point:
            return b  # integer buffers (e.g. position_ids) are copied from the base
        if self.fused is not None and self.fused.takes(name, b.dtype):
            out = self.pool.get(b.numel() * b.element_size()).view(dtype).view(b.shape)
            return self.fused.merge_into(name, b, ex, out)
        if self.chunkable and b.dim() >= 1 and b.numel() > self.run.chunk_elems:
            out = self.pool.get(b.numel() * dtype.itemsize).view(dtype).view(b.shape)
            for r0, r1 in _row_chunks(tuple(b.shape), self.run.chunk_elems):
                m = self.merge_fn(name, self._to_device(b[r0:r1]), [self._to_device(e[r0:r1]) for e in ex],
                                  config.method.name, config=config, offset=r0 * (b.numel() // b.shape[0]))
                _check_shape(name, m, out[r0:r1].shape)
                out[r0:r1].copy_(m)  # synchronous, as in _to_host
                del m
            return out
        m = self.merge_fn(name, self._to_device(b), [self._to_device(e) for e in ex], config.method.name, config=config)
        return self._to_host(name, m, dtype, b.shape)

    def _to_device(self, t):
        # inputs are pinned pool buffers on a GPU run: an asynchronous copy, which is complete
        # before their buffers go back to the pool (the synchronous copy of the result waits for it)
        return t if self.run.device.type == "cpu" else t.to(self.run.device, non_blocking=t.is_pinned())

    def _to_host(self, name, m, dtype, shape):
        """The merged tensor in ``dtype`` (the output's), in a (pinned) pool buffer on the CPU."""
        _check_shape(name, m, shape)
        m = m.to(dtype)
        if m.device.type == "cpu":
            return m
        host = self.pool.get(m.numel() * m.element_size()).view(dtype).view(shape)
        return host.copy_(m)  # synchronous: the inputs' copies to the GPU are done too


def _check_shape(name, m, shape) -> None:
    if tuple(m.shape) != tuple(shape):  # checked first: copy_ would broadcast it
        raise RuntimeError(f"merge of {name!r} returned shape {tuple(m.shape)}, expected {tuple(shape)}")
