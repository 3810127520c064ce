"""What a task loader returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class TaskInputs:
    """Model with its new task head, data splits and metrics of one task."""

    model: nn.Module
    train_dataset: Any
    eval_dataset: Any
    test_dataset: Any = None
    compute_metrics: Callable | None = None
    class_names: list[str] = field(default_factory=list)
    data_collator: Callable | None = None
