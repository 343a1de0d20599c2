"""Writing a sharded safetensors checkpoint, tensor by tensor and atomically (appendix, chapter 8).

:class:`ShardedSafetensorsWriter` plans the layout (shards, headers, offsets) up front from
the names, dtypes and shapes, so each tensor is written at its final offset as soon as it is
ready and nothing is buffered (large tensors through an aligned ``O_DIRECT`` buffer where the
file system allows it). Everything is written into a temporary folder next to the target and
moved into place with ``os.replace`` at the very end: an exception leaves no output folder
and no partial file. :func:`save_state_dict` writes an in-memory state dict that way.
"""


from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from .output_path import OWNER_FILE, _owner_line, check_output_path, recover_leftovers
from .reader import COPY_PATTERNS, SAFETENSORS_FILE, SAFETENSORS_INDEX, _MAX_IO, _ST_NAMES, _itemsize

__all__ = ["parse_size", "ShardedSafetensorsWriter", "save_state_dict", "copy_support_files"]

_ALIGN = 4096  # O_DIRECT: file offsets, lengths and memory aligned to the page size
_BOUNCE = 16 << 20  # bytes of the aligned buffer that O_DIRECT writes go through
_DIRECT_MIN = 1 << 20  # smaller tensors go through the page cache

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
