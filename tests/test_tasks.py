"""The zoo's tasks: split hygiene, determinism, few-shot sampler, clear errors (chapter 0)."""
import pytest

from merging_helpers import tasks

pytestmark = pytest.mark.slow  # minutes in all: `pytest -m 'not slow'` leaves it out


@pytest.fixture(scope="module")
def all_tasks():
    return {name: tasks.make_task(name, seed=0) for name in tasks.TASK_NAMES + tasks.HELD_OUT_TASKS}


def test_splits_are_disjoint_and_nonempty(all_tasks):
    for name, task in all_tasks.items():
        seen = {}
        for split in tasks.SPLITS:
            texts = task.texts(split)
            assert len(texts) > 50, (name, split)
            assert len(set(texts)) == len(texts), f"{name}/{split} has duplicate texts"
            for other, other_texts in seen.items():
                assert not set(texts) & other_texts, f"{name}: {split} overlaps {other}"
            seen[split] = set(texts)


def test_labels_in_range_and_every_label_present(all_tasks):
    for name, task in all_tasks.items():
        for split in tasks.SPLITS:
            ys = set(task.targets(split))
            assert ys == set(range(task.num_labels)), (name, split, ys)


def test_sentiment_test_words_unseen_in_training(all_tasks):
    # the sentiment task splits the lexicon first: a test phrase's lexicon words are new
    _, words = tasks._lexicon_words()
    lexicon = set(words)
    def used(split):
        return {w.strip(",") for t in all_tasks["sentiment"].texts(split) for w in t.split()} & lexicon
    assert used("test") and used("train")
    assert not used("test") & used("train")


def test_arithmetic_labels_hand_worked():
    assert tasks._answer_sign("What is 0.4 - 12.3?", "-11.9") == 0
    assert tasks._answer_sign("-315 divided by 12", "-105/4") == 0
    assert tasks._answer_sign("14 times 124", "1736") == 1
    assert tasks._answer_sign("0 times 5", "0") is None  # zero has no sign: dropped
    assert tasks._integer_comparison_truth("Is -220 bigger than -241?", "True") == 1
    assert tasks._integer_comparison_truth("Is 7 > 576/85?", "True") is None
    assert tasks._integer_comparison_truth("Is 114.9 bigger than 1?", "True") is None
    assert tasks._integer_comparison_truth("Which is bigger: 3 or 4?", "4") is None
    # the held-out task keeps exactly the yes/no comparisons that `compare` leaves out
    assert tasks._noninteger_comparison_truth("Is 7 > 576/85?", "True") == 1
    assert tasks._noninteger_comparison_truth("Is 114.9 bigger than 1?", "False") == 0
    assert tasks._noninteger_comparison_truth("Is -220 bigger than -241?", "True") is None
    assert tasks._noninteger_comparison_truth("Which is bigger: 0.3 or 4?", "4") is None


def test_compare_is_integers_only_and_product_mixes_both_operations(all_tasks):
    texts = [t for split in tasks.SPLITS for t in all_tasks["compare"].texts(split)]
    assert not [t for t in texts if "/" in t or "." in t.rstrip("?")]
    product = all_tasks["product"].texts("train")
    divisions = sum("divided" in t for t in product)
    assert 0.3 < divisions / len(product) < 0.7, divisions


def test_held_out_task_shares_no_question_with_compare(all_tasks):
    decimals = {t for split in tasks.SPLITS for t in all_tasks["decimals"].texts(split)}
    compare = {t for split in tasks.SPLITS for t in all_tasks["compare"].texts(split)}
    assert all("/" in t or "." in t.rstrip("?") for t in decimals)
    assert not decimals & compare
    assert "decimals" not in tasks.TASK_NAMES  # no expert is trained on it


def test_tasks_are_deterministic():
    a, b = tasks.make_task("product", seed=3), tasks.make_task("product", seed=3)
    assert a.splits == b.splits
    assert tasks.make_task("product", seed=4).splits != a.splits


def test_json_round_trip(all_tasks):
    task = all_tasks["news"]
    assert tasks.Task.from_json(task.to_json()).splits == task.splits


def test_few_shot_is_seeded_stratified_and_from_train(all_tasks):
    task = all_tasks["news"]
    shots = tasks.few_shot(task, k=3, seed=7)
    assert shots == tasks.few_shot(task, k=3, seed=7)
    assert shots != tasks.few_shot(task, k=3, seed=8)
    assert [y for _, y in shots] == sorted(y for _, y in shots)
    assert len(shots) == task.num_labels * 3
    assert set(shots) <= set(task.splits["train"])


def test_few_shot_bad_k(all_tasks):
    with pytest.raises(ValueError, match="k >= 1"):
        tasks.few_shot(all_tasks["product"], k=0)
    with pytest.raises(ValueError, match="only"):
        tasks.few_shot(all_tasks["product"], k=10**6)


def test_unknown_task_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['poetry'\].*news"):
        tasks.make_task("poetry")


# ---- the generative task of the language-model tier (chapter 8b)

@pytest.fixture(scope="module")
def sum_task():
    return tasks.make_task("sum", seed=0)


def test_every_sum_answer_is_the_result_of_its_question(sum_task):
    """Each label is a number the question's two numbers give by + or - (or their distance): the
    answers are not shuffled against the questions, and every split is disjoint and full."""
    import re
    from fractions import Fraction
    number = re.compile(r"-?\d+(?:\.\d+)?")
    seen = set()
    for split in tasks.SPLITS:
        texts = set(sum_task.texts(split))
        assert len(texts) == len(sum_task.splits[split]) == tasks.SPLIT_SIZES[split] and not texts & seen
        seen |= texts
        for question, y in sum_task.splits[split]:
            a, b = (Fraction(x) for x in number.findall(question)[-2:])
            assert Fraction(sum_task.labels[y]) in {a + b, a - b, b - a, abs(a - b)}, (question, sum_task.labels[y])
    assert sum_task.generative and len(sum_task.labels) > 1000


def test_a_generative_task_round_trips_and_gives_2k_shots(sum_task):
    again = tasks.Task.from_json(sum_task.to_json())
    assert again.generative and again.splits == sum_task.splits and again.labels == sum_task.labels
    assert "generative" not in tasks.make_task("compare").to_json()  # the encoder's task files are unchanged
    shots = tasks.few_shot(sum_task, 4, seed=1)
    assert len(shots) == 8 and shots == tasks.few_shot(sum_task, 4, seed=1)
    assert set(shots) <= set(sum_task.splits["train"])


def test_the_encoder_zoo_has_no_generative_task():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['sum'\]"):
        tasks.check_task_names(["sum"])
