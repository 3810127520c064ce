"""Content fingerprints of model weights (used by the sweep's shard/resume checks and the prepared-head checksum)."""

from __future__ import annotations

import hashlib
import json

import torch


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes, dtypes and values of a state dict (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# Module attributes that say how a model runs on a machine, not what it computes (left out of `settings_fingerprint`).
# (timm's `fused_attn` follows TIMM_FUSED_ATTN and the torch build; PEFT's `ephemeral_gpu_offload` a device choice)
_MACHINE_ATTRIBUTES = (
    "training", "grad_checkpointing", "gradient_checkpointing", "name_or_path", "fused_attn", "ephemeral_gpu_offload",
)  # fmt: skip


def _scalar(value) -> bool:
    if isinstance(value, tuple):
        return all(_scalar(v) for v in value)
    return isinstance(value, (bool, int, float, str)) or value is None


def settings_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over what a model computes with besides its weights: each module's class and public scalar attributes
    (dropout rates, timm's `drop_rate`, BatchNorm's momentum and eps, ...) and a transformers model's config (its
    paths and version left out). Two models with equal weights and another dropout rate differ here."""
    described = []
    for name, module in model.named_modules():
        values = {
            key: value
            for key, value in vars(module).items()
            if not key.startswith("_") and key not in _MACHINE_ATTRIBUTES and _scalar(value)
        }
        described.append((name, type(module).__name__, sorted(values.items())))
    config = getattr(model, "config", None)
    if callable(getattr(config, "to_dict", None)):
        values = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        described.append(("config", json.dumps(values, sort_keys=True, default=str)))
    return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()
