"""The compiled fused merge kernel (``csrc/fused_merge.c``), loaded with ctypes.

The fast tier of the appendix "Merging at scale" (chapter 8): the reference engine
(``recipes.merge_tensor``) makes several whole-tensor float32 temporaries per step;
``fused_merge.c`` does the same float32 operations in one pass over cache-sized tiles,
bit for bit (tests compare it with ``recipes.merge_tensor``), many times faster.

No build step at install time: on first use the C file is compiled with the system's
C compiler (``$CC``, else ``cc``; ~1 s) into the cache folder (``$MERGING_BOOK_CACHE``,
default ``~/.cache/merging_book``, under ``kernels/``), keyed by a hash of the source
and the compiler, and written atomically. Without a compiler (or with
``MERGING_HELPERS_NO_KERNEL=1``) :func:`load` returns None and the streaming merge uses
the reference engine, which gives the same numbers, more slowly.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("csrc") / "fused_merge.c"
MAXT = 16  # as in the C file
SCAN_PAST = 8  # as in the C file: bracket_scan writes up to this many entries past its last candidate
DTYPES = {"float32": 0, "bfloat16": 1, "float16": 2}
DROP = {None: 0, "magnitude": 1, "random": 2}
MODES = {"nothing": 0, "count": 1, "weight_sum": 2}  # what the disjoint merge divides by
# -O3 vectorises the tile loops; -ffp-contract=off forbids fused multiply-adds, which
# round once where torch rounds twice (no -ffast-math for the same reason)
CFLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-std=gnu11"]
if os.uname().machine in ("x86_64", "AMD64"):
    CFLAGS += ["-mavx2", "-mf16c", "-mpopcnt"]  # chosen at load time only if the CPU has them (see _cpu_ok)

_F = ctypes.c_float * MAXT


class MergeArgs(ctypes.Structure):
    """Mirror of ``merge_args`` in fused_merge.c (appendix, chapter 8)."""
    _fields_ = [
        ("n", ctypes.c_int64), ("T", ctypes.c_int32), ("dtype", ctypes.c_int32),
        ("base", ctypes.c_void_p), ("experts", ctypes.c_void_p * MAXT), ("out", ctypes.c_void_p),
        ("drop", ctypes.c_int32), ("thr", _F), ("tie_value", _F), ("tie_allow", ctypes.c_int64 * MAXT),
        ("pcg_state", (ctypes.c_uint64 * 2) * MAXT), ("pcg_inc", (ctypes.c_uint64 * 2) * MAXT),
        ("key", ctypes.c_uint64 * MAXT), ("t_hi", ctypes.c_uint32 * MAXT), ("t_lo", ctypes.c_uint32 * MAXT),
        ("rescale", ctypes.c_int32), ("divisor", _F), ("weighted", ctypes.c_int32), ("w", _F),
        ("ties", ctypes.c_int32), ("elect_weighted", ctypes.c_int32), ("frequency", ctypes.c_int32),
        ("mode", ctypes.c_int32), ("elect_w", _F), ("lam", ctypes.c_float),
        ("overflowed", ctypes.c_int64),  # out: entries that became inf in the output dtype
    ]


def _cpu_ok() -> bool:
    """The CPU runs the flags we compile with (AVX2, F16C and POPCNT on x86-64)."""
    if "-mavx2" not in CFLAGS:
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "f16c" in flags and "popcnt" in flags


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _cache_dir() -> Path:
    root = os.environ.get("MERGING_BOOK_CACHE") or Path.home() / ".cache" / "merging_book"
    return Path(root).expanduser() / "kernels"


def build(cache_dir: str | os.PathLike | None = None) -> Path:
    """Compile fused_merge.c (if not cached yet) and return the shared library's path (appendix, chapter 8).
    Raises RuntimeError with the compiler's message if it fails."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc/clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + version.encode() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else _cache_dir()
    lib = folder / f"fused_merge-{tag}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fused_merge-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            why = done.stderr.strip() or f"{cc} exited with status {done.returncode} and no message"
            raise RuntimeError(f"compiling {SOURCE.name} failed: {why}")
        os.replace(tmp, lib)  # atomic: a concurrent build writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


_LIB: ctypes.CDLL | None = None
_TRIED = False
_LOCK = threading.Lock()
ERROR: str | None = None  # why load() returned None


def load():
    """The compiled library (functions ``merge_piece`` and ``bracket_scan``), or None
    if it cannot be built here (``ERROR`` says why) (appendix, chapter 8)."""
    global _LIB, _TRIED, ERROR
    with _LOCK:
        if not _TRIED:
            _TRIED = True
            if os.environ.get("MERGING_HELPERS_NO_KERNEL"):
                ERROR = "disabled by MERGING_HELPERS_NO_KERNEL"
            elif not _cpu_ok():
                ERROR = "AVX2/F16C/POPCNT not found in /proc/cpuinfo"
            else:
                try:
                    _LIB = ctypes.CDLL(str(build()))
                    _LIB.merge_piece.argtypes = [ctypes.POINTER(MergeArgs)]
                    _LIB.merge_piece.restype = ctypes.c_int
                    _LIB.bracket_scan.argtypes = [ctypes.POINTER(MergeArgs)] + [ctypes.c_void_p] * 5 + [
                        ctypes.c_int64]
                    _LIB.bracket_scan.restype = ctypes.c_int
                except (OSError, RuntimeError) as err:
                    ERROR = str(err)
                    warnings.warn(f"merging_helpers: the compiled merge kernel is not available ({err}); "
                                  "streaming merges use the reference engine (same numbers, slower)", stacklevel=2)
    return _LIB


def pcg64_state(key: int) -> tuple[int, int]:
    """(state, increment) of ``numpy.random.PCG64(key)`` before its first output (appendix, chapter 8)."""
    st = np.random.PCG64(key).state["state"]
    return st["state"], st["inc"]


def split128(x: int) -> tuple[int, int]:
    """The (high, low) 64-bit halves of a 128-bit integer, as the kernel's arguments take them (appendix, chapter 8)."""
    return (x >> 64) & (2**64 - 1), x & (2**64 - 1)
