"""GPU-ready image inputs: loaders ship uint8, the model normalises on its own device, once.

Image datasets of the recipes yield uint8 tensors (a quarter of float32's bytes through worker pipes, pinned memory
and the host-to-device copy). `attach_input_normalization` registers the model's mean/std as non-persistent buffers
(they follow `model.to(device)` and never enter `state_dict`, so saved weights are unchanged) and a forward pre-hook on
the model's root that turns a uint8 image batch into the normalised float batch (and channels_last for convolutional
backbones). Every path that calls the model goes through that one hook: HP, FT, the cached-feature pass, the energy,
drift and BatchNorm passes, evaluation and the exchange. A float batch passes through untouched, so the model still
takes inputs normalised elsewhere (a user's own float pipeline, the offline toy task's in-memory tensors).

timm's `PrefetchLoader` normalises on the device in the loader instead; a loader-side step is skipped by every pass
that builds its own loader or calls the model on cached tensors, hence the hook on the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["attach_input_normalization", "input_normalization", "normalize_uint8"]

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
        channels_last: Also convert the batch to `torch.channels_last`: faster convolutions on GPUs with tensor
            cores. Only the input is converted; convolutions then run channels_last throughout (PyTorch picks the
            memory format from the input or the weight). The weights stay contiguous because safetensors refuses
            non-contiguous tensors, so `save_model`, checkpoints and prepared heads keep working unchanged.
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
    return model


def input_normalization(model: nn.Module) -> dict | None:
    """The normalisation `attach_input_normalization` put on `model` (`mean`, `std` as lists), or None."""
    if not any(isinstance(hook, _NormalizeHook) for hook in model._forward_pre_hooks.values()):
        return None
    return {"mean": getattr(model, _MEAN).flatten().tolist(), "std": getattr(model, _STD).flatten().tolist()}
