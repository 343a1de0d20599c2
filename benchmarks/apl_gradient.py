#!/usr/bin/env python
"""APL importance on the zoo (chapter 5): causal tracing (chapter 4, batched) vs the gradient
(Taylor) approximation, all three levels, every expert, in one run.

    python benchmarks/apl_gradient.py                 # all five experts, k = 5 shots
    python benchmarks/apl_gradient.py --experts news  # one expert, quicker

Prints, per expert, the seconds of each way and the speed-up, and how well the two agree
(Spearman rank correlation of the partitions, per level: the gradient importance is meant
to rank partitions as the causal one does, not to equal it).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, ".")
from merging_helpers import apl, taylor
from merging_helpers.evaluation import Evaluator
from merging_helpers.tasks import few_shot
from merging_helpers.zoo import load_zoo


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = apl.average_ranks(a), apl.average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--experts", nargs="*", default=None, help="experts (default: all)")
    parser.add_argument("--shots", type=int, default=5, help="few-shot examples per label (k)")
    parser.add_argument("--chunk", type=int, default=64, help="corrupted runs per batched forward pass")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    zoo = load_zoo(progress=False)
    scorer = Evaluator(zoo)
    experts = args.experts or zoo.task_names
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, k = {args.shots} shots per label")
    print(f"{'expert':<10} {'causal s':>9} {'gradient s':>11} {'speed-up':>9}   Spearman ρ (model: sign agrees)")
    totals = [0.0, 0.0]
    for task in experts:
        shots = few_shot(zoo.tasks[task], args.shots, seed=0)
        scorer.true_label_probability(zoo.experts[task], task, shots)  # tokenize once, outside the timing
        start = time.perf_counter()
        causal = {lv: apl.trace(scorer, zoo.base, zoo.experts[task], task, shots, lv, chunk=args.chunk)
                  for lv in apl.LEVELS}
        middle = time.perf_counter()
        gradient = taylor.gradient_importances(scorer, zoo.base, zoo.experts[task], task, shots, signed=True)
        end = time.perf_counter()
        totals[0] += middle - start
        totals[1] += end - middle
        agree = {"model": "yes" if float(causal["model"].values[0]) * float(gradient["model"].values[0]) > 0 else "no"}
        agree |= {lv: f"{spearman(causal[lv].values, gradient[lv].values):+.2f}" for lv in ("layer", "hidden")}
        print(f"{task:<10} {middle - start:>9.1f} {end - middle:>11.2f} {(middle - start) / (end - middle):>8.0f}×   "
              + ", ".join(f"{lv} {v}" for lv, v in agree.items()))
    print(f"{'all':<10} {totals[0]:>9.1f} {totals[1]:>11.2f} {totals[0] / totals[1]:>8.0f}×")
    print("(signed gradient importance Σ Δ·g against the causal P* − P: both negative where removing a partition "
          "hurts; APL's |Σ Δ·g| discards that sign)")


if __name__ == "__main__":
    main()
