#!/usr/bin/env python
"""APL tracing speed on the zoo (chapter 4): batched interventions vs a naive loop.

    python benchmarks/apl_tracing.py                 # all five experts, k = 5 shots
    python benchmarks/apl_tracing.py --experts news  # one expert, quicker

What it does, in one run, on the zoo's real encoder and experts:

1. hidden-state tracing (384 corrupted runs per expert) the way a first script would do
   it: build each corrupted state dict, load it into the model, run the few-shot set;
2. the same with :func:`merging_helpers.apl.trace` (the corrupted runs stacked and
   evaluated ``--chunk`` at a time through the scorer's batched path);
3. the whole importance computation the chapter needs: model, layer and hidden-state
   levels for every expert;

and prints the times side by side with the ratio, the largest difference between the
two hidden-state results (they must agree), and where the time goes: the encoder products
the corrupted runs compute, the rate each path reaches, this CPU's rate on one large float32
product, and so the most any exact batching could gain over the naive loop here.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm.auto import tqdm

sys.path.insert(0, ".")
from merging_helpers import apl
from merging_helpers.evaluation import Evaluator, mean_true_label_probability
from merging_helpers.tasks import few_shot
from merging_helpers.zoo import load_zoo


def naive_hidden_trace(scorer, base, expert, task, shots):
    """One load_state_dict and one forward pass per hidden state: what the batched path replaces."""
    batches = scorer.few_shot_batches(shots)
    scorer.load(expert)
    logits, labels = scorer.logits(task, None, batches)
    clean = mean_true_label_probability(logits, labels)
    out = []
    for group in tqdm(apl.groups(expert, "hidden").values(), desc=f"naive {task}", leave=False):
        corrupted = dict(expert)
        corrupted.update(apl.corrupt(expert, base, group))
        scorer.load(corrupted)
        logits, labels = scorer.logits(task, None, batches)
        out.append(mean_true_label_probability(logits, labels) - clean)
    return torch.tensor(out, dtype=torch.float64)


def forward_flops(scorer, shots) -> float:
    """Multiply-adds ×2 of one forward pass of the encoder over a few-shot set, padding included
    (what the CPU computes): the blocks' six linear maps and the two attention products."""
    c = scorer.encoder.config
    d, ffn, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    total = 0.0
    for ids, _, _ in scorer.few_shot_batches(shots):
        b, t = ids.shape
        total += layers * (2 * b * t * (4 * d * d + 2 * d * ffn) + 4 * b * t * t * d)
    return total


def gemm_peak_gflops(scorer, repeats: int = 20) -> float:
    """This CPU's float32 rate on the encoder's largest product (FFN up) with many rows: about the
    most any exact way of running the corrupted runs can reach."""
    c = scorer.encoder.config
    x, w = torch.randn(8192, c.hidden_size), torch.randn(c.intermediate_size, c.hidden_size)
    x @ w.T
    start = time.perf_counter()
    for _ in range(repeats):
        x @ w.T
    return 2 * 8192 * c.hidden_size * c.intermediate_size * repeats / (time.perf_counter() - start) / 1e9


def load_and_forward_ms(scorer, base, expert, task, shots, repeats: int = 10) -> tuple[float, float]:
    """One naive corrupted run split in two: building + loading the state dict, and the forward pass."""
    group = next(iter(apl.groups(expert, "hidden").values()))
    batches = scorer.few_shot_batches(shots)
    start = time.perf_counter()
    for _ in range(repeats):
        scorer.load({**expert, **apl.corrupt(expert, base, group)})
    load = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        scorer.logits(task, None, batches)
    return 1e3 * load, 1e3 * (time.perf_counter() - start) / repeats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--experts", nargs="*", default=None, help="experts to trace (default: all)")
    parser.add_argument("--shots", type=int, default=5, help="few-shot examples per label (k)")
    parser.add_argument("--chunk", type=int, default=32, help="corrupted runs per batched forward pass")
    parser.add_argument("--skip-naive", action="store_true", help="time the batched path only")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    zoo = load_zoo(progress=False)
    scorer = Evaluator(zoo, device="cpu")
    names = args.experts or zoo.task_names
    shots = {t: few_shot(zoo.tasks[t], args.shots, seed=0) for t in names}
    print(f"APL tracing on the zoo: {len(names)} experts, k = {args.shots} shots per label, "
          f"{torch.get_num_threads()} CPU threads, chunk {args.chunk}")

    naive_s, naive = None, {}
    if not args.skip_naive:
        start = time.perf_counter()
        for t in names:
            naive[t] = naive_hidden_trace(scorer, zoo.base, zoo.experts[t], t, shots[t])
        naive_s = time.perf_counter() - start

    start = time.perf_counter()
    batched = {t: apl.trace(scorer, zoo.base, zoo.experts[t], t, shots[t], "hidden", chunk=args.chunk, progress=True)
               for t in names}
    batched_s = time.perf_counter() - start

    start = time.perf_counter()
    for t in names:
        for level in apl.LEVELS:
            apl.trace(scorer, zoo.base, zoo.experts[t], t, shots[t], level, chunk=args.chunk)
    all_s = time.perf_counter() - start

    print(f"\n{'what':52s} {'seconds':>9s}")
    if naive_s is not None:
        print(f"{'hidden-state tracing, naive loop (load + forward)':52s} {naive_s:9.1f}")
    print(f"{'hidden-state tracing, batched (apl.trace)':52s} {batched_s:9.1f}")
    if naive_s is not None:
        print(f"{'speed-up of the batched path':52s} {naive_s / batched_s:8.1f}x   (goal >= 10x)")
        diff = max(float((naive[t] - batched[t].values).abs().max()) for t in names)
        print(f"{'largest |difference| between the two results':52s} {diff:9.2e}")
    print(f"{'all levels (model, layer, hidden), all experts':52s} {all_s:9.1f}   (goal <= 60 s)")

    # Where the time goes: a corrupted run is a forward pass of the encoder, and the CPU's
    # float32 products bound how fast any exact batching of those passes can be.
    runs = {t: len(apl.groups(zoo.experts[t], "hidden")) for t in names}
    flops = sum(forward_flops(scorer, shots[t]) * runs[t] for t in names)
    peak = gemm_peak_gflops(scorer)
    load_ms, forward_ms = load_and_forward_ms(scorer, zoo.base, zoo.experts[names[0]], names[0], shots[names[0]])
    print(f"\nwhere the time goes ({sum(runs.values())} corrupted runs, {flops / 1e9:.0f} GFLOP of encoder products):")
    if naive_s is not None:
        print(f"{'naive loop: GFLOP/s':52s} {flops / naive_s / 1e9:9.1f}")
    print(f"{'batched: GFLOP/s':52s} {flops / batched_s / 1e9:9.1f}")
    print(f"{'this CPU, one large float32 product: GFLOP/s':52s} {peak:9.1f}")
    print(f"{'one naive run of ' + names[0] + ': load state dict / forward (ms)':52s} {load_ms:5.1f} / {forward_ms:.1f}")
    if naive_s is not None:
        print(f"{'bound on any exact batched path (all products at peak)':52s} {naive_s / (flops / peak / 1e9):8.1f}x")


if __name__ == "__main__":
    main()
