"""Head probing then finetuning of DeepLabV3 (the whole ASPP head is the task head), with the paper's measurements.

Offline default (no arguments): the MNIST-5k source model (pretrained and cached on the first run, shared with the
image-classification recipe) as a dilated backbone, on segmentation data DERIVED from real MNIST digits pasted on a
40x40 canvas (mask = digit class on the strokes, background elsewhere, the anti-aliased rim ignored); prints the
validation/test mean IoU, the energy (mean over valid pixels) and the drift:

    python recipes/semantic_segmentation.py
    accelerate launch recipes/semantic_segmentation.py --hp_epochs 8 --output_dir runs/seg8
    headprep sweep --task segmentation            # the tau sweep on the same task (tau* by validation mean IoU)

A real backbone: `--model_name_or_path timm/resnet50.a1_in1k` (or a local folder / weights file with --model_arch).
Settings can come from `--config file.yaml`; command-line flags override it.
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from headprep_hf import HeadPrepConfig
from headprep_hf.cli import parse_with_config, run_command
from headprep_hf.tasks.base import recipe_parser, summary_text, train_and_evaluate
from headprep_hf.tasks.segmentation import SEGMENTATION_DEFAULTS, SegmentationArguments, load_segmentation


def make_parser() -> HfArgumentParser:
    return recipe_parser(SegmentationArguments, SEGMENTATION_DEFAULTS, "semantic_segmentation")


def main(script_args: SegmentationArguments, training_args: HeadPrepConfig) -> dict:
    inputs = load_segmentation(script_args, training_args.seed)
    trainer, metrics = train_and_evaluate(inputs, training_args)
    metrics["hp_train_pixel_accuracy"] = metrics["hp_train_accuracy"]
    if trainer.is_world_process_zero():
        entries = [("validation mIoU", "validation_mean_iou"), ("test mIoU", "test_mean_iou"), ("energy", "energy")]
        print(summary_text(training_args, metrics, entries + [("HP train pixel accuracy", "hp_train_accuracy")]))
    return metrics


if __name__ == "__main__":
    run_command(main, *parse_with_config(make_parser(), sys.argv[1:]))
