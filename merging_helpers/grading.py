"""Checks for the course assignments (the instructor's page, "Course assignments").

The autograder's tests call these on a student's function and its result, so that a
wrong answer reads as what was expected ("task_vector returned None: fill in the
function"), not as a traceback from deep inside the package. Every comparison moves
tensors to the CPU in float64 first, so a notebook run on a GPU is graded the same as
on the CPU, within the stated tolerances (ATOL, RTOL).
"""

from __future__ import annotations

import dis
import functools
import importlib
import inspect
import math
import types
from collections.abc import Mapping

import torch

ATOL = 1e-5  # float32 results computed in another order (GPU kernels, another sum order) fit these
RTOL = 1e-4


class GradingError(AssertionError):
    """A test's verdict: what was expected and what came back (an AssertionError, so otter counts it as a failure)."""


# What an answer may use of the package: data, models and scoring, never a step of a merge (the
# engine is what the tests compare an answer with). An assignment that builds on another's subject
# (DELLA on TIES's election) adds names with :func:`permit`.
ANSWER_MAY_USE = ("merging_helpers.partitions.describe", "merging_helpers.tasks", "merging_helpers.zoo",
                  "merging_helpers.evaluation.Evaluator", "merging_helpers.notebook")
_permitted: set[str] = set()


def permit(*qualified: str) -> None:
    """Let answers use these package names too (for an assignment whose subject is not theirs)."""
    _permitted.update(qualified)


def _package_name(obj) -> str | None:
    """``obj``'s dotted name when it is a module, function or class of merging_helpers, else None."""
    if isinstance(obj, functools.partial):
        return _package_name(obj.func)
    if inspect.ismodule(obj):
        name = obj.__name__
    elif inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
        name = f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', obj.__name__)}"
    else:
        return None
    return name if name.split(".")[0] == "merging_helpers" else None


def _imported(module: str, attribute: str | None):
    """What ``from module import attribute`` (or ``import module``) binds."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(found, attribute, found) if attribute else found


def _reached(fn) -> list:
    """The objects ``fn``'s code names: globals (but those a test bound with :func:`using`), the
    attribute read from a module right away, imports inside it, closure values; nested functions
    and lambdas included."""
    env, skip = fn.__globals__, getattr(fn, "__injected__", set())
    found = [c.cell_contents for c in (fn.__closure__ or ()) if c.cell_contents is not None]
    stack = [fn.__code__]
    while stack:
        code = stack.pop()
        stack += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        loaded, importing = None, None  # the module the last instruction loaded; the module imported from
        for ins in dis.get_instructions(code):
            if ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and loaded is not None:
                found[-1] = getattr(loaded, ins.argval, loaded)  # deltas.task_vector, not deltas
            loaded = None
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and ins.argval in env and ins.argval not in skip:
                found.append(env[ins.argval])
                loaded = found[-1] if inspect.ismodule(found[-1]) else None
            elif ins.opname == "IMPORT_NAME":
                importing = _imported(ins.argval, None)
                found.append(importing)
            elif ins.opname == "IMPORT_FROM" and inspect.ismodule(importing):
                if found and found[-1] is importing:
                    found.pop()  # from drop import dare_mask: the function, not the module
                found.append(_imported(importing.__name__, ins.argval))
    return found


def engine_calls(fn) -> list[str]:
    """The package names outside :data:`ANSWER_MAY_USE` that ``fn`` reaches, following the functions
    of the student's notebook it calls; an alias made in another cell (``tv = deltas.task_vector``)
    is caught, as its value is the package's function."""
    allowed = (*ANSWER_MAY_USE, *_permitted)
    notebook = getattr(fn, "__wrapped_answer__", fn).__globals__
    found, seen, todo = [], set(), [fn]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for obj in _reached(current):
            name = _package_name(obj)
            if name is None:
                if inspect.isfunction(obj) and obj.__globals__ is notebook:
                    todo.append(obj)
            elif not any(name == a or name.startswith(a + ".") for a in allowed) and name not in found:
                found.append(name)
    return found


def expect_own_code(fn, name: str) -> None:
    """``fn`` is the student's own function and, with the notebook functions it calls, does not use
    the package's engine."""
    own = _package_name(getattr(fn, "__wrapped_answer__", fn))
    used = [own] if own else engine_calls(fn) if inspect.isfunction(fn) else []
    if used:
        raise GradingError(f"{name} uses {', '.join(used)}: write it yourself with torch (the tests compare "
                           "your answer with the package)")


def expect_signature(fn, name: str, params: tuple[str, ...]) -> None:
    """``fn`` is a function of the student's own code that takes exactly ``params`` (by position;
    defaults allowed)."""
    if fn is None or fn is Ellipsis:
        raise GradingError(f"{name} is not defined yet: write the function {name}({', '.join(params)})")
    if not callable(fn):
        raise GradingError(f"{name} should be a function, got a {type(fn).__name__}")
    expect_own_code(fn, name)
    got = tuple(inspect.signature(fn).parameters)
    if len(got) != len(params):
        raise GradingError(f"{name} should take ({', '.join(params)}); yours takes ({', '.join(got)})")


def using(fn, **parts):
    """``fn`` with the global names in ``parts`` bound to other functions (the reference versions of
    earlier questions), so that a question is graded apart from the answers it builds on. Anything
    but a Python function (a name never defined: None) is returned as it is, for :func:`call` to name."""
    if not inspect.isfunction(fn):
        return fn
    env = {**fn.__globals__, **parts}
    swapped = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
    swapped.__kwdefaults__ = fn.__kwdefaults__
    swapped.__wrapped_answer__, swapped.__injected__ = fn, set(parts)
    return swapped


def call(fn, name: str, *args, **kwargs):
    """``fn(*args, **kwargs)``, with an exception from the student's code reported as a verdict; an
    answer that uses the package's engine is refused first (:func:`expect_own_code`)."""
    if fn is None or fn is Ellipsis or not callable(fn):
        raise GradingError(f"{name} is not defined as a function yet: write it (got {fn!r})")
    expect_own_code(fn, name)
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
    result = result.detach().cpu()
    if result.is_floating_point() and bool(torch.isnan(result).any()):
        worst = int(torch.isnan(result).reshape(-1).int().argmax())
        raise GradingError(f"{name} contains NaN (first at flat index {worst}): look for a division by zero")
    return result


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
        number = result.detach().cpu().double().reshape(())
    else:
        try:
            number = torch.tensor(float(result), dtype=torch.float64)
        except (TypeError, ValueError):
            raise GradingError(f"{name} should return a number, got a {type(result).__name__}") from None
    if torch.isnan(number):
        raise GradingError(f"{name} returned NaN: look for a division by zero or a mean of nothing")
    return number


class SplitRecorder:
    """An evaluator that records the split of every ``accuracy`` call, so a test can check that a
    hyper-parameter was chosen on validation and only the chosen merge was scored on test."""

    def __init__(self, evaluator):
        self._evaluator, self.splits = evaluator, []

    def accuracy(self, state_dict, split: str = "test", *args, **kwargs):
        self.splits.append(split)
        return self._evaluator.accuracy(state_dict, split, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._evaluator, name)


def expect_splits(recorder: SplitRecorder, name: str, validation: int, test: int) -> None:
    """``recorder`` saw this many validation and test scorings (no other split)."""
    counts = {s: recorder.splits.count(s) for s in set(recorder.splits)}
    if counts.get("test", 0) > test:
        raise GradingError(f"{name} scored the test split {counts['test']} times, expected {test}: choose on "
                           "validation, then score only the chosen merge on test")
    wanted = {"validation": validation, "test": test}
    if {s: counts.get(s, 0) for s in wanted} != wanted or set(counts) - set(wanted):
        raise GradingError(f"{name} scored the splits {counts}, expected {validation} validation and {test} test "
                           "scorings (one per value of the grid, then the chosen one)")
