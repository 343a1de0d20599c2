"""The fast tier: merging checkpoints larger than memory, quickly (appendix "Merging at scale", chapter 8).

It imports the reference engine and is never imported by it:

* ``reader``      – header-only listing, one-tensor reads (``pread``, or mapped without a copy);
* ``output_path`` – where an output may go, and the leftovers of an interrupted write;
* ``writer``      – planned sharded safetensors writes (atomic);
* ``checkpoints`` – the three above in one namespace;
* ``input_guard`` – read leases on the inputs, so a file truncated during a merge is an error, not SIGBUS;
* ``streaming``   – :func:`merge_folders`: validate, prefetch, merge tensor by tensor, write;
* ``fused``       – the fused CPU path (pieces on worker threads, one-pass top-k);
* ``in_memory``   – the engine's ``merge_state_dicts``, its tensors through the fused path where it applies;
* ``compiled``    – builds and loads ``csrc/fused_merge.c``, the kernel the fused path runs;
* ``lean_importance`` – APL's gradient importance with one transformer block in memory (chapter 5).
"""
