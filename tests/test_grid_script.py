"""scripts/grid.py: the experiment grids (several seeds, mean ± std, resumable)."""
import csv
import importlib
import pathlib
import statistics
import sys

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grid():
    # imported by name from scripts/, so the spawned worker processes import it too
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        yield importlib.import_module("grid")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


TINY = ["--set", "rounds=1", "--set", "samples_per_client=8", "--set", "image_size=32", "--set", "width=0.125",
        "--strategies", "fedavg,local", "--cell", "scenario=group4"]


def test_grid_table_is_mean_and_std_of_its_runs_and_resumes(grid, tmp_path, capsys, monkeypatch):
    grid.main(["table6", *TINY, "--seeds", "0,1", "--out", str(tmp_path)])
    with open(tmp_path / "runs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["strategy"], r["seed"]) for r in rows) == [("fedavg", "0"), ("fedavg", "1"),
                                                                 ("local", "0"), ("local", "1")]
    table = (tmp_path / "table.md").read_text().splitlines()
    for strategy in ("fedavg", "local"):
        dice = [float(r["dice"]) for r in rows if r["strategy"] == strategy]
        iou = [float(r["iou"]) for r in rows if r["strategy"] == strategy]
        expected = (f"| {strategy} | {statistics.mean(dice):.3f} ± {statistics.stdev(dice):.3f} / "
                    f"{statistics.mean(iou):.3f} ± {statistics.stdev(iou):.3f} |")
        assert expected in table
    assert len({r["dice"] for r in rows}) > 1  # seeds differ, so the std is not trivially 0

    # a wider rerun with the same --out runs only what is missing (one row per run, the old ones kept)
    grid.main(["table6", *TINY, "--seeds", "0,1,2", "--out", str(tmp_path), "--strategies", "fedavg"])
    with open(tmp_path / "runs.csv", newline="") as fh:
        wider = list(csv.DictReader(fh))
    assert wider[:4] == rows and [(r["strategy"], r["seed"]) for r in wider[4:]] == [("fedavg", "2")]

    # a rerun of the same grid runs nothing
    def no_run(cfg, threads):
        raise AssertionError("ran a run that runs.csv already holds")

    monkeypatch.setattr(grid, "run_one", no_run)  # the module is shared with the next tests
    grid.main(["table6", *TINY, "--seeds", "0,1", "--out", str(tmp_path), "--jobs", "1"])
    with open(tmp_path / "runs.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 5
    # other settings in the same --out are refused, not mixed into the table
    with pytest.raises(SystemExit, match="choose another --out"):
        grid.main(["table6", *TINY, "--set", "rounds=2", "--out", str(tmp_path)])


@pytest.mark.parametrize("argv, message", [
    (["table6", "--set", "bogus=1"], "unknown setting 'bogus'"),
    (["table6", "--set", "rounds=two"], "rounds: expected an integer, got 'two'"),
    (["table6", "--cell", "scale=2"], "--cell 'scale' is not an axis of table6"),
    (["table5", "--cell", "scenario=iid"], "--cell 'scenario' is not an axis of table5"),
    (["table7", "--strategies", "moon,nope"], "unknown strategies ['nope']"),
    (["table2", "--strategies", "fedavg,nope"], "unknown strategies ['nope']"),
    (["table1", "--seeds", "a"], "--seeds takes integers"),
    (["table1", "--jobs", "0"], "--jobs must be at least 1"),
    (["table6", "--set", "scenario=group1"], "--set scenario is the grid's own axis; use --cell"),
    (["table6", "--set", "seed=3"], "--set seed is the grid's own axis; use --seeds"),
    (["table6", "--set", "strategy=fedavg"], "--set strategy is the grid's own axis; use --strategies"),
    (["table6", "--cell", "scenario=group9"], "grid: cell scenario=group9: scenario"),
    (["table2", "--cell", "scale=3", "--cell", "scenario=tissue"], "grid: cell scenario=tissue scale=3: scale"),
])
def test_grid_bad_arguments_name_the_flag(grid, tmp_path, argv, message):
    with pytest.raises(SystemExit) as err:
        grid.main([*argv, "--out", str(tmp_path)])
    assert message in str(err.value)
    assert not (tmp_path / "runs.csv").exists()


def test_vqa_tuning_table_has_a_row_per_strategy_and_a_column_per_regime(grid, tmp_path):
    grid.main(["table5", "--set", "rounds=1", "--set", "samples_per_client=8", "--set", "width=0.125",
               "--strategies", "fedavg,fedper", "--cell", "tuning=full,lora", "--seeds", "0", "--jobs", "2",
               "--out", str(tmp_path)])  # --jobs 2: one thread a run (two: 6-53 s on a busy 2-core box)
    with open(tmp_path / "runs.csv", newline="") as fh:
        runs = {(r["strategy"], r["tuning"]): r for r in csv.DictReader(fh)}
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("vqa: last-round accuracy / majority,") and "| strategy | full | lora |" in table
    for strategy in ("fedavg", "fedper"):  # each cell: accuracy / majority of its run
        cells = [f"{float(runs[strategy, t]['accuracy']):.3f} / {float(runs[strategy, t]['majority']):.3f}"
                 for t in ("full", "lora")]
        assert f"| {strategy} | {' | '.join(cells)} |" in table
