"""Helpers shared by the benchmarks in this folder (run as `python bench/<name>.py`)."""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

import timm
import torch
import transformers


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: platform, CPUs, library versions, torch threads and the load average."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "device": "cpu",
        "loadavg_1_5_15": load,
    }


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write a benchmark's raw results, with the command line that produced them."""
    payload = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), **payload}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
