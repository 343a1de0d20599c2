"""Shared fixtures: tiny BERT- and Llama-shaped state dicts and HF folders, and
tensors with heavy-tailed deltas. Every test module that needs a model takes it from here."""
import re

import pytest
import torch

from merging_helpers.fast.checkpoints import save_state_dict

CHAPTER_TEST = "test_the_chapter_runs_alone_from_the_installed_package"
CHAPTER_LANES = pytest.StashKey[object]()  # test_chapters_alone.Lanes, once started


def _waits_for_the_chapters(item) -> bool:
    return getattr(item, "originalname", "") == CHAPTER_TEST or "chapters_finished" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items):
    """The tests that wait for the chapters go last, so that every other test runs while they do."""
    items[:] = [item for item in items if not _waits_for_the_chapters(item)] + list(filter(_waits_for_the_chapters, items))


def pytest_collection_finish(session):
    """The chapters (tests/test_chapters_alone.py) start in the background as soon as the tests are
    collected, so that they run beside the unit tests instead of after them (``make test``)."""
    items = [item for item in session.items if getattr(item, "originalname", "") == CHAPTER_TEST]
    if items and not session.config.option.collectonly:
        chapters = [item.callspec.params["chapter"] for item in items]
        factory = session.config._tmp_path_factory  # pytest's own tmp_path_factory, before any fixture
        session.config.stash[CHAPTER_LANES] = items[0].module.start_chapters(chapters, factory)


def pytest_sessionfinish(session):
    """A session that ends early (``-x``, Ctrl-C) ends the chapters it started."""
    lanes = session.config.stash.get(CHAPTER_LANES, None)
    if lanes is not None:
        lanes.stop()


@pytest.fixture(scope="session")
def chapters_finished(request):
    """Waits for the chapters started in the background, if any (a test that reads their records)."""
    lanes = request.config.stash.get(CHAPTER_LANES, None)
    if lanes is not None:
        lanes.finish()


def bert_like(n_layers=2, hidden=16, seed=0, dtype=torch.float32):
    """A BERT-named state dict (embeddings, q, o, FFN up/down, LayerNorms, an integer buffer)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embeddings.word_embeddings.weight": (50, hidden), "embeddings.LayerNorm.weight": (hidden,)}
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        shapes |= {p + "attention.self.query.weight": (hidden, hidden), p + "attention.self.query.bias": (hidden,),
                   p + "attention.output.dense.weight": (hidden, hidden), p + "intermediate.dense.weight": (4 * hidden, hidden),
                   p + "output.dense.weight": (hidden, 4 * hidden), p + "output.LayerNorm.weight": (hidden,)}
    sd = {name: torch.randn(shape, generator=g).to(dtype) for name, shape in shapes.items()}
    sd["embeddings.position_ids"] = torch.arange(8)
    return sd


def expert_of(base, seed, scale=0.05):
    """``base`` plus a seeded Gaussian delta on every floating tensor."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in base.items()}


def small_pair():
    """A two-tensor base and an expert 0.01 away from it."""
    base = {"encoder.layer.0.output.dense.weight": torch.randn(8, 4), "embeddings.LayerNorm.weight": torch.ones(4)}
    expert = {k: v + 0.01 for k, v in base.items()}
    return base, expert


@pytest.fixture
def deltas():
    """Three seeded 40 × 25 deltas (1000 entries: density · n is an integer for round densities)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn((40, 25), generator=g) for _ in range(3)]


def heavy_tailed(shape, dtype, seed, n_experts=3):
    """Base + experts whose deltas have heavy tails and, in 16-bit dtypes, many exact
    ties in |Δ| (so the top-k tie rule is exercised)."""
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(shape, generator=g)
    experts = []
    for t in range(n_experts):
        d = torch.randn(shape, generator=g) * 0.002 * (1 + 0.3 * t)
        d[torch.rand(shape, generator=g) < 0.02] *= 5
        experts.append((base + d).to(dtype))
    return base.to(dtype), experts



def _llama_sd(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).state_dict(), cfg.to_dict()


def _bert_sd(seed):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=80, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=40, max_position_embeddings=32)
    torch.manual_seed(seed)
    sd = dict(BertModel(cfg).state_dict())
    sd["embeddings.position_ids"] = torch.arange(32).unsqueeze(0)  # an integer buffer
    return sd, cfg.to_dict()


def make_family(root, arch="llama", dtype=torch.float32, shard_size=None, n_experts=2, seed=0):
    """Base + experts folders; expert deltas ~ N(0, 0.02) with a few large entries."""
    sd, cfg = (_llama_sd if arch == "llama" else _bert_sd)(seed)
    sd = {k: v.contiguous() for k, v in sd.items()}
    size = shard_size or "10GB"
    base = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    dirs = [save_state_dict(base, root / "base", size, config=cfg)]
    (root / "base" / "tokenizer_config.json").write_text("{}")
    g = torch.Generator().manual_seed(seed + 1)
    for t in range(n_experts):
        ex = {}
        for k, v in sd.items():
            if v.is_floating_point():
                d = torch.randn(v.shape, generator=g) * 0.002 * (t + 1)
                d[torch.rand(v.shape, generator=g) < 0.01] *= 10
                ex[k] = (v + d).to(dtype)
            else:
                ex[k] = v
        dirs.append(save_state_dict(ex, root / f"expert{t}", size, config=cfg))
    return dirs[0], dirs[1:]


FAMILY_CASES = [
    pytest.param("llama", torch.float32, None, id="llama-fp32-single"),
    pytest.param("llama", torch.bfloat16, 6000, id="llama-bf16-sharded"),
    pytest.param("bert", torch.float16, 9000, id="bert-fp16-sharded"),
    pytest.param("bert", torch.bfloat16, None, id="bert-bf16-single"),
]


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    out = {}
    for p in FAMILY_CASES:
        arch, dtype, shard = p.values
        root = tmp_path_factory.mktemp(p.id)
        out[p.id] = make_family(root, arch, dtype, shard)
    return out


GLUE_KEY = r"""glue\(\s*["']([\w.-]+)["']"""  # the literal key of a glue("key", ...) call


def glued_keys(cells):
    """Literal keys, and the literal prefixes of f-string keys, that a chapter's code cells glue."""
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    literal = set(re.findall(GLUE_KEY, code))
    prefixes = set(re.findall(r"""glue\(\s*f["']([\w.-]*)\{""", code))
    if "glue_run_time()" in code:
        literal |= {"chapter_seconds", "chapter_cpus", "memo_cells", "memo_read", "memo_minutes"}
    return literal, prefixes

