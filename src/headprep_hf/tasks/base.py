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
    dataloader_num_workers=0,
)


def train_and_evaluate(inputs: TaskInputs, training_args) -> tuple[Any, dict[str, float]]:
    """What the single-run recipes do: HP + FT (`train()`, resumable with `--resume_from_checkpoint last`), save the
    model and its card, evaluate on validation (and test), collect energy and final drift into `final_results.json`.

    Returns the trainer and the metrics (`validation_*`, `test_*`, `energy`, `hp_train_accuracy`, `drift_*`).
    """
    from ..trainer import HeadPrepTrainer

    trainer = HeadPrepTrainer(
        model=inputs.model,
        args=training_args,
        train_dataset=inputs.train_dataset,
        eval_dataset=inputs.eval_dataset,
        compute_metrics=inputs.compute_metrics,
        data_collator=inputs.data_collator,
        preprocess_logits_for_metrics=inputs.preprocess_logits_for_metrics,
    )
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume in ("true", "True", "last") else resume)
    trainer.save_model()
    metrics = {f"validation_{k[len('eval_') :]}": v for k, v in trainer.evaluate().items()}
    if inputs.test_dataset is not None:
        metrics.update(trainer.evaluate(inputs.test_dataset, metric_key_prefix="test"))
    dyn = trainer.dynamics
    metrics.update({"energy": dyn.get("energy"), "hp_train_accuracy": dyn.get("hp_train_accuracy")})
    if dyn.get("drift"):
        metrics.update({f"drift_{k}": v for k, v in dyn["drift"][-1].items() if k not in ("step", "epoch")})
    trainer.log_metrics("final", metrics)
    trainer.save_metrics("final", metrics)
    trainer.create_model_card(metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return trainer, metrics


def recipe_parser(arguments: type, defaults: dict[str, Any], run_name: str):
    """`HfArgumentParser` over a task's arguments and `HeadPrepConfig`, with the task's recipe defaults and a new
    `runs/<run_name>-<date>-<time>` output folder per run (a finished run is never overwritten)."""
    import time

    from transformers import HfArgumentParser

    from ..config import HeadPrepConfig

    parser = HfArgumentParser((arguments, HeadPrepConfig))
    parser.set_defaults(**defaults, output_dir=time.strftime(f"runs/{run_name}-%Y%m%d-%H%M%S"))
    return parser


def drift_text(metrics: dict[str, float]) -> str:
    if "drift_sq_dist" not in metrics:
        return ""
    return f"  drift ||z_t-z_0||^2 {metrics['drift_sq_dist']:.4f}  cos {metrics['drift_cos']:.4f}"
