"""Datasets: the offline MNIST tasks (classification, derived segmentation) and real-data loaders."""

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
from headprep_hf.data.segmentation import (
    VOC_CLASSES,
    DigitCanvasSegmentation,
    SegmentationDataset,
    SegmentationTransform,
    build_digit_segmentation,
    load_hf_segmentation,
    load_nuclei_segmentation,
    load_voc_segmentation,
)

__all__ = [
    "VOC_CLASSES",
    "DigitCanvasSegmentation",
    "DigitImageDataset",
    "HFImageClassificationDataset",
    "SegmentationDataset",
    "SegmentationTransform",
    "build_digit_segmentation",
    "build_image_transforms",
    "build_pretrain_dataset",
    "build_toy_downstream",
    "distort_digits",
    "load_hf_segmentation",
    "load_image_classification_dataset",
    "load_mnist5k",
    "load_nuclei_segmentation",
    "load_voc_segmentation",
]
