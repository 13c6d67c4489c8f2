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
    "crossover": ["--quick"],
    "bank": ["--entries", "3000", "--owners", "30", "--evict", "200", "--dim", "16"],
    "scale": ["--configs", "12:0.25", "--rounds", "1", "--eval-clients", "3", "--threads", "1"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_script_runs(name):
    args = CASES[name] + ["--no-csv"]
    if name not in ("round", "bank", "scale"):  # (these time whole operations, no repeats)
        args += ["--warmup", "0", "--repeat", "1"]
    env = {**os.environ, "OMNIFM_BACKEND": ""}
    env.pop("TRITON_INTERPRET", None)  # benchmarks time real backends only
    res = subprocess.run([sys.executable, "-m", "omnifm.cli", "bench", name, *args], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "omnifm" in res.stdout or "ext" in res.stdout or "KnowledgeBank" in res.stdout


@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_help_is_the_scripts_own_and_offers_record(name):
    res = subprocess.run([sys.executable, "-m", "omnifm.cli", "bench", name, "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"bench_{name}.py" in res.stdout and "--record" in res.stdout and "local_results.csv" in res.stdout


def test_rows_go_to_the_untracked_file_unless_recorded():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import harness
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    import argparse

    p = argparse.ArgumentParser()
    harness.add_output_args(p)
    assert harness.csv_path(p.parse_args([])) == os.path.join(ROOT, "bench", "local_results.csv")
    assert harness.csv_path(p.parse_args(["--record"])) == os.path.join(ROOT, "bench", "results.csv")
    assert not p.parse_args(["--no-csv"]).csv
