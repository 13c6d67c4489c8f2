"""The benchmark scripts run end to end on tiny shapes (no timing is asserted)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "spectral": ["--batch", "2", "--height", "16", "--width", "12", "--size", "4", "--mix-dim", "4",
                 "--hidden-dim", "8", "--dim", "8", "--no-compile"],
    "topk": ["--bank", "3000", "--dim", "16", "--queries", "8", "--k", "3"],
    "eca": ["--batch", "2", "--tokens", "20", "--dim", "8", "--head-dim", "8", "--no-compile"],
    "round": ["--clients", "2", "--participation", "1.0", "--rounds", "1"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_script_runs(name):
    args = CASES[name] + ["--no-csv"]
    if name != "round":
        args += ["--warmup", "0", "--repeat", "1"]
    env = {**os.environ, "OMNIFM_BACKEND": ""}
    env.pop("TRITON_INTERPRET", None)  # benchmarks time real backends only
    res = subprocess.run([sys.executable, "-m", "omnifm.cli", "bench", name, *args], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "omnifm" in res.stdout or "ext" in res.stdout
