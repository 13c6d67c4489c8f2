"""The medical-imaging tasks of OmniFM (classification, segmentation, super-resolution,
image fusion, VQA), each a plug-in behind one interface
(`omnifm.tasks.base.Task`), looked up by name. Task modules are imported only when
asked for, so a task's dependencies load only when it runs."""
import importlib

from .base import ClientData, Plain, Task

# name -> "module:class"; a new task adds one line here.
TASKS = {
    "classification": "omnifm.tasks.classification:ClassificationTask",
    "segmentation": "omnifm.tasks.segmentation:SegmentationTask",
    "super_resolution": "omnifm.tasks.super_resolution:SuperResolutionTask",
    "fusion": "omnifm.tasks.fusion:FusionTask",
    "vqa": "omnifm.tasks.vqa:VQATask",
}
# settings only some tasks read; given to another task they are refused, not ignored
TASK_OPTIONS = {"super_resolution": ("scale",), "vqa": ("tuning", "vqa_model")}


def task_class(name):
    if name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {name!r}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def config_for(task, **given):
    """The FLConfig a run of `task` uses: FLConfig's defaults, then the task's (and its
    scenario's) defaults, then `given` (keys left None fall through). The CLI and the
    experiment scripts build their configs here, so both run the same settings."""
    from ..fl.simulation import FLConfig

    given = {k: v for k, v in given.items() if v is not None}
    for owner, options in TASK_OPTIONS.items():
        for key in set(options) & set(given):
            if owner != task:
                raise ValueError(f"{key}: only the {owner} task reads it, not {task}")
    settings = {**task_class(task).defaults(given.get("scenario")), **given, "task": task}
    return FLConfig(**settings)


def get_task(name, cfg):
    """The task plug-in `name`, configured by cfg (an FLConfig)."""
    return task_class(name)(cfg)


__all__ = ["TASKS", "TASK_OPTIONS", "ClientData", "Plain", "Task", "config_for", "get_task", "task_class"]
