"""Backbones: loading timm models with a new head, and the cached MNIST-5k source model."""

from headprep_hf.models.loading import load_timm_model
from headprep_hf.models.segmentation import TimmDeepLabV3, build_torchvision_deeplabv3
from headprep_hf.models.source import (
    DEFAULT_ARCH,
    default_cache_dir,
    evaluate_accuracy,
    pretrain_source_model,
    source_model_dir,
)

__all__ = [
    "DEFAULT_ARCH",
    "TimmDeepLabV3",
    "build_torchvision_deeplabv3",
    "default_cache_dir",
    "evaluate_accuracy",
    "load_timm_model",
    "pretrain_source_model",
    "source_model_dir",
]
