"""Real image-classification data (Hub datasets or local image folders) for the image recipe."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

__all__ = [
    "HFImageClassificationDataset",
    "build_image_transforms",
    "load_image_classification_dataset",
]

_VALIDATION_NAMES = ("validation", "valid", "val")
_LABEL_NAMES = ("label", "labels")
DEFAULT_CROP_PCT = 0.875


class HFImageClassificationDataset(Dataset):
    """A ``datasets.Dataset`` served as ``{"pixel_values": FloatTensor[3, H, W], "labels": int}``.

    ``datasets`` applies the transform lazily (``with_transform``, the non-mutating form of
    ``set_transform``), so images are decoded and augmented on access. Column access such as
    ``ds["label"]`` does not work on a transformed ``datasets.Dataset`` (the transform needs the
    image column), hence this wrapper reads the labels once up front.

    Attributes:
        labels: int64 numpy array of every item's label, for validation without decoding images.
        class_names: names of the classes, indexed by label.
        hf_dataset: the transformed ``datasets.Dataset``.
    """

    def __init__(
        self,
        hf_dataset: Any,
        image_column: str,
        label_column: str,
        transform: Callable[[Any], torch.Tensor],
        class_names: Sequence[str],
    ) -> None:
        """Initializes the wrapper.

        Args:
            hf_dataset: a ``datasets.Dataset`` with an ``Image`` column and an integer label column.
            image_column: name of the image column.
            label_column: name of the label column (values ``0..len(class_names)-1``).
            transform: torchvision transform from an RGB PIL image to a tensor.
            class_names: class names indexed by label.
        """
        # Reading one column does not decode images, so this stays cheap on large datasets.
        self.labels = np.asarray(hf_dataset[label_column], dtype=np.int64)
        self.class_names = list(class_names)

        def batch_transform(batch: dict[str, list]) -> dict[str, list]:
            return {
                "pixel_values": [transform(image.convert("RGB")) for image in batch[image_column]],
                "labels": batch[label_column],
            }

        self.hf_dataset = hf_dataset.with_transform(batch_transform, columns=[image_column, label_column])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        item = self.hf_dataset[int(index)]
        return {"pixel_values": item["pixel_values"], "labels": int(item["labels"])}


def build_image_transforms(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
    crop_pct: float = DEFAULT_CROP_PCT,
) -> T.Compose:
    """Returns the train (``augment=True``) or eval transform from a PIL image to a normalized tensor.

    Train: RandomResizedCrop + horizontal flip. Eval: resize the short side to
    ``image_size / crop_pct`` and center-crop ``image_size``, the usual timm/ImageNet protocol.
    """
    if augment:
        spatial = [T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()]
    else:
        spatial = [T.Resize(int(round(image_size / crop_pct)), antialias=True), T.CenterCrop(image_size)]
    return T.Compose(
        [T.ToImage(), *spatial, T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(mean), std=list(std))]
    )


def load_image_classification_dataset(
    dataset_name: str | None,
    train_dir: str | None,
    validation_dir: str | None,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment_train: bool,
    label_column: str | None = None,
    image_column: str | None = None,
    validation_split: float = 0.1,
    seed: int = 0,
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
    crop_pct: float = DEFAULT_CROP_PCT,
) -> tuple[dict[str, HFImageClassificationDataset], list[str]]:
    """Loads an image-classification dataset from the Hub or from local class folders.

    Exactly one source must be given: ``dataset_name`` (a Hub dataset id, loaded with
    ``datasets.load_dataset``) or ``train_dir`` (an ``imagefolder`` tree ``train_dir/<class>/<image>``,
    optionally with ``validation_dir`` laid out the same way). When there is no validation split,
    a stratified ``validation_split`` fraction of train is held out with ``seed``.

    Every returned dataset yields ``{"pixel_values": FloatTensor[3, image_size, image_size],
    "labels": int}`` and exposes all labels as the numpy array ``.labels`` (column access such
    as ``ds["label"]`` is not supported).

    Args:
        dataset_name: Hub dataset id, e.g. ``"cifar10"``; needs network access or a warm cache.
        train_dir: local folder with one sub-folder of images per class.
        validation_dir: local validation folder with the same class sub-folders.
        image_size: output height and width.
        mean: per-channel normalization mean (use the backbone's ``pretrained_cfg``).
        std: per-channel normalization std.
        augment_train: RandomResizedCrop + flip on train; otherwise train uses the eval transform.
        label_column: label column; default: first ``ClassLabel`` feature, else ``label``/``labels``.
        image_column: image column; default: first ``Image`` feature.
        validation_split: fraction of train held out when no validation split exists.
        seed: seed for that hold-out.
        dataset_config_name: configuration name of a Hub dataset.
        cache_dir: ``datasets`` cache folder.
        crop_pct: eval center-crop fraction.

    Returns:
        ``(splits, class_names)`` where ``splits`` has ``"train"`` and ``"validation"`` (and
        ``"test"`` when the source has one) and ``class_names[label]`` names each label.

    Raises:
        ValueError: no or two sources, unknown columns, or no way to obtain a validation split.
    """
    import datasets

    if (dataset_name is None) == (train_dir is None):
        raise ValueError(
            f"give exactly one of dataset_name (a Hub id) or train_dir (a local image folder); "
            f"got dataset_name={dataset_name!r}, train_dir={train_dir!r}"
        )
    if dataset_name is not None:
        if validation_dir is not None:
            raise ValueError("validation_dir only applies with train_dir; drop it or load both from local folders")
        raw = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    else:
        for name, folder in (("train_dir", train_dir), ("validation_dir", validation_dir)):
            if folder is not None and not os.path.isdir(folder):
                raise ValueError(f"{name}={folder!r} is not a folder")
        data_files = {"train": os.path.join(train_dir, "**")}
        if validation_dir is not None:
            data_files["validation"] = os.path.join(validation_dir, "**")
        raw = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)

    if "train" not in raw:
        raise ValueError(f"dataset {dataset_name or train_dir!r} has no 'train' split; its splits are {list(raw)}")
    features = raw["train"].features
    image_column = _find_image_column(features, image_column)
    label_column = _find_label_column(features, label_column, image_column)
    if not isinstance(features[image_column], datasets.Image):
        # A column of file paths or bytes; datasets decodes it once told it holds images.
        raw = raw.cast_column(image_column, datasets.Image())
    raw, class_names = _encode_labels(raw, label_column)

    validation_key = next((name for name in _VALIDATION_NAMES if name in raw), None)
    train = raw["train"]
    if validation_key is not None:
        validation = raw[validation_key]
    else:
        if not 0.0 < validation_split < 1.0:
            raise ValueError(
                f"the dataset has no validation split and validation_split={validation_split}; "
                "pass validation_split in (0, 1) or a validation_dir"
            )
        train, validation = _hold_out(train, validation_split, seed, label_column)

    train_tf = build_image_transforms(image_size, mean, std, augment=augment_train, crop_pct=crop_pct)
    eval_tf = build_image_transforms(image_size, mean, std, augment=False, crop_pct=crop_pct)

    def wrap(split: Any, transform: T.Compose) -> HFImageClassificationDataset:
        return HFImageClassificationDataset(split, image_column, label_column, transform, class_names)

    splits = {"train": wrap(train, train_tf), "validation": wrap(validation, eval_tf)}
    if "test" in raw:
        splits["test"] = wrap(raw["test"], eval_tf)
    return splits, class_names


def _find_image_column(features: Any, requested: str | None) -> str:
    import datasets

    if requested is not None:
        if requested not in features:
            raise ValueError(f"image_column={requested!r} is not a column; the columns are {list(features)}")
        return requested
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(f"found no Image column; pass image_column=... (one of {list(features)})")


def _find_label_column(features: Any, requested: str | None, image_column: str) -> str:
    import datasets

    if requested is not None:
        if requested not in features or requested == image_column:
            raise ValueError(f"label_column={requested!r} is not a label column; the columns are {list(features)}")
        return requested
    for name, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    for name in _LABEL_NAMES:
        if name in features:
            return name
    raise ValueError(
        f"found no ClassLabel column and no column named 'label'/'labels'; "
        f"pass label_column=... (one of {[c for c in features if c != image_column]})"
    )


def _encode_labels(raw: Any, label_column: str) -> tuple[Any, list[str]]:
    """Makes ``label_column`` a ClassLabel shared by all splits; returns the data and class names."""
    import datasets

    feature = raw["train"].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return raw, list(feature.names)
    if not isinstance(feature, datasets.Value):
        raise ValueError(f"label_column={label_column!r} holds {feature}, not class labels")
    # One mapping over every split; encoding split by split could number the classes differently.
    values = sorted({value for split in raw.values() for value in split[label_column]})
    index = {value: i for i, value in enumerate(values)}
    class_names = [str(value) for value in values]
    raw = raw.map(lambda batch: {label_column: [index[v] for v in batch[label_column]]}, batched=True)
    raw = raw.cast_column(label_column, datasets.ClassLabel(names=class_names))
    return raw, class_names


def _hold_out(train: Any, fraction: float, seed: int, label_column: str) -> tuple[Any, Any]:
    try:
        parts = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column=label_column)
    except ValueError:
        # Too few images per class to stratify (tiny or very imbalanced data): fall back to a plain split.
        parts = train.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]
