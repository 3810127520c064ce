"""Self-describing outputs: what a saved model says about itself (class names, the data config it was trained with,
the prepared head it started from), so that it loads back with nothing else.

Where each fact lives is the owning library's place for it, so a model loaded back from our folder carries it where
it carried it during training:

* class names: a transformers model's `config.id2label` / `label2id`; a timm model's `pretrained_cfg["label_names"]`
  (with `pretrained_cfg["num_classes"]` equal to the model's, timm's own rule for when the names belong to the
  current classifier, see `timm.models._hub.save_config_for_hf`), which is exactly what
  `timm.create_model("local-dir:<folder>")` restores from a `config.json` holding `label_names`; any other model:
  the attribute `headprep_label_names`.
* the data config of a timm model (input size, interpolation, crop, mean/std as the recipe resolved them): the
  attribute `headprep_data_config`. Not written into `pretrained_cfg`: timm's exporter compares the exported input
  size with the model's source `pretrained_cfg` to know when the recorded `pool_size` no longer holds.
* the prepared head a model starts from (`load_prepared_head`): the attribute `headprep_prepared_head` (tau, HP
  settings, energy, where it came from), read by the finetuned model's card.

`write_timm_config` writes timm's `config.json` beside the weights the Trainer saved (`HeadPrepTrainer.save_model`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "is_timm_model",
    "model_data_config",
    "model_label_names",
    "prepared_head_record",
    "set_data_config",
    "set_label_names",
    "timm_rebuildable",
    "write_timm_config",
]

TIMM_CONFIG_NAME = "config.json"
_LABELS_ATTR = "headprep_label_names"
_DATA_CONFIG_ATTR = "headprep_data_config"
_PREPARED_HEAD_ATTR = "headprep_prepared_head"
# The data config keys timm's exporter takes (`resolve_input_data_config` args) and a loaded model's
# `resolve_model_data_config` gives back.
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def is_timm_model(model: nn.Module) -> bool:
    """A timm classifier (built by `timm.create_model`: a `pretrained_cfg` naming its architecture, `num_classes` and
    `reset_classifier`), which `timm.models.save_for_hf`'s config describes. A transformers `TimmWrapper` model is a
    `PreTrainedModel` (saved by `save_pretrained`) and is not one."""
    from transformers import PreTrainedModel

    cfg = getattr(model, "pretrained_cfg", None)
    return (
        not isinstance(model, PreTrainedModel)
        and isinstance(cfg, dict)
        and bool(cfg.get("architecture"))
        and hasattr(model, "num_classes")
        and callable(getattr(model, "reset_classifier", None))
    )


def timm_rebuildable(model: nn.Module) -> bool:
    """A timm model that `timm.create_model` rebuilds from its config: no `MLPHead` (`head_type="mlp"`) replaced
    its classifier, which is not part of any timm architecture."""
    from .heads import MLPHead

    return is_timm_model(model) and not any(isinstance(m, MLPHead) for m in model.modules())


def _default_transformers_labels(id2label: dict) -> bool:
    # PretrainedConfig fills id2label with LABEL_0, LABEL_1, ... when nobody named the classes.
    return all(str(name) == f"LABEL_{int(i)}" for i, name in id2label.items())


def model_label_names(model: nn.Module) -> list[str] | None:
    """The class names of `model`'s current classifier, in label order, or None when nothing names them (see the
    module docstring for where each kind of model keeps them)."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if id2label and not _default_transformers_labels(id2label):
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    if is_timm_model(model):
        cfg = model.pretrained_cfg
        names = cfg.get("label_names")
        # Names of the checkpoint's own classifier (e.g. ImageNet's) do not name a new head of another size.
        if names and cfg.get("num_classes") == model.num_classes and len(names) == model.num_classes:
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names, key=int)]
            return [str(n) for n in names]
        return None
    names = getattr(model, _LABELS_ATTR, None)
    return list(names) if names else None


def set_label_names(model: nn.Module, names: Sequence[str]) -> None:
    """Record the class names of `model`'s classifier (label `i` is `names[i]`) where its library keeps them, so the
    saved model and its prepared heads name their classes."""
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f"Class names must be unique, got {names}.")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "id2label"):
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
        if hasattr(config, "label_names"):  # (TimmWrapperConfig saves a label_names it was loaded with over id2label)
            config.label_names = list(names)
    elif is_timm_model(model):
        if len(names) != model.num_classes:
            raise ValueError(f"{len(names)} class names for a classifier of {model.num_classes} classes: {names}.")
        # A new dict: the source's pretrained_cfg is not changed for other models built from it.
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": tuple(names), "num_classes": len(names)}
        model.default_cfg = model.pretrained_cfg  # timm's alias of the same dict
    else:
        setattr(model, _LABELS_ATTR, names)


def set_data_config(model: nn.Module, data_config: dict[str, Any] | None) -> None:
    """Record the data config `model` is trained with (`resolve_image_data_config`'s result): what a saved timm
    model's `config.json` reports as its `pretrained_cfg` (input size, interpolation, crop_pct, mean/std)."""
    if data_config is None:
        return
    setattr(model, _DATA_CONFIG_ATTR, {k: data_config[k] for k in DATA_CONFIG_KEYS if k in data_config})


def model_data_config(model: nn.Module) -> dict[str, Any] | None:
    """The data config recorded by `set_data_config`, or None (a timm model's own `pretrained_cfg` then holds)."""
    config = getattr(model, _DATA_CONFIG_ATTR, None)
    return dict(config) if config else None


def record_prepared_head(model: nn.Module, config: dict[str, Any], source: str) -> None:
    """Remember on `model` the prepared head it now carries (`load_prepared_head`): the finetuned model's card
    reports the tau and HP settings it was probed with."""
    keys = (
        "tau",
        "hp_learning_rate",
        "hp_lr_scheduler_type",
        "hp_label_smoothing",
        "head_type",
        "reinit_modules",
        "energy",
    )
    setattr(model, _PREPARED_HEAD_ATTR, {"source": source, **{k: config.get(k) for k in keys}})


def restore_prepared_head_record(model: nn.Module, record: dict[str, Any]) -> None:
    """Put back on `model` a record `prepared_head_record` gave (a resumed run's: its checkpoint kept it)."""
    setattr(model, _PREPARED_HEAD_ATTR, dict(record))


def prepared_head_record(model: nn.Module) -> dict[str, Any] | None:
    """What `record_prepared_head` remembered, or None."""
    record = getattr(model, _PREPARED_HEAD_ATTR, None)
    return dict(record) if record else None


def write_timm_config(model: nn.Module, save_directory: str | os.PathLike) -> str | None:
    """Write timm's `config.json` for `model` into `save_directory`, beside the `model.safetensors` written there, so
    that `timm.create_model("local-dir:<folder>")` (and `load_timm_model`) rebuild the model with its weights,
    class names (`label_names`) and data config (`pretrained_cfg`: input size, interpolation, crop_pct, mean/std).

    Why not `timm.models.save_for_hf`: it writes the weights too, and the Trainer has just written them (with its
    distributed-state gathering, its safetensors metadata and our non-finite guard); writing them twice costs time and
    disk for large backbones. The config comes from timm's own writer that `save_for_hf` calls
    (`timm.models._hub.save_config_for_hf`, pinned by a canary test), through a temporary file and a rename.

    Returns the path written, or None when timm could not rebuild the model from a config (an `MLPHead` replaced its
    classifier: not a timm architecture; a warning says how to load it).
    """
    from timm.models._hub import save_config_for_hf

    if not is_timm_model(model):
        raise ValueError(f"write_timm_config needs a timm model (timm.create_model), got {type(model).__name__}.")
    if not timm_rebuildable(model):
        logger.warning(
            "Not writing timm's config.json into %s: the MLP head (head_type='mlp') is not part of the timm "
            "architecture %s, so timm.create_model could not rebuild the model from it. To load the weights, build "
            "timm.create_model(%r, num_classes=%d), call headprep_hf.replace_head_with_mlp on it with the run's "
            "mlp_hidden_size/mlp_num_layers, then load_state_dict(model.safetensors).",
            save_directory,
            model.pretrained_cfg.get("architecture"),
            model.pretrained_cfg.get("architecture"),
            model.num_classes,
        )
        return None
    names = model_label_names(model)
    path = os.path.join(os.fspath(save_directory), TIMM_CONFIG_NAME)
    tmp = path + ".tmp"
    save_config_for_hf(
        model,
        tmp,
        model_config={"label_names": names} if names else None,
        data_config=model_data_config(model),
    )
    os.replace(tmp, path)
    return path
