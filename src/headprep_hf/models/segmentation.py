"""DeepLabV3 models whose whole segmentation head (ASPP + convolutions, `classifier`) is the task head.

* `TimmDeepLabV3`: a timm ResNet with dilated last stages (`features_only`, output stride 8, as the paper's appendix
  B.3 adjusts the strides) under torchvision's `DeepLabHead`; the backbone can take the weights of a timm
  classification checkpoint (e.g. the MNIST-5k source model), and torchvision's ResNet-50 weights load into a
  `resnet50` backbone strictly.
* `build_torchvision_deeplabv3`: torchvision's `deeplabv3_resnet50` without the auxiliary head.

The auxiliary head is off: `find_split` refuses a model whose `aux_classifier` is set (its output is not the logits the
loss and the measurements use), with the fix in the message.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead


class TimmDeepLabV3(nn.Module):
    """`{"out": logits}` at the input resolution from a dilated timm backbone and a DeepLabV3 head.

    Args:
        arch: timm architecture of the backbone (a ResNet: `resnet50`, `test_resnet`, ...).
        num_classes: Segmentation classes (background included).
        output_stride: 8 (paper) or 16.
    """

    def __init__(self, arch: str, num_classes: int, output_stride: int = 8):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 (the paper's) or 16, got {output_stride}")
        self.backbone = timm.create_model(arch, features_only=True, output_stride=output_stride, out_indices=(-1,))
        # ASPP's atrous rates scale with the feature map: DeepLabV3's (12, 24, 36) at output stride 8 and (6, 12, 18)
        # at 16 (Chen et al. 2017, sec. 3.3). torchvision's default is the former at any stride: at 16, on a 20x20
        # map (320 px crops), the rate-24 and rate-36 branches saw only their centre tap, 1x1 convolutions.
        rates = tuple(rate * 8 // output_stride for rate in (12, 24, 36))
        self.classifier = DeepLabHead(self.backbone.feature_info.channels()[-1], num_classes, atrous_rates=rates)
        self.num_classes = num_classes

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(pixel_values)[-1]
        logits = self.classifier(features)
        return {"out": F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)}

    def load_backbone_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a classification checkpoint of the same architecture into the backbone (its classifier is dropped).

        Raises `ValueError` when a backbone weight is missing from `state_dict` or has another shape.
        """
        own = self.backbone.state_dict()
        usable = {k: v for k, v in state_dict.items() if k in own}
        missing = sorted(set(own) - set(usable))
        wrong = sorted(k for k, v in usable.items() if v.shape != own[k].shape)
        if missing or wrong:
            raise ValueError(
                f"The checkpoint does not match the {type(self.backbone).__name__} backbone: missing {missing[:5]}, "
                f"shape mismatches {wrong[:5]}; it must come from the same architecture."
            )
        self.backbone.load_state_dict(usable)


def build_torchvision_deeplabv3(num_classes: int, weights_backbone=None) -> nn.Module:
    """torchvision `deeplabv3_resnet50` (dilated ResNet-50, output stride 8) without its auxiliary head."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    return deeplabv3_resnet50(weights=None, weights_backbone=weights_backbone, num_classes=num_classes, aux_loss=False)
