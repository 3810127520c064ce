"""Datasets: the offline MNIST toy task and real image-classification loaders."""

from headprep_hf.data.images import (
    HFImageClassificationDataset,
    build_image_transforms,
    load_image_classification_dataset,
)
from headprep_hf.data.mnist import (
    DigitImageDataset,
    build_pretrain_dataset,
    build_toy_downstream,
    distort_digits,
    load_mnist5k,
)
from headprep_hf.data.segmentation import DigitCanvasSegmentation, build_digit_segmentation

__all__ = [
    "DigitCanvasSegmentation",
    "DigitImageDataset",
    "HFImageClassificationDataset",
    "build_digit_segmentation",
    "build_image_transforms",
    "build_pretrain_dataset",
    "build_toy_downstream",
    "distort_digits",
    "load_image_classification_dataset",
    "load_mnist5k",
]
