"""Graph property prediction: a GCN (OGB atom/bond encoders) on OGB molecule datasets, read by OGB's own loader.

Offline default: REAL measured affinities shipped in `MoleculeACE` (ChEMBL Ki/EC50, active = <= 100 nM), converted
to the OGB format (`headprep_hf.data.graphs`). The source model is pretrained multi-task on 24 targets (missing labels
where a molecule was not measured; the paper's "Sup-pcba" role) and cached; the downstream task is 6 held-out targets
(multi-task, missing labels, scaffold split, ROC-AUC; the ogbg-moltox21 role). Real data:
`--dataset_name ogbg-moltox21 --dataset_root DIR` (or a folder written by `write_ogb_dataset`), a pretrained GCN with
`--model_name_or_path` (a folder written by `pretrain_graph_model` / `recipes/pretrain_graph.py`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save_file
from transformers import set_seed

from ..files import read_json, read_safetensors
from .base import COMMON_RECIPE_DEFAULTS, TaskInputs

GRAPH_DEFAULTS = dict(
    COMMON_RECIPE_DEFAULTS,
    num_train_epochs=6,
    learning_rate=1e-3,
    hp_learning_rate=1e-2,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=256,
    drift_probe_samples=256,
    logging_steps=20,
)
GRAPH_SWEEP_DEFAULTS = dict(sweep_metric="roc_auc")
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"


@dataclass
class GraphArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained GCN folder (config.json + model.safetensors); unset = cached offline source."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "OGB name (ogbg-moltox21, ogbg-molhiv, ...) with --dataset_root, or a converted folder."},
    )
    dataset_root: str | None = field(default=None, metadata={"help": "Folder holding the OGB dataset folders."})
    num_layers: int = field(default=5, metadata={"help": "GCN layers (paper: 5)."})
    hidden_size: int = field(default=300, metadata={"help": "GCN width (paper/OGB: 300)."})
    dropout: float = field(default=0.5, metadata={"help": "Dropout after each GCN layer (OGB: 0.5)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache for the converted data and source model."})
    source_epochs: int = field(default=3, metadata={"help": "Epochs of the offline source pretraining."})
    source_max_graphs: int | None = field(
        default=None,
        metadata={
            "help": "Pretrain the offline source on N training graphs only, from a seeded sample of the source "
            "molecules that is all that gets converted (quick tests)."
        },
    )


def save_graph_model(model, folder: str | os.PathLike, info: dict | None = None) -> None:
    """`config.json` (the GCN's constructor arguments + `info`) and `model.safetensors`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / MODEL_WEIGHTS))
    (folder / MODEL_CONFIG).write_text(json.dumps({**model.config_dict, "info": info or {}}, indent=1))


def load_graph_model(folder: str | os.PathLike, num_tasks: int | None = None, problem_type: str | None = None):
    """A GCN from `folder`; with `num_tasks` different from the saved head, a new head (the rest of the weights
    loaded strictly). Raises `FileNotFoundError` / `ValueError` naming what is missing or mismatched."""
    from ..models.graph import GCN

    folder = Path(folder)
    if not (folder / MODEL_CONFIG).is_file() or not (folder / MODEL_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} must hold {MODEL_CONFIG} and {MODEL_WEIGHTS} (see save_graph_model)")
    config = read_json(folder / MODEL_CONFIG)
    config.pop("info", None)
    saved_tasks = config["num_tasks"]
    if num_tasks is not None:
        config["num_tasks"] = num_tasks
    if problem_type is not None:
        config["problem_type"] = problem_type
    model = GCN(**config)
    state = read_safetensors(folder / MODEL_WEIGHTS)
    if config["num_tasks"] != saved_tasks:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.startswith("classifier.") and config["num_tasks"] != saved_tasks)]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the GCN config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")  # fmt: skip
    return model


def pretrain_graph_model(
    splits: dict,
    output_dir: str | os.PathLike,
    problem_type: str = "multi_label_classification",
    num_layers: int = 5,
    hidden_size: int = 300,
    dropout: float = 0.5,
    epochs: int = 3,
    learning_rate: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    use_cpu: bool = False,
) -> dict:
    """Supervised multi-task pretraining of a GCN (the paper's Sup-pcba source) on `splits["train"]`, evaluated on
    `splits["validation"]`; saves `output_dir/{config.json, model.safetensors}`. Returns the validation metrics.

    Runs through `HeadPrepTrainer` with `hp_epochs=0` (everything trains, no measurements), so masked losses,
    DDP and mixed precision are the same as downstream."""
    from ..config import HeadPrepConfig
    from ..data.graphs import GraphCollator
    from ..metrics import graph_metrics
    from ..models.graph import GCN
    from ..trainer import HeadPrepTrainer

    set_seed(seed)
    model = GCN(splits["train"].num_tasks, num_layers, hidden_size, dropout, problem_type)
    with tempfile.TemporaryDirectory() as scratch:
        args = HeadPrepConfig(
            output_dir=scratch, hp_epochs=0, num_train_epochs=epochs, learning_rate=learning_rate,
            lr_scheduler_type="cosine", per_device_train_batch_size=batch_size, per_device_eval_batch_size=256,
            track_dynamics=False, save_prepared_head=False, save_strategy="no", report_to="none", logging_steps=50,
            seed=seed, use_cpu=use_cpu, dataloader_num_workers=0, problem_type=problem_type,
        )  # fmt: skip
        trainer = HeadPrepTrainer(
            model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["validation"],
            data_collator=GraphCollator(), compute_metrics=graph_metrics(problem_type),
        )  # fmt: skip
        trainer.train()
        metrics = trainer.evaluate()
    save_graph_model(model, output_dir, info={"validation": metrics, "epochs": epochs, "seed": seed})
    return metrics


def pretrain_chembl_source(
    cache_dir: str | None = None,
    epochs: int = 3,
    num_layers: int = 5,
    hidden_size: int = 300,
    dropout: float = 0.5,
    seed: int = 0,
    max_graphs: int | None = None,
) -> Path:
    """The offline source GCN, pretrained once on the 24 MoleculeACE source targets and cached (`$HEADPREP_CACHE`)."""
    from ..data.graphs import ogb_splits
    from ..models.source import default_cache_dir

    root = default_cache_dir(cache_dir)
    # With max_graphs, only a sample of the source molecules is converted (the full conversion of about 30k molecules
    # takes minutes): enough that its scaffold split's training part (about 80%) holds max_graphs graphs.
    molecules = None if max_graphs is None else math.ceil(max_graphs / 0.75) + 16
    suffix = f"-sub{max_graphs}" if max_graphs is not None else ""
    final = root / f"chembl24-gcn-L{num_layers}-H{hidden_size}-e{epochs}-s{seed}{suffix}"
    if (final / MODEL_WEIGHTS).is_file():
        return final
    source = load_graph_dataset(None, cache_dir=root, offline_part="source", source_molecules=molecules)[0]
    splits = ogb_splits(source)
    if max_graphs is not None:
        from ..data.graphs import GraphPropertyDataset

        train = splits["train"]
        splits["train"] = GraphPropertyDataset(train.dataset, train.indices[:max_graphs])
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        pretrain_graph_model(splits, partial, "multi_label_classification", num_layers, hidden_size, dropout,
                             epochs, seed=seed)  # fmt: skip
        os.replace(partial, final)  # the cache holds a finished model or nothing
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def load_graph_dataset(
    dataset_name: str | None,
    dataset_root: str | None = None,
    cache_dir=None,
    offline_part: str = "downstream",
    source_molecules: int | None = None,
):
    """An OGB dataset and its problem type: `dataset_name` (an OGB name under `dataset_root`, or a converted folder),
    or unset = the offline MoleculeACE task (`offline_part` "downstream" or "source", converted once to the cache;
    `source_molecules`: a seeded sample of that many source molecules, see `build_chembl_graph_tasks`)."""
    from ..data.graphs import build_chembl_graph_tasks, load_ogb_dataset
    from ..models.source import default_cache_dir

    if dataset_name is None:
        folders = build_chembl_graph_tasks(default_cache_dir(cache_dir), [offline_part], source_molecules)
        dataset = load_ogb_dataset(str(folders[offline_part]))
    else:
        dataset = load_ogb_dataset(dataset_name, dataset_root)
    problem_type = "regression" if dataset.task_type == "regression" else "multi_label_classification"
    return dataset, problem_type


def load_graph(args: GraphArguments, seed: int) -> TaskInputs:
    from ..data.graphs import GraphCollator, ogb_splits
    from ..metrics import graph_metrics

    dataset, problem_type = load_graph_dataset(args.dataset_name, args.dataset_root, args.cache_dir)
    splits = ogb_splits(dataset)
    if args.model_name_or_path is None:
        source = pretrain_chembl_source(args.cache_dir, args.source_epochs, args.num_layers, args.hidden_size,
                                        args.dropout, max_graphs=args.source_max_graphs)  # fmt: skip
    else:
        source = args.model_name_or_path
    set_seed(seed)  # the new head's initialisation must not depend on what ran before
    model = load_graph_model(source, num_tasks=dataset.num_tasks, problem_type=problem_type)
    return TaskInputs(
        model=model,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        test_dataset=splits["test"],
        compute_metrics=graph_metrics(problem_type),
        class_names=[f"task_{t}" for t in range(dataset.num_tasks)],
        data_collator=GraphCollator(),
        card=dict(tasks="graph-ml", **({} if args.dataset_name is None else dict(dataset_tags=args.dataset_name))),
    )


def first_metric(problem_type: str) -> str:
    return "rmse" if problem_type == "regression" else "roc_auc"


__all__ = [
    "GRAPH_DEFAULTS",
    "GRAPH_SWEEP_DEFAULTS",
    "GraphArguments",
    "load_graph",
    "load_graph_dataset",
    "load_graph_model",
    "pretrain_chembl_source",
    "pretrain_graph_model",
    "save_graph_model",
]
