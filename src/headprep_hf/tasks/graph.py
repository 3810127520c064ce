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
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save_file
from transformers import set_seed

from ..files import cache_entry_problem, read_json, read_safetensors, write_cache_manifest
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
# tau* by ROC-AUC, the offline default's metric; `headprep sweep` replaces it by the dataset's own metric
# (`TaskInputs.selection_metric`) unless --sweep_metric is given.
GRAPH_SWEEP_DEFAULTS = dict(sweep_metric="roc_auc")
# OGB's `eval_metric` of a dataset -> the key `graph_metrics` reports it under.
OGB_METRICS = {"rocauc": "roc_auc", "ap": "ap", "rmse": "rmse"}
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"

logger = logging.getLogger(__name__)


@dataclass
class GraphArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained GCN folder (config.json + model.safetensors); unset = cached offline source."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "OGB name (ogbg-moltox21, ogbg-molhiv, ...) with --dataset_root, or a folder converted by "
            "write_ogb_dataset (its path, or its name with --dataset_root)."
        },
    )
    dataset_root: str | None = field(default=None, metadata={"help": "Folder holding the OGB dataset folders."})
    num_layers: int = field(default=5, metadata={"help": "GCN layers (paper: 5)."})
    hidden_size: int = field(default=300, metadata={"help": "GCN width (paper/OGB: 300)."})
    dropout: float | None = field(
        default=None,
        metadata={
            "help": "Dropout after each GCN layer (default: the loaded model's; 0.5, OGB's, for the offline source)."
        },
    )
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


_GRAPH_EXTRA = {"torch_geometric": "torch_geometric", "ogb": "ogb", "rdkit": "rdkit", "pandas": "pandas"}


def require_graph_extra() -> None:
    """Refuse, naming the install, when the graph extra's packages are missing: the graph task failed deep inside the
    data loading with `ModuleNotFoundError: No module named 'ogb'`, or with a misleading `cannot import name
    'smiles2graph' from 'ogb.utils'` when only RDKit was missing."""
    import importlib.util

    missing = [name for name, module in _GRAPH_EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(
            f"The graph task needs {', '.join(missing)}, which the graph extra installs: pip install "
            "'headprep_hf[graph]' (from a clone of this repository: pip install '.[graph]'). The offline molecules "
            "ship in MoleculeACE: pip install --no-deps MoleculeACE."
        )


def load_graph_model(
    folder: str | os.PathLike,
    num_tasks: int | None = None,
    problem_type: str | None = None,
    new_head: bool = False,
    dropout: float | None = None,
):
    """A GCN from `folder`: the saved backbone, loaded strictly, and the saved head, or a new head (initialised from
    the current RNG state, so `set_seed` decides it) when `new_head` is true or `num_tasks` differs from the saved
    head's. Raises `FileNotFoundError` / `ValueError` naming what is missing or mismatched.

    Args:
        folder: A folder written by `save_graph_model` (`config.json` + `model.safetensors`).
        num_tasks: Outputs of the head; unset = the saved count.
        problem_type: The model's problem type; unset = the saved one.
        dropout: Dropout after each GCN layer; unset = the saved one (it changes no weight).
        new_head: Always build a new head. Head probing needs one: the task loader (`load_graph`) asks for it, so a
            source with as many tasks as the downstream task (ogbg-molhiv -> ogbg-molbbbp) does not hand its trained
            head to the new task.
    """
    require_graph_extra()
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
    if dropout is not None:
        config["dropout"] = dropout
    model = GCN(**config)
    state = read_safetensors(folder / MODEL_WEIGHTS)
    new_head = new_head or config["num_tasks"] != saved_tasks
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # (shapes: a config.json edited, or weights of another model)
        raise ValueError(
            f"{folder}: {MODEL_WEIGHTS} does not fit the GCN its {MODEL_CONFIG} describes "
            f"({str(error).splitlines()[-1].strip()}). Save the model again with save_graph_model, or restore the "
            "config it was saved with."
        ) from None
    missing = [k for k in missing if not (k.startswith("classifier.") and new_head)]
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
    save_on_each_node: bool = False,
) -> dict:
    """Supervised multi-task pretraining of a GCN (the paper's Sup-pcba source) on `splits["train"]`, evaluated on
    `splits["validation"]`; saves `output_dir/{config.json, model.safetensors}` (on the main process; on the main
    process of each machine with `save_on_each_node`, as `TrainingArguments`' flag). Returns the validation metrics.

    Runs through `HeadPrepTrainer` with `hp_epochs=0` (everything trains, no measurements), so masked losses,
    DDP and mixed precision are the same as downstream."""
    require_graph_extra()
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
            save_on_each_node=save_on_each_node,
        )  # fmt: skip
        trainer = HeadPrepTrainer(
            model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["validation"],
            data_collator=GraphCollator(), compute_metrics=graph_metrics(problem_type),
        )  # fmt: skip
        trainer.train()
        metrics = trainer.evaluate()
        if args.should_save:  # (after DDP training every process holds the same weights)
            save_graph_model(model, output_dir, info={"validation": metrics, "epochs": epochs, "seed": seed})
        trainer.accelerator.wait_for_everyone()
    return metrics


def source_splits(
    dataset_name: str | None, dataset_root: str | None = None, cache_dir=None, max_graphs: int | None = None
) -> tuple[dict, str]:
    """The source task's splits and problem type: `dataset_name` as `load_graph_dataset` reads it, or unset = the
    offline 24 MoleculeACE source targets. With `max_graphs` the training split holds its first `max_graphs` graphs
    (quick runs); offline, only a seeded sample of the source molecules is then converted (the full conversion of
    about 30k molecules takes minutes): enough that its scaffold split's training part (about 80%) holds them."""
    require_graph_extra()
    from ..data.graphs import GraphPropertyDataset, ogb_splits

    if max_graphs is not None and max_graphs < 1:
        raise ValueError(f"max_graphs must be >= 1, got {max_graphs}.")
    molecules = None if max_graphs is None or dataset_name is not None else math.ceil(max_graphs / 0.75) + 16
    dataset, problem_type = load_graph_dataset(dataset_name, dataset_root, cache_dir, "source", molecules)
    splits = ogb_splits(dataset)
    if max_graphs is not None:
        train = splits["train"]
        splits["train"] = GraphPropertyDataset(train.dataset, train.indices[:max_graphs])
    return splits, problem_type


def pretrain_chembl_source(
    cache_dir: str | None = None,
    epochs: int = 3,
    num_layers: int = 5,
    hidden_size: int = 300,
    dropout: float = 0.5,
    seed: int = 0,
    max_graphs: int | None = None,
    use_cpu: bool = False,
) -> Path:
    """The offline source GCN, pretrained once on the 24 MoleculeACE source targets and cached (`$HEADPREP_CACHE`).

    Under a multi-process launch every process calls it: each machine's first process converts the source data (the
    others then read its folder, see `load_graph_dataset`), all of them pretrain together (`use_cpu`: as the run's
    training arguments, so that CPU ranks train as one DDP run), and the main process of each machine publishes the
    cache entry (a machine's cache may be its own disk). They pretrain when any process lacks the entry: every
    process takes the same turn."""
    from ..models.source import _publish, default_cache_dir

    root = default_cache_dir(cache_dir)
    suffix = f"-sub{max_graphs}" if max_graphs is not None else ""
    suffix += f"-d{dropout:g}" if dropout != 0.5 else ""  # (0.5, OGB's: the name entries had before it counted)
    final = root / f"chembl24-gcn-L{num_layers}-H{hidden_size}-e{epochs}-s{seed}{suffix}"
    state = _process_state()
    cached = final.exists() and _cached_source_usable(final, num_layers, hidden_size, dropout)
    if state is not None and state.num_processes > 1:
        from accelerate.utils import gather_object

        cached = all(gather_object([cached]))  # (one machine may hold the entry and another not)
    if cached:
        return final
    splits = source_splits(None, cache_dir=root, max_graphs=max_graphs)[0]
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        # Every process trains (not main process first: the main process's DDP collectives would wait for the others
        # while they wait at the barrier); the main process of each machine saves into its own `partial`.
        pretrain_graph_model(splits, partial, "multi_label_classification", num_layers, hidden_size, dropout,
                             epochs, seed=seed, use_cpu=use_cpu, save_on_each_node=True)  # fmt: skip
        # The main process of each machine publishes: a machine's cache may be its own disk. Where machines share
        # the folder, the first to publish keeps its complete copy (`_publish`).
        if state is None or state.is_local_main_process:
            from ..data.graphs import CHEMBL_SPLIT

            config = read_json(partial / MODEL_CONFIG)
            config["info"]["split"] = CHEMBL_SPLIT  # (the split its training part came from)
            (partial / MODEL_CONFIG).write_text(json.dumps(config, indent=1))
            write_cache_manifest(partial)
            # (an entry that cannot be used is replaced; one another process published meanwhile that can is kept;
            # before, an entry without its weights was kept, and every call pretrained again and then failed)
            stale = final.exists() and not _cached_source_usable(final, num_layers, hidden_size, dropout, warn=False)
            _publish(partial, final, replace=stale)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if state is not None:
        state.wait_for_everyone()  # no process reads the entry before its machine's main process has published it
    return final


def _cached_source_usable(folder: Path, num_layers: int, hidden_size: int, dropout: float, warn: bool = True) -> bool:
    """Whether a cached source GCN can be reused: its files match its manifest (not damaged, complete, of this
    version) and it was built as asked (`_cached_config_fits`). One that cannot is trained again, with a warning."""
    problem = cache_entry_problem(folder)
    if problem is not None:
        if warn:
            logger.warning("The cached source %s is not reused: %s. Training it again.", folder, problem)
        return False
    return _cached_config_fits(folder, num_layers, hidden_size, dropout, warn)


def _cached_config_fits(folder: Path, num_layers: int, hidden_size: int, dropout: float, warn: bool = True) -> bool:
    """Whether a cached source was built as asked: entries written before the name held the dropout were named for
    0.5 whatever theirs was, and those written before `CHEMBL_SPLIT` trained on another split's training
    part. One that does not fit is trained again (with a warning), not reused."""
    from ..data.graphs import CHEMBL_SPLIT

    config = read_json(folder / MODEL_CONFIG) if (folder / MODEL_CONFIG).is_file() else {}
    config = {**config, "split": (config.get("info") or {}).get("split")}
    asked = {"num_layers": num_layers, "hidden_size": hidden_size, "dropout": dropout, "split": CHEMBL_SPLIT}
    differing = {k: (config.get(k), v) for k, v in asked.items() if config.get(k) != v}
    if differing and warn:
        logger.warning("The cached source %s was built with other settings %s (cached, asked): training it again.",
                       folder, differing)  # fmt: skip
    return not differing


def _process_state():
    """accelerate's process state, as the run's training arguments set it up (one state shared by every
    `PartialState()`), or None where none is set up yet (a Python caller without training arguments: one process)."""
    from accelerate import PartialState

    return PartialState() if PartialState._shared_state else None


def _each_machine_first(function):
    """`function()` in every process, in three turns: the main process first, then the main process of each other
    machine, then the rest (in one process: once). The first process of a machine converts the data and lets OGB write
    its processed file, the others of that machine read them: several processes converting into one folder at once
    fail. A cache on a disk the machines share is converted once, by the main process; one on each machine's own disk
    once per machine (accelerate's `main_process_first` let every process of the other machines convert at once,
    `local_main_process_first` would let the machines' main processes convert into a shared folder at once)."""
    state = _process_state()
    if state is None or state.num_processes == 1:
        return function()
    turn = 0 if state.is_main_process else 1 if state.is_local_main_process else 2
    result = None
    for current in range(3):
        if turn == current:
            result = function()
        state.wait_for_everyone()
    return result


def load_graph_dataset(
    dataset_name: str | None,
    dataset_root: str | None = None,
    cache_dir=None,
    offline_part: str = "downstream",
    source_molecules: int | None = None,
):
    """An OGB dataset and its problem type: `dataset_name` (an OGB name under `dataset_root`, or a converted folder),
    or unset = the offline MoleculeACE task (`offline_part` "downstream" or "source", converted once to the cache;
    `source_molecules`: a seeded sample of that many source molecules, see `build_chembl_graph_tasks`).

    Under a multi-process launch (once the training arguments have set up accelerate's state) the main process
    converts the data and lets OGB write its processed file first, then the main process of each other machine (a
    machine's cache or `dataset_root` may be its own disk), then the others read them (several processes converting
    into one folder at once fail: `_each_machine_first`)."""
    from ..data.graphs import build_chembl_graph_tasks, load_ogb_dataset
    from ..models.source import default_cache_dir

    def load():
        if dataset_name is None:
            folders = build_chembl_graph_tasks(default_cache_dir(cache_dir), [offline_part], source_molecules)
            return load_ogb_dataset(str(folders[offline_part]))
        return load_ogb_dataset(dataset_name, dataset_root)

    dataset = _each_machine_first(load)
    problem_type = "regression" if dataset.task_type == "regression" else "multi_label_classification"
    return dataset, problem_type


def load_graph(args: GraphArguments, seed: int) -> TaskInputs:
    require_graph_extra()
    from ..data.graphs import GraphCollator, ogb_splits
    from ..metrics import graph_metrics

    dataset, problem_type = load_graph_dataset(args.dataset_name, args.dataset_root, args.cache_dir)
    splits = ogb_splits(dataset)
    if args.model_name_or_path is None:
        state = _process_state()  # the device the run's training arguments chose
        source = pretrain_chembl_source(
            args.cache_dir, args.source_epochs, args.num_layers, args.hidden_size,
            0.5 if args.dropout is None else args.dropout,
            max_graphs=args.source_max_graphs, use_cpu=state is not None and state.device.type == "cpu",
        )  # fmt: skip
    else:
        source = args.model_name_or_path
    set_seed(seed)  # the new head's initialisation must not depend on what ran before
    # Always a new head: HP trains a new task head, even where the source has as many tasks (a trained head of the
    # source task would otherwise be kept, whatever the seed).
    # (--dropout: the loaded config's was used, and a source cached with another dropout gave that one)
    model = load_graph_model(
        source, num_tasks=dataset.num_tasks, problem_type=problem_type, new_head=True, dropout=args.dropout
    )
    return TaskInputs(
        model=model,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        test_dataset=splits["test"],
        compute_metrics=graph_metrics(problem_type),
        class_names=[f"task_{t}" for t in range(dataset.num_tasks)],
        data_collator=GraphCollator(),
        prefetch_in_memory=False,  # small molecule batches; workers not measured on a GPU for graphs
        card=dict(tasks="graph-ml", **({} if args.dataset_name is None else dict(dataset_tags=args.dataset_name))),
        selection_metric=selection_metric(dataset.eval_metric, problem_type),
    )


def first_metric(problem_type: str) -> str:
    """The metric of a problem type where the dataset names none: RMSE for regression, else ROC-AUC."""
    return "rmse" if problem_type == "regression" else "roc_auc"


def selection_metric(eval_metric: str | None, problem_type: str) -> str:
    """The `graph_metrics` key of OGB's `eval_metric` (`rocauc` -> `roc_auc`, `ap` -> `ap`, `rmse` -> `rmse`): the
    metric the dataset is judged by (ogbg-molpcba and ogbg-molmuv by average precision)."""
    if eval_metric in OGB_METRICS:
        return OGB_METRICS[eval_metric]
    fallback = first_metric(problem_type)
    logger.warning("OGB eval metric %r is not computed here (only %s); reporting %s instead", eval_metric,
                   sorted(OGB_METRICS), fallback)  # fmt: skip
    return fallback


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
    "selection_metric",
]
