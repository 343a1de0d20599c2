"""Reading and writing HF folders safely (merging_helpers.fast.checkpoints): damaged
headers and indexes fail at once with the file named, shard paths stay inside the
folder, leftovers of interrupted merges are cleaned or recovered, outputs get the
usual permissions, and an output that cannot be written is refused before any work."""
import json
import os
import pickle
import struct
import warnings

import pytest
import torch
from safetensors.torch import save_file

from merging_helpers.fast import checkpoints as ckpt
from merging_helpers.fast.checkpoints import (
    CheckpointFolder,
    ShardedSafetensorsWriter,
    load_state_dict,
    save_state_dict,
)
from merging_helpers.fast.streaming import merge_folders


def _st_file(path, tensors):
    save_file(tensors, str(path))
    return path


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    _st_file(d / "model.safetensors", {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)})
    return d


def test_read_rows_reads_the_rows_asked_for(tmp_path):
    x = torch.randn(50, 3, 4).to(torch.bfloat16)
    _st_file(tmp_path / "model.safetensors", {"emb": x, "s": torch.tensor(1.0)})
    rows = torch.tensor([[7, 0, 7], [49, 3, 3]])
    with CheckpointFolder(tmp_path) as cf:
        assert torch.equal(cf.read_rows("emb", rows.reshape(-1)), x[rows.reshape(-1)])
        assert cf.read_rows("emb", torch.tensor([], dtype=torch.long)).shape == (0, 3, 4)
        with pytest.raises(IndexError, match="0..49"):
            cf.read_rows("emb", torch.tensor([50]))
        with pytest.raises(ValueError, match="scalar"):
            cf.read_rows("s", torch.tensor([0]))


def test_map_gives_read_s_tensors_without_a_copy(tmp_path):
    """map() == read() for every dtype, a scalar and an empty tensor, at offsets that are
    not page-aligned; writes to the mapped tensor never reach the file."""
    tensors = {"bf": torch.randn(300, 7).to(torch.bfloat16), "f32": torch.randn(1000), "s": torch.tensor(2.5),
               "e": torch.zeros(0, 3), "h": torch.randn(5, 5).half()}
    f = _st_file(tmp_path / "model.safetensors", tensors)
    before = f.read_bytes()
    with CheckpointFolder(tmp_path) as cf:
        for name, t in tensors.items():
            m = cf.map(name)
            assert m.dtype == t.dtype and m.shape == t.shape and torch.equal(m, cf.read(name))
        m = cf.map("f32")
        m += 1  # copy-on-write: the process's pages change, the file does not
        assert torch.equal(cf.map("f32"), tensors["f32"])
    assert f.read_bytes() == before


def test_map_cached_only_declines_pages_not_in_the_page_cache(tmp_path):
    f = _st_file(tmp_path / "model.safetensors", {"w": torch.randn(512, 1024)})  # 2 MB
    with CheckpointFolder(tmp_path) as cf:
        cf.read("w")  # now cached
        assert torch.equal(cf.map("w", cached_only=True), cf.read("w"))
        if not hasattr(os, "posix_fadvise"):
            pytest.skip("no posix_fadvise: cannot evict the file's pages")
        os.sync()  # clean pages can be dropped
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        if ckpt._cached(*_mapping_of(f)):
            pytest.skip("the kernel kept the pages cached")
        assert cf.map("w", cached_only=True) is None
        assert torch.equal(cf.map("w"), cf.read("w"))


def _mapping_of(path):
    import mmap
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    os.close(fd)
    buf = torch.frombuffer(m, dtype=torch.uint8)
    return buf.data_ptr(), buf.numel()


def test_map_of_a_file_that_shrank_names_file_and_tensor(folder):
    with CheckpointFolder(folder) as cf:
        os.truncate(folder / "model.safetensors", 40)  # after the header was read
        with pytest.raises(ckpt.ShortFileError, match=r"model.safetensors: ends before tensor 'b'"):
            cf.map("b")


def test_overlapping_byte_ranges_are_refused(folder):
    def share(h):  # "b" reads a's bytes: the safetensors library refuses this too
        h["b"]["data_offsets"] = [0, 16]
    _rewrite_header(folder / "model.safetensors", share)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor .* starts at byte 0 .*overlapping"):
        CheckpointFolder(folder)


def test_truncated_file_and_offsets_past_the_end_are_refused(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"model.safetensors: the header describes \d+ bytes but the file has"):
        CheckpointFolder(folder)
    f.write_bytes(f.read_bytes()[:12])
    with pytest.raises(ValueError, match="implausible safetensors header length"):
        CheckpointFolder(folder)


def test_byte_range_that_does_not_fit_the_shape_is_refused(folder):
    _rewrite_header(folder / "model.safetensors", lambda h: h["a"].update(shape=[2, 4]))
    with pytest.raises(ValueError, match=r"tensor 'a' has byte range \[0, 24\) but its dtype F32 and shape \[2, 4\]"):
        CheckpointFolder(folder)


def test_flipped_header_bytes_name_the_file(folder):
    f = folder / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[10] = 0xFF  # inside the JSON header
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model.safetensors: the safetensors header is not valid JSON"):
        CheckpointFolder(folder)


def test_index_that_is_not_json_names_the_file(tmp_path):
    d = save_state_dict({"a": torch.ones(300), "b": torch.ones(300)}, tmp_path / "m", max_shard_size=1500)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: the index is not valid JSON"):
        CheckpointFolder(d)
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="no \"weight_map\""):
        CheckpointFolder(d)


def test_an_index_that_lists_a_tensor_no_shard_holds_is_refused(tmp_path):
    d = save_state_dict({"a": torch.ones(300), "b": torch.ones(300)}, tmp_path / "m", max_shard_size=1500)
    path = d / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2 and CheckpointFolder(d).names() == ["a", "b"]  # the intact index reads
    index["weight_map"]["c"] = shards[0]  # a tensor no shard holds
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lists 1 tensor\(s\) not where it says, e.g. 'c' \(listed in .*, is in no shard\)"):
        CheckpointFolder(d)
    del index["weight_map"]["c"]
    index["weight_map"]["a"], index["weight_map"]["b"] = index["weight_map"]["b"], index["weight_map"]["a"]  # swapped
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lists 2 tensor\(s\) not where it says, e.g. 'a' \(listed in .*, is in "):
        CheckpointFolder(d)


@pytest.mark.parametrize("shard", ["../secret.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_paths_outside_the_folder_are_refused(tmp_path, shard):
    d = save_state_dict({"a": torch.ones(300), "b": torch.ones(300)}, tmp_path / "m", max_shard_size=1500)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["a"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is not a file name inside"):
        CheckpointFolder(d)
    with pytest.raises(ValueError, match="is not a file name inside"):
        ckpt.read_tensor(d, "a")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_error_names_the_file_and_gives_safe_advice(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(pickle.UnpicklingError) as err:
            CheckpointFolder(d)
    message = str(err.value)
    assert "evil/pytorch_model.bin: refused to unpickle" in message
    assert "would run code from the file" in message and "convert a checkpoint you trust" in message


def test_killed_merge_leftovers_are_deleted_and_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / ".out.tmp-dead"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    (dead / ckpt.OWNER_FILE).write_text(f"{os.uname().nodename} 999999999")  # no such process
    alive = tmp_path / ".out.tmp-alive"
    alive.mkdir()
    (alive / ckpt.OWNER_FILE).write_text(f"{os.uname().nodename} {os.getpid()}")
    with pytest.warns(UserWarning, match="recovering from an interrupted merge: delete .out.tmp-dead, the unfinished "
                                         "output of an interrupted merge"):
        save_state_dict({"a": torch.ones(3)}, out)
    assert not dead.exists() and alive.exists() and (out / "model.safetensors").is_file()


def test_overwrite_stopped_between_its_two_moves_is_recovered(tmp_path):
    out = save_state_dict({"a": torch.ones(3)}, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    old = tmp_path / ".out.old-abc"
    old.mkdir()
    (old / ckpt.OWNER_FILE).write_text(f"{os.uname().nodename} 999999999")  # _finalize marks it before the move
    os.replace(out, old / "x")  # the state a crash after the first move leaves
    with pytest.warns(UserWarning, match="move the previous out back"):
        assert ckpt.recover_leftovers(out) == ["moved the previous out back from .out.old-abc (an overwrite stopped "
                                               "half-way)"]
    assert (out / "model.safetensors").read_bytes() == before and not old.exists()


@pytest.mark.parametrize("name", [".out.tmp-mine", ".out.old-mine"])
def test_a_user_folder_named_like_a_leftover_is_never_deleted(tmp_path, name):
    mine = tmp_path / name
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's own work")
    if name.endswith("old-mine"):  # even with our marker, a folder holding more than our "x" is not ours
        (mine / ckpt.OWNER_FILE).write_text(f"{os.uname().nodename} 999999999")
    with pytest.warns(UserWarning, match=rf"left alone \['{name}'\]: named like this package's temporary folders"):
        out = save_state_dict({"a": torch.ones(3)}, tmp_path / "out")
    assert (mine / "notes.txt").read_text() == "a user's own work" and (out / "model.safetensors").is_file()


def test_output_folders_follow_the_umask(tmp_path):
    mask = os.umask(0o022)
    try:
        out = save_state_dict({"a": torch.ones(3)}, tmp_path / "out")
    finally:
        os.umask(mask)
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert not (out / ckpt.OWNER_FILE).exists()


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, monkeypatch):
    src = save_state_dict({"a": torch.ones(3)}, tmp_path / "base")
    expert = save_state_dict({"a": torch.full((3,), 2.0)}, tmp_path / "expert")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    read = []
    monkeypatch.setattr(CheckpointFolder, "read", lambda self, name, buffer=None: read.append(name))
    with pytest.raises(PermissionError, match="a-file is not a writable folder"):
        merge_folders(src, [expert], blocker / "out", "ties", density=0.5, magnitude_scope="model", progress=False)
    existing = save_state_dict({"a": torch.ones(3)}, tmp_path / "existing")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(existing) else real_access(p, mode))
    with pytest.raises(PermissionError, match="cannot be moved aside"):
        merge_folders(src, [expert], existing, "ties", density=0.5, overwrite=True, progress=False)
    assert read == []  # nothing was read: refused before the merge began


def test_writer_refuses_incomplete(tmp_path):
    specs = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    with pytest.raises(RuntimeError, match="never written"):
        with ShardedSafetensorsWriter(tmp_path / "o", specs) as w:
            w.write("a", torch.zeros(2))
    assert sorted(os.listdir(tmp_path)) == []
    with pytest.raises(ValueError, match="planned"):
        with ShardedSafetensorsWriter(tmp_path / "o", specs) as w:
            w.write("a", torch.zeros(3))
    assert sorted(os.listdir(tmp_path)) == []


def test_bin_loaded_only_with_weights_only(families, tmp_path, monkeypatch):
    base_dir, expert_dirs = families["llama-fp32-single"]
    dirs = []
    for i, d in enumerate([base_dir, *expert_dirs]):
        folder = tmp_path / f"bin{i}"
        folder.mkdir()
        torch.save(load_state_dict(d), folder / "pytorch_model.bin")
        (folder / "config.json").write_text((base_dir / "config.json").read_text())
        dirs.append(folder)
    seen = []
    real_load = torch.load

    def spy(*a, **k):
        seen.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.warns(UserWarning, match="safetensors is preferred"):
        out = merge_folders(dirs[0], dirs[1:], tmp_path / "o", "ties", density=0.3, progress=False)
    assert seen and all(w is True for w in seen)
    ref = merge_folders(base_dir, expert_dirs, tmp_path / "ref", "ties", density=0.3, progress=False)
    a, b = load_state_dict(out), load_state_dict(ref)
    assert all(torch.equal(a[k], b[k]) for k in b)
    # a pickle holding code is refused: test_pickle_error_names_the_file_and_gives_safe_advice


@pytest.mark.parametrize("direct", [True, False, "refused"])
def test_writer_bytes_with_and_without_direct_io(tmp_path, monkeypatch, direct):
    """O_DIRECT writes the page-aligned middle of large tensors; the bytes must be those of a
    plain safetensors file whatever the path (and a file system that refuses O_DIRECT
    falls back to the page cache)."""
    from safetensors.torch import load_file


    if direct == "refused":
        real = os.pwrite

        def pwrite(fd, data, offset):
            if fd in writer_fds:
                raise OSError(22, "Invalid argument")  # EINVAL, as a file system without O_DIRECT
            return real(fd, data, offset)
        writer_fds: list[int] = []
        monkeypatch.setattr(os, "pwrite", pwrite)
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, generator=g), "b": torch.randn(700_001, generator=g).to(torch.bfloat16),
               "c": torch.randn(300, 1001, generator=g), "d": torch.arange(5, dtype=torch.int64)}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with ShardedSafetensorsWriter(tmp_path / "o", specs, "1MB", direct=direct is not False,
                                  fsync=direct is not False) as w:
        if direct == "refused":
            writer_fds.extend(w._direct_fds)
        for k in ("c", "a", "d", "b"):  # any order
            w.write(k, tensors[k])
        used_direct = bool(w._direct_fds) and w._direct
    files = sorted((tmp_path / "o").glob("*.safetensors"))
    loaded = {k: v for f in files for k, v in load_file(f).items()}
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    if direct is False or direct == "refused":
        assert not used_direct


def test_saving_a_value_that_is_not_a_tensor_is_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match=r"save_state_dict: 'a' is a int, not a torch.Tensor; nothing was written"):
        save_state_dict({"w": torch.ones(2), "a": 3}, tmp_path / "m")
    with pytest.raises(ValueError, match=r"'w' is a meta tensor"):
        save_state_dict({"w": torch.ones(2, device="meta")}, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("damage", ["random bytes", "truncated zip"])
def test_a_damaged_bin_is_named_as_damaged_not_as_a_dangerous_pickle(tmp_path, damage):
    d = tmp_path / "m"
    d.mkdir()
    if damage == "random bytes":
        (d / "pytorch_model.bin").write_bytes(os.urandom(4096))
    else:
        torch.save({"a": torch.ones(1000)}, d / "pytorch_model.bin")
        raw = (d / "pytorch_model.bin").read_bytes()
        (d / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"pytorch_model.bin: not a PyTorch checkpoint \(neither a zip archive nor a "
                                         r"pickle\): the file is damaged or of another format"):
        CheckpointFolder(d)


@pytest.mark.parametrize("where", ["preallocating", "writing"])
def test_a_full_disk_names_the_output_and_its_size_and_keeps_nothing(tmp_path, monkeypatch, where):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "preallocating":
        monkeypatch.setattr(ckpt.writer, "_preallocate", full)   # the writer part reads its own global
    else:
        monkeypatch.setattr(ckpt.ShardedSafetensorsWriter, "_pwrite", staticmethod(full))
    out = tmp_path / "out"
    with pytest.raises(OSError, match=rf"no room to write {out} \(No space left on device\): the output needs 0.00 GB"):
        save_state_dict({"a": torch.ones(300)}, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
