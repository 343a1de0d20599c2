"""bench.merge_speed's own logic (its timed runs are the chapters' and the benchmarks'): the planned methods'
options at DARE-TIES's drop rate, and the table's ratio of each planned method to DARE-TIES."""
import argparse
import json

import pytest

from merging_helpers.bench import merge_speed


def test_the_planned_methods_are_timed_at_dare_ties_drop_rate(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    assert merge_speed.planned_options("dp", str(tmp_path), 2, 0.3) == {"alpha": pytest.approx(0.7)}
    assert merge_speed.planned_options("rms_adaptive", str(tmp_path), 2, 0.3)["p_default"] == pytest.approx(0.7)
    apl = merge_speed.planned_options("apl", str(tmp_path), 2, 0.3)
    assert apl["drop_rate"] == pytest.approx(0.7) and len(apl["importances"]) == 2
    assert apl["importances"][0].keys == ["layer.0", "layer.1", "layer.2"]
    with pytest.raises(ValueError, match="not a planned method"):
        merge_speed.planned_options("ties", str(tmp_path), 2, 0.3)


def test_the_table_puts_each_planned_method_beside_dare_ties():
    row = dict(tool="ours", wall_s=10.0, input_gbps=1.0, peak_rss_gb=1.0, cpu_s=20.0, load_before=0.1, load_after=0.2)
    results = [dict(row, method="dare_ties"), dict(row, method="dp", wall_s=13.0, cpu_s=30.0)]
    table = merge_speed._table(argparse.Namespace(), results, ["header"])
    assert "dp / dare_ties (ours): wall 1.30x, CPU 1.50x" in table and "rms_adaptive /" not in table
