"""Losses with per-stage label smoothing, and the per-sample energy `||dL/dq||_2` of the paper.

Logits have shape `(N, C)` or `(N, C, *spatial)` with labels `(N,)` or `(N, *spatial)`; positions whose label
equals `ignore_index` are excluded from the loss and from the energy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy against `(1 - smoothing) * e_y + smoothing / C`, ignoring `ignore_index` labels."""
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, label_smoothing=float(smoothing))


def _flatten(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, C) logits, (positions,) labels and the sample index of each position."""
    n, c = logits.shape[:2]
    if logits.dim() > 2:
        per_sample = logits[0, 0].numel()
        flat_logits = logits.reshape(n, c, -1).transpose(1, 2).reshape(-1, c)
        sample = torch.arange(n, device=logits.device).repeat_interleave(per_sample)
    else:
        flat_logits = logits
        sample = torch.arange(n, device=logits.device)
    return flat_logits, labels.reshape(-1).long(), sample


@torch.no_grad()
def cross_entropy_energy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> dict[str, torch.Tensor]:
    """Per-sample energy `||e_y - softmax(q)||_2`, true-class probability p0 and correctness, with hard labels.

    For dense outputs each value is the mean over the sample's valid positions. Samples without a valid position
    get NaN energy (callers exclude them).

    Returns:
        dict with float tensors `energy`, `p_true`, `correct` (per-sample means over valid positions) and `count`
        (the number of valid positions), each of shape `(N,)`.
    """
    n = logits.shape[0]
    flat, y, sample = _flatten(logits.float(), labels)
    valid = y != ignore_index
    probs = flat.softmax(dim=-1)
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    one_hot = F.one_hot(y_safe, num_classes=flat.shape[-1]).to(probs.dtype)
    energy = (one_hot - probs).norm(dim=-1)
    p_true = probs.gather(1, y_safe[:, None]).squeeze(1)
    correct = (probs.argmax(dim=-1) == y_safe).to(probs.dtype)
    count = torch.zeros(n, device=logits.device).index_add_(0, sample, valid.to(probs.dtype))
    out = {"count": count}
    for key, value in (("energy", energy), ("p_true", p_true), ("correct", correct)):
        total = torch.zeros(n, device=logits.device).index_add_(0, sample, torch.where(valid, value, 0.0))
        out[key] = total / count
    return out
