"""Hugging Face checkpoint folders, one tensor at a time: the three parts in one namespace (appendix, chapter 8).

* :mod:`.reader` — headers, tensors read with ``pread`` or mapped without a copy, pickles read
  with ``weights_only=True`` only;
* :mod:`.output_path` — where an output may go (never over an input), and the leftovers of an
  interrupted write, removed only when this package made them and their process is gone;
* :mod:`.writer` — the sharded safetensors writer, atomic (a temporary folder moved into place).

The streaming merge, the lean importance sweep and the tests import from here; each part can be
read alone.
"""

from __future__ import annotations

from . import output_path, reader, writer
from .output_path import *  # noqa: F401,F403
from .output_path import OWNER_FILE, _ours, _owner_line, _process_alive, _writable_folder, glob_escape  # noqa: F401
from .reader import *  # noqa: F401,F403
from .reader import (BIN_FILES, BIN_INDEX, COPY_PATTERNS, ShortFileError, _cached, _fill, _itemsize,  # noqa: F401
                     _read_json, _read_safetensors_header, _shard_path, _ST_DTYPES, _ST_NAMES, _torch_load_weights_only,
                     _typed, _weight_files, _weight_map)
from .writer import *  # noqa: F401,F403
from .writer import _ALIGN, _BOUNCE, _DIRECT_MIN, _default_mode, _preallocate, _Slot, copy_support_files  # noqa: F401

__all__ = [*reader.__all__, *output_path.__all__, *writer.__all__]
