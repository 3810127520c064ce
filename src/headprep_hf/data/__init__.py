"""Datasets: the offline MNIST tasks (classification, derived segmentation) and real-data loaders."""

from headprep_hf.data.device_inputs import (
    attach_input_normalization,
    input_normalization,
    normalize_uint8,
    to_channels_last,
)
from headprep_hf.data.images import (
    HFImageClassificationDataset,
    build_image_transforms,
    image_processor_data_config,
    load_image_classification_dataset,
    resolve_image_data_config,
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
    "attach_input_normalization",
    "build_digit_segmentation",
    "build_image_transforms",
    "build_pretrain_dataset",
    "build_toy_downstream",
    "image_processor_data_config",
    "input_normalization",
    "distort_digits",
    "load_hf_segmentation",
    "load_image_classification_dataset",
    "load_mnist5k",
    "normalize_uint8",
    "to_channels_last",
    "resolve_image_data_config",
    "load_nuclei_segmentation",
    "load_voc_segmentation",
]
