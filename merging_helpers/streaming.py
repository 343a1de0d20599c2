"""Merging checkpoints larger than memory, one tensor at a time.

:func:`merge_folders` merges Hugging Face model folders (a base and T experts) into
a new folder without ever holding a whole model in memory:

1. **validate everything first**: every folder exists and has the same tensor names,
   shapes and dtypes (errors name the tensor and the expert), the merge arguments
   are in range (also checked by one call of the merge on a 4-entry dummy tensor, and
   every tensor must find its per-partition rate), the output path is not an input
   and is empty (or ``overwrite=True``);
2. plan the output shards from the names, dtypes and shapes (see
   :class:`~merging_helpers.checkpoints.ShardedSafetensorsWriter`);
3. for every tensor, in the base's on-disk order: read it from the base and every
   expert (a prefetch thread reads ahead while the current one is merged), merge it
   in float32 on ``device``, cast it back to the input dtype and hand it to a writer
   thread that writes it at its final offset (through the page cache, unflushed, by
   default; ``fsync=True`` flushes every shard first);
4. move the finished folder into place atomically.

Two ways to merge a tensor, with the same result:

* :func:`merging_helpers.recipes.merge_tensor`, the book's readable engine (whole-
  tensor float32 temporaries, ~100 ns per parameter on a 2-core CPU);
* on the CPU, for the options it supports (:func:`fused_supported`: the five
  methods except ``della``, float or per-partition rates, ``rescale`` in
  {"auto", "inverse", None}), the fused path below: cache-sized
  chunks, worker threads, one-pass exact top-k threshold, and the inner loops in a
  small compiled kernel (:mod:`merging_helpers.compiled`; torch ops where no C
  compiler is found). It reproduces ``merge_tensor`` exactly (tests compare them
  bit for bit) in 0.5-4 ns per parameter on one core of our VM.

**Chunking, honestly.** The engine path splits a tensor into row chunks of
``chunk_elems`` entries only where that gives exactly the whole-tensor result:
``task_arithmetic`` (element-wise) and ``dare_*`` without the ``"l1"`` rescale
(their random numbers are addressed by flat position, ``rng.EntryRandoms``, so a chunk
passes ``offset``).  TIES / magnitude keep the top-k |Δ| *of the tensor* (the
threshold depends on all of its entries), ``della`` ranks within rows and the ``"l1"``
rescale matches the norm of the whole tensor, so they get the whole tensor and the
largest tensor (embedding / LM head) sets the peak memory.  The fused path handles
top-k in two passes over chunks: one that finds the exact threshold of the whole
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

import ctypes
import math
import numbers
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .checkpoints import CheckpointFolder, ShardedSafetensorsWriter, check_output_path

__all__ = ["merge_folders", "validate_folders", "validate_merge_kwargs", "fused_supported",
           "ELEMENTWISE_METHODS", "FUSED_METHODS", "METHODS"]

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
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


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
        # per-partition rates: a dict partition key -> rate (see partitions.rate_for)
        values = [y for x in values for y in (x.values() if isinstance(x, Mapping) else [x])]
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


class _BufferPool:
    """Reusable uint8 buffers by exact size (a model repeats the same shapes layer
    after layer), so reads and outputs do not page-fault fresh memory every time.
    Keeps at most ``cap`` bytes of idle buffers: 1 GiB holds the embedding matrices
    of base and experts until the LM head (same shape) reuses them."""

    def __init__(self, cap: int = 1 << 30, pin: bool = False):
        self.cap, self.idle, self.free, self.pin = cap, 0, {}, pin
        self.lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            lst = self.free.get(nbytes)
            if lst:
                self.idle -= nbytes
                return lst.pop()
        # pinned (page-locked) buffers when merging on a GPU: reads land where the GPU's copy
        # engine can fetch them asynchronously, at full PCIe speed
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def put(self, buf: torch.Tensor) -> None:
        n = buf.numel()
        with self.lock:
            if self.idle + n <= self.cap:
                self.free.setdefault(n, []).append(buf)
                self.idle += n


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


class _Prefetcher:
    """Reads (base, *experts) tensors in a background thread, ahead of use, keeping at
    most ``budget`` bytes of read-ahead (always at least the next tensor)."""

    _DONE = object()

    def __init__(self, folders: Sequence[CheckpointFolder], names: Sequence[str], budget: int,
                 pool: _BufferPool | None = None):
        self.folders, self.names, self.budget, self.pool = folders, list(names), budget, pool
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
                self.q.put((name, [self._read(f, name) for f in self.folders], size))
        except BaseException as e:  # hand the error to the consumer
            self.q.put((self._DONE, e, 0))
            return
        self.q.put((self._DONE, None, 0))

    def _read(self, folder: CheckpointFolder, name: str) -> torch.Tensor:
        if self.pool is None or folder.format != "safetensors" or not folder.tensors[name].nbytes:
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


# --------------------------------------------------------------------------- fused CPU path
#
# recipes.merge_tensor is written for clarity: every step makes whole-tensor float32
# temporaries (T deltas, masks, stacks), ~100 ns per parameter on a 2-core CPU.  For
# the common options the fused path below gives the *same numbers* (tests compare it
# with merge_tensor bit for bit) in a few ns per parameter:
#
# * the flat tensor is cut into pieces of rng.BLOCK entries (so a DARE piece draws
#   exactly one block of its random stream) and pieces into sub-chunks of ``SUB``
#   entries whose (T, SUB) float32 buffers stay in cache; every op writes into
#   preallocated buffers (no allocation, no page faults);
# * pieces run in parallel on ``workers`` threads, each op single-threaded (torch
#   releases the GIL), which also avoids OpenMP barrier stalls on a busy machine;
# * the exact per-tensor top-k threshold (TIES, magnitude) is found in one pass:
#   a strided sample brackets the k-th largest |Δ| in [lo, hi]; the pass counts the
#   entries above hi and collects those inside the bracket (a few %), whose k-th
#   largest (selection.kth_largest_abs) is the exact threshold.  Ties at the threshold
#   are kept in increasing flat-index order, as in selection.top_k_mask.  If the
#   bracket misses (never seen; it is checked), the exact whole-tensor rule is used;
# * each piece is merged by the compiled kernel (compiled.py, csrc/fused_merge.c: the
#   same operations in one pass over L1-sized tiles, 2-3x faster) when it can be built,
#   else sub-chunk by sub-chunk with torch ops (``_sub``), which is what it mirrors.
#
# Everything else ("l1"/"keep_prob"/"factor" rescales, della, an offset given by the
# caller, CUDA) goes through merge_tensor.

FUSED_METHODS = ("task_arithmetic", "magnitude", "ties", "dare_linear", "dare_ties")
_FUSED_KWARGS = {"density", "drop_rate", "weights", "lam", "seed", "rescale", "election", "election_weights",
                 "merge_mode", "rate_level", "rate_default", "epsilon", "thresholds"}
SUB = 1 << 17  # entries per sub-chunk: ~14 float32 rows of 512 kB per worker stay in L3
EXACT_MAX = 1 << 20  # tensors up to this size find their top-k threshold on the whole tensor
_SAMPLE = 1 << 16
_BRACKET_SIGMAS = 6.0  # half-width of the sample bracket in binomial standard deviations
_SCAN_SLACK = 4096  # extra room for the compiled scan's candidates (a test makes it negative)


def fused_supported(method: str, kwargs: Mapping, device, n_experts: int = 2) -> bool:
    """True if :class:`_Fused` reproduces ``merge_tensor`` for these arguments."""
    if torch.device(device).type != "cpu" or method not in FUSED_METHODS or set(kwargs) - _FUSED_KWARGS:
        return False
    if kwargs.get("rescale", "auto") not in ("auto", "inverse", None):
        return False
    if kwargs.get("election", "total") not in ("total", "frequency"):
        return False
    if kwargs.get("election_weights", "peft") not in ("peft", "mergekit"):
        return False
    return kwargs.get("merge_mode") in (None, "mean", "weighted_mean", "sum")


class _Buffers:
    """Per-thread scratch space for one sub-chunk (allocated once, reused)."""

    def __init__(self, T: int, m: int):
        self.bf = torch.empty(m)
        self.D = torch.empty(T, m)
        self.A = torch.empty(T, m)
        self.Kf = torch.empty(T, m)  # float masks: mask * delta is a plain float multiply
        self.M = torch.empty(m)
        self.signs = torch.empty(m)
        self.cnt = torch.empty(m)
        self.tmp = torch.empty(m)
        self.ones = torch.ones(m)


def _rowsum(rows, out):
    """rows[0] + rows[1] + ... in that order, into ``out``: the order of
    ``consensus.sum_experts``, so the same numbers as the engine."""
    if len(rows) == 1:
        return out.copy_(rows[0])
    torch.add(rows[0], rows[1], out=out)
    for r in rows[2:]:
        out.add_(r)
    return out


class _TopK:
    """Per expert: the threshold, and per piece which comparison keeps the right entries."""

    def __init__(self, thr: float, missing: int, ties_per_piece: list[int]):
        self.thr = thr
        # |Δ| >= thr  <=>  |Δ| > the float32 just below thr
        self.below = float(torch.nextafter(torch.tensor(thr, dtype=torch.float32), torch.tensor(float("-inf"))))
        self.allow = []  # per piece: (threshold ties to keep in flat order, ties in the piece)
        left = missing
        for c in ties_per_piece:
            a = min(left, c)
            self.allow.append((a, c))
            left -= a


class _Fused:
    """Merge one CPU tensor like ``recipes.merge_tensor`` (same arguments), fused."""

    def __init__(self, method: str, n_experts: int, kwargs: Mapping, workers: int, kernel: str = "auto"):
        from . import compiled, rng
        from .recipes import _densities_for

        self._densities_for, self.rng = _densities_for, rng
        self.method, self.T, self.kw = method, n_experts, dict(kwargs)
        self.lam = float(kwargs.get("lam", 1.0))
        self.seed = kwargs.get("seed", 0)
        self.fixed = kwargs.get("thresholds")
        w = kwargs.get("weights")
        # the engine multiplies by float32 weights: use their float32 values as scalars
        self.w = None if w is None else [float(x) for x in torch.as_tensor(w, dtype=torch.float32).reshape(-1)]
        self.drop = {"task_arithmetic": None, "magnitude": "magnitude", "ties": "magnitude",
                     "dare_linear": "random", "dare_ties": "random"}[method]
        rescale = kwargs.get("rescale", "auto")
        default = {"magnitude": None, "random": "inverse", None: None}[self.drop]
        self.how = None if self.drop is None else (default if rescale == "auto" else rescale)
        self.ties = method in ("ties", "dare_ties")
        self.election = kwargs.get("election", "total")
        mode = kwargs.get("merge_mode")
        if kwargs.get("election_weights", "peft") == "peft":
            self.elect_w, self.mode = None, mode or "mean"
        else:
            self.elect_w = self.w
            self.mode = mode or ("sum" if method == "dare_ties" else "weighted_mean")
        if self.mode == "weighted_mean" and self.w is None:
            self.mode = "mean"  # Σ 1·agree = the count; where(|count| < 1e-8, 1, count) = max(count, 1)
        self.piece = rng.BLOCK
        self.workers = max(1, int(workers))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="merge-fused") if self.workers > 1 else None
        self.local = threading.local()
        # the compiled kernel (compiled.py) when it can be built here, else torch ops
        self.kernel = None
        if kernel == "c" and n_experts > compiled.MAXT:
            raise ValueError(f"kernel='c' merges at most {compiled.MAXT} experts, got {n_experts}")
        if kernel != "torch" and n_experts <= compiled.MAXT:
            self.kernel = compiled.load()
            if self.kernel is None and kernel == "c":
                raise RuntimeError(f"kernel='c': the compiled kernel is not available ({compiled.ERROR})")
        self.compiled = compiled

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()

    def _buf(self) -> _Buffers:
        b = getattr(self.local, "buf", None)
        if b is None:
            b = self.local.buf = _Buffers(self.T, SUB)
        return b

    def _map(self, fn, items):
        items = list(items)
        if self.pool is None or len(items) <= 1:
            return [fn(i) for i in items]
        return list(self.pool.map(fn, items))

    def _pieces(self, n):
        return [(s, min(n, s + self.piece)) for s in range(0, n, self.piece)]

    def _deltas(self, buf, bs, es):
        """buf.D[:, :m] = expert.float() - base.float() (converting first: a mixed
        bf16 - float32 op is ~10x slower than the conversion plus a float32 op)."""
        m = bs.numel()
        bf, D = buf.bf[:m], buf.D[:, :m]
        bf.copy_(bs)
        for t, e in enumerate(es):
            D[t].copy_(e)
        D.sub_(bf)  # one call for all rows (broadcast)
        return bf, D

    # -- top-k thresholds -------------------------------------------------------
    def _exact_topk(self, b, e, k, pieces) -> _TopK:
        from .selection import kth_largest_abs

        if k == 0:
            return _TopK(float("inf"), 0, [0] * len(pieces))
        if k >= b.numel():  # keep everything (|Δ| > -1)
            return _TopK(-1.0, 0, [0] * len(pieces))
        a = (e.float() - b.float()).abs_()
        thr = kth_largest_abs(a, k)
        missing = k - int((a > thr).sum())
        return _TopK(thr, missing, [int((a[s:t] == thr).sum()) for s, t in pieces])

    def _topk(self, b, es, ks, pieces) -> list[_TopK]:
        n = b.numel()
        if n <= EXACT_MAX:
            return [self._exact_topk(b, e, k, pieces) for e, k in zip(es, ks)]
        from .selection import kth_largest_abs

        # 1. bracket the k-th largest |Δ| of every expert with a strided sample
        idx = torch.arange(_SAMPLE, dtype=torch.int64) * (n // _SAMPLE)
        bs = b[idx].float()
        lo, hi, samples = [], [], []
        for e, k in zip(es, ks):
            sample = (e[idx].float() - bs).abs_().numpy()
            samples.append(sample)
            q = k / n
            r = q * _SAMPLE  # rank (from the top) of the k-th largest, in the sample
            margin = _BRACKET_SIGMAS * math.sqrt(_SAMPLE * q * (1 - q)) + 16
            i_hi, i_lo = int(r - margin), int(math.ceil(r + margin))  # ranks from the top
            j_hi = _SAMPLE - 1 - min(max(i_hi, 0), _SAMPLE - 1)  # ascending positions
            j_lo = _SAMPLE - 1 - min(max(i_lo, 0), _SAMPLE - 1)
            part = np.partition(sample, sorted({j_hi, j_lo}))
            hi.append(float(part[j_hi]) if i_hi >= 0 else float("inf"))
            lo.append(float(part[j_lo]) if i_lo < _SAMPLE else 0.0)

        # 2. one pass: count |Δ| > hi, collect lo <= |Δ| <= hi (per piece, in order)
        kernel = self._kernel_takes(b)
        if kernel:
            args = self._kernel_args("", b, [0.0] * self.T, [1.0] * self.T)
            lo_hi = [(ctypes.c_float * self.T)(*v) for v in (lo, hi)]
            # candidates expected per piece: the sample's fraction inside the bracket
            frac = [float(((sample_t >= l) & (sample_t <= h)).mean()) for sample_t, l, h in zip(samples, lo, hi)]

        def kernel_scan(piece):
            s0, s1 = piece
            a = self._piece_args(args, b, es, None, s0, s1)
            # twice the expected count, else room for every entry (+ 1: bracket_scan writes one past its last)
            for cap in (max(1, int(2 * max(frac) * (s1 - s0)) + _SCAN_SLACK), s1 - s0 + 1):
                cands = [np.empty(cap, dtype=np.float32) for _ in range(self.T)]
                above, count = (ctypes.c_int64 * self.T)(), (ctypes.c_int64 * self.T)()
                ptrs = (ctypes.c_void_p * self.T)(*[c.ctypes.data for c in cands])
                if self.kernel.bracket_scan(ctypes.byref(a), lo_hi[0], lo_hi[1], above, ptrs, count, cap) == 0:
                    return list(above), [torch.from_numpy(c[:k]) for c, k in zip(cands, count)]
            raise RuntimeError("bracket_scan failed")

        def scan(piece):
            if kernel:
                return kernel_scan(piece)
            s0, s1 = piece
            buf = self._buf()
            above = [0] * self.T
            cands = [[] for _ in range(self.T)]
            for c0 in range(s0, s1, SUB):
                c1 = min(s1, c0 + SUB)
                m = c1 - c0
                _, D = self._deltas(buf, b[c0:c1], [e[c0:c1] for e in es])
                A = buf.A[:, :m]
                torch.abs(D, out=A)
                for t in range(self.T):
                    # numpy: its boolean comparisons and compaction are ~4x cheaper than torch's here
                    a = A[t].numpy()
                    above[t] += int(np.count_nonzero(a > hi[t]))
                    cands[t].append(a[(a >= lo[t]) & (a <= hi[t])])
            return above, [torch.from_numpy(np.concatenate(c)) for c in cands]

        results = self._map(scan, pieces)
        out = []
        for t, k in enumerate(ks):
            if k == 0 or k >= n:
                out.append(self._exact_topk(b, es[t], k, pieces))
                continue
            above = sum(r[0][t] for r in results)
            per_piece = [r[1][t] for r in results]
            cands = torch.cat(per_piece)
            k2 = k - above
            if not 1 <= k2 <= cands.numel():  # the bracket missed: exact rule on the whole tensor
                out.append(self._exact_topk(b, es[t], k, pieces))
                continue
            thr = kth_largest_abs(cands, k2)
            missing = k - above - int((cands > thr).sum())
            out.append(_TopK(thr, missing, [int((c == thr).sum()) for c in per_piece]))
        return out

    # -- merge -------------------------------------------------------------------
    def __call__(self, name: str, b: torch.Tensor, es: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        T, n = self.T, b.numel()
        # checked here because the compiled kernel reads and writes raw memory
        for what, t in [("output", out)] + [(f"expert {i}", e) for i, e in enumerate(es)]:
            if t.dtype != b.dtype or t.numel() != n:
                raise ValueError(f"{name!r}: {what} is {t.dtype} with {t.numel()} entries, the base {b.dtype} "
                                 f"with {n}")
        if not out.is_contiguous():
            raise ValueError(f"{name!r}: the output tensor must be contiguous")
        if len(es) != T:
            raise ValueError(f"{name!r}: expected {T} experts, got {len(es)}")
        kw = self.kw
        dens = self._densities_for(name, kw.get("density"), kw.get("drop_rate"), T,
                                   kw.get("rate_level", "layer_role"), kw.get("rate_default"))
        b, out = b.reshape(-1), out.reshape(-1)
        es = [e.reshape(-1) for e in es]
        pieces = self._pieces(n)
        topk = None
        if self.drop == "magnitude" and self.fixed is not None:
            # given thresholds (e.g. the whole model's): keep |Δ| >= threshold (drop.threshold_keep_mask)
            topk = [_TopK(float(th), 1 << 62, [1] * len(pieces)) for th in self.fixed]
        elif self.drop == "magnitude":
            topk = self._topk(b, es, [round(d * n) for d in dens], pieces)
        drop_rates = [1.0 - d for d in dens]  # as recipes.drop_and_rescale
        divisors = [1.0 - p for p in drop_rates]  # as rescale.rescale_inverse_keep

        if self._kernel_takes(b):
            args = self._kernel_args(name, b, drop_rates, divisors)
            self._map(lambda ip: self._run_kernel(args, name, b, es, out, pieces[ip], ip, topk), range(len(pieces)))
            return

        def run(ip):
            s0, s1 = pieces[ip]
            buf = self._buf()
            U = None
            if self.drop == "random":
                # a block-aligned piece: the high bytes of its words, and its keys for the few low parts
                # needed (as rng.EntryRandoms(seed, name, t, s0).keep_mask)
                keys = [self.rng.derive_seed(self.seed, name, t, s0 // self.piece) for t in range(T)]
                U = [(self.rng.high_stream(key), key) for key in keys]  # drawn sub-chunk by sub-chunk (SUB % 8 == 0)
            thr, partial = None, []
            if topk is not None:
                thr = []
                for t, tk in enumerate(topk):
                    allow, ties = tk.allow[ip]
                    thr.append(tk.below if (allow == ties and ties > 0) else tk.thr)
                    if 0 < allow < ties:
                        partial.append([t, tk.thr, allow])
            for c0 in range(s0, s1, SUB):
                c1 = min(s1, c0 + SUB)
                self._sub(buf, b[c0:c1], [e[c0:c1] for e in es],
                          None if U is None else [(take(c1 - c0), key, c0 - s0) for take, key in U],
                          thr, partial, drop_rates, divisors, out[c0:c1])

        self._map(run, range(len(pieces)))

    def _kernel_takes(self, b: torch.Tensor) -> bool:
        return self.kernel is not None and str(b.dtype).removeprefix("torch.") in self.compiled.DTYPES

    def _piece_args(self, template, b, es, out, s0, s1):
        """A copy of ``template`` pointing at entries s0 ... s1 - 1 of the flat tensors."""
        a = self.compiled.MergeArgs.from_buffer_copy(template)
        size = b.element_size()
        a.n, a.base = s1 - s0, b.data_ptr() + s0 * size
        if out is not None:
            a.out = out.data_ptr() + s0 * size
        for t, e in enumerate(es):
            a.experts[t] = e.data_ptr() + s0 * size
        return a

    def _kernel_args(self, name, b, drop_rates, divisors):
        """The per-tensor fields of the kernel's arguments (compiled.MergeArgs)."""
        c, T = self.compiled, self.T
        a = c.MergeArgs()
        a.T, a.dtype = T, c.DTYPES[str(b.dtype).removeprefix("torch.")]
        a.drop = c.DROP[self.drop]
        a.rescale = int(self.how == "inverse")
        a.weighted = int(self.w is not None)
        a.ties, a.frequency = int(self.ties), int(self.election == "frequency")
        a.elect_weighted = int(self.elect_w is not None)
        a.mode = c.MODES[self.mode]
        a.lam = self.lam
        for t in range(T):
            a.divisor[t] = divisors[t]  # float32, as the torch path's tensor of divisors
            if self.w is not None:
                a.w[t] = self.w[t]
            if self.elect_w is not None:
                a.elect_w[t] = self.elect_w[t]
            if self.drop == "random":  # keep_threshold <= 2^32, so t_hi <= 256 (256: keep nothing)
                a.t_hi[t], a.t_lo[t] = divmod(self.rng.keep_threshold(drop_rates[t]), 1 << 24)
        return a

    def _run_kernel(self, template, name, b, es, out, piece, ip, topk):
        """Merge one piece with the compiled kernel (same numbers as ``_sub``)."""
        c, T = self.compiled, self.T
        s0, s1 = piece
        a = self._piece_args(template, b, es, out, s0, s1)
        for t in range(T):
            if self.drop == "random":  # the piece is one whole block: its stream starts at word 0
                key = self.rng.derive_seed(self.seed, name, t, s0 // self.piece)
                state, inc = c.pcg64_state(key)
                a.pcg_state[t][0], a.pcg_state[t][1] = c.split128(state)
                a.pcg_inc[t][0], a.pcg_inc[t][1] = c.split128(inc)
                a.key[t] = key
            elif topk is not None:
                tk = topk[t]
                allow, ties = tk.allow[ip]
                a.thr[t] = tk.below if (allow == ties and ties > 0) else tk.thr
                if 0 < allow < ties:  # keep only the first `allow` ties at the threshold, in flat order
                    a.tie_value[t], a.tie_allow[t] = tk.thr, allow
        if self.kernel.merge_piece(ctypes.byref(a)) != 0:
            raise RuntimeError(f"fused kernel failed on {name!r}")

    def _sub(self, buf, bs, es, us, thr, partial, drop_rates, divisors, out):
        T, m = self.T, bs.numel()
        bf, D = self._deltas(buf, bs, es)
        A, Kf, M = buf.A[:, :m], buf.Kf[:, :m], buf.M[:m]
        if self.drop is not None:
            if self.drop == "magnitude":
                torch.abs(D, out=A)
                for t in range(T):
                    torch.gt(A[t], thr[t], out=Kf[t])
                for p in partial:  # keep the first `allow` ties at the threshold, in flat order
                    t, value, allow = p
                    if allow > 0:
                        idx = np.flatnonzero(A[t].numpy() == value)[:allow]
                        Kf[t][torch.from_numpy(idx)] = 1.0
                        p[2] = allow - len(idx)
            else:  # DARE: keep where word >= ceil(p · 2^32), as drop.random_keep_mask (float mask)
                for t, (hi, key, at) in enumerate(us):
                    self.rng.keep_from_high(hi, self.rng.keep_threshold(drop_rates[t]),
                                            lambda idx: self.rng.low_words(key, idx + at), out=Kf[t].numpy())
            D.mul_(Kf)  # kept = delta * mask
            if self.how == "inverse":
                D.div_(torch.tensor(divisors, dtype=torch.float32).reshape(T, 1))  # as D[t] / divisor_t
        if not self.ties:  # weighted_sum: Σ w_t Δ_t
            if self.w is not None:
                for t in range(T):
                    D[t].mul_(self.w[t])
            _rowsum(list(D), M)
        else:
            V = D
            if self.elect_w is not None:  # elect on weighted deltas (mergekit)
                for t in range(T):
                    torch.mul(D[t], self.elect_w[t], out=A[t])
                V = A
            if self.election == "frequency":
                V = torch.sign(V, out=A)
            _rowsum(list(V), M)
            signs = buf.signs[:m]
            # elected sign +1 / -1: a sum of +0 elects +1 (as merge_tensor); a sum of -0 elects -1,
            # but it only arises when every delta is a zero, so no expert agrees either way
            torch.copysign(buf.ones[:m], M, out=signs)
            torch.mul(D, signs, out=A)  # s·Δ_t > 0 where expert t agrees
            if self.w is None and self.mode in ("sum", "mean"):
                # Σ_{t agrees} Δ_t = s · Σ_t max(s·Δ_t, 0): multiplying by s = ±1 is exact
                if self.mode == "mean":
                    torch.gt(A, 0, out=Kf)
                    cnt = _rowsum(list(Kf), buf.cnt[:m])
                A.clamp_min_(0.0)
                _rowsum(list(A), M).mul_(signs)
                if self.mode == "mean":
                    M.div_(cnt.clamp_min_(1.0))
                self._finish(M, bf, out)
                return
            torch.gt(A, 0, out=Kf)  # agree: nonzero with the elected sign
            if self.w is not None:
                for t in range(T):
                    D[t].mul_(self.w[t])
            D.mul_(Kf)
            _rowsum(list(D), M)  # Σ_{t agrees} w_t Δ_t
            if self.mode == "mean":
                cnt = _rowsum(list(Kf), buf.cnt[:m])
                M.div_(cnt.clamp_min_(1.0))
            elif self.mode == "weighted_mean":
                for t in range(T):
                    Kf[t].mul_(self.w[t])
                div = _rowsum(list(Kf), buf.cnt[:m])
                tiny = torch.lt(torch.abs(div, out=buf.tmp[:m]), 1e-8)
                if bool(tiny.any()):  # same guard as mergekit / consensus.disjoint_merge
                    div[tiny] = 1.0
                M.div_(div)
        self._finish(M, bf, out)

    def _finish(self, M, bf, out):
        if self.lam != 1.0:
            M.mul_(self.lam)
        M.add_(bf)  # base.float() + lam * merged
        out.copy_(M)


# --------------------------------------------------------------------------- merge


def _validate_rates_for(names: Sequence[str], n_experts: int, kwargs: Mapping) -> None:
    """Per-partition rates: every tensor must find its rate and every key must match a
    tensor (as ``recipes.merge_state_dicts`` checks), before any work."""
    from .partitions import unused_rate_keys
    from .recipes import _densities_for

    level = kwargs.get("rate_level", "layer_role")
    for key in ("density", "drop_rate", "rescale_factor"):
        v = kwargs.get(key)
        for rates in (v if isinstance(v, (list, tuple)) else [v]):
            bad = unused_rate_keys(names, rates, level)
            if bad:
                raise ValueError(f"{key}: keys {bad} match no tensor at level {level!r}")
    for name in names:  # raises KeyError on a tensor without a rate (and no rate_default)
        _densities_for(name, kwargs.get("density"), kwargs.get("drop_rate"), n_experts, level,
                       kwargs.get("rate_default"))


def _model_thresholds(base: CheckpointFolder, experts: Sequence[CheckpointFolder], names: Sequence[str],
                      kwargs: Mapping, progress: bool) -> list[float]:
    """Whole-model |Δ| thresholds, one per expert (``magnitude_scope="model"``), like
    ``recipes.merge_state_dicts``: the k-th largest |Δ| over every floating tensor,
    k = round(density · n), by two streamed histogram passes per expert
    (``selection.global_kth_largest_abs``); n comes from the headers."""
    from .selection import global_kth_largest_abs

    T = len(experts)
    rates = kwargs.get("density", kwargs.get("drop_rate"))
    rates = list(rates) if isinstance(rates, (list, tuple)) else [rates] * T
    densities = rates if kwargs.get("density") is not None else [1.0 - p for p in rates]
    n = sum(base.tensors[name].numel for name in names)
    out = []
    for t, (cf, d) in enumerate(zip(experts, densities)):
        k = round(d * n)

        def deltas(cf=cf):
            for name in names:
                yield cf.read(name).float() - base.read(name).float()

        if progress:
            print(f"magnitude_scope='model': threshold of expert {t} (2 passes over base + expert)", flush=True)
        out.append(float("inf") if k == 0 else global_kth_largest_abs(deltas, k))
    return out


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
    fused: bool = True,
    kernel: str = "auto",
    workers: int | None = None,
    merge_fn: Callable | None = None,
    direct_io: bool = False,
    fsync: bool = False,
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
            ``election_weights``, per-partition rate dicts with ``rate_level`` /
            ``rate_default``, ...) go to :func:`merging_helpers.recipes.merge_tensor`;
            ``magnitude_scope="model"`` (ties, magnitude) first computes one |Δ| threshold
            per expert over the whole model, as ``recipes.merge_state_dicts`` does.
        device: where the arithmetic runs ("cpu", "cuda", "cuda:1", ...).
        chunk_elems: row-chunk size for element-wise methods (see module docstring).
        max_shard_size: largest output shard ("2GB", "500MB" or bytes).
        progress: show a tqdm bar over input bytes.
        overwrite: replace an existing non-empty ``out_dir``.
        prefetch_bytes: read-ahead budget of the prefetch thread.
        fused: on the CPU, use the fused chunked path for the options it supports
            (see ``fused_supported``); it gives the same numbers as ``merge_tensor``.
        kernel: how the fused path computes: ``"auto"`` (the compiled kernel of
            :mod:`merging_helpers.compiled` if it can be built here, else torch ops),
            ``"c"`` (the compiled kernel or an error), ``"torch"``; the numbers are the same.
        workers: threads of the fused path (default: torch's intra-op thread count);
            while it runs, torch ops are single-threaded (``torch.set_num_threads(1)``).
        merge_fn: replaces ``recipes.merge_tensor`` (same signature; disables the
            fused path); for tests.
        direct_io, fsync: how the output is written (see
            :class:`~merging_helpers.checkpoints.ShardedSafetensorsWriter`): by default
            through the page cache, unflushed, like ``save_pretrained``; ``fsync=True``
            flushes every shard before the folder is moved into place, ``direct_io=True``
            lets large tensors bypass the page cache.

    Returns: the output folder (resolved). Integer tensors are copied from the base.
    Output dtypes equal the input dtypes; config and tokenizer files come from the base.
    """
    use_fused = (fused and merge_fn is None and not isinstance(expert_dirs, (str, os.PathLike))
                 and fused_supported(method, merge_kwargs, device, len(expert_dirs)))
    merge_fn = merge_fn or _default_merge_fn()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but torch.cuda.is_available() is False")
    if kernel not in ("auto", "c", "torch"):
        raise ValueError(f"kernel must be 'auto', 'c' or 'torch', got {kernel!r}")
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
    magnitude_scope = merge_kwargs.pop("magnitude_scope", "tensor")
    if magnitude_scope not in ("tensor", "model"):
        raise ValueError(f"magnitude_scope must be 'tensor' or 'model', got {magnitude_scope!r}")
    if magnitude_scope == "model":
        if method not in ("magnitude", "ties"):
            raise ValueError(f"magnitude_scope='model' applies to 'magnitude' and 'ties', not {method!r}")
        if "thresholds" in merge_kwargs:
            raise ValueError("give magnitude_scope='model' or thresholds, not both")
        rates = merge_kwargs.get("density", merge_kwargs.get("drop_rate"))
        if any(isinstance(r, Mapping) for r in (rates if isinstance(rates, (list, tuple)) else [rates])):
            raise ValueError("magnitude_scope='model' needs a float density per expert, not per-partition rates")
    base = CheckpointFolder(base_dir)
    experts = [CheckpointFolder(d) for d in dirs]
    folders = [base, *experts]
    try:
        validate_folders(base, experts, expert_names)
        names = base.names()
        floating = [n for n in names if base.tensors[n].dtype.is_floating_point]
        _validate_rates_for(floating, len(dirs), merge_kwargs)
        if floating:  # one call on a 4-entry dummy: raises on bad arguments before any real work
            probe = torch.zeros(4, device=device)
            probe_kw = dict(merge_kwargs)
            if magnitude_scope == "model":
                probe_kw["thresholds"] = [0.0] * len(dirs)
            merge_fn(floating[0], probe, [probe + 0.001 * (t + 1) for t in range(len(dirs))], method, **probe_kw)
        if magnitude_scope == "model":
            merge_kwargs["thresholds"] = _model_thresholds(base, experts, floating, merge_kwargs, progress)

        specs = [(n, base.tensors[n].dtype, base.tensors[n].shape) for n in names]
        total_bytes = sum(f.total_bytes for f in folders)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"merge {method}")
        chunkable = method in ELEMENTWISE_METHODS or (
            method in ("dare_linear", "dare_ties") and merge_kwargs.get("rescale", "auto") != "l1") or (
            method in ("magnitude", "ties") and merge_kwargs.get("thresholds") is not None
            and merge_kwargs.get("rescale", "auto") != "l1")

        def to_device(t):
            # inputs are pinned pool buffers on a GPU run: an asynchronous copy, which is complete
            # before their buffers go back to the pool (the synchronous copy of the result waits for it)
            return t if device.type == "cpu" else t.to(device, non_blocking=t.is_pinned())

        def check_shape(name, m, shape):
            if tuple(m.shape) != tuple(shape):  # checked first: copy_ would broadcast it
                raise RuntimeError(f"merge of {name!r} returned shape {tuple(m.shape)}, expected {tuple(shape)}")

        def to_host(name, m, dtype, shape):
            """The merged tensor in the input dtype, in a (pinned) pool buffer on the CPU."""
            check_shape(name, m, shape)
            m = m.to(dtype)
            if m.device.type == "cpu":
                return m
            host = pool.get(m.numel() * m.element_size()).view(dtype).view(shape)
            return host.copy_(m)  # synchronous: the inputs' copies to the GPU are done too

        fusedm, threads = None, torch.get_num_threads()
        if use_fused:
            fusedm = _Fused(method, len(dirs), merge_kwargs, workers or threads, kernel)
            torch.set_num_threads(1)  # parallel over pieces instead (see the fused path)

        # ---- 2.-4. stream: prefetch -> merge -> write
        with ShardedSafetensorsWriter(out_dir, specs, max_shard_size, copy_from=base_dir, input_dirs=dirs,
                                      overwrite=overwrite, direct=direct_io, fsync=fsync) as writer, \
                ThreadPoolExecutor(1, thread_name_prefix="merge-write") as wpool:
            pending: list = []
            pool = _BufferPool(pin=device.type == "cuda")
            prefetch = _Prefetcher(folders, names, prefetch_bytes, pool)

            def write(name, out, release):
                writer.write(name, out)
                for buf in release:  # the buffers are free once written
                    pool.put(buf)
            try:
                for name, (b, *ex) in prefetch:
                    dtype = b.dtype
                    if not dtype.is_floating_point:
                        out = b  # integer buffers (e.g. position_ids) are copied from the base
                    elif fusedm is not None:
                        out = pool.get(b.numel() * b.element_size()).view(dtype).view(b.shape)
                        fusedm(name, b, ex, out)
                    elif chunkable and b.dim() >= 1 and b.numel() > chunk_elems:
                        out = pool.get(b.numel() * b.element_size()).view(dtype).view(b.shape)
                        for r0, r1 in _row_chunks(tuple(b.shape), chunk_elems):
                            m = merge_fn(name, to_device(b[r0:r1]), [to_device(e[r0:r1]) for e in ex],
                                         method, offset=r0 * (b.numel() // b.shape[0]), **merge_kwargs)
                            check_shape(name, m, out[r0:r1].shape)
                            out[r0:r1].copy_(m)  # synchronous, as in to_host
                            del m
                    else:
                        m = merge_fn(name, to_device(b), [to_device(e) for e in ex], method, **merge_kwargs)
                        out = to_host(name, m, dtype, b.shape)
                        del m
                    # input buffers go back to the pool now, the output's once it is written
                    # (an output that aliases an input, e.g. a copied integer buffer, waits too)
                    release = ([_as_bytes(out)] if out.numel() and out.is_contiguous() and out.device.type == "cpu"
                               else [])
                    for t in (b, *ex):
                        if t.numel() and t.data_ptr() != out.data_ptr():
                            pool.put(_as_bytes(t))
                    del b, ex
                    # at most two writes in flight: bounds memory, keeps the disk busy
                    while len(pending) >= 2:
                        pending.pop(0).result()
                    pending.append(wpool.submit(write, name, out, release))
                    del out
                    if bar is not None:
                        bar.update(sum(f.tensors[name].nbytes for f in folders))
                for fut in pending:
                    fut.result()
            finally:
                prefetch.close()
                if fusedm is not None:
                    fusedm.close()
                    torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
        return writer.out_dir
    finally:
        for f in folders:
            f.close()
