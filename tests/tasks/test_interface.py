"""Every task honours the Task interface, and the federation layer knows no task."""
import dataclasses
import os
import re

import pytest
import torch
from torch.utils.data import Dataset

from omnifm.fl import FLConfig
from omnifm.fl.client import in_order
from omnifm.tasks import TASKS, ClientData, Task, get_task

FL_DIR = os.path.join(os.path.dirname(__import__("omnifm.fl", fromlist=["x"]).__file__))
TINY = dict(clients=3, samples_per_client=24, image_size=16, width=0.125)


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
    cfg = dataclasses.replace(FLConfig(task=name), **TINY)
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
        assert model.feature_module.features.shape[0] == x.shape[0]  # MOON reads it
        metrics = task.evaluate(model, parts[0].test)
        assert set(metrics) == set(task.metrics) and all(isinstance(v, float) for v in metrics.values())
    groups = task.prototype_groups(y)
    assert groups.shape == (len(y),) and groups.dtype == torch.int64
