"""Reading and writing Hugging Face checkpoint folders, one tensor at a time.

A Hugging Face model folder holds ``config.json`` (plus tokenizer files) and its
weights either in one ``model.safetensors`` or in several shards listed by
``model.safetensors.index.json``.  Merging a 7B model must not need 7B × (T+1)
parameters in memory, so everything here works tensor by tensor:

* :func:`list_tensors` / :class:`CheckpointFolder` read only the safetensors
  *headers* (a few kB) and give every tensor's name, dtype, shape and byte range.
* :func:`read_tensor` reads one tensor lazily with ``safetensors.safe_open``.
* :meth:`CheckpointFolder.read` reads one tensor with a plain ``pread`` into a
  fresh buffer: one copy from the page cache, safe to call from a prefetch thread.
* :meth:`CheckpointFolder.map` gives one tensor without a copy: a private memory map
  of just its pages, filled before it returns, unmapped when its last view is freed
  (so, unlike a map of the whole file, the pages count in the process's RSS only
  while the tensor is in use). The streaming merge on the CPU maps the tensors whose
  pages are in the page cache already.
* :class:`ShardedSafetensorsWriter` writes a sharded safetensors checkpoint whose
  layout (shards, headers, offsets) is planned up front from the names, dtypes and
  shapes, so each tensor is written at its final offset as soon as it is ready and
  nothing is buffered.  Everything is written into a temporary folder next to the
  target and moved into place with ``os.replace`` at the very end: an exception
  leaves no output folder and no partial file.

Pickled checkpoints (``pytorch_model.bin``, ``*.pt``) are read only with
``torch.load(weights_only=True)``, which refuses arbitrary Python objects; a
warning says that safetensors is preferred.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "SAFETENSORS_FILE",
    "SAFETENSORS_INDEX",
    "TensorInfo",
    "CheckpointFolder",
    "list_tensors",
    "read_tensor",
    "read_config",
    "load_state_dict",
    "parse_size",
    "check_output_path",
    "recover_leftovers",
    "ShardedSafetensorsWriter",
    "save_state_dict",
]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILES = ("pytorch_model.bin", "model.bin", "model.pt", "pytorch_model.pt")
BIN_INDEX = "pytorch_model.bin.index.json"

# Files copied from the base folder into a merged checkpoint (configs and tokenizer).
COPY_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template*",
    "preprocessor_config.json",
)

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

_MAX_IO = 1 << 30  # bytes per pread/pwrite call (Linux caps one call at ~2 GiB)
# Linux >= 5.14: fault a mapping's pages in now (22 is Linux's value; other systems lack this advice)
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)
_ALIGN = 4096  # O_DIRECT: file offsets, lengths and memory aligned to the page size
_BOUNCE = 16 << 20  # bytes of the aligned buffer that O_DIRECT writes go through
_DIRECT_MIN = 1 << 20  # smaller tensors go through the page cache


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype and shape (appendix, chapter 8)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in ``file`` (safetensors); -1 for pickles
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_json(path: Path, what: str):
    """``path`` parsed as JSON; a damaged file raises a ValueError that names it."""
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the {what} is not valid JSON ({e}); the file is damaged") from None


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Return (header dict, byte offset where the data section starts), after checking
    the header against the file: every tensor's byte range inside the file and of its
    dtype and shape's size, the ranges neither overlapping nor leaving gaps (as the
    safetensors library requires), so a truncated or forged file fails here, before any merge."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000 or 8 + n > size:
            raise ValueError(f"{path}: implausible safetensors header length {n} (file of {size} bytes); "
                             "the file is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    ranges = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {meta!r}") from None
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if not all(isinstance(x, int) and x >= 0 for x in (a, b, *shape)):
            raise ValueError(f"{path}: tensor {name!r} has a malformed shape {shape} or offsets {[a, b]}")
        if b - a != math.prod(shape) * _itemsize(_ST_DTYPES[dtype]):
            raise ValueError(f"{path}: tensor {name!r} has byte range [{a}, {b}) but its dtype {dtype} and shape "
                             f"{list(shape)} need {math.prod(shape) * _itemsize(_ST_DTYPES[dtype])} bytes")
        ranges.append((a, b, name))
    end = 0
    for a, b, name in sorted(ranges):
        if a != end:
            raise ValueError(f"{path}: tensor {name!r} starts at byte {a} of the data, expected {end} "
                             f"({'overlapping the previous tensor' if a < end else 'a gap'}); the header is damaged")
        end = b
    if 8 + n + end > size:
        raise ValueError(f"{path}: the header describes {8 + n + end} bytes but the file has {size}: "
                         "the file is truncated")
    return header, 8 + n


def _shard_path(folder: Path, index: Path, file) -> Path:
    """A shard named by an index, refused unless it is a plain file name inside ``folder``."""
    if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts \
            or Path(file).name != file:
        raise ValueError(f"{index}: shard path {file!r} is not a file name inside {folder}; refused")
    return folder / file


def _weight_map(index: Path) -> dict:
    data = _read_json(index, "index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no \"weight_map\" object; the index is damaged")
    return weight_map


def _weight_files(folder: Path) -> tuple[str, list[Path]]:
    """Find the weight files of a folder: ('safetensors'|'bin', [files])."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _weight_map(index)
        files = [_shard_path(folder, index, f) for f in dict.fromkeys(weight_map.values())]  # keep order, dedupe
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists missing shard(s): {missing}")
        return "safetensors", files
    if (folder / SAFETENSORS_FILE).is_file():
        return "safetensors", [folder / SAFETENSORS_FILE]
    st = sorted(folder.glob("*.safetensors"))
    if len(st) == 1:
        return "safetensors", st
    bin_index = folder / BIN_INDEX
    if bin_index.is_file():
        weight_map = _weight_map(bin_index)
        return "bin", [_shard_path(folder, bin_index, f) for f in dict.fromkeys(weight_map.values())]
    for name in BIN_FILES:
        if (folder / name).is_file():
            return "bin", [folder / name]
    if len(st) > 1:
        raise FileNotFoundError(
            f"{folder}: several *.safetensors files but no {SAFETENSORS_INDEX}"
        )
    raise FileNotFoundError(
        f"{folder}: no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or pytorch_model.bin found"
    )


def _check_checkpoint_format(path: Path) -> None:
    """A PyTorch checkpoint is a zip archive (torch.save since 1.6) or a pickle (older ones, which
    start with the pickle protocol byte 0x80): anything else is named as such, not as a pickle
    that "holds Python objects"."""
    import zipfile
    with open(path, "rb") as f:
        head = f.read(2)
    if zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return
    raise ValueError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle): the file is damaged or "
                     "of another format")


def _torch_load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    warnings.warn(
        f"{path.name}: reading a pickled checkpoint with torch.load(weights_only=True); "
        "safetensors is preferred (no pickle, lazy per-tensor reads). "
        "Convert once with merging_helpers.fast.checkpoints.save_state_dict.",
        UserWarning,
        stacklevel=3,
    )
    _check_checkpoint_format(path)
    try:
        try:  # memory-map zip-format checkpoints (tensors are paged in when used)
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]}): the file "
                                 "is damaged or truncated") from None
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise pickle.UnpicklingError(
            f"{path}: refused to unpickle it: it holds Python objects other than tensors, which "
            f"torch.load(weights_only=True) does not run ({first}). Loading it with weights_only=False would run "
            "code from the file; convert a checkpoint you trust to safetensors instead.") from None
    if not isinstance(sd, Mapping):
        raise TypeError(f"{path}: expected a state dict, got {type(sd).__name__}")
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    return dict(sd)


class ShortFileError(OSError):
    """A weight file ends before a tensor its header lists: it changed after the header was read (appendix, chapter 8)."""


_LIBC = ctypes.CDLL(None, use_errno=True) if hasattr(os, "uname") else None  # Unix: madvise, mincore
for _fn, _args in (("madvise", ctypes.c_int), ("mincore", ctypes.c_void_p)):
    if hasattr(_LIBC, _fn):  # (addr, length, advice / result vector) -> 0 or -1
        getattr(_LIBC, _fn).argtypes = [ctypes.c_void_p, ctypes.c_size_t, _args]
        getattr(_LIBC, _fn).restype = ctypes.c_int


def _cached(addr: int, length: int) -> bool:
    """True if every page of the mapping at ``addr`` is in the page cache (mincore(2))."""
    mincore = getattr(_LIBC, "mincore", None)
    if mincore is None:
        return False
    vec = np.empty(-(-length // mmap.PAGESIZE), dtype=np.uint8)
    return mincore(addr, length, vec.ctypes.data) == 0 and bool((vec & 1).all())


def _fill(addr: int, length: int, m: mmap.mmap, file: Path, name: str) -> None:
    """Fault in every page of the map now (reading the disk if they are not cached).
    madvise goes through ctypes, which lets other threads run meanwhile (mmap.madvise
    holds the GIL while the disk is read)."""
    madvise = getattr(_LIBC, "madvise", None)
    if madvise is not None and _MADV_POPULATE_READ is not None:
        if madvise(addr, length, _MADV_POPULATE_READ) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EFAULT:  # a page past the end of the file: it shrank since its header was read
            raise ShortFileError(f"{file}: ends before tensor {name!r} does (was it changed during the merge?)")
    m[::mmap.PAGESIZE]  # older kernels (EINVAL) or no madvise: touch one byte per page
    # (a file that shrank raises SIGBUS here; Linux >= 5.14 takes the branch above)


def _typed(buf: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """The uint8 bytes ``buf`` viewed as tensor ``info``'s dtype and shape."""
    return buf.view(info.dtype).view(info.shape) if info.shape else buf.view(info.dtype).reshape(())


class CheckpointFolder:
    """Tensor-by-tensor access to a Hugging Face model folder (appendix, chapter 8).

    Only headers are read at construction.  ``tensors`` maps name → :class:`TensorInfo`
    in on-disk order (file, then offset), which is the order that reads sequentially.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {self.path}")
        self.format, self.files = _weight_files(self.path)
        self._fds: dict[Path, int] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        self.guard = None  # an input_guard.InputGuard that leases each file as it is opened (streaming)
        infos: list[TensorInfo] = []
        if self.format == "safetensors":
            for file in self.files:
                header, data_start = _read_safetensors_header(file)
                for name, meta in header.items():
                    if name == "__metadata__":
                        continue
                    if meta["dtype"] not in _ST_DTYPES:
                        raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {meta['dtype']}")
                    a, b = meta["data_offsets"]
                    infos.append(
                        TensorInfo(name, _ST_DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                   file, data_start + a, data_start + b)
                    )
            infos.sort(key=lambda i: (self.files.index(i.file), i.start))
        else:
            for file in self.files:
                sd = self._pickle(file)
                for name, t in sd.items():
                    if not isinstance(t, torch.Tensor):
                        continue
                    infos.append(TensorInfo(name, t.dtype, tuple(t.shape), file, -1, -1))
        self.tensors: dict[str, TensorInfo] = {}
        for info in infos:
            if info.name in self.tensors:
                raise ValueError(f"{self.path}: tensor {info.name!r} stored twice")
            self.tensors[info.name] = info
        self._check_index()

    def _check_index(self) -> None:
        """Every tensor a safetensors index lists is in the shard it names (a damaged or stale index
        would otherwise merge a model with a tensor silently missing)."""
        index = self.path / SAFETENSORS_INDEX
        if self.format != "safetensors" or not index.is_file():
            return
        wrong = [(name, file) for name, file in _weight_map(index).items()
                 if name not in self.tensors or self.tensors[name].file.name != file]
        if wrong:
            name, file = wrong[0]
            where = f"is in {self.tensors[name].file.name}" if name in self.tensors else "is in no shard"
            raise ValueError(f"{index}: lists {len(wrong)} tensor(s) not where it says, e.g. {name!r} "
                             f"(listed in {file}, {where}); the index is damaged or stale")

    # -- metadata
    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def config(self) -> dict:
        return read_config(self.path)

    # -- reading
    def _pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickles:
            self._pickles[file] = _torch_load_weights_only(file)
        return self._pickles[file]

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = os.open(file, os.O_RDONLY)
            self._fds[file] = fd
            if self.guard is not None:
                self.guard.protect(fd, file)
        return fd

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into a new, owned CPU tensor (one copy, no memory map).

        ``buffer``: optional contiguous uint8 CPU tensor of exactly the tensor's byte size
        to read into (reusing buffers avoids page-faulting fresh memory); the result is
        a view of it. Ignored for pickled checkpoints.
        """
        info = self.tensors[name]
        if self.format == "bin":
            return self._pickle(info.file)[name].clone()
        nbytes = info.end - info.start
        if nbytes != info.nbytes:
            raise ValueError(f"{info.file}: tensor {name!r} byte range does not match its shape")
        if buffer is not None:
            if buffer.dtype != torch.uint8 or buffer.numel() != nbytes or not buffer.is_contiguous():
                raise ValueError(f"read({name!r}): buffer must be a contiguous uint8 tensor of {nbytes} bytes")
            buf = buffer
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            fd, pos, done = self._fd(info.file), info.start, 0
            while done < nbytes:
                n = os.preadv(fd, [view[done : done + min(_MAX_IO, nbytes - done)]], pos + done)
                if n <= 0:
                    raise IOError(f"{info.file}: unexpected end of file reading {name!r}")
                done += n
        return _typed(buf, info)

    def map(self, name: str, cached_only: bool = False) -> torch.Tensor | None:
        """Tensor ``name`` without a copy: a view of its bytes in the page cache (appendix, chapter 8).

        A private (copy-on-write) memory map of the pages that hold the tensor, filled
        before this returns, so that the disk is read here (e.g. in a prefetch thread)
        and not where the tensor is first used. Writes to the tensor never reach the
        file. The map is released when the last view of the tensor is freed. Pickled
        checkpoints and empty tensors are read with :meth:`read`.

        ``cached_only=True`` returns None unless every page is already in the page cache
        (the streaming merge then reads into a buffer instead: pages just read from the
        disk were slower to merge from mapped than copied, on our VM). Raises
        :class:`ShortFileError` if the file ends before the tensor; ``OSError`` if the
        file system cannot map files.
        """
        info = self.tensors[name]
        nbytes = info.end - info.start
        if self.format == "bin" or nbytes == 0:
            return self.read(name)
        if nbytes != info.nbytes:
            raise ValueError(f"{info.file}: tensor {name!r} byte range does not match its shape")
        start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        try:
            m = mmap.mmap(self._fd(info.file), info.end - start, offset=start, access=mmap.ACCESS_COPY)
        except ValueError as e:  # "mmap length is greater than file size"
            raise ShortFileError(f"{info.file}: ends before tensor {name!r} does (was it changed since its "
                                 f"header was read?)") from e
        buf = torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=info.start - start)  # keeps m alive
        addr = buf.data_ptr() - (info.start - start)
        if cached_only and not _cached(addr, len(m)):
            return None
        _fill(addr, len(m), m, info.file, name)
        return _typed(buf, info)

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (int indices along the first dimension, any order, repeats allowed) of
        tensor ``name``, reading only those rows' bytes: e.g. the embeddings of a prompt's tokens
        without the whole vocabulary (chapter 5's lean importance)."""
        info = self.tensors[name]
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        if not info.shape:
            raise ValueError(f"read_rows({name!r}): a scalar has no rows")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= info.shape[0]):
            raise IndexError(f"read_rows({name!r}): rows must be in 0..{info.shape[0] - 1}")
        if self.format == "bin":
            return self.read(name)[rows]
        unique, inverse = torch.unique(rows, return_inverse=True)
        row_bytes = info.nbytes // info.shape[0]
        buf = torch.empty(len(unique) * row_bytes, dtype=torch.uint8)
        view, fd = memoryview(buf.numpy()), self._fd(info.file)
        for i, r in enumerate(unique.tolist()):
            if os.preadv(fd, [view[i * row_bytes:(i + 1) * row_bytes]], info.start + r * row_bytes) != row_bytes:
                raise IOError(f"{info.file}: unexpected end of file reading row {r} of {name!r}")
        return buf.view(info.dtype).view(len(unique), *info.shape[1:])[inverse]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"CheckpointFolder({str(self.path)!r}, {len(self)} tensors, {self.format}, {len(self.files)} file(s))"


def list_tensors(folder: str | os.PathLike) -> dict[str, TensorInfo]:
    """Name → :class:`TensorInfo` for every tensor of a folder (reads headers only) (appendix, chapter 8)."""
    cf = CheckpointFolder(folder)
    try:
        return dict(cf.tensors)
    finally:
        cf.close()


def read_tensor(folder: str | os.PathLike, name: str, device: str = "cpu") -> torch.Tensor:
    """Read one tensor lazily with ``safetensors.safe_open`` (framework "pt") (appendix, chapter 8)."""
    from safetensors import safe_open

    folder = Path(folder)
    fmt, files = _weight_files(folder)
    if fmt == "bin":
        for file in files:
            sd = _torch_load_weights_only(file)
            if name in sd:
                return sd[name].to(device)
        raise KeyError(f"{folder}: no tensor named {name!r}")
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _weight_map(index)
        if name not in weight_map:
            raise KeyError(f"{folder}: no tensor named {name!r}")
        files = [_shard_path(folder, index, weight_map[name])]
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(f"{folder}: no tensor named {name!r}")


def read_config(folder: str | os.PathLike) -> dict:
    """``config.json`` of a folder as a dict ({} if there is none) (appendix, chapter 8)."""
    p = Path(folder) / "config.json"
    return _read_json(p, "config") if p.is_file() else {}


def load_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a folder in memory (for small models and tests) (appendix, chapter 8)."""
    with CheckpointFolder(folder) as cf:
        return {name: cf.read(name) for name in cf.names()}


# --------------------------------------------------------------------------- writing

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(size: int | str) -> int:
    """'2GB' → 2_000_000_000, '500MiB' → 524_288_000, ints pass through (as in HF) (appendix, chapter 8)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return size
    m = _SIZE_RE.match(str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse size {size!r} (use e.g. '2GB', '500MB', 1000000)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return n


def _writable_folder(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` (itself included) in which a new
    folder cannot be made, or None when a test folder could be made and removed."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return probe
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=probe))
    except OSError:
        return probe
    return None


def check_output_path(out_dir: str | os.PathLike, input_dirs: Iterable[str | os.PathLike],
                      overwrite: bool = False) -> Path:
    """Refuse an output folder equal to, inside, or containing an input folder, an
    existing non-empty output unless ``overwrite``, an output whose parent is not a
    writable folder, and (with ``overwrite``) one that cannot be moved aside: all before
    any work. Returns the resolved path (appendix, chapter 8)."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    out = Path(os.path.realpath(out_dir))
    for inp in input_dirs:
        src = Path(os.path.realpath(inp))
        if out == src:
            raise ValueError(f"output folder {out} is an input folder")
        if src in out.parents:
            raise ValueError(f"output folder {out} is inside input folder {src}")
        if out in src.parents:
            raise ValueError(f"output folder {out} contains input folder {src}")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output path {out} exists and is not a folder")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"output folder {out} exists and is not empty; pass overwrite=True to replace it"
                )
            if os.path.ismount(out) or not os.access(out, os.W_OK):
                raise PermissionError(f"overwrite=True: the existing output folder {out} cannot be moved aside "
                                      "(a mount point, or not writable); choose another output folder")
    blocked = _writable_folder(out.parent)
    if blocked is not None:
        raise PermissionError(f"cannot create the output folder {out}: {blocked} is not a writable folder")
    return out


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


OWNER_FILE = ".merging_helpers-owner"  # inside a temporary output folder: "<host> <pid>"


def _owner_line() -> str:
    """What the owner file of a folder this process makes says: "<host> <pid>"."""
    return f"{os.uname().nodename} {os.getpid()}"


def _ours(folder: Path, allowed: set[str] | None = None) -> list[str] | None:
    """The owner line ("<host> <pid>") of a folder this package made, or None: a folder counts as
    ours only if it holds the owner file and, when ``allowed`` is given, nothing else but those entries."""
    marker = folder / OWNER_FILE
    if not folder.is_dir() or not marker.is_file():
        return None
    if allowed is not None and not {p.name for p in folder.iterdir()} <= allowed | {OWNER_FILE}:
        return None
    return marker.read_text().split()


def recover_leftovers(out_dir: str | os.PathLike) -> list[str]:
    """Clean what an interrupted write to ``out_dir`` left next to it (appendix, chapter 8):

    * ``.<out>.tmp-*`` of a merge whose process is gone (killed mid-way): deleted;
    * ``.<out>.old-*`` of an overwrite that stopped between its two moves: the previous
      output is moved back when ``out_dir`` is missing, else deleted.

    Only folders that prove they are this package's (its owner file inside) are touched;
    folders of a merge still running (same host, live process) are left alone, and so is a
    folder of such a name without the owner file (someone else's: it is named in a warning).
    What will be done is said in a warning before it is done. Returns one line per action."""
    out = Path(os.path.realpath(out_dir))
    if not out.parent.is_dir():
        return []
    host, plan, foreign = os.uname().nodename, [], []
    for tmp in sorted(out.parent.glob(f".{glob_escape(out.name)}.tmp-*")):
        owner = _ours(tmp)  # an unfinished output may hold anything
        if owner is None:
            foreign.append(tmp.name)
        elif not (len(owner) == 2 and owner[0] == host and owner[1].isdigit() and _process_alive(int(owner[1]))):
            plan.append(("delete", tmp, f"delete {tmp.name}, the unfinished output of an interrupted merge"))
    for old in sorted(out.parent.glob(f".{glob_escape(out.name)}.old-*")):
        if _ours(old, {"x"}) is None:
            foreign.append(old.name)
        elif (old / "x").is_dir() and not out.exists():
            plan.append(("restore", old, f"move the previous {out.name} back from {old.name} (an overwrite "
                                         "stopped half-way)"))
        else:
            plan.append(("delete", old, f"delete {old.name}, the replaced output of an earlier overwrite"))
    if foreign:
        warnings.warn(f"{out.parent}: left alone {foreign}: named like this package's temporary folders but "
                      f"without its owner file, so not made by it", stacklevel=2)
    if plan:
        warnings.warn(f"{out}: recovering from an interrupted merge: " + "; ".join(w for _, _, w in plan),
                      stacklevel=2)
    for action, folder, _ in plan:
        if action == "restore":
            os.replace(folder / "x", out)
        shutil.rmtree(folder, ignore_errors=True)
    return [w.replace("delete", "deleted", 1).replace("move ", "moved ", 1) for _, _, w in plan]


def glob_escape(name: str) -> str:
    """``name`` with the glob metacharacters escaped (appendix, chapter 8)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _default_mode() -> int:
    """The permissions a new folder gets under the current umask (mkdtemp makes 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _preallocate(fd: int, size: int) -> None:
    """Reserve a file's blocks now, so the final fsync has no extents left to commit.
    Linux ``fallocate(2)`` only: ``os.posix_fallocate`` falls back to writing every
    block where the file system cannot (FUSE mounts such as Google Drive, some network
    file systems), which is very slow. Best effort: nothing happens elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate(fd, 0, 0, size)  # returns -1 (EOPNOTSUPP, ...) where unsupported: fine


@dataclass
class _Slot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: int
    offset: int  # absolute offset in the shard file
    nbytes: int


class ShardedSafetensorsWriter:
    """Write a sharded safetensors checkpoint tensor by tensor, atomically (appendix, chapter 8).

    The layout is planned from ``specs`` = [(name, dtype, shape), ...] in the order
    given: tensors are packed into shards of at most ``max_shard_size`` bytes (a
    tensor larger than that gets a shard of its own), each shard's header is written
    first and every tensor later goes straight to its offset (``os.pwrite``), in any
    order, from any thread.  Use as a context manager::

        with ShardedSafetensorsWriter(out, specs, "2GB", copy_from=base) as w:
            for name, t in ...:
                w.write(name, t)

    By default tensors are written through the page cache and not flushed, as
    ``save_pretrained`` and mergekit do: the writes cost little, the kernel writes the
    data back later, and a merged model loaded right after the merge is read from
    memory. Readers see the old folder or the complete new one (atomic move), but
    after a power loss the new one may be incomplete. Two options trade speed for
    that guarantee or for memory:

    * ``fsync=True`` flushes each shard as soon as its last tensor is written, before
      the folder is moved into place;
    * ``direct=True`` sends the page-aligned middle of every large tensor straight to
      the disk (``O_DIRECT``, through an aligned bounce buffer; buffered where the file
      system refuses), so a merge larger than RAM does not fill the page cache with
      dirty pages. Which way is faster depends on the machine: on our 2-core VM, where
      every fresh page of memory costs the host a fault, direct writes made the whole
      merge faster; on the H100 machine the ways were within 15 % of each other
      (``benchmarks/merge_speed.py --tools ours,ours-direct`` measures both).

    On success the temporary folder (``.<out>.tmp-*`` next to ``out``) gets
    ``model.safetensors.index.json`` (when there is more than one shard), the base's
    config/tokenizer files, and is moved into place with ``os.replace``.  On an
    exception it is deleted and ``out`` is untouched.
    """

    def __init__(self, out_dir: str | os.PathLike, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 max_shard_size: int | str = "2GB", *, copy_from: str | os.PathLike | None = None,
                 input_dirs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                 metadata: Mapping[str, str] | None = None,
                 extra_files: Mapping[str, str] | None = None, direct: bool = False, fsync: bool = False):
        inputs = list(input_dirs) + ([copy_from] if copy_from is not None else [])
        recover_leftovers(out_dir)
        self.out_dir = check_output_path(out_dir, inputs, overwrite)
        self.copy_from = Path(copy_from) if copy_from is not None else None
        self.overwrite = overwrite
        self.extra_files = dict(extra_files or {})  # file name -> text, written last
        self.metadata = {"format": "pt", **(metadata or {})}
        self.max_shard_size = parse_size(max_shard_size)
        self._plan(specs)
        self._tmp: Path | None = None
        self._fds: list[int] = []
        self._direct_fds: list[int] = []  # O_DIRECT descriptors of the same files (empty: not used)
        self._direct = direct and hasattr(os, "O_DIRECT")
        self._fsync = fsync
        self._bounce = threading.local()
        self._written: set[str] = set()
        self._left = list(self._shard_bytes_data)  # data bytes still to write, per shard
        self._lock = threading.Lock()

    # -- planning
    def _plan(self, specs) -> None:
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        seen = set()
        for name, dtype, shape in specs:
            if name in seen:
                raise ValueError(f"tensor {name!r} listed twice")
            seen.add(name)
            if dtype not in _ST_NAMES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            shape = tuple(int(s) for s in shape)
            n = 1
            for s in shape:
                n *= s
            nbytes = n * _itemsize(dtype)
            if shards[-1] and size + nbytes > self.max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, shape, nbytes))
            size += nbytes
        if shards == [[]]:
            raise ValueError("nothing to write: no tensors")
        self.n_shards = len(shards)
        if self.n_shards == 1:
            self.shard_names = [SAFETENSORS_FILE]
        else:
            self.shard_names = [f"model-{i + 1:05d}-of-{self.n_shards:05d}.safetensors"
                                for i in range(self.n_shards)]
        self.slots: dict[str, _Slot] = {}
        self._headers: list[bytes] = []
        self.total_size = 0
        for si, entries in enumerate(shards):
            # Inside a shard order the data by alignment (largest item first), then by
            # name, like safetensors' own serializer, so every tensor stays aligned.
            ordered = sorted(entries, key=lambda e: (-_itemsize(e[1]), e[0]))
            header: dict[str, object] = {"__metadata__": dict(self.metadata)}
            rel = 0
            rel_offsets = {}
            for name, dtype, shape, nbytes in ordered:
                header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [rel, rel + nbytes]}
                rel_offsets[name] = rel
                rel += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-(len(raw)) % 8)  # pad so the data section is 8-byte aligned
            self._headers.append(struct.pack("<Q", len(raw)) + raw)
            data_start = 8 + len(raw)
            for name, dtype, shape, nbytes in entries:
                self.slots[name] = _Slot(name, dtype, shape, si, data_start + rel_offsets[name], nbytes)
            self.total_size += rel
        self._shard_bytes_data = [sum(s.nbytes for s in self.slots.values() if s.shard == i)
                                  for i in range(self.n_shards)]
        self._shard_bytes = [len(h) + d for h, d in zip(self._headers, self._shard_bytes_data)]

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: self.shard_names[s.shard] for name, s in self.slots.items()}

    # -- lifecycle
    def __enter__(self):
        parent = self.out_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=parent))
        os.chmod(self._tmp, _default_mode())  # the finished folder gets the usual permissions, not 0700
        (self._tmp / OWNER_FILE).write_text(_owner_line())
        try:
            for name, header, total in zip(self.shard_names, self._headers, self._shard_bytes):
                fd = os.open(self._tmp / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                os.pwrite(fd, header, 0)
                os.ftruncate(fd, total)
                _preallocate(fd, total)
        except OSError as err:
            self._abort()
            raise self._disk_error(err) from err
        if self._direct:
            try:
                self._direct_fds = [os.open(self._tmp / name, os.O_WRONLY | os.O_DIRECT) for name in self.shard_names]
            except OSError:  # e.g. tmpfs: no O_DIRECT
                self._close_direct()
                self._direct = False
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (dtype and shape must match the plan)."""
        if self._tmp is None:
            raise RuntimeError("use ShardedSafetensorsWriter as a context manager")
        slot = self.slots.get(name)
        if slot is None:
            raise KeyError(f"tensor {name!r} is not in the planned layout")
        if name in self._written:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(f"tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, "
                             f"planned {slot.dtype} {slot.shape}")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().reshape(-1)
        if slot.nbytes:
            view = memoryview(t.view(torch.uint8).numpy())
            first = -slot.offset % _ALIGN  # bytes before the first page boundary inside the tensor
            middle = (slot.nbytes - first) // _ALIGN * _ALIGN
            if (not self._direct or slot.nbytes < _DIRECT_MIN
                    or not self._write_direct(slot, slot.offset + first, view[first:first + middle])):
                first, middle = slot.nbytes, 0
            try:
                self._pwrite(self._fds[slot.shard], view[:first], slot.offset, name)
                self._pwrite(self._fds[slot.shard], view[first + middle:], slot.offset + first + middle, name)
            except OSError as err:
                raise self._disk_error(err) from err
        with self._lock:
            self._written.add(name)
            self._left[slot.shard] -= slot.nbytes
            done = self._left[slot.shard] == 0
        if done and self._fsync:  # flush a finished shard now, while the merge goes on, not all at the end
            os.fsync(self._fds[slot.shard])

    def _disk_error(self, err: OSError) -> OSError:
        """A write that failed for want of room names the output folder and the size it needs."""
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            return err
        return OSError(err.errno, f"no room to write {self.out_dir} ({err.strerror}): the output needs "
                                  f"{sum(self._shard_bytes) / 1e9:.2f} GB on that disk; free space or write elsewhere "
                                  "(nothing of the output was kept)")

    @staticmethod
    def _pwrite(fd: int, view: memoryview, offset: int, name: str) -> None:
        done = 0
        while done < len(view):
            n = os.pwrite(fd, view[done : done + min(_MAX_IO, len(view) - done)], offset + done)
            if n <= 0:
                raise IOError(f"short write for {name!r}")
            done += n

    def _write_direct(self, slot: _Slot, start: int, middle: memoryview) -> bool:
        """Write the page-aligned middle of a tensor (file offset ``start``) with O_DIRECT
        through this thread's aligned bounce buffer. False (nothing written) if the file
        system refuses."""
        bounce = getattr(self._bounce, "buf", None)
        if bounce is None:
            bounce = self._bounce.buf = mmap.mmap(-1, _BOUNCE)  # anonymous mmap: page-aligned
        fd = self._direct_fds[slot.shard]
        for done in range(0, len(middle), _BOUNCE):
            piece = middle[done:done + _BOUNCE]
            bounce[:len(piece)] = piece
            try:
                n = os.pwrite(fd, memoryview(bounce)[:len(piece)], start + done)
            except OSError as e:
                if done == 0 and e.errno == errno.EINVAL:  # alignment not accepted: buffered from now on
                    self._direct = False
                    return False
                raise
            if n != len(piece):
                raise IOError(f"short write for {slot.name!r}")
        return True

    def _close_direct(self) -> None:
        for fd in self._direct_fds:
            os.close(fd)
        self._direct_fds = []

    def _close_fds(self) -> None:
        self._close_direct()
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._abort()
            return False
        try:
            missing = [n for n in self.slots if n not in self._written]
            if missing:
                raise RuntimeError(f"{len(missing)} planned tensor(s) never written, e.g. {missing[:3]}")
            # every shard was flushed by write() when its last tensor arrived (with fsync=True)
            self._close_fds()
            if self.n_shards > 1:
                index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
                (self._tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            if self.copy_from is not None:
                copy_support_files(self.copy_from, self._tmp)
            for fname, text in self.extra_files.items():
                (self._tmp / fname).write_text(text)
            self._finalize()
        except BaseException:
            self._abort()
            raise
        return False

    def _finalize(self) -> None:
        out = self.out_dir
        old = None
        if out.exists() and any(out.iterdir()):
            if not self.overwrite:  # someone created it meanwhile
                raise FileExistsError(f"output folder {out} appeared and is not empty")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            (old / OWNER_FILE).write_text(_owner_line())  # proof it is ours (recovery)
            os.replace(out, old / "x")
        (self._tmp / OWNER_FILE).unlink()
        try:
            os.replace(self._tmp, out)  # atomic; an existing *empty* folder is replaced
        except OSError:
            if old is not None:  # put the previous output back
                os.replace(old / "x", out)
                shutil.rmtree(old, ignore_errors=True)
            raise
        self._tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _abort(self) -> None:
        self._close_fds()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def copy_support_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy config and tokenizer files (see ``COPY_PATTERNS``) from ``src`` to ``dst`` (appendix, chapter 8)."""
    copied = []
    for p in sorted(Path(src).iterdir()):
        if p.is_file() and any(fnmatch(p.name, pat) for pat in COPY_PATTERNS):
            if p.name.endswith((".safetensors", ".bin", ".pt", ".index.json")):
                continue
            shutil.copy2(p, Path(dst) / p.name)
            copied.append(p.name)
    return copied


def save_state_dict(state_dict: Mapping[str, torch.Tensor], out_dir: str | os.PathLike,
                    max_shard_size: int | str = "2GB", *, copy_from: str | os.PathLike | None = None,
                    config: Mapping | None = None, overwrite: bool = False) -> Path:
    """Save an in-memory state dict as a (sharded) safetensors folder, atomically (appendix, chapter 8)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"save_state_dict: expected a state dict (names → tensors), got {type(state_dict).__name__}")
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save_state_dict: {k!r} is a {type(v).__name__}, not a torch.Tensor; nothing was written")
        if v.is_meta:
            raise ValueError(f"save_state_dict: {k!r} is a meta tensor and holds no data; nothing was written")
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in state_dict.items()]
    extra = {"config.json": json.dumps(dict(config), indent=2) + "\n"} if config is not None else None
    with ShardedSafetensorsWriter(out_dir, specs, max_shard_size, copy_from=copy_from,
                                  overwrite=overwrite, extra_files=extra) as w:
        for k, v in state_dict.items():
            w.write(k, v)
    return w.out_dir
