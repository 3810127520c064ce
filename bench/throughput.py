"""Training throughput of the image recipe's default pipeline: HeadPrepTrainer against the raw timm loop.

Four sides, alternated in one process (the order rotates every repeat), each on a fresh copy of the same seeded
weights, the same data, batch size and optimizer (AdamW, fused on CUDA):

* ``raw_timm``: the plain loop of timm's train.py: uint8 batch to the device, normalised there (timm's prefetcher
  arithmetic), channels_last, autocast, cross-entropy, backward, optimizer step. No gradient clipping, no logging.
* ``trainer``: a plain `transformers.Trainer` (cross-entropy on `model(pixel_values)`) with the recipe's loader and
  training settings.
* ``headprep_ft``: `HeadPrepTrainer.finetune()` with every measurement on (start-of-FT energy pass, drift on the
  probe set at each epoch end, head gradient norm every update) and the non-finite guard.
* ``headprep_hp``: `HeadPrepTrainer.probe_head()` without the feature cache (the uncached HP stage).

Data, each with the recipe's DEFAULT pipeline (`headprep_hf.data.build_image_transforms` from the model's data
config: RandomResizedCrop + flip + color jitter, uint8 out, normalised on the device by
`attach_input_normalization`; loader workers as `resolve_loader_settings` picks them):

* ``jpeg``: a folder of real JPEG files made from the photographs that ship with scikit-learn
  (`sklearn.datasets.load_sample_images`: random crops, sizes and flips), read through `datasets`' imagefolder;
  decoded and augmented in min(8, cores) persistent worker processes with pinned memory.
* ``memory``: uint8 tensors already at the input size, in memory (no decoding), loaded as the recipe's rule says
  (`recipe_num_workers`: 2 pinned workers, not persistent, on CUDA; the main process on the CPU; `--memory_workers N`).

`--task segmentation` runs the same four sides on the segmentation recipe's model and pipeline: DeepLabV3
(`TimmDeepLabV3`: dilated ResNet at output stride 8 with the ASPP head, 21 classes, per-pixel cross-entropy ignoring
255) over a PASCAL VOC 2012 layout of JPEG photographs with class-id masks (made from the same photographs: brightness
bands as classes, 255 between them) read by `load_voc_segmentation` (uint8: random scale in [0.5, 2], pad, crop,
flip; normalised on the device), and over uint8 tensors with masks in memory.

Throughput is measured in the steady state: from the end of step `--warmup` to the end of the last step (one device
synchronisation at each end; (c) times its drift passes by CUDA events, adding no synchronisation), so worker
start-up and the one-time start-of-FT measurements are outside it (printed beside it: their seconds and what they
are in epochs of (c)'s rate; (d)'s end of call after its window too); drift passes at epoch ends fall inside it. The
wall time of the whole call is reported beside it. The loader alone is timed too (images/s, and per worker). On
CUDA, one extra short run of `trainer` and `headprep_ft` counts the host synchronisations per step
(`torch.cuda.set_sync_debug_mode`).

Presets (`--device` picks; every value can be overridden; `--steps` counts the measured updates, after `--warmup`
updates for in-memory data and at least 4 x workers for JPEG, see `plan`):

* cpu: resnet10t at 64 px, batch 32, 12 measured steps, 3 repeats: runs anywhere in a few minutes;
  segmentation: DeepLabV3 on resnet10t, 64 px crops, batch 8, 8 measured steps.
* cuda: resnet50 at 224 px, bf16 autocast, channels_last, batch 256, 24 measured steps, 3 repeats;
  segmentation: DeepLabV3 on resnet50, 513 px crops (the paper's), bf16, batch 16, 12 measured steps.

Usage::

    python bench/throughput.py                      # CPU preset
    python bench/throughput.py --device cuda --json throughput_gpu.json
    python bench/throughput.py --device cuda --task segmentation --json throughput_gpu_seg.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from _common import machine_info, write_json
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from headprep_hf import HeadPrepConfig, HeadPrepTrainer
from headprep_hf.data import (
    attach_input_normalization,
    build_image_transforms,
    load_image_classification_dataset,
    normalize_uint8,
    resolve_image_data_config,
)
from headprep_hf.models import TimmDeepLabV3
from headprep_hf.tasks.base import COMMON_RECIPE_DEFAULTS, default_num_workers, recipe_num_workers

SIDES = ("raw_timm", "trainer", "headprep_ft", "headprep_hp")
# Not run by default: (c) with its measurements off (`track_dynamics=False`), which separates what the measurements
# cost from what the trainer's own update costs.
EXTRA_SIDES = ("headprep_ft_off",)
PRESETS = {
    ("cpu", "classification"): dict(
        arch="resnet10t", image_size=64, batch_size=32, steps=12, warmup=3, repeats=3, bf16=False
    ),
    ("cuda", "classification"): dict(
        arch="resnet50", image_size=224, batch_size=256, steps=24, warmup=6, repeats=3, bf16=True
    ),
    # DeepLabV3 (dilated ResNet, output stride 8, ASPP head: the recipe's `TimmDeepLabV3`), crops as the paper's 513.
    ("cpu", "segmentation"): dict(
        arch="resnet10t", image_size=64, batch_size=8, steps=8, warmup=3, repeats=3, bf16=False
    ),
    ("cuda", "segmentation"): dict(
        arch="resnet50", image_size=513, batch_size=16, steps=12, warmup=4, repeats=3, bf16=True
    ),
}
NUM_CLASSES = 10
SEGMENTATION_CLASSES = 21  # PASCAL VOC's
IGNORE_INDEX = 255


# ----------------------------------------------------------------------------------------------------------- data
def _write_jpegs(job: tuple[str, int, int, int]) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder, start, count, seed = job
    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 427 x 640 RGB photographs
    rng = random.Random(seed)
    for i in range(start, start + count):
        photo = photos[i % len(photos)]
        w, h = rng.randint(200, 427), rng.randint(200, 427)
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        image = photo.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        side = rng.randint(256, 400)
        image = image.resize((side, int(side * h / w)))
        label = i % NUM_CLASSES
        image.save(os.path.join(folder, f"class_{label}", f"{i}.jpg"), quality=90)


def _write_voc_pairs(job: tuple[str, int, int, int]) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder, start, count, seed = job
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = random.Random(seed)
    voc = Path(folder) / "VOCdevkit" / "VOC2012"
    for i in range(start, start + count):
        photo = photos[i % len(photos)]
        w, h = rng.randint(300, 427), rng.randint(300, 427)
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        image = photo.crop((x, y, x + w, y + h))
        side = rng.randint(400, 500)  # VOC images are about 500 px on the long side
        image = image.resize((side, int(side * h / w)))
        # Class ids from brightness bands (a VOC-like palette PNG of ids), with a 255 border between bands.
        grey = np.asarray(image.convert("L"), dtype=np.int64)
        ids = (grey * SEGMENTATION_CLASSES // 256).astype(np.uint8)
        border = np.zeros_like(ids, dtype=bool)
        border[1:, :] |= ids[1:, :] != ids[:-1, :]
        border[:, 1:] |= ids[:, 1:] != ids[:, :-1]
        ids[border] = IGNORE_INDEX
        name = f"{i:06d}"
        image.save(voc / "JPEGImages" / f"{name}.jpg", quality=90)
        Image.fromarray(ids).save(voc / "SegmentationClass" / f"{name}.png")


def make_voc_folder(root: Path, n: int, workers: int) -> Path:
    """A PASCAL VOC 2012 layout (`VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation}`) of `n`
    JPEG photographs (400-500 px crops of scikit-learn's sample photographs) with class-id masks, all in `train.txt`
    (and the first 2 in `val.txt`), for the recipe's `load_voc_segmentation`."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    chunk = -(-n // workers)
    jobs = [(str(root), s, min(chunk, n - s), s) for s in range(0, n, chunk)]
    with Pool(workers) as pool:
        pool.map(_write_voc_pairs, jobs)
    names = [f"{i:06d}" for i in range(n)]
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names[:2]) + "\n")
    return root


def make_jpeg_folder(root: Path, n: int, workers: int) -> Path:
    """`n` JPEG files (256-400 px wide crops of scikit-learn's sample photographs) in NUM_CLASSES class folders."""
    for label in range(NUM_CLASSES):
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
    chunk = -(-n // workers)
    jobs = [(str(root), s, min(chunk, n - s), s) for s in range(0, n, chunk)]
    with Pool(workers) as pool:
        pool.map(_write_jpegs, jobs)
    return root


class MemoryImages(torch.utils.data.Dataset):
    """uint8 images at the input size, in memory, as the recipe's transforms would hand them over; with `masks`, a
    class-id mask per image (segmentation) instead of one label."""

    def __init__(self, n: int, size: int, seed: int = 0, masks: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        if masks:  # horizontal bands of classes, as the JPEG folder's brightness bands
            rows = torch.randint(0, SEGMENTATION_CLASSES, (n, size, 1), generator=g)
            self.labels = rows.expand(n, size, size).contiguous()
        else:
            self.labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        label = self.labels[i] if self.labels.dim() > 1 else int(self.labels[i])
        return {"pixel_values": self.x[i], "labels": label}


def plan(opts, data_name: str) -> argparse.Namespace:
    """The run settings of one data source: `steps` = warm-up + the measured updates. Loader workers fill a buffer of
    `prefetch_factor` (2) batches each while the first updates run (cudnn autotuning on a GPU); the JPEG runs warm up
    until that buffer has been drained twice, so the measured updates see the loader's steady rate, not the buffer."""
    workers = _workers(opts, data_name)
    warmup = max(opts.warmup, 2 * 2 * workers)
    return argparse.Namespace(**{**vars(opts), "warmup": warmup, "steps": warmup + opts.steps})


def build_datasets(opts, data_config: dict, tmp: Path) -> dict[str, Any]:
    if opts.task == "segmentation":
        return build_segmentation_datasets(opts, data_config, tmp)
    n_memory = plan(opts, "memory").steps * opts.batch_size
    memory = MemoryImages(n_memory, data_config["input_size"][-1])
    if "jpeg" not in opts.data:
        return {"memory": memory}
    n = plan(opts, "jpeg").steps * opts.batch_size
    t = time.perf_counter()
    make_jpeg_folder(tmp / "train", n, max(1, os.cpu_count() or 1))
    make_jpeg_folder(tmp / "val", NUM_CLASSES * 2, 1)
    made = time.perf_counter() - t
    splits, _ = load_image_classification_dataset(
        None,
        str(tmp / "train"),
        str(tmp / "val"),
        train_transform=build_image_transforms(data_config, is_training=True),
        eval_transform=build_image_transforms(data_config, is_training=False),
        cache_dir=str(tmp / "hf_cache"),
    )
    print(f"jpeg folder: {n} files made in {made:.1f} s, indexed in {time.perf_counter() - t - made:.1f} s")
    return {"jpeg": splits["train"], "memory": memory}


def build_segmentation_datasets(opts, data_config: dict, tmp: Path) -> dict[str, Any]:
    """The segmentation recipe's real-data pipeline over a VOC-layout folder (`load_voc_segmentation`, uint8 out:
    resize by a random scale in [0.5, 2], pad, random crop, flip; the model normalises on its device), and uint8
    tensors with masks in memory."""
    from headprep_hf.data.segmentation import load_voc_segmentation

    crop = data_config["input_size"][-1]
    n_memory = plan(opts, "memory").steps * opts.batch_size
    memory = MemoryImages(n_memory, crop, masks=True)
    if "jpeg" not in opts.data:
        return {"memory": memory}
    # load_voc_segmentation holds 10% of train out for validation: write enough for the run's batches.
    n = math.ceil(plan(opts, "jpeg").steps * opts.batch_size / 0.9) + 1
    t = time.perf_counter()
    make_voc_folder(tmp / "voc", n, max(1, os.cpu_count() or 1))
    made = time.perf_counter() - t
    splits = load_voc_segmentation(
        str(tmp / "voc"), crop, data_config["mean"], data_config["std"], normalize=False, seed=0
    )
    print(f"VOC-layout folder: {n} JPEG + mask pairs made in {made:.1f} s ({len(splits['train'])} for training)")
    return {"jpeg": splits["train"], "memory": memory}


# ---------------------------------------------------------------------------------------------------- the sides
def task_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a classifier's logits, or per pixel of a segmentation model's `{"out": logits}` (255 ignored,
    as the segmentation recipe's `ignore_index`)."""
    if isinstance(outputs, dict):
        return F.cross_entropy(outputs["out"], labels.long(), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(outputs, labels.long())


class PlainTrainer(Trainer):
    """A plain Trainer on a timm model (or the recipe's DeepLabV3): cross-entropy on `model(pixel_values)` (timm takes
    one positional tensor)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(inputs["pixel_values"])
        loss = task_loss(outputs, inputs["labels"])
        return (loss, outputs if isinstance(outputs, dict) else {"logits": outputs}) if return_outputs else loss


class Clock:
    """Steady-state clock: starts after step `warmup`, stops at the end; one device sync at each end.

    With `Clock.profile_activities` set (`--profile`), a `torch.profiler` records the same window; the last one is
    left in `Clock.last_profile`."""

    profile_activities: list | None = None
    last_profile = None

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.t0 = self.t1 = None
        self.steps = 0
        self.profiler = None
        self.marks: list[float] = []  # host time at each measured update's end (no sync: where the host waited)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, step: int) -> None:
        self.steps = step
        if step == self.warmup:
            self._sync()
            if self.profile_activities is not None:
                self.profiler = torch.profiler.profile(activities=self.profile_activities)
                self.profiler.start()
            self.t0 = time.perf_counter()
        elif self.t0 is not None and self.t1 is None:
            self.marks.append(time.perf_counter())

    def stop(self) -> None:
        self._sync()
        self.t1 = time.perf_counter()
        if self.profiler is not None:
            self.profiler.stop()
            Clock.last_profile, self.profiler = self.profiler, None


class ClockCallback(TrainerCallback):
    def __init__(self, clock: Clock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.clock.stop()


def _workers(opts, data_name: str) -> int:
    """Loader workers of a data source on every side: `--workers` for JPEG, `--memory_workers` for in-memory tensors,
    each by default the recipe's rule (`recipe_num_workers`: min(8, cores) for files; for in-memory tensors 2 on a
    CUDA device, the main process on the CPU)."""
    given = opts.workers if data_name == "jpeg" else getattr(opts, "memory_workers", None)
    return recipe_num_workers(data_name == "jpeg", torch.device(opts.device)) if given is None else given


def _loader_settings(opts, data_name: str) -> dict[str, Any]:
    workers = _workers(opts, data_name)
    return dict(
        dataloader_num_workers=workers,
        # The recipe's: persistent workers for files only (`resolve_loader_settings`); in-memory workers start anew
        # each epoch, seeded from the random state at its start (an exact epoch-end resume).
        dataloader_persistent_workers=workers > 0
        and (data_name == "jpeg" or getattr(opts, "memory_persistent_workers", False)),
        dataloader_pin_memory=True,
        # As the raw loop (timm's train.py and torchvision's segmentation references drop it): a last batch of one
        # sample cannot train DeepLabV3's ASPP pooling BatchNorm.
        dataloader_drop_last=True,
    )


def _training_args(opts, data_name: str, output_dir: str, cls=TrainingArguments, **extra):
    return cls(
        output_dir=output_dir,
        per_device_train_batch_size=opts.batch_size,
        learning_rate=1e-3,
        max_steps=opts.steps if cls is TrainingArguments else -1,
        num_train_epochs=1,
        bf16=opts.bf16,
        use_cpu=opts.device == "cpu",
        optim="adamw_torch_fused" if opts.device == "cuda" else "adamw_torch",
        lr_scheduler_type="constant",
        logging_steps=opts.logging_steps,
        # The recipe's settings (COMMON_RECIPE_DEFAULTS): no host sync per step.
        logging_nan_inf_filter=COMMON_RECIPE_DEFAULTS["logging_nan_inf_filter"],
        accelerator_config={**COMMON_RECIPE_DEFAULTS["accelerator_config"], "non_blocking": opts.device == "cuda"},
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **_loader_settings(opts, data_name),
        **extra,
    )


def run_raw(opts, model, dataset, data_name, data_config) -> dict[str, float]:
    device = torch.device(opts.device)
    model = model.to(device).train()
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)  # timm's train.py converts the model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    settings = _loader_settings(opts, data_name)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=opts.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=settings["dataloader_num_workers"],
        persistent_workers=settings["dataloader_persistent_workers"],
        pin_memory=device.type == "cuda",
        collate_fn=default_data_collator,
    )
    shape = (1, 3, 1, 1)
    mean = torch.tensor(data_config["mean"], device=device).view(shape)
    std = torch.tensor(data_config["std"], device=device).view(shape)
    clock = Clock(device, opts.warmup)
    start = time.perf_counter()
    step = 0
    while step < opts.steps:
        for batch in loader:
            x = batch["pixel_values"].to(device, non_blocking=True)
            y = batch["labels"].to(device, non_blocking=True)
            x = normalize_uint8(x, mean, std, channels_last=opts.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.bf16):
                loss = task_loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            clock.step(step)
            # An update that ends the loader's epoch lets the loop end it, as timm's train.py does every epoch: then
            # the window holds the loader's end (workers that do not persist are shut down there), as Trainer's does
            # (Accelerate's loader reads one batch ahead, so its end falls inside the epoch's last update).
            if step == opts.steps and step % len(loader):
                break
    clock.stop()
    return _result(opts, clock, time.perf_counter() - start)


def _prepare(model, data_config, opts):
    return attach_input_normalization(model, data_config["mean"], data_config["std"], channels_last=opts.channels_last)


def run_trainer(opts, model, dataset, data_name, data_config, tmp, sync_debug=False) -> dict[str, float]:
    # remove_unused_columns=False: timm's forward(x) names no `pixel_values`, which Trainer would drop.
    args = _training_args(opts, data_name, str(tmp / "trainer"), remove_unused_columns=False)
    clock = Clock(torch.device(opts.device), opts.warmup)
    trainer = PlainTrainer(
        model=_prepare(model, data_config, opts), args=args, train_dataset=dataset, callbacks=[ClockCallback(clock)]
    )
    return _timed(opts, clock, trainer.train, sync_debug)


def run_headprep(
    opts, model, dataset, data_name, data_config, tmp, stage, sync_debug=False, measure=True
) -> dict[str, float]:
    args = _training_args(
        opts,
        data_name,
        str(tmp / f"headprep_{stage}"),
        cls=HeadPrepConfig,
        hp_epochs=1,
        hp_learning_rate=1e-2,
        hp_cache_features=False,
        track_dynamics=measure,  # drift probe at its default size (min(256, max(64, n // 16)) training samples)
        ignore_index=IGNORE_INDEX,
        overwrite_output_dir=True,
        save_total_limit=None,
    )
    clock = Clock(torch.device(opts.device), opts.warmup)
    trainer = HeadPrepTrainer(
        model=_prepare(model, data_config, opts), args=args, train_dataset=dataset, callbacks=[ClockCallback(clock)]
    )
    # The drift passes inside the measured window (the epoch end's): timed so that their share can be reported. The
    # window is one short epoch, so the per-epoch drift pass weighs far more here than in a run of realistic epochs.
    # On CUDA by events on the device's queue, read after the window: a host synchronisation at each end of the pass
    # (as before) made the GPU idle while the host fetched the probe's first batch, a cost of the bench, not of (c).
    drift = {"seconds": 0.0, "events": []}
    measure_drift = trainer.measurements.measure_drift

    def timed_drift(*a, **k):
        inside = clock.t0 is not None and clock.t1 is None
        if not inside:
            return measure_drift(*a, **k)
        if clock.device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            try:
                return measure_drift(*a, **k)
            finally:
                end.record()
                drift["events"].append((begin, end))
        t0 = time.perf_counter()
        try:
            return measure_drift(*a, **k)
        finally:
            drift["seconds"] += time.perf_counter() - t0

    trainer.measurements.measure_drift = timed_drift
    # The one-time start-of-FT measurements (energy, HP accuracy and p0 over the training set, z_0 of the probe):
    # finetune() runs them before its first update, outside the window; probe_head() after its last, also outside.
    # Timed so that what the window leaves out is printed beside it (a cold finetune() makes them by a backbone pass
    # over the training set; train() with HP takes them from the last HP epoch's head inputs instead).
    start = {"seconds": 0.0}
    measure_start = trainer.measurements.measure_start

    def timed_start(*a, **k):
        t0 = time.perf_counter()
        try:
            return measure_start(*a, **k)
        finally:
            start["seconds"] += time.perf_counter() - t0

    trainer.measurements.measure_start = timed_start
    result = _timed(opts, clock, trainer.finetune if stage == "ft" else trainer.probe_head, sync_debug)
    if drift["events"]:
        torch.cuda.synchronize(clock.device)
        drift["seconds"] += sum(begin.elapsed_time(end) for begin, end in drift["events"]) / 1000
    if "samples_per_s" in result:
        result["start_measurements_s"] = start["seconds"]
        window = (result["steps"] - opts.warmup) * opts.batch_size / result["samples_per_s"]
        result["drift_share_of_window"] = drift["seconds"] / window
        result["samples_per_s_without_drift"] = result["samples_per_s"] / max(
            1e-9, 1 - result["drift_share_of_window"]
        )
        result["drift_probe_samples"] = trainer.dynamics.get("num_probe_samples")
    return result


def _timed(opts, clock, train, sync_debug: bool) -> dict[str, float]:
    if not sync_debug:
        start = time.perf_counter()
        train()
        end = time.perf_counter()
        # (after the clock stopped: the end of the call, e.g. probe_head()'s BatchNorm pass, measurements and
        # prepared head, which (d)'s window leaves out)
        return {**_result(opts, clock, end - start), "after_window_s": end - clock.t1}
    # Count the synchronising CUDA calls per step in the steady state (warnings from torch's sync debug mode).
    counts = {"syncs": 0}
    original = clock.step

    def step(n: int) -> None:
        original(n)
        if n == opts.warmup:
            torch.cuda.set_sync_debug_mode("warn")

    clock.step = step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            train()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counts["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    steps = max(1, clock.steps - opts.warmup)
    return {"syncs_per_step": counts["syncs"] / steps, "steps": steps}


def _result(opts, clock: Clock, wall: float) -> dict[str, float]:
    steady_steps = clock.steps - opts.warmup
    samples_per_s = steady_steps * opts.batch_size / (clock.t1 - clock.t0)
    # Host time between consecutive update ends (the last one to the clock's stop holds the run's end: the epoch-end
    # passes). Without a sync these show where the host waited: evenly spread, or one long stall.
    marks = [clock.t0, *clock.marks, clock.t1]
    step_ms = [round(1e3 * (b - a), 2) for a, b in zip(marks, marks[1:])]
    return {"samples_per_s": samples_per_s, "wall_s": wall, "steps": clock.steps, "step_ms": step_ms}


def describe_steps(step_ms: list[float]) -> str:
    """The host intervals of one run in a few numbers: median, the slowest (with its position) and the last."""
    if len(step_ms) < 2:
        return ""
    body = step_ms[:-1]
    slow = max(range(len(body)), key=body.__getitem__)
    return (
        f"; host ms per update: median {statistics.median(body):.1f}, slowest {body[slow]:.1f} (#{slow + 1}), "
        f"last + end {step_ms[-1]:.1f}"
    )


def time_loader(opts, dataset) -> dict[str, float]:
    """The JPEG loader alone: images/s over one pass after the first batch, and per worker."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=opts.batch_size,
        shuffle=True,
        num_workers=opts.workers,
        pin_memory=opts.device == "cuda",
        collate_fn=default_data_collator,
    )
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch["labels"])
    rate = n / (time.perf_counter() - start)
    return {"images_per_s": rate, "workers": opts.workers, "images_per_s_per_worker": rate / max(1, opts.workers)}


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with the device's preset filled in, and the loader workers the recipe's rule gives."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--task",
        choices=["classification", "segmentation"],
        default="classification",
        help="classification: a timm classifier on a JPEG class folder; segmentation: the recipe's DeepLabV3 on a "
        "VOC-layout folder of JPEG + mask pairs",
    )
    for key in ("arch",):
        parser.add_argument(f"--{key}")
    for key in ("image_size", "batch_size", "steps", "warmup", "repeats", "workers"):
        parser.add_argument(f"--{key}", type=int)
    parser.add_argument("--data", nargs="+", choices=["jpeg", "memory"], default=["jpeg", "memory"])
    parser.add_argument("--sides", nargs="+", choices=SIDES + EXTRA_SIDES, default=list(SIDES))
    parser.add_argument(
        "--memory_workers",
        type=int,
        default=None,
        help="Loader workers (pinned, not persistent, as the recipe's) for the in-memory data on every side; "
        "default: the recipe's rule (2 on a CUDA device, 0 = the main process on the CPU). With workers the next "
        "batches are collated and pinned while the device is busy, also across the logging steps' host "
        "synchronisations.",
    )
    parser.add_argument(
        "--memory_persistent_workers",
        action="store_true",
        help="Keep the in-memory data's loader workers between epochs (the recipe's do not: an exact epoch-end "
        "resume); to measure what starting them anew costs.",
    )
    parser.add_argument(
        "--logging_steps",
        type=int,
        default=COMMON_RECIPE_DEFAULTS["logging_steps"],
        help="Trainer sides: log (and read the loss and gradient norm from the device) every N updates; the recipes' "
        "value by default. A large N shows what the logging steps' host synchronisations cost.",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="Instead of timing repeats: run each side once over N measured updates under torch.profiler and print, "
        "per update, the wall time, the time inside operators (device kernels on CUDA, main-thread operators on the "
        "CPU) and the operators (CUDA: kernels) whose time differs most from the raw loop's.",
    )
    parser.add_argument("--json", help="Write the raw results here.")
    opts = parser.parse_args(argv)
    for key, value in PRESETS[opts.device, opts.task].items():
        if getattr(opts, key, None) is None:
            setattr(opts, key, value)
    if opts.workers is None:
        opts.workers = default_num_workers()
    if opts.memory_workers is None:
        opts.memory_workers = _workers(opts, "memory")  # the recipe's rule, recorded in the JSON's settings
    return opts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse_args(argv)
    opts.channels_last = True  # the recipe's default for convolutional backbones
    if opts.device == "cuda":
        torch.backends.cudnn.benchmark = True
    model_name = opts.arch if opts.task == "classification" else f"DeepLabV3 ({opts.arch}, output stride 8)"
    print(
        f"{opts.device} {opts.task}: {model_name} at {opts.image_size} px, batch {opts.batch_size}, "
        f"{opts.steps} measured steps "
        f"after {plan(opts, 'memory').warmup} (memory) / {plan(opts, 'jpeg').warmup} (jpeg) warm-up steps, "
        f"bf16={opts.bf16}, channels_last, {opts.workers} loader workers for JPEG, {opts.memory_workers} for memory"
    )

    torch.manual_seed(0)
    if opts.task == "segmentation":
        base = TimmDeepLabV3(opts.arch, SEGMENTATION_CLASSES, output_stride=8)
        cfg = base.backbone.pretrained_cfg  # the recipe's rule: the backbone's mean/std, the crop as input size
        data_config = dict(
            mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), input_size=(3, opts.image_size, opts.image_size)
        )
    else:
        base = timm.create_model(opts.arch, pretrained=False, num_classes=NUM_CLASSES)
        data_config = resolve_image_data_config(base, image_size=opts.image_size)
    print(f"data config {data_config}")
    if opts.profile:
        opts.steps, opts.repeats = opts.profile, 0
    results: dict[str, dict[str, list[dict]]] = {d: {s: [] for s in opts.sides} for d in opts.data}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        datasets = build_datasets(opts, data_config, tmp)
        loader = time_loader(opts, datasets["jpeg"]) if "jpeg" in opts.data else None
        if loader:
            print(
                f"loader alone: {loader['images_per_s']:.0f} img/s, {loader['images_per_s_per_worker']:.0f} per worker"
            )
        runners = {
            "raw_timm": lambda m, d, n, o: run_raw(o, m, d, n, data_config),
            "trainer": lambda m, d, n, o: run_trainer(o, m, d, n, data_config, tmp),
            "headprep_ft": lambda m, d, n, o: run_headprep(o, m, d, n, data_config, tmp, "ft"),
            "headprep_hp": lambda m, d, n, o: run_headprep(o, m, d, n, data_config, tmp, "hp"),
            "headprep_ft_off": lambda m, d, n, o: run_headprep(o, m, d, n, data_config, tmp, "ft", measure=False),
        }
        for rep in range(opts.repeats):
            order = opts.sides[rep % len(opts.sides) :] + opts.sides[: rep % len(opts.sides)]
            for data_name in opts.data:
                for side in order:
                    result = runners[side](copy.deepcopy(base), datasets[data_name], data_name, plan(opts, data_name))
                    results[data_name][side].append(result)
                    print(
                        f"rep {rep} {data_name:6s} {side:15s} {result['samples_per_s']:8.1f} samples/s "
                        f"(whole call {result['wall_s']:.1f} s{describe_steps(result.get('step_ms', []))})",
                        flush=True,
                    )
                    gc.collect()  # shut the run's loader workers down here, outside the next run's clock
            if opts.json:  # what is measured so far survives a time limit that stops the later repeats
                summary = summarize(results, datasets, echo=False)
                write_json(opts.json, payload(opts, data_config, loader, {}, results, summary, rep + 1))
        if opts.profile:
            profiles = profile_sides(opts, base, datasets, runners)
            result = {**payload(opts, data_config, loader, {}, results, {}, 0), "profile": profiles}
            if opts.json:
                write_json(opts.json, result)
            return result
        syncs = {}
        if opts.device == "cuda" and "memory" in opts.data:
            for side, run in (
                ("trainer", lambda: run_trainer(plan(opts, "memory"), copy.deepcopy(base), datasets["memory"],
                                                "memory", data_config, tmp, sync_debug=True)),
                ("headprep_ft", lambda: run_headprep(plan(opts, "memory"), copy.deepcopy(base), datasets["memory"],
                                                     "memory", data_config, tmp, "ft", sync_debug=True)),
            ):  # fmt: skip
                if side not in opts.sides:
                    continue
                syncs[side] = run()
                print(f"host syncs per step, {side}: {syncs[side]['syncs_per_step']:.2f}")

    summary = summarize(results, datasets, echo=True)
    result = payload(opts, data_config, loader, syncs, results, summary, opts.repeats)
    if opts.json:
        write_json(opts.json, result)
    return result


def profile_sides(opts, base, datasets, runners) -> dict[str, Any]:
    """`--profile N`: each side once per data source with the profiler over its N measured updates (the same window
    the clock times); per update, where the time goes and how each side differs from the raw loop."""
    from torch.profiler import ProfilerActivity

    cuda = opts.device == "cuda"
    Clock.profile_activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiles: dict[str, Any] = {}
    try:
        for data_name in opts.data:
            profiles[data_name] = {}
            for side in opts.sides:
                Clock.last_profile = None
                run = runners[side](copy.deepcopy(base), datasets[data_name], data_name, plan(opts, data_name))
                gc.collect()
                updates = run["steps"] - plan(opts, data_name).warmup
                window = updates * opts.batch_size / run["samples_per_s"]
                try:
                    profiles[data_name][side] = profile_summary(Clock.last_profile, updates, window, cuda)
                except Exception as error:  # keep the profiler's own table: a device run is not to be wasted
                    table = Clock.last_profile.key_averages().table(sort_by="self_device_time_total", row_limit=40)
                    profiles[data_name][side] = {"error": repr(error), "table": table}
                    print(f"{data_name} {side}: {error!r}\n{table}")
            print_profiles(data_name, profiles[data_name])
    finally:
        Clock.profile_activities = None
    return profiles


def profile_summary(prof, updates: int, window_s: float, cuda: bool) -> dict[str, Any]:
    """Per update: the window's wall time, the time inside operators, and each operator's time and calls. On CUDA the
    entries are the device's kernels and copies (their sum is the device's busy time; the rest of the wall time the
    device waited); on the CPU the main thread's operators by self time."""
    from torch.autograd import DeviceType

    events = prof.key_averages()

    def collect(keep, micros_of) -> dict[str, dict[str, float]]:
        found = {}
        for event in events:
            micros = micros_of(event) if keep(event) else 0
            if micros > 0:
                found[event.key] = {"ms_per_update": micros / 1e3 / updates, "calls_per_update": event.count / updates}
        return found

    if cuda:
        device_time = lambda e: getattr(e, "self_device_time_total", 0)  # noqa: E731
        ops = collect(lambda e: e.device_type == DeviceType.CUDA, device_time)
        if not ops:  # (a profiler that lists no kernels on their own: the device time of the operators that ran them)
            ops = collect(lambda e: True, device_time)
    else:
        ops = collect(lambda e: True, lambda e: e.self_cpu_time_total)
    busy = sum(op["ms_per_update"] for op in ops.values())
    wall = 1e3 * window_s / updates
    return {"updates": updates, "wall_ms_per_update": wall, "busy_ms_per_update": busy, "busy_share": busy / wall,
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["ms_per_update"]))}  # fmt: skip


def profile_differences(side: dict, raw: dict, top: int = 12) -> list[dict[str, Any]]:
    """The operators whose time per update differs most between `side` and the raw loop, largest first."""
    names = set(side["ops"]) | set(raw["ops"])
    zero = {"ms_per_update": 0.0, "calls_per_update": 0.0}
    rows = []
    for name in names:
        a, b = raw["ops"].get(name, zero), side["ops"].get(name, zero)
        rows.append({"op": name, "ms_per_update": b["ms_per_update"] - a["ms_per_update"],
                     "calls_per_update": b["calls_per_update"] - a["calls_per_update"]})  # fmt: skip
    return sorted(rows, key=lambda r: -abs(r["ms_per_update"]))[:top]


def print_profiles(data_name: str, sides: dict[str, dict]) -> None:
    sides = {side: p for side, p in sides.items() if "ops" in p}
    raw = sides.get("raw_timm")
    for side, p in sides.items():
        print(
            f"\n{data_name} {side}: {p['wall_ms_per_update']:.1f} ms per update, {p['busy_ms_per_update']:.1f} ms "
            f"inside operators ({100 * p['busy_share']:.0f}%); the largest:"
        )
        for name, op in list(p["ops"].items())[:8]:
            print(f"  {op['ms_per_update']:8.2f} ms  {op['calls_per_update']:6.1f} calls  {name[:100]}")
        if raw is not None and side != "raw_timm":
            p["differences_from_raw_timm"] = profile_differences(p, raw)
            print("  differences from raw_timm, per update:")
            for row in p["differences_from_raw_timm"]:
                print(f"  {row['ms_per_update']:+8.2f} ms  {row['calls_per_update']:+6.1f} calls  {row['op'][:100]}")


def summarize(results: dict, datasets: dict, echo: bool) -> dict[str, Any]:
    """Medians, ranges, ratios to the raw loop (of medians, and the median of per-repeat ratios) and the drift pass's
    share of (c)'s window; printed when `echo`."""
    say = print if echo else (lambda *a, **k: None)
    summary = {}
    repeats = max(len(runs) for sides in results.values() for runs in sides.values())
    say(
        f"\nmedian samples/s over {repeats} repeats [range]; ratio of "
        "medians to raw_timm; and the median of the per-repeat ratios (each side against the raw loop of the same "
        "repeat, which ran next to it)"
    )
    for data_name, sides in results.items():
        medians = {s: statistics.median(r["samples_per_s"] for r in runs) for s, runs in sides.items() if runs}
        ref = medians.get("raw_timm")
        summary[data_name] = {}
        for s, m in medians.items():
            rates = [r["samples_per_s"] for r in sides[s]]
            raw = [r["samples_per_s"] for r in sides.get("raw_timm", [])]
            paired = statistics.median(a / b for a, b in zip(rates, raw)) if raw else None
            summary[data_name][s] = {
                "median_samples_per_s": m,
                "range": [min(rates), max(rates)],
                "ratio_to_raw_timm": (m / ref if ref else None),
                "paired_ratio_to_raw_timm": paired,
            }
            ratio = f"{m / ref:.3f}" if ref else "-"
            pair = f"{paired:.3f}" if paired is not None else "-"
            say(f"  {data_name:6s} {s:15s} {m:9.1f} [{min(rates):.1f}-{max(rates):.1f}]   x{ratio}   paired x{pair}")
            shares = [r["drift_share_of_window"] for r in sides[s] if "drift_share_of_window" in r]
            outside = [r["start_measurements_s"] for r in sides[s] if "start_measurements_s" in r]
            if s in ("headprep_ft", "headprep_hp") and outside:
                n, seconds = len(datasets[data_name]), statistics.median(outside)
                after = statistics.median(r["after_window_s"] for r in sides[s])
                epochs = seconds * m / n  # (in epochs of this side's own steady rate)
                summary[data_name][s].update(start_measurements_s=seconds, start_measurements_epochs=epochs)
                summary[data_name][s]["after_window_s"] = after
                say(
                    f"  {'':6s} {'':12s} outside the window: the one-time start-of-FT measurements (energy over "
                    f"{n} training samples, z_0) {seconds:.2f} s = {epochs:.2f} epochs at this rate"
                    + (
                        f"; the end of the call after the window {after:.2f} s (BatchNorm pass, measurements, "
                        "prepared head)"
                        if s == "headprep_hp"
                        else " (a cold finetune(): a backbone pass; train() with HP reads the last HP epoch's head "
                        "inputs instead)"
                    )
                )
            if s == "headprep_ft" and shares:
                share = statistics.median(shares)
                without = statistics.median(r["samples_per_s_without_drift"] for r in sides[s])
                probe, n = sides[s][0].get("drift_probe_samples"), len(datasets[data_name])
                summary[data_name][s].update(drift_share_of_window=share, samples_per_s_without_drift=without)
                say(
                    f"  {'':6s} {'':12s} of which the epoch-end drift pass ({probe} probe samples, {n} training "
                    f"samples): {100 * share:.1f}% of the window; without it {without:.1f} samples/s"
                    + (f" = x{without / ref:.3f}" if ref else "")
                )
    return summary


def payload(opts, data_config, loader, syncs, results, summary, repeats_done: int) -> dict[str, Any]:
    device_name = torch.cuda.get_device_name() if opts.device == "cuda" else machine_info()["processor"]
    return {
        "machine": {**machine_info(), "device": device_name},
        "settings": {k: v for k, v in vars(opts).items() if k != "json"},
        # What ran per data source: `plan` raises the warm-up for loader workers, and the workers' persistence.
        "plans": {
            name: {
                "warmup": plan(opts, name).warmup,
                "steps": plan(opts, name).steps,
                "workers": _workers(opts, name),
                "persistent_workers": _loader_settings(opts, name)["dataloader_persistent_workers"],
            }
            for name in opts.data
        },
        "repeats_done": repeats_done,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "loader": loader,
        "syncs": syncs,
        "runs": results,
        "summary": summary,
    }


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
