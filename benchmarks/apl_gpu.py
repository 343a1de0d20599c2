#!/usr/bin/env python
"""APL causal tracing at LLM scale (chapter 4): layer and hidden-state level, time per task.

    python benchmarks/apl_gpu.py                          # Llama-2-7B shape, bf16, on the GPU
    python benchmarks/apl_gpu.py --shape tiny --device cpu  # a quick check that it runs

What it does, in one run:

1. builds a randomly initialised Llama of the chosen shape on the device (bf16 on a GPU),
   and ``--tasks`` experts as base + small seeded random deltas (σ = 1e-3, one expert in
   memory at a time);
2. per task: a few-shot set of ``--shots`` random prompts of ``--tokens`` tokens, each
   with a random answer token (P_t = mean probability of the answer at the last position);
3. times :func:`merging_helpers.apl.trace` at the layer level (L corrupted runs) and at the
   hidden-state level (H runs, activation patching, ``--chunk`` hidden states per forward
   pass). ``--hidden-sample N`` traces only N evenly spaced hidden states and extrapolates
   to all H, labelled as such, to keep the command within a few minutes;
4. times the one-at-a-time loop (``naive=True``: a whole corrupted state dict per run) on a
   few hidden states of task 0 and prints the patched path's speed-up per hidden state.

The paper reports 900 s for its 5-shot APL on an A100 (Llama-2-7B, 6 tasks); the book's
goals on one H100/H200 are layer level ≤ 10 s and exhaustive hidden-state level ≤ 8 min
for 6 tasks.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, ".")
from merging_helpers import apl

NAIVE_RUNS = 8  # corrupted runs of the one-at-a-time loop timed on task 0
SHAPES = {  # (hidden, intermediate, layers, heads, vocab)
    "llama2-7b": (4096, 11008, 32, 32, 32000),
    "tiny": (64, 172, 4, 4, 500),
}


class CausalLMScorer:
    """The part of chapter 0's Scorer that APL needs, for a causal LM: P_t = mean probability
    of each prompt's answer token at its last position (logits of that position only)."""

    def __init__(self, model, device):
        self.encoder, self.device = model, torch.device(device)

    def params(self, state_dict):
        return state_dict

    def few_shot_batches(self, examples):
        return examples  # already [(ids, mask, answers)] on the device

    @torch.no_grad()
    def logits(self, task, head, batches, params):
        outs, labels = [], []
        for ids, mask, y in batches:
            out = torch.func.functional_call(self.encoder, params, (ids,), {"attention_mask": mask, "logits_to_keep": 1})
            outs.append(out.logits[:, -1].float())
            labels.append(y)
        return torch.cat(outs), torch.cat(labels)

    def true_label_probability(self, params, task, examples, head=None):
        logits, labels = self.logits(task, head, examples, params)
        return float(logits.softmax(-1).gather(1, labels[:, None]).mean())

    def true_label_probabilities(self, params, variants, task, examples, head=None, chunk=None):
        # one functional_call per variant: the replaced tensors are swapped in, nothing is copied
        return torch.tensor([self.true_label_probability({**params, **v}, task, examples) for v in variants])


def build_model(shape, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, inter, layers, heads, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=4096, torch_dtype=dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--shape", choices=SHAPES, default="llama2-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=16, help="hidden states per forward pass")
    parser.add_argument("--hidden-sample", type=int, default=None,
                        help="trace only this many hidden states and extrapolate (default: all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    start = time.perf_counter()
    model = build_model(args.shape, device, dtype)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    sync(device)
    hidden, _, layers, _, vocab = SHAPES[args.shape]
    print(f"{args.shape}: {sum(p.numel() for p in base.values()) / 1e9:.2f}B parameters, {dtype}, {device}; "
          f"built in {time.perf_counter() - start:.1f} s; {args.tasks} tasks × {args.shots} shots × {args.tokens} tokens")
    scorer = CausalLMScorer(model, device)

    parts = apl.groups(base, "hidden")
    if args.hidden_sample:
        keys = list(parts)[:: max(1, len(parts) // args.hidden_sample)][: args.hidden_sample]
        parts = {k: parts[k] for k in keys}
    rows = []
    for t in range(args.tasks):
        g = torch.Generator(device=device).manual_seed(1000 + t)
        expert = {n: (b.float() + 1e-3 * torch.randn(b.shape, generator=g, device=device)).to(dtype)
                  for n, b in base.items()}
        ids = torch.randint(0, vocab, (args.shots, args.tokens), generator=g, device=device)
        shots = [(ids, torch.ones_like(ids), torch.randint(0, vocab, (args.shots,), generator=g, device=device))]
        if t == 0:  # warm-up (kernels, allocator), and the patched path against the one-at-a-time loop
            probe = list(parts)[:2]
            fast = apl.trace(scorer, base, expert, "warm-up", shots, "hidden", only=probe)
            slow = apl.trace(scorer, base, expert, "warm-up", shots, "hidden", only=probe, naive=True)
            print(f"patched vs one-at-a-time on {probe}: largest |difference| "
                  f"{float((fast.values - slow.values).abs().max()):.2e} (P_t = {fast.clean:.4f})")
            sync(device)
            n0 = time.perf_counter()  # the one-at-a-time loop's time per hidden state, for the speed-up below
            apl.trace(scorer, base, expert, "warm-up", shots, "hidden", only=list(parts)[:NAIVE_RUNS], naive=True)
            sync(device)
            naive_per_state = (time.perf_counter() - n0) / min(NAIVE_RUNS, len(parts))
        sync(device)
        t0 = time.perf_counter()
        layer = apl.trace(scorer, base, expert, f"task{t}", shots, "layer")
        sync(device)
        t1 = time.perf_counter()
        hid = apl.trace(scorer, base, expert, f"task{t}", shots, "hidden", chunk=args.chunk, only=list(parts))
        sync(device)
        t2 = time.perf_counter()
        full = (t2 - t1) * hidden / len(parts)
        rows.append((t, t1 - t0, t2 - t1, len(parts), full))
        print(f"task {t}: layer level {t1 - t0:6.2f} s ({len(layer.keys)} runs, largest |I| {float(layer.values.abs().max()):.2e}); "
              f"hidden level {t2 - t1:7.2f} s for {len(parts)} of {hidden} states (all {hidden}: {full:7.1f} s"
              f"{'' if len(parts) == hidden else ', extrapolated'})", flush=True)
        del expert
    total_layer = sum(r[1] for r in rows)
    total_hidden = sum(r[4] for r in rows)
    print(f"\n{'':34s}{'measured':>12s}{'goal':>12s}")
    print(f"{'layer level, all tasks':34s}{total_layer:11.1f}s{'<= 10 s':>12s}")
    label = "hidden level, all tasks" + (" (extrap.)" if args.hidden_sample else "")
    print(f"{label:34s}{total_hidden:11.1f}s{'<= 480 s':>12s}")
    print(f"{'paper (A100, 5-shot APL)':34s}{900:11.1f}s")
    patched_per_state = sum(r[2] for r in rows) / sum(r[3] for r in rows)
    print(f"\nhidden level, one state: one-at-a-time {naive_per_state * 1e3:.1f} ms ({NAIVE_RUNS} runs), "
          f"patched in chunks of {args.chunk} {patched_per_state * 1e3:.1f} ms: "
          f"{naive_per_state / patched_per_state:.1f}x (chapter 4's goal on the zoo's CPU: >= 10x)")


if __name__ == "__main__":
    main()
