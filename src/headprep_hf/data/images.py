"""Real image-classification data (Hub datasets or local image folders) for the image recipe."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "HFImageClassificationDataset",
    "build_image_transforms",
    "image_processor_data_config",
    "load_image_classification_dataset",
    "resolve_image_data_config",
    "to_rgb",
]

_VALIDATION_NAMES = ("validation", "valid", "val")
_LABEL_NAMES = ("label", "labels")
DEFAULT_CROP_PCT = 0.875
_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Any) -> Any:
    """An RGB PIL image from any PIL image, with 16-bit grey images ("I;16*", as 16-bit PNGs load) scaled to 8 bits.

    Pillow's own ``convert("RGB")`` clips 16-bit values at 255 instead of rescaling them, so such images come out
    nearly white; here they keep their top 8 bits (``value >> 8``). Modes "I" (32-bit integers) and "F" (floats) have
    no fixed range to scale from and are refused.
    """
    from PIL import Image

    if image.mode in _16_BIT_MODES:
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        raise ValueError(
            f"image mode {image.mode!r} (32-bit {'integer' if image.mode == 'I' else 'float'} pixels) has no fixed "
            "range to scale to 8 bits; convert the image files to 8-bit (or 16-bit) grey or RGB first"
        )
    return image.convert("RGB")


class HFImageClassificationDataset(Dataset):
    """A ``datasets.Dataset`` served as ``{"pixel_values": FloatTensor[3, H, W], "labels": int}``.

    ``datasets`` applies the transform lazily (``with_transform``, the non-mutating form of
    ``set_transform``), so images are decoded and augmented on access. Column access such as
    ``ds["label"]`` does not work on a transformed ``datasets.Dataset`` (the transform needs the
    image column), hence this wrapper reads the labels once up front.

    Attributes:
        labels: int64 numpy array of every item's label, for validation without decoding images.
        class_names: names of the classes, indexed by label.
        hf_dataset: the transformed ``datasets.Dataset``.
        name: the split's name in error messages (``"train"``, ...).

    An image that cannot be decoded (truncated, corrupt, an unsupported mode) raises ``ValueError`` naming the split,
    the index and, when the data has one, the image's file.
    """

    def __init__(
        self,
        hf_dataset: Any,
        image_column: str,
        label_column: str,
        transform: Callable[[Any], torch.Tensor],
        class_names: Sequence[str],
        name: str = "dataset",
    ) -> None:
        """Initializes the wrapper.

        Args:
            hf_dataset: a ``datasets.Dataset`` with an ``Image`` column and an integer label column.
            image_column: name of the image column.
            label_column: name of the label column (values ``0..len(class_names)-1``).
            transform: torchvision transform from an RGB PIL image to a tensor.
            class_names: class names indexed by label.
            name: the split's name in error messages.
        """
        # Reading one column does not decode images, so this stays cheap on large datasets.
        self.labels = np.asarray(hf_dataset[label_column], dtype=np.int64)
        self.class_names = list(class_names)
        self.name, self.image_column, self._source = name, image_column, hf_dataset

        def batch_transform(batch: dict[str, list]) -> dict[str, list]:
            return {
                "pixel_values": [transform(to_rgb(image)) for image in batch[image_column]],
                "labels": batch[label_column],
            }

        self.hf_dataset = hf_dataset.with_transform(batch_transform, columns=[image_column, label_column])

    def __len__(self) -> int:
        return len(self.labels)

    def content_digest(self) -> str | None:
        """The sweep fingerprint's `content`: `local_files_digest` of the image files, or `rows_digest` of the image
        column where the images are stored as bytes (None above its size limit)."""
        files = local_files_digest(self._source, self.image_column)
        return files if files is not None else rows_digest(self._source, [self.image_column])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        try:
            item = self.hf_dataset[int(index)]
        except (OSError, SyntaxError, ValueError) as error:  # PIL's decode errors (UnidentifiedImageError: OSError)
            raise unreadable_image_error(
                f"{self.name}[{index}]", error, image_file(self._source, index, self.image_column)
            ) from error
        return {"pixel_values": item["pixel_values"], "labels": int(item["labels"])}


def files_digest(paths: Sequence[str]) -> str:
    """sha256 over each file's last two path components (`cat/0.jpg`: the same on another machine's mount point) and
    size, in order: what tells two folders of the same layout and labels apart without reading an image."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            info = os.stat(path)  # (one call per file: large folders on network file systems)
            size = info.st_size if stat.S_ISREG(info.st_mode) else -1
        except OSError:
            size = -1
        head, name = os.path.split(os.path.normpath(path))
        digest.update(f"{os.path.basename(head) + '/' if head else ''}{name}:{size}\n".encode())
    return digest.hexdigest()


def local_files_digest(hf_dataset: Any, column: str) -> str | None:
    """`files_digest` of the files behind an image column of a `datasets.Dataset`, where it holds paths of local files
    (`imagefolder`'s); None where it holds the images' bytes (a Hub dataset: reading them would read the data)."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    stored = hf_dataset.data.column(column)  # (the whole table, without a selection: no row is copied)
    if not pa.types.is_struct(stored.type) or stored.type.get_field_index("bytes") < 0:
        return None
    if sum(chunk.field("bytes").null_count for chunk in stored.chunks) != len(stored):
        return None
    rows = hf_dataset.cast_column(column, datasets.Image(decode=False)).with_format("arrow")[column]
    return files_digest([p or "" for p in pc.struct_field(rows, "path").to_pylist()])


# Above this many bytes of Arrow data, `rows_digest` does not read a set (about 1-4 s from the page cache at 0.5-2 GB/s
# on the 2-core machine this is developed on; a set read from a cold disk takes longer).
ROWS_DIGEST_MAX_BYTES = 2 * 1024**3


def rows_digest(hf_dataset: Any, columns: Sequence[str]) -> str | None:
    """xxh3-128 over `columns` of the rows a `datasets.Dataset` selects, in its order (`select`/`shuffle` index
    mappings applied, its transform not: images stay undecoded bytes), as Arrow IPC batches of single chunks (so the
    same values stored in other chunks give the same digest). None where those columns hold more than
    `ROWS_DIGEST_MAX_BYTES` (reading them would be a pass over the data at every sweep start).

    What tells apart two sets of the same length and labels whose images are stored as bytes (a Hub dataset, a
    `save_to_disk` folder) or whose text differs. (`datasets` keeps a `_fingerprint` for its cache, but a private one
    that is random where a transform cannot be pickled, and that changes where a file moves: the values are read
    instead.)"""
    import pyarrow as pa
    import xxhash  # (a dependency of `datasets`: its own fingerprints use it)

    columns = list(columns)
    table = hf_dataset.data.table.select(columns)  # (the stored rows, without the index mapping: no row copied)
    if table.nbytes > ROWS_DIGEST_MAX_BYTES:  # (the whole table behind an index mapping: an upper bound)
        logger.info(
            "columns %s hold %.1f GB, more than the %.0f GB the sweep reads to tell data sets apart: this set is told "
            "apart by its length (%d) and labels only", columns, table.nbytes / 1e9, ROWS_DIGEST_MAX_BYTES / 1e9,
            len(hf_dataset),
        )  # fmt: skip
        return None
    # The rows a `select`/`shuffle` chose, taken from the table directly: through the dataset's formatting, a shuffled
    # set of 1M short texts took 3.3 s against 0.02 s unshuffled. (`_indices` is datasets' private index mapping, a
    # one-column table of row numbers; pinned by tests/test_upstream_canaries.py. Anything else: the slow path.)
    indices = getattr(hf_dataset, "_indices", None)
    rows = None
    if indices is None:
        rows = (table.slice(start, 4096) for start in range(0, table.num_rows, 4096))
    elif getattr(indices, "num_columns", None) == 1 and len(indices) == len(hf_dataset):
        positions = indices.column(0)
        rows = (table.take(positions.slice(start, 4096)) for start in range(0, len(positions), 4096))
    if rows is None:
        rows = hf_dataset.select_columns(columns).with_format("arrow").iter(batch_size=4096)
    digest = xxhash.xxh3_128()
    for batch in rows:
        # One chunk per batch and no schema metadata: `datasets` keeps its features there, and after a `map` its own
        # fingerprint (random where a function cannot be pickled, and other under another mount point), so the same
        # values gave another digest in another process.
        batch = batch.combine_chunks().replace_schema_metadata(None)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_table(batch)
        digest.update(memoryview(sink.getvalue()))
    return digest.hexdigest()


def load_hf_dataset(
    dataset_name: str,
    config_name: str | None,
    cache_dir: str | None,
    flag: str = "dataset_name",
    local_ways: str = "a folder of class folders (--train_dir), a folder of data files, or a save_to_disk folder",
):
    """`datasets.load_dataset(dataset_name)` (a Hub id or a local folder of data files), or `load_from_disk` for a
    folder written by `save_to_disk` (which `load_dataset` refuses); a `DatasetDict`. A Hub id this machine cannot
    reach is refused in one line naming `flag` and the offline ways, where `datasets` printed a 10-frame traceback
    (after about 30 s of retries without `HF_HUB_OFFLINE=1`)."""
    import datasets

    if any(os.path.isfile(os.path.join(dataset_name, f)) for f in ("dataset_dict.json", "state.json")):
        raw = datasets.load_from_disk(dataset_name)  # written by save_to_disk
        return datasets.DatasetDict(train=raw) if isinstance(raw, datasets.Dataset) else raw
    try:
        return datasets.load_dataset(dataset_name, config_name, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError) as error:
        if os.path.exists(dataset_name):
            raise  # (a local folder: datasets' own message names its files)
        raise OSError(
            f"{flag}={dataset_name!r} is not a local folder, and not a dataset this machine can load from the Hub "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__}). Offline, pass local data: "
            f"{local_ways}."
            + (
                ""
                if os.environ.get("HF_HUB_OFFLINE") == "1"
                else " Set HF_HUB_OFFLINE=1 so that Hub lookups fail at once."
            )
        ) from error


def hf_content_digest(hf_dataset: Any) -> str | None:
    """A `datasets.Dataset`'s content for the sweep fingerprint: `local_files_digest` of each image column that holds
    paths of local files, `rows_digest` of the other columns (None above its size limit)."""
    import datasets

    features = hf_dataset.features or {}
    files = {}  # (image columns of local files: their paths' last components and sizes, as an image folder's)
    for column in hf_dataset.column_names:
        if isinstance(features.get(column), datasets.Image):
            digest = local_files_digest(hf_dataset, column)
            if digest is not None:
                files[column] = digest
    rest = [c for c in hf_dataset.column_names if c not in files]
    rows = rows_digest(hf_dataset, rest) if rest else ""
    if rows is None:
        return None
    return hashlib.sha256(json.dumps([sorted(files.items()), rows]).encode()).hexdigest()


def image_file(hf_dataset: Any, index: int, column: str) -> str | None:
    """The file behind row ``index``'s image in a ``datasets.Dataset``, or None when it came as bytes only.

    Reads the row without decoding it (``datasets.Image(decode=False)``), so it works when decoding fails.
    """
    import datasets

    try:
        row = hf_dataset.select([int(index)]).cast_column(column, datasets.Image(decode=False))[0][column]
    except Exception:  # only used to enrich an error message: never hide the original error behind a new one
        return None
    return row.get("path") if isinstance(row, dict) else None


def unreadable_image_error(sample: str, error: BaseException, path: str | None = None) -> ValueError:
    """The ``ValueError`` for a sample whose image could not be read: names the sample, the file and the fix.

    One string argument, so it survives the pickling of a ``DataLoader`` worker's exception.
    """
    where = f" ({path})" if path else ""
    if isinstance(error, ValueError):  # a readable file we refuse (e.g. its mode), with its own fix in the message
        return ValueError(f"{sample}{where}: {error}")
    if isinstance(error, FileNotFoundError):
        return ValueError(f"{sample}{where}: {error}. Restore the file, or remove the sample from the data's list.")
    return ValueError(
        f"{sample}{where}: the image could not be decoded ({type(error).__name__}: {error}). The file is truncated "
        "or corrupt: remove it from the data or re-save it as a valid image (e.g. PNG or JPEG)."
    )


# The resampling modes timm's transforms take by name (`timm.data.transforms.str_to_interp_mode`).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def resolve_image_data_config(
    model_or_config: Any,
    image_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The model's data config (timm `resolve_model_data_config`: input size, interpolation, crop_pct, crop_mode,
    mean/std from its `pretrained_cfg`), with each given value overriding it, as timm's train.py flags do.

    `model_or_config`: a timm model, or a data config dict (e.g. `image_processor_data_config(processor)` of a
    transformers model); what neither says falls back to the ImageNet defaults of timm's train.py.
    """
    from timm.data import resolve_model_data_config

    if isinstance(model_or_config, dict):
        config = dict(model_or_config)
    elif hasattr(model_or_config, "pretrained_cfg"):
        config = dict(resolve_model_data_config(model_or_config))
    else:
        config = {}
    config.setdefault("input_size", (3, 224, 224))
    config.setdefault("interpolation", "bilinear")
    config.setdefault("mean", (0.485, 0.456, 0.406))
    config.setdefault("std", (0.229, 0.224, 0.225))
    config.setdefault("crop_pct", DEFAULT_CROP_PCT)
    config.setdefault("crop_mode", "center")
    if image_size is not None:
        if image_size <= 0:
            raise ValueError(f"image_size={image_size} must be a positive number of pixels")
        config["input_size"] = (config["input_size"][0], image_size, image_size)
    if crop_pct is not None:
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct={crop_pct} must lie in (0, 1]: the eval crop's share of the resized image")
        config["crop_pct"] = crop_pct
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            hint = " ('random' is timm's --train-interpolation choice; one mode serves training and evaluation here)"
            raise ValueError(
                f"interpolation={interpolation!r} is not a resampling mode; give one of {', '.join(INTERPOLATIONS)}"
                + (hint if interpolation == "random" else "")
            )
        config["interpolation"] = interpolation
    if mean is not None:
        config["mean"] = tuple(mean)
    if std is not None:
        config["std"] = tuple(std)
    return config


_DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def _timm_wrapper_data_config(processor: Any) -> dict[str, Any] | None:
    """The data config of transformers' `TimmWrapperImageProcessor` (the processor of a `timm/...` model loaded with
    `AutoModelForImageClassification`): timm's own, which it resolved from the model's `pretrained_cfg` and prepares
    images with (`timm.data.resolve_data_config` + `create_transform`). It has no `size` or `image_mean` fields, so
    reading those gave 224 px and mean 0.5. None for other processors."""
    config = getattr(processor, "data_config", None)
    if type(processor).__name__ != "TimmWrapperImageProcessor" or not isinstance(config, dict):
        return None
    config = {key: config[key] for key in _DATA_CONFIG_KEYS if key in config}
    config["input_size"] = tuple(int(v) for v in config["input_size"])
    config["mean"], config["std"] = tuple(map(float, config["mean"])), tuple(map(float, config["std"]))
    config.setdefault("crop_mode", "center")
    return config


def image_processor_data_config(processor: Any) -> dict[str, Any]:
    """A timm-style data config from a transformers image processor (size, crop, resample, mean/std), so that
    transformers image models go through the same transforms and on-device normalisation as timm models.

    The processor resizes the short side to `size["shortest_edge"]` (timm's `crop_mode="center"`) or warps the image
    to `size["height"] x size["width"]` (ViT, DeiT, BEiT: timm's `crop_mode="squash"`) and, with `do_center_crop`,
    crops `crop_size`; the equivalent timm config is `input_size` = the crop and `crop_pct` = crop / resize (1.0
    without a crop). ConvNext resizes the short side to `shortest_edge / crop_pct` and crops `shortest_edge` below 384
    px, and warps to `shortest_edge` without a crop from 384 px on (squash, crop_pct 1.0).
    """
    timm_config = _timm_wrapper_data_config(processor)
    if timm_config is not None:
        return timm_config
    size = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) or {}
    crop_mode = "center" if size.get("shortest_edge") else "squash"
    resize = size.get("shortest_edge") or size.get("height") or 224
    if getattr(processor, "do_center_crop", False) and crop:
        side = crop.get("height") or crop.get("shortest_edge") or resize
    else:
        side = resize
    if getattr(processor, "crop_pct", None) is not None:  # ConvNext: resize to side / crop_pct, then crop
        crop_pct = float(processor.crop_pct)
        if side >= 384:  # (transformers' ConvNextImageProcessor.resize: "warping (no cropping)" from 384 px on)
            crop_pct, crop_mode = 1.0, "squash"
    else:
        crop_pct = _crop_pct(side, resize)
    input_size = (3, int(side), int(side))
    height, width = size.get("height"), size.get("width")
    if crop_mode == "squash" and height and width and height != width:  # a warp to a non-square size
        input_size, crop_pct = _non_square(processor, int(height), int(width), crop, input_size, crop_pct)
    return {
        "input_size": input_size,
        "interpolation": _interpolation_of(getattr(processor, "resample", None)),
        "mean": tuple(float(v) for v in (getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5))),
        "std": tuple(float(v) for v in (getattr(processor, "image_std", None) or (0.5, 0.5, 0.5))),
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
    }


# Mean absolute difference (in normalised units) between a processor's own output and the transform read from it,
# on `_smooth_test_image`: PIL against torchvision resizing gives 1e-4 or less, a one-pixel crop offset (torchvision
# rounds half the leftover, transformers floors it) 0.015-0.03; a wrong resize (LeViT's 256/224: 0.15), the channel
# order or the normalisation (0.4-0.55) more.
_PROCESSOR_TOLERANCE = 0.05


def _smooth_test_image():
    """A non-square RGB test image whose channels differ and vary slowly (so a one-pixel shift changes little)."""
    from PIL import Image

    y, x = np.mgrid[0:233, 0:301].astype(np.float64)
    channels = (x / 300, y / 232, 0.5 + 0.4 * np.sin(x / 47) * np.cos(y / 39))
    return Image.fromarray((np.stack(channels, axis=-1) * 255).round().astype(np.uint8))


def check_processor_reproduced(processor: Any, data_config: dict[str, Any]) -> None:
    """Raise `ValueError` when the transform built from `data_config` (read from `processor` by
    `image_processor_data_config`) does not give what the processor itself gives the model.

    The recipe prepares images with timm's transforms and normalises them on the device; a processor that does more
    than resize, crop, rescale by 1/255 and normalise (MobileViT's BGR channel order without normalisation,
    EfficientNet's `include_top` second division by the std, LeViT's resize to 256/224 of the crop, Perceiver's crop
    before the resize) would otherwise train the model on other inputs than it was pretrained on, without a word.
    Both are run on one test image and compared."""
    try:
        difference, ours, theirs = _processor_difference(processor, data_config)
    except _NoPixelValues:
        raise
    except Exception as error:  # (e.g. a missing optional backend): said, not silently taken as reproduced
        warnings.warn(
            f"The image processor ({type(processor).__name__}) could not run on a test image ({error!r}), so whether "
            "the recipe's transforms reproduce it is not checked; they follow its size, crop, resample and mean/std.",
            stacklevel=2,
        )
        return
    if difference <= _PROCESSOR_TOLERANCE:
        return
    known = {
        "do_flip_channel_order": "flips the channel order (BGR)",
        "include_top": "divides by the std a second time (include_top)",
    }
    why = [text for name, text in known.items() if getattr(processor, name, False)]
    if getattr(processor, "do_normalize", True) is False:
        why.append("does not normalise (do_normalize=False)")
    shape = "" if ours.shape == theirs.shape else f" (shape {tuple(theirs.shape)}, the recipe's {tuple(ours.shape)})"
    raise ValueError(
        f"The model's image processor ({type(processor).__name__}) prepares images in a way the recipe's pipeline "
        f"(timm transforms: resize, crop, 1/255, mean/std) does not reproduce{': it ' + ', '.join(why) if why else ''}"
        f"; on a test image the two differ by {difference:.3f} on average{shape}. Finetuning on those inputs would "
        "not be the model's own preprocessing. Use a timm model or a transformers model whose processor only "
        "resizes, crops and normalises, or prepare the data yourself and use HeadPrepTrainer directly."
    )


class _NoPixelValues(ValueError):
    """A processor that runs and gives no `pixel_values` (ImageGPT's gives `input_ids`): refused, not warned about."""


def _processor_difference(processor: Any, data_config: dict[str, Any]):
    """The mean absolute difference between what `processor` and the recipe's eval transform for `data_config` give on
    one test image (inf where the shapes differ), and both results. Raises what the processor raises."""
    image = _smooth_test_image()
    out = processor(images=image, return_tensors="pt")
    if "pixel_values" not in out:
        raise _NoPixelValues(
            f"The model's image processor ({type(processor).__name__}) gives {sorted(out.keys())}, not pixel_values: "
            "the recipe's pipeline gives a model pixel values (timm transforms: resize, crop, 1/255, mean/std), so it "
            "cannot prepare this model's inputs. Prepare the data yourself and use HeadPrepTrainer directly."
        )
    theirs = out["pixel_values"][0].float()
    ours = build_image_transforms(data_config, is_training=False, normalize=True)(image)
    difference = float((ours - theirs).abs().mean()) if ours.shape == theirs.shape else float("inf")
    return difference, ours, theirs


def _non_square(processor, height: int, width: int, crop: dict, square: tuple, square_crop_pct: float):
    """`input_size` and `crop_pct` of a processor that warps to `height x width` (and may crop `crop_size`): timm's
    transforms take `input_size = (3, h, w)` and one crop share for both sides. Where one share cannot give both
    resize sides back, the square reading by height stays, with a warning naming the fix."""
    if getattr(processor, "do_center_crop", False) and crop:
        crop_h, crop_w = int(crop.get("height") or height), int(crop.get("width") or width)
    else:
        crop_h, crop_w = height, width
    for share in (_crop_pct(crop_h, height), _crop_pct(crop_w, width)):
        if math.floor(crop_h / share) == height and math.floor(crop_w / share) == width:
            return (3, crop_h, crop_w), share
    warnings.warn(
        f"The image processor warps to {height}x{width} and crops {crop_h}x{crop_w}: timm's transforms take one crop "
        f"share for both sides, so the images are prepared at {square[1]}x{square[2]} instead; pass --image_size "
        "(and --crop_pct) to choose the size.",
        stacklevel=3,
    )
    return square, square_crop_pct


def _crop_pct(side: int, resize: int) -> float:
    """`side / resize`, nudged down where needed so that timm's `floor(side / crop_pct)` gives back `resize`
    (e.g. 9 / (9 / 14) is 13.999... in floating point)."""
    crop_pct = min(1.0, side / resize)
    if side < resize and math.floor(side / crop_pct) < resize:
        crop_pct = math.nextafter(crop_pct, 0.0)
    return crop_pct


def _interpolation_of(resample: Any) -> str:
    """timm's interpolation name of a processor's PIL `resample` filter (timm names PIL's six filters as PIL does,
    lower-cased: box and hamming too); bilinear, transformers' default, where the processor sets none."""
    from PIL import Image

    if resample is None:
        return "bilinear"
    if isinstance(getattr(resample, "value", None), str):  # a torchvision InterpolationMode (fast processors take one)
        return resample.value
    try:
        return Image.Resampling(int(resample)).name.lower()
    except (TypeError, ValueError):
        raise ValueError(f"The image processor's resample={resample!r} is not a PIL resampling filter.") from None


def _resample_of(interpolation: str) -> int:
    """The PIL resampling filter of timm's interpolation name (the inverse of `_interpolation_of`)."""
    from PIL import Image

    return int(Image.Resampling[interpolation.upper()])


def _eval_resize(config: dict[str, Any]) -> tuple[int, ...]:
    """The size timm's eval transform resizes to before its crop: `floor(side / crop_pct)` for each side."""
    return tuple(math.floor(int(side) / float(config["crop_pct"])) for side in config["input_size"][-2:])


def same_data_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two data configs give the same preprocessing (size, resize before the crop, crop mode, interpolation,
    mean/std). The crop shares are compared by the sizes they give: a processor's share is read back as crop /
    resize (128 / 146 = 0.8767 for timm's 0.875 at 128 px), which prepares the same images."""
    close = lambda x, y: all(abs(float(u) - float(v)) < 1e-6 for u, v in zip(x, y))  # noqa: E731
    return (
        tuple(a["input_size"]) == tuple(b["input_size"])
        and a["interpolation"] == b["interpolation"]
        and close(a["mean"], b["mean"])
        and close(a["std"], b["std"])
        and _eval_resize(a) == _eval_resize(b)
        and (a.get("crop_mode") or "center") == (b.get("crop_mode") or "center")
    )


def image_processor_for_data_config(processor: Any, data_config: dict[str, Any]) -> Any | None:
    """`processor` set to the data config a run used (`--image_size`, `--crop_pct`, `--interpolation` change it), so
    the processor saved with the finetuned model describes its inputs; None when this processor class cannot express
    it (the caller then saves none rather than one that describes other inputs).

    The inverse of `image_processor_data_config`, in the processor's own fields: `size` (`shortest_edge`, or
    `height`/`width`, as the processor had it), `crop_size`/`do_center_crop` or ConvNext's `crop_pct`, `resample`,
    `image_mean`/`image_std`; the result is checked by reading it back with `image_processor_data_config` (so e.g. a
    `height`/`width` processor, which warps, cannot express `crop_mode="center"`, nor ConvNext at 384 px a crop).
    """
    import copy

    if same_data_config(image_processor_data_config(processor), data_config):
        return processor
    if _timm_wrapper_data_config(processor) is not None:  # (defined by the pretrained_cfg it resolves)
        return type(processor)(
            pretrained_cfg={k: data_config[k] for k in _DATA_CONFIG_KEYS}, architecture=processor.architecture
        )
    new = copy.deepcopy(processor)
    height, side = int(data_config["input_size"][-2]), int(data_config["input_size"][-1])  # (side: the width)
    crop_pct = float(data_config["crop_pct"])
    size = getattr(new, "size", None) or {}
    by_edge = size.get("shortest_edge") is not None  # (a non-square input size cannot be read back from these)
    if getattr(new, "crop_pct", None) is not None:  # ConvNext: resize to side / crop_pct, then crop side
        new.size, new.crop_pct = {"shortest_edge": side}, crop_pct
    elif hasattr(new, "do_center_crop") and (crop_pct < 1.0 or getattr(new, "do_center_crop", False)):
        resize_h, resize = (max(v, math.floor(v / crop_pct)) for v in (height, side))  # as timm's eval transform
        new.size = {"shortest_edge": resize} if by_edge else {"height": resize_h, "width": resize}
        new.crop_size, new.do_center_crop = {"height": height, "width": side}, True
    else:
        new.size = {"shortest_edge": side} if by_edge else {"height": height, "width": side}
    new.resample = _resample_of(data_config["interpolation"])
    new.image_mean, new.image_std = list(data_config["mean"]), list(data_config["std"])
    if not same_data_config(image_processor_data_config(new), data_config):
        return None
    # Read back from the fields it was given, a processor class that has a field but ignores it passes (Segformer has
    # `do_center_crop` and never crops: saved with a crop, it gave 568 px where the run used 512): it is run too, and
    # must give the run's input shape. (Not its values to a tolerance: where the crop leaves an odd number of pixels,
    # transformers' crop sits one pixel from torchvision's, 0.07 on average on a 32 px test image.)
    try:
        _, ours, theirs = _processor_difference(new, data_config)
    except Exception:  # noqa: BLE001 - not runnable here (a missing backend): the read-back above decides
        return new
    return new if ours.shape == theirs.shape else None


def build_image_transforms(
    data_config: dict[str, Any],
    is_training: bool,
    no_aug: bool = False,
    scale: Sequence[float] | None = None,
    ratio: Sequence[float] | None = None,
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    normalize: bool = False,
):
    """The train or eval transform from a PIL image, built by timm's `create_transform` from a data config.

    Train: RandomResizedCrop(`scale`, `ratio`) + horizontal flip (`hflip`) + color jitter, timm's train.py defaults;
    `no_aug`: resize to the input size only. Eval: resize to `input_size / crop_pct`, center crop (timm's eval
    protocol with the model's own crop_pct and interpolation); the short side with `crop_mode="center"`, both sides
    (a warp, as ViT's image processor) with `crop_mode="squash"`.

    With `normalize=False` (the recipes' default) the transform ends in a uint8 tensor `[3, H, W]`; the model
    normalises it on its device (`attach_input_normalization`). `normalize=True` gives timm's float pipeline.
    """
    from timm.data import create_transform

    if scale is not None and (len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0):
        raise ValueError(f"scale={list(scale)} must be two fractions 0 < min <= max <= 1 of the image area")
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip={hflip} is a probability; give a value in [0, 1]")
    channels = data_config["input_size"][0]
    if channels not in (1, 3):
        raise ValueError(f"input_size {tuple(data_config['input_size'])}: images give 1 (grey) or 3 (RGB) channels")
    transform = create_transform(
        input_size=data_config["input_size"],
        is_training=is_training,
        no_aug=no_aug,
        scale=tuple(scale) if scale is not None else None,
        ratio=tuple(ratio) if ratio is not None else None,
        hflip=hflip,
        color_jitter=color_jitter,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        crop_pct=data_config.get("crop_pct"),
        crop_mode=data_config.get("crop_mode"),
        normalize=normalize,
    )
    if channels == 1:  # a model of grey images (timm's in_chans=1): read in mode "L", as timm's train.py does
        from torchvision import transforms

        transform = transforms.Compose([transforms.Grayscale(num_output_channels=1), transform])
    return transform


def load_image_classification_dataset(
    dataset_name: str | None,
    train_dir: str | None,
    validation_dir: str | None,
    train_transform: Callable[[Any], torch.Tensor],
    eval_transform: Callable[[Any], torch.Tensor],
    label_column: str | None = None,
    image_column: str | None = None,
    validation_split: float = 0.1,
    seed: int = 0,
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
    test_dir: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> tuple[dict[str, HFImageClassificationDataset], list[str]]:
    """Loads an image-classification dataset from the Hub or from local class folders.

    Exactly one source must be given: ``dataset_name`` (a Hub dataset id, loaded with
    ``datasets.load_dataset``) or ``train_dir`` (an ``imagefolder`` tree ``train_dir/<class>/<image>``,
    optionally with ``validation_dir`` and ``test_dir`` laid out the same way). When there is no validation split,
    a stratified ``validation_split`` fraction of train is held out with ``seed``.

    Every returned dataset yields ``{"pixel_values": transform(image), "labels": int}`` (the recipes' transforms end
    in uint8 ``[3, H, W]``, see `build_image_transforms`) and exposes all labels as the numpy array ``.labels``
    (column access such as ``ds["label"]`` is not supported). ``splits["train_eval"]`` is the training set through
    the eval transform, for measurements that must not see augmentation.

    Args:
        dataset_name: Hub dataset id, e.g. ``"cifar10"``; needs network access or a warm cache.
        train_dir: local folder with one sub-folder of images per class.
        validation_dir: local validation folder with the same class sub-folders.
        train_transform / eval_transform: from an RGB PIL image to a tensor (`build_image_transforms`).
        label_column: label column; default: first ``ClassLabel`` feature, else ``label``/``labels``.
        image_column: image column; default: first ``Image`` feature.
        validation_split: fraction of train held out when no validation split exists.
        seed: seed for that hold-out and for the ``max_*_samples`` subsets.
        dataset_config_name: configuration name of a Hub dataset.
        cache_dir: ``datasets`` cache folder.
        test_dir: local test folder with the same class sub-folders (with ``train_dir``).
        max_train_samples / max_eval_samples: keep N training / validation and test samples (after the hold-out),
            drawn at random with ``seed`` as the HF examples do (``shuffle(seed).select(range(N))``), for quick runs;
            the first N of a class-sorted folder would hold only its first classes.

    Returns:
        ``(splits, class_names)`` where ``splits`` has ``"train"`` and ``"validation"`` (and
        ``"test"`` when the source has one) and ``class_names[label]`` names each label.

    Raises:
        ValueError: no or two sources, unknown columns, or no way to obtain a validation split.
    """
    import datasets

    if (dataset_name is None) == (train_dir is None):
        raise ValueError(
            f"give exactly one of dataset_name (a Hub id) or train_dir (a local image folder); "
            f"got dataset_name={dataset_name!r}, train_dir={train_dir!r}"
        )
    if dataset_name is not None:
        for name, folder in (("validation_dir", validation_dir), ("test_dir", test_dir)):
            if folder is not None:
                raise ValueError(f"{name} only applies with train_dir; drop it or load every split from local folders")
        raw = load_hf_dataset(dataset_name, dataset_config_name, cache_dir)
    else:
        folders = {"train": train_dir, "validation": validation_dir, "test": test_dir}
        check_image_folders(**{f"{split}_dir": folder for split, folder in folders.items()})
        data_files = {split: _data_files(folder) for split, folder in folders.items() if folder is not None}
        raw = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)

    if "train" not in raw:
        raise ValueError(f"dataset {dataset_name or train_dir!r} has no 'train' split; its splits are {list(raw)}")
    features = raw["train"].features
    image_column = _find_image_column(features, image_column)
    try:
        label_column = _find_label_column(features, label_column, image_column)
    except ValueError:
        if dataset_name is not None or label_column is not None:
            raise
        # imagefolder infers the labels from the folder names only when every file sits one level below its split
        # folder and all split folders have the same depth; otherwise it silently yields no label column.
        given = {f"{split}_dir": folder for split, folder in folders.items() if folder is not None}
        classes = _class_folders(train_dir)
        if len(classes) == 1:  # (imagefolder gives no labels for a single class)
            raise ValueError(
                f"train_dir={train_dir!r} has one class folder ({classes[0]!r}): a classifier needs at least two "
                "classes, one sub-folder of images each."
            ) from None
        raise ValueError(
            f"the image folders {given} gave no class labels: every image must sit at <dir>/<class>/<file> (one "
            "sub-folder per class, no images directly in a split folder), and the split folders must have the same "
            "depth (e.g. data/train and data/val, not data/train and data/extra/val); move the folders to match"
        ) from None
    raw = _without_unlabelled_splits(raw, label_column, dataset_name or train_dir)
    if not isinstance(features[image_column], datasets.Image):
        # A column of file paths or bytes; datasets decodes it once told it holds images.
        raw = raw.cast_column(image_column, datasets.Image())
    raw, class_names = _encode_labels(raw, label_column)
    if dataset_name is None:
        _check_split_classes(raw, label_column, class_names, folders)
        _check_no_empty_class_folders(folders, class_names)

    validation_key = next((name for name in _VALIDATION_NAMES if name in raw), None)
    train = raw["train"]
    if validation_key is not None:
        validation = raw[validation_key]
    else:
        if not 0.0 < validation_split < 1.0:
            raise ValueError(
                f"the dataset has no validation split and validation_split={validation_split}; "
                "pass validation_split in (0, 1) or a validation_dir"
            )
        train, validation = _hold_out(train, validation_split, seed, label_column)

    for name, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if value is not None and value <= 0:
            raise ValueError(f"{name}={value} must be a positive number of samples (or unset for all)")

    def first(split: Any, limit: int | None, flag: str, name: str) -> Any:
        if limit is not None and limit > len(split):
            warnings.warn(
                f"{flag}={limit} is more than the {len(split)} samples of the {name} split: all are used.",
                stacklevel=3,
            )
        if limit is None or limit >= len(split):
            return split
        return split.shuffle(seed=seed).select(range(limit))  # as HF's run_image_classification.py

    def wrap(split: Any, transform: Callable, name: str) -> HFImageClassificationDataset:
        return HFImageClassificationDataset(split, image_column, label_column, transform, class_names, name)

    train = first(train, max_train_samples, "max_train_samples", "training")
    splits = {
        "train": wrap(train, train_transform, "train"),
        "train_eval": wrap(train, eval_transform, "train"),  # the train samples: errors name them as such
        "validation": wrap(
            first(validation, max_eval_samples, "max_eval_samples", "validation"), eval_transform, "validation"
        ),
    }
    if "test" in raw and _has_labels(raw["test"], label_column):
        splits["test"] = wrap(first(raw["test"], max_eval_samples, "max_eval_samples", "test"), eval_transform, "test")
    elif "test" in raw:
        warnings.warn(
            f"The test split of {dataset_name!r} has no labels (every {label_column!r} is -1, as in Hub test splits "
            "whose labels are withheld): it is not evaluated.",
            stacklevel=2,
        )
    return splits, class_names


def _without_unlabelled_splits(raw: Any, label_column: str, source: str) -> Any:
    """`raw` without the splits that have no `label_column` at all (a test set saved without its labels): a test
    split is left out with a warning, as one whose labels are withheld (-1) is; a validation split is refused (tau* is
    chosen on it); other splits are not used. They failed with "Column 'label' doesn't exist", naming neither."""
    import datasets

    kept = {}
    for name, split in raw.items():
        if name == "train" or label_column in split.column_names:
            kept[name] = split
        elif name in _VALIDATION_NAMES:
            raise ValueError(
                f"the {name!r} split of {source!r} has no {label_column!r} column (its columns: "
                f"{split.column_names}): the validation split needs labels, since tau* and the best model are chosen "
                "on it. Add them, or leave the split out (a validation_split of train is then held out)."
            )
        elif name == "test":
            warnings.warn(
                f"The test split of {source!r} has no {label_column!r} column: it is not evaluated.", stacklevel=3
            )
    return datasets.DatasetDict(kept)


def _has_labels(split: Any, label_column: str) -> bool:
    """False for a split whose every label is -1 or missing (`datasets`' mark of a withheld label)."""
    labels = split[label_column]
    return not labels or any(label is not None and label >= 0 for label in labels)


def _check_split_classes(raw: Any, label_column: str, class_names: list[str], folders: dict[str, Any]) -> None:
    """Local image folders: `imagefolder` takes the class names of every split's sub-folders together, so a class
    folder that only a validation or test folder has (a typo such as `val/Dog`, a class left out of train) would
    silently become a head output without a training image. Refused, naming the folders."""
    trained = set(np.unique(np.asarray(raw["train"][label_column])).tolist())
    for split in raw:
        if split == "train":
            continue
        extra = sorted(set(np.unique(np.asarray(raw[split][label_column])).tolist()) - trained)
        if extra:
            where = f"{split}_dir={folders.get(split)!r}" if folders.get(split) else f"the {split!r} split"
            raise ValueError(
                f"{where} has class folder(s) {[class_names[i] for i in extra]} that train_dir="
                f"{folders.get('train')!r} does not have (its classes: {sorted(class_names[i] for i in trained)}): "
                "each would become a class without a training image. Rename the folders to match train_dir's, or "
                "remove them."
            )


def _data_files(folder: str) -> str | list[str]:
    """`imagefolder`'s data files for a split folder: the pattern `folder/**`, except where a folder below is a
    symbolic link or the path holds a pattern character (`*`, `?`, `[`). `datasets` does not follow linked folders
    (torchvision's `ImageFolder` and timm do): a class folder linked in was silently not read, e.g. a validation set
    without that class. A path such as `set[1]/train` matched nothing ("corresponds to no data"). There the files
    are listed here (`_folder_files`, in the pattern's order, each escaped: `datasets` reads every entry as a
    pattern). Not always: resolving a list costs `datasets` about 1.6x the pattern (2.3 s against 1.4 s for 10,000
    files here)."""
    files, linked = _folder_files(folder)
    special = any(char in os.path.abspath(folder) for char in "*?[")
    if not linked and not special:
        return os.path.join(folder, "**")
    if linked and special:
        # (an escaped entry is a pattern to `datasets`, matched by walking the folder without following links: the
        # linked folders' files would again be left out without a word)
        raise ValueError(
            f"{folder!r} holds linked folders and its path a pattern character (*, ? or [), which together "
            "datasets' imagefolder cannot read: it would leave the linked folders' images out. Rename the path "
            "without the character, or copy the linked folders in."
        )
    # (every entry escaped: a file named `photo [1].png` is a pattern too, which matched other files or none)
    return [glob.escape(path) for path in files]


def _folder_files(folder: str) -> tuple[list[str], bool]:
    """The files under `folder` as `datasets` lists them for `folder/**` (sorted full paths; hidden files, and folders
    starting with "." or "__" such as __MACOSX, left out), following linked folders (a link back up the tree is read
    once), and whether any folder was linked."""
    files, seen, linked = [], set(), False
    for root, dirs, names in os.walk(os.path.abspath(folder), followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        linked = linked or any(os.path.islink(os.path.join(root, d)) for d in dirs)
        files += [os.path.join(root, name) for name in names if not name.startswith(".")]
    return sorted(files), linked


def _class_folders(folder: str) -> list[str]:
    # (as `datasets` lists them: folders starting with "." or "__", such as __MACOSX, are not data)
    return sorted(
        entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith((".", "__"))
    )


def _check_no_empty_class_folders(folders: dict[str, Any], class_names: list[str]) -> None:
    """A class sub-folder of `train_dir` with no image in it is not a class to `imagefolder`: the head would silently
    have one output fewer than the folders (torchvision's `ImageFolder` refuses it). Refused, naming it."""
    train_dir = folders["train"]
    known = set(class_names)
    empty = [name for name in _class_folders(train_dir) if name not in known]
    if empty:
        raise ValueError(
            f"train_dir={train_dir!r} has class folder(s) {empty} without an image file that imagefolder reads: they "
            f"would not be classes (the classes would be {sorted(known)}). Add their images, or remove the folders."
        )


def _find_image_column(features: Any, requested: str | None) -> str:
    import datasets

    if requested is not None:
        if requested not in features:
            raise ValueError(f"image_column={requested!r} is not a column; the columns are {list(features)}")
        return requested
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(f"found no Image column; pass image_column=... (one of {list(features)})")


def check_image_folders(**folders: str | None) -> None:
    """Refuse a given `<split>_dir` that is not a folder (the recipes call it before the model loads: a typo in a
    path was named only after the backbone had been downloaded)."""
    for name, folder in folders.items():
        if folder is not None and not os.path.isdir(folder):
            raise ValueError(f"{name}={folder!r} is not a folder")


def _find_label_column(features: Any, requested: str | None, image_column: str) -> str:
    import datasets

    if requested is not None:
        if requested not in features or requested == image_column:
            raise ValueError(f"label_column={requested!r} is not a label column; the columns are {list(features)}")
        return requested
    for name, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    for name in _LABEL_NAMES:
        if name in features:
            return name
    others = [c for c in features if c != image_column]
    fix = (
        f"name the label column with label_column=... (--label_column; one of {others})"
        if others
        else "the dataset has no column besides the images, so it holds no labels: add a label column, or use a "
        "folder of class subfolders (--train_dir)"
    )
    raise ValueError(
        f"found no ClassLabel column and no column named 'label'/'labels' (the columns: {list(features)}); {fix}"
    )


def _encode_labels(raw: Any, label_column: str) -> tuple[Any, list[str]]:
    """Makes ``label_column`` a ClassLabel shared by all splits; returns the data and class names."""
    import datasets

    feature = raw["train"].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return _align_class_labels(raw, label_column, list(feature.names)), list(feature.names)
    if not isinstance(feature, datasets.Value):
        raise ValueError(f"label_column={label_column!r} holds {feature}, not class labels")

    # One mapping for every split, from the training split's values (encoding split by split could number the
    # classes differently). Withheld labels stay -1: None, and a split's -1s where all its labels are -1 or None (a
    # Hub test split's mark; a -1 among other values is a class, as in -1/+1 labels).
    values = sorted({value for value in raw["train"][label_column] if value is not None})

    unlabelled = {
        name
        for name, split in raw.items()
        if name != "train" and set(split[label_column]) <= {None, -1} and -1 not in values
    }

    def withheld(value, name: str) -> bool:
        return value is None or (name in unlabelled and value == -1)

    negative = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0]
    if negative and 0 in values:
        warnings.warn(
            f"label_column={label_column!r}: the value(s) {negative} are taken as classes beside "
            f"{sorted(set(values) - set(negative))[:10]}. If they mark unlabelled samples, drop those samples.",
            stacklevel=3,
        )
    for name, split in raw.items():
        extra = sorted({value for value in split[label_column] if not withheld(value, name)} - set(values))
        if extra:
            raise ValueError(
                f"the {name!r} split has label value(s) {extra[:10]} in label_column={label_column!r} that the "
                f"'train' split does not have (its values: {values[:20]}): each would become a class without a "
                "training image. Fix the labels, or drop those samples."
            )
    index = {value: i for i, value in enumerate(values)}
    class_names = [str(value) for value in values]
    raw = datasets.DatasetDict(
        {
            name: split.map(
                lambda batch, name=name: {
                    label_column: [-1 if withheld(v, name) else index[v] for v in batch[label_column]]
                },
                batched=True,
            )
            for name, split in raw.items()
        }
    )
    raw = raw.cast_column(label_column, datasets.ClassLabel(names=class_names))
    return raw, class_names


def _align_class_labels(raw: Any, label_column: str, names: list[str]) -> Any:
    """Every split's labels numbered by train's `ClassLabel` `names`. Splits saved apart (`save_to_disk` of splits
    built one by one, a validation set without one class) can carry a `ClassLabel` of their own, with other names or
    another order: their ids were read as train's, so the model was scored against the wrong classes without a word.
    Such a split is renumbered by class name (as `datasets`' `align_labels_with_mapping`, which also lowercases the
    names: not here, where "Cat" and "cat" may be two classes); a split holding a class train does not have is
    refused, naming it. Labels withheld (-1, None) stay so."""
    import datasets

    index = {name: i for i, name in enumerate(names)}
    aligned = {}
    for split_name, split in raw.items():
        feature = split.features.get(label_column)
        if split_name == "train" or not isinstance(feature, datasets.ClassLabel) or list(feature.names) == names:
            aligned[split_name] = split
            continue
        theirs = list(feature.names)
        used = {v for v in split[label_column] if v is not None and v >= 0}
        unknown = sorted(theirs[v] for v in used if theirs[v] not in index)
        if unknown:
            raise ValueError(
                f"the {split_name!r} split has class(es) {unknown} in label_column={label_column!r} that the 'train' "
                f"split does not have (its classes: {names[:20]}): each would become a class without a training "
                "image. Fix the labels, or drop those samples."
            )
        mapping = [index.get(name, -1) for name in theirs]
        features = split.features.copy()
        features[label_column] = datasets.ClassLabel(names=names)
        aligned[split_name] = split.map(
            lambda labels, mapping=mapping: {label_column: [v if v is None or v < 0 else mapping[v] for v in labels]},
            input_columns=label_column,
            batched=True,
            features=features,
        )
        logger.info("The %r split's classes %s are renumbered as train's %s.", split_name, theirs, names)
    return datasets.DatasetDict(aligned)


def _hold_out(train: Any, fraction: float, seed: int, label_column: str) -> tuple[Any, Any]:
    try:
        parts = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column=label_column)
    except ValueError:
        # Too few images per class to stratify (tiny or very imbalanced data): fall back to a plain split.
        parts = train.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]
