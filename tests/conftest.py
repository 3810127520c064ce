"""Tiny seeded models and datasets shared by the tests (CPU, seconds each)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import Dataset

from headprep_hf import HeadPrepConfig


class TinyImages(Dataset):
    """Random 3x16x16 images with labels that depend on the image (so a head can learn something)."""

    def __init__(self, n: int = 48, num_classes: int = 3, seed: int = 0, size: int = 16):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, num_classes, (n,), generator=g).numpy()
        for c in range(num_classes):  # class-dependent brightness in one channel
            self.x[self.labels == c, c % 3] += 1.5

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": int(self.labels[i])}


def tiny_timm(num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes)


# Trainer settings of the unit tests: tiny batches, CPU, no reports or checkpoints, quiet.
CONFIG_DEFAULTS = dict(
    hp_epochs=2,
    num_train_epochs=1,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=16,
    learning_rate=1e-3,
    hp_learning_rate=5e-2,
    use_cpu=True,
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    dataloader_num_workers=0,
    drift_probe_samples=20,
    disable_tqdm=True,
    seed=0,
)


def make_config(tmp_path, **overrides) -> HeadPrepConfig:
    return HeadPrepConfig(**{**CONFIG_DEFAULTS, "output_dir": str(tmp_path / "out"), **overrides})


def clone_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


@pytest.fixture
def train_set():
    return TinyImages(48, seed=0)


@pytest.fixture
def eval_set():
    return TinyImages(16, seed=1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
