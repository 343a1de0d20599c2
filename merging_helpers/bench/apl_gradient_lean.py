#!/usr/bin/env python
"""APL's gradient importance (chapter 5): the plain backward pass vs the memory-lean mode, in one run.

    python -m merging_helpers.bench.apl_gradient_lean --shape llama-300m           # CPU, float32, 2 tasks
    python -m merging_helpers.bench.apl_gradient_lean --shape zoo --tasks 5        # the zoo's BERT encoder, 5 experts
    python -m merging_helpers.bench.apl_gradient_lean --shape llama2-7b --tasks 6  # a GPU, bf16

1. writes a randomly initialised Llama of the chosen shape and ``--experts`` experts (base +
   seeded noise, σ = 1e-3) as safetensors folders under ``--workdir`` (a temporary folder by
   default); the ``--tasks`` tasks (each its own random prompts) cycle over them, so that a 7B run
   needs two 13.5 GB folders, not seven. ``--shape zoo`` uses the zoo's own folders instead
   (base + the first ``--tasks`` experts, ``--shots`` examples per label of each task's train split,
   each read by its expert's head);
2. runs each mode in its own process, so that each peak is its own:
   * ``plain``: the whole model on the device, one backward pass per task, Δ·g per partition
     (Δ read one tensor at a time) — what :func:`merging_helpers.taylor.gradient_importances` does;
   * ``lean``: :func:`merging_helpers.fast.lean_importance.lean_gradient_importances`, one block
     in memory, all tasks in one sweep;
3. prints, side by side: seconds, peak memory (the device's peak allocation on a GPU, the
   process's peak resident memory on the CPU, including the interpreter and libraries), and the largest relative difference of the two modes'
   layer-level sums.

Goals (issue #12): the 7B shape, 6 tasks × 5 shots × 128 tokens, ≤ 30 s on one H100/H200 in the
plain mode; the lean mode under 15 GB peak and at most 3× the plain mode's time.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from merging_helpers.bench import module_command
from merging_helpers.fast.checkpoints import list_tensors

SHAPES = {  # hidden, intermediate, layers, heads, vocab
    "tiny": (64, 172, 4, 4, 500),
    "llama-300m": (1024, 2816, 20, 16, 32000),
    "llama2-7b": (4096, 11008, 32, 32, 32000),
    "zoo": None,  # the zoo's own encoder and experts (all-MiniLM-L6-v2, 22.7M parameters)
}


def write_family(shape: str, experts: int, workdir: Path, dtype: torch.dtype, device: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM
    from merging_helpers.fast.checkpoints import save_state_dict
    hidden, inter, layers, heads, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        base = {n: p.detach().to(dtype) for n, p in LlamaForCausalLM(config).state_dict().items()}
    folders = {"base": str(save_state_dict(base, workdir / "base", "5GB", config=config.to_dict(), overwrite=True))}
    for e in range(experts):
        g = torch.Generator(device=device).manual_seed(1000 + e)
        expert = {n: (b.float() + 1e-3 * torch.randn(b.shape, generator=g, device=device)).to(dtype) for n, b in base.items()}
        folders[f"expert{e}"] = str(save_state_dict(expert, workdir / f"expert{e}", "5GB", config=config.to_dict(),
                                                    overwrite=True))
        del expert
    return folders


def prompts(tasks: int, shots: int, tokens: int, vocab: int) -> dict:
    out = {}
    for t in range(tasks):
        g = torch.Generator().manual_seed(t)
        out[f"task{t}"] = (torch.randint(0, vocab, (shots, tokens), generator=g), torch.randint(0, vocab, (shots,), generator=g))
    return out


def run_plain(folders, asked, device, dtype):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folders["base"], dtype=dtype).to(device)

    def loss(ids, answers):
        logits = model(ids.to(device), logits_to_keep=1).logits[:, -1].float()
        return torch.nn.functional.cross_entropy(logits, answers.to(device))
    return {task: layer_sums(model, lambda: loss(*prompt), folders["experts"][task], device)
            for task, prompt in asked.items()}


def layer_sums(model, loss, expert_folder, device) -> torch.Tensor:
    """The plain mode for one task: backward through the whole model, then Σ Δ·g per block
    (Δ read one tensor at a time from the expert's folder)."""
    from merging_helpers import apl
    from merging_helpers.fast.checkpoints import CheckpointFolder
    groups = apl.groups({n: p.shape for n, p in model.named_parameters()}, "layer")
    position = {n: i for i, g in enumerate(groups.values()) for n in g}
    model.zero_grad(set_to_none=True)
    loss().backward()
    sums = torch.zeros(len(groups), dtype=torch.float64)
    with CheckpointFolder(expert_folder) as expert:
        for n, p in model.named_parameters():
            if n in position:
                delta = expert.read(n).to(device, torch.float32) - p.detach().float()
                sums[position[n]] += float((delta * p.grad.float()).sum())
    return sums


def zoo_family(tasks: int) -> dict:
    from merging_helpers.zoo import load_zoo
    zoo = load_zoo(progress=False)
    names = zoo.task_names[:tasks]
    return {"base": str(zoo.base_dir), "experts": {t: str(zoo.expert_dir(t)) for t in names},
            "root": str(zoo.root), "max_length": zoo.config.max_length}


def zoo_shots(folders, shots: int) -> dict:
    from merging_helpers.tasks import Task, few_shot
    root = Path(folders["root"])
    return {t: few_shot(Task.from_json(json.loads((root / "tasks" / t / "task.json").read_text())), shots, seed=0)
            for t in folders["experts"]}


def zoo_heads(folders) -> dict:
    from safetensors.torch import load_file
    return {t: load_file(str(Path(folder) / "head.safetensors")) for t, folder in folders["experts"].items()}


def run_plain_zoo(folders, asked, device, dtype):
    """The whole encoder and its gradient in memory, one backward pass per task."""
    from merging_helpers.zoo import load_encoder, load_tokenizer, mean_pool
    model, tokenizer = load_encoder(Path(folders["base"]), device), load_tokenizer(Path(folders["base"]))
    heads = zoo_heads(folders)

    def loss(task, shots):
        enc = tokenizer([t for t, _ in shots], padding=True, truncation=True, max_length=folders["max_length"],
                        return_tensors="pt").to(device)
        pooled = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
        logits = pooled @ heads[task]["weight"].to(device).T + heads[task]["bias"].to(device)
        return torch.nn.functional.cross_entropy(logits, torch.tensor([y for _, y in shots], device=device))
    return {task: layer_sums(model, lambda: loss(task, shots), folders["experts"][task], device)
            for task, shots in asked.items()}


def run_lean_zoo(folders, asked, device, dtype):
    from merging_helpers.fast.lean_importance import lean_encoder_importances
    result = lean_encoder_importances(folders["base"], folders["experts"], asked, zoo_heads(folders), ("layer",),
                                      max_length=folders["max_length"], device=device, signed=True, progress=False)
    return {t: result[t]["layer"].values for t in asked}


def run_lean(folders, asked, device, dtype):
    from merging_helpers.fast.lean_importance import lean_gradient_importances
    result = lean_gradient_importances(folders["base"], {t: folders["experts"][t] for t in asked}, asked, ("layer",),
                                       device=device, dtype=dtype, signed=True, progress=False)
    return {t: result[t]["layer"].values for t in asked}


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM (Linux; ru_maxrss would include the parent's
    peak, since it survives fork and exec), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(args):
    # the libraries both modes use are imported before the baseline is read: they are not the mode's memory
    import transformers.masking_utils  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import merging_helpers.fast.lean_importance  # noqa: F401
    import merging_helpers.zoo  # noqa: F401
    spec = json.loads(args.child)
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    zoo = spec["shape"] == "zoo"
    asked = zoo_shots(spec["folders"], spec["shots"]) if zoo else prompts(spec["tasks"], spec["shots"], spec["tokens"],
                                                                           SHAPES[spec["shape"]][4])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    baseline = rss_bytes()
    run = {("plain", False): run_plain, ("lean", False): run_lean, ("plain", True): run_plain_zoo,
           ("lean", True): run_lean_zoo}[spec["mode"], zoo]
    start = time.perf_counter()
    sums = run(spec["folders"], asked, device, dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss_bytes()
    torch.save({t: s.double().cpu() for t, s in sums.items()}, spec["out"])
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "above_baseline_bytes": peak - baseline}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--shape", choices=SHAPES, default="llama-300m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--experts", type=int, default=2, help="distinct expert folders; the tasks cycle over them")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=["plain", "lean"], choices=["plain", "lean"])
    parser.add_argument("--workdir", default=None, help="where the folders are written (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (chapter 5 reads it)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        if args.shape == "zoo":
            dtype = torch.float32
            folders = zoo_family(args.tasks)
        else:
            folders = write_family(args.shape, min(args.experts, args.tasks), workdir, dtype, args.device)
            written = [k for k in folders if k.startswith("expert")]
            folders["experts"] = {f"task{t}": folders[written[t % len(written)]] for t in range(args.tasks)}
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        params = sum(info.numel for info in list_tensors(folders["base"]).values())
        prompt = f"{args.shots} shots per label" if args.shape == "zoo" else f"{args.shots} shots × {args.tokens} tokens"
        print(f"{args.shape}: {params / 1e9:.3f}B parameters, {dtype}, {args.device}; {len(folders['experts'])} tasks × "
              f"{prompt}; folders ready in {time.perf_counter() - start:.0f} s", flush=True)
        results, sums = {}, {}
        for mode in args.modes:
            spec = {"mode": mode, "device": args.device, "dtype": str(dtype).split(".")[1], "folders": folders,
                    "tasks": args.tasks, "shots": args.shots, "tokens": args.tokens, "shape": args.shape,
                    "out": str(workdir / f"{mode}.pt")}
            command, env = module_command("merging_helpers.bench.apl_gradient_lean", "--child", json.dumps(spec))
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                print(done.stderr[-3000:])
                raise SystemExit(f"the {mode} run failed")
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            sums[mode] = torch.load(workdir / f"{mode}.pt", weights_only=True)  # our own file, tensors only
        gpu = args.device.startswith("cuda")
        memory = "GPU peak allocated" if gpu else "peak RSS"
        print(f"\n{'mode':<8}{'seconds':>10}{memory + ' (GB)':>24}" + ("" if gpu else f"{'above libraries (GB)':>24}"))
        for mode, r in results.items():
            print(f"{mode:<8}{r['seconds']:>10.1f}{r['peak_bytes'] / 1e9:>24.3f}"
                  + ("" if gpu else f"{r['above_baseline_bytes'] / 1e9:>24.3f}"))
        if len(results) == 2:
            worst = max(float(((sums["lean"][t] - sums["plain"][t]).abs() / sums["plain"][t].abs().clamp_min(1e-12)).max())
                        for t in sums["plain"])
            ratio = results["lean"]["seconds"] / results["plain"]["seconds"]
            print(f"\nlean / plain time: {ratio:.2f}× (goal ≤ 3×); largest relative difference of the layer sums: {worst:.1e}")
            if args.json:
                from merging_helpers.results import write_json_atomically
                write_json_atomically(Path(args.json), {"shape": args.shape, "device": args.device,
                                                        "parameters": params, "tasks": len(folders["experts"]),
                                                        "modes": results, "largest_relative_difference": worst})
            if args.shape == "llama2-7b":
                print(f"goals: plain ≤ 30 s for 6 tasks; lean peak < 15 GB (measured {results['lean']['peak_bytes'] / 1e9:.1f} GB)")


if __name__ == "__main__":
    main()
