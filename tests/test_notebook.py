import sys
import time
import types


from merging_helpers import notebook


def test_glue_prints_without_myst_nb(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "myst_nb", None)   # as on Colab: importing it fails
    assert notebook.glue("x", 1.5, display=True) is None
    assert capsys.readouterr().out == "x = 1.5\n"
    notebook.glue("y", 2)
    assert capsys.readouterr().out == ""


def test_glue_hands_the_value_to_myst_nb(monkeypatch):
    seen = []
    monkeypatch.setitem(sys.modules, "myst_nb", types.SimpleNamespace(glue=lambda *a, **k: seen.append((a, k))))
    notebook.glue("z", 3)
    assert seen == [(("z", 3), {"display": False})]


def test_glue_passes_plain_numbers_so_format_specs_work(monkeypatch):
    import numpy as np
    import torch
    seen = []
    monkeypatch.setitem(sys.modules, "myst_nb", types.SimpleNamespace(glue=lambda name, value, display: seen.append(value)))
    for value in (np.float64(71.25), np.int64(3), torch.tensor(0.5), 2.0, "text"):
        notebook.glue("v", value)
    assert seen == [71.25, 3, 0.5, 2.0, "text"]
    assert [type(v) for v in seen[:3]] == [float, int, float]
    assert format(float(repr(seen[0])), ".1f") == "71.2"   # what myst-nb does with `{glue:text}`v:.1f``


def test_run_time_counts_from_setup(monkeypatch, capsys):
    glued = {}
    monkeypatch.setattr(notebook, "glue", lambda name, value, display=False: glued.setdefault(name, value))
    monkeypatch.setattr(notebook, "_chapter_started", time.perf_counter() - 42)
    seconds = notebook.glue_run_time()
    assert 42 <= seconds < 60 and glued["chapter_seconds"] == round(seconds)
    assert "chapter run time: 42 s" in capsys.readouterr().out
    notebook.setup(quiet=True)
    assert notebook.glue_run_time() < 30
