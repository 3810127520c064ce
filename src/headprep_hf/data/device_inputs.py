"""GPU-ready image inputs: loaders ship uint8, the model normalises on its own device, once.

Image datasets of the recipes yield uint8 tensors (a quarter of float32's bytes through worker pipes, pinned memory
and the host-to-device copy). `attach_input_normalization` registers the model's mean/std as non-persistent buffers
(they follow `model.to(device)` and never enter `state_dict`, so saved weights are unchanged) and a forward pre-hook on
the model's root that turns a uint8 image batch into the normalised float batch (and channels_last for convolutional
backbones: the weights too, as timm's train.py does, see `to_channels_last`). Every path that calls the model goes
through that one hook: HP, FT, the cached-feature pass, the energy, drift and BatchNorm passes, evaluation and the
exchange. A float batch passes through untouched, so the model still
takes inputs normalised elsewhere (a user's own float pipeline, the offline toy task's in-memory tensors).

timm's `PrefetchLoader` normalises on the device in the loader instead; a loader-side step is skipped by every pass
that builds its own loader or calls the model on cached tensors, hence the hook on the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["attach_input_normalization", "input_normalization", "normalize_uint8", "to_channels_last"]

_MEAN, _STD = "headprep_input_mean", "headprep_input_std"


def normalize_uint8(
    pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False
) -> torch.Tensor:
    """`(pixels / 255 - mean) / std` in float32 for a uint8 batch `[N, C, H, W]`; `mean`/`std` of shape `[1, C, 1, 1]`.

    The same operations, in the same order, as torchvision's `ToTensor` + `Normalize` (the float pipeline), so the
    result equals it to float32 rounding.
    """
    x = pixels.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class _NormalizeHook:
    """Forward pre-hook: normalises the model's image input when it arrives as uint8."""

    def __init__(self, input_name: str | None, channels_last: bool):
        self.input_name, self.channels_last = input_name, channels_last

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        mean, std = getattr(module, _MEAN), getattr(module, _STD)
        if self.input_name is not None and self.input_name in kwargs:
            x = kwargs[self.input_name]
            if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
                kwargs = {**kwargs, self.input_name: normalize_uint8(x, mean, std, self.channels_last)}
                return args, kwargs
        elif args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.uint8:
            return (normalize_uint8(args[0], mean, std, self.channels_last), *args[1:]), kwargs
        return None


def attach_input_normalization(
    model: nn.Module,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool = False,
    input_name: str | None = "pixel_values",
) -> nn.Module:
    """Makes `model` take uint8 image batches and normalise them on its own device (see the module docstring).

    Args:
        model: The model (timm models take the batch positionally; transformers models as `pixel_values=`).
        mean, std: Per-channel normalisation in [0, 1] units (the model's data config).
        channels_last: Also convert the batch to `torch.channels_last`, and the model's weights with
            `to_channels_last` (as timm's train.py converts the model): faster convolutions on GPUs with tensor cores,
            and on CPUs. `False` leaves the weights' memory format as it is.
        input_name: Keyword under which the model takes the image (transformers: `pixel_values`); the first
            positional argument is used otherwise.

    Returns:
        The same model. Calling it again replaces the earlier normalisation.
    """
    if len(mean) != len(std):
        raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}; give one value per channel for both")
    if any(s <= 0 for s in std):
        raise ValueError(f"std={list(std)} must be positive")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    shape = (1, len(mean), 1, 1)
    model.register_buffer(_MEAN, torch.tensor(mean, dtype=torch.float32, device=device).view(shape), persistent=False)
    model.register_buffer(_STD, torch.tensor(std, dtype=torch.float32, device=device).view(shape), persistent=False)
    # A copy of the model (copy.deepcopy, as sweeps make) carries the hook along; replace whichever is there.
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, _NormalizeHook):
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    model.register_forward_pre_hook(_NormalizeHook(input_name, channels_last), with_kwargs=True)
    if channels_last:
        to_channels_last(model)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """`model.to(memory_format=torch.channels_last)`, as timm's train.py does, with state dicts that stay contiguous.

    Converting the input alone is not enough. Each convolution whose weight is contiguous then converts that weight in
    every forward and its gradient in every backward. A layer that meets a 1x1 map takes its output's format from the
    weight: DeepLabV3's ASPP pooling branch did, and the whole head after it (the projection, the 3x3 convolution, the
    classifier and the upsampled logits) then ran in the contiguous format. Measured on this project's 2-core CPU,
    timm's training loop ran 7% slower (ResNet) and 12% slower (DeepLabV3) with the input alone converted.

    safetensors refuses non-contiguous tensors (Trainer's `save_model` of a non-`PreTrainedModel`, checkpoints,
    prepared heads, a user's own `save_file(model.state_dict())`). So every module holding a 4-D parameter or buffer
    gets a `state_dict` post-hook that hands out contiguous copies of those tensors. The parameters keep their
    channels_last memory, `state_dict(keep_vars=True)` still returns the parameters themselves, and `load_state_dict`
    copies into the channels_last parameters. Returns the same model.
    """
    model.to(memory_format=torch.channels_last)
    for module in model.modules():
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if not any(t.dim() == 4 for _, t in own):
            continue
        # A deep copy (a sweep's jobs) carries the hook along; converting again must not stack a second one.
        if not any(isinstance(h, _ContiguousStateDict) for h in module._state_dict_hooks.values()):
            module.register_state_dict_post_hook(_ContiguousStateDict())
    return model


class _ContiguousStateDict:
    """`state_dict` post-hook: the module's own channels_last tensors enter the state dict as contiguous copies."""

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            tensor = state_dict.get(prefix + name)
            if (
                isinstance(tensor, torch.Tensor)
                and not isinstance(tensor, nn.Parameter)
                and not tensor.is_contiguous()
            ):
                state_dict[prefix + name] = tensor.contiguous()


def input_normalization(model: nn.Module) -> dict | None:
    """The normalisation `attach_input_normalization` put on `model` (`mean`, `std` as lists), or None."""
    if not any(isinstance(hook, _NormalizeHook) for hook in model._forward_pre_hooks.values()):
        return None
    return {"mean": getattr(model, _MEAN).flatten().tolist(), "std": getattr(model, _STD).flatten().tolist()}
