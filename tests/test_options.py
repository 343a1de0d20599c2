"""options.options_from: knobs as an object or by name, the same call; unknown names refused with the list."""
import dataclasses

import pytest

from merging_helpers.options import options_from


@dataclasses.dataclass(frozen=True)
class Knobs:
    chunk: int = 32
    progress: bool = False


def test_by_name_and_as_an_object_are_the_same_call():
    assert options_from(Knobs, None, {"chunk": 64}, "f") == Knobs(chunk=64) == options_from(Knobs, Knobs(64), {}, "f")
    assert options_from(Knobs, Knobs(chunk=8), {"progress": True}, "f") == Knobs(8, True)  # by name wins


def test_an_unknown_knob_is_refused_with_the_list():
    with pytest.raises(TypeError, match=r"f: unknown option\(s\) \['chunks'\]; the options are \['chunk', 'progress'\]"):
        options_from(Knobs, None, {"chunks": 64}, "f")
    with pytest.raises(TypeError, match="options must be a Knobs, got a dict"):
        options_from(Knobs, {"chunk": 1}, {}, "f")


def test_the_package_functions_take_their_knobs_both_ways():
    from merging_helpers import apl, rms_explorer, sweeps
    from merging_helpers.adamerging import adamerging
    with pytest.raises(TypeError, match=r"trace: unknown option\(s\) \['chunks'\]"):
        apl.trace(None, {}, {}, "t", [("x", 0)], "layer", chunks=3)
    with pytest.raises(TypeError, match=r"apl.merge: unknown option\(s\) \['lam_scale'\]"):
        apl.merge({}, {}, {}, 0.5, 0.1, lam_scale=2)
    with pytest.raises(TypeError, match=r"adamerging: unknown option\(s\) \['step'\]"):
        adamerging(None, {}, {}, {}, step=3)
    with pytest.raises(TypeError, match=r"merge_and_score: unknown option\(s\) \['splits'\]"):
        rms_explorer.merge_and_score(None, {}, {}, {}, 0.5, 0.1, splits="test")
    with pytest.raises(ValueError, match="grid: give at least one setting"):  # label / progress taken by name
        sweeps.merge_grid(None, {}, {}, "ties", [], label="x", progress=False)
