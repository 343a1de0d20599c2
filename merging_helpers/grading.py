"""Checks for the course assignments (the instructor's page, "Course assignments").

The autograder's tests call these on a student's function and its result, so that a
wrong answer reads as what was expected ("task_vector returned None: fill in the
function"), not as a traceback from deep inside the package. Every comparison moves
tensors to the CPU in float64 first, so a notebook run on a GPU is graded the same as
on the CPU, within the stated tolerances (ATOL, RTOL).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import torch

ATOL = 1e-5  # float32 results computed in another order (GPU kernels, another sum order) fit these
RTOL = 1e-4


class GradingError(AssertionError):
    """A test's verdict: what was expected and what came back (an AssertionError, so otter counts it as a failure)."""


def expect_signature(fn, name: str, params: tuple[str, ...]) -> None:
    """``fn`` is a function that takes exactly ``params`` (by position; defaults allowed)."""
    if fn is None or fn is Ellipsis:
        raise GradingError(f"{name} is not defined yet: write the function {name}({', '.join(params)})")
    if not callable(fn):
        raise GradingError(f"{name} should be a function, got a {type(fn).__name__}")
    got = tuple(inspect.signature(fn).parameters)
    if len(got) != len(params):
        raise GradingError(f"{name} should take ({', '.join(params)}); yours takes ({', '.join(got)})")


def call(fn, name: str, *args, **kwargs):
    """``fn(*args, **kwargs)``, with an exception from the student's code reported as a verdict."""
    try:
        return fn(*args, **kwargs)
    except GradingError:
        raise
    except Exception as error:  # the student's bug, said in one line
        raise GradingError(f"{name} raised {type(error).__name__}: {error}") from error


def _not_filled(result, name: str, expected: str) -> None:
    if result is None or result is Ellipsis:
        raise GradingError(f"{name} returned {result!r}: fill in the function (expected {expected})")


def expect_tensor(result, name: str, shape=None, dtype=None) -> torch.Tensor:
    """``result`` is a tensor of this shape and dtype (when given); returns it on the CPU."""
    _not_filled(result, name, "a torch.Tensor")
    if not isinstance(result, torch.Tensor):
        raise GradingError(f"{name} should return a torch.Tensor, got a {type(result).__name__}")
    if shape is not None and tuple(result.shape) != tuple(shape):
        raise GradingError(f"{name} returned shape {tuple(result.shape)}, expected {tuple(shape)}")
    if dtype is not None and result.dtype != dtype:
        raise GradingError(f"{name} returned dtype {result.dtype}, expected {dtype}")
    return result.detach().cpu()


def expect_state_dict(result, name: str, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``result`` maps exactly ``like``'s names to tensors of ``like``'s shapes; returns it on the CPU."""
    _not_filled(result, name, f"a dict of {len(like)} tensors")
    if not isinstance(result, Mapping):
        raise GradingError(f"{name} should return a dict name → tensor, got a {type(result).__name__}")
    missing = [k for k in like if k not in result]
    extra = [k for k in result if k not in like]
    if missing or extra:
        raise GradingError(f"{name} returned the wrong names: missing {missing[:3]}, unexpected {extra[:3]}")
    return {k: expect_tensor(result[k], f"{name}[{k!r}]", like[k].shape) for k in like}


def expect_close(result: torch.Tensor, expected: torch.Tensor, name: str, atol=ATOL, rtol=RTOL) -> None:
    """|result − expected| ≤ atol + rtol·|expected| everywhere; the message gives the worst entry."""
    got, want = result.detach().cpu().double(), expected.detach().cpu().double()
    if got.shape != want.shape:
        raise GradingError(f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    excess = (got - want).abs() - (atol + rtol * want.abs())
    if got.numel() and bool((excess > 0).any() or torch.isnan(got).any()):
        worst = int(torch.nan_to_num(excess, nan=math.inf).reshape(-1).argmax())
        raise GradingError(f"{name} is wrong at flat index {worst}: got {got.reshape(-1)[worst].item():.6g}, "
                           f"expected {want.reshape(-1)[worst].item():.6g} (tolerance {atol:g} + {rtol:g}·|expected|)")


def expect_state_dicts_close(result, expected: Mapping[str, torch.Tensor], name: str, atol=ATOL, rtol=RTOL) -> None:
    """Every tensor of ``result`` is close to ``expected``'s (the message names the first that is not)."""
    result = expect_state_dict(result, name, expected)
    for key, want in expected.items():
        expect_close(result[key], want, f"{name}[{key!r}]", atol, rtol)


def expect_unchanged(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], name: str) -> None:
    """A function must not modify its inputs in place (``before`` is a copy taken before the call)."""
    for key, tensor in before.items():
        if not torch.equal(tensor, after[key]):
            raise GradingError(f"{name} modified its input in place ({key!r} changed): work on copies")


def expect_rate(count: int, n: int, p: float, name: str, z: float = 5.0) -> None:
    """``count`` successes out of ``n`` fit a Binomial(n, p) within ``z`` standard deviations."""
    sd = math.sqrt(n * p * (1 - p))
    if abs(count - n * p) > z * sd + 1e-9:
        raise GradingError(f"{name}: {count} of {n} ({count / n:.4f}), expected about {p:.4f} "
                           f"(more than {z:g} standard deviations away, so not chance)")


def expect_raises(fn, name: str, args: tuple, error=ValueError, why: str = "") -> None:
    """``fn(*args)`` must raise ``error`` (bad input gets a clear error)."""
    try:
        fn(*args)
    except error:
        return
    except Exception as other:
        raise GradingError(f"{name}{args!r} raised {type(other).__name__}, expected {error.__name__} {why}") from other
    raise GradingError(f"{name}{args!r} should raise {error.__name__} {why}")


def expect_pair(result, name: str, what: str) -> None:
    """``result`` is a tuple of two (e.g. ``(best_lambda, scores)``)."""
    _not_filled(result, name, what)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise GradingError(f"{name} should return {what}, got a {type(result).__name__}")


def expect_keys(result, name: str, keys) -> None:
    """``result`` is a dict with exactly these keys."""
    _not_filled(result, name, f"a dict with keys {sorted(keys)}")
    if not isinstance(result, Mapping) or set(result) != set(keys):
        got = sorted(result) if isinstance(result, Mapping) else type(result).__name__
        raise GradingError(f"{name} should return a dict with keys {sorted(keys)}, got {got}")


def expect_number(result, name: str) -> torch.Tensor:
    """``result`` is a real number (a Python or NumPy number, or a one-element tensor); returns it as a 0-d tensor."""
    _not_filled(result, name, "a number")
    if isinstance(result, torch.Tensor) and result.numel() == 1:
        return result.detach().cpu().double().reshape(())
    try:
        return torch.tensor(float(result), dtype=torch.float64)
    except (TypeError, ValueError):
        raise GradingError(f"{name} should return a number, got a {type(result).__name__}") from None
