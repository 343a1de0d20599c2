"""merging_helpers.grading: each check passes a right answer and turns a wrong one into a
GradingError whose message says what was expected (the course assignments)."""
import pytest
import torch

from merging_helpers import grading


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
