"""Label validation before training: a label outside the head's classes must fail with the sample index, not
with a device-side assert or a silently wrong loss."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .dynamics import forked_rng

logger = logging.getLogger(__name__)

_LABEL_COLUMNS = ("labels", "label")
_MAX_ITERATED = 200_000


def dataset_labels(dataset, label_name: str = "labels", read_items: bool = True) -> np.ndarray | None:
    """All labels of a map-style dataset as one array, read cheaply where the dataset allows.

    Looks for a `labels`/`targets` attribute (without a `target_transform`), a `datasets.Dataset` label column, a
    `torch.utils.data.Subset` of either, and otherwise reads `dataset[i][label_name]` for every sample (with the RNGs
    left as they were), unless `read_items=False`. Returns None for datasets without a length (iterable datasets) or
    too large to scan item by item.
    """
    if isinstance(dataset, torch.utils.data.Subset):
        inner = dataset_labels(dataset.dataset, label_name, read_items)
        return None if inner is None else inner[np.asarray(dataset.indices, dtype=np.int64)]
    # Not where a `target_transform` (torchvision's) turns those raw targets into the items' labels: only the items
    # say what they are then (None where they cannot be read: nothing is checked against raw targets).
    attribute = _label_attribute(dataset) if getattr(dataset, "target_transform", None) is None else None
    if attribute is not None:
        return _as_array(attribute)
    return _labels_of_items(dataset, label_name, read_items)


def _label_attribute(dataset):
    """The dataset's `labels`/`targets` attribute (torchvision's, or the recipes' datasets), None without one."""
    for attribute in ("labels", "targets"):
        value = getattr(dataset, attribute, None)
        if value is not None and not callable(value):
            return value
    return None


def _label_keys(label_name: str) -> list[str]:
    # (the default collators batch an item's "label" or "label_ids" as "labels")
    return [label_name, "label", "label_ids"] if label_name == "labels" else [label_name]


def _labels_of_items(dataset, label_name: str, read_items: bool) -> np.ndarray | None:
    column_names = getattr(dataset, "column_names", None)
    if isinstance(column_names, list):
        for column in (label_name, *_LABEL_COLUMNS):
            if column in column_names:
                # A transform (set_transform) may need other columns; read the raw column without it.
                plain = dataset.with_format(None) if hasattr(dataset, "with_format") else dataset
                return _as_array(list(plain[column]))
    if not read_items or not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    if len(dataset) > _MAX_ITERATED:
        logger.warning("Not scanning the labels of a dataset of %d items one by one.", len(dataset))
        return None
    labels = []
    keys = _label_keys(label_name)
    with forked_rng():  # reading samples may run random augmentation
        for i in range(len(dataset)):
            item = dataset[i]
            key = next((k for k in keys if k in item), None) if isinstance(item, Mapping) else None
            if key is None:
                return None
            labels.append(np.asarray(item[key]))
    return _as_array(labels) if labels else np.zeros(0, dtype=np.int64)


def _as_array(values) -> np.ndarray:
    """`values` as one array; per-sample label arrays of different shapes (the token labels of sequences of different
    lengths) as a 1-D object array holding one array per sample (`is_ragged`)."""
    try:
        array = np.asarray(values)
        if array.dtype != object or array.ndim != 1:
            return array
    except ValueError:  # numpy >= 1.24 refuses ragged nested sequences
        pass
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        array[i] = np.asarray(value)
    return array


def is_ragged(labels: np.ndarray) -> bool:
    """Whether `labels` (from `dataset_labels`) hold per-sample arrays of different shapes."""
    return labels.dtype == object and labels.ndim == 1 and len({np.shape(v) for v in labels}) > 1


def _padded(labels: np.ndarray, fill: int) -> np.ndarray:
    """Ragged per-sample labels flattened per sample and padded with `fill` to one length (`n, longest`); returned as
    they are when a sample's labels are not numbers (the caller's dtype check names them)."""
    rows = [np.ravel(row) for row in labels]
    if not all(np.issubdtype(row.dtype, np.number) or row.dtype == bool for row in rows):
        return labels
    out = np.full((len(rows), max(len(row) for row in rows)), fill, dtype=np.result_type(*rows, np.int64))
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def check_labels(dataset, num_classes: int, name: str, label_name: str = "labels", ignore_index: int = -100) -> None:
    """Raise `ValueError` naming the first sample of `dataset` whose label is not in `[0, num_classes)`.

    `ignore_index` labels are allowed (dense tasks mark ignored positions with it).
    """
    labels = dataset_labels(dataset, label_name)
    if labels is None or labels.size == 0:
        return
    if is_ragged(labels):  # token labels of sequences of different lengths: the padding is ignored
        labels = _padded(labels, ignore_index)
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(np.isnan(labels) | (labels == np.round(labels))):
            labels = np.nan_to_num(labels, nan=ignore_index).astype(np.int64)
        else:
            raise ValueError(f"{name} has non-integer labels (dtype {labels.dtype}); classification needs class ids.")
    flat = labels.reshape(len(labels), -1)
    bad = ((flat < 0) | (flat >= num_classes)) & (flat != ignore_index)
    if bad.any():
        index = int(np.nonzero(bad.any(axis=1))[0][0])
        value = int(flat[index][bad[index]][0])
        # (a mask's 255 is PASCAL VOC's "ignore" border: the fix there is the ignore index, not 256 classes)
        dense_255 = value == 255 and flat.shape[1] > 1 and ignore_index != 255
        raise ValueError(
            f"{name}[{index}] has label {value}, outside the {num_classes} classes [0, {num_classes}) of the model's "
            + (
                f"head. If 255 marks pixels to ignore (PASCAL VOC-style masks), set ignore_index=255 "
                f"(--ignore_index 255); ignore_index={ignore_index} is skipped now."
                if dense_255
                else f"head. Fix the labels, or build the head with num_classes >= "
                f"{int(flat[flat != ignore_index].max()) + 1} (labels equal to ignore_index={ignore_index} are "
                "skipped)."
            )
        )


def check_dense_shapes(dataset, name: str, label_name: str = "labels") -> None:
    """For dense labels (segmentation masks): raise `ValueError` naming the first sample whose mask does not have
    the height and width of its image. Datasets with per-sample (classification) labels are not scanned."""
    if not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset) or len(dataset) == 0:
        return
    if len(dataset) > _MAX_ITERATED:
        return
    with forked_rng():  # reading samples runs their random augmentation: the training RNG streams stay untouched
        _scan_dense_shapes(dataset, name, label_name)


def _scan_dense_shapes(dataset, name: str, label_name: str) -> None:
    first = dataset[0]
    if not isinstance(first, Mapping) or label_name not in first or np.ndim(first[label_name]) < 2:
        return
    for i in range(len(dataset)):
        item = first if i == 0 else dataset[i]
        mask_size = tuple(np.shape(item[label_name]))[-2:]
        for key, value in item.items():
            shape = tuple(getattr(value, "shape", ()))
            if key != label_name and len(shape) >= 3 and shape[-2:] != mask_size:
                raise ValueError(
                    f"{name}[{i}]: the mask '{label_name}' is {mask_size[0]}x{mask_size[1]} but '{key}' is "
                    f"{shape[-2]}x{shape[-1]}; resize them together (nearest-neighbour for the mask)."
                )


def check_task_labels(
    dataset, num_tasks: int | None, name: str, problem_type: str, label_name: str = "labels"
) -> None:
    """Multi-task labels (`multi_label_classification`, `regression`): raise `ValueError` naming the first sample
    whose labels do not have `num_tasks` values (the head's outputs), or, for binary tasks, hold a value other than
    0, 1 or NaN (missing); regression labels must be finite or NaN."""
    labels = dataset_labels(dataset, label_name)
    if labels is None or labels.size == 0:
        return
    if is_ragged(labels):
        sizes = sorted({int(np.size(row)) for row in labels})
        raise ValueError(
            f"{name} has label sequences of different lengths ({sizes[0]} to {sizes[-1]} values per sample), but "
            f"problem_type={problem_type!r} needs the same number of labels per sample, one per output of the head"
            f"{f' ({num_tasks})' if num_tasks is not None else ''}. Per-token class ids (token classification) are "
            "problem_type='single_label_classification', with ignore_index (-100) marking the tokens to skip."
        )
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim == 1:
        labels = labels[:, None]
    labels = labels.reshape(len(labels), -1)
    if num_tasks is not None and labels.shape[1] != num_tasks:
        raise ValueError(
            f"{name} has {labels.shape[1]} label(s) per sample but the model's head has {num_tasks} outputs (one per "
            f"task); build the head with num_tasks={labels.shape[1]} or fix the label columns."
        )
    present = ~np.isnan(labels)
    if problem_type == "multi_label_classification":
        bad = present & (labels != 0) & (labels != 1)
        what = (
            "binary tasks take 0, 1 or NaN (missing); if these are regression targets, set "
            'problem_type="regression" in HeadPrepConfig'
        )
    else:
        bad = present & ~np.isfinite(labels)
        what = "regression labels must be finite, or NaN for a missing value"
    if bad.any():
        index, task = (int(v[0]) for v in np.nonzero(bad))
        raise ValueError(f"{name}[{index}] has label {labels[index, task]} for task {task}: {what}.")


def first_item(dataset):
    """`dataset[0]` of a map-style dataset, read with every RNG left as it was; None when there is none."""
    if not hasattr(dataset, "__getitem__") or isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    try:
        if len(dataset) == 0:
            return None
        with forked_rng():  # reading samples may run random augmentation
            return dataset[0]
    except (TypeError, KeyError, IndexError):
        return None


def trainer_first_item(trainer, dataset):
    """`first_item(dataset)`, read once per trainer and dataset: the checks before training and the start-of-FT
    measurements look at the same item (a dataset that decodes or augments on access is not read again for it)."""
    cache = trainer.__dict__.setdefault("_first_items", {})
    hit = cache.get(id(dataset))
    if hit is not None and hit[0] is dataset:
        return hit[1]
    item = first_item(dataset)
    cache[id(dataset)] = (dataset, item)
    return item


def _first_label(dataset, label_name: str) -> np.ndarray | None:
    """The first sample's label: from a `labels`/`targets` attribute where there is one and no `target_transform`
    changes it, else from the first item, else (a `target_transform` over items that cannot be read, tuples) from the
    attribute, the best guess of its kind there is; None when unreadable."""
    attribute = _label_attribute(dataset)
    attribute = attribute if attribute is not None and len(attribute) > 0 else None
    if attribute is not None and getattr(dataset, "target_transform", None) is None:
        return np.asarray(attribute[0])
    item = first_item(dataset)
    keys = _label_keys(label_name)
    value = next((item[n] for n in keys if isinstance(item, Mapping) and item.get(n) is not None), None)
    if value is None:
        return None if attribute is None else np.asarray(attribute[0])
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def infer_problem_type(dataset, label_name: str = "labels") -> str:
    """The problem type the labels show, for models and configs that declare none: integer labels are class ids
    (`single_label_classification`), a float per sample is `regression`, float vectors of 0/1 (NaN = missing) are
    `multi_label_classification`, other float vectors `regression`. Unreadable labels: single-label classification.

    The first sample decides the kind; 0/1 vectors are then checked over every label where the dataset holds them
    as an array or column (no item is read here: the label check that follows scans items once): a multi-target
    regression whose first row happens to be 0/1 is regression. Read item by item, such labels are refused by that
    check, whose message names `problem_type="regression"`."""
    label = _first_label(dataset, label_name) if dataset is not None else None
    if label is None or not np.issubdtype(label.dtype, np.floating):
        return "single_label_classification"
    if label.ndim == 0:
        return "regression"
    if not _binary(label):
        return "regression"
    labels = dataset_labels(dataset, label_name, read_items=False)
    if labels is not None and np.issubdtype(np.asarray(labels).dtype, np.number) and not _binary(labels):
        return "regression"
    return "multi_label_classification"


def _binary(values) -> bool:
    values = np.asarray(values, dtype=np.float64)
    present = values[~np.isnan(values)]
    return bool(np.all((present == 0) | (present == 1)))


def check_trainer_datasets(trainer, only: dict[str, Any] | None = None) -> None:
    """Check the labels of every dataset a [`HeadPrepTrainer`] holds (train, energy, eval), or of the datasets of
    `only` by name (e.g. a test split evaluated after training), against its head's class count (or the model
    config's `num_labels`) and problem type, before any training step."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    split = trainer.find_head()
    num_classes = (
        split.num_classes if split is not None else getattr(getattr(model, "config", None), "num_labels", None)
    )
    label_name, problem_type, ignore_index = trainer.label_key, trainer.problem_type, trainer.args.ignore_index
    datasets = [("train_dataset", trainer.train_dataset), ("energy_dataset", trainer.energy_dataset)]
    if isinstance(trainer.eval_dataset, dict):
        datasets += [(f"eval_dataset[{k!r}]", v) for k, v in trainer.eval_dataset.items()]
    elif trainer.eval_dataset is not None:
        datasets.append(("eval_dataset", trainer.eval_dataset))
    if only is not None:
        datasets = list(only.items())
    for name, dataset in datasets:
        if dataset is None:
            continue
        if callable(getattr(dataset, "check_samples", None)):  # the dataset checks its raw samples itself
            if num_classes is not None:
                dataset.check_samples(num_classes, name=name, ignore_index=ignore_index)
        elif problem_type != "single_label_classification":
            check_task_labels(dataset, num_classes, name, problem_type, label_name)
        elif num_classes is not None:
            check_dense_shapes(dataset, name, label_name)
            check_labels(dataset, num_classes, name, label_name, ignore_index)


def _named_datasets(trainer) -> list[tuple[str, object]]:
    named = [("train_dataset", trainer.train_dataset), ("energy_dataset", trainer.energy_dataset)]
    named.append(("drift_dataset", getattr(trainer, "drift_dataset", None)))
    if isinstance(trainer.eval_dataset, dict):
        named += [(f"eval_dataset[{k!r}]", v) for k, v in trainer.eval_dataset.items()]
    else:
        named.append(("eval_dataset", trainer.eval_dataset))
    return [(n, d) for n, d in named if d is not None]


def check_not_empty(trainer, evaluation: bool = True) -> None:
    """Raise `ValueError` naming the first of the trainer's datasets that has no sample (`evaluation=False`: not the
    evaluation sets, which `Trainer` takes empty)."""
    for name, dataset in _named_datasets(trainer):
        if not evaluation and name.startswith("eval_dataset"):
            continue
        if hasattr(dataset, "__len__") and not isinstance(dataset, torch.utils.data.IterableDataset):
            if len(dataset) == 0:
                raise ValueError(
                    f"{name} is empty (0 samples): check the data folder, split or filters that built it."
                )


def _default_collator(trainer) -> bool:
    """Whether the trainer batches items with transformers' default collators (dicts, key by key; "label" and
    "label_ids" as "labels"), not a collator of the user's own, which may take and build anything."""
    from transformers import DataCollatorWithPadding, DefaultDataCollator, default_data_collator

    collator = trainer.data_collator
    return collator is default_data_collator or isinstance(collator, (DefaultDataCollator, DataCollatorWithPadding))


def check_label_key(trainer, checked: bool) -> None:
    """Refuse, before training, a training set whose items hold no labels where the trainer's loss reads them
    (`checked`): `problem_type` set, cached HP, stage label smoothing, an overridden `loss_from_logits`. The error
    names the items' keys and the fix (a target under another name: `label_names`). Datasets served through a
    collator of the user's own are not looked at (it may build the labels).

    Not asked where a model whose forward takes no labels may return its own loss
    (`HeadPrepTrainer._may_take_own_loss`): a self-supervised objective, or `forward(x, target=None)`, which
    `Trainer` hands the target. Whether it returns a loss shows at its first step, where `compute_loss` names the
    same fix if it does not."""
    if not checked:  # (the trainer's loss computes no stage's loss of this call: `HeadPrepTrainer._checks_labels`)
        return
    keys = keys_without_labels(trainer, trainer.train_dataset)
    if keys is not None:
        raise ValueError(missing_labels_message(trainer.label_key, keys))


def missing_labels_message(label: str, keys, where: str = "train_dataset[0]") -> str:
    return (
        f"{where} holds no {label!r} (its keys: {sorted(keys)}), where the trainer's loss reads the labels "
        f"(label_names[0]). If the model computes its own loss from one of these keys (e.g. forward(x, target=None)), "
        "name it in label_names=[...]: the model then gets it and its loss is used, as with transformers.Trainer. "
        f"Otherwise give the labels under {label!r}, or name their key in label_names."
    )


def keys_without_labels(trainer, dataset) -> list[str] | None:
    """The keys of `dataset`'s first item where that item is a mapping holding no labels (`label_names[0]`, or
    "label"/"label_ids", which the default collators batch as "labels"); None where it holds them, is not a mapping,
    cannot be read, or goes through a collator of the user's own (which may build the labels, as
    `DataCollatorForLanguageModeling` does)."""
    if dataset is None or not _default_collator(trainer) or not trainer.label_names:
        return None
    item = trainer_first_item(trainer, dataset)
    if not isinstance(item, Mapping) or any(key in item for key in _label_keys(trainer.label_key)):
        return None
    return sorted(item)


def check_item_format(trainer) -> None:
    """Refuse, before training, datasets whose items Trainer's default collator cannot batch.

    `transformers.default_data_collator` (and `DataCollatorWithPadding`) batch dicts key by key; an item that is
    neither a mapping nor an object with attributes, e.g. an `(image, label)` tuple from a torchvision dataset, fails
    in the first batch with `vars() argument must have __dict__ attribute`. Here it fails up front with the format
    expected and the fix. Refused rather than converted: the item format is Trainer's contract (the same dataset works
    with both), and a tuple does not say under which name the model takes its input. Datasets served through a
    collator of the user's own are not looked at: that collator may take any item.
    """
    if not _default_collator(trainer):
        return
    for name, dataset in _named_datasets(trainer):
        if isinstance(getattr(dataset, "column_names", None), list):
            continue  # a datasets.Dataset: its items are dicts
        item = trainer_first_item(trainer, dataset)
        if item is None or isinstance(item, Mapping) or hasattr(item, "__dict__"):
            continue
        model = trainer.accelerator.unwrap_model(trainer.model)
        caller = trainer.model_caller
        input_name = getattr(model, "main_input_name", None)
        if not isinstance(input_name, str):
            # (a forward called by position takes any key: its argument's name, except timm's bare `x`)
            named = caller.param_names[0] if caller.param_names else "x"
            input_name = "pixel_values" if named == "x" and caller.positional else named
        label = trainer.label_key
        kinds = ", ".join(type(v).__name__ for v in item) if isinstance(item, (tuple, list)) else ""
        raise ValueError(
            f"{name}[0] is a {type(item).__name__}{f' ({kinds})' if kinds else ''}, but the default data collator "
            f"batches dicts: each item must be {{'{input_name}': <model input>, '{label}': <target>}} (the model's "
            f"input name and '{label}'). Return such a dict from the dataset's __getitem__, or pass a collator that "
            f"builds it from (input, target) pairs, e.g. data_collator=lambda batch: {{'{input_name}': "
            f"torch.stack([x for x, _ in batch]), '{label}': torch.tensor([y for _, y in batch])}}."
        )


def _shapes(item) -> dict[str, tuple]:
    if not isinstance(item, Mapping):
        return {}
    return {k: tuple(v.shape) for k, v in item.items() if hasattr(v, "shape") and len(getattr(v, "shape", ())) > 0}


def shape_mismatch_error(dataset, name: str, error: Exception) -> Exception:
    """For a batch that could not be stacked: a `ValueError` naming the first sample of `dataset` whose tensor shapes
    differ from sample 0's (read only now, on the error path), or `error` itself when none is found."""
    if not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
        return error
    with forked_rng():  # reading samples runs their augmentation
        first = _shapes(dataset[0])
        for i in range(1, min(len(dataset), _MAX_ITERATED)):
            shapes = _shapes(dataset[i])
            for key, shape in shapes.items():
                if key in first and shape != first[key]:
                    return ValueError(
                        f"{name}[{i}] has '{key}' of shape {shape} but {name}[0] has {first[key]}: samples of "
                        "one batch must have the same shape. Resize them to one size in the dataset's transform "
                        "(or pass a data_collator that pads)."
                    )
    return error


def single_sample_batch_error(trainer, error: Exception) -> Exception:
    """For BatchNorm's "Expected more than 1 value per channel when training": a `ValueError` saying that a training
    batch of one sample reached a BatchNorm layer in training mode (the last batch of an epoch when the training set
    size leaves a remainder of 1), with the fixes; `error` itself for any other error."""
    if "Expected more than 1 value per channel when training" not in str(error):
        return error
    args = trainer.args
    batch = args.train_batch_size * max(args.world_size, 1)  # (train_batch_size: per device x GPUs of DataParallel)
    try:
        n = len(trainer.train_dataset)
    except TypeError:
        n = None
    remainder = f" ({n} training samples leave {n % batch} for the last batch of {batch})" if n else ""
    return ValueError(
        f"A training batch of 1 sample reached a BatchNorm layer in training mode{remainder}: BatchNorm cannot "
        "normalise over one value per channel (e.g. DeepLabV3's ASPP pooling branch). Pick a "
        "per_device_train_batch_size that leaves no single sample, or set dataloader_drop_last=True (as torchvision's "
        "segmentation references do; transformers' Trainer then also drops the last partial batch of every "
        "evaluation, which the trainer reports)."
    )
