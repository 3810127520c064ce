import pytest
import timm
import torch
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from headprep_hf import MLPHead, find_split, reinitialize_module, replace_head_with_mlp
from headprep_hf.split import ModelCaller, extract_logits, reduce_features


def _hf_resnet():
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    return ResNetForImageClassification(cfg)


def _hf_vit():
    cfg = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return ViTForImageClassification(cfg)


def _hf_convnext():
    return ConvNextForImageClassification(
        ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    )


def _timm_wrapper():
    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=3))


# (factory, expected head module, expected feature width, input size)
CASES = [
    (lambda: timm.create_model("test_resnet", num_classes=3), "fc", None, 16),
    (lambda: timm.create_model("test_convnext", num_classes=3), "head.fc", None, 64),
    (lambda: timm.create_model("test_vit", num_classes=3, img_size=32), "head", None, 32),
    (_timm_wrapper, "timm_model.fc", None, 16),
    (_hf_resnet, "classifier", 16, 16),
    (_hf_vit, "classifier", 16, 16),
    (_hf_convnext, "classifier", 16, 16),
]


@pytest.mark.parametrize("factory, head_name, width, size", CASES)
def test_automatic_split_and_forward(factory, head_name, width, size):
    model = factory().eval()
    split = find_split(model)
    assert split.head_names == [head_name]
    assert split.num_classes == 3
    head_params = {n for n, _ in split.head_parameters(model)}
    backbone_params = {n for n, _ in split.backbone_parameters(model)}
    assert head_params and backbone_params and not head_params & backbone_params
    assert head_params | backbone_params == {n for n, _ in model.named_parameters()}

    captured = []
    split.feature_module(model).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    caller = ModelCaller(model, ["labels"])
    batch = {"pixel_values": torch.randn(2, 3, size, size), "labels": torch.tensor([0, 1])}
    logits = extract_logits(caller(model, batch))
    assert logits.shape == (2, 3)
    z = reduce_features(captured[0])
    assert z.shape[0] == 2 and z.dim() == 2
    if width is not None:
        assert z.shape[1] == width


def test_head_modules_override_and_errors():
    model = timm.create_model("test_resnet", num_classes=3)
    split = find_split(model, head_modules=["layer4", "fc"])
    assert split.head_names == ["layer4", "fc"] and split.feature_module_name == "layer4"
    with pytest.raises(ValueError, match=r"head_modules \['nope'\] are not modules"):
        find_split(model, head_modules=["nope"])


def test_unknown_model_lists_candidates():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(
        ValueError,
        match=r"Set head_modules=\[\.\.\.\].*candidate module names: \['0', '1', '3'\]|"
        r"Set head_modules=\[\.\.\.\].*candidate module names: \['1', '3'\]",
    ):
        find_split(model)
    split = find_split(model, head_modules=["3"])
    assert split.num_classes == 3


def test_reinit_modules_validation():
    model = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(ValueError, match=r"reinit_modules \['layer9.0'\] are not modules.*layer4.0"):
        find_split(model, reinit_modules=["layer9.0"])
    with pytest.raises(ValueError, match="overlaps the head"):
        find_split(model, reinit_modules=["fc"])
    split = find_split(model, reinit_modules=["layer4.0"])
    assert split.is_hp_trainable("layer4.0.conv1.weight") and not split.is_hp_trainable("layer3.0.conv1.weight")
    assert not split.is_hp_trainable("layer4.0x") and split.is_hp_trainable("fc.weight")


def test_mlp_head_replaces_last_linear():
    model = timm.create_model("test_resnet", num_classes=3)
    in_features = model.fc.in_features
    split = find_split(model)
    replace_head_with_mlp(model, split, hidden_size=32, num_layers=3)
    assert isinstance(model.fc, MLPHead)
    assert [m.out_features for m in model.fc if isinstance(m, nn.Linear)] == [32, 32, 3]
    assert model.fc[0].in_features == in_features
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    hf = _hf_resnet()  # classifier = Sequential(Flatten, Linear): the Linear inside is replaced
    replace_head_with_mlp(hf, find_split(hf), hidden_size=8)
    assert isinstance(hf.classifier[1], MLPHead)
    assert hf(pixel_values=torch.randn(2, 3, 16, 16)).logits.shape == (2, 3)


def test_reinitialize_module_changes_weights_and_resets_bn():
    model = timm.create_model("test_resnet", num_classes=3)
    block = model.layer4[0]
    block.bn1.running_mean.fill_(3.0)
    before = {n: p.clone() for n, p in block.named_parameters()}
    other = model.layer3[0].conv1.weight.clone()
    reinitialize_module(block)
    assert torch.equal(block.bn1.running_mean, torch.zeros_like(block.bn1.running_mean))
    changed = [n for n, p in block.named_parameters() if "conv" in n and not torch.equal(before[n], p)]
    assert changed
    assert torch.equal(other, model.layer3[0].conv1.weight)
