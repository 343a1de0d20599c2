"""The fused CPU merge: one tensor at a time through the compiled kernel.

Part of the fast tier (appendix "Merging at scale", chapter 8). The reference engine,
:func:`merging_helpers.recipes.merge_tensor`, is written for clarity: every step makes
whole-tensor float32 temporaries. For the options the kernel implements
(:func:`fused_supported`) :class:`FusedMerge` gives the *same numbers* (tests compare
it with ``merge_tensor`` bit for bit) at a few ns per parameter:

* the flat tensor is cut into pieces of ``rng.BLOCK`` entries, so a DARE piece draws
  exactly one block of its random stream; pieces run in parallel on ``workers``
  threads, each through ``merge_piece`` of ``csrc/fused_merge.c``
  (:mod:`~merging_helpers.fast.compiled`), which works in L1-sized tiles;
* the exact per-tensor top-k threshold (TIES, magnitude) is found in one pass: a
  strided sample brackets the k-th largest |Δ| in [lo, hi]; the kernel's
  ``bracket_scan`` counts the entries above hi and copies those inside the bracket (a
  few %; with AVX2, 8 at a time and without branches), whose k-th largest (a numpy
  selection: the value ``selection.kth_largest_abs`` gives) is the exact threshold.
  Ties at the threshold are kept in increasing flat-index order, as in
  ``selection.top_k_mask``. If the bracket misses (it is checked), the exact
  whole-tensor rule is used.

There is no third copy of the math: where the kernel cannot be built, or for options
it does not implement, the streaming merge calls the reference engine.
"""
from __future__ import annotations

import ctypes
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from .. import rng
from ..config import MergeConfig
from ..deltas import nonfinite_delta_message
from ..recipes import overflow_message
from ..drop import keep_count
from ..partitions import PerColumn, PerRow
from ..selection import kth_largest_abs
from . import compiled

EXACT_MAX = 1 << 20  # tensors up to this size find their top-k threshold on the whole tensor
_SAMPLE = 1 << 16
_BRACKET_SIGMAS = 6.0  # half-width of the sample bracket in binomial standard deviations
_SCAN_SLACK = 4096  # extra room for the kernel scan's candidates (a test makes it negative)
KERNELS = ("auto", "c", "reference")  # the fused path where it applies, always (or an error), never


def fused_supported(config: MergeConfig, device) -> bool:
    """True if the kernel implements these options (the test per tensor is :meth:`FusedMerge.takes`) (appendix, chapter 8)."""
    return (torch.device(device).type == "cpu" and config.n_experts <= compiled.MAXT
            and config.method.drop in compiled.DROP and config.rescale_rule in ("inverse", "smallest", None)
            and config.rescale_factor is None)


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

    def piece_threshold(self, ip: int) -> tuple[float, int]:
        """(threshold for piece ip, ties at ``thr`` to keep in it in flat order, or 0)."""
        allow, ties = self.allow[ip]
        thr = self.below if (allow == ties and ties > 0) else self.thr
        return thr, (allow if 0 < allow < ties else 0)


class FusedMerge:
    """Merge CPU tensors like ``recipes.merge_tensor`` with ``config``, through the kernel (appendix, chapter 8)."""

    def __init__(self, config: MergeConfig, lib, workers: int = 1):
        if not fused_supported(config, "cpu"):
            raise ValueError("FusedMerge: the kernel does not implement these options (see fused_supported)")
        self.config, self.lib, self.T = config, lib, config.n_experts
        m = config.method
        # the engine multiplies by float32 weights: use their float32 values as scalars
        self.w = None if config.weights is None else [float(x) for x in torch.tensor(config.weights, dtype=torch.float32)]
        self.divisor = config.divisor
        if self.divisor == "weight_sum" and self.w is None:
            self.divisor = "count"  # Σ 1·agree = the count; where(|count| < 1e-8, 1, count) = max(count, 1)
        self.fixed = config.thresholds
        self.drop = m.drop
        self.piece = rng.BLOCK
        self.workers = max(1, int(workers))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="merge-fused") if self.workers > 1 else None

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()

    def takes(self, name: str, dtype: torch.dtype) -> bool:
        """True if tensor ``name`` of ``dtype`` goes through the kernel (float rates, a kernel dtype,
        written back in that dtype)."""
        return (str(dtype).removeprefix("torch.") in compiled.DTYPES and self.config.output_dtype(dtype) == dtype
                and not any(isinstance(d, (PerRow, PerColumn)) for d in self.config.densities(name)))

    def merge_into(self, name: str, b: torch.Tensor, es: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Merge into ``out`` and return it; a merged entry that overflowed is refused with the reference
        engine's words for its cause (:func:`raise_overflow`) (appendix, chapter 8)."""
        overflowed = self(name, b, es, out)
        if overflowed:
            raise_overflow(name, b, es, int(overflowed))
        return out

    def _map(self, fn, items):
        items = list(items)
        if self.pool is None or len(items) <= 1:
            return [fn(i) for i in items]
        return list(self.pool.map(fn, items))

    def _pieces(self, n):
        return [(s, min(n, s + self.piece)) for s in range(0, n, self.piece)]

    # -- top-k thresholds -------------------------------------------------------
    def _exact_topk(self, b, e, k, pieces) -> _TopK:
        if k == 0:
            return _TopK(float("inf"), 0, [0] * len(pieces))
        if k >= b.numel():  # keep everything (|Δ| > -1)
            return _TopK(-1.0, 0, [0] * len(pieces))
        a = (e.float() - b.float()).abs_()
        thr = kth_largest_abs(a, k)
        missing = k - int((a > thr).sum())
        return _TopK(thr, missing, [int((a[s:t] == thr).sum()) for s, t in pieces])

    def _bracket(self, b, es, ks):
        """Per expert: (lo, hi) around the k-th largest |Δ| from a strided sample, and the
        fraction of the sample inside the bracket."""
        n = b.numel()
        every = slice(0, _SAMPLE * (n // _SAMPLE), n // _SAMPLE)  # entries 0, s, 2s, ... (s = n // _SAMPLE)
        bs = b[every].float()
        lo, hi, frac = [], [], []
        for e, k in zip(es, ks):
            sample = (e[every].float() - bs).abs_().numpy()
            q = k / n
            r = q * _SAMPLE  # rank (from the top) of the k-th largest, in the sample
            margin = _BRACKET_SIGMAS * math.sqrt(_SAMPLE * q * (1 - q)) + 16
            i_hi, i_lo = int(r - margin), int(math.ceil(r + margin))  # ranks from the top
            j_hi = _SAMPLE - 1 - min(max(i_hi, 0), _SAMPLE - 1)  # ascending positions
            j_lo = _SAMPLE - 1 - min(max(i_lo, 0), _SAMPLE - 1)
            part = np.partition(sample, sorted({j_hi, j_lo}))
            hi.append(float(part[j_hi]) if i_hi >= 0 else float("inf"))
            lo.append(float(part[j_lo]) if i_lo < _SAMPLE else 0.0)
            frac.append(float(((sample >= lo[-1]) & (sample <= hi[-1])).mean()))
        return lo, hi, frac

    def _topk(self, name, b, es, ks, pieces) -> list[_TopK]:
        n = b.numel()
        if n <= EXACT_MAX:
            return [self._exact_topk(b, e, k, pieces) for e, k in zip(es, ks)]
        lo, hi, frac = self._bracket(b, es, ks)
        template = self._kernel_args(b, [0.0] * self.T, [1.0] * self.T)
        lo_hi = [(ctypes.c_float * self.T)(*v) for v in (lo, hi)]

        def scan(piece):  # count |Δ| > hi, copy lo <= |Δ| <= hi, per piece in flat order
            s0, s1 = piece
            a = self._piece_args(template, b, es, None, s0, s1)
            # twice the expected count, else room for every entry (bracket_scan writes up to
            # SCAN_PAST entries past its last)
            for cap in (max(1, int(2 * max(frac) * (s1 - s0)) + _SCAN_SLACK), s1 - s0 + compiled.SCAN_PAST):
                cands = [np.empty(cap, dtype=np.float32) for _ in range(self.T)]
                above, count = (ctypes.c_int64 * self.T)(), (ctypes.c_int64 * self.T)()
                ptrs = (ctypes.c_void_p * self.T)(*[c.ctypes.data for c in cands])
                if self.lib.bracket_scan(ctypes.byref(a), lo_hi[0], lo_hi[1], above, ptrs, count, cap) == 0:
                    return list(above), [c[:k] for c, k in zip(cands, count)]
            raise RuntimeError(f"{name!r}: bracket_scan failed")

        results = self._map(scan, pieces)
        out = []
        for t, k in enumerate(ks):
            above = sum(r[0][t] for r in results)
            per_piece = [r[1][t] for r in results]
            cands = np.concatenate(per_piece)
            k2 = k - above
            if k == 0 or k >= n or not 1 <= k2 <= cands.size:  # edge cases, or the bracket missed
                out.append(self._exact_topk(b, es[t], k, pieces))
                continue
            # the k2-th largest candidate (numpy's introselect: the value kth_largest_abs finds)
            cands.partition(cands.size - k2)  # in place: cands is a fresh copy
            thr = float(cands[cands.size - k2])
            missing = k - above - int(np.count_nonzero(cands > thr))
            out.append(_TopK(thr, missing, [int(np.count_nonzero(c == thr)) for c in per_piece]))
        return out

    # -- merge -------------------------------------------------------------------
    def __call__(self, name: str, b: torch.Tensor, es: Sequence[torch.Tensor], out: torch.Tensor) -> int:
        """Merge into ``out``; returns how many entries overflowed the dtype (became inf)."""
        T, n = self.T, b.numel()
        # checked here because the kernel reads and writes raw memory
        for what, t in [("output", out)] + [(f"expert {i}", e) for i, e in enumerate(es)]:
            if t.dtype != b.dtype or t.numel() != n:
                raise ValueError(f"{name!r}: {what} is {t.dtype} with {t.numel()} entries, the base {b.dtype} "
                                 f"with {n}")
        if not out.is_contiguous() or not b.is_contiguous() or not all(e.is_contiguous() for e in es):
            raise ValueError(f"{name!r}: the kernel needs contiguous tensors")
        if len(es) != T:
            raise ValueError(f"{name!r}: expected {T} experts, got {len(es)}")
        if not self.takes(name, b.dtype):
            raise ValueError(f"{name!r}: the kernel does not take this tensor ({b.dtype}, or per-row rates)")
        dens = self.config.densities(name)
        b, out = b.reshape(-1), out.reshape(-1)
        es = [e.reshape(-1) for e in es]
        pieces = self._pieces(n)
        topk = None
        if self.drop == "magnitude" and self.fixed is not None:
            # given thresholds (e.g. the whole model's): keep |Δ| >= threshold (drop.threshold_keep_mask)
            topk = [_TopK(float(th), 1 << 62, [1] * len(pieces)) for th in self.fixed]
        elif self.drop == "magnitude":
            topk = self._topk(name, b, es, [keep_count(d, n) for d in dens], pieces)
        drop_rates = [1.0 - d for d in dens]  # as recipes.drop_and_rescale
        divisors = [1.0 - p for p in drop_rates]  # as rescale.rescale_inverse_keep
        if self.config.rescale_rule == "smallest":  # every expert by the smallest rate (recipes.smallest_drop_rate)
            divisors = [1.0 - min(drop_rates)] * T
        template = self._kernel_args(b, drop_rates, divisors)
        return sum(self._map(lambda ip: self._run_kernel(template, name, b, es, out, pieces[ip], ip, topk),
                             range(len(pieces))))

    def _piece_args(self, template, b, es, out, s0, s1):
        """A copy of ``template`` pointing at entries s0 ... s1 - 1 of the flat tensors."""
        a = compiled.MergeArgs.from_buffer_copy(template)
        size = b.element_size()
        a.n, a.base = s1 - s0, b.data_ptr() + s0 * size
        if out is not None:
            a.out = out.data_ptr() + s0 * size
        for t, e in enumerate(es):
            a.experts[t] = e.data_ptr() + s0 * size
        return a

    def _kernel_args(self, b, drop_rates, divisors):
        """The per-tensor fields of the kernel's arguments (compiled.MergeArgs), read from the config."""
        c, T, config = compiled, self.T, self.config
        a = c.MergeArgs()
        a.T, a.dtype = T, c.DTYPES[str(b.dtype).removeprefix("torch.")]
        a.drop = c.DROP[self.drop]
        a.rescale = int(config.rescale_rule in ("inverse", "smallest"))
        a.weighted = int(self.w is not None)
        a.ties, a.frequency = int(config.method.elects), int(config.election == "frequency")
        a.elect_weighted = int(config.weighted_election and self.w is not None)
        a.mode = c.MODES[self.divisor]
        a.lam = config.lam
        for t in range(T):
            a.divisor[t] = divisors[t]  # float32, as the reference's tensor of divisors
            if self.w is not None:
                a.w[t] = self.w[t]
                a.elect_w[t] = self.w[t]
            if self.drop == "random":  # keep_threshold <= 2^32, so t_hi <= 256 (256: keep nothing)
                a.t_hi[t], a.t_lo[t] = divmod(rng.keep_threshold(drop_rates[t]), 1 << 24)
        return a

    def _run_kernel(self, template, name, b, es, out, piece, ip, topk) -> int:
        """Merge one piece with the compiled kernel; returns the entries that overflowed."""
        T = self.T
        s0, s1 = piece
        a = self._piece_args(template, b, es, out, s0, s1)
        for t in range(T):
            if self.drop == "random":  # the piece is one whole block: its stream starts at word 0
                key = rng.derive_seed(self.config.seed, name, t, s0 // self.piece)
                state, inc = compiled.pcg64_state(key)
                a.pcg_state[t][0], a.pcg_state[t][1] = compiled.split128(state)
                a.pcg_inc[t][0], a.pcg_inc[t][1] = compiled.split128(inc)
                a.key[t] = key
            elif topk is not None:
                a.thr[t], allow = topk[t].piece_threshold(ip)
                if allow:  # keep only the first `allow` ties at the threshold, in flat order
                    a.tie_value[t], a.tie_allow[t] = topk[t].thr, allow
        rc = self.lib.merge_piece(ctypes.byref(a))
        if rc == -2:
            raise ValueError(f"base: tensor {name!r} has NaN or inf entries")
        if rc <= -10:  # the same words as the reference engine: NaN/inf, or finite inputs whose delta overflows
            raise ValueError(nonfinite_delta_message(f"expert {-rc - 10}", name, es[-rc - 10], b))
        if rc != 0:
            raise RuntimeError(f"fused kernel failed on {name!r}")
        return a.overflowed


def kernel_for(kernel: str, config, device):
    """The compiled library when the fused path applies (``kernel`` "auto" or "c"), else None
    (appendix, chapter 8)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "reference" or not fused_supported(config, device):
        if kernel == "c":
            raise ValueError("kernel='c': the compiled kernel does not implement these options or this device "
                             f"(method {config.method.name!r}, rescale {config.rescale!r}, device {device}, "
                             f"{config.n_experts} experts; at most {compiled.MAXT})")
        return None
    lib = compiled.load()  # warns once, and returns None, where it cannot be built
    if lib is None and kernel == "c":
        raise RuntimeError(f"kernel='c': the compiled kernel is not available ({compiled.ERROR})")
    return lib


def raise_overflow(name, base, experts, count) -> None:
    """The fused path found inf in a merged tensor: a delta that overflowed (finite inputs too far
    apart), or a result beyond the dtype; the error names which, as the reference engine does (appendix, chapter 8)."""
    for t, expert in enumerate(experts):
        if not bool(torch.isfinite(expert.float() - base.float()).all()):
            raise ValueError(nonfinite_delta_message(f"expert {t}", name, expert, base))
    raise OverflowError(overflow_message(name, base.dtype, count))
