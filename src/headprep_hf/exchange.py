"""Head exchange (paper Fig. 3): every backbone x head pair from a sweep's finetuned models, without training.

The paper combines the feature extractor finetuned from tau_i with the head finetuned from tau_j and measures the
training and validation accuracy of every pair: backbones finetuned from a low-energy head (large tau) stay close to
the pretrained features, so the heads are only partly interchangeable. Each backbone runs once over each set, and
every head is applied to each batch of its head inputs as it comes. Nothing is kept beyond one batch: a set's head
inputs (a DeepLabV3 feature map is 34 MB per 513 px image) never have to fit in memory, and sequences padded to each
batch's own length pass too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .files import file_sha256, read_safetensors
from .losses import task_energy
from .sweep_schema import validate_exchange

EXCHANGE_FILE = "exchange.json"
EXCHANGE_FIX = (
    "The exchange applies each head alone to the backbones' head inputs; set sweep_exchange=False (--sweep_exchange "
    "false), or head_modules=[...] naming a head whose output is the logits."
)


def _correct_and_count(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, problem_type: str, class_last: bool | None = None
) -> tuple[float, float]:
    """Correct predictions and valid positions (classes), or present labels (binary tasks), of one chunk: the
    accuracy of a set is the sum of its chunks' correct over the sum of their counts."""
    if problem_type == "multi_label_classification":
        # Pooled over the present labels, as `graph_metrics`' accuracy (so the diagonal is each model's validation
        # accuracy); `task_energy` counts one per sample there, with the sample's mean label accuracy.
        logits = logits.float().reshape(logits.shape[0], -1)
        labels = labels.to(logits.dtype).reshape(logits.shape)
        present = ~torch.isnan(labels)
        correct = (logits > 0) == (labels > 0.5)  # (sigmoid(q) > 0.5)
        return float((correct & present).sum()), float(present.sum())
    stats = task_energy(problem_type, logits, labels, ignore_index, class_last)
    valid = stats["count"] > 0
    return float((stats["correct"][valid] * stats["count"][valid]).sum()), float(stats["count"][valid].sum())


def _accuracy(correct: float, count: float) -> float | None:
    """A set's accuracy from its summed chunks; None when it has no valid label (0/0)."""
    return round(correct / count, 6) if count > 0 else None


class _HeadSwap:
    """Puts each head's weights into the model's head in place, from device copies made once (a `load_state_dict`
    walks the whole model, for every batch and head). The live tensors come from `named_parameters`/`named_buffers`:
    a `state_dict` of channels_last weights hands out contiguous copies (`data.to_channels_last`)."""

    def __init__(self, net: torch.nn.Module, head_states: dict[int, dict[str, torch.Tensor]]):
        live = {
            **dict(net.named_parameters(remove_duplicate=False)),
            **dict(net.named_buffers(remove_duplicate=False)),
        }
        names = sorted(next(iter(head_states.values())))
        missing = [name for name in names if name not in live]
        if missing:
            raise KeyError(f"The finetuned models hold head weights this model does not have: {missing}.")
        self.targets = [live[name] for name in names]
        # A head tensor sharing its storage with a tensor of the backbone (tied weights) would change the backbone too
        # when swapped in place, in the middle of the backbone's pass.
        storages = {t.untyped_storage().data_ptr(): name for name, t in zip(names, self.targets) if t.numel() > 0}
        head = set(names)
        shared = sorted(
            f"{storages[t.untyped_storage().data_ptr()]} and {name}"
            for name, t in live.items()
            if name not in head and t.untyped_storage().data_ptr() in storages
        )
        if shared:
            raise ValueError(
                f"The head exchange cannot swap heads whose weights are tied to the backbone's ({shared}): set "
                "sweep_exchange=False."
            )
        self.sources = {
            tau: [state[name].to(target.device, target.dtype) for name, target in zip(names, self.targets)]
            for tau, state in head_states.items()
        }

    @torch.no_grad()
    def load(self, tau: int) -> None:
        for target, source in zip(self.targets, self.sources[tau]):
            target.copy_(source)


def head_exchange(
    model: torch.nn.Module,
    sweep_dir: str | os.PathLike,
    train_dataset,
    eval_dataset,
    args,
    data_collator=None,
    output_file: str | os.PathLike | None = None,
    measure_train_dataset=None,
) -> dict[str, Any]:
    """Train/validation accuracy of every (backbone from FT at tau_i, head from FT at tau_j) pair of a sweep.

    Args:
        model: A model of the sweep's architecture with its task head (e.g. the pretrained model); its weights are
            replaced by those of the finetuned models in the sweep's job folders (of its first seed).
        sweep_dir: A finished sweep folder (`sweep.json` with every tau).
        train_dataset / eval_dataset: The sweep's training and validation sets. Augmented training samples are drawn
            with the same seed for every backbone.
        args: The sweep's [`HeadPrepConfig`] / [`SweepConfig`] (head split, batch size, seed).
        output_file: Where to write the matrix; default `sweep_dir/exchange.json`.
        measure_train_dataset: The training set through the eval transform (no augmentation); the train accuracy is
            measured on it when given, else on `train_dataset` as training reads it. `train_views` in the result
            says which.

    Returns:
        `{"taus", "seed", "sweep_fingerprint", "rows": "backbone", "columns": "head", "train_views",
        "train_accuracy", "validation_accuracy"}` (`sweep_fingerprint`: the sweep it was measured for; a report of
        another sweep in the folder skips it), where
        `train_accuracy[i][j]` uses backbone tau_i and head tau_j (the diagonal is each finetuned model itself).
    """
    from .feature_cache import head_output_check
    from .sweep import _fingerprint_tag, load_sweep
    from .trainer import HeadPrepTrainer

    sweep_dir = Path(sweep_dir)
    sweep = load_sweep(sweep_dir)
    if not sweep.get("complete"):
        raise ValueError(
            f"{sweep_dir} holds part of a sweep (a shard); merge the shards first (headprep sweep --merge)."
        )
    first_seed = (sweep.get("seeds") or [None])[0]  # a replicated sweep: the matrix of its first seed
    results = {r["tau"]: r for r in sweep["results"] if r.get("seed") == first_seed}
    if first_seed is not None:
        args = dataclasses.replace(args, seed=first_seed)
    taus = list(sweep["taus"])
    paths = {t: sweep_dir / results[t]["output_dir"] / "model.safetensors" for t in taus}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Finetuned models missing (the sweep saves them in each tau_N folder): {missing}.")
    for tau, path in paths.items():  # (a sweep of an earlier version recorded no checksum: read as it is)
        expected = results[tau].get("model_sha256")
        if expected is not None and file_sha256(path) != expected:
            raise ValueError(
                f"{path} is not the model the sweep saved for tau = {tau} (its sha256 differs from the one recorded "
                f"in sweep.json): it was changed or damaged after the job. Delete {path.parent} and rerun the sweep "
                "in the same output_dir to finetune that job again, then run the exchange."
            )

    # The trainer builds the sweep's architecture (an MLP head when head_type="mlp"); the weights are loaded below.
    measure_args = dataclasses.replace(
        args, output_dir=str(sweep_dir / "exchange"), hp_cache_features=False, overwrite_output_dir=True
    )
    trainer = HeadPrepTrainer(model=model, args=measure_args, train_dataset=train_dataset, data_collator=data_collator)
    net = trainer.accelerator.unwrap_model(trainer.model)
    split, problem_type = trainer.split, trainer.problem_type
    if problem_type == "regression":
        raise ValueError(
            "The head exchange reports accuracies, which a regression task (problem_type='regression') does not "
            "have: run the sweep with sweep_exchange=False."
        )
    head_states = {}
    for tau, path in paths.items():
        state = read_safetensors(path)
        head_states[tau] = {k: v for k, v in state.items() if split.is_head_param(k)}

    train_views = measure_train_dataset if measure_train_dataset is not None else train_dataset
    train_matrix, eval_matrix = [], []
    disable = (
        not trainer.is_world_process_zero() or not getattr(args, "sweep_progress", True) or trainer.args.disable_tqdm
    )
    check = head_output_check(trainer, net, "The head exchange: ", EXCHANGE_FIX)
    swap = None
    for tau_i in tqdm(taus, desc="head exchange", unit="backbone", disable=disable):
        net.load_state_dict(read_safetensors(paths[tau_i]))
        swap = swap if swap is not None else _HeadSwap(net, head_states)
        rows = {}
        for name, dataset in (("train", train_views), ("validation", eval_dataset)):
            totals = {tau_j: [0.0, 0.0] for tau_j in taus}

            def apply_heads(batch, totals=totals, swap=swap):
                # Inside the backbone pass: eval mode (a head with BatchNorm or Dropout, DeepLabV3's ASPP, in train
                # mode would use batch statistics and drop units), no grad, the training RNG untouched; the
                # measurement batch at a time. The head of the forward that follows is left as the last swap set
                # it; its output is not used.
                z, labels = batch["features"], batch["labels"]
                for tau_j in taus:
                    swap.load(tau_j)
                    # One autocast context per head: autocast keeps its low-precision copies of the weights until
                    # its outermost context ends, so heads swapped in within one context would all run as the first.
                    with trainer.measurement_autocast():
                        logits = split.head_logits(net, z, labels)
                    c, n = _correct_and_count(
                        logits.float(), labels, args.ignore_index, problem_type, trainer.class_axis_hint
                    )
                    totals[tau_j][0] += c
                    totals[tau_j][1] += n

            trainer.measurements.measure_dataset(
                dataset,
                with_energy=False,
                max_features=len(dataset),
                seed=args.seed,  # the same augmented views for every backbone
                raw_features=True,
                keep_labels=True,
                check_first_batch=check if name == "train" and tau_i == taus[0] else None,
                sink=apply_heads,
            )
            rows[name] = [_accuracy(*totals[tau_j]) for tau_j in taus]
        train_matrix.append(rows["train"])
        eval_matrix.append(rows["validation"])
    exchange = {
        "taus": taus,
        "seed": first_seed,
        "sweep_fingerprint": _fingerprint_tag(sweep.get("fingerprint")),
        "models": {str(tau): results[tau].get("model_sha256") for tau in taus},  # (a job run again: other weights)
        "rows": "backbone",
        "columns": "head",
        "train_views": "eval transform" if measure_train_dataset is not None else "as training reads them",
        "train_accuracy": train_matrix,
        "validation_accuracy": eval_matrix,
    }
    validate_exchange(exchange)
    with contextlib.suppress(OSError):  # the measuring trainer's output_dir: nothing is written there
        os.rmdir(measure_args.output_dir)
    if trainer.is_world_process_zero():
        target = Path(output_file) if output_file is not None else sweep_dir / EXCHANGE_FILE
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(exchange, indent=2, allow_nan=False))  # (no valid label: null, not NaN)
        os.replace(tmp, target)
    return exchange
