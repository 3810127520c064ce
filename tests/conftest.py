"""Tiny seeded models and datasets shared by the tests (CPU, seconds each)."""

from __future__ import annotations

import os

# One intra-op thread per test process, set before torch is imported (subprocesses the tests start inherit it; a
# value already set is kept). `make test` runs one pytest-xdist worker per core, and the tests run tiny models, where a
# second thread gains little (tests/test_trainer_contract.py alone: 77 s with one thread, 71 s with two). On the
# 2-core CI machine the whole suite took 22 min 20 s in one process of two threads, no less on two workers of two
# threads each (they oversubscribe the cores), and 11 min 22 s on two workers of one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from headprep_hf import HeadPrepConfig  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # (in case torch was imported before this file)


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


def bn_head_model(seed: int = 0) -> torch.nn.Module:
    """test_resnet whose classifier `fc` is Linear - BatchNorm1d - ReLU - Linear (BatchNorm in the head)."""
    model = tiny_timm(seed=seed)
    torch.manual_seed(seed + 1)
    model.fc = torch.nn.Sequential(
        torch.nn.Linear(model.num_features, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    return model


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


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache folder for the recipe tests that only need the 1-epoch MNIST-5k source model (about 7 s to build on
    the CI machine): the first builds it, the others load it. Tests about building the cache keep their own."""
    return tmp_path_factory.mktemp("shared_cache")


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


# Real molecules (drugs and simple organics) for the graph tests; the scaffolds differ enough for a scaffold split.
SMILES = [
    "CC(=O)Oc1ccccc1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "CC(=O)Nc1ccc(O)cc1",
    "c1ccccc1", "CCO", "CCN(CC)CC", "OC(=O)CCC(=O)O", "c1ccc2ccccc2c1", "Clc1ccc(Cl)cc1", "CC(C)O", "C1CCCCC1",
    "c1ccncc1", "O=C(O)c1ccccc1", "CCCCCCCC", "CC(=O)C", "Oc1ccccc1", "Nc1ccccc1", "c1ccc(cc1)-c1ccccc1",
    "CN(C)C(=N)N=C(N)N", "OC1=CC=CC=C1C(=O)O", "CC12CCC3C(CCC4=CC(=O)CCC34C)C1CCC2O", "C1=CC=C(C=C1)CN",
    "COc1ccc2[nH]cc(CCN)c2c1", "CN1CCC[C@H]1c1cccnc1", "O=C1NC(=O)C(N1)(c1ccccc1)c1ccccc1", "FC(F)(F)c1ccccc1",
    "CC(C)(C)c1ccc(O)cc1", "c1ccc2[nH]ccc2c1", "C1CCNCC1", "OCC(O)CO", "CS(=O)C",
]  # fmt: skip


def graph_labels(n: int, num_tasks: int, seed: int = 0, missing: float = 0.3) -> np.ndarray:
    """0/1 labels with a fraction `missing` set to NaN (every molecule keeps at least one label)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=(n, num_tasks)).astype(np.float64)
    drop = rng.random((n, num_tasks)) < missing
    drop[:, 0] = False
    labels[drop] = np.nan
    return labels


def tiny_graph_data(root, num_tasks: int = 3, seed: int = 0, name: str = "tiny-graphs"):
    """The test molecules as an OGB dataset folder (written by the converter), loaded through OGB; returns the
    loaded dataset and its splits."""
    from headprep_hf.data.graphs import load_ogb_dataset, ogb_splits, write_ogb_dataset

    folder = write_ogb_dataset(SMILES, graph_labels(len(SMILES), num_tasks, seed), root, name)
    dataset = load_ogb_dataset(str(folder))
    return dataset, ogb_splits(dataset)


def tiny_gcn(num_tasks: int = 3, seed: int = 0):
    from headprep_hf.models.graph import GCN

    torch.manual_seed(seed)
    return GCN(num_tasks, num_layers=2, hidden_size=16, dropout=0.0)


def run_recipe_and_sweep(
    recipe_name: str, task: str, tiny: list[str], tmp_path, probe_samples: int, sweep_extra: tuple[str, ...] = ()
):
    """End-to-end: `recipes/<recipe_name>.py`'s main() with the `tiny` settings (one HP and FT run), then
    `headprep sweep --task <task>` over tau = 0, 2 with the same settings. Returns (recipe metrics, sweep.json)."""
    import importlib
    import json
    import sys
    from pathlib import Path

    from headprep_hf.cli import main as cli_main
    from headprep_hf.cli import parse_with_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    recipe = importlib.import_module(recipe_name)
    quiet = ["--report_to", "none", "--disable_tqdm", "true", "--drift_probe_samples", str(probe_samples)]
    argv = [*tiny, *quiet, "--hp_epochs", "1", "--output_dir", str(tmp_path / "run"), "--save_strategy", "no"]
    metrics = recipe.main(*parse_with_config(recipe.make_parser(), argv))
    out = tmp_path / "sweep"
    sweep_argv = ["sweep", "--task", task, *tiny, *sweep_extra, "--sweep_taus", "0", "2", "--output_dir", str(out)]
    assert cli_main([*sweep_argv, "--sweep_progress", "false", "--drift_probe_samples", str(probe_samples)]) == 0
    return metrics, json.loads((out / "sweep.json").read_text())
