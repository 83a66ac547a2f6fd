"""Smoke test of bench/training/compare.py: every task, every method whose
optimizer class is in this checkout, a few steps and one seed, through the
real natgrad-server ($NATGRAD_SERVER or build/server/natgrad-server). Checks
the JSON: finite losses for every method and each one's train loss lower at
the end than at the start; and that the table and the plot were written."""
import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare  # noqa: E402


def test_small_comparison_through_the_server(tmp_path):
    import natgrad
    server = natgrad.find_server_binary()
    assert server, "natgrad-server not found: set $NATGRAD_SERVER or build build/server/natgrad-server"
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "compare.py"), "--size", "small", "--steps", "25",
         "--seeds", "1", "--out", str(out), "--server", server],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert (out / "table.md").read_text().count("| torch Adam |") == 3
    assert (out / "training_comparison.png").stat().st_size > 10_000

    methods = compare.make_methods()
    assert set(res["tasks"]) == {"mlp", "cnn", "transformer"}
    for tname, tr in res["tasks"].items():
        assert set(tr["methods"]) == set(methods)
        assert isinstance(tr["target_loss"], float) and math.isfinite(tr["target_loss"])
        for mname, m in tr["methods"].items():
            present, why = methods[mname].available()
            # A class in the checkout must run: "not available" is only for a
            # class that is missing (a server refusing its kind is a failure here).
            assert m["available"] == present, f"{tname}/{mname}: {m['reason'] or why}"
            if not present:
                continue
            assert len(m["runs"]) == 1, f"{tname}/{mname}"
            r = m["runs"][0]
            assert r["error"] is None, f"{tname}/{mname}: {r['error']}"
            h = r["hist"]
            assert h["step"][0] == 0 and h["step"][-1] == 25
            for key in ("train_loss", "test_loss"):
                assert all(isinstance(v, float) and math.isfinite(v) for v in h[key]), f"{tname}/{mname} {key}"
            assert r["final_train_loss"] == h["train_loss"][-1]
            assert h["train_loss"][-1] < h["train_loss"][0], (
                f"{tname}/{mname}: train loss {h['train_loss'][0]:.4f} -> {h['train_loss'][-1]:.4f}")
            assert r["wall"] > 0 and r["ms_per_step"] > 0

    # --replot rebuilds the same table from the JSON alone.
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "compare.py"), "--replot",
                           str(out / "results.json"), "--out", str(again)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (again / "table.md").read_text() == (out / "table.md").read_text()


@pytest.mark.parametrize("bad", [["--tasks", "nope"], ["--methods", "adam,lbfgs"]])
def test_rejects_unknown_names(bad, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "compare.py"), "--out", str(tmp_path)] + bad,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown" in proc.stderr
