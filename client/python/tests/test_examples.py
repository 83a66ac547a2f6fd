"""The examples, end to end against a real server."""
import os
import subprocess
import sys
import time

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
sys.path.insert(0, EXAMPLES)


def test_svgp_one_natural_step_reaches_collapsed_bound(target):
    import svgp_diabetes
    out = svgp_diabetes.run(target, steps=8, M=20, gamma=1.0, verbose=False)
    assert out["gamma_used"] == 1.0
    assert out["ok"], (out["elbo1"], out["bound"])
    assert out["elbo1"] > out["elbo0"]
    # Hyperparameter learning (Adam block) improves the bound further.
    assert out["final_bound"] > out["bound"]
    assert out["final_elbo"] == pytest.approx(out["final_bound"], rel=1e-3)


@pytest.mark.slow
def test_digits_quick_demo(server_binary, tmp_path):
    png = tmp_path / "digits.png"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "digits_kfac.py"), "--quick",
                        "--server", server_binary, "--no-progress", "--plot", str(png)],
                       capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "natgrad K-FAC" in r.stdout and "torch Adam" in r.stdout
    assert "steps to 95%" in r.stdout
    assert png.exists() and png.stat().st_size > 10_000
    assert elapsed < 120, f"--quick took {elapsed:.0f}s"
    # K-FAC reaches a sensible accuracy.
    line = next(l for l in r.stdout.splitlines() if l.startswith("natgrad K-FAC"))
    assert float(line.split()[-5]) > 0.9, line


def test_svgp_script_cli(target):
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "svgp_diabetes.py"), "--target", target,
                        "--quick", "--inducing", "15"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reached" in r.stdout and "NOT reached" not in r.stdout
