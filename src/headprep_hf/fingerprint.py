"""Content fingerprints of model weights (used by the sweep's shard/resume checks and the prepared-head checksum)."""

from __future__ import annotations

import hashlib

import torch


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes, dtypes and values of a state dict (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
