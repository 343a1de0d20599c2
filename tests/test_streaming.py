"""Streaming merges of HF folders (merging_helpers.fast.checkpoints / .streaming).

Tiny Llama- and BERT-shaped folders are written into tmp_path in fp32, fp16 and
bf16, sharded and unsharded.  The streaming merge must equal the in-memory merge
(recipes.merge_state_dicts) bit for bit, keep the input dtype, write a correct
index, write atomically and refuse dangerous paths and mismatched inputs.
"""

import json
import os

import pytest
import torch
from conftest import FAMILY_CASES

from merging_helpers.config import MergeConfig
from merging_helpers.fast import checkpoints as ckpt
from merging_helpers.fast import compiled, streaming
from merging_helpers.fast.checkpoints import (
    SAFETENSORS_INDEX,
    CheckpointFolder,
    load_state_dict,
    read_tensor,
    save_state_dict,
)
from merging_helpers.fast.streaming import merge_folders
from merging_helpers.recipes import merge_state_dicts, merge_tensor

METHOD_KWARGS = {
    "task_arithmetic": dict(weights=[0.6, 0.4], lam=1.0),
    "ties": dict(density=0.3),
    "dare_linear": dict(drop_rate=0.7),
    "dare_ties": dict(drop_rate=0.7),
    "magnitude": dict(density=0.5),
}


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize("case", [p.id for p in FAMILY_CASES])
@pytest.mark.parametrize("method", list(METHOD_KWARGS))
def test_streaming_equals_in_memory(families, tmp_path, case, method):
    base_dir, expert_dirs = families[case]
    base_sd = load_state_dict(base_dir)
    expert_sds = [load_state_dict(d) for d in expert_dirs]
    seeds = [0, 7] if method.startswith("dare") else [0]
    for seed in seeds:
        kw = dict(METHOD_KWARGS[method], seed=seed)
        out = merge_folders(base_dir, expert_dirs, tmp_path / f"m{seed}", method, progress=False,
                            chunk_elems=256, prefetch_bytes=4096, **kw)
        merged = load_state_dict(out)
        ref = merge_state_dicts(base_sd, expert_sds, method, **kw)
        assert set(merged) == set(base_sd)
        for name, t in base_sd.items():
            assert merged[name].dtype == t.dtype, name  # output dtype = input dtype
            assert torch.equal(merged[name], ref[name].to(t.dtype)), (method, seed, name)
        if method.startswith("dare"):
            moved = [n for n in base_sd if base_sd[n].is_floating_point() and not torch.equal(merged[n], base_sd[n])]
            assert moved, "a DARE merge should change the weights"
    if method.startswith("dare"):  # different seeds give different masks
        a, b = load_state_dict(tmp_path / "m0"), load_state_dict(tmp_path / "m7")
        assert any(not torch.equal(a[n], b[n]) for n in a if a[n].is_floating_point())


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_inputs_read_or_mapped_give_the_same_merge(families, tmp_path, monkeypatch, method):
    """On the CPU the prefetcher maps inputs that are in the page cache (as they are here)
    and reads the others into pool buffers: both ways give the same bytes, the pool
    takes back only its own buffers, and every input tensor went the way forced."""
    base_dir, expert_dirs = families["llama-bf16-sharded"]
    kw = METHOD_KWARGS[method]
    ways = []
    real_map = CheckpointFolder.map

    def spy_map(self, name, cached_only=False):
        t = None if force_read else real_map(self, name, cached_only)
        ways.append("read" if t is None else "mapped")
        return t
    monkeypatch.setattr(CheckpointFolder, "map", spy_map)
    outs = {}
    for force_read in (False, True):
        ways.clear()
        outs[force_read] = load_state_dict(merge_folders(base_dir, expert_dirs, tmp_path / f"o{force_read}", method,
                                                         progress=False, **kw))
        assert ways and set(ways) == {"read" if force_read else "mapped"}
    assert all(torch.equal(outs[True][n], outs[False][n]) for n in outs[True])


def test_buffer_pool_takes_back_only_its_own_buffers():
    pool = streaming._BufferPool(cap=1 << 20)
    mine, other = pool.get(1000), torch.empty(1000, dtype=torch.uint8)
    pool.put(other)
    assert pool.idle == 0
    pool.put(mine)
    assert pool.idle == 1000 and pool.get(1000) is mine
    big = pool.get(2 << 20)
    pool.put(big)  # over the cap: dropped and forgotten
    assert pool.idle == 0 and big.data_ptr() not in pool.mine


def test_chunked_task_arithmetic_equals_whole(families, tmp_path):
    base_dir, expert_dirs = families["llama-bf16-sharded"]
    kw = METHOD_KWARGS["task_arithmetic"]
    a = merge_folders(base_dir, expert_dirs, tmp_path / "chunked", "task_arithmetic", progress=False,
                      chunk_elems=100, **kw)
    b = merge_folders(base_dir, expert_dirs, tmp_path / "whole", "task_arithmetic", progress=False,
                      chunk_elems=1 << 30, **kw)
    sa, sb = load_state_dict(a), load_state_dict(b)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)


# --------------------------------------------------------------------------- output format


def test_index_and_shards(families, tmp_path):
    base_dir, expert_dirs = families["llama-bf16-sharded"]
    out = merge_folders(base_dir, expert_dirs, tmp_path / "out", "ties", density=0.3,
                        max_shard_size=5000, progress=False)
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    infos = ckpt.list_tensors(out)
    base_infos = ckpt.list_tensors(base_dir)
    assert set(index["weight_map"]) == set(base_infos) == set(infos)
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in infos.values())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for name, file in index["weight_map"].items():
        assert infos[name].file.name == file
        assert infos[name].shape == base_infos[name].shape and infos[name].dtype == torch.bfloat16
        # the standard reader agrees with ours
        assert torch.equal(read_tensor(out, name), CheckpointFolder(out).read(name))
    # each shard is at most max_shard_size of data (unless a single tensor is larger)
    for shard in shards:
        sizes = [infos[k].nbytes for k, f in index["weight_map"].items() if f == shard]
        assert sum(sizes) <= 5000 or len(sizes) == 1
    assert (out / "config.json").read_text() == (base_dir / "config.json").read_text()
    assert (out / "tokenizer_config.json").exists()
    # transformers loads the merged folder
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    sd = model.state_dict()
    merged = load_state_dict(out)
    assert all(torch.equal(sd[k], merged[k]) for k in merged)


def test_single_shard_has_no_index(families, tmp_path):
    base_dir, expert_dirs = families["llama-fp32-single"]
    out = merge_folders(base_dir, expert_dirs, tmp_path / "o", "dare_linear", drop_rate=0.5, progress=False)
    assert (out / "model.safetensors").is_file() and not (out / SAFETENSORS_INDEX).exists()


def test_integer_buffer_copied_from_base(families, tmp_path):
    base_dir, expert_dirs = families["bert-fp16-sharded"]
    out = merge_folders(base_dir, expert_dirs, tmp_path / "o", "ties", density=0.5, progress=False)
    t = read_tensor(out, "embeddings.position_ids")
    assert t.dtype == torch.int64 and torch.equal(t, torch.arange(32).unsqueeze(0))


# --------------------------------------------------------------------------- safety


def _listing(path):
    return sorted(os.listdir(path))


def test_atomic_write_on_error(families, tmp_path):
    base_dir, expert_dirs = families["llama-bf16-sharded"]
    calls = {"n": 0}

    def failing(name, base, experts, method, **kw):
        calls["n"] += 1
        if calls["n"] > 4:  # the 1st call is the argument probe; fail mid-model
            raise RuntimeError("boom")
        return merge_tensor(name, base, experts, method, **kw)

    before = _listing(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        merge_folders(base_dir, expert_dirs, tmp_path / "out", "ties", density=0.3, progress=False,
                      max_shard_size=5000, merge_fn=failing)
    assert calls["n"] == 5
    assert _listing(tmp_path) == before  # no output folder, no temp folder, no partial shard

    # an existing output survives a failed overwrite untouched
    out = tmp_path / "keep"
    out.mkdir()
    (out / "marker").write_text("x")
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="boom"):
        merge_folders(base_dir, expert_dirs, out, "ties", density=0.3, progress=False,
                      overwrite=True, merge_fn=failing)
    assert _listing(out) == ["marker"] and _listing(tmp_path) == sorted(before + ["keep"])




def test_refuses_output_that_is_or_touches_an_input(families, tmp_path):
    base_dir, expert_dirs = families["llama-fp32-single"]
    for bad in (base_dir, expert_dirs[1], expert_dirs[0] / "sub", base_dir.parent):
        with pytest.raises(ValueError, match="input folder"):
            merge_folders(base_dir, expert_dirs, bad, "ties", density=0.3, progress=False, overwrite=True)
    assert not (expert_dirs[0] / "sub").exists()


def test_refuses_non_empty_output_unless_overwrite(families, tmp_path):
    base_dir, expert_dirs = families["llama-fp32-single"]
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        merge_folders(base_dir, expert_dirs, out, "ties", density=0.3, progress=False)
    merge_folders(base_dir, expert_dirs, out, "ties", density=0.3, progress=False, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder is fine
    merge_folders(base_dir, expert_dirs, empty, "ties", density=0.3, progress=False)
    assert (empty / "model.safetensors").exists()


def _copy_family(src_base, src_experts, root, edit):
    """Copy a family, applying edit(expert_index, state_dict) to the expert state dicts."""
    base = save_state_dict(load_state_dict(src_base), root / "base", copy_from=src_base)
    experts = []
    for t, d in enumerate(src_experts):
        sd = load_state_dict(d)
        edit(t, sd)
        experts.append(save_state_dict(sd, root / f"e{t}"))
    return base, experts


def test_mismatch_names_tensor_and_expert(families, tmp_path):
    base_dir, expert_dirs = families["llama-fp32-single"]
    name = "model.layers.1.mlp.up_proj.weight"

    def bad_shape(t, sd):
        if t == 1:
            sd[name] = sd[name][:-1].contiguous()

    base, experts = _copy_family(base_dir, expert_dirs, tmp_path / "shape", bad_shape)
    with pytest.raises(ValueError, match=rf"expert 1 .*{name}.*shape"):
        merge_folders(base, experts, tmp_path / "o1", "ties", density=0.3, progress=False)

    def bad_dtype(t, sd):
        if t == 0:
            sd[name] = sd[name].half()

    base, experts = _copy_family(base_dir, expert_dirs, tmp_path / "dtype", bad_dtype)
    with pytest.raises(TypeError, match=rf"expert 0 .*{name}.*dtype"):
        merge_folders(base, experts, tmp_path / "o2", "ties", density=0.3, progress=False)

    def missing(t, sd):
        if t == 1:
            del sd[name]

    base, experts = _copy_family(base_dir, expert_dirs, tmp_path / "missing", missing)
    with pytest.raises(ValueError, match=rf"expert 1 .*missing.*{name}"):
        merge_folders(base, experts, tmp_path / "o3", "ties", density=0.3, progress=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        merge_folders(base, [experts[0], tmp_path / "nope"], tmp_path / "o4", "ties", density=0.3, progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


@pytest.mark.parametrize("kw, match", [
    (dict(density=1.5), "density"),
    (dict(density=0.0), "density"),
    (dict(drop_rate=1.0), "drop_rate"),
    (dict(density=0.3, weights=[1.0]), "weights"),
    (dict(density=0.3, lam=float("nan")), "lam"),
])
def test_bad_arguments_rejected_before_any_work(families, tmp_path, kw, match):
    base_dir, expert_dirs = families["llama-fp32-single"]
    calls = []

    def spy(name, *a, **k):
        calls.append(name)
        return merge_tensor(name, *a, **k)

    method = "dare_ties" if "drop_rate" in kw else "ties"
    with pytest.raises(ValueError, match=match):
        merge_folders(base_dir, expert_dirs, tmp_path / "o", method, progress=False, merge_fn=spy, **kw)
    assert calls == [] and not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="method"):
        merge_folders(base_dir, expert_dirs, tmp_path / "o", "nonsense", progress=False)


@pytest.mark.parametrize("kw, match", [
    (dict(overwrite="no"), "overwrite must be True or False, got 'no'"),   # a non-empty string would be true
    (dict(direct_io=1), "direct_io must be True or False, got 1"),
    (dict(progress=None), "progress must be True or False, got None"),
    (dict(prefetch_bytes="1GB"), "prefetch_bytes must be a whole number of bytes >= 0, got '1GB'"),
    (dict(workers="x"), "workers must be None or a whole number > 0, got 'x'"),
    (dict(workers=0), "workers must be None or a whole number > 0, got 0"),
])
def test_badly_typed_switches_are_refused_by_name_before_any_work(families, tmp_path, kw, match):
    base_dir, expert_dirs = families["llama-fp32-single"]
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("a user's file")
    with pytest.raises(TypeError, match=match):
        merge_folders(base_dir, expert_dirs, out, "ties", density=0.3, **{"progress": False, **kw})
    assert (out / "keep.txt").read_text() == "a user's file"  # nothing written over the user's folder


# --------------------------------------------------------------------------- pickles






def test_fused_path_is_used_and_threads_restored(families, tmp_path, monkeypatch):
    base_dir, expert_dirs = families["llama-bf16-sharded"]
    real = streaming.merge_tensor
    calls = []

    def spy(name, *a, **k):
        calls.append(name)
        return real(name, *a, **k)

    monkeypatch.setattr(streaming, "merge_tensor", spy)
    threads = torch.get_num_threads()
    merge_folders(base_dir, expert_dirs, tmp_path / "o", "ties", density=0.3, progress=False)
    if compiled.load() is not None:
        assert calls == []  # every tensor went through the fused path
    assert torch.get_num_threads() == threads
    for method, kw, device in [("ties", dict(density=0.3, rescale="l1"), "cpu"), ("della", dict(density=0.3), "cpu"),
                               ("ties", dict(density=0.3), "cuda")]:
        assert not streaming.fused_supported(MergeConfig.build(method, 2, **kw), device)
    calls.clear()
    merge_folders(base_dir, expert_dirs, tmp_path / "o2", "dare_ties", density=0.3, rescale="l1", progress=False)
    assert len(calls) > 1  # not fusable: merge_tensor per tensor


def test_per_partition_rates_and_model_scope_match_in_memory(families, tmp_path):
    base_dir, expert_dirs = families["llama-bf16-sharded"]
    base_sd = load_state_dict(base_dir)
    expert_sds = [load_state_dict(d) for d in expert_dirs]
    cases = [
        ("ties", dict(density={"attention": 0.3, "ffn": 0.5}, rate_level="role", rate_default=0.8)),
        ("dare_ties", dict(drop_rate=[{"attention": 0.9}, 0.5], rate_level="role", rate_default=0.7, seed=2)),
        ("ties", dict(density=0.3, magnitude_scope="model")),
        ("magnitude", dict(density=[0.2, 0.4], magnitude_scope="model", weights=[1.0, 0.5])),
    ]
    for i, (method, kw) in enumerate(cases):
        for fused in (True, False):
            out = merge_folders(base_dir, expert_dirs, tmp_path / f"o{i}{fused}", method, progress=False,
                                fused=fused, chunk_elems=300, **kw)
            ref = merge_state_dicts(base_sd, expert_sds, method, progress=False, **kw)
            merged = load_state_dict(out)
            for name, t in ref.items():
                assert torch.equal(merged[name], t.to(base_sd[name].dtype)), (method, kw, fused, name)
    with pytest.raises(KeyError):  # a tensor without a rate fails before any work
        merge_folders(base_dir, expert_dirs, tmp_path / "bad", "ties", density={"attention": 0.3},
                      rate_level="role", progress=False)
    with pytest.raises(ValueError, match="match no tensor"):
        merge_folders(base_dir, expert_dirs, tmp_path / "bad", "ties", density={"atention": 0.3},
                      rate_level="role", rate_default=0.5, progress=False)
    with pytest.raises(ValueError, match="magnitude_scope"):
        merge_folders(base_dir, expert_dirs, tmp_path / "bad", "dare_ties", density=0.3,
                      magnitude_scope="model", progress=False)
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- large tensors, direct writes, CUDA


def _large_family(root, dtype=torch.bfloat16, n_experts=3):
    """Tensors above the writer's O_DIRECT size and above one random block (rng.BLOCK),
    at page-unaligned file offsets (the small first tensor shifts the rest)."""
    g = torch.Generator().manual_seed(5)
    shapes = {"model.layers.0.input_layernorm.weight": (1003,), "model.layers.0.mlp.up_proj.weight": (1100, 1001),
              "model.layers.0.self_attn.q_proj.weight": (613, 1024)}
    base = {k: (0.02 * torch.randn(s, generator=g)).to(dtype) for k, s in shapes.items()}
    dirs = [save_state_dict(base, root / "base", "3MB")]
    for t in range(n_experts):
        ex = {k: (v.float() + 0.002 * (t + 1) * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        dirs.append(save_state_dict(ex, root / f"expert{t}", "3MB"))
    return dirs[0], dirs[1:]


@pytest.mark.parametrize("method, kw", [("dare_ties", dict(density=0.3, weighted_election=True)),
                                        ("ties", dict(density=0.3)), ("dare_linear", dict(drop_rate=0.9))])
def test_large_tensors_stream_like_in_memory(tmp_path, method, kw):
    base_dir, expert_dirs = _large_family(tmp_path)
    base_sd, expert_sds = load_state_dict(base_dir), [load_state_dict(d) for d in expert_dirs]
    ref = merge_state_dicts(base_sd, expert_sds, method, seed=11, **kw)
    for fused in (True, False):
        out = merge_folders(base_dir, expert_dirs, tmp_path / f"out-{fused}", method, progress=False, fused=fused,
                            max_shard_size="3MB", seed=11, **kw)
        merged = load_state_dict(out)
        assert all(torch.equal(merged[n], ref[n].to(merged[n].dtype)) for n in ref), (method, fused)




@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method, kw", [("ties", dict(density=0.3)), ("dare_ties", dict(drop_rate=0.7)),
                                        ("dare_linear", dict(density=0.2)), ("magnitude", dict(density=0.5)),
                                        ("task_arithmetic", dict(weights=[0.5, 0.7, 0.4]))])
def test_cuda_streaming_matches_cpu(tmp_path, method, kw):
    """Same masks on the GPU (drawn on the CPU, moved) and sums in the same order
    (consensus.sum_experts): the GPU merge equals the CPU's bit for bit."""
    base_dir, expert_dirs = _large_family(tmp_path)
    cpu = load_state_dict(merge_folders(base_dir, expert_dirs, tmp_path / "cpu", method, progress=False, seed=2, **kw))
    gpu = load_state_dict(merge_folders(base_dir, expert_dirs, tmp_path / "gpu", method, device="cuda",
                                        progress=False, seed=2, **kw))
    for name in cpu:
        assert gpu[name].dtype == cpu[name].dtype, name
        differ = gpu[name] != cpu[name]
        assert not differ.any(), (name, int(differ.sum()), float((gpu[name].float() - cpu[name].float()).abs().max()))


@pytest.mark.parametrize("chunk_elems", [1 << 22, 64], ids=["whole", "chunked"])
def test_a_merge_of_the_wrong_shape_is_refused(families, tmp_path, chunk_elems):
    base_dir, expert_dirs = families["llama-fp32-single"]

    def scalar_merge(name, base, experts, method, **kw):
        # wrong for every tensor (whole) or only for row chunks (chunked calls pass an offset);
        # a one-entry result would broadcast silently in copy_
        wrong = base.numel() > 1 and (chunk_elems > 64 or "offset" in kw)
        return base.reshape(-1)[:1].clone() if wrong else base.clone()

    with pytest.raises(RuntimeError, match="returned shape"):
        merge_folders(base_dir, expert_dirs, tmp_path / "o", "task_arithmetic", progress=False,
                      chunk_elems=chunk_elems, merge_fn=scalar_merge)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["llama-bf16-sharded", "bert-fp16-sharded"])
def test_rms_adaptive_streams_like_in_memory(families, tmp_path, case, monkeypatch):
    from merging_helpers import rms_adaptive as ra

    monkeypatch.setattr(ra, "RMS_CHUNK", 100)  # several blocks per matrix, as on a real model
    base_dir, expert_dirs = families[case]
    base_sd = load_state_dict(base_dir)
    experts = {"a": load_state_dict(expert_dirs[0]), "b": load_state_dict(expert_dirs[1])}
    deltas = {t: {n: sd[n].float() - base_sd[n].float() for n in base_sd if base_sd[n].is_floating_point()}
              for t, sd in experts.items()}
    options = dict(p_default=0.7, drop_scale=0.1, scale="std", seed=3)
    rates, _ = ra.adaptive_rates(ra.rms_table(deltas), 0.7, 0.1, scale="std")
    assert len({round(p, 6) for v in rates.values() for p in v.values()}) > 2
    ref = ra.merge(base_sd, experts, rates, p_default=0.7, seed=3)
    calls = []
    real_call = streaming.FusedMerge.__call__
    monkeypatch.setattr(streaming.FusedMerge, "__call__", lambda self, *a: calls.append(1) or real_call(self, *a))
    for kernel in ("auto", "reference"):
        out = merge_folders(base_dir, dict(zip("ab", expert_dirs)), tmp_path / kernel, "rms_adaptive",
                            progress=False, prefetch_bytes=4096, chunk_elems=256, kernel=kernel, **options)
        merged = load_state_dict(out)
        for name, t in base_sd.items():
            assert torch.equal(merged[name], ref[name]), (kernel, name)
        assert bool(calls) == (kernel == "auto" and compiled.load() is not None)  # the fused path ran
        calls.clear()


def _planned_options(method, base_sd, names):
    """Each planned method's options on a test family (APL: made-up importances at the hidden level)."""
    if method == "dp":
        return dict(alpha=0.7, fluctuation=0.1, lam=0.8, weights=[1.0, 0.5])
    if method == "rms_adaptive":
        return dict(p_default=0.6, drop_scale=0.2, scale="std", seed=2)
    from merging_helpers.apl import Importance, groups
    keys = list(groups(base_sd, "hidden"))
    g = torch.Generator().manual_seed(5)
    importances = {t: Importance(t, "hidden", keys, -torch.rand(len(keys), generator=g, dtype=torch.float64),
                                 0.8, 0.9) for t in names}
    return dict(importances=importances, drop_rate=0.6, eps=0.2, normalise=True, lam=0.9, seed=4)


@pytest.mark.parametrize("method", ["apl", "dp", "rms_adaptive"])
@pytest.mark.parametrize("case", ["llama-bf16-sharded", "bert-fp16-sharded"])
def test_every_planned_method_streams_like_in_memory(families, tmp_path, case, method):
    """One plan, two sources: the folders (streamed, two passes for DP) and the state dicts give the same
    config, so the merges are equal bit for bit; and the plan did move the rates (not the plain method)."""
    from merging_helpers.methods import PLANNED
    base_dir, expert_dirs = families[case]
    base_sd = load_state_dict(base_dir)
    experts = {"a": load_state_dict(expert_dirs[0]), "b": load_state_dict(expert_dirs[1])}
    options = _planned_options(method, base_sd, list(experts))
    ref = merge_state_dicts(base_sd, experts, method, progress=False, **options)
    out = merge_folders(base_dir, dict(zip("ab", expert_dirs)), tmp_path / "o", method, progress=False,
                        prefetch_bytes=4096, chunk_elems=256, **options)
    merged = load_state_dict(out)
    assert all(torch.equal(merged[n], ref[n]) for n in base_sd)
    plain = {"apl": dict(drop_rate=0.6), "dp": dict(drop_rate=0.7), "rms_adaptive": dict(drop_rate=0.6)}[method]
    record = PLANNED[method]
    flat = merge_state_dicts(base_sd, experts, "magnitude" if record.drop == "magnitude" else "dare_linear",
                             progress=False, seed=options.get("seed", 0), **plain)
    assert any(not torch.equal(flat[n], ref[n]) for n in base_sd)


@pytest.mark.parametrize("kw, error, match", [
    (dict(p_default=1.0), ValueError, r"p_default must be in \[0, 1\)"),
    (dict(p_default=0.5, drop_scale=-1), ValueError, "drop_scale .* must be >= 0"),
    (dict(p_default=0.5, cv_threshold=0), ValueError, "CV threshold must be > 0"),
    (dict(drop_scale=0.1), TypeError, "needs p_default"),
    (dict(p_default=0.5, density=0.3), TypeError, r"unknown option\(s\) \['density'\]"),
])
def test_rms_adaptive_bad_options_fail_before_reading(families, tmp_path, kw, error, match, monkeypatch):
    base_dir, expert_dirs = families["llama-fp32-single"]
    monkeypatch.setattr(streaming.FolderSource, "triples", lambda *a, **k: pytest.fail("read before checking"))
    with pytest.raises(error, match=match):
        merge_folders(base_dir, expert_dirs, tmp_path / "out", "rms_adaptive", progress=False, **kw)


@pytest.mark.parametrize("method, kw, error, match", [
    ("dp", dict(), TypeError, "dp needs alpha"),
    ("dp", dict(alpha=0.5, eq2_mean="block"), ValueError, "eq2_mean must be one of"),
    ("apl", dict(drop_rate=0.5, eps=0.1), TypeError, r"apl needs \['importances'\]"),
    ("apl", dict(importances=[None, None], drop_rate=0.9, eps=0.2), ValueError, r"drop rates λ ± ε must lie in"),
])
def test_planned_methods_bad_options_fail_before_reading(families, tmp_path, method, kw, error, match, monkeypatch):
    base_dir, expert_dirs = families["llama-fp32-single"]
    monkeypatch.setattr(streaming.FolderSource, "triples", lambda *a, **k: pytest.fail("read before checking"))
    with pytest.raises(error, match=match):
        merge_folders(base_dir, expert_dirs, tmp_path / "out", method, progress=False, **kw)
    assert not (tmp_path / "out").exists()


def test_device_meta_is_refused_before_any_work(families, tmp_path):
    base_dir, expert_dirs = families["llama-fp32-single"]
    with pytest.raises(ValueError, match=r"device='meta' holds no data"):
        merge_folders(base_dir, expert_dirs, tmp_path / "o", "ties", density=0.3, device="meta", progress=False)
    assert not (tmp_path / "o").exists()
