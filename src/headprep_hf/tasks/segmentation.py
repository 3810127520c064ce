"""Semantic segmentation: DeepLabV3 (dilated timm ResNet + ASPP head) on the offline digit canvas task or real data.

Offline default: the backbone is the MNIST-5k source model (the image-classification default's cache), the data the
derived digit segmentation set (`headprep_hf.data.build_digit_segmentation`: mask = digit class on the strokes,
background elsewhere, the anti-aliased rim ignored). `--model_name_or_path` takes a timm Hub id, a local folder or a
weights file (`--model_arch`) for the backbone.

Real data (one of): `--voc_root DIR` (local PASCAL VOC through torchvision's `VOCSegmentation`), `--dataset_name`
(a `datasets` segmentation set, Hub id or local folder, with `--num_labels`), `--nuclei` (the real annotated nuclei
image shipped in `stardist`, nuclei vs background). Images and masks are resized and cropped together
(`SegmentationTransform`, `--crop_size`), normalised with the backbone's mean/std.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from transformers import set_seed

from ..data import build_digit_segmentation
from ..data.device_inputs import attach_input_normalization
from ..data.segmentation import (
    VOC_CLASSES,
    check_voc_root,
    load_hf_segmentation,
    load_nuclei_segmentation,
    load_voc_segmentation,
)
from ..export import set_label_names
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
    # Metrics a batch at a time (`segmentation_metrics` adds up the pixel counts on the device): otherwise Trainer
    # keeps every mask of the evaluation set and its prediction until the end (PASCAL VOC val at 513 px: about 6 GB).
    batch_eval_metrics=True,
    bf16=None,  # the recipe decides: bf16 autocast on a CUDA GPU that supports it (`resolve_mixed_precision`)
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
    channels_last: bool = field(
        default=True,
        metadata={"help": "channels_last memory format for the input and the weights (real data; off for FSDP2)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache for the source model."})
    source_epochs: int = field(default=10, metadata={"help": "Epochs of the MNIST-5k source pretraining."})
    toy_classes: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Digits of the toy task."})
    canvas_size: int = field(default=40, metadata={"help": "Canvas size of the offline digit segmentation task."})
    voc_root: str | None = field(
        default=None,
        metadata={"help": "Local PASCAL VOC root (holding VOCdevkit/VOC<year>); VOC val is the test split."},
    )
    voc_year: str = field(default="2012", metadata={"help": "PASCAL VOC year under voc_root."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "`datasets` segmentation set: Hub id, local data folder or save_to_disk folder."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: first Image feature)."})
    mask_column: str | None = field(
        default=None, metadata={"help": "Mask column (default: label/mask/annotation...)."}
    )
    num_labels: int | None = field(
        default=None, metadata={"help": "Classes of a --dataset_name set (background included); required there."}
    )
    reduce_labels: bool = field(
        default=False, metadata={"help": "Mask id 0 = unlabelled (ADE20K): map it to ignore_index and shift the rest."}
    )
    nuclei: bool = field(
        default=False,
        metadata={"help": "Use the real nuclei image + mask shipped in stardist (pip install stardist)."},
    )
    crop_size: int = field(
        default=320,
        metadata={"help": "Training crop / eval size of real data (nuclei: the tile size, 64 unless given, <= 170)."},
    )
    validation_split: float = field(
        default=0.1, metadata={"help": "Held-out fraction of train for validation when the data has none."}
    )

    def __post_init__(self):
        chosen = [n for n, v in (("voc_root", self.voc_root), ("dataset_name", self.dataset_name)) if v is not None]
        chosen += ["nuclei"] * bool(self.nuclei)
        if len(chosen) > 1:
            raise ValueError(f"give at most one data source, got {chosen}; unset = the offline digit canvas task")
        if self.dataset_name is not None and (self.num_labels is None or self.num_labels < 2):
            raise ValueError(
                f"--dataset_name needs --num_labels >= 2 (classes of the masks, background included), got "
                f"{self.num_labels}"
            )
        if self.crop_size < 8:
            raise ValueError(f"crop_size must be >= 8, got {self.crop_size}")


def load_segmentation(args: SegmentationArguments, seed: int) -> TaskInputs:
    if args.voc_root is not None:
        check_voc_root(args.voc_root, args.voc_year)  # before the model loads (or the source model pretrains)
    if args.model_name_or_path is None:
        source, arch = str(pretrain_source_model(cache_dir=args.cache_dir, epochs=args.source_epochs)), DEFAULT_ARCH
    else:
        source, arch = args.model_name_or_path, args.model_arch
    classifier = load_timm_model(source, num_classes=0, arch=arch)
    cfg = classifier.pretrained_cfg
    norm = dict(mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))), std=tuple(cfg.get("std", (0.229, 0.224, 0.225))))
    if args.voc_root is not None:
        splits = load_voc_segmentation(args.voc_root, args.crop_size, **norm, year=args.voc_year,
                                       validation_split=args.validation_split, seed=seed, normalize=False)  # fmt: skip
        class_names = list(VOC_CLASSES)
    elif args.dataset_name is not None:
        splits = load_hf_segmentation(
            args.dataset_name, args.crop_size, **norm, dataset_config_name=args.dataset_config_name,
            image_column=args.image_column, mask_column=args.mask_column, reduce_labels=args.reduce_labels,
            validation_split=args.validation_split, seed=seed, cache_dir=args.cache_dir, normalize=False,
        )  # fmt: skip
        class_names = [str(i) for i in range(args.num_labels)]
    elif args.nuclei:
        # (the tile size: 64 at the default crop size, which is VOC's; a size given was capped at 64 without a word)
        default = next(f.default for f in fields(SegmentationArguments) if f.name == "crop_size")
        tile = 64 if args.crop_size == default else args.crop_size
        if tile > 170:
            raise ValueError(
                f"--crop_size {tile} with --nuclei: it is the tile size of the 512x512 nuclei image, at most 170 "
                "(the default there: 64)."
            )
        splits = load_nuclei_segmentation(tile, **norm)
        class_names = ["background", "nucleus"]
    else:
        splits = build_digit_segmentation(seed=seed, classes=tuple(args.toy_classes), canvas_size=args.canvas_size)
        class_names = ["background", *map(str, args.toy_classes)]
    num_classes = len(class_names)
    set_seed(seed)  # the new head's initialisation must not depend on what ran before
    model = TimmDeepLabV3(cfg.get("architecture", arch), num_classes, args.output_stride)
    model.load_backbone_state_dict(classifier.state_dict())
    # The weights' own config (`load_timm_model` keeps a Hub id only for Hub weights): the backbone was built with
    # its architecture's default tag, which the card would otherwise name as the base model.
    model.backbone.pretrained_cfg = dict(cfg)
    files = args.voc_root is not None or args.dataset_name is not None
    if files:  # real images load as uint8 (normalize=False above); the model normalises them on its device
        attach_input_normalization(model, norm["mean"], norm["std"], channels_last=args.channels_last)
    set_label_names(model, class_names)  # prepared heads name the classes
    if args.voc_root is not None:
        card = {"dataset_tags": "voc", "dataset": f"PASCAL VOC {args.voc_year}"}
    elif args.dataset_name is not None:
        card = {"dataset_tags": args.dataset_name, "dataset": args.dataset_name}
        if args.dataset_config_name is not None:
            card["dataset_args"] = args.dataset_config_name
    else:
        card = {}
    return TaskInputs(
        card={"tasks": "image-segmentation", **card},
        model=model,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        test_dataset=splits.get("test"),
        compute_metrics=segmentation_metrics(num_classes, ignore_index=255),
        class_names=class_names,
        preprocess_logits_for_metrics=argmax_logits,
        decodes_files=files,  # loader workers decode them
    )
