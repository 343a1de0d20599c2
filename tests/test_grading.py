"""merging_helpers.grading: each check passes a right answer and turns a wrong one into a
GradingError whose message says what was expected (the course assignments)."""
import pytest
import torch

from merging_helpers import deltas, drop, grading
from merging_helpers.partitions import describe

task_vector_alias = deltas.task_vector


def own_answer(base, expert):
    return {k: expert[k] - base[k] for k in base if describe(k).layer is not None}  # describe: naming, allowed


def through_an_alias(base, expert):
    return task_vector_alias(base, expert)


def through_the_module(base, expert):
    return deltas.task_vector(base, expert)


def through_an_import_inside(delta):
    from merging_helpers.drop import magnitude_keep_mask
    return magnitude_keep_mask(delta, 0.5)


def a_helper(delta):
    return drop.magnitude_keep_mask(delta, 0.5)


def through_a_helper(delta):
    return a_helper(delta) * 2


def through_a_lambda(delta):
    return (lambda d: drop.magnitude_keep_mask(d, 0.5))(delta)


def a_local_named_like_a_module(x):
    deltas = [x]  # a local, not the package's module
    return deltas


def fails(match):
    return pytest.raises(grading.GradingError, match=match)


def test_a_stub_and_a_wrong_signature_are_named():
    def stub(base, expert):
        ...

    grading.expect_signature(stub, "task_vector", ("base", "expert"))
    with fails(r"task_vector should take \(base, expert\); yours takes \(base\)"):
        grading.expect_signature(lambda base: None, "task_vector", ("base", "expert"))
    with fails("task_vector is not defined yet"):
        grading.expect_signature(None, "task_vector", ("base", "expert"))
    with fails(r"task_vector returned None: fill in the function \(expected a dict of 1 tensors\)"):
        grading.expect_state_dict(stub(1, 2), "task_vector", {"w": torch.zeros(2)})


def test_an_exception_in_the_students_code_is_one_line():
    with fails("dare raised ZeroDivisionError: division by zero"):
        grading.call(lambda: 1 / 0, "dare")
    assert grading.call(lambda x: x + 1, "f", 1) == 2


def test_shapes_dtypes_and_names_are_checked():
    t = torch.zeros(2, 3)
    assert grading.expect_tensor(t, "f", (2, 3), torch.float32) is not None
    with fails(r"f returned shape \(3, 2\), expected \(2, 3\)"):
        grading.expect_tensor(t.T, "f", (2, 3))
    with fails("f returned dtype torch.float64, expected torch.float32"):
        grading.expect_tensor(t.double(), "f", (2, 3), torch.float32)
    with fails("f should return a torch.Tensor, got a list"):
        grading.expect_tensor([0.0], "f")
    with fails(r"missing \['b'\], unexpected \['c'\]"):
        grading.expect_state_dict({"a": t, "c": t}, "f", {"a": t, "b": t})


def test_closeness_uses_the_stated_tolerance_and_names_the_worst_entry():
    want = torch.tensor([1.0, 2.0, 3.0])
    grading.expect_close(want + 1e-5, want, "x")  # inside 1e-5 + 1e-4·|expected|
    with fails(r"x is wrong at flat index 2: got 3.1, expected 3"):
        grading.expect_close(torch.tensor([1.0, 2.0, 3.1]), want, "x")
    with fails("flat index 1"):
        grading.expect_close(torch.tensor([1.0, float("nan"), 3.0]), want, "x")
    grading.expect_close(want.double(), want, "x")  # another dtype, same values: graded the same


def test_rates_unchanged_inputs_raises_numbers_and_keys():
    grading.expect_rate(5_000, 10_000, 0.5, "kept")
    with fails("more than 5 standard deviations"):
        grading.expect_rate(5_300, 10_000, 0.5, "kept")
    before = {"w": torch.ones(2)}
    with fails("modified its input in place"):
        grading.expect_unchanged(before, {"w": torch.zeros(2)}, "f")
    with fails(r"should raise ValueError"):
        grading.expect_raises(lambda p: p, "dare", (1.0,))
    grading.expect_raises(lambda p: (_ for _ in ()).throw(ValueError("bad p")), "dare", (1.0,))
    assert float(grading.expect_number(torch.tensor([2.5]), "rms")) == 2.5
    with fails("rms should return a number, got a str"):
        grading.expect_number("x", "rms")
    with fails(r"should return a dict with keys \['a', 'b'\], got \['a'\]"):
        grading.expect_keys({"a": 1}, "f", ("a", "b"))
    with fails(r"should return \(best, scores\), got a list"):
        grading.expect_pair([1, 2], "f", "(best, scores)")


@pytest.mark.parametrize("fn, used", [
    (through_an_alias, "merging_helpers.deltas.task_vector"),
    (through_the_module, "merging_helpers.deltas.task_vector"),
    (through_an_import_inside, "merging_helpers.drop.magnitude_keep_mask"),
    (through_a_helper, "merging_helpers.drop.magnitude_keep_mask"),
    (through_a_lambda, "merging_helpers.drop.magnitude_keep_mask"),
    (deltas.task_vector, "merging_helpers.deltas.task_vector"),  # task_vector = deltas.task_vector
])
def test_an_answer_that_uses_the_engine_is_refused_naming_the_call(fn, used):
    with fails(f"uses {used}: write it yourself"):
        grading.call(fn, "answer", {"w": torch.ones(2)}, {"w": torch.ones(2)})
    with fails(f"uses {used}"):
        grading.expect_signature(fn, "answer", ("base", "expert"))


def test_an_own_answer_and_a_local_name_pass_the_engine_check():
    assert grading.engine_calls(own_answer) == []
    assert grading.engine_calls(a_local_named_like_a_module) == []
    base = {"encoder.layer.0.output.dense.weight": torch.ones(2)}
    assert grading.call(own_answer, "task_vector", base, base)["encoder.layer.0.output.dense.weight"].sum() == 0


def test_using_grades_a_question_apart_from_the_answers_it_builds_on():
    doubled = grading.using(through_a_helper, a_helper=lambda d: d + 1)   # the reference for the earlier part
    assert float(grading.call(doubled, "through_a_helper", torch.tensor(1.0))) == 4.0
    assert grading.engine_calls(doubled) == []                          # the student's a_helper is not called
    grading.permit("merging_helpers.drop.magnitude_keep_mask")          # an assignment that builds on drop
    try:
        assert grading.engine_calls(through_a_helper) == []
    finally:
        grading._permitted.clear()


def test_a_name_never_defined_is_named_even_through_using():
    with fails("task_vector is not defined as a function yet"):
        grading.call(grading.using(None, trim=lambda d: d), "task_vector", 1)


def test_nan_is_named_before_any_comparison():
    with fails(r"f contains NaN \(first at flat index 1\)"):
        grading.expect_tensor(torch.tensor([1.0, float("nan")]), "f")
    with fails("rms returned NaN"):
        grading.expect_number(float("nan"), "rms")


def test_a_split_recorder_catches_choosing_on_test():
    class Fake:
        def accuracy(self, state, split="test"):
            return {"a": 0.5}

    recorder = grading.SplitRecorder(Fake())
    for split in ("validation", "validation", "test"):
        recorder.accuracy({}, split)
    grading.expect_splits(recorder, "choose_lambda", validation=2, test=1)
    recorder.accuracy({}, "test")
    with fails("scored the test split 2 times, expected 1: choose on validation"):
        grading.expect_splits(recorder, "choose_lambda", validation=2, test=1)
    with fails(r"scored the splits .*expected 3 validation"):
        grading.expect_splits(grading.SplitRecorder(Fake()), "f", validation=3, test=0)
