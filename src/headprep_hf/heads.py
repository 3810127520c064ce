"""Task heads: the MLP head and the partial-backbone re-initialisation (paper section 5.3)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .split import ModelSplit, last_linear


class MLPHead(nn.Sequential):
    """`Linear(in, hidden) - ReLU - ... - Linear(hidden, num_classes)` with `num_layers` linear layers."""

    def __init__(self, in_features: int, num_classes: int, hidden_size: int = 256, num_layers: int = 2):
        if num_layers < 2:
            raise ValueError(f"MLPHead needs num_layers >= 2, got {num_layers}.")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_size), nn.ReLU(inplace=True)]
            width = hidden_size
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = num_classes


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def mlp_head_target(model: nn.Module, split: ModelSplit) -> tuple[str, nn.Linear]:
    """The linear layer `replace_head_with_mlp` replaces, with its full name: the last linear layer of the last head
    module that has one. `ValueError` when no head module has one."""
    for head_name in reversed(split.head_names):
        found = last_linear(model.get_submodule(head_name))
        if found is not None:
            rel_name, linear = found
            return (f"{head_name}.{rel_name}" if rel_name else head_name), linear
    raise ValueError(f"head_type='mlp' needs a linear layer in the head {split.head_names}; none found.")


def replace_head_with_mlp(model: nn.Module, split: ModelSplit, hidden_size: int = 256, num_layers: int = 2) -> str:
    """Replace the last linear layer of the head by an `MLPHead` with the same input and output sizes.

    Returns:
        The name of the replaced module.
    """
    full_name, linear = mlp_head_target(model, split)
    mlp = MLPHead(linear.in_features, linear.out_features, hidden_size, num_layers)
    mlp.to(device=linear.weight.device, dtype=linear.weight.dtype)
    _set_submodule(model, full_name, mlp)
    return full_name


@contextmanager
def _drawn_contiguous(module: nn.Module):
    """Within: `module`'s own parameters in the contiguous layout; afterwards back in their own (e.g. channels_last,
    `to_channels_last`). torch's init functions fill a tensor in memory order, so a channels_last weight would get
    other values from the same seed than a contiguous one: a sweep's replicate heads would depend on the layout."""
    kept = [(p, p.stride()) for p in module.parameters(recurse=False) if not p.is_contiguous()]
    for p, _ in kept:
        p.data = p.data.contiguous()
    try:
        yield
    finally:
        for p, stride in kept:
            p.data = torch.empty_strided(p.shape, stride, dtype=p.dtype, device=p.device).copy_(p.data)


@torch.no_grad()
def reinitialize_module(module: nn.Module) -> None:
    """Re-initialise every layer of `module` as a freshly built ResNet does.

    Convolutions get Kaiming-normal (fan_out, ReLU) weights and zero biases, normalisation layers unit weight, zero
    bias and reset running statistics, other layers their own `reset_parameters()`. The values a seed gives do not
    depend on the weights' memory layout.
    """
    for name, sub in module.named_modules():
        with _drawn_contiguous(sub):
            if not _reinitialize_layer(sub) and any(True for _ in sub.parameters(recurse=False)):
                own = [f"{name}.{p}" if name else p for p, _ in sub.named_parameters(recurse=False)]
                raise ValueError(
                    f"Cannot re-initialise {own} of {type(sub).__name__}: they belong to the module itself, not to a "
                    "convolution, normalisation or linear layer, and headprep_hf does not know how this model draws "
                    "them (e.g. ConvNeXt's layer-scale gamma); left pretrained, the block would be half "
                    "re-initialised. Re-initialise such modules yourself, or choose modules without parameters of "
                    "their own."
                )


def _reinitialize_layer(sub: nn.Module) -> bool:
    """Re-draw `sub`'s own parameters; False when it has a way for none of them (a container, or a leaf without
    `reset_parameters`)."""
    if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")
        if sub.bias is not None:
            nn.init.zeros_(sub.bias)
    elif isinstance(sub, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
        if getattr(sub, "weight", None) is not None:
            nn.init.ones_(sub.weight)
        if getattr(sub, "bias", None) is not None:
            nn.init.zeros_(sub.bias)
        if hasattr(sub, "reset_running_stats") and getattr(sub, "track_running_stats", False):
            sub.reset_running_stats()
    else:
        reset = getattr(sub, "reset_parameters", None)
        if list(sub.children()) or not callable(reset):
            return False
        reset()
    return True


def reinitialize_head(model: nn.Module, split: ModelSplit, seed: int) -> None:
    """Draw the head's parameters anew from `seed` (`reinitialize_module` on each head module), leaving the global
    RNG streams as they were: the replicate seeds of a sweep each start from their own head."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name in split.head_names:
            reinitialize_module(model.get_submodule(name))
