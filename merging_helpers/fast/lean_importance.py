"""APL's gradient importance with one transformer block in memory at a time (chapter 5, "Speed
and memory"): for models whose weights and gradients do not fit on the device together.

:func:`merging_helpers.taylor.gradient_importances` holds the whole model and its gradient
(a 7B model in bf16: 13.5 GB of weights and as much again of gradient). The importances only
need Σ_{i∈s} Δ_i g_i per partition, and g can be consumed block by block as backpropagation
produces it. :func:`lean_gradient_importances` does that for Llama-style causal LMs stored as
Hugging Face folders:

1. **forward**, without autograd: the embeddings, then each block with its base weights read
   from the folder and dropped after use; only the hidden states *between* blocks are kept;
2. the **loss** at the top (final norm and LM head, with autograd): cross-entropy of each
   prompt's answer token at its last position, mean over prompts;
3. **backward**, from the last block down: the block's weights are read again and its forward
   is recomputed from the kept input with autograd; the gradient goes through it, Δ·g is summed
   per partition for its tensors (Δ = expert − base, read one tensor at a time), and the block
   is dropped;
4. the **embeddings**: Σ over the prompt tokens of Δ_embed[token]·∂L/∂h₀ — the embedding-sized
   gradient is never formed.

Several experts share one sweep: each block is read once and used for every task's prompts.
The sums equal those of the reference (tests/test_lean_importance.py, on a tiny Llama).
Prompts of one task must share a length (no padding).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from .. import apl
from ..evaluation import check_finite_gradient
from .checkpoints import CheckpointFolder


def _skeleton(config_folder):
    """The model's modules on the meta device (no memory), its config, and a real rotary embedding."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(config_folder)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, config


def _index(shapes, levels):
    """name → [(level, group position, row or None)]: where each tensor's Δ·g goes."""
    where: dict[str, list] = {}
    keys = {}
    for level in levels:
        parts = apl.groups(shapes, level)
        keys[level] = list(parts)
        for position, group in enumerate(parts.values()):
            for name, row in group.items():
                where.setdefault(name, []).append((level, position, row))
    return where, keys


def _check_prompts(prompts, experts, vocab):
    if set(prompts) != set(experts):
        raise KeyError(f"lean_gradient_importances: prompts for {sorted(prompts)} but experts for {sorted(experts)}")
    for task, (ids, answers) in prompts.items():
        if ids.dim() != 2 or answers.shape != (ids.shape[0],):
            raise ValueError(f"lean_gradient_importances: {task!r} needs ids of shape (n, tokens) and answers of "
                             f"shape (n,), got {tuple(ids.shape)} and {tuple(answers.shape)}")
        if int(ids.max()) >= vocab or int(answers.max()) >= vocab or int(ids.min()) < 0:
            raise ValueError(f"lean_gradient_importances: {task!r} has token ids outside the vocabulary (0..{vocab - 1})")


def lean_gradient_importances(base_folder: str | os.PathLike, experts: Mapping[str, str | os.PathLike],
                              prompts: Mapping[str, tuple[torch.Tensor, torch.Tensor]], levels=apl.LEVELS,
                              device: str = "cpu", dtype: torch.dtype | None = None, signed: bool = False,
                              progress: bool = True) -> dict[str, dict[str, apl.Importance]]:
    """APL's gradient importance of every expert at every level, one block in memory (chapter 5).

    ``experts``: task → expert folder; ``prompts``: task → ``(ids, answers)``, ids ``(n, tokens)``
    and one answer token per prompt. Returns task → level → :class:`~merging_helpers.apl.Importance`
    in Eq. 5's convention (−|Σ Δ g|, or Σ Δ g with ``signed``), ``clean`` = the loss at the base,
    ``few_shot_accuracy`` = NaN (no forward pass of the expert is made). ``dtype``: the compute
    dtype (default: the folder's on a GPU, float32 on the CPU)."""
    levels = [apl._check_level(level) for level in ([levels] if isinstance(levels, str) else levels)]
    device = torch.device(device)
    model, config = _skeleton(base_folder)
    _check_prompts(prompts, experts, config.vocab_size)
    tasks = list(experts)
    base = CheckpointFolder(base_folder)
    folders = {t: CheckpointFolder(experts[t]) for t in tasks}
    try:
        shapes = {n: base.tensors[n].shape for n in base.names()}
        for t, folder in folders.items():
            mismatched = [n for n in shapes if n not in folder.tensors or folder.tensors[n].shape != shapes[n]]
            if mismatched:
                raise ValueError(f"lean_gradient_importances: expert {t!r} lacks or reshapes {mismatched[:3]}")
        if dtype is None:
            dtype = base.tensors[next(iter(shapes))].dtype if device.type == "cuda" else torch.float32
        where, keys = _index(shapes, levels)
        sums = {t: {level: torch.zeros(len(keys[level]), dtype=torch.float64) for level in levels} for t in tasks}

        def read(folder, name):
            return folder.read(name).to(device=device, dtype=dtype)

        def add_products(name, gradient):
            check_finite_gradient({f"{name} ({t})": g for t, g in gradient.items()})
            b = base.read(name).to(device=device, dtype=torch.float32)
            for t in tasks:
                product = (folders[t].read(name).to(device=device, dtype=torch.float32) - b) * gradient[t].float()
                rows = product.reshape(product.shape[0], -1).sum(1).double().cpu() if product.dim() else product.reshape(1).double().cpu()
                for level, position, row in where.get(name, ()):
                    sums[t][level][position] += rows.sum() if row is None else rows[row]

        def block_params(layer):
            prefix = f"model.layers.{layer}."
            return {n[len(prefix):]: read(base, n) for n in shapes if n.startswith(prefix)}

        from transformers.masking_utils import create_causal_mask
        with torch.device(device):
            rotary = type(model.model.rotary_emb)(config=config)
        embed_name, norm_name = "model.embed_tokens.weight", "model.norm.weight"
        head_name = "lm_head.weight" if "lm_head.weight" in shapes else embed_name  # tied embeddings
        ids = {t: prompts[t][0].to(device) for t in tasks}
        answers = {t: prompts[t][1].to(device) for t in tasks}
        layers = config.num_hidden_layers
        bar = tqdm(total=2 * layers + 2, desc="lean gradient importance", disable=not progress)

        # 1. forward, keeping only the hidden states between blocks
        embedding = read(base, embed_name)
        hidden = {t: [embedding[ids[t]]] for t in tasks}
        del embedding
        context = {}
        for t in tasks:
            position_ids = torch.arange(ids[t].shape[1], device=device)[None]
            mask = create_causal_mask(config=config, inputs_embeds=hidden[t][0], attention_mask=torch.ones_like(ids[t]),
                                      past_key_values=None, position_ids=position_ids)
            context[t] = {"attention_mask": mask, "position_ids": position_ids,
                          "position_embeddings": rotary(hidden[t][0], position_ids)}
        bar.update()
        with torch.no_grad():
            for layer in range(layers):
                params = block_params(layer)
                for t in tasks:
                    hidden[t].append(torch.func.functional_call(model.model.layers[layer], params, (hidden[t][-1],),
                                                                context[t]))
                del params
                bar.update()

        # 2. the loss and its gradient at the top
        norm_w = read(base, norm_name).requires_grad_(True)
        head_w = read(base, head_name).requires_grad_(True)
        grad_out, loss_at_base = {}, {}
        norm_grads, head_grads = {}, {}
        for t in tasks:
            top = hidden[t][-1].detach().requires_grad_(True)
            normed = torch.func.functional_call(model.model.norm, {"weight": norm_w}, (top[:, -1],))
            loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(normed, head_w).float(), answers[t])
            norm_grads[t], head_grads[t], grad_out[t] = torch.autograd.grad(loss, (norm_w, head_w, top))
            loss_at_base[t] = float(loss.detach())
        add_products(norm_name, norm_grads)
        add_products(head_name, head_grads)  # a tied head adds its part to the embedding's sums
        del norm_w, head_w, norm_grads, head_grads
        bar.update()

        # 3. backward, one block at a time: recompute, push the gradient through, sum Δ·g, drop
        for layer in reversed(range(layers)):
            params = {n: p.requires_grad_(True) for n, p in block_params(layer).items()}
            grads = {}
            for t in tasks:
                inputs = hidden[t][layer].detach().requires_grad_(True)
                out = torch.func.functional_call(model.model.layers[layer], params, (inputs,), context[t])
                *param_grads, grad_out[t] = torch.autograd.grad(out, (*params.values(), inputs), grad_out[t])
                grads[t] = dict(zip(params, param_grads))
                hidden[t][layer + 1] = None
            for local in params:
                add_products(f"model.layers.{layer}.{local}", {t: grads[t][local] for t in tasks})
            del params, grads
            bar.update()

        # 4. the embeddings: Σ over tokens of Δ_embed[token] · ∂L/∂h₀
        b = base.read(embed_name)
        for t in tasks:
            delta_rows = (folders[t].read(embed_name)[ids[t].cpu()].float() - b[ids[t].cpu()].float()).to(device)
            value = float((delta_rows * grad_out[t].float()).sum())
            for level, position, row in where.get(embed_name, ()):
                sums[t][level][position] += value
        bar.close()
    finally:
        base.close()
        for folder in folders.values():
            folder.close()
    return {t: {level: apl.Importance(t, level, keys[level], sums[t][level] if signed else -sums[t][level].abs(),
                                      loss_at_base[t], float("nan")) for level in levels} for t in tasks}
