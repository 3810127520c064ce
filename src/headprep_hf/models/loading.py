"""Loading a pretrained timm backbone with a fresh task head of the requested size."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn
from safetensors import safe_open
from timm.models import load_state_dict

from ..files import read_json

__all__ = ["is_transformers_folder", "load_timm_model", "load_transformers_image_model"]

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# "owner/name" or "owner/name@revision"; anything else that is not on disk is not a Hub id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def load_timm_model(name_or_path: str, num_classes: int, arch: str | None = None, **kwargs: Any) -> nn.Module:
    """Builds a timm model with pretrained backbone weights and a new ``num_classes`` classifier.

    ``name_or_path`` may be:

    * a timm model on the Hugging Face Hub, e.g. ``timm/resnet50.a1_in1k`` (or ``hf-hub:timm/...``);
    * a local folder written by ``timm.models.save_for_hf`` (``config.json`` plus
      ``model.safetensors`` or ``pytorch_model.bin``), e.g. the output of ``pretrain_source_model``;
    * a local weights file (``.safetensors``, or ``.pth``/``.pt``/``.bin``/``.ckpt`` read with
      ``torch.load(weights_only=True)``), which needs ``arch`` to name the timm architecture;
    * a bare timm architecture name (e.g. ``resnet18``) only with ``pretrained=False``, for a
      deliberately random initialization.

    Whenever the checkpoint's classifier size differs from ``num_classes`` the old classifier is
    dropped and a freshly initialized one is built; all other tensors come from the checkpoint.

    Args:
        name_or_path: Hub id, local folder, local weights file or (with ``pretrained=False``) architecture name.
        num_classes: number of outputs of the new classifier.
        arch: timm architecture for a bare weights file (e.g. ``resnet18``); optional otherwise.
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``); ``pretrained=False``
            builds the architecture without loading any weights.

    Returns:
        The model, in train mode as timm builds it.

    Raises:
        ValueError: the argument cannot be resolved to weights; the message names the fix.
        FileNotFoundError: a local path that looks like a file or folder does not exist.
    """
    pretrained = kwargs.pop("pretrained", True)
    for reserved in ("pretrained_cfg_overlay", "num_classes"):
        if reserved in kwargs:
            raise ValueError(f"load_timm_model sets {reserved} itself; do not pass it in kwargs")
    model = _create(str(name_or_path), num_classes, arch, pretrained, kwargs)
    if not pretrained and getattr(model, "pretrained_cfg", None):
        # timm keeps the architecture's default `hf_hub_id` in a randomly initialised model's config; no weights came
        # from there, so model cards and prepared heads must not name it (`headprep_hf.cards.base_model_id`).
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "hf_hub_id": None}
    return model


def _create(name: str, num_classes: int, arch: str | None, pretrained: bool, kwargs: dict) -> nn.Module:
    # `name` resolved as `load_timm_model` documents: prefixes, a folder, a file, an architecture, a Hub id.
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)

    path = Path(name).expanduser()
    if path.is_dir():
        return _from_folder(path, num_classes, arch, pretrained, kwargs)
    if path.is_file():
        return _from_file(path, num_classes, arch, pretrained, kwargs)

    if timm.is_model(name) or _is_registered_with_tag(name):
        if pretrained is False:
            return timm.create_model(arch or name, pretrained=False, num_classes=num_classes, **kwargs)
        raise ValueError(
            f"model_name_or_path={name!r} is a bare timm architecture name, which carries no weights to "
            f"finetune. Pass a Hub id such as 'timm/{name}', a local folder or weights file (e.g. one saved with "
            "timm.models.save_for_hf), or, in Python, load_timm_model(name, pretrained=False) to train from a random "
            "initialization on purpose."
        )
    if _looks_like_path(name):
        raise FileNotFoundError(f"model_name_or_path={name!r} looks like a local path but does not exist")
    if _HUB_ID.match(name):
        if arch is not None:
            logger.warning("model_arch=%r is ignored: the Hub repo %r names its own architecture", arch, name)
        try:
            return timm.create_model("hf-hub:" + name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        except OSError as error:  # (huggingface_hub's not-found and offline errors are OSErrors)
            said = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise OSError(
                f"model_name_or_path={name!r} is not a local folder or file (none exists at {os.path.abspath(name)}), "
                f"and as a Hub id it could not be loaded ({said}). Offline: leave --model_name_or_path out for the "
                "offline MNIST-5k source model, or pass a local model folder (timm.models.save_for_hf) or a weights "
                "file with --model_arch; set HF_HUB_OFFLINE=1 so that Hub lookups fail at once instead of retrying."
            ) from error
    import difflib

    close = difflib.get_close_matches(name.lower(), timm.list_models(), n=3, cutoff=0.75)
    hint = f" (a close timm architecture: {', '.join(close)}; its Hub id is 'timm/<architecture>.<weights tag>')"
    raise ValueError(
        f"model_name_or_path={name!r} is neither an existing local folder/file, a Hub id like "
        f"'timm/resnet50.a1_in1k', nor a timm architecture name{hint if close else ''}"
    )


def _from_folder(path: Path, num_classes: int, arch: str | None, pretrained: bool, kwargs: dict) -> nn.Module:
    config_file = path / "config.json"
    if config_file.is_file():
        if is_transformers_folder(str(path)):
            # timm's local-dir loader would fail on it with a bare KeyError: 'architecture'.
            raise ValueError(
                f"model_name_or_path={str(path)!r} is a transformers model folder (its config.json has a model_type "
                "and no timm architecture); this needs a timm backbone (segmentation takes timm backbones only): "
                "pass a timm Hub id such as 'timm/resnet50.a1_in1k', a folder saved with timm.models.save_for_hf, "
                "or a weights file plus --model_arch"
            )
        saved_arch = read_json(config_file).get("architecture")
        if saved_arch is None:
            # (timm's local-dir loader fails on it with a bare KeyError: 'architecture')
            raise ValueError(
                f"model_name_or_path={str(path)!r}: its config.json names no timm architecture and no transformers "
                "model_type, so neither library can build the model from it. Pass a folder saved with "
                "timm.models.save_for_hf (its config.json has 'architecture') or with a transformers model's "
                "save_pretrained (its config.json has 'model_type'), a timm Hub id such as 'timm/resnet50.a1_in1k', "
                "or a weights file plus --model_arch."
            )
        if arch is not None and saved_arch is not None and arch.split(".")[0] != saved_arch.split(".")[0]:
            raise ValueError(
                f"model_arch={arch!r} contradicts architecture={saved_arch!r} in {config_file}; drop --model_arch"
            )
        # resolve() because timm's local-dir parser would misread a relative path with a colon in it.
        return timm.create_model(
            "local-dir:" + str(path.resolve()), pretrained=pretrained, num_classes=num_classes, **kwargs
        )
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(weights) == 1:
        return _from_file(weights[0], num_classes, arch, pretrained, kwargs)
    raise ValueError(
        f"model_name_or_path={str(path)!r} is a folder without config.json and with "
        f"{len(weights)} weight files; point it at a folder saved with timm.models.save_for_hf or at one weights file"
    )


def _from_file(path: Path, num_classes: int, arch: str | None, pretrained: bool, kwargs: dict) -> nn.Module:
    if arch is None:
        raise ValueError(
            f"model_name_or_path={str(path)!r} is a weights file, which does not record its architecture; "
            "pass --model_arch (arch=...) with the timm architecture name, e.g. resnet18"
        )
    if not (timm.is_model(arch) or _is_registered_with_tag(arch)):
        raise ValueError(f"model_arch={arch!r} is not a timm architecture; see timm.list_models()")
    if not pretrained:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    overlay = dict(file=str(path), num_classes=_checkpoint_num_classes(path, arch))
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs)


def _checkpoint_num_classes(path: Path, arch: str) -> int:
    """Number of classes of the classifier stored in ``path`` (0 when it has none).

    timm decides whether to keep the stored classifier by comparing the requested ``num_classes``
    with the registry's ``pretrained_cfg["num_classes"]`` (1000 for ImageNet archs), not with the
    file. Without this overlay a 10-class file loaded with ``num_classes=10`` silently gets a new
    random classifier, and the same file loaded with ``num_classes=1000`` fails on a shape mismatch.
    """
    cfg = timm.get_pretrained_cfg(arch)
    classifier = cfg.classifier if cfg is not None else None
    if not classifier:
        raise ValueError(f"model_arch={arch!r} names no classifier in its timm pretrained_cfg; cannot swap its head")
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    key = classifier + ".weight"
    if path.suffix == ".safetensors":
        # The header alone gives the shape; no need to read the weights twice.
        with safe_open(str(path), framework="pt") as f:
            shape = f.get_slice(key).get_shape() if key in f.keys() else None
    else:
        weight = load_state_dict(str(path), weights_only=True).get(key)
        shape = None if weight is None else tuple(weight.shape)
    # A headless checkpoint: any value != num_classes makes timm load non-strictly and keep its new head.
    return 0 if shape is None else int(shape[0])


def _is_registered_with_tag(name: str) -> bool:
    base, _, tag = name.partition(".")
    return bool(tag) and timm.is_model(base)


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "~", os.sep))
        or name.endswith(_WEIGHT_SUFFIXES)
        or name.endswith(".json")
        or (name.count("/") > 1 and "@" not in name)
    )


def is_transformers_folder(path: str) -> bool:
    """A local folder saved by transformers (`config.json` with a `model_type`), not by timm's `save_for_hf`.
    transformers' `TimmWrapper` models (a `timm/...` id loaded with `AutoModelForImageClassification`, then
    `save_pretrained`) hold both a `model_type` and timm's `architecture`: theirs is a transformers folder (its weights
    are under `timm_model.`, its `model_args` may be null), loaded as one."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    config = read_json(config_file)
    return "model_type" in config and ("architecture" not in config or config["model_type"] == "timm_wrapper")


def is_timm_wrapper_folder(path: str) -> bool:
    """A transformers `TimmWrapper` model folder: its image processor is timm's `pretrained_cfg` in its config.json."""
    config_file = Path(path) / "config.json"
    return config_file.is_file() and read_json(config_file).get("model_type") == "timm_wrapper"


def load_transformers_image_model(path: str, class_names: list[str]) -> nn.Module:
    """A transformers image classifier from a local folder, with a new head for `class_names` (`id2label` and
    `label2id` set, so the saved model names its classes). A folder of a bare backbone (no classification head) gets
    `AutoModelForImageClassification`'s head for its architecture."""
    from transformers import AutoModelForImageClassification

    id2label = {i: name for i, name in enumerate(class_names)}
    return AutoModelForImageClassification.from_pretrained(
        path,
        num_labels=len(class_names),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        ignore_mismatched_sizes=True,  # the folder's own head (other classes) is replaced, as in the HF example
    )
