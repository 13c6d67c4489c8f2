"""`omnifm train` on bad input, as a new user types it: one line naming the flag, exit
status 2, nothing written; and the light commands stay light."""
import json
import subprocess
import sys

import pytest

import omnifm.fl
from omnifm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def train_error(capsys, tmp_path, *argv):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing is written before the inputs are known good
    return err


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds: expected at least 1, got 0"),
    (["--rounds", "-3"], "--rounds: expected at least 1, got -3"),
    (["--rounds", "two"], "argument --rounds: invalid int value: 'two'"),
    (["--participation", "1.5"], "--participation: expected a fraction in (0, 1], got 1.5"),
    (["--participation", "0"], "--participation: expected a fraction in (0, 1], got 0"),
    (["--participation", "nan"], "--participation: expected a finite number"),
    (["--clients", "0"], "--clients: expected at least 1, got 0"),
    (["--lr", "-0.1"], "--lr: expected a positive number, got -0.1"),
    (["--batch-size", "0"], "--batch-size: expected at least 1"),
    (["--strategy", "fedavg,nope"], "--strategy: unknown ['nope']"),
    (["--strategy", ","], "--strategy: unknown"),
    (["--tuning", "lora"], "--tuning: only the vqa task reads it, not classification"),
    (["--scale", "4", "--task", "segmentation"], "--scale: only the super_resolution task reads it, not segmentation"),
    (["--task", "super_resolution", "--scale", "3"], "--scale: expected one of (2, 4, 8), got 3"),
    (["--scenario", "nowhere"], "scenario"),
    (["--data", "medmnist"], "data"),
    (["--dp-noise", "1"], "--dp-noise: noise needs a clipping norm (dp_clip > 0)"),
    (["--dp-clip", "1", "--dp-delta", "0"], "--dp-delta: expected a value in (0, 1)"),
])
def test_bad_train_arguments_are_one_line_naming_the_flag(capsys, tmp_path, argv, message):
    err = train_error(capsys, tmp_path, *argv)
    assert message in err and err.startswith("omnifm train: error:")


def test_resume_of_a_missing_run_names_the_folder(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--resume", str(tmp_path / "nothing")])
    assert exit_.value.code == 2 and f"--resume {tmp_path / 'nothing'}: no config.json there" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="participation"):
        main(["train", "--participation", "2", "--debug", "--out", str(tmp_path / "out")])


class FakeSimulation:
    """Stands in for the federation: records its configs, runs one round."""
    made = []

    def __init__(self, cfg, out_dir):
        self.cfg = cfg
        FakeSimulation.made.append(cfg)

    def run(self, resume=False):
        return [{"round": r + 1, "accuracy": 0.5, "f1": 0.4, "loss": 1.0, "seconds": 0.1, "bytes_up": 1,
                 "bytes_down": 1} for r in range(self.cfg.rounds)]


def stand_in_checkpoints(out, strategies):
    """The fake federation writes no checkpoint: files that load, for --resume's check."""
    import torch

    for name in strategies:
        (out / name).mkdir(exist_ok=True)
        torch.save({"next_round": 2}, out / name / "checkpoint.pt")


def test_one_client_warns_and_resume_records_the_new_rounds(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(omnifm.fl, "Simulation", FakeSimulation)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="--clients 1: one client is not a federation"):
        main(["train", "--clients", "1", "--rounds", "2", "--strategy", "fedavg,local", "--out", str(out)])
    assert [c.strategy for c in FakeSimulation.made[-2:]] == ["fedavg", "local"]
    stand_in_checkpoints(out, ("fedavg", "local"))
    main(["train", "--resume", str(out), "--rounds", "5"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["rounds"] == 5 and saved["strategies"] == ["fedavg", "local"]
    assert "5 rounds" in capsys.readouterr().out


def test_train_help_lists_strategies_tasks_and_each_tasks_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "strategies: ditto, fedadam, fedavg," in text and "scaffold" in text
    for task in ("classification", "segmentation", "super_resolution", "fusion", "vqa"):
        assert f"  {task}: --scenario " in text
    assert "fusion: --scenario pairs, --clients 3, --participation 1.0, --batch-size 4" in text


def test_info_does_not_import_the_federation_layer():
    code = ("import sys; from omnifm.cli import main; main(['info', '--json']); "
            "print(sorted(m for m in ('monai', 'omnifm.fl', 'omnifm.tasks', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("damage", ["zero-byte", "truncated", "missing"])
def test_resume_with_a_damaged_checkpoint_names_the_file(monkeypatch, tmp_path, capsys, damage):
    monkeypatch.setattr(omnifm.fl, "Simulation", FakeSimulation)
    out = tmp_path / "run"
    main(["train", "--rounds", "2", "--strategy", "fedavg,local", "--out", str(out)])
    config = (out / "config.json").read_text()
    stand_in_checkpoints(out, ("fedavg", "local"))
    path = out / "local" / "checkpoint.pt"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"" if damage == "zero-byte" else path.read_bytes()[:40])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--resume", str(out), "--rounds", "4"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and str(path) in err, err
    assert ("no checkpoint of local" if damage == "missing" else "is not a readable checkpoint") in err
    assert (out / "config.json").read_text() == config  # nothing rewritten


def test_sigkill_mid_run_then_resume_ends_as_an_uninterrupted_run(tmp_path):
    """The server process killed with SIGKILL after some rounds; --resume finishes the
    run with exactly the metrics of one that was never interrupted."""
    import os
    import signal
    import time

    args = ["--strategy", "omnifm", "--rounds", "6", "--clients", "3", "--participation", "0.67",
            "--samples-per-client", "24", "--image-size", "16", "--width", "0.125", "--local-epochs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "omnifm.cli", "train", *args]
    whole = subprocess.run([*cmd, "--out", str(tmp_path / "whole")], capture_output=True, text=True, env=env,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*cmd, "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = cut / "omnifm" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 6
    res = subprocess.run([sys.executable, "-m", "omnifm.cli", "train", "--resume", str(cut)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run / "omnifm" / "metrics.jsonl").read_text().splitlines()]
    assert rows(cut) == rows(tmp_path / "whole") and len(rows(cut)) == 6
