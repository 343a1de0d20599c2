"""The fast tier: merging checkpoints larger than memory, quickly (appendix "Merging at scale", chapter 8).

It imports the reference engine and is never imported by it:

* ``checkpoints`` – header-only listing, one-tensor reads, planned sharded writes (atomic);
* ``streaming``   – :func:`merge_folders`: validate, prefetch, merge tensor by tensor, write;
* ``fused``       – the fused CPU path (pieces on worker threads, one-pass top-k);
* ``compiled``    – builds and loads ``csrc/fused_merge.c``, the kernel the fused path runs;
* ``lean_importance`` – APL's gradient importance with one transformer block in memory (chapter 5).
"""
