"""Reading Hugging Face checkpoint folders, one tensor at a time (appendix, chapter 8).

A Hugging Face model folder holds ``config.json`` (plus tokenizer files) and its
weights either in one ``model.safetensors`` or in several shards listed by
``model.safetensors.index.json``. Merging a 7B model must not need 7B × (T+1)
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
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

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
    "read_config",
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
