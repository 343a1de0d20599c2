#!/usr/bin/env python
"""Where a streaming merge spends its time (a developer's tool, not a test).

    python benchmarks/stream_profile.py --base B --experts E1 E2 E3 --out O \
        --method dare_ties --density 0.3 --device cuda --drop-cache

Runs ``merge_folders`` once in this process and prints how long the main thread waited
for reads, merged (CUDA work synchronised so it is counted), drew DARE masks, and what
was left (copies back, waiting for writes), plus the writer thread's time.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--experts", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="dare_ties")
    p.add_argument("--density", type=float, default=0.3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--drop-cache", action="store_true", help="drop the page cache first (root only)")
    p.add_argument("--kernel", choices=["auto", "c", "reference"], default="auto", help="the fused CPU path's kernel")
    p.add_argument("--direct", action="store_true", help="large tensors bypass the page cache (O_DIRECT)")
    p.add_argument("--fsync", action="store_true", help="flush the output before moving it into place")
    args = p.parse_args(argv)

    import torch

    from merging_helpers import recipes, rng
    from merging_helpers.fast import checkpoints, fused, streaming

    cuda = args.device.startswith("cuda")
    acc = {"wait for reads": 0.0, "merge_tensor (synchronised)": 0.0, "  of which DARE masks": 0.0,
           "fused merge": 0.0, "writer thread: writes": 0.0}

    def timed(key, fn, sync=False):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            r = fn(*a, **k)
            if sync and cuda:
                torch.cuda.synchronize()
            acc[key] += time.perf_counter() - t0
            return r
        return wrapper

    merge_fn = timed("merge_tensor (synchronised)", recipes.merge_tensor, sync=True)
    rng.EntryRandoms.keep_mask = timed("  of which DARE masks", rng.EntryRandoms.keep_mask)
    fused.FusedMerge.__call__ = timed("fused merge", fused.FusedMerge.__call__)
    checkpoints.ShardedSafetensorsWriter.write = timed("writer thread: writes", checkpoints.ShardedSafetensorsWriter.write)
    iterate = streaming._Prefetcher.__iter__

    def waiting_iter(self):
        it = iterate(self)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            acc["wait for reads"] += time.perf_counter() - t0
            yield item
    streaming._Prefetcher.__iter__ = waiting_iter

    if args.drop_cache:
        os.system("sync; echo 3 > /proc/sys/vm/drop_caches")
    if cuda:
        torch.zeros(1, device=args.device)  # start CUDA outside the timing
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    use_fused = not cuda
    streaming.merge_folders(args.base, args.experts, args.out, args.method, device=args.device, progress=False,
                            overwrite=True, max_shard_size="1GB", seed=0, density=args.density,
                            weighted_election=True, merge_fn=None if use_fused else merge_fn,
                            direct_io=args.direct, fsync=args.fsync, kernel=args.kernel)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    n_bytes = sum(f.stat().st_size for d in [args.base, *args.experts] for f in Path(d).glob("*.safetensors"))
    main_thread = acc["wait for reads"] + acc["merge_tensor (synchronised)"] + acc["fused merge"]
    print(f"{args.method} on {args.device} (direct writes {args.direct}, fsync {args.fsync}): "
          f"{wall:.2f} s wall, {n_bytes / wall / 1e9:.3f} GB/s input, "
          f"user {r1.ru_utime - r0.ru_utime:.1f} s, sys {r1.ru_stime - r0.ru_stime:.1f} s")
    for k, v in acc.items():
        print(f"  {k:32s} {v:7.2f} s")
    print(f"  {'rest of the main thread':32s} {wall - main_thread:7.2f} s  (validation, copies back, waiting for writes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
