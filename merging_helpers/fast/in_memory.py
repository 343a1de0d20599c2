"""The engine's merge of whole state dicts, with the fused kernel where it applies.

Part of the fast tier (appendix "Merging at scale", chapter 8). :func:`merge_state_dicts`
takes the same arguments as :func:`merging_helpers.recipes.merge_state_dicts` and gives the
same tensors, bit for bit: the same checks and plan (:func:`~merging_helpers.recipes.plan_state_dict_merge`),
then every tensor the compiled kernel takes (:meth:`~merging_helpers.fast.fused.FusedMerge.takes`:
CPU, a float rate, a supported method) goes through :class:`~merging_helpers.fast.fused.FusedMerge`,
every other one through the reference engine. Chapter 8 merges its contenders this way, since a
merge of the whole model for every seed, budget and method is where much of its time went.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..recipes import merge_validated_tensor, plan_state_dict_merge
from .fused import FusedMerge, kernel_for


def merge_state_dicts(base_sd, expert_sds, method=None, *, config=None, progress=True, expert_names=None,
                      kernel: str = "auto", **options):
    """:func:`merging_helpers.recipes.merge_state_dicts`, its tensors on the CPU merged by the
    compiled kernel where it implements the options (``kernel``: ``"auto"``, ``"c"``: the kernel
    or an error, ``"reference"``: never) (appendix, chapter 8)."""
    config, expert_sds = plan_state_dict_merge(base_sd, expert_sds, method, config, options, expert_names)
    lib = kernel_for(kernel, config, "cpu")
    fused = FusedMerge(config, lib, torch.get_num_threads()) if lib is not None else None
    merged = {}
    try:
        for name, base in tqdm(base_sd.items(), desc=f"merge ({config.method.name})", disable=not progress):
            if not base.is_floating_point():
                merged[name] = base.clone()
                continue
            experts = [sd[name] for sd in expert_sds]
            if fused is not None and _fusable(fused, name, base, experts):
                merged[name] = fused.merge_into(name, base, experts, torch.empty_like(base))
            else:  # check_compatible has checked every delta for NaN / inf already
                merged[name] = merge_validated_tensor(name, base, experts, config, check_finite=False)
    finally:
        if fused is not None:
            fused.close()
    return merged


def _fusable(fused: FusedMerge, name: str, base: torch.Tensor, experts) -> bool:
    """The kernel takes this tensor: on the CPU, contiguous, its dtype kept, a float rate."""
    return fused.takes(name, base.dtype) and all(t.device.type == "cpu" and t.is_contiguous() for t in (base, *experts))
