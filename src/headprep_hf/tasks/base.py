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
    preprocess_logits_for_metrics: Callable | None = None
    # The training set through the eval transform (no augmentation), for measurements that must not see
    # augmentation (the exchange's train accuracy); None where training reads no augmented views.
    train_eval_dataset: Any = None
    # Where the start-of-FT energy is measured instead of the training set (`HeadPrepTrainer(energy_dataset=)`), e.g.
    # the training images through the eval transform (`--energy_on_eval_transform`); None: as training reads them.
    energy_dataset: Any = None
    # Saved beside the model by `save_model` (a transformers image processor), as Trainer's `processing_class`.
    processing_class: Any = None
    # The data config the transforms were built from (input size, interpolation, crop_pct, mean/std).
    data_config: dict[str, Any] | None = None
    # Images are decoded and augmented on access (files): worth loader worker processes.
    decodes_files: bool = False
    # In-memory batches worth collating and pinning ahead in worker processes on a CUDA device (image tensors,
    # measured on an H200); False keeps the main process (graphs: not measured on a GPU).
    prefetch_in_memory: bool = True
    # What the data says for the finetuned model's card: `Trainer.create_model_card`'s `tasks` (pipeline tag),
    # `dataset_tags` (dataset id: Hub id, or `imagefolder` for local folders), `dataset` (pretty name), `dataset_args`.
    card: dict[str, Any] = field(default_factory=dict)
    # The metric this data is judged by (a key of `compute_metrics`' output, e.g. OGB's `eval_metric` of a graph
    # dataset): `headprep sweep` picks tau* by it unless --sweep_metric is given. None: the task's sweep default.
    selection_metric: str | None = None


# Trainer settings shared by the recipes of every task (each task adds its own on top).
COMMON_RECIPE_DEFAULTS = dict(
    hp_epochs=4,
    hp_learning_rate=1e-2,
    learning_rate=3e-4,
    lr_scheduler_type="cosine",
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=1,
    logging_steps=5,
    report_to="tensorboard",
    # -1: decided by `resolve_loader_settings` once the data and the device are known (`recipe_num_workers`).
    dataloader_num_workers=-1,
    # None: decided there too (persistent workers for files); a value the user gives is kept.
    dataloader_persistent_workers=None,
    # No host synchronisation per step: batches are copied to the GPU without blocking (from pinned memory), and
    # Trainer's per-step NaN/inf check of the logged loss (a sync every step) gives way to the non-finite guard, which
    # checks losses on the device and reads the result at logging steps.
    accelerator_config={"non_blocking": True},
    logging_nan_inf_filter=False,
)


def recipe_num_workers(decodes_files: bool, device, prefetch_in_memory: bool = True) -> int:
    """The recipes' loader workers (`dataloader_num_workers=-1`):

    * data decoded from files: min(8, usable cores), which decode and augment in parallel;
    * in-memory tensors on a CUDA device: min(2, usable cores // 2), not persistent. They need no decoding, but in
      the main process the GPU idles at every host synchronisation (Trainer's logging steps) while the next batch is
      collated and pinned; two workers keep batches ready. ResNet-50, 224 px, bf16, batch 256 on an H200
      (bench/gpu.sh memoryworkers): plain `Trainer` 0.944 -> 0.991 of the raw timm loop, `HeadPrepTrainer.finetune()`
      0.902 -> 0.961. Not persistent, so each epoch's workers are seeded from the random state at its start and a
      resume from an epoch-end checkpoint draws the same augmentation as the uninterrupted run (persistent workers
      keep their first epoch's streams); starting two workers per epoch costs a fork each;
    * in-memory tensors on the CPU (or with `prefetch_in_memory=False`): 0, the main process. Workers would only take
      cores from the computation and add their start-up.
    """
    if decodes_files:
        return default_num_workers()
    if prefetch_in_memory and getattr(device, "type", str(device)) == "cuda":
        return min(2, default_num_workers(limit=None) // 2)
    return 0


def resolve_loader_settings(training_args, inputs: TaskInputs):
    """Replaces the recipes' `dataloader_num_workers=-1` ("auto") by `recipe_num_workers` for this data and device,
    and `dataloader_persistent_workers=None` by persistent workers for files (the decoding workers' start-up is worth
    keeping; in-memory workers start each epoch anew, so an epoch-end resume is exact). Values the user gave are kept.
    Pinned memory (and non-blocking copies) only where there is a device to copy to. Returns `training_args`, changed
    in place."""
    if training_args.dataloader_num_workers == -1:
        training_args.dataloader_num_workers = recipe_num_workers(
            inputs.decodes_files, training_args.device, inputs.prefetch_in_memory
        )
    if training_args.dataloader_persistent_workers is None:
        training_args.dataloader_persistent_workers = training_args.dataloader_num_workers > 0 and inputs.decodes_files
    if training_args.dataloader_pin_memory and training_args.device.type == "cpu":
        # Pinned memory speeds copies to an accelerator; on the CPU torch only warns in every loader that it is unused.
        training_args.dataloader_pin_memory = False
    if not training_args.dataloader_pin_memory and getattr(training_args.accelerator_config, "non_blocking", False):
        training_args.accelerator_config.non_blocking = False  # nothing is pinned (CPU): no gain, only a warning
    if training_args.dataloader_num_workers < -1:
        raise ValueError(
            f"dataloader_num_workers={training_args.dataloader_num_workers}: give a number of worker processes "
            "(0 = load in the main process) or -1 for the recipe's choice"
        )
    return training_args


def resolve_mixed_precision(training_args):
    """The image recipes' `bf16=None` ("the recipe decides"): bf16 autocast on a CUDA device that supports it (Ampere
    or newer), unless fp16 is asked for or the run is on the CPU; no mixed precision elsewhere. `--bf16 true/false`
    decides instead. Returns `training_args`, or a copy with `bf16` set (a copy, because TrainingArguments derives its
    `mixed_precision` from `bf16` when it is constructed)."""
    if training_args.bf16 is not None:
        return training_args
    import dataclasses

    on = not training_args.use_cpu and not training_args.fp16 and cuda_supports_bf16()
    return dataclasses.replace(training_args, bf16=on)


def cuda_supports_bf16() -> bool:
    """Whether this process sees a CUDA device with bf16 arithmetic (compute capability 8.0 or newer).

    Not transformers' `is_torch_bf16_gpu_available`, which TrainingArguments validates with: that also answers yes
    for Apple MPS on macOS 14, where bf16 is emulated in float32 on M1/M2 (slower, not faster), and for other
    accelerators this default has not been measured on. Turning bf16 on by default is for CUDA only. Emulated bf16
    does not count (`including_emulation=False`): on compute capability 7.x (T4, V100) the plain call answers yes,
    while bf16 there is emulated and cuDNN has no bf16 convolutions, slower than float32."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def default_num_workers(limit: int | None = 8) -> int:
    """Loader workers of the real-data recipes: min(8, the cores this process may use) (`limit=None`: the cores)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if limit is None else min(limit, cores)


def train_and_evaluate(inputs: TaskInputs, training_args) -> tuple[Any, dict[str, float]]:
    """What the single-run recipes do: HP + FT (`train()`, resumable with `--resume_from_checkpoint last`), save the
    model (a timm model with timm's `config.json`: it loads back with `timm.create_model("local-dir:<output_dir>")`)
    and its card (Hub metadata and model-index from the task's `card` entries), evaluate on validation (and test),
    collect energy and final drift into `final_results.json`. With `push_to_hub`, the final folder is uploaded at the
    end, with that card.

    Returns the trainer and the metrics (`validation_*`, `test_*`, `energy`, `hp_train_accuracy`, `drift_*`).
    """
    from ..measurements import final_drift_of
    from ..trainer import HeadPrepTrainer

    resolve_loader_settings(training_args, inputs)
    trainer = HeadPrepTrainer(
        model=inputs.model,
        args=training_args,
        train_dataset=inputs.train_dataset,
        eval_dataset=inputs.eval_dataset,
        compute_metrics=inputs.compute_metrics,
        data_collator=inputs.data_collator,
        preprocess_logits_for_metrics=inputs.preprocess_logits_for_metrics,
        processing_class=inputs.processing_class,
        energy_dataset=inputs.energy_dataset,
    )
    trainer.check_labels_of(test_dataset=inputs.test_dataset)  # not only after training, when it is evaluated
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume in ("true", "True", "last") else resume)
    # (`_internal_call`: Trainer.save_model would push here, with a card that has no results or dataset yet)
    trainer.save_model(_internal_call=True)
    evaluated = trainer.evaluate()  # (its "epoch" key is not a validation metric)
    metrics = {f"validation_{k[len('eval_') :]}": v for k, v in evaluated.items() if k.startswith("eval_")}
    if inputs.test_dataset is not None:
        metrics.update(trainer.evaluate(inputs.test_dataset, metric_key_prefix="test"))
    dyn = trainer.dynamics
    metrics.update({"energy": dyn.get("energy"), "hp_train_accuracy": dyn.get("hp_train_accuracy")})
    final_drift = final_drift_of(dyn)  # (the returned model's: the best checkpoint's with load_best_model_at_end)
    if final_drift:
        metrics.update({f"drift_{k}": v for k, v in final_drift.items() if k not in ("step", "epoch", "model")})
    trainer.log_metrics("final", {k: v for k, v in metrics.items() if v is not None})  # (None: not measured)
    trainer.save_metrics("final", metrics)
    card = dict(inputs.card, metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)  # (writes the card through create_model_card, then uploads the folder)
    else:
        trainer.create_model_card(**card)
    return trainer, metrics


def recipe_parser(arguments: type, defaults: dict[str, Any], run_name: str):
    """`HfArgumentParser` over a task's arguments and `HeadPrepConfig`, with the task's recipe defaults and a new
    `runs/<run_name>-<date>-<time>` output folder per run (a finished run is never overwritten)."""
    import time

    from transformers import HfArgumentParser

    from ..config import HeadPrepConfig

    parser = HfArgumentParser((arguments, HeadPrepConfig))
    parser.set_defaults(**defaults, output_dir=time.strftime(f"runs/{run_name}-%Y%m%d-%H%M%S"))
    explain_auto_workers(parser)
    return parser


def explain_auto_workers(parser) -> None:
    """Say in `--help` what the recipes' `dataloader_num_workers` default of -1 means (Trainer's text says only what 0
    means, and the printed default, -1, was explained nowhere)."""
    for action in parser._actions:
        if action.dest == "dataloader_num_workers":
            action.help = (
                "Worker processes that load the data. -1 (the recipes' default): the recipe decides "
                "(tasks.base.recipe_num_workers): min(8, cores) persistent workers where images are decoded from "
                "files; for image tensors already in memory, min(2, cores // 2) workers (not persistent) on a CUDA "
                "device and the main process (0) on the CPU; graphs in the main process."
            )


def summary_text(training_args, metrics: dict[str, Any], entries: list[tuple[str, str]]) -> str:
    """The recipes' one-line summary: `label value` for each `(label, metric key)` whose value is there (a split
    without a test set, or a run without measurements, leaves some out), then the final drift."""
    parts = [f"tau={training_args.hp_epochs}"]
    parts += [f"{label} {metrics[key]:.4f}" for label, key in entries if metrics.get(key) is not None]
    return "  ".join(parts) + drift_text(metrics)


def drift_text(metrics: dict[str, float]) -> str:
    if "drift_sq_dist" not in metrics:
        return ""
    return f"  drift ||z_t-z_0||^2 {metrics['drift_sq_dist']:.4f}  cos {metrics['drift_cos']:.4f}"
