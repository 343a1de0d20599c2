#!/usr/bin/env python
"""Merge speed: merging_helpers.fast.streaming.merge_folders vs mergekit, on the same files (chapter 7, appendix).

    pip install -r requirements-bench.txt          # mergekit==0.1.5, psutil
    python -m merging_helpers.bench.merge_speed --shape tinyllama    # (or: python benchmarks/merge_speed.py)
    python -m merging_helpers.bench.merge_speed --shape tiny --tools ours   # quick check
    python -m merging_helpers.bench.merge_speed --tools ours --methods dare_ties,rms_adaptive   # chapter 7's cost
    python -m merging_helpers.bench.merge_speed --tools ours,ours-direct,mergekit   # both of our write modes

What it does, in one run:

1. builds (once, cached in ``--workdir``, default ./bench_out) a synthetic
   Llama-shaped family: base + 3 experts, bf16 by default, with ``config.json``
   (``LlamaForCausalLM``, so mergekit recognises it).  Base weights ~ N(0, 0.02)
   (norm weights ~ 1); expert deltas ~ N(0, σ) with σ = 0.002 × a per-tensor
   log-normal factor × a per-expert scale (1.0, 0.7, 1.4), and heavier tails (2 % of
   the entries ×5);
2. measures the machine: cold-read speed of the base's files (page cache dropped
   when running as root) and memcpy speed;
3. runs TIES and DARE-TIES with ours (``merge_folders``) and with mergekit
   (``mergekit-yaml``, CPU), each in its own subprocess, measuring wall time and
   peak RSS (``getrusage(RUSAGE_CHILDREN)`` of a wrapper process, and psutil polling
   of the process tree); by default the page cache is dropped before every run
   (``--cache cold``), so every tool reads its inputs from disk;
4. prints a table (tool, method, wall s, input GB/s, peak RSS GB, speedup) and checks
   that our TIES output agrees with mergekit's on a few tensors.

Our merges use mergekit's conventions where the engine has them: TIES elects the
sign on the weighted deltas and divides by the sum of the agreeing weights
(``weighted_election=True``; with weights 1 this equals the paper and peft);
DARE-TIES sums the agreeing deltas (mergekit's ``normalize: false``).  One
difference is kept on purpose: our DARE rescale is the paper's 1/(1-p), mergekit's
is L1-norm matching (two extra reductions per expert and tensor); ``--dare-rescale
l1`` runs ours with L1 too (not fusable yet: see streaming's module notes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from merging_helpers.bench import module_command


SHAPES = {
    # name: hidden, layers, intermediate, heads, kv heads, vocab
    "tiny": (256, 8, 688, 8, 4, 8000),          # ~10M parameters
    "small": (768, 12, 2048, 12, 4, 32000),     # ~124M
    "300m": (1024, 24, 2816, 16, 8, 32000),     # ~350M: the appendix of chapter 8
    "tinyllama": (2048, 22, 5632, 32, 4, 32000),  # TinyLlama 1.1B
    "7b": (4096, 32, 11008, 32, 32, 32000),     # Llama-2 7B
}
EXPERT_SCALES = (1.0, 0.7, 1.4, 0.85, 1.2, 0.6, 1.1, 0.9)


# --------------------------------------------------------------------------- model family


def llama_config(shape: str, dtype: str) -> dict:
    from transformers import LlamaConfig

    h, n_layers, inter, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    d["torch_dtype"] = d["dtype"] = dtype
    return d


def llama_specs(shape: str):
    """(name, shape) of every tensor of a LlamaForCausalLM, in HF order."""
    h, n_layers, inter, heads, kv, vocab = SHAPES[shape]
    hd = h // heads
    specs = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (heads * hd, h)),
            (p + "self_attn.k_proj.weight", (kv * hd, h)),
            (p + "self_attn.v_proj.weight", (kv * hd, h)),
            (p + "self_attn.o_proj.weight", (h, heads * hd)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return specs


def build_family(workdir: Path, shape: str, dtype_name: str, n_experts: int,
                 device: str = "cpu") -> tuple[Path, list[Path]]:
    """Build (once) the synthetic family; ``device="cuda"`` draws it on the GPU, ~10x
    faster, with other random numbers (so it gets its own folder)."""
    import torch

    from merging_helpers.fast.checkpoints import ShardedSafetensorsWriter

    fam = workdir / (f"family-{shape}-{dtype_name}-T{n_experts}" + ("" if device == "cpu" else f"-{device}"))
    names = ["base"] + [f"expert{t}" for t in range(n_experts)]
    done = fam / "done.json"
    if done.is_file():
        return fam / "base", [fam / n for n in names[1:]]
    dtype = getattr(torch, dtype_name)
    specs = llama_specs(shape)
    n_params = sum(math.prod(s) for _, s in specs)
    print(f"building {fam.name}: {n_params / 1e6:.0f}M parameters x {len(names)} models "
          f"({n_params * torch.empty((), dtype=dtype).element_size() * len(names) / 1e9:.1f} GB)", flush=True)
    if fam.exists():
        shutil.rmtree(fam)
    fam.mkdir(parents=True)
    cfg = json.dumps(llama_config(shape, dtype_name), indent=2) + "\n"
    t0 = time.time()
    writers = [ShardedSafetensorsWriter(fam / n, [(k, dtype, s) for k, s in specs], "1GB",
                                        extra_files={"config.json": cfg}) for n in names]
    for w in writers:
        w.__enter__()
    try:
        for i, (name, shp) in enumerate(specs):
            g = torch.Generator(device).manual_seed(1000 + i)
            if name.endswith("norm.weight"):
                base = 1.0 + 0.05 * torch.randn(shp, generator=g, device=device)
            else:
                base = 0.02 * torch.randn(shp, generator=g, device=device)
            writers[0].write(name, base.to(dtype).cpu())
            sigma = 0.002 * math.exp(0.3 * torch.randn((), generator=g, device=device).item())  # per-tensor scale
            for t in range(n_experts):
                delta = torch.randn(shp, generator=g, device=device).mul_(sigma * EXPERT_SCALES[t % len(EXPERT_SCALES)])
                delta[torch.rand(shp, generator=g, device=device) < 0.02] *= 5.0  # heavier tails
                writers[t + 1].write(name, (base + delta).to(dtype).cpu())
                del delta
            del base
    except BaseException as e:
        for w in writers:
            w.__exit__(type(e), e, None)
        raise
    for w in writers:
        w.__exit__(None, None, None)
    done.write_text(json.dumps({"shape": shape, "dtype": dtype_name, "experts": n_experts,
                                "params": n_params, "build_s": round(time.time() - t0, 1)}) + "\n")
    print(f"built in {time.time() - t0:.0f} s", flush=True)
    return fam / "base", [fam / n for n in names[1:]]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- machine


def drop_page_cache() -> bool:
    """sync; echo 3 > /proc/sys/vm/drop_caches (root only). True if it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_speed(files, block=16 << 20) -> float:
    """GB/s of reading ``files`` start to end."""
    buf = bytearray(block)
    view = memoryview(buf)
    total, t0 = 0, time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total / (time.perf_counter() - t0) / 1e9


def memcpy_speed(nbytes=1 << 30) -> float:
    import torch

    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(5))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- measuring


def measure(cmd: list[str], log: Path, env=None) -> dict:
    """Run ``cmd`` through the ``_measure`` wrapper; return wall s and peak RSS bytes."""
    result = log.with_suffix(".json")
    wrapper, child_env = module_command("merging_helpers.bench.merge_speed", "_measure", "--result", str(result), "--", *cmd)
    with open(log, "w") as f:
        rc = subprocess.call(wrapper, stdout=f, stderr=subprocess.STDOUT, env={**child_env, **(env or {})})
    if rc != 0 or not result.is_file():
        tail = log.read_text()[-3000:] if log.is_file() else ""
        raise RuntimeError(f"command failed (rc={rc}): {' '.join(cmd)}\n{tail}")
    return json.loads(result.read_text())


def _measure_main(args) -> int:
    """Wrapper process: runs the command, polls the tree's RSS, reports rusage of its child."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(args.cmd)
    peak_tree = 0
    stop = threading.Event()

    def poll():
        nonlocal peak_tree
        try:
            p = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak_tree = max(peak_tree, rss)
            except psutil.Error:
                pass
            stop.wait(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    Path(args.result).write_text(json.dumps({
        "rc": rc, "wall_s": wall, "maxrss_bytes": ru.ru_maxrss * 1024, "peak_tree_rss_bytes": peak_tree,
        "user_s": ru.ru_utime, "sys_s": ru.ru_stime}))
    return rc


def planned_options(method: str, base: str, n_experts: int, density: float) -> dict:
    """The options of a planned method at the same mean drop rate as DARE-TIES's (1 − density): RMS-adaptive
    with chapter 7's λ = 0.1/σ; DP with α = 1 − density; APL with layer importances drawn at random (their
    cost is the tracing's, timed in chapter 4; the merge's cost does not depend on their values)."""
    if method == "rms_adaptive":
        return dict(p_default=1.0 - density, drop_scale=0.1, scale="std", seed=0)
    if method == "dp":
        return dict(alpha=1.0 - density)
    if method == "apl":
        import torch

        from merging_helpers.apl import Importance
        layers = json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"]
        keys = [f"layer.{i}" for i in range(layers)]
        g = torch.Generator().manual_seed(0)
        importances = [Importance(f"expert {t}", "layer", keys, -torch.rand(layers, generator=g, dtype=torch.float64),
                                  0.5, 0.5) for t in range(n_experts)]
        p = 1.0 - density
        return dict(importances=importances, drop_rate=p, eps=min(p, 1 - p) / 2, normalise=True, seed=0)
    raise ValueError(f"{method!r} is not a planned method")


def _ours_main(args) -> int:
    """Run merge_folders (in the measured subprocess)."""
    from merging_helpers.fast.streaming import merge_folders
    from merging_helpers.methods import PLANNED

    kw = dict(density=args.density, weighted_election=True, seed=0)
    if args.method in PLANNED:
        kw = planned_options(args.method, args.base, len(args.experts), args.density)
    if args.method.startswith("dare") and args.dare_rescale != "auto":
        kw["rescale"] = args.dare_rescale  # "l1" = mergekit's default (not fused: merge_tensor per tensor)
    if args.workers:
        kw["workers"] = args.workers
    merge_folders(args.base, args.experts, args.out, args.method, device=args.device, max_shard_size="1GB",
                  progress=args.progress, overwrite=True, kernel=args.kernel, direct_io=args.direct,
                  fsync=args.fsync, **kw)
    return 0


def mergekit_config(method: str, base: Path, experts: list[Path], density: float, dtype: str) -> str:
    models = "".join(f"  - model: {e}\n    parameters:\n      density: {density}\n      weight: 1.0\n"
                     for e in experts)
    return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}"
            f"dtype: {dtype}\n")


# --------------------------------------------------------------------------- agreement


def compare_outputs(ours: Path, theirs: Path, base: Path, names: list[str], dtype) -> list[dict]:
    import torch

    from merging_helpers.fast.checkpoints import CheckpointFolder

    rows = []
    with CheckpointFolder(ours) as a, CheckpointFolder(theirs) as b, CheckpointFolder(base) as c:
        for name in names:
            x, y, z = a.read(name).float(), b.read(name).float(), c.read(name).float()
            diff = (x - y).abs()
            dx, dy = x - z, y - z
            # one unit in the last place of the stored dtype at the larger of the two values
            _, exp = torch.frexp(torch.maximum(x.abs(), y.abs()))
            ulp = torch.ldexp(torch.full_like(x, torch.finfo(dtype).eps), exp - 1)
            rows.append({
                "tensor": name, "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
                "frac_differ": (diff > 0).float().mean().item(),
                "frac_differ_gt_1ulp": (diff > ulp).float().mean().item(),
                "mean_abs_delta_ours": dx.abs().mean().item(), "mean_abs_delta_mergekit": dy.abs().mean().item(),
                "frac_changed_ours": (dx != 0).float().mean().item(),
                "frac_changed_mergekit": (dy != 0).float().mean().item(),
            })
    return rows


# --------------------------------------------------------------------------- main


def _ours_args(argv):
    p = argparse.ArgumentParser()
    p.add_argument("_ours")
    p.add_argument("--base", required=True)
    p.add_argument("--experts", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--density", type=float, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--dare-rescale", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--kernel", default="auto")
    p.add_argument("--direct", action="store_true")
    p.add_argument("--fsync", action="store_true")
    return p.parse_args(argv)


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="tinyllama")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--density", type=float, default=0.3)
    p.add_argument("--methods", default="ties,dare_ties",
                   help="comma list of any registry method (the planned ones, apl, dp, rms_adaptive, included)")
    p.add_argument("--tools", default="ours,mergekit",
                   help="comma list of ours, ours-direct (our merge, output with O_DIRECT), mergekit")
    p.add_argument("--device", default="cpu", help="device of our merge (cpu, cuda); mergekit gets --cuda too")
    p.add_argument("--cache", choices=["cold", "warm"], default="cold",
                   help="cold: drop the page cache before every run (root only); warm: flush earlier outputs (sync) and read "
                        "the inputs once before every run")
    p.add_argument("--dare-rescale", choices=["auto", "l1"], default="auto",
                   help="our DARE rescale: auto = 1/(1-p) (DARE paper, fused path); l1 = mergekit's L1 matching "
                        "(runs recipes.merge_tensor per tensor, ~10x slower)")
    p.add_argument("--workers", type=int, default=0, help="threads of our fused CPU path (0: torch's thread count)")
    p.add_argument("--kernel", choices=["auto", "c", "reference"], default="auto",
                   help="our fused CPU path: the compiled kernel (built before timing) or the reference engine")
    p.add_argument("--direct", action="store_true", help="our large output tensors bypass the page cache")
    p.add_argument("--fsync", action="store_true",
                   help="flush our output before moving it into place (mergekit does not; off by default)")
    p.add_argument("--build-device", default="cpu", help="where to draw the synthetic family (cuda: faster)")
    p.add_argument("--workdir", type=Path, default=Path("bench_out"))
    p.add_argument("--keep-outputs", action="store_true")
    return p.parse_args(argv)


def _describe_paths(args, tools) -> tuple[str, str]:
    """(our merge path, how the outputs are written), for the report; builds the compiled kernel now
    (once per machine), not inside a timed run."""
    from merging_helpers.fast import compiled

    kernel = "the reference engine" if args.kernel == "reference" else (
        "compiled kernel" if compiled.load() else f"the reference engine (no compiled kernel: {compiled.ERROR})")
    if args.kernel == "c" and compiled.load() is None:
        raise SystemExit(f"--kernel c: {compiled.ERROR}")
    writes = ("direct" if args.direct else "buffered") + (" + fsync" if args.fsync else ", not flushed")
    if "ours-direct" in tools:
        writes += " (ours-direct: O_DIRECT" + (" + fsync)" if args.fsync else ", not flushed)")
    path = (f"the reference engine on {args.device}" if args.device.startswith("cuda")
            else f"fused CPU path with {kernel}")
    return path, writes


def _command(tool, method, args, base, experts, out, outdir) -> list[str]:
    """The command line of one timed merge."""
    if tool in ("ours", "ours-direct"):  # ours-direct: the same merge, output written with O_DIRECT
        return module_command("merging_helpers.bench.merge_speed")[0] + [
            "_ours", "--base", str(base), "--experts", *map(str, experts), "--out", str(out), "--method", method,
            "--density", str(args.density), "--device", args.device, "--dare-rescale", args.dare_rescale,
            "--workers", str(args.workers), "--kernel", args.kernel] + [
            "--direct"] * (args.direct or tool == "ours-direct") + ["--fsync"] * args.fsync
    if tool == "mergekit":
        cfg = outdir / f"mergekit-{method}.yml"
        cfg.write_text(mergekit_config(method, base, experts, args.density, args.dtype))
        exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
        return [exe, str(cfg), str(out), "--random-seed", "0", "--out-shard-size", "1B", "--no-copy-tokenizer",
                "--no-write-model-card", "--quiet"] + ["--cuda"] * args.device.startswith("cuda")
    raise SystemExit(f"unknown tool {tool!r}")


def _timed_runs(args, methods, tools, base, experts, outdir, input_bytes) -> list[dict]:
    """Every (method, tool) merge, each in a measured child process, the page cache as ``--cache`` says."""
    from merging_helpers.methods import get_method

    results = []
    for method in methods:
        for tool in tools:
            out = outdir / f"{tool}-{method}"
            if out.exists():
                shutil.rmtree(out)
            if args.cache == "cold":
                drop_page_cache()
            else:  # the previous run's output is flushed first, so that no run pays for another's writes
                os.sync()
                read_speed([f for d in [base, *experts] for f in sorted(d.glob("*.safetensors"))])
            if tool == "mergekit" and get_method(method).mergekit is None:
                print(f"mergekit has no {method} method: skipped", flush=True)
                continue
            cmd = _command(tool, method, args, base, experts, out, outdir)
            print(f"running {tool} {method} ...", flush=True)
            load0 = os.getloadavg()[0]
            r = measure(cmd, outdir / f"{tool}-{method}.log")
            r.update(tool=tool, method=method, input_gbps=input_bytes / r["wall_s"] / 1e9,
                     peak_rss_gb=max(r["maxrss_bytes"], r["peak_tree_rss_bytes"]) / 1e9,
                     cpu_s=r["user_s"] + r["sys_s"], load_before=load0, load_after=os.getloadavg()[0])
            results.append(r)
            print(f"  {r['wall_s']:.1f} s, {r['input_gbps']:.3f} GB/s input, peak RSS {r['peak_rss_gb']:.2f} GB "
                  f"(user {r['user_s']:.0f} s, sys {r['sys_s']:.0f} s; load average {load0:.1f} -> "
                  f"{r['load_after']:.1f})", flush=True)
    return results


def _table(args, results, header: list[str]) -> str:
    """The results as a text table: our times beside mergekit's, and each planned method beside DARE-TIES."""
    ref = {r["method"]: r["wall_s"] for r in results if r["tool"] == "mergekit"}
    ref_cpu = {r["method"]: r["cpu_s"] for r in results if r["tool"] == "mergekit"}
    lines = header + ["", f"{'tool':12s} {'method':16s} {'wall s':>8s} {'input GB/s':>11s} {'peak RSS GB':>12s} "
                          f"{'speedup':>8s} {'CPU s':>8s} {'CPU speedup':>12s} {'load avg':>10s}"]
    for r in results:
        sp, sc = ref.get(r["method"]), ref_cpu.get(r["method"])
        speed = f"{sp / r['wall_s']:.1f}x" if sp else "-"
        cspeed = f"{sc / r['cpu_s']:.1f}x" if sc else "-"
        lines.append(f"{r['tool']:12s} {r['method']:16s} {r['wall_s']:8.1f} {r['input_gbps']:11.3f} "
                     f"{r['peak_rss_gb']:12.2f} {speed:>8s} {r['cpu_s']:8.1f} {cspeed:>12s} "
                     f"{r['load_before']:4.1f}->{r['load_after']:<4.1f}")
    lines.append("(speedup = mergekit's wall time / ours, same files, same run; CPU s = user + sys of the "
                 f"merge process; load avg = 1-min load of the machine before -> after, {os.cpu_count()} CPUs)")
    ours = {r["method"]: r for r in results if r["tool"] == "ours"}
    for planned in ("rms_adaptive", "dp", "apl"):  # a plan reads the model first: its cost beside DARE-TIES's
        if {"dare_ties", planned} <= set(ours):
            a, d = ours[planned], ours["dare_ties"]
            lines.append(f"{planned} / dare_ties (ours): wall {a['wall_s'] / d['wall_s']:.2f}x, "
                         f"CPU {a['cpu_s'] / d['cpu_s']:.2f}x")
    return "\n".join(lines)


WHY_TIES_DIFFERS = """
    Why our TIES and mergekit's differ (both elect the sign on the weighted sum, weights 1,
    and divide by the sum of the agreeing weights, so the rule is the same):
    1. ties at the trim threshold: a bf16 checkpoint has only ~10^4 distinct |Δ| values per
       tensor, so 0.3-2 % of the entries equal the k-th largest |Δ|. mergekit keeps
       int(density*n) entries in argsort order (arbitrary among ties), we keep
       round(density*n) with ties broken by flat index. Where one tool keeps an entry the
       other drops, the mean at that position changes by up to a whole delta: this is the
       max|diff| (~1e-2). Merging the same files with mergekit in float32 leaves only
       these (0.3-1.3 % of the entries differ, measured on --shape tiny).
    2. rounding: mergekit computes in bf16 (the delta, the sums and the mean are each
       rounded), we in float32 with one rounding at the end: 1 ulp, sometimes a few, on
       a few % of the entries ('differ' minus the tie part; '>1ulp' counts both).
    DARE-TIES: different generators draw different masks, and the rescale differs (ours
    1/(1-p), mergekit L1 matching), so only the statistics (mean |merged delta|, fraction
    changed) are comparable, not the entries."""


def _agreement(args, methods, base, outdir, report) -> None:
    """Our outputs beside mergekit's, tensor by tensor, for every method both ran (into ``report``)."""
    import torch

    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             f"model.layers.{SHAPES[args.shape][1] // 2}.mlp.down_proj.weight",
             "model.layers.0.input_layernorm.weight", "lm_head.weight"]
    for method in [m for m in methods if (outdir / f"mergekit-{m}").exists()]:
        rows = compare_outputs(outdir / f"ours-{method}", outdir / f"mergekit-{method}", base, names,
                               getattr(torch, args.dtype))
        report[f"agreement_{method}"] = rows
        print(f"\n{method}: ours vs mergekit (float32 values of the {args.dtype} outputs)")
        print(f"{'tensor':42s} {'max|diff|':>9s} {'mean|diff|':>10s} {'differ':>7s} {'>1ulp':>6s} "
              f"{'mean|Δ| ours':>12s} {'mergekit':>9s} {'changed ours':>12s} {'mergekit':>9s}")
        for r in rows:
            print(f"{r['tensor']:42s} {r['max_abs_diff']:9.2e} {r['mean_abs_diff']:10.2e} "
                  f"{r['frac_differ']:7.2%} {r['frac_differ_gt_1ulp']:6.2%} "
                  f"{r['mean_abs_delta_ours']:12.2e} {r['mean_abs_delta_mergekit']:9.2e} "
                  f"{r['frac_changed_ours']:12.2%} {r['frac_changed_mergekit']:9.2%}")
    print(textwrap.dedent(WHY_TIES_DIFFERS).rstrip())


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_measure":  # _measure --result FILE -- cmd ...
        sep = argv.index("--")
        return _measure_main(argparse.Namespace(result=argv[argv.index("--result") + 1], cmd=argv[sep + 1:]))
    if argv and argv[0] == "_ours":
        return _ours_main(_ours_args(argv))
    args = _args(argv)
    import torch

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    base, experts = build_family(workdir, args.shape, args.dtype, args.experts, args.build_device)
    model_bytes = folder_bytes(base)
    input_bytes = model_bytes * (1 + len(experts))
    methods = [m for m in args.methods.split(",") if m]
    tools = [t for t in args.tools.split(",") if t]
    print(f"family: {base.parent.name}, {model_bytes / 1e9:.2f} GB per model, input {input_bytes / 1e9:.2f} GB "
          f"per merge; disk free {free / 1e9:.0f} GB; {os.cpu_count()} CPUs; torch {torch.__version__}", flush=True)
    dropped = drop_page_cache()
    cold = read_speed(sorted(base.glob("*.safetensors")))
    mem = memcpy_speed()
    print(f"cold read {cold:.2f} GB/s ({'page cache dropped' if dropped else 'NOT dropped: not root, may be warm'}), "
          f"memcpy {mem:.1f} GB/s", flush=True)
    if args.cache == "cold" and not dropped:
        print("warning: cannot drop the page cache (not root): runs are warm", flush=True)
    path, writes = _describe_paths(args, tools)
    print(f"ours: {path}; writes {writes} (mergekit: buffered, not flushed)", flush=True)
    outdir = workdir / "out"
    outdir.mkdir(exist_ok=True)
    results = _timed_runs(args, methods, tools, base, experts, outdir, input_bytes)
    table = _table(args, results, [
        f"\nshape {args.shape} ({model_bytes / 1e9:.2f} GB/model, {args.dtype}), T={len(experts)}, "
        f"density {args.density}, device {args.device}, cache {args.cache}, {os.cpu_count()} CPUs",
        f"cold read {cold:.2f} GB/s, memcpy {mem:.1f} GB/s, input per merge {input_bytes / 1e9:.2f} GB",
        f"ours: {path}; writes {writes}; mergekit: buffered, not flushed"])
    print(table, flush=True)
    report = {"results": results, "cold_read_gbps": cold, "memcpy_gbps": mem, "table": table}
    if {"ours", "mergekit"} <= set(tools):
        _agreement(args, methods, base, outdir, report)
    (workdir / f"results-{args.shape}.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep_outputs:
        shutil.rmtree(outdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
