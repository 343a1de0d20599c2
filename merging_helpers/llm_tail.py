"""Introduced in chapter 8 (8b): APL's corrupted runs of a language model, run from the corrupted block on.

Causal tracing (chapter 4) puts one block of an expert back to the base's weights and reads
P_t again. Every block before the corrupted one computes exactly what it computed in the
clean run, so :func:`record_block_inputs` keeps, once, the hidden state entering each block
(of the prompts' shared prefix and of their own tokens), and :func:`logits_from_block` runs
only the blocks from ``start`` on: on average half a model per corrupted run.

The prefix (chat template and instruction, shared by every prompt) runs once per corrupted
run from its own recorded state, so that the blocks from ``start`` on attend to keys and
values of the corrupted model, as a whole forward pass would. The readable path is
:func:`merging_helpers.llm.prompt_logits` on the whole model; a test checks that both give
the same logits (to float rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .llm import prefixed_runs, repeated, shared_prefix, unwrapped


@dataclass
class BlockInputs:
    """A clean run of ``prompts``: per batch, the rows it holds, its mask and positions, and the
    hidden state entering every block; the shared prefix's (one row) likewise (chapter 8b)."""

    prefix: list          # block → (1, n, d); empty when no prefix is shared
    batches: list         # (rows, attention_mask, position_ids, [block → (b, m, d)], positions read)
    n: int                # tokens in the shared prefix


def _blocks(model):
    inner = unwrapped(model)
    return inner, inner.model.layers


@torch.no_grad()
def record_block_inputs(model, prompts: list[list[int]], pad_id: int, batch_size: int = 32,
                        tails: list[int] | None = None) -> BlockInputs:
    """The hidden state entering each block of the model as it is loaded, for every prompt, whose
    logits will be read at its last ``tails[i]`` positions (default one) (chapter 8b)."""
    _, layers = _blocks(model)
    n, seen, prefix_states, batches = shared_prefix(prompts, max(tails or [1])), [], None, []
    hooks = [layer.register_forward_pre_hook(lambda _, args: seen.append(args[0])) for layer in layers]
    try:  # the prefix's blocks run before the first batch's
        for rows, batch, _, read in prefixed_runs(model, prompts, pad_id, batch_size, tails=tails):
            if prefix_states is None:
                prefix_states = seen[:-len(layers)]
            batches.append((rows, batch["attention_mask"], batch["position_ids"] + n, seen[-len(layers):], read))
            seen.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return BlockInputs(prefix_states, batches, n)


def _run(inner, layers, hidden, positions, mask, cache):
    """The blocks ``layers`` on ``hidden`` at ``positions`` (their keys and values added to ``cache``)."""
    position_embeddings = inner.model.rotary_emb(hidden, position_ids=positions)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                       position_embeddings=position_embeddings)
    return hidden


def _mask(attention_mask, n: int) -> torch.Tensor:
    """(b, 1, m, n + m) booleans: a token sees the whole prefix and the real tokens of its prompt up to itself."""
    b, m = attention_mask.shape
    causal = torch.ones(m, m, dtype=torch.bool, device=attention_mask.device).tril()
    own = causal[None] & attention_mask.bool()[:, None, :]
    return torch.cat([torch.ones(b, m, n, dtype=torch.bool, device=own.device), own], 2)[:, None]


@torch.no_grad()
def logits_from_block(model, clean: BlockInputs, start: int):
    """``(rows, logits)`` as :func:`merging_helpers.llm.prompt_logits` gives them for the model as it is
    loaded now, which must equal the recorded one in every block before ``start`` (chapter 8b)."""
    from transformers import DynamicCache
    inner, layers = _blocks(model)
    if not 0 <= start < len(layers):
        raise ValueError(f"logits_from_block: start must be a block index in [0, {len(layers)}), got {start}")
    tail = layers[start:]
    prefix = None
    if clean.n:
        prefix = DynamicCache(config=inner.config)
        positions = torch.arange(clean.n, device=clean.prefix[start].device)[None]
        _run(inner, tail, clean.prefix[start], positions, None, prefix)
    for rows, attention_mask, positions, states, read in clean.batches:
        cache = None if prefix is None else repeated(prefix, len(rows))
        mask = _mask(attention_mask, clean.n)
        hidden = _run(inner, tail, states[start], positions, mask, cache)
        yield rows, inner.lm_head(inner.model.norm(hidden[:, -read:])).float().cpu()


def first_block(replaced, num_blocks: int) -> int | None:
    """The first block whose tensors ``replaced`` changes, or None when it changes anything outside
    the blocks (embeddings, final norm): then the whole model must run (chapter 8b)."""
    found = []
    for name in replaced:
        parts = name.split(".")
        if parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            return None
        found.append(int(parts[2]))
    return min(found) if found and min(found) < num_blocks else None
