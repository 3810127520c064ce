"""Semantic segmentation: DeepLabV3 (dilated timm ResNet + ASPP head) on the offline digits-on-canvas task.

Offline default: the backbone is the MNIST-5k source model (the image-classification default's cache), the data the
derived digit segmentation set (`headprep_hf.data.build_digit_segmentation`: mask = digit class on the strokes,
background elsewhere, the anti-aliased rim ignored). `--model_name_or_path` takes a timm Hub id, a local folder or a
weights file (`--model_arch`) for the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import set_seed

from ..data import build_digit_segmentation
from ..metrics import argmax_logits, segmentation_metrics
from ..models import DEFAULT_ARCH, TimmDeepLabV3, load_timm_model, pretrain_source_model
from .base import COMMON_RECIPE_DEFAULTS, TaskInputs

SEGMENTATION_DEFAULTS = dict(
    COMMON_RECIPE_DEFAULTS,
    num_train_epochs=4,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    ignore_index=255,
    drift_probe_samples=128,
)
SEGMENTATION_SWEEP_DEFAULTS = dict(sweep_metric="mean_iou")


@dataclass
class SegmentationArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Backbone: timm Hub id, local folder or weights file; unset = MNIST-5k source model."},
    )
    model_arch: str | None = field(default=None, metadata={"help": "timm architecture of a bare weights file."})
    output_stride: int = field(default=8, metadata={"help": "Backbone output stride (8 as in the paper, or 16)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache for the source model."})
    source_epochs: int = field(default=10, metadata={"help": "Epochs of the MNIST-5k source pretraining."})
    toy_classes: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Digits of the toy task."})
    canvas_size: int = field(default=40, metadata={"help": "Canvas size of the offline digit segmentation task."})


def load_segmentation(args: SegmentationArguments, seed: int) -> TaskInputs:
    if args.model_name_or_path is None:
        source, arch = str(pretrain_source_model(cache_dir=args.cache_dir, epochs=args.source_epochs)), DEFAULT_ARCH
    else:
        source, arch = args.model_name_or_path, args.model_arch
    classifier = load_timm_model(source, num_classes=0, arch=arch)
    splits = build_digit_segmentation(seed=seed, classes=tuple(args.toy_classes), canvas_size=args.canvas_size)
    num_classes = len(args.toy_classes) + 1
    set_seed(seed)  # the new head's initialisation must not depend on what ran before
    model = TimmDeepLabV3(classifier.pretrained_cfg.get("architecture", arch), num_classes, args.output_stride)
    model.load_backbone_state_dict(classifier.state_dict())
    return TaskInputs(
        model=model,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        test_dataset=splits["test"],
        compute_metrics=segmentation_metrics(num_classes, ignore_index=255),
        class_names=["background", *map(str, args.toy_classes)],
        preprocess_logits_for_metrics=argmax_logits,
    )
