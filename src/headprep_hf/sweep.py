"""The tau sweep (paper section 5.2, HP tau*-FT): one HP run with head snapshots, FT from each, tau* on validation.

1. ONE head-probing run to the largest tau of the grid saves the head after every grid epoch
   (`heads/tau_N.safetensors`, everything HP changes, see `HeadPrepTrainer.hp_state_dict`). With a constant HP
   learning rate the snapshot at tau is exactly what `probe_head()` with `hp_epochs=tau` produces (same seed and
   batches).
2. Every FT job starts from a fresh copy of the same pretrained model, loads one snapshot and runs `finetune()`;
   `tau_N/` holds its model, dynamics and `sweep_result.json`.
3. tau* maximises (or minimises, for losses) the validation metric at the end of FT; `sweep.json` gathers per tau
   the HP train accuracy, energy, p0 histogram, final drift, validation/test metrics and head-gradient-norm curve, and
   the paper's Table 1 columns HP0-FT, HPmax-FT and HPtau*-FT.

An interrupted sweep is continued by running it again with the same settings: finished FT jobs (`sweep_result.json`
with the same fingerprint) are reused, an unfinished one resumes from its last checkpoint. Shards
(`sweep_shard="i/n"`) run every n-th FT job; `merge_sweeps` joins their folders.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.trainer_utils import has_length
from transformers.utils import logging as hf_logging

from .checkpoints import CheckpointError, latest_resumable
from .config import HeadPrepConfig
from .data.images import hf_content_digest
from .files import file_sha256, read_json, read_safetensors, write_text_atomic
from .fingerprint import callable_identity, settings_fingerprint, state_fingerprint
from .guard import check_finite
from .heads import reinitialize_head
from .measurements import final_drift_of
from .progress import QuietProgressCallback
from .replicates import describe, infer_greater_is_better, is_tie, paired_difference, verdict
from .runlock import first_process_lock
from .split import find_split
from .sweep_schema import SWEEP_FORMAT_VERSION, validate_sweep, validate_sweep_file
from .trainer import HeadPrepTrainer
from .version import __version__

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
RESULT_FILE = "sweep_result.json"
JOB_FILE = "sweep_job.json"  # an FT job folder's owner: the sweep fingerprint, written before the job starts
EXCHANGE_FILE = "exchange.json"
PLOT_FILES = (  # what `report.write_report` draws into plots/
    "ft_metric_vs_tau.png",
    "hp_accuracy_energy_vs_tau.png",
    "drift_vs_tau.png",
    "p0_histograms.png",
    "head_grad_norm.png",
    "exchange_heatmap.png",
)
DEFAULT_TAUS = (0, 1, 2, 4, 8, 16, 32)
# Settings that change what a sweep computes; shards must agree on all of them to be merged. An inclusion list:
# machine-dependent settings (dataloader_num_workers, logging) must not keep shards of two machines apart.
_FINGERPRINT_FIELDS = (
    "data_seed",
    "hp_learning_rate",
    "hp_lr_scheduler_type",
    "hp_warmup_ratio",
    "hp_weight_decay",
    "hp_label_smoothing",
    "ft_label_smoothing",
    "hp_backbone_mode",
    "hp_cache_features",
    "hp_cache_views",
    "head_type",
    "mlp_hidden_size",
    "mlp_num_layers",
    "head_modules",
    "reinit_modules",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "dataloader_drop_last",
    "fp16",
    "bf16",
    "load_best_model_at_end",
    "metric_for_best_model",
    "greater_is_better",  # with eval/save strategy and steps: which checkpoint load_best_model_at_end keeps
    "eval_strategy",
    "eval_steps",
    "save_strategy",
    "save_steps",
    "optim_args",
    "on_nonfinite",  # skip/ignore change which updates are applied
    "track_dynamics",  # whether energy, p0 and drift are measured and recorded
    "world_size",  # the number of processes: the effective batch size
    "drift_probe_samples",
    "energy_max_samples",
    "measure_batch_size",
    "hp_recompute_bn_stats",
    "lr_scheduler_kwargs",
    "label_smoothing_factor",
    "problem_type",
    "ignore_index",
    "sweep_taus",
    "sweep_metric",
    "sweep_greater_is_better",
)
# Settings that change what a sweep computes, added to the fingerprint after sweeps were written with the defaults:
# counted only where set to another value than the default given here, so that a folder of an earlier version (all
# defaults) keeps its fingerprint. The data order of both stages, half-precision evaluation, compiled kernels, a batch
# size found at run time, which checkpoint `load_best_model_at_end` may keep, the labels trained on (a dataset with two
# label columns hashes the same whichever one trains), NEFTune's noise, the columns the model gets, and what
# `compute_metrics` is given.
_FINGERPRINT_FIELDS_IF_SET = {
    "train_sampling_strategy": "random",
    "bf16_full_eval": False,
    "fp16_full_eval": False,
    "full_determinism": False,
    "torch_compile": False,
    "auto_find_batch_size": False,
    "eval_delay": 0,
    "label_names": None,
    "neftune_noise_alpha": None,
    "remove_unused_columns": True,
    "include_for_metrics": [],
    "batch_eval_metrics": False,
    "eval_do_concat_batches": True,
}
# Task arguments that say where files lie on this machine, not what the data is: left out of the fingerprint and of
# the shards' comparison (the data description covers the sets themselves).
_TASK_MACHINE_KEYS = ("cache_dir", "channels_last")  # (channels_last: the weights' memory layout, not the data)
# Task arguments that point at data or a model on this machine: compared by their last path component only (the same
# folder as ./data/train, data/train or /mnt/x/data/train; another machine's mount point), while the data description
# (lengths, label hashes) and the model fingerprint cover what they point at.
_TASK_PATH_KEYS = ("train_dir", "validation_dir", "test_dir", "voc_root", "dataset_root", "model_name_or_path")
# Task arguments added after sweeps were recorded without them: left out at their default, so those sweeps keep their
# fingerprint and continue.
_TASK_ARGS_ADDED = {"energy_on_eval_transform": False}


def _remove_if_empty(folder: Path) -> None:
    """Remove `folder` if it exists and is empty (a folder `Trainer` made for a run that wrote nothing there)."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def parse_shard(spec: str) -> tuple[int, int]:
    """`"i/n"` -> `(i, n)`, 0-based: shard i of n runs the FT jobs whose grid position p has `p % n == i`."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not match:
        raise ValueError(f"sweep_shard must look like 'i/n' (e.g. '0/2'), got {spec!r}.")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ValueError(
            f"sweep_shard {spec!r}: the index is 0-based and must be smaller than the count (for 2 shards use '0/2' "
            "and '1/2')."
        )
    return index, count


def validate_taus(taus) -> list[int]:
    """The grid as a list of ints, or a `ValueError` saying what is wrong with it."""
    taus = list(taus) if taus is not None else []
    if not taus:
        raise ValueError("sweep_taus is empty; give the HP epochs to try, e.g. 0 1 2 4 8 16 32.")
    bad = [t for t in taus if isinstance(t, bool) or not isinstance(t, int)]
    if bad:
        raise ValueError(f"sweep_taus must be integers (HP epochs), got {bad}.")
    negative = [t for t in taus if t < 0]
    if negative:
        raise ValueError(f"sweep_taus must be >= 0 (0 = no head probing), got {negative}.")
    if any(b <= a for a, b in zip(taus, taus[1:])):
        raise ValueError(
            f"sweep_taus must be sorted ascending without duplicates, got {taus}; e.g. {sorted(set(taus))}."
        )
    return taus


@dataclass
class SweepConfig(HeadPrepConfig):
    r"""
    [`HeadPrepConfig`] plus the settings of a tau sweep ([`TauSweep`]). `hp_epochs` is set per FT job from the grid.

    Parameters:
        sweep_taus (`list[int]`, defaults to `[0, 1, 2, 4, 8, 16, 32]`):
            The grid of HP epochs, sorted ascending, no duplicates.
        sweep_seeds (`list[int]` or `None`, defaults to `None`):
            Replicates: one HP run per seed and one FT job per (tau, seed), each seed drawing the head's
            initialisation (the head's own `reset_parameters`, seeded), the data order and the augmentation. The
            sweep reports the mean, standard deviation and 95% t-interval over seeds per tau, picks tau* by the best
            mean validation metric and compares it with tau = 0 and the largest tau, paired over seeds. Unset: one
            run with `seed` and the model's head as given (no uncertainty).
        sweep_metric (`str`, defaults to `"accuracy"`):
            Validation metric (a key of `compute_metrics`' result, or `"loss"`) that picks tau*; `"eval_accuracy"`,
            as `metric_for_best_model` is also spelled, is read as `"accuracy"`.
        sweep_greater_is_better (`bool` or `None`, defaults to `None`):
            Direction of `sweep_metric`; `None`: guessed from its name (`replicates.lower_is_better`): lower is
            better for losses and errors ("loss", "rmse", "mse", "mae", "error", also as `rmse_mean`, `error_rate`),
            higher otherwise and for scikit-learn's negated scores (`neg_mean_squared_error`).
        sweep_shard (`str` or `None`, defaults to `None`):
            `"i/n"` (0-based): run only the FT jobs at positions `p % n == i` of the (tau, seed) grid (each shard runs
            the cheap HP of its seeds).
        sweep_exchange (`bool`, defaults to `False`):
            Also compute the head-exchange matrix (paper Fig. 3) after a complete sweep.
        sweep_report (`bool`, defaults to `True`):
            Write the PNG plots into `output_dir/plots` at the end.
        sweep_progress (`bool`, defaults to `True`):
            Show the bar over the FT jobs (its rate and ETA count FT jobs only, not HP). `disable_tqdm=True` turns off
            every bar, this one included; `sweep_progress=False` this one only (the HP bar, each FT job's bar and the
            passes' bars follow `disable_tqdm`).
        sweep_prepared_heads (`bool`, defaults to `False`):
            Also write every head snapshot as a prepared-head folder `heads/seed_S/tau_N/` (`load_prepared_head`), with
            the energy and HP train accuracy its FT job measured. Written when the FT job runs: a rerun that reuses
            finished jobs writes none for them (it warns; rerun with `overwrite_output_dir=True` or another
            `output_dir` to get them).
    """

    sweep_taus: list[int] = field(
        default_factory=lambda: list(DEFAULT_TAUS), metadata={"help": "Grid of HP epochs tau (sorted, unique)."}
    )
    sweep_seeds: list[int] | None = field(
        default=None,
        metadata={
            "help": "Replicates: one HP run per seed and one FT job per (tau, seed); a seed draws the head's "
            "initialisation, the data order and the augmentation. Unset: one run with `seed` and the model's head "
            "as given. The list may grow between runs: only the new jobs run."
        },
    )
    sweep_metric: str = field(default="accuracy", metadata={"help": "Validation metric that picks tau*."})
    sweep_greater_is_better: bool | None = field(
        default=None,
        metadata={
            "help": "Direction of sweep_metric; unset: lower is better for *loss, *rmse, *mse, *mae, *error and "
            "metrics ending in perplexity, ppl, wer, cer, mape, smape, nll, brier, ece, distance, entropy or xent."
        },
    )
    sweep_shard: str | None = field(default=None, metadata={"help": "'i/n': run only every n-th FT job (0-based)."})
    sweep_exchange: bool = field(default=False, metadata={"help": "Compute the head-exchange matrix (Fig. 3)."})
    sweep_report: bool = field(default=True, metadata={"help": "Write the PNG plots at the end."})
    sweep_progress: bool = field(
        default=True, metadata={"help": "Progress bar over the FT jobs (off with disable_tqdm too)."}
    )
    sweep_prepared_heads: bool = field(
        default=False,
        metadata={
            "help": "Also write each head snapshot as a prepared-head folder heads/seed_S/tau_N/ (weights, json, card)"
        },
    )

    def __post_init__(self):
        # (before HeadPrepConfig's checks: its advice for a warmup ratio, another HP schedule, is refused here)
        if self.hp_lr_scheduler_type != "constant" or self.hp_warmup_ratio != 0:
            raise ValueError(
                f"A tau sweep needs hp_lr_scheduler_type='constant' and hp_warmup_ratio=0 (got "
                f"{self.hp_lr_scheduler_type!r}, {self.hp_warmup_ratio}): the head saved after tau epochs of the one "
                "HP run must equal a run with hp_epochs=tau, which a schedule over the HP length breaks."
            )
        super().__post_init__()
        self.sweep_taus = validate_taus(self.sweep_taus)
        if self.sweep_seeds is not None:
            seeds = list(self.sweep_seeds)
            if (
                not seeds
                or any(isinstance(x, bool) or not isinstance(x, int) for x in seeds)
                or len(set(seeds)) != len(seeds)
            ):
                raise ValueError(f"sweep_seeds must be distinct integers (e.g. 42 43 44), got {self.sweep_seeds!r}.")
            self.sweep_seeds = seeds
        if self.sweep_shard is not None:
            parse_shard(self.sweep_shard)
        if not self.sweep_metric:
            raise ValueError("sweep_metric must name a validation metric, e.g. 'accuracy'.")
        if self.sweep_metric.startswith("eval_"):  # as metric_for_best_model is spelled (Trainer adds "eval_")
            self.sweep_metric = self.sweep_metric[len("eval_") :]

    @property
    def selection_greater_is_better(self) -> bool:
        if self.sweep_greater_is_better is not None:
            return self.sweep_greater_is_better
        return infer_greater_is_better(self.sweep_metric)

    @property
    def seeds(self) -> list[int]:
        """The sweep's seeds (`sweep_seeds`, or `[seed]`)."""
        return list(self.sweep_seeds) if self.sweep_seeds is not None else [self.seed]

    def jobs(self) -> list[tuple[int, int]]:
        """Every FT job of the grid as `(tau, seed)`, by tau then seed."""
        return [(tau, seed) for tau in self.sweep_taus for seed in self.seeds]

    def shard_jobs(self) -> list[tuple[int, int]]:
        """This shard's FT jobs: grid positions `p % n == i` of `jobs()` (all of them without `sweep_shard`)."""
        if self.sweep_shard is None:
            return self.jobs()
        index, count = parse_shard(self.sweep_shard)
        return [job for p, job in enumerate(self.jobs()) if p % count == index]

    def shard_taus(self) -> list[int]:
        return sorted({tau for tau, _ in self.shard_jobs()})


class _SnapshotCallback(TrainerCallback):
    def __init__(self, sweep: TauSweep, trainer: HeadPrepTrainer, seed: int):
        self.sweep, self.trainer, self.seed = sweep, trainer, seed

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = round(state.epoch or 0)
        # The last grid epoch is saved after probe_head() returns: the head is then prepared as it is.
        if epoch in self.sweep.args.sweep_taus and epoch != self.sweep.args.sweep_taus[-1]:
            self.sweep._save_snapshot(epoch, self.seed, self.trainer)
        return control


def _strip(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix) and k[len(prefix) :] not in skip}


def _finite_or_null(value):
    """`value` with every NaN/inf float replaced by None (JSON has no NaN: strict parsers refuse a bare `NaN`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(_finite_or_null(data), indent=2, allow_nan=False))


def _fingerprint_tag(fingerprint: dict | None) -> str | None:
    """One string for a sweep fingerprint (stored in snapshot metadata and checkpoints)."""
    if fingerprint is None:
        return None
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is unreadable ({error}); delete it or use another output_dir.") from error


def config_fingerprint(args: SweepConfig) -> str:
    values = {}
    for name in _FINGERPRINT_FIELDS:
        value = getattr(args, name, None)
        values[name] = getattr(value, "value", value)
    for name, default in _FINGERPRINT_FIELDS_IF_SET.items():
        value = getattr(args, name, default)
        if getattr(value, "value", value) != default:
            values[name] = getattr(value, "value", value)
    # DataParallel (one process, several GPUs) multiplies the batch as world_size does; counted only then, as above.
    if getattr(args, "n_gpu", 0) > 1:
        values["n_gpu"] = args.n_gpu
    # The measurement subsets (drift probe, energy_max_samples) are evenly spaced samples since 2026-11-27 (the first N
    # before, which on a class-sorted set held its first classes only): a folder measured the old way is another sweep.
    if args.track_dynamics:
        values["measurement_subsets"] = "evenly spaced"
    # The direction tau* is chosen in, as resolved (setting it to what the metric's name implies changes nothing).
    values["sweep_greater_is_better"] = args.selection_greater_is_better
    # How often checkpoints are written changes results only through the checkpoint load_best_model_at_end keeps
    # (saving draws no random numbers): otherwise a rerun that adds save_strategy to be resumable is the same sweep.
    if not (args.load_best_model_at_end or getattr(args.save_strategy, "value", args.save_strategy) == "best"):
        values["save_strategy"] = values["save_steps"] = None
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _task_args(task: dict | None) -> dict | None:
    """The task record without the arguments that only say where files lie on this machine (`_TASK_MACHINE_KEYS`),
    and with data and model paths cut to their last component (`_TASK_PATH_KEYS`)."""
    if task is None:
        return None
    args = {
        k: v
        for k, v in (task.get("args") or {}).items()
        if k not in _TASK_MACHINE_KEYS and not (k in _TASK_ARGS_ADDED and v == _TASK_ARGS_ADDED[k])
    }
    for key in _TASK_PATH_KEYS:
        if isinstance(args.get(key), str):
            args[key] = os.path.basename(os.path.normpath(args[key]))
    if args.get("no_aug") is True and args.get("train_dir") is None and args.get("dataset_name") is None:
        # (on the toy task --no_aug was accepted and did nothing until it turned the toy's augmentation off: a sweep
        # recorded with it ran augmented, and must not be continued without)
        args["no_aug"] = "toy augmentation off"
    return {"name": task.get("name"), "args": args}


def task_fingerprint(task: dict | None) -> str | None:
    """sha256 of the task record (`{"name", "args"}`: the command line's data and model settings), or None."""
    if task is None:
        return None
    return hashlib.sha256(json.dumps(_task_args(task), sort_keys=True, default=str).encode()).hexdigest()


def _labels_of(dataset):
    """The labels a dataset exposes without decoding items (a `.labels` array, also through a `Subset`), or None."""
    if isinstance(dataset, torch.utils.data.Subset):
        labels = _labels_of(dataset.dataset)
        return None if labels is None else labels[np.asarray(dataset.indices, dtype=np.int64)]
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    if not isinstance(labels, np.ndarray) or labels.dtype == object:  # (object arrays hash as pointers)
        return None
    return labels


_HF_LABEL_COLUMNS = ("labels", "label")  # (the names transformers' collators and Trainer read)


def _hf_label_digest(dataset) -> str | None:
    """sha256 of the label columns of a `datasets.Dataset` (`labels`, `label`, `ClassLabel` columns and lists of them
    such as `ner_tags`), read from its Arrow table through the index mapping of `select`/`shuffle`, without its
    transform (images are not decoded), or None for another kind of dataset or one without such a column."""
    if "datasets" not in sys.modules:  # (not installed or not used: then this is no `datasets.Dataset`)
        return None
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        return None
    features = dataset.features or {}

    def class_labels(feature) -> bool:  # a ClassLabel column, or a list of them per row (token tags: `ner_tags`)
        return isinstance(feature, datasets.ClassLabel) or isinstance(
            getattr(feature, "feature", None), datasets.ClassLabel
        )

    names = [n for n in dataset.column_names if n in _HF_LABEL_COLUMNS or class_labels(features.get(n))]
    if not names:
        return None
    table = dataset.with_format("arrow")
    digest = hashlib.sha256()
    for name in names:
        digest.update(json.dumps([name, table[name].to_pylist()], default=str).encode())
    return digest.hexdigest()


def describe_data(**datasets) -> dict[str, dict | None]:
    """A cheap description of each dataset for the sweep fingerprint: `{"length", "labels"}`, `labels` the sha256 of
    its label array where the dataset exposes one without decoding (a `.labels` numpy array or tensor), of its dense
    labels where it hashes them itself (`label_digest()`: a segmentation set's masks), or of its label columns (a
    `datasets.Dataset`: `labels`, `label` and `ClassLabel` columns), else null.

    Where cheap, also `content`: the set's own `content_digest()` (image files, graphs, stored image bytes), or for a
    `datasets.Dataset` passed as it is `hf_content_digest` (its stored values). Items are never decoded or
    transformed: decoding is slow and training items are augmented (random), so they would make the fingerprint slow
    and unstable. A dataset of the same length without labels or content to hash is not told apart from another one;
    the task record (`task`) covers the command line's data settings."""
    out: dict[str, dict | None] = {}
    for name, dataset in datasets.items():
        if dataset is None:
            out[name] = None
            continue
        length = len(dataset) if has_length(dataset) else None  # (None: an iterable dataset)
        digest = None
        labels = _labels_of(dataset)
        if labels is None and callable(getattr(dataset, "label_digest", None)):
            digest = dataset.label_digest()
        elif labels is not None:
            labels = np.ascontiguousarray(labels)
            h = hashlib.sha256(f"{labels.dtype.str}{labels.shape}".encode())
            h.update(labels.tobytes())
            digest = h.hexdigest()
        else:
            digest = _hf_label_digest(dataset)
        out[name] = {"length": length, "labels": digest}
        content = dataset.content_digest() if callable(getattr(dataset, "content_digest", None)) else None
        if content is None and "datasets" in sys.modules and isinstance(dataset, sys.modules["datasets"].Dataset):
            content = hf_content_digest(dataset)  # (a `datasets.Dataset` passed as it is)
        if content is not None:  # (two sets of one length and labels: other pictures or graphs; absent before)
            out[name]["content"] = content
    return out


class TauSweep:
    r"""
    Sweep the number of head-probing epochs tau and pick tau* on validation (Ren et al., ICLR 2023, section 5.2).

    Args:
        model: The pretrained model with its new task head (left untouched: every job works on a copy).
        args: A [`SweepConfig`].
        train_dataset / eval_dataset: Training and validation sets (tau* is chosen on `eval_dataset`).
        test_dataset: Optional; its metrics are reported for every tau and in the summary.
        compute_metrics: As for `Trainer`; must produce `args.sweep_metric` (unless it is "loss").
        task: Optional `{"name": ..., "args": {...}}` recorded in `sweep.json` so that `headprep exchange` can rebuild
            the data and model from the command line.
        exchange_train_dataset: The training set through the eval transform; the head exchange measures its train
            accuracy there (no augmentation) when given.
        **trainer_kwargs: Passed to every [`HeadPrepTrainer`] (data_collator, callbacks, drift_dataset, ...).

    Example:

    ```python
    from headprep_hf import SweepConfig, TauSweep

    args = SweepConfig(output_dir="runs/sweep", sweep_taus=[0, 1, 2, 4, 8], hp_cache_features=True,
                       num_train_epochs=6, learning_rate=3e-4, per_device_train_batch_size=64)
    result = TauSweep(model, args, train, val, test_dataset=test, compute_metrics=accuracy_metrics()).run()
    print(result["tau_star"], result["summary"]["HPtau*-FT"])
    ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: SweepConfig,
        train_dataset,
        eval_dataset,
        test_dataset=None,
        compute_metrics=None,
        task: dict[str, Any] | None = None,
        exchange_train_dataset=None,
        **trainer_kwargs,
    ):
        if not isinstance(args, SweepConfig):
            raise TypeError(f"args must be a SweepConfig, got {type(args).__name__}.")
        if eval_dataset is None:
            raise ValueError("A tau sweep picks tau* on validation: pass eval_dataset.")
        self.model = model
        self.args = args
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.test_dataset = test_dataset
        self._test_labels_checked = False
        self.compute_metrics = compute_metrics
        self.task = task
        self.exchange_train_dataset = exchange_train_dataset
        self.trainer_kwargs = trainer_kwargs
        self.output_dir = Path(args.output_dir)
        self._pristine = copy.deepcopy(model).cpu()
        self._snapshots: dict[tuple[int, int], str] = {}
        self._head_inputs: dict[int, Any] = {}
        self._fingerprint: dict[str, Any] | None = None
        # (described before anything calls them: a function that keeps state, a call counter, would differ later)
        self._evaluation = self.evaluation_identity()

    def _check_sweep_metric(self) -> None:
        """A `sweep_metric` that `compute_metrics` does not return is refused before anything runs, from one batch of
        the validation set through the pretrained model. It was refused after HP and the first FT job, and the
        corrected rerun then found a folder of another sweep (the metric is in the fingerprint). Where that small
        evaluation fails (a metric undefined on so few samples), the jobs' own evaluations decide, as before."""
        metric = self.args.sweep_metric
        if metric == "loss" or self.eval_dataset is None or not has_length(self.eval_dataset):
            return
        if len(self.eval_dataset) == 0:
            return  # (refused by the trainer, naming the empty set)
        from .trainer import HeadPrepTrainer

        keep = ("data_collator", "preprocess_logits_for_metrics", "processing_class", "compute_loss_func")
        first = torch.utils.data.Subset(
            self.eval_dataset, range(min(len(self.eval_dataset), self.args.per_device_eval_batch_size))
        )
        with tempfile.TemporaryDirectory(prefix="headprep-metric-check-") as scratch:
            args = dataclasses.replace(
                self.args, output_dir=scratch, hp_cache_features=False, overwrite_output_dir=True, report_to="none"
            )
            trainer = None
            try:
                trainer = self._quiet(
                    HeadPrepTrainer(
                        model=self._pristine_copy(),
                        args=args,
                        train_dataset=self.train_dataset,
                        eval_dataset=first,
                        compute_metrics=self.compute_metrics,
                        **{k: v for k, v in self.trainer_kwargs.items() if k in keep},
                    )
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    computed = _strip(trainer.evaluate(), "eval_")
            except Exception as error:  # noqa: BLE001 - not decided here: the first job's evaluation will say
                logger.debug("sweep_metric check skipped: the evaluation of one batch failed (%r)", error)
                return
            finally:
                del trainer
                gc.collect()
        if metric not in computed:
            timings = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")
            names = sorted(k for k in computed if k not in timings)
            raise ValueError(
                f"sweep_metric {metric!r} is not among the validation metrics {names} (compute_metrics returned "
                "these on one batch of the validation set, before any job ran); set sweep_metric to one of them or "
                "pass a compute_metrics that returns it."
            )

    def _check_exchange_possible(self) -> None:
        """`sweep_exchange=True` on a regression task, or on a model whose head alone does not give its logits, is
        refused before any job runs (it used to fail after the whole sweep, and the report was not drawn)."""
        from .labels import infer_problem_type
        from .losses import declared_problem_type

        label_name = (self.args.label_names or ["labels"])[0]
        problem = declared_problem_type(self.args.problem_type, self.model)
        if (problem or infer_problem_type(self.train_dataset, label_name)) == "regression":
            raise ValueError(
                "sweep_exchange=True: the head exchange reports accuracies, which a regression task "
                "(problem_type='regression') does not have. Set sweep_exchange=False (--sweep_exchange false)."
            )
        if not has_length(self.train_dataset) or len(self.train_dataset) == 0:
            return  # (the exchange checks its first batch itself)
        # The exchange applies each head alone to kept head inputs: a model that computes more after its head (GPT-2's
        # `score`, then the last token) is refused here, on one batch, instead of after every job has run.
        from .exchange import EXCHANGE_FIX
        from .feature_cache import head_output_check
        from .trainer import HeadPrepTrainer

        with tempfile.TemporaryDirectory(prefix="headprep-exchange-check-") as scratch:  # (Trainer makes output_dir)
            args = dataclasses.replace(
                self.args, output_dir=scratch, hp_cache_features=False, overwrite_output_dir=True
            )
            trainer = HeadPrepTrainer(
                model=self._pristine_copy(),
                args=args,
                train_dataset=self.train_dataset,
                data_collator=self.trainer_kwargs.get("data_collator"),
            )
            net = trainer.accelerator.unwrap_model(trainer.model)
            first = torch.utils.data.Subset(
                self.train_dataset, range(min(len(self.train_dataset), trainer.measure_batch_size))
            )
            trainer.measurements.measure_dataset(
                first,
                with_energy=False,
                max_features=len(first),
                raw_features=True,
                check_first_batch=head_output_check(trainer, net, "sweep_exchange=True: ", EXCHANGE_FIX),
                sink=lambda batch: None,
            )
            del trainer, net  # (its model copy is held in reference cycles: collected now, before HP allocates)
            gc.collect()

    # ------------------------------------------------------------------ public
    def run(self) -> dict[str, Any]:
        """Run the sweep (or this shard of it); returns the content written to `output_dir/sweep.json`.

        A folder holding this sweep already (same fingerprint) is continued: finished FT jobs are reused, unfinished
        ones resume, and seeds added to `sweep_seeds` run only their own jobs."""
        if self.args.sweep_exchange:
            self._check_exchange_possible()
        self._check_sweep_metric()
        self._fingerprint = self.fingerprint()
        # One sweep at a time in the folder (`runlock`), from before the owner check to the last file: two sweeps
        # started at once (another grid, or two shards pointed at one folder) both passed that check, then wrote
        # over each other's snapshots and `sweep.json`.
        with first_process_lock(self.output_dir, "TauSweep.run()", self.args.process_index, self.args.world_size):
            return self._run()

    def _run(self) -> dict[str, Any]:
        self._check_output_dir()
        if not self.args.overwrite_output_dir:
            self._check_owner()  # before anything is written: a folder of another sweep is refused untouched
            self._check_evaluation()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        jobs = self.args.shard_jobs()
        self._refuse_fewer_jobs(jobs)
        hp_info = {"cached_features": bool(self.args.hp_cache_features), "cache_views": int(self.args.hp_cache_views)}
        hp_info["seeds"] = {}
        results = []
        finished = {job for job in jobs if self._finished(*job) is not None}
        progress = self._progress(len(jobs), len(finished))
        last: dict[str, Any] = {}  # the last job's validation metric, beside what runs now
        for seed in self.args.seeds:
            seed_jobs = [tau for tau, s in jobs if s == seed]
            if not seed_jobs:
                continue
            if any((tau, seed) not in finished for tau in seed_jobs):
                progress.set_postfix({"running": f"HP seed={seed}", **last})
                hp_info["seeds"][str(seed)] = self.probe(seed)
                progress.unpause()  # the bar's clock (rate, ETA) counts FT jobs only: HP is not a job
            else:  # every job of this seed is finished: no HP needed, its record and snapshots stay as they are
                hp_info["seeds"][str(seed)] = self._previous_hp(seed)
            for tau in seed_jobs:
                progress.set_postfix({"running": f"FT tau={tau} seed={seed}", **last})
                result = self.finetune_from(tau, seed)
                results.append(result)
                last = {self.args.sweep_metric: result["validation"].get(self.args.sweep_metric)}
                if (tau, seed) not in finished:  # (reused jobs are counted from the start, `initial`)
                    progress.set_postfix(last, refresh=False)
                    progress.update(1)
        progress.close()
        sweep = self._assemble(results, hp_info)
        if self._is_main:
            _write_json(self.output_dir / SWEEP_FILE, sweep)
        self._barrier()
        if self.args.sweep_exchange and sweep["complete"]:
            from .exchange import head_exchange

            # Every rank takes part: the measurement passes gather across processes; rank 0 writes the file.
            head_exchange(
                self._pristine_copy(),
                self.output_dir,
                self.train_dataset,
                self.eval_dataset,
                self.args,
                data_collator=self.trainer_kwargs.get("data_collator"),
                measure_train_dataset=self.exchange_train_dataset,
            )
            self._barrier()
        if self.args.sweep_report and self._is_main:
            from .report import write_report

            write_report(self.output_dir)
        return sweep

    def _refuse_fewer_jobs(self, jobs) -> None:
        """Refuse (before anything runs) a rerun whose jobs are a subset of those the folder's `sweep.json` records
        (fewer `sweep_seeds`, or one `sweep_shard` of a whole sweep): neither changes the fingerprint, so every job
        was reused and the complete `sweep.json` (its tau*, its statistics over all seeds) was replaced by the
        subset's."""
        path = self.output_dir / SWEEP_FILE
        if self.args.overwrite_output_dir or not path.is_file():
            return
        recorded = _read_json(path)
        shard, seeds = recorded.get("shard"), recorded.get("seeds")
        if (
            self.args.sweep_shard is not None
            and isinstance(shard, dict)
            and (shard.get("index"), shard.get("count")) == parse_shard(self.args.sweep_shard)
            and isinstance(seeds, list)
            and set(seeds) <= set(self.args.seeds)
        ):
            # The same shard with seeds added: positions run by tau, then seed, so some jobs it ran now belong to
            # another shard, which runs them too (README). Its new sweep.json lists its own jobs; the merge takes each
            # job from the one shard it now belongs to.
            return
        theirs = {(r.get("tau"), r.get("seed")) for r in recorded.get("results") or [] if isinstance(r, dict)}
        beyond = sorted(theirs - set(jobs), key=lambda job: (job[1] is None, job[1] or 0, job[0]))
        if beyond:
            shown = ", ".join(f"tau={tau} seed={seed}" for tau, seed in beyond[:6]) + (
                " ..." if len(beyond) > 6 else ""
            )
            raise ValueError(
                f"{path} holds the results of {len(beyond)} job(s) this run does not cover ({shown}): this run "
                f"(sweep_seeds={self.args.sweep_seeds}, sweep_shard={self.args.sweep_shard}) would replace it with "
                "a subset of them. Rerun with that sweep's sweep_seeds (and no sweep_shard) to continue it (finished "
                "jobs are reused), run a shard into another output_dir and combine shards with merge_sweeps, or "
                "pass overwrite_output_dir=True to start again."
            )

    def probe(self, seed: int | None = None) -> dict[str, Any]:
        """The one HP run of `seed` to the largest tau, saving the head after every grid epoch; returns its record."""
        seed = self.args.seeds[0] if seed is None else seed
        max_tau = self.args.sweep_taus[-1]
        hp_args = dataclasses.replace(
            self.args,
            output_dir=str(self.output_dir / "hp"),
            hp_epochs=max_tau,
            seed=seed,
            eval_strategy="no",
            # The HP run never reads FT's schedule, and without evaluations TrainingArguments refuses one that needs
            # them (reduce_lr_on_plateau): the FT jobs keep the sweep's.
            lr_scheduler_type="constant",
            lr_scheduler_kwargs={},
            save_strategy="no",
            load_best_model_at_end=False,
            track_dynamics=False,
            save_prepared_head=False,  # the snapshots are the prepared heads (sweep_prepared_heads)
            overwrite_output_dir=True,  # no checkpoints are written by this run
        )
        trainer = self._quiet(
            HeadPrepTrainer(
                model=self._model_for(seed),
                args=hp_args,
                train_dataset=self.train_dataset,
                **self._hp_trainer_kwargs(),
            )
        )
        trainer.progress_label = f"seed={seed}"
        if self._fingerprint is None:
            self._fingerprint = self.fingerprint()
        if not self._test_labels_checked:  # before the first training step, not when the first FT job evaluates it
            trainer.check_labels_of(test_dataset=self.test_dataset)
            self._test_labels_checked = True
        trainer.keep_head_inputs = bool(self.args.hp_cache_features)  # the FT jobs' energy from the cache
        start = time.perf_counter()
        if 0 in self.args.sweep_taus:
            self._save_snapshot(0, seed, trainer)
        if max_tau > 0:
            trainer.add_callback(_SnapshotCallback(self, trainer, seed))
            trainer.probe_head()
            self._save_snapshot(max_tau, seed, trainer, prepared=True)
        trainer.accelerator.wait_for_everyone()
        runtime = time.perf_counter() - start
        if trainer.is_world_process_zero():
            _remove_if_empty(Path(hp_args.output_dir))  # (Trainer makes its output_dir; this run writes nothing there)
        kept = trainer.measurements.head_inputs
        if kept is not None:  # view 0 alone (not the whole stack of cached views and their labels), for the FT jobs
            kept = dataclasses.replace(kept, features=kept.features.clone(), labels=kept.labels.clone())
        self._head_inputs = {seed: kept}
        missing = [t for t in self.args.sweep_taus if (t, seed) not in self._snapshots]
        if missing:
            raise RuntimeError(f"HP did not reach the grid epochs {missing}; no snapshot was saved for them.")
        return {
            "runtime": round(runtime, 4),
            "snapshots": {
                str(t): os.path.relpath(self._snapshots[(t, seed)], self.output_dir) for t in self.args.sweep_taus
            },
        }

    def _energy_views(self, trainer) -> str:
        """Which views of the training set a job's energy, HP-acc and p0 were measured on (`ENERGY_VIEWS`)."""
        if trainer.energy_dataset is None:
            return "as training reads them"
        return "eval transform" if _energy_on_eval_transform(self.task) else "energy_dataset"

    def fingerprint(self) -> dict[str, Any]:
        """What a sweep's folders must share: the grid, the pretrained model (with its new head, before HP), whether
        seeds re-draw the head, the settings that change results (not the seeds: each job records its own), the task
        record (the command line's data settings, e.g. `max_train_samples`) and a description of the train,
        validation and test sets and of a given `energy_dataset`/`drift_dataset` (`describe_data`: lengths and label
        hashes, no image is read)."""
        return {
            "taus": list(self.args.sweep_taus),
            "model": state_fingerprint(self._pristine.state_dict()),
            "model_settings": settings_fingerprint(self._pristine),
            "config": config_fingerprint(self.args),
            "seeded_heads": self.args.sweep_seeds is not None,
            "task": task_fingerprint(self.task),
            "data": describe_data(
                train=self.train_dataset,
                validation=self.eval_dataset,
                test=self.test_dataset,
                # The measurement sets given to every job, where given (a sweep without them keeps the fingerprint
                # it had before they were described): another set would measure the rest of the jobs on other data.
                **{
                    name: self.trainer_kwargs[name]
                    for name in ("energy_dataset", "drift_dataset")
                    if self.trainer_kwargs.get(name) is not None
                },
            ),
        }

    def evaluation_identity(self) -> dict[str, str]:
        """The functions every job evaluates (and trains) with, described by `fingerprint.callable_identity`:
        `compute_metrics`, and `preprocess_logits_for_metrics` and `compute_loss_func` where given. Recorded beside
        the fingerprint (in `sweep.json` and every job's files), not in it, so that sweeps written before it was
        recorded still continue. The sweep describes them once, when it is made."""
        functions = {"compute_metrics": self.compute_metrics}
        functions.update(
            {k: self.trainer_kwargs.get(k) for k in ("preprocess_logits_for_metrics", "compute_loss_func")}
        )
        return {name: callable_identity(fn) for name, fn in functions.items() if fn is not None}

    def _check_evaluation(self) -> None:
        """Refuse (before anything is written) a folder whose sweep or jobs were evaluated with other functions: the
        fingerprint does not hold them, and a continued sweep averaged one seed's accuracy with another's error rate
        into one tau*, without a word. Files written before this was recorded are not checked."""
        mine = self._evaluation
        records = []
        if (self.output_dir / SWEEP_FILE).is_file():
            records.append((self.output_dir / SWEEP_FILE, _read_json(self.output_dir / SWEEP_FILE)))
        for tau_dir in sorted(self.output_dir.glob("tau_*")):
            for name in (RESULT_FILE, JOB_FILE):
                records += [(path, _read_json(path)) for path in sorted(tau_dir.glob(f"seed_*/{name}"))]
        for path, record in records:
            theirs = record.get("evaluation")
            if not isinstance(theirs, dict) or theirs == mine:
                continue
            names, said = _evaluation_differences(theirs, mine, "there", "now")
            raise ValueError(
                f"{path} was evaluated with another {names} ({said}; the bracketed digest is of the "
                "function's code, which a new Python version also changes). Continuing would average the "
                "metrics of two definitions over seeds and taus into one tau*; nothing was changed. Rerun with the "
                "functions that sweep used to continue it, use another output_dir, or pass overwrite_output_dir=True "
                "(--overwrite_output_dir true) to start again in this folder."
            )

    def _check_owner(self) -> None:
        """Refuse (before any file is written) an output_dir whose sweep file, head snapshots or FT job folders belong
        to a sweep with another fingerprint: resuming or reusing them would mix two sweeps' settings."""
        mine = _fingerprint_tag(self._fingerprint)
        recorded = _read_json(self.output_dir / SWEEP_FILE) if (self.output_dir / SWEEP_FILE).is_file() else {}
        if recorded and _fingerprint_tag(recorded.get("fingerprint")) != mine:
            raise ValueError(self._foreign(self.output_dir / SWEEP_FILE, recorded.get("fingerprint"), recorded))
        # (job folders first: their files record what differs; a head snapshot only which sweep wrote it)
        for tau_dir in sorted(self.output_dir.glob("tau_*")):
            if not (tau_dir.is_dir() and re.fullmatch(r"tau_\d+", tau_dir.name)):
                continue  # (a user's file such as tau_star_notes.txt: no sweep writes it)
            jobs = [j for j in tau_dir.glob("seed_*") if j.is_dir()] if tau_dir.is_dir() else []
            if not jobs:
                raise ValueError(self._foreign(tau_dir))
            for job in jobs:
                record = {}
                for name in (RESULT_FILE, JOB_FILE):
                    if (job / name).is_file():
                        record = _read_json(job / name)
                        break
                theirs = record.get("fingerprint")
                if _fingerprint_tag(theirs) != mine:
                    raise ValueError(self._foreign(job, theirs, {**recorded, **record}))
        for path in sorted((self.output_dir / "heads").rglob("tau_*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    metadata = f.metadata() or {}
                theirs = metadata.get("sweep_fingerprint")
            except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
                raise ValueError(
                    f"{path} is not a readable head snapshot ({error}); delete it or use another output_dir."
                ) from error
            if theirs != mine:
                raise ValueError(self._foreign(path))
            recorded = (metadata.get("tau"), metadata.get("seed"))
            if recorded != (path.stem.removeprefix("tau_"), path.parent.name.removeprefix("seed_")):
                raise ValueError(
                    f"{path} is the head snapshot of tau={recorded[0]} seed={recorded[1]} (its metadata), not of the "
                    "place it is in: it was copied or moved here. Delete it to probe again; nothing was changed."
                )
        reused = (self.output_dir / SWEEP_FILE).is_file() or any(
            p.is_dir() and re.fullmatch(r"tau_\d+", p.name) for p in self.output_dir.glob("tau_*")
        )
        unlabelled = [name for name, d in self._fingerprint["data"].items() if d is not None and d["labels"] is None]
        if reused and unlabelled and not self.args.overwrite_output_dir:
            logger.warning(
                "Continuing the sweep in %s: its %s set(s) expose no labels to hash (no `.labels` array, "
                "`label_digest()` or label column), so they are told apart from other data by their length only. "
                "If the data changed since those results were written, use another output_dir.",
                self.output_dir,
                "/".join(unlabelled),
            )

    def _foreign(self, path, theirs: dict | None = None, recorded: dict | None = None) -> str:
        """The refusal of `path`, naming what differs where its fingerprint (`theirs`) and the folder's `sweep.json`
        (`recorded`, its settings) say."""
        differences = (
            fingerprint_differences(
                self._fingerprint, theirs, _settings(self.args), (recorded or {}).get("settings"), self.task,
                (recorded or {}).get("task"),
            )
            if isinstance(theirs, dict)
            else []
        )  # fmt: skip
        what = f"it differs in {'; '.join(differences)}" if differences else "other model, grid, settings or data"
        return (
            f"{path} belongs to another sweep ({what}), to none, or to one written by an earlier headprep_hf version; "
            "nothing was changed. Use another output_dir, rerun with that sweep's settings to continue it, or pass "
            "overwrite_output_dir=True (--overwrite_output_dir true) to start again in this folder."
        )

    def _previous_hp(self, seed: int) -> dict[str, Any]:
        """The HP record of `seed` from this sweep's earlier `sweep.json` (or one rebuilt from its snapshot files)."""
        path = self.output_dir / SWEEP_FILE
        if path.is_file():
            record = (_read_json(path).get("hp") or {}).get("seeds", {}).get(str(seed))
            if record is not None:
                return record
        snapshots = {str(t): self._heads_dir(seed) / f"tau_{t}.safetensors" for t in self.args.sweep_taus}
        existing = {t: os.path.relpath(p, self.output_dir) for t, p in snapshots.items() if p.is_file()}
        return {"runtime": None, "snapshots": existing}

    def _job_dir(self, tau: int, seed: int) -> Path:
        return self.output_dir / f"tau_{tau}" / f"seed_{seed}"

    def _finished(self, tau: int, seed: int) -> dict | None:
        """The result of a finished FT job of this sweep, or None."""
        done = self._job_dir(tau, seed) / RESULT_FILE
        if self.args.overwrite_output_dir or not done.is_file():
            return None
        previous = read_json(done)
        if previous.get("fingerprint") != self._fingerprint:
            return None
        result = previous["result"]
        # (the fingerprint holds no tau or seed: a result copied from another job's folder passed, and replaced a
        # complete sweep.json with one that held one job twice and another not at all)
        if (result.get("tau"), result.get("seed")) != (tau, seed):
            raise ValueError(
                f"{done} holds the result of tau={result.get('tau')} seed={result.get('seed')}, not of this folder's "
                f"job (tau={tau} seed={seed}): it was copied or moved here. Delete it to run this job again; nothing "
                "was changed."
            )
        return result

    def finetune_from(self, tau: int, seed: int | None = None) -> dict[str, Any]:
        """FT job for one (tau, seed): fresh pretrained model + the head snapshot, `finetune()`, validation/test
        metrics. A finished job of this sweep is reused."""
        seed = self.args.seeds[0] if seed is None else seed
        job_dir = self._job_dir(tau, seed)
        finished = self._finished(tau, seed)
        if finished is not None:
            logger.info("tau=%d seed=%d: reusing the finished FT job in %s.", tau, seed, job_dir)
            head_dir = self._heads_dir(seed) / f"tau_{tau}"
            if self.args.sweep_prepared_heads and self._is_main and not (head_dir / "headprep_head.json").is_file():
                # (the prepared head is written by the FT job, before FT: a reused job writes none)
                warnings.warn(
                    f"tau={tau} seed={seed}: sweep_prepared_heads=True, but the finished FT job in {job_dir} is "
                    f"reused and no prepared head is written to {head_dir} (the run that finished the job wrote "
                    "none). Rerun with overwrite_output_dir=True (every job runs again) or another output_dir to get "
                    f"it; the head snapshot {head_dir}.safetensors holds its weights.",
                    UserWarning,
                    stacklevel=2,
                )
            return finished
        if self._is_main:  # the folder's owner, written before anything else in it
            job_dir.mkdir(parents=True, exist_ok=True)
            _write_json(
                job_dir / JOB_FILE,
                {
                    "fingerprint": self._fingerprint,
                    "seed": seed,
                    "settings": _settings(self.args),
                    "evaluation": self._evaluation,
                },
            )
        # The job folder is this sweep's (checked against the fingerprint): outputs of a killed attempt are replaced.
        job_args = dataclasses.replace(
            self.args, output_dir=str(job_dir), hp_epochs=tau, seed=seed, overwrite_output_dir=True
        )
        trainer = self._quiet(
            HeadPrepTrainer(
                model=self._model_for(seed),
                args=job_args,
                train_dataset=self.train_dataset,
                eval_dataset=self.eval_dataset,
                compute_metrics=self.compute_metrics,
                **self.trainer_kwargs,
            )
        )
        trainer.run_tag = _fingerprint_tag(self._fingerprint)  # its checkpoints resume only in this sweep
        trainer.progress_label = f"tau={tau} seed={seed}"
        # Cached HP read the training set through the frozen backbone already: the start-of-FT energy, HP accuracy
        # and p0 come from those head inputs where they are the views the energy pass would read (see measurements).
        trainer.measurements.head_inputs = self._head_inputs.get(seed)
        snapshot_path = self._snapshots[(tau, seed)]
        snapshot = read_safetensors(snapshot_path)
        missing, unexpected = trainer.accelerator.unwrap_model(trainer.model).load_state_dict(snapshot, strict=False)
        if unexpected:
            raise ValueError(f"The head snapshot {snapshot_path} has keys the model lacks: {unexpected[:5]}.")
        head_config = None
        if self.args.sweep_prepared_heads:
            from .hub import prepared_head_config

            head_config = prepared_head_config(trainer, tau=tau)  # before FT: the pretrained backbone's checksum
        checkpoint = latest_resumable(str(job_dir / "ft"))  # (complete checkpoints only; torn ones are skipped)
        if checkpoint is not None and not os.path.isfile(os.path.join(checkpoint, "optimizer.pt")):
            # Its optimizer and schedule state were not written (save_only_model=True): resumed, the job would go on
            # with a fresh optimizer and give another result than the job run whole, recorded as this (tau, seed)'s.
            warnings.warn(
                f"tau={tau} seed={seed}: {checkpoint} was written with save_only_model=True (no optimizer or "
                "scheduler state), so this FT job runs again from its start rather than resume into another result.",
                UserWarning,
                stacklevel=2,
            )
            checkpoint = None
        try:
            output = trainer.finetune(resume_from_checkpoint=checkpoint)
        except CheckpointError as error:
            if checkpoint is None:
                raise
            # (the error's own advice, another checkpoint, is not something a sweep can be told)
            raise CheckpointError(
                f"tau={tau} seed={seed}: {error} A sweep resumes each job from its newest complete checkpoint: move "
                f"{checkpoint} out of {job_dir / 'ft'} (the job then resumes from the checkpoint before it, or runs "
                "again from its start where there is none) and rerun the sweep."
            ) from error
        if head_config is not None and trainer.args.should_save:
            from .hub import write_prepared_head

            head_config.update(
                energy=trainer.dynamics.get("energy"), hp_train_accuracy=trainer.dynamics.get("hp_train_accuracy")
            )
            write_prepared_head(self._heads_dir(seed) / f"tau_{tau}", snapshot, head_config)
        trainer.save_model()
        validation = _strip(trainer.evaluate(), "eval_")
        metric = self.args.sweep_metric
        if metric not in validation:
            raise ValueError(
                f"sweep_metric {metric!r} is not among the validation metrics {sorted(validation)}; set sweep_metric "
                "to one of them or pass a compute_metrics that returns it."
            )
        test = None
        if self.test_dataset is not None:
            test = _strip(trainer.evaluate(self.test_dataset, metric_key_prefix="test"), "test_")
        dyn = trainer.dynamics
        result = {
            "tau": tau,
            "seed": seed,
            "hp_train_accuracy": dyn.get("hp_train_accuracy"),
            "energy": dyn.get("energy"),
            "problem_type": dyn.get("problem_type"),  # (what the energy was computed for: the report's axis label)
            "energy_views": self._energy_views(trainer),  # (which views the energy and HP-acc saw: the table says)
            "p0_mean": dyn.get("p0_mean"),
            "p0_histogram": dyn.get("p0_histogram") if dyn.get("p0_mean") is not None else None,
            "drift": final_drift_of(dyn),  # (the evaluated model's: the best checkpoint's where it was loaded)
            "validation": validation,
            "test": test,
            "head_grad_norm": dyn.get("head_grad_norm", []),
            "output_dir": os.path.relpath(job_dir, self.output_dir),
            "train_runtime": round(float(output.metrics.get("train_runtime", 0.0)), 4),
        }
        saved = job_dir / "model.safetensors"  # (its sha256 is checked by the head exchange before it reads it)
        sha = file_sha256(saved) if trainer.args.process_index == 0 and saved.is_file() else None
        if trainer.accelerator.num_processes > 1:  # (every rank returns the same result)
            from accelerate.utils import broadcast_object_list

            sha = broadcast_object_list([sha], from_process=0)[0]
        if sha is not None:
            result["model_sha256"] = sha
        if trainer.args.should_save:
            _write_json(
                job_dir / RESULT_FILE,
                {
                    "fingerprint": self._fingerprint,
                    "result": result,
                    "settings": _settings(self.args),
                    "evaluation": self._evaluation,
                },
            )
            _remove_if_empty(job_dir / "ft")  # (the checkpoints' folder, when the job wrote none)
        return result

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _barrier() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    @property
    def _is_main(self) -> bool:
        return self.args.process_index == 0

    def _quiet(self, trainer: HeadPrepTrainer) -> HeadPrepTrainer:
        # The Trainer prints every log record (PrinterCallback with disable_tqdm, above its bar otherwise); in a sweep
        # the bar over jobs shows each job's result instead (the logs still reach report_to and sweep.json). The
        # job's own bars stay.
        if self.args.disable_tqdm:
            trainer.remove_callback(PrinterCallback)
        callbacks = trainer.callback_handler.callbacks
        for i, callback in enumerate(callbacks):
            if type(callback) is ProgressCallback:  # in place: it draws its bar before the stage callback labels it
                callbacks[i] = QuietProgressCallback()
        return trainer

    def _pristine_copy(self) -> torch.nn.Module:
        return copy.deepcopy(self._pristine)

    def _model_for(self, seed: int) -> torch.nn.Module:
        """A fresh copy of the pretrained model; with `sweep_seeds`, its head re-drawn from `seed` (the head's own
        `reset_parameters`, seeded), so the seed decides the head's initialisation."""
        model = self._pristine_copy()
        if self.args.sweep_seeds is not None:
            reinitialize_head(model, find_split(model, self.args.head_modules), seed)
        return model

    def _hp_trainer_kwargs(self) -> dict[str, Any]:
        # The HP run neither evaluates nor measures; it needs the collator and the user's callbacks only.
        return {k: v for k, v in self.trainer_kwargs.items() if k in ("data_collator", "callbacks")}

    def _heads_dir(self, seed: int) -> Path:
        return self.output_dir / "heads" / f"seed_{seed}"

    def _save_snapshot(self, tau: int, seed: int, trainer: HeadPrepTrainer, prepared: bool = False) -> None:
        # Mid-HP heads get what probe_head() with hp_epochs=tau would add (BatchNorm statistics); a head after
        # probe_head() (`prepared`) has it already.
        path = self._heads_dir(seed) / f"tau_{tau}.safetensors"
        state = trainer.hp_state_dict() if prepared else trainer.prepared_hp_state_dict()
        check_finite(state, f"the head snapshot {path}")  # a diverged HP epoch never becomes a snapshot
        if self._is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tag = _fingerprint_tag(self._fingerprint)
            metadata = {"tau": str(tau), "seed": str(seed), "sweep_fingerprint": tag}
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        self._snapshots[(tau, seed)] = str(path)

    def _check_output_dir(self) -> None:
        # A finished sweep of the same fingerprint is continued (more seeds; finished jobs reused); another is refused
        # by _check_owner. overwrite_output_dir=True starts it again from scratch in the same folder.
        if self.args.overwrite_output_dir and self._is_main:
            self._remove_sweep_artefacts()
        self._barrier()

    def _remove_sweep_artefacts(self) -> None:
        """Move what a sweep writes into its output_dir (sweep.json, exchange.json, heads/, the tau_N job folders,
        the report's PNGs in plots/) into `replaced-<time>/` there, so that leftovers of the earlier sweep (other
        grid or seeds) neither mix into the new one nor refuse its continuation, and nothing of it is lost if the new
        sweep fails (they were deleted before it had produced anything). Anything else in the folder is left as it
        is."""
        out = self.output_dir
        if not out.is_dir():
            return
        earlier = [out / name for name in (SWEEP_FILE, EXCHANGE_FILE) if (out / name).is_file()]
        earlier += [out / "heads"] if (out / "heads").is_dir() else []
        earlier += [p for p in sorted(out.glob("tau_*")) if p.is_dir() and re.fullmatch(r"tau_\d+", p.name)]
        earlier += [out / "plots" / name for name in PLOT_FILES if (out / "plots" / name).is_file()]
        if not earlier:
            return
        names = [str(p.relative_to(out)) + ("/" if p.is_dir() else "") for p in earlier]
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
        aside = out / f"replaced-{stamp}"
        while aside.exists():
            aside, n = out / f"replaced-{stamp}-{n}", n + 1
        for path in earlier:
            target = aside / path.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        if (out / "plots").is_dir() and not any((out / "plots").iterdir()):
            os.rmdir(out / "plots")
        logger.warning(
            "overwrite_output_dir=True: moved the earlier sweep's %s from %s to %s.",
            ", ".join(names),
            out,
            aside,
        )

    def _progress(self, total: int, done: int):
        # Every update is drawn (`mininterval=0`: a few updates, seconds apart), so that `unpause()` after HP
        # restarts the clock from the end of the last FT job exactly. Reused jobs are `initial`: not in the rate.
        return hf_logging.tqdm(
            total=total,
            initial=done,
            desc="tau sweep",
            unit="job",
            mininterval=0,
            dynamic_ncols=True,
            disable=not (self.args.sweep_progress and not self.args.disable_tqdm and self._is_main),
        )

    def _assemble(self, results: list[dict], hp_info: dict) -> dict[str, Any]:
        shard = None
        if self.args.sweep_shard is not None:
            index, count = parse_shard(self.args.sweep_shard)
            shard = {"index": index, "count": count}
        return assemble_sweep(
            results=results,
            taus=self.args.sweep_taus,
            seeds=self.args.seeds,
            metric=self.args.sweep_metric,
            greater_is_better=self.args.selection_greater_is_better,
            hp=hp_info,
            fingerprint=self._fingerprint,
            shard=shard,
            task=self.task,
            settings=_settings(self.args),
            evaluation=self._evaluation,
        )


def _settings(args: SweepConfig) -> dict[str, Any]:
    # Only the config's own fields (`headprep exchange` rebuilds a SweepConfig from them): not world_size, a property.
    fields = {f.name for f in dataclasses.fields(args) if f.init}
    names = (*_FINGERPRINT_FIELDS, *_FINGERPRINT_FIELDS_IF_SET)
    keys = ["seed", "sweep_seeds", *(k for k in names if k not in ("sweep_taus",) and k in fields)]
    return {k: getattr(getattr(args, k, None), "value", getattr(args, k, None)) for k in keys}


def choose_tau_star(
    per_tau: list[dict], greater_is_better: bool, metric: str = "metric", n_seeds: int | None = None
) -> tuple[int | None, str | None]:
    """`(tau*, note)`: the tau with the best mean validation metric among the taus with the most seeds of a finite
    value (`per_tau` rows of `assemble_sweep`; means equal up to float rounding are a tie: the smallest tau wins).

    A tau that lost a seed to a missing or non-finite (NaN, inf) metric, e.g. a diverged job, ranks behind the taus
    that have more: its mean over the remaining seeds would flatter it. When every tau lost one, the taus with the
    largest count compete and `note` says so; when no tau has a finite value, tau* is None and `note` says why. `note`
    is None when every tau has every seed (`n_seeds`, default: the most seeds any row ran)."""
    rows = sorted(per_tau, key=lambda r: r["tau"])
    if not rows:
        return None, f"tau* not chosen: no FT job has a validation {metric}."
    n_seeds = n_seeds if n_seeds is not None else max(len(r["seeds"]) for r in rows)
    counts = {r["tau"]: (r["validation"]["n"] if r["validation"] is not None else 0) for r in rows}
    n_best = max(counts.values())
    if n_best == 0:
        return None, (
            f"tau* not chosen: the validation {metric} is missing or not finite (NaN/inf) at every tau; check that "
            f"compute_metrics can compute {metric} on the validation set (e.g. both classes present for roc_auc), or "
            "pick another sweep_metric."
        )
    sign = 1.0 if greater_is_better else -1.0
    best = None
    for row in rows:
        if counts[row["tau"]] != n_best:
            continue
        score = sign * row["validation"]["mean"]
        if best is None or (score > best[1] and not is_tie(score, best[1])):
            best = (row["tau"], score)
    note = None
    short = {t: n for t, n in counts.items() if n < n_seeds}
    if short:
        left_out = [f"tau = {t} ({n} of {n_seeds})" for t, n in short.items() if n < n_best]
        note = (
            f"tau* chosen among the taus whose validation {metric} is finite for {n_best} of {n_seeds} seeds"
            + (f"; left out: {', '.join(left_out)}" if left_out else "")
            + " (missing or NaN/inf values, e.g. diverged jobs)."
        )
    return best[0], note


def select_tau_star(per_tau: list[dict], greater_is_better: bool) -> int | None:
    """tau* of `choose_tau_star` (None when no tau has a finite validation metric)."""
    return choose_tau_star(per_tau, greater_is_better)[0]


_DRIFT_KEYS = ("sq_dist", "dot", "sq_norm", "cos")


def summarize_taus(results: list[dict], taus: list[int], metric: str) -> list[dict]:
    """Per tau: `describe` (n, mean, std, 95% t-interval, values) over its seeds of the validation and test metric,
    energy, HP train accuracy, p0 mean and the four drift metrics at the end of FT (null where nothing is defined)."""
    rows = []
    for tau in taus:
        group = sorted((r for r in results if r["tau"] == tau), key=lambda r: r.get("seed") or 0)
        if not group:
            continue
        tests = [(r["test"] or {}).get(metric) for r in group]
        seeds = [r.get("seed") for r in group]  # (each statistic's `seeds`: those of its finite values, in order)
        rows.append(
            {
                "tau": tau,
                "seeds": seeds,
                "validation": describe([r["validation"].get(metric) for r in group], seeds),
                "test": describe(tests, seeds) if any(t is not None for t in tests) else None,
                "energy": describe([r["energy"] for r in group], seeds),
                "hp_train_accuracy": describe([r["hp_train_accuracy"] for r in group], seeds),
                "p0_mean": describe([r["p0_mean"] for r in group], seeds),
                "drift": {k: describe([(r["drift"] or {}).get(k) for r in group], seeds) for k in _DRIFT_KEYS},
            }
        )
    return rows


def compare_taus(
    results: list[dict], tau_a: int, tau_b: int, metric: str, greater_is_better: bool, selected: bool = False
) -> dict | None:
    """tau_a against tau_b on the validation and test `metric`, paired over the seeds both ran, with the verdict.
    `selected`: tau_a is tau*, chosen on the validation values, whose comparison then gives no verdict
    (`replicates.verdict`)."""
    if tau_a == tau_b:
        return None

    def by_seed(tau, part):
        return {r.get("seed"): ((r[part] or {}).get(metric)) for r in results if r["tau"] == tau}

    out = {"tau": tau_a, "against": tau_b}
    for part in ("validation", "test"):
        a, b = by_seed(tau_a, part), by_seed(tau_b, part)
        difference = paired_difference(a, b)
        out[part] = difference
        if difference is not None:
            # A share (accuracy, IoU) reads in percentage points; what else the metric is, in its own units.
            values = [v for v in (*a.values(), *b.values()) if v is not None and math.isfinite(v)]
            fraction = greater_is_better and all(0.0 <= v <= 1.0 for v in values)
            out[f"{part}_verdict"] = verdict(
                tau_a,
                tau_b,
                difference,
                f"{part} {metric}",
                greater_is_better,
                fraction,
                selected and part == "validation",
            )
    return out


def assemble_sweep(
    results: list[dict],
    taus: list[int],
    metric: str,
    greater_is_better: bool,
    hp: dict,
    fingerprint: dict,
    shard: dict | None,
    task: dict | None = None,
    settings: dict | None = None,
    merged_from: list[str] | None = None,
    seeds: list[int] | None = None,
    evaluation: dict[str, str] | None = None,
    warn: bool = True,
) -> dict[str, Any]:
    """Build (and validate) the `sweep.json` content from the per-(tau, seed) results (NaN/inf values become null).
    `warn`: log tau*'s note (False where a written sweep is read back)."""
    results = _finite_or_null(sorted(results, key=lambda r: (r["tau"], r.get("seed") or 0)))
    seeds = list(seeds) if seeds is not None else sorted({r.get("seed") for r in results if r.get("seed") is not None})
    done = {(r["tau"], r.get("seed")) for r in results}
    complete = all((t, s) in done for t in taus for s in seeds) if seeds else {r["tau"] for r in results} == set(taus)
    per_tau = summarize_taus(results, taus, metric)
    tau_star, tau_star_note = None, None
    if complete:
        tau_star, tau_star_note = choose_tau_star(per_tau, greater_is_better, metric, n_seeds=max(len(seeds), 1))
        if tau_star_note is not None and warn:
            logger.warning(tau_star_note)
    by_tau = {row["tau"]: row for row in per_tau}

    def row(tau):
        if tau not in by_tau:
            return None
        stats = by_tau[tau]
        return {
            "tau": tau,
            "validation": stats["validation"]["mean"] if stats["validation"] else None,
            "test": stats["test"]["mean"] if stats["test"] else None,
            "n": stats["validation"]["n"] if stats["validation"] else 0,
            "n_test": stats["test"]["n"] if stats["test"] else 0,
        }

    comparisons = {}
    if tau_star is not None:
        comparisons = {
            "vs_first": compare_taus(results, tau_star, taus[0], metric, greater_is_better, selected=True),
            "vs_last": compare_taus(results, tau_star, taus[-1], metric, greater_is_better, selected=True),
        }
    sweep = {
        "format_version": SWEEP_FORMAT_VERSION,
        "headprep_version": __version__,
        "taus": list(taus),
        "seeds": seeds,
        "selection_metric": metric,
        "greater_is_better": greater_is_better,
        "tau_star": tau_star,
        "tau_star_note": tau_star_note,
        "complete": complete,
        "results": results,
        "per_tau": per_tau,
        "comparisons": comparisons,
        "summary": {
            "HP0-FT": row(taus[0]) if taus[0] == 0 else None,
            "HPmax-FT": row(taus[-1]),
            "HPtau*-FT": row(tau_star) if tau_star is not None else None,
        },
        "hp": hp,
        "fingerprint": fingerprint,
        "shard": shard,
        "task": task,
        "settings": settings or {},
    }
    if merged_from is not None:
        sweep["merged_from"] = merged_from
    if evaluation is not None:
        sweep["evaluation"] = evaluation
    sweep = _finite_or_null(sweep)
    validate_sweep(sweep)
    return sweep


def upgrade_sweep(data: dict[str, Any]) -> dict[str, Any]:
    """A `sweep.json` of format 1 (one seed, no statistics) in the layout of format 2 (the reports read that)."""
    if data.get("format_version", 1) >= 2:
        return data
    results = [{**r, "seed": None} for r in data["results"]]
    per_tau = summarize_taus(results, data["taus"], data["selection_metric"])
    return {**data, "format_version": 2, "seeds": [], "results": results, "per_tau": per_tau, "comparisons": {}}


def load_sweep(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """The `sweep.json` of a sweep folder, checked against its schema and upgraded to the current format; tau*, the
    per-tau statistics and the comparisons are derived again from its results (a warning names a tau* that differs
    from the stored one; the file is not changed). A `ValueError` names a damaged or edited file."""
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a sweep folder (it is written by `headprep sweep`).")
    data = read_json(path)
    validate_sweep_file(data, path)
    written_as = data.get("format_version", 1)
    data = upgrade_sweep(data)
    if data.get("complete"):
        # (a complete sweep holds a result for every tau and seed: one removed by hand left the report's statistics
        # over fewer runs than they say, and the exchange failed on a KeyError)
        seeds = data.get("seeds") or [None]
        held = {(r.get("tau"), r.get("seed")) for r in data["results"]}
        missing = [(t, s) for s in seeds for t in data["taus"] if (t, s) not in held]
        if missing:
            named = ", ".join(f"tau={t}" + (f" seed={s}" if s is not None else "") for t, s in missing[:6])
            raise ValueError(
                f"{path} says the sweep is complete but holds no result for {named}"
                f"{', ...' if len(missing) > 6 else ''}: it was edited or damaged. Rerun the sweep into its folder "
                "(its finished jobs are reused), or restore the file."
            )
    # (format 1, one seed, chose tau* by the one rule there is for one seed, and held no verdicts)
    return rederive_sweep(data, path) if written_as >= 2 else data


# What `sweep.json` holds that follows from its results by this version's rules (tau*, the statistics, the verdicts).
_DERIVED_KEYS = ("per_tau", "tau_star", "tau_star_note", "comparisons", "summary")


def rederive_sweep(data: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """`data` with its derived parts (`_DERIVED_KEYS`) computed again from its results by this version's rules. A file
    written by an earlier version of the same format holds its own: a validation verdict of "beats" on the values
    tau* was chosen on (which this version refuses to claim), a tau* that ranked every tau with a lost seed last (so
    the first tau when each had lost one). They were shown as they were. A tau* that differs is named in a warning."""
    fresh = assemble_sweep(
        data["results"],
        data["taus"],
        data["selection_metric"],
        data["greater_is_better"],
        data["hp"],
        data["fingerprint"],
        data.get("shard"),
        task=data.get("task"),
        settings=data.get("settings"),
        merged_from=data.get("merged_from"),
        seeds=data["seeds"],
        evaluation=data.get("evaluation"),
        warn=False,
    )
    if fresh["complete"] != bool(data.get("complete")):  # (not one sweep's record by these rules: left as written)
        return data
    if fresh["tau_star"] != data.get("tau_star"):
        logger.warning(
            "%s records tau* = %s, chosen by the rule of headprep_hf %s; by this version's rule its results give tau* "
            "= %s, which is what is shown (the file is not changed).",
            path,
            data.get("tau_star"),
            data.get("headprep_version"),
            fresh["tau_star"],
        )
    return {**data, **{key: fresh[key] for key in _DERIVED_KEYS}}


_FINGERPRINT_PARTS = {
    "taus": "the grid of taus",
    "model": "the model (weights or head)",
    "model_settings": "the model's settings (module attributes such as dropout rates; a transformers config)",
    "config": "the settings",
    "seeded_heads": "seeded heads (sweep_seeds set or not)",
    "task": "the task record",
    "data": "the data",
}


def fingerprint_differences(
    mine: dict,
    theirs: dict,
    my_settings: dict | None = None,
    their_settings: dict | None = None,
    my_task: dict | None = None,
    their_task: dict | None = None,
) -> list[str]:
    """What differs between two sweep fingerprints, in words: each part, with the settings, task arguments and data
    sets that differ where the records say (`sweep.json`'s `settings` and `task`; `theirs` first, then `mine`)."""
    # Parts (and keys of a set's description) this version records and `theirs` lacks: compared without them, and
    # named as the version's doing only where nothing else differs (a set with no content digest has no `content`).
    missing = [key for key in _FINGERPRINT_PARTS if key in mine and key not in theirs]
    mine = {k: v for k, v in mine.items() if k not in missing}
    their_data, my_data = theirs.get("data"), mine.get("data")
    if isinstance(their_data, dict) and isinstance(my_data, dict):
        gained, data = set(), {}
        for split, described in my_data.items():
            earlier = their_data.get(split)
            if isinstance(described, dict) and isinstance(earlier, dict):
                gained |= {key for key in described if key not in earlier}
                described = {k: v for k, v in described.items() if k in earlier}
            data[split] = described
        mine = {**mine, "data": data}
    else:
        gained = set()
    version = f"the version that wrote it (an earlier headprep_hf, whose fingerprint has no {', '.join(missing)})"
    if (missing or gained) and all(theirs.get(key) == mine.get(key) for key in _FINGERPRINT_PARTS if key in mine):
        if missing:
            return [version]
        return [
            f"the data's {', '.join(sorted(gained))}, which this run records and that file does not (written by "
            "an earlier headprep_hf version, or of data whose content was not read: more than 2 GB stored in its rows)"
        ]
    out = []
    for key, name in _FINGERPRINT_PARTS.items():
        a, b = theirs.get(key), mine.get(key)
        if a == b:
            continue
        detail = ""
        if key == "taus":
            detail = f": {a} -> {b}"
        elif key == "config" and my_settings is not None and their_settings is not None:
            keys = sorted(k for k in set(my_settings) | set(their_settings) if k not in ("seed", "sweep_seeds"))
            # (a setting a file did not record had its default then: `_FINGERPRINT_FIELDS_IF_SET`)
            recorded = {k: their_settings.get(k, _FINGERPRINT_FIELDS_IF_SET.get(k)) for k in keys}
            current = {k: my_settings.get(k, _FINGERPRINT_FIELDS_IF_SET.get(k)) for k in keys}
            changed = [f"{k}: {recorded[k]!r} -> {current[k]!r}" for k in keys if recorded[k] != current[k]]
            detail = f" ({', '.join(changed[:6])})" if changed else ""
        elif key == "task" and _task_args(my_task) is not None and _task_args(their_task) is not None:
            ta, tb = _task_args(their_task)["args"], _task_args(my_task)["args"]
            changed = [
                f"{k}: {ta.get(k)!r} -> {tb.get(k)!r}" for k in sorted(set(ta) | set(tb)) if ta.get(k) != tb.get(k)
            ]
            detail = f" ({', '.join(changed[:6])})" if changed else ""
        elif key == "data" and isinstance(a, dict) and isinstance(b, dict):
            sets = []
            for split in sorted(set(a) | set(b)):
                da, db = a.get(split), b.get(split)
                if da == db:
                    continue
                if da is None or db is None:
                    sets.append(f"{split}: {'none' if da is None else 'a set'} -> {'none' if db is None else 'a set'}")
                elif da.get("length") != db.get("length"):
                    sets.append(f"{split}: {da.get('length')} -> {db.get('length')} samples")
                elif da.get("labels") != db.get("labels"):
                    sets.append(f"{split}: other labels")
                else:
                    sets.append(f"{split}: other content (images, text or graphs)")
            detail = f" ({', '.join(sets)})" if sets else ""
        out.append(name + detail)
    return out + ([version] if missing else [])


def _check_same_sweep(first_file: Path, first: dict, other_file: Path, other: dict) -> None:
    """Raise a `ValueError` naming both files and what differs unless two shards are parts of one sweep."""
    cannot = f"Cannot merge {other_file} with {first_file}"
    rerun = "they are not one sweep; rerun the shards with the same settings, or merge only the shards of one sweep."
    mine, theirs = _task_args(first.get("task")), _task_args(other.get("task"))
    if mine != theirs:
        if mine is None or theirs is None:
            keys = ["task (recorded in one file only)"]
        else:
            keys = ["name"] if mine["name"] != theirs["name"] else []
            keys += sorted(
                k for k in set(mine["args"]) | set(theirs["args"]) if mine["args"].get(k) != theirs["args"].get(k)
            )
        raise ValueError(f"{cannot}: their task records differ in {keys} (the data or model settings); {rerun}")
    if other["selection_metric"] != first["selection_metric"]:
        raise ValueError(
            f"{cannot}: their selection metrics (sweep_metric) differ: {other['selection_metric']!r} and "
            f"{first['selection_metric']!r}; {rerun}"
        )
    if other["greater_is_better"] != first["greater_is_better"]:
        raise ValueError(
            f"{cannot}: their direction of sweep_metric {first['selection_metric']!r} (sweep_greater_is_better) "
            f"differs: {other['greater_is_better']} and {first['greater_is_better']}; {rerun}"
        )
    differences = fingerprint_differences(
        first["fingerprint"], other["fingerprint"], first.get("settings"), other.get("settings")
    )
    if differences:
        raise ValueError(f"{cannot}: they differ in {'; '.join(differences)}; {rerun}")
    mine, theirs = first.get("evaluation"), other.get("evaluation")
    if isinstance(mine, dict) and isinstance(theirs, dict) and mine != theirs:
        names, said = _evaluation_differences(theirs, mine, f"in {other_file}", f"in {first_file}")
        raise ValueError(f"{cannot}: they were evaluated with other {names} ({said}); {rerun}")


def merge_sweeps(
    sweep_dirs: list[str | os.PathLike], output_dir: str | os.PathLike, overwrite: bool = False
) -> dict[str, Any]:
    """Merge the `sweep.json` of shards of one sweep into `output_dir/sweep.json` (FT job paths made relative to it).

    Raises `ValueError` when the shards come from different sweeps (grid, model, settings, task, data, selection
    metric or its direction differ), when two of them hold the same (tau, seed) job, or when `output_dir/sweep.json`
    exists and `overwrite` is False. Nothing is written then.
    """
    if not sweep_dirs:
        raise ValueError("Nothing to merge: give the shard folders.")
    output_dir = Path(output_dir)
    target = output_dir / SWEEP_FILE
    if target.exists() and not overwrite:
        raise ValueError(f"{target} already exists; merge into another folder or pass --overwrite_output_dir.")
    sweeps = [(Path(d), load_sweep(d)) for d in sweep_dirs]
    first_dir, first = sweeps[0]
    results: dict[tuple, dict] = {}
    hp = {k: v for k, v in first["hp"].items() if k != "seeds"}
    hp["seeds"] = {}
    seeds: dict = {}  # (in the order the shards list them: the first seed is the one `headprep exchange` pairs)
    origin: dict[tuple, tuple[Path, dict]] = {}
    for path, sweep in sweeps:
        _check_same_sweep(first_dir / SWEEP_FILE, first, path / SWEEP_FILE, sweep)
        seeds.update(dict.fromkeys(sweep.get("seeds") or []))
        for seed, record in (sweep["hp"].get("seeds") or {}).items():
            hp["seeds"].setdefault(
                seed,
                {
                    **record,
                    "snapshots": {t: os.path.relpath(path / p, output_dir) for t, p in record["snapshots"].items()},
                },
            )
        for result in sweep["results"]:
            key = (result["tau"], result.get("seed"))
            if key in results:
                other_path, other = origin[key]
                stale = ""
                if other.get("seeds") != sweep.get("seeds"):  # (job positions shift when seeds are added)
                    stale = (
                        f" Their seeds differ ({other.get('seeds')} in {other_path}, {sweep.get('seeds')} in {path}): "
                        "one of them ran before seeds were added to sweep_seeds. Rerun that shard with the current "
                        "sweep_seeds (finished jobs are reused), then merge again."
                    )
                raise ValueError(
                    f"tau={key[0]} seed={key[1]} is in two shards, {other_path} and {path}; each (tau, seed) job must "
                    f"come from one shard.{stale or ' Merge each shard folder once.'}"
                )
            origin[key] = (path, sweep)
            merged = dict(result)
            merged["output_dir"] = os.path.relpath(path / result["output_dir"], output_dir)
            results[key] = merged
    merged = assemble_sweep(
        results=list(results.values()),
        taus=first["taus"],
        seeds=list(seeds),
        metric=first["selection_metric"],
        greater_is_better=first["greater_is_better"],
        hp=hp,
        fingerprint=first["fingerprint"],
        shard=None,
        task=first.get("task"),  # (every shard's task record is the same, up to where files lie on its machine)
        settings=first.get("settings"),
        merged_from=[str(p) for p, _ in sweeps],
        evaluation=next(
            (sweep["evaluation"] for _, sweep in sweeps if isinstance(sweep.get("evaluation"), dict)), None
        ),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(target, merged)
    return merged


def job_counts(sweep: dict[str, Any]) -> tuple[int, int]:
    """`(done, total)`: the (tau, seed) jobs of the grid that have a result, and all of them (format 1: one per
    tau)."""
    taus = set(sweep["taus"])
    seeds = sweep.get("seeds") or [None]
    done = {(r["tau"], r.get("seed")) for r in sweep["results"] if r["tau"] in taus}
    if not sweep.get("seeds"):
        done = {(tau, None) for tau, _ in done}
    return len(done), len(taus) * len(seeds)


def _evaluation_differences(theirs: dict, mine: dict, their_place: str, my_place: str) -> tuple[str, str]:
    """The names of the evaluation functions two records describe differently ("compute_metrics and ..."), and what
    each says of them."""
    names = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    said = "; ".join(f"{n}: {theirs.get(n)} {their_place}, {mine.get(n)} {my_place}" for n in names)
    return " and ".join(names), said


def _number(value: float) -> str:
    """Four decimals, as the table has always printed, except where they would hide the value: below 0.001 (an MSE
    of 1e-5 printed as 0.0000 at every tau, all looking tied) or from 100,000 on, four significant digits."""
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.4g}"


def _mean_std(stats: dict | None, width: int) -> str:
    if stats is None:
        return f"{'-':>{width}}"
    text = _number(stats["mean"]) + (f" +- {_number(stats['std'])}" if stats["std"] is not None else "")
    return f"{text:>{width}}"


_TABLE_NAMES = {"hp_train_accuracy": "HP-acc"}
# What each result's `energy_views` says, in words (the table's and the report's label).
ENERGY_VIEWS = {
    "as training reads them": "the training set as training reads it (augmentation included)",
    "eval transform": "the training set through the eval transform",
    "energy_dataset": "the energy_dataset given to the sweep",
}


def _energy_on_eval_transform(task: dict | None) -> bool:
    """Whether the task record asked for the energy on the training set through the eval transform (the image
    recipe's `--energy_on_eval_transform true`)."""
    return bool(((task or {}).get("args") or {}).get("energy_on_eval_transform"))


def energy_views(sweep: dict[str, Any]) -> str | None:
    """Which views of the training set the sweep's energies and HP train accuracies were measured on, in words
    (`ENERGY_VIEWS`), or None where its results do not say (written before it was recorded, and not the image
    recipe's `--energy_on_eval_transform true`, which its task record says) or disagree."""
    views = {r.get("energy_views") for r in sweep.get("results", []) if r.get("energy") is not None}
    if views == {None} and _energy_on_eval_transform(sweep.get("task")):
        views = {"eval transform"}
    return ENERGY_VIEWS.get(views.pop()) if len(views) == 1 else None


def _fewer_seeds(rows: list[dict], n_seeds: int, has_test: bool) -> str | None:
    """Which means of the table are over fewer seeds than the header says (a seed's value missing or not finite)."""
    fewer = []
    keys = ("energy", "hp_train_accuracy", "validation", *(("test",) if has_test else ()))
    shown = [key for key in keys if key == "validation" or any(row[key] for row in rows)]  # (regression: no HP-acc)
    for row in rows:
        for key in shown:
            n = row[key]["n"] if row[key] else 0
            if n < n_seeds:
                fewer.append(f"tau={row['tau']} {_TABLE_NAMES.get(key, key)} n={n}")
    return f"over fewer seeds (a value missing or not finite): {', '.join(fewer)}" if fewer else None


def format_table(sweep: dict[str, Any]) -> str:
    """The sweep as a text table: per tau the mean (+- standard deviation over seeds) of the energy, HP train
    accuracy and FT validation (and test) metric, tau* marked; then tau* and its paired comparisons."""
    sweep = upgrade_sweep(sweep)
    metric = sweep["selection_metric"]
    rows = sweep["per_tau"]
    # (the seeds run, not the most that have a finite validation value: the header said "over 2 seeds" for a sweep
    # of 3 whose one seed had none, beside energies over 3, and no mean was flagged as over fewer)
    n_finite = max((row["validation"]["n"] for row in rows if row["validation"]), default=0)
    # (a shard or an unfinished sweep holds part of the seeds' jobs by design: counted by what it holds, as before,
    # and the line below says it is part of the sweep)
    n_seeds = max(len(sweep.get("seeds") or []), n_finite) if sweep.get("complete") else n_finite
    has_test = any(row["test"] for row in rows)
    width = 18 if n_seeds > 1 else 8
    header = f"{'tau':>5}  {'energy':>{width}}  {'HP-acc':>{width}}  {'FT-val ' + metric:>{width}}" + (
        f"  {'test ' + metric:>{width}}" if has_test else ""
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        star = " *" if row["tau"] == sweep["tau_star"] else ""
        line = f"{row['tau']:>5}  " + "  ".join(
            _mean_std(row[key], width) for key in ("energy", "hp_train_accuracy", "validation")
        )
        if has_test:
            line += "  " + _mean_std(row["test"], width)
        lines.append(line + star)
    if any(row["energy"] for row in rows):
        # (the same header for augmented views and the eval transform; the exchange's heatmap said which, the table
        # and the figure did not)
        views = energy_views(sweep)
        lines.append(
            f"(energy and HP-acc at the start of FT, on {views})"
            if views
            else "(energy and HP-acc at the start of FT; which views of the training set is not recorded)"
        )
    if n_seeds > 1:
        lines.append(f"(mean +- standard deviation over {n_seeds} seeds: {sweep['seeds']})")
        fewer = _fewer_seeds(rows, n_seeds, has_test)
        if fewer:
            lines.append(fewer)
    done, total = job_counts(sweep)
    if done < total:
        taus = sorted({r["tau"] for r in sweep["results"]})
        lines.append(
            f"tau* not chosen: results for {done} of {total} (tau, seed) jobs (taus {taus} of {sweep['taus']}), part "
            "of the sweep (a shard); merge the shards (headprep sweep --merge) to choose it."
        )
    note = sweep.get("tau_star_note")
    if sweep["tau_star"] is None:
        if done == total:
            lines.append(note or "tau* not chosen.")
        return "\n".join(lines)
    lines.append(f"tau* = {sweep['tau_star']} (best {'mean ' if n_finite > 1 else ''}validation {metric})")
    if note:
        lines.append(note)
    parts = []
    for name, row in sweep["summary"].items():
        if row is not None:
            value = row["test"] if has_test else row["validation"]
            n = row.get("n_test" if has_test else "n")  # (its own seeds: said where fewer than the table's)
            fewer = f" (n={n})" if n is not None and n_seeds > 1 and n < n_seeds else ""
            parts.append(f"{name} {_number(value)}{fewer}" if value is not None else f"{name} -")
    lines.append(f"{'test' if has_test else 'validation'} {metric}: " + "  ".join(parts))
    if n_finite < 2:
        if len(sweep.get("seeds") or []) > 1:  # (seeds ran, but at most one has a finite value at any tau)
            lines.append(
                f"at most one of the {len(sweep['seeds'])} seeds has a finite validation {metric} at any tau: no "
                "uncertainty available (the notes above say which values are missing or not finite)."
            )
        else:
            seed = f" ({sweep['seeds'][0]})" if sweep.get("seeds") else ""
            lines.append(
                f"one seed{seed}: no uncertainty available (sweep_seeds with two or more seeds replicates it)."
            )
        return "\n".join(lines)
    for comparison in (sweep.get("comparisons") or {}).values():
        if comparison is not None:
            part = "test" if comparison.get("test_verdict") else "validation"
            lines.append(comparison.get(f"{part}_verdict", ""))
    return "\n".join(lines)
