"""Tasks the recipes and the `headprep` command know how to build: arguments, data, model and metrics.

A task is registered with its argument dataclass (parsed by `HfArgumentParser` next to the trainer's config), the
recipe defaults of the trainer's config, and a loader returning [`TaskInputs`]. The sweep records the task name and
arguments in `sweep.json`, so `headprep exchange` can rebuild the same data and model later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import TaskInputs
from .graph import GRAPH_DEFAULTS, GRAPH_SWEEP_DEFAULTS, GraphArguments, load_graph
from .image_classification import (
    IMAGE_CLASSIFICATION_DEFAULTS,
    IMAGE_CLASSIFICATION_SWEEP_DEFAULTS,
    ImageClassificationArguments,
    load_image_classification,
    without_ignored_toy_augmentation,
)
from .segmentation import SEGMENTATION_DEFAULTS, SEGMENTATION_SWEEP_DEFAULTS, SegmentationArguments, load_segmentation


@dataclass(frozen=True)
class Task:
    name: str
    arguments: type
    defaults: dict[str, Any]
    load: Callable[[Any, int], TaskInputs]
    sweep_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)


TASKS: dict[str, Task] = {
    "image_classification": Task(
        "image_classification",
        ImageClassificationArguments,
        IMAGE_CLASSIFICATION_DEFAULTS,
        load_image_classification,
        IMAGE_CLASSIFICATION_SWEEP_DEFAULTS,
    ),
    "segmentation": Task(
        "segmentation", SegmentationArguments, SEGMENTATION_DEFAULTS, load_segmentation, SEGMENTATION_SWEEP_DEFAULTS
    ),
    "graph": Task("graph", GraphArguments, GRAPH_DEFAULTS, load_graph, GRAPH_SWEEP_DEFAULTS),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; available: {sorted(TASKS)}.")
    return TASKS[name]


def task_record(task: Task, arguments) -> dict[str, Any]:
    """JSON-able `{"name", "args"}` for `sweep.json`."""
    return {"name": task.name, "args": dataclasses.asdict(arguments)}


def load_task_from_record(record: dict[str, Any], seed: int) -> TaskInputs:
    """The task a `sweep.json` records (`task_record`), loaded for `seed`."""
    task = get_task(record["name"])
    args = task.arguments(**record["args"])
    if task.name == "image_classification":
        args = without_ignored_toy_augmentation(args)
    return task.load(args, seed)


__all__ = ["TASKS", "Task", "TaskInputs", "get_task", "load_task_from_record", "task_record"]
