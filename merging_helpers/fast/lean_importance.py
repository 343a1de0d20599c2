"""APL's gradient importance with one transformer block in memory at a time (chapter 5, "Speed
and memory"): for models whose weights and gradients do not fit on the device together.

:func:`merging_helpers.taylor.gradient_importances` holds the whole model and its gradient
(a 7B model in bf16: 13.5 GB of weights and as much again of gradient). The importances only
need Σ_{i∈s} Δ_i g_i per partition, and g can be consumed block by block as backpropagation
produces it. One sweep does that for every expert at once, with the weights read from Hugging
Face folders:

1. **forward**, without autograd: the embeddings, then each block with its base weights read
   from the folder and dropped after use; only the hidden states *between* blocks are kept;
2. the **loss** at the top, with autograd: a causal LM's final norm and LM head (cross-entropy
   of each prompt's answer token at its last position), or the zoo's mean pooling and task head
   (cross-entropy of the label);
3. **backward**, from the last block down: the block's weights are read again and its forward
   is recomputed from the kept input with autograd; the gradient goes through it, Δ·g is summed
   per partition for its tensors (Δ = expert − base, read one tensor at a time), and the block
   is dropped;
4. the **embeddings**: the small embedding tensors (positions, the norm) get their gradient by
   recomputing the embedding layer; the token embedding only needs Σ over the prompt tokens of
   Δ_embed[token]·∂L/∂e[token] — only those rows are read, and the embedding-sized gradient is
   never formed.

Two model families (:func:`lean_gradient_importances` for Llama-style causal LMs,
:func:`lean_encoder_importances` for the zoo's BERT encoder with its task heads) differ only
in steps 2 and 4 and in how a block is called; each is a small class below. The sums equal
those of the whole-model backward pass (tests/test_lean_importance.py: a tiny Llama and the zoo).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import apl
from ..metrics import check_finite_gradient, mean_pool
from .reader import CheckpointFolder


# ----------------------------------------------------------------------------- the families
# What the sweep asks of a family: ``embed`` (the token embedding's name), ``stem`` (the other
# embedding tensors), ``top`` (tensors between the last block and the loss), ``layers``,
# ``block_prefix(l)`` / ``block(l)`` (a block's tensor names and its module), ``stream(inputs)`` (a
# task's inputs on the device), ``embedded(stem, rows, stream)`` (the embedding layer's output from
# the looked-up token rows; it also puts the blocks' attention context in the stream) and
# ``loss(top, hidden, stream, head)``.

class _CausalLM:
    """A Llama-style causal LM: a task's stream is its prompts ``(ids, answers)`` (no padding)."""

    embed = "model.embed_tokens.weight"

    def __init__(self, config_folder, device, shapes):
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(config_folder)
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config).eval()
        with torch.device(device):
            self.rotary = type(self.model.model.rotary_emb)(config=config)
        self.config, self.device = config, device
        self.layers = config.num_hidden_layers
        self.vocab = config.vocab_size
        self.stem = []  # tensors of the embedding layer other than the token embedding: none
        head = "lm_head.weight" if "lm_head.weight" in shapes else self.embed  # tied embeddings
        self.top = ["model.norm.weight", head]

    def block_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def block(self, layer: int):
        return self.model.model.layers[layer]

    def stream(self, prompt):
        ids, answers = prompt
        return {"ids": ids.to(self.device), "answers": answers.to(self.device)}

    def embedded(self, stem, rows, stream):
        from transformers.masking_utils import create_causal_mask
        if "context" not in stream:
            ids = stream["ids"]
            position_ids = torch.arange(ids.shape[1], device=self.device)[None]
            mask = create_causal_mask(config=self.config, inputs_embeds=rows, attention_mask=torch.ones_like(ids),
                                      past_key_values=None, position_ids=position_ids)
            stream["context"] = {"attention_mask": mask, "position_ids": position_ids,
                                 "position_embeddings": self.rotary(rows, position_ids)}
        return rows

    def loss(self, top, hidden, stream, head):
        normed = torch.func.functional_call(self.model.model.norm, {"weight": top["model.norm.weight"]},
                                            (hidden[:, -1],))
        logits = torch.nn.functional.linear(normed, top[self.top[1]]).float()
        return torch.nn.functional.cross_entropy(logits, stream["answers"])


class _Encoder:
    """The zoo's BERT encoder read by a task head (mean pooling, then a linear map): a stream
    is one task's few-shot set, tokenized in one padded batch (the mask keeps the pads out)."""

    embed = "embeddings.word_embeddings.weight"

    def __init__(self, config_folder, device, shapes, max_length: int):
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        config = AutoConfig.from_pretrained(config_folder)
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.model = AutoModel.from_config(config).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(config_folder))
        self.config, self.device, self.max_length = config, device, max_length
        self.layers = config.num_hidden_layers
        self.vocab = config.vocab_size
        self.stem = [n for n in shapes if n.startswith("embeddings.") and n != self.embed]
        self.top = []  # the task head is not a partition of the encoder; the pooler is not on the path

    def block_prefix(self, layer: int) -> str:
        return f"encoder.layer.{layer}."

    def block(self, layer: int):
        return self.model.encoder.layer[layer]

    def stream(self, examples):
        examples = [(str(t), int(y)) for t, y in examples]
        enc = self.tokenizer([t for t, _ in examples], padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"ids": enc["input_ids"].to(self.device), "mask": enc["attention_mask"].to(self.device),
                "answers": torch.tensor([y for _, y in examples], device=self.device)}

    def embedded(self, stem, rows, stream):
        from transformers.masking_utils import create_bidirectional_mask
        ids = stream["ids"]
        positions = torch.arange(ids.shape[1], device=self.device)[None].expand_as(ids)
        local = {n[len("embeddings."):]: t for n, t in stem.items()}
        hidden = torch.func.functional_call(self.model.embeddings, local, (), {
            "inputs_embeds": rows, "position_ids": positions, "token_type_ids": torch.zeros_like(ids)}, strict=False)
        if "context" not in stream:
            stream["context"] = {"attention_mask": create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=stream["mask"])}
        return hidden

    def loss(self, top, hidden, stream, head):
        logits = mean_pool(hidden, stream["mask"]) @ head["weight"].T + head["bias"]
        return torch.nn.functional.cross_entropy(logits.float(), stream["answers"])


# ----------------------------------------------------------------------------- the sweep

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


def _open_folders(base_folder, experts, what):
    base = CheckpointFolder(base_folder)
    folders = {t: CheckpointFolder(experts[t]) for t in experts}
    shapes = {n: base.tensors[n].shape for n in base.names()}
    for t, folder in folders.items():
        mismatched = [n for n in shapes if n not in folder.tensors or folder.tensors[n].shape != shapes[n]]
        if mismatched:
            for f in (base, *folders.values()):
                f.close()
            raise ValueError(f"{what}: expert {t!r} lacks or reshapes {mismatched[:3]}")
    return base, folders, shapes


def _output(out):
    """A block's hidden states (older transformers return them in a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class _Where:
    """Where a sweep runs: the device, the dtype of its forward and backward, whether scores keep their sign,
    a progress bar, and the function's name for messages."""

    device: object
    dtype: torch.dtype
    signed: bool
    progress: bool
    what: str


class _Sweep:
    """Steps 1–4 of the module docstring for every task at once (:meth:`run`: task → level → Importance)."""

    def __init__(self, family, base, folders, shapes, inputs, heads, levels, where: _Where):
        self.family, self.base, self.folders, self.shapes, self.levels, self.at = family, base, folders, shapes, levels, where
        self.tasks = list(folders)
        self.where, self.keys = _index(shapes, levels)
        self.sums = {t: {lv: torch.zeros(len(self.keys[lv]), dtype=torch.float64) for lv in levels} for t in self.tasks}
        self.stream = {t: family.stream(inputs[t]) for t in self.tasks}
        for t in self.tasks:
            if int(self.stream[t]["ids"].max()) >= family.vocab or int(self.stream[t]["ids"].min()) < 0:
                raise ValueError(f"{where.what}: {t!r} has token ids outside the vocabulary (0..{family.vocab - 1})")
        self.head = ({t: {k: v.to(device=where.device, dtype=torch.float32) for k, v in heads[t].items()}
                      for t in self.tasks} if heads else {})

    def read(self, folder, name):
        return folder.read(name).to(device=self.at.device, dtype=self.at.dtype)

    def add(self, name, gradient):
        """Adds Σ Δ·g of tensor ``name`` to its partitions; ``gradient``: task → ∂L/∂(that tensor)."""
        check_finite_gradient({f"{name} ({t})": g for t, g in gradient.items()})
        b = self.base.read(name).to(device=self.at.device, dtype=torch.float32)
        for t, g in gradient.items():
            product = (self.folders[t].read(name).to(device=self.at.device, dtype=torch.float32) - b) * g.float()
            rows = product.reshape(product.shape[0], -1).sum(1) if product.dim() else product.reshape(1)
            rows = rows.double().cpu()
            for level, position, row in self.where.get(name, ()):
                self.sums[t][level][position] += rows.sum() if row is None else rows[row]

    def token_rows(self, folder, t):
        """The token embedding's rows of task t's prompts (not the whole vocabulary)."""
        ids = self.stream[t]["ids"].cpu()
        return folder.read_rows(self.family.embed, ids.reshape(-1)).view(*ids.shape, -1)

    def block_params(self, layer, grad=False):
        prefix = self.family.block_prefix(layer)
        return {n[len(prefix):]: self.read(self.base, n).requires_grad_(grad) for n in self.shapes if n.startswith(prefix)}

    def forward(self):
        """1. forward, keeping only the hidden states between blocks."""
        f, device, dtype = self.family, self.at.device, self.at.dtype
        self.stem = {n: self.read(self.base, n) for n in f.stem}
        with torch.no_grad():
            self.hidden = {t: [f.embedded(self.stem, self.token_rows(self.base, t).to(device=device, dtype=dtype),
                                          self.stream[t])] for t in self.tasks}
            self.bar.update()
            for layer in range(f.layers):
                params = self.block_params(layer)
                for t in self.tasks:
                    self.hidden[t].append(_output(torch.func.functional_call(
                        f.block(layer), params, (self.hidden[t][-1],), self.stream[t]["context"])))
                del params
                self.bar.update()

    def top(self):
        """2. the loss and its gradient at the top."""
        top = {n: self.read(self.base, n).requires_grad_(True) for n in self.family.top}
        self.grad_out, self.loss_at_base, top_grads = {}, {}, {n: {} for n in top}
        for t in self.tasks:
            last = self.hidden[t][-1].detach().requires_grad_(True)
            loss = self.family.loss(top, last, self.stream[t], self.head.get(t))
            *grads, self.grad_out[t] = torch.autograd.grad(loss, (*top.values(), last))
            for n, g in zip(top, grads):
                top_grads[n][t] = g
            self.loss_at_base[t] = float(loss.detach())
        for n in top:
            self.add(n, top_grads[n])  # a tied head adds its part to the embedding's sums
        self.bar.update()

    def backward(self):
        """3. backward, one block at a time: recompute, push the gradient through, sum Δ·g, drop."""
        f = self.family
        for layer in reversed(range(f.layers)):
            params = self.block_params(layer, grad=True)
            grads = {}
            for t in self.tasks:
                inputs_ = self.hidden[t][layer].detach().requires_grad_(True)
                out = _output(torch.func.functional_call(f.block(layer), params, (inputs_,), self.stream[t]["context"]))
                *param_grads, self.grad_out[t] = torch.autograd.grad(out, (*params.values(), inputs_), self.grad_out[t])
                grads[t] = dict(zip(params, param_grads))
                self.hidden[t][layer + 1] = None
            for local in params:
                self.add(f.block_prefix(layer) + local, {t: grads[t][local] for t in self.tasks})
            del params, grads
            self.bar.update()

    def embeddings(self):
        """4. the small embedding tensors by recomputing the layer, the token embedding by its rows."""
        f, device, dtype = self.family, self.at.device, self.at.dtype
        stem = {n: p.requires_grad_(True) for n, p in self.stem.items()}
        stem_grads = {n: {} for n in stem}
        for t in self.tasks:
            b_rows = self.token_rows(self.base, t)
            rows = b_rows.to(device=device, dtype=dtype, copy=True).requires_grad_(True)
            *grads, g_rows = torch.autograd.grad(f.embedded(stem, rows, self.stream[t]), (*stem.values(), rows),
                                                 self.grad_out[t])
            for n, g in zip(stem, grads):
                stem_grads[n][t] = g
            delta_rows = (self.token_rows(self.folders[t], t).float() - b_rows.float()).to(device)
            value = float((delta_rows * g_rows.float()).sum())
            for level, position, row in self.where.get(f.embed, ()):  # in no hidden-state group: its total suffices
                self.sums[t][level][position] += value
        for n in stem:
            self.add(n, stem_grads[n])
        self.bar.update()

    def run(self) -> dict:
        self.bar = tqdm(total=2 * self.family.layers + 2, desc="lean gradient importance", disable=not self.at.progress)
        self.forward()
        self.top()
        self.backward()
        self.embeddings()
        self.bar.close()
        sums, keys = self.sums, self.keys
        return {t: {lv: apl.Importance(t, lv, keys[lv], sums[t][lv] if self.at.signed else -sums[t][lv].abs(),
                                       self.loss_at_base[t], float("nan"), units="loss") for lv in self.levels}
                for t in self.tasks}


def _levels(levels):
    return [apl._check_level(level) for level in ([levels] if isinstance(levels, str) else levels)]


# ----------------------------------------------------------------------------- public entry points

def _check_prompts(prompts, experts):
    if set(prompts) != set(experts):
        raise KeyError(f"lean_gradient_importances: prompts for {sorted(prompts)} but experts for {sorted(experts)}")
    for task, (ids, answers) in prompts.items():
        if ids.dim() != 2 or answers.shape != (ids.shape[0],):
            raise ValueError(f"lean_gradient_importances: {task!r} needs ids of shape (n, tokens) and answers of "
                             f"shape (n,), got {tuple(ids.shape)} and {tuple(answers.shape)}")


def lean_gradient_importances(base_folder: str | os.PathLike, experts: Mapping[str, str | os.PathLike],
                              prompts: Mapping[str, tuple[torch.Tensor, torch.Tensor]], levels=apl.LEVELS,
                              device: str = "cpu", dtype: torch.dtype | None = None, signed: bool = False,
                              progress: bool = True) -> dict[str, dict[str, apl.Importance]]:
    """APL's gradient importance of every expert of a Llama-style causal LM at every level, one
    block in memory (chapter 5).

    ``experts``: task → expert folder; ``prompts``: task → ``(ids, answers)``, ids ``(n, tokens)``
    and one answer token per prompt (the prompts of one task share a length). Returns task → level
    → :class:`~merging_helpers.apl.Importance` in Eq. 5's convention (−|Σ Δ g|, or Σ Δ g with
    ``signed``), ``clean`` = the loss at the base, ``few_shot_accuracy`` = NaN (no forward pass of
    the expert is made). ``dtype``: the compute dtype (default: the folder's on a GPU, float32 on the CPU)."""
    levels = _levels(levels)
    _check_prompts(prompts, experts)
    device = torch.device(device)
    base, folders, shapes = _open_folders(base_folder, experts, "lean_gradient_importances")
    try:
        if dtype is None:
            dtype = base.tensors[next(iter(shapes))].dtype if device.type == "cuda" else torch.float32
        family = _CausalLM(base_folder, device, shapes)
        if max(int(a.max()) for _, a in prompts.values()) >= family.vocab:
            raise ValueError(f"lean_gradient_importances: answers outside the vocabulary (0..{family.vocab - 1})")
        where = _Where(device, dtype, signed, progress, "lean_gradient_importances")
        return _Sweep(family, base, folders, shapes, prompts, None, levels, where).run()
    finally:
        for f in (base, *folders.values()):
            f.close()


def lean_encoder_importances(base_folder: str | os.PathLike, experts: Mapping[str, str | os.PathLike],
                             examples: Mapping[str, list], heads: Mapping[str, Mapping[str, torch.Tensor]],
                             levels=apl.LEVELS, max_length: int = 128, device: str = "cpu", signed: bool = False,
                             progress: bool = True) -> dict[str, dict[str, apl.Importance]]:
    """:func:`lean_gradient_importances` for the zoo's encoder (chapter 5): the loss is the
    few-shot cross-entropy of ``heads[task]`` (``{"weight", "bias"}``) on the mean-pooled
    encoder, as :meth:`~merging_helpers.evaluation.Evaluator.loss` computes it. ``examples``:
    task → few-shot list of (text, label); the folders are the zoo's (``zoo.base_dir``,
    ``zoo.expert_dir(task)``); ``max_length``: the zoo's (``zoo.config.max_length``). Equals
    :func:`~merging_helpers.taylor.gradient_importances` (a test checks it), float32."""
    levels = _levels(levels)
    if set(examples) != set(experts) or not set(experts) <= set(heads):
        raise KeyError(f"lean_encoder_importances: examples for {sorted(examples)}, experts for {sorted(experts)}, "
                       f"heads for {sorted(heads)}: every expert needs its few-shot set and its head")
    for t, shots in examples.items():
        if not list(shots):
            raise ValueError(f"lean_encoder_importances: the few-shot set of {t!r} is empty")
        labels = heads[t]["weight"].shape[0]
        bad = [y for _, y in shots if not 0 <= int(y) < labels]
        if bad:
            raise ValueError(f"lean_encoder_importances: {t!r} has label {bad[0]} outside its head's 0..{labels - 1}")
    device = torch.device(device)
    base, folders, shapes = _open_folders(base_folder, experts, "lean_encoder_importances")
    try:
        family = _Encoder(base_folder, device, shapes, max_length)
        where = _Where(device, torch.float32, signed, progress, "lean_encoder_importances")
        return _Sweep(family, base, folders, shapes, examples, heads, levels, where).run()
    finally:
        for f in (base, *folders.values()):
            f.close()
