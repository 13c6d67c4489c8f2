"""Every task honours the Task interface, and the federation layer knows no task."""
import os
import re

import pytest
import torch
from torch.utils.data import Dataset

from omnifm.fl import FLConfig, Simulation
from omnifm.fl.client import in_order
from omnifm.tasks import TASKS, ClientData, Task, get_task, task_class

FL_DIR = os.path.join(os.path.dirname(__import__("omnifm.fl", fromlist=["x"]).__file__))
TINY = dict(clients=3, samples_per_client=12, image_size=32, width=0.125)


def tiny_size(name):
    """TINY's image size, or the smallest one the task takes when larger (fusion's VIF: 41 px)."""
    return max(TINY["image_size"], task_class(name).min_image_size)


def test_fl_has_no_task_code():
    """omnifm.fl imports no task module and never branches on a task or data source
    (it only looks tasks up by name through omnifm.tasks.get_task)."""
    task_names = "|".join(map(re.escape, TASKS))
    offenders = []
    for name in sorted(os.listdir(FL_DIR)):
        if not name.endswith(".py"):
            continue
        text = open(os.path.join(FL_DIR, name)).read()
        code = re.sub(r"#.*", "", text)  # comments may name tasks
        for pattern in (rf"tasks\.({task_names})\b", r"from \.\.tasks\.\w+ import", r"import omnifm\.tasks\.\w+",
                        r"\btask\s*(==|!=|\bin\b)", r"\bdata\s*(==|!=|\bin\b)", r"isinstance\([^)]*Task\b"):
            offenders += [f"{name}: {m.group(0)!r}" for m in re.finditer(pattern, code)]
    assert not offenders, offenders


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="task"):
        get_task("detection", FLConfig())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_conforms(name):
    # group4 has 3 institutions
    cfg = FLConfig(task=name, **{**task_class(name).defaults(), **TINY, "image_size": tiny_size(name)})
    task = get_task(name, cfg)
    assert isinstance(task, Task) and task.name == name
    assert task.head_prefix and task.metrics and task.main_metric in task.metrics
    assert all(m == m.lower() for m in task.metrics)
    parts = task.federation()
    assert len(parts) == cfg.clients
    for part in parts:
        assert isinstance(part, ClientData) and isinstance(part.train, Dataset) and len(part.train) > 0
        assert len(part.test) > 0
    for omnifm in (False, True):
        torch.manual_seed(0)
        model = task.build_model(omnifm=omnifm, adapter_kwargs=dict(topk=2, gskr=True, eca=True, psp=True))
        names = [n for n, _ in model.named_parameters()]
        assert any(n.startswith(task.head_prefix) for n in names), "the head prefix names no parameter"
        x, y = next(in_order(parts[0].train, 4))
        if omnifm:
            model.set_bank(torch.nn.functional.normalize(torch.randn(5, task.adapter_dim), dim=1))
        model.train()
        out = model(x)
        loss = task.loss(out, y) + model.alignment_loss()
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert model.feature_module.features.shape[0] == len(y)  # MOON reads it (x may be a dict of tensors)
        # every tensor once in the state dict: a duplicate would be sent (and counted) twice
        pointers = [t.data_ptr() for t in model.state_dict().values() if t.numel()]
        assert len(pointers) == len(set(pointers))
        metrics = task.evaluate(model, parts[0].test)
        assert set(metrics) == set(task.metrics) and all(isinstance(v, float) for v in metrics.values())
    groups = task.prototype_groups(y)
    assert groups.shape == (len(y),) and groups.dtype == torch.int64


RUN = dict(TINY, participation=0.67, local_epochs=1, batch_size=4)


def config(task, strategy, rounds):
    return FLConfig(task=task, strategy=strategy, rounds=rounds,
                    **{**task_class(task).defaults(), **RUN, "image_size": tiny_size(task)})


@pytest.mark.parametrize("strategy", ["omnifm", "fedavg"])
@pytest.mark.parametrize("name", sorted(set(TASKS) - {"classification"}))  # classification: tests/fl
def test_resume_and_same_seed(name, strategy, tmp_path, one_thread):
    """Same seed -> same full state; resumed run == uninterrupted run, for every task."""
    from tests.fl.test_simulation import assert_same_state

    full = Simulation(config(name, strategy, 2), str(tmp_path / "full"), progress=False)
    full.run()
    again = Simulation(config(name, strategy, 2), progress=False)
    again.run()
    assert_same_state(again, full)
    Simulation(config(name, strategy, 1), str(tmp_path / "cut"), progress=False).run()
    resumed = Simulation(config(name, strategy, 2), str(tmp_path / "cut"), progress=False)
    resumed.run(resume=True)
    assert_same_state(resumed, full)
    row = full.history[-1]
    assert set(task_class(name).metrics) <= set(row) and row["rejected"] == []


@pytest.mark.parametrize("name", sorted(TASKS))
def test_cli_two_rounds(name, tmp_path):
    """`omnifm train --task NAME` end to end: a table with the task's metrics, curves."""
    import subprocess
    import sys

    args = ["--task", name, "--strategy", "omnifm,fedavg", "--rounds", "2", "--clients", "3",
            "--samples-per-client", "12", "--image-size", str(tiny_size(name)), "--width", "0.125",
            "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "omnifm.cli", "train", *args], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    table = (tmp_path / "results.md").read_text()
    for metric in task_class(name).metrics:
        assert f"| {metric} " in table.splitlines()[2]
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_config_for_layers_task_defaults_under_given_values():
    from omnifm.fl import FLConfig
    from omnifm.tasks import config_for

    assert config_for("classification") == FLConfig()
    cfg = config_for("segmentation", scenario="group2", batch_size=4, lr=None)
    assert (cfg.task, cfg.clients, cfg.batch_size, cfg.lr, cfg.participation) == ("segmentation", 6, 4, 0.05, 1.0)
    assert cfg.rounds == FLConfig().rounds
    cfg = config_for("super_resolution", scale=8, participation=0.5)
    assert (cfg.scenario, cfg.scale, cfg.participation, cfg.batch_size) == ("tissue", 8, 0.5, 8)
