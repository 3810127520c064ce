"""Cached-feature head probing: run the frozen backbone once, then train the head on the cached head inputs.

During HP the backbone is frozen and in eval mode, so the head's input `z` of a training sample only depends on the
sample (and on its augmentation). `CachedHeadProbing` computes `z` for the whole training set once per cached view
(`hp_cache_views`), then trains the head on it with the trainer's own optimizer, schedule, loss, gradient clipping,
gradient accumulation and batch order, so that without augmentation the head equals the one uncached HP produces
(to float tolerance: the backbone runs with another batch size). HP epoch `e` uses view `e % K`. A head with
dropout (e.g. DeepLabV3's ASPP) draws other dropout masks than uncached HP (the Trainer's dataloader also draws from
the global RNG), so such heads agree in distribution, not number for number.

Batch order: the trainer's training dataloader is asked for its batches (`set_epoch(e)` and its batch sampler), not
iterated, so no image is loaded. Under several processes every rank holds the whole cache (gathered) and runs the
same global batches (the per-device batches of all ranks of one step, concatenated), so the ranks' heads agree.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import TrainerControl, TrainerState

from .losses import count_items
from .measurements import HeadInputs
from .split import extract_logits
from .stages import StagePlan

if TYPE_CHECKING:
    from .trainer import HeadPrepTrainer

logger = logging.getLogger(__name__)


def head_output_check(trainer: HeadPrepTrainer, model: torch.nn.Module, what: str, fix: str):
    """`check(z, outputs)` for `measure`'s first batch: raises when the head module applied to its kept input `z` does
    not give the model's logits (a model that computes more after its head), so that what runs the head alone on
    kept inputs (cached HP, the head exchange) would train or score something else. `what` starts the message and
    `fix` ends it."""
    split = trainer.split

    def check(z: torch.Tensor, outputs) -> None:
        with torch.no_grad(), trainer.measurement_autocast():
            expected = extract_logits(outputs).float()
            size = tuple(expected.shape[-2:]) if expected.dim() == 4 else None
            got = split.head_logits(model, z, size=size).float()
        # (equal_nan: a non-finite input gives NaN in both; the non-finite guard names its sample, where this check
        # blamed the model's head for it and advised hp_cache_features=False)
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5, equal_nan=True):
            diff = (got - expected).abs().max().item() if got.shape == expected.shape else "shape differs"
            raise ValueError(
                f"{what}the head module {split.head_names[0]!r} applied to its input does not give the model's "
                f"logits (max difference {diff}, shapes {tuple(got.shape)} and {tuple(expected.shape)}); this model "
                f"computes more after its head (e.g. GPT-2's `score`, after which the model keeps each sequence's "
                f"last token). {fix}"
            )

    return check


CACHE_MEMORY_SHARE = 0.8  # of the memory available when the cache pass starts, at most, for the cache


def available_host_memory() -> int | None:
    """Bytes of memory this process can still take: the system's available memory (`psutil`), and within a container
    its cgroup's limit less its usage (the system's figure is the host's there); None when neither can be read."""
    available = None
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no psutil, or a platform it cannot read: no figure
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # ("max", or v1's huge number: no limit)
            room = max(int(limit) - usage, 0)
            available = room if available is None else min(available, room)
        break
    return available


def check_cache_fits(shape: tuple[int, ...], label_bytes: int = 0) -> None:
    """Refuse a feature cache of `shape` (float32, in host memory, whole on every process of this machine) that would
    take more than `CACHE_MEMORY_SHARE` of the available memory: filling it would end in the kernel's out-of-memory
    kill after most of the backbone pass (DeepLabV3 at 320 px on PASCAL VOC: 13 MB per image, 77 GiB for 4 views)."""
    views, samples = shape[0], shape[1]
    per_sample = 4 * math.prod(shape[2:]) + label_bytes  # (float32 head inputs, and the labels of each view)
    processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    need = processes * views * samples * per_sample
    available = available_host_memory()
    if available is None or need <= CACHE_MEMORY_SHARE * available:
        return
    gib = 2**30
    one_view = processes * samples * per_sample
    on = f" on {processes} processes of this machine (each holds the whole cache)" if processes > 1 else ""
    raise MemoryError(
        f"hp_cache_features: the cache would hold {views} view(s) x {samples} head inputs of shape "
        f"{tuple(shape[2:])} in float32 with their labels = {need / gib:.1f} GiB{on}, more than "
        f"{CACHE_MEMORY_SHARE:.0%} of the {available / gib:.1f} GiB of memory available. Set "
        "hp_cache_features=False (--hp_cache_features false: the backbone runs in every HP epoch, which needs no "
        "cache)" + (f", or fewer views (hp_cache_views=1: {one_view / gib:.1f} GiB)" if views > 1 else "") + "."
    )


@dataclass
class FeatureCache:
    """Head inputs of the training set: `features[k, i]` is sample `i` under view `k`; `labels[k, i]` its label in
    that view (an augmentation that crops or flips a segmentation mask changes it with the image)."""

    features: torch.Tensor
    labels: torch.Tensor

    @property
    def num_views(self) -> int:
        return self.features.shape[0]

    @property
    def nbytes(self) -> int:
        return self.features.element_size() * self.features.nelement()


def global_batches(dataloader, epoch: int, num_processes: int = 1) -> list[list[int]]:
    """Dataset indices of every optimizer micro-step of `epoch`, as the trainer's dataloader would draw them.

    Accelerate shards a dataloader by giving rank `r` every `num_processes`-th batch of the underlying batch sampler;
    a step of all ranks together therefore sees `num_processes` consecutive batches, concatenated here.
    """
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)
    batch_sampler = dataloader.batch_sampler
    inner = getattr(batch_sampler, "batch_sampler", None)  # accelerate's BatchSamplerShard wraps the real one
    if inner is not None:
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)
        sampler = getattr(inner, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batch_sampler = inner
    batches = [list(map(int, b)) for b in batch_sampler]
    if num_processes <= 1:
        return batches
    return [sum(batches[i : i + num_processes], []) for i in range(0, len(batches), num_processes)]


def _head_only_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer (class, settings, head parameters in order) for the cached head loop.

    The backbone groups, which get no gradient during HP anyway, are dropped; head groups whose settings agree (the
    decay and no-decay groups when both decay 0, the default) become one group, so each step runs one (fused)
    update instead of one per group. Both are exact: every parameter gets the update it would get in its own group.
    Optimizers that cannot be rebuilt from `defaults` are kept as they are.
    """
    groups = [dict(g) for g in optimizer.param_groups if g.get("headprep_part", "head") == "head"]

    def settings(group: dict) -> dict:
        return {k: v for k, v in group.items() if k not in ("params", "headprep_decay")}

    if len(groups) > 1 and all(settings(g) == settings(groups[0]) for g in groups[1:]):
        groups = [{**groups[0], "params": [p for g in groups for p in g["params"]]}]
    if len(groups) == len(optimizer.param_groups):
        return optimizer
    accepted = inspect.signature(type(optimizer).__init__).parameters
    kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted}  # AdamW's defaults hold more than it takes
    try:
        return type(optimizer)(groups, **kwargs)
    except (TypeError, ValueError):
        return optimizer


class CachedHeadProbing:
    """Runs the HP stage of a [`HeadPrepTrainer`] on cached features (`hp_cache_features=True`).

    Used by `HeadPrepTrainer.probe_head()` and `train()`; callbacks see the usual events (`on_train_begin`,
    `on_epoch_end`, `on_step_end`, `on_log`, ...) with `state.global_step` / `state.epoch` counting HP updates, so
    a callback that snapshots the head at epoch ends works for cached and uncached HP alike. No checkpoints are
    written during cached HP (it is cheap to redo). It drives the trainer through public members only: its stage plan
    and stage mechanics (`trainer.stages`), `create_optimizer` / `create_scheduler`, `loss_from_logits`, the
    measurement loader and pass, and the callback handler.
    """

    def __init__(self, trainer: HeadPrepTrainer):
        self.trainer = trainer
        self.args = trainer.args

    # ------------------------------------------------------------------ cache
    def build_cache(self) -> FeatureCache:
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        split = trainer.split
        split.head_module(model)  # fails early, with the reason, when the head is several modules

        check = head_output_check(
            trainer,
            model,
            "hp_cache_features: ",
            "Use hp_cache_features=False, or head_modules=[...] naming a head whose output is the logits.",
        )

        start = time.perf_counter()
        loader = trainer.measurement_loader(trainer.train_dataset)
        num_views, size = self.args.hp_cache_views, len(trainer.train_dataset)
        # The cache is filled batch by batch in place: one tensor of every view, allocated at the first batch once its
        # size is known (and refused there when it cannot fit), instead of each view's batches, their concatenation
        # and a stack of the views, which held up to twice the cache at once.
        cache: dict[str, torch.Tensor] = {}
        for k in range(num_views):
            filled = 0

            def fill(batch, k=k):
                nonlocal filled
                z, y = batch["features"], batch["labels"]
                if not cache:
                    shape = (num_views, size, *z.shape[1:])
                    check_cache_fits(shape, y[0].numel() * y.element_size())
                    cache["features"] = torch.empty(shape, dtype=torch.float32)
                    cache["labels"] = torch.empty((num_views, size, *y.shape[1:]), dtype=y.dtype)
                features, labels = cache["features"], cache["labels"]
                if tuple(z.shape[1:]) != tuple(features.shape[2:]) or tuple(y.shape[1:]) != tuple(labels.shape[2:]):
                    raise ValueError(
                        f"The head inputs or labels differ in shape between batches ({tuple(features.shape[2:])} and "
                        f"{tuple(z.shape[1:])}; labels {tuple(labels.shape[2:])} and {tuple(y.shape[1:])}), e.g. "
                        "sequences padded to each batch's longest: they cannot be kept as one tensor for cached HP. "
                        "Pad every sequence to one length (the collator's padding='max_length'), or set "
                        "hp_cache_features=False."
                    )
                features[k, filled : filled + len(z)] = z
                labels[k, filled : filled + len(y)] = y
                filled += len(z)

            trainer.measurements.measure_dataset(
                trainer.train_dataset,
                with_energy=False,
                max_features=size,
                loader=loader,
                seed=self.args.seed + k,
                raw_features=True,
                keep_labels=True,
                check_first_batch=check if k == 0 else None,
                desc="feature cache" + (f" (view {k + 1}/{num_views})" if num_views > 1 else ""),
                sink=fill,
            )
            if filled != size:
                raise RuntimeError(f"The feature cache pass gave {filled} head inputs for {size} training samples.")
        cache = FeatureCache(cache["features"], cache["labels"])
        logger.info(
            "Cached %d view(s) of %d head inputs of shape %s (%.1f MiB) in %.1f s.",
            cache.num_views,
            cache.features.shape[1],
            tuple(cache.features.shape[2:]),
            cache.nbytes / 2**20,
            time.perf_counter() - start,
        )
        return cache

    # ------------------------------------------------------------------ training
    def train(self) -> dict[str, float]:
        """Train the head for `hp_epochs` epochs on the cache; returns the HP metrics (`train_runtime`, `hp_loss`)."""
        trainer, args = self.trainer, self.args
        start = time.perf_counter()
        model = trainer.accelerator.unwrap_model(trainer.model)
        train_dataloader = trainer.get_train_dataloader()
        micro_per_epoch = len(global_batches(train_dataloader, 0, trainer.accelerator.num_processes))
        hp_steps = args.hp_epochs * max(math.ceil(micro_per_epoch / args.gradient_accumulation_steps), 1)

        trainer.stage_plan = StagePlan(plan="hp", hp_steps=hp_steps)
        trainer.optimizer, trainer.lr_scheduler = None, None
        stages = trainer.stages
        stages.remember_trainable(model)
        trainer.create_optimizer()
        trainer.optimizer = _head_only_optimizer(trainer.optimizer)
        trainer.create_scheduler(hp_steps, trainer.optimizer)
        stages.apply(model, "hp")

        try:
            cache = self.build_cache()
        except BaseException:
            # (e.g. the cache refused as too large: the error says to retry without it, on this trainer too, which
            # must then find the model's parameters trainable as they were, not HP's frozen backbone)
            stages.restore(model)
            trainer.optimizer, trainer.lr_scheduler = None, None
            raise
        trainer.hp_feature_cache = cache  # BatchNorm statistics of snapshots and of the final head use it
        if trainer.keep_head_inputs:  # view 0 is what the start-of-FT energy pass reads (same seed, batch, order)
            trainer.measurements.head_inputs = HeadInputs(
                cache.features[0], cache.labels[0], args.seed, trainer.measure_batch_size, args.dataloader_num_workers
            )
        trainer.state = TrainerState(
            max_steps=hp_steps,
            num_train_epochs=args.hp_epochs,
            logging_steps=args.logging_steps,
            eval_steps=args.eval_steps,
            save_steps=args.save_steps,
            train_batch_size=args.train_batch_size,
        )
        trainer.state.compute_steps(args, hp_steps)  # (fractional logging/eval/save steps: shares of the HP steps)
        trainer.state.is_local_process_zero = trainer.is_local_process_zero()
        trainer.state.is_world_process_zero = trainer.is_world_process_zero()
        trainer.control = TrainerControl()
        handler = trainer.callback_handler
        handler.model, handler.optimizer, handler.lr_scheduler = model, trainer.optimizer, trainer.lr_scheduler
        handler.train_dataloader = train_dataloader
        trainer.is_in_train = True
        try:
            trainer.control = handler.on_train_begin(args, trainer.state, trainer.control)
            total_loss = self._run_epochs(model, train_dataloader, cache)
            if args.hp_recompute_bn_stats:
                trainer.recompute_bn_statistics(cache)
            runtime = time.perf_counter() - start
            metrics = {"train_runtime": round(runtime, 4), "hp_loss": total_loss / max(hp_steps, 1)}
            trainer.control = handler.on_train_end(args, trainer.state, trainer.control)
        finally:
            trainer.hp_feature_cache = None
            trainer.is_in_train = False
            stages.restore(model)
            trainer.optimizer, trainer.lr_scheduler = None, None
        return metrics

    def _run_epochs(self, model, train_dataloader, cache: FeatureCache) -> float:
        """The HP epochs on the cache, with the Trainer's callback events; returns the summed loss."""
        trainer, args = self.trainer, self.args
        handler, stages = trainer.callback_handler, trainer.stages
        ga = args.gradient_accumulation_steps
        loss_fn, problem_type = trainer.loss_from_logits, trainer.problem_type
        hp_smoothing = args.hp_label_smoothing or args.label_smoothing_factor  # as the uncached HP step smooths
        head_params = [p for p in model.parameters() if p.requires_grad]
        device = head_params[0].device
        total_loss, last_logged_step = 0.0, 0
        running_loss = torch.zeros((), device=device)
        for epoch in range(args.hp_epochs):
            features, view_labels = cache.features[epoch % cache.num_views], cache.labels[epoch % cache.num_views]
            batches = global_batches(train_dataloader, epoch, trainer.accelerator.num_processes)
            index_tensors = torch.tensor(sum(batches, [])).split([len(b) for b in batches])
            trainer.control = handler.on_epoch_begin(args, trainer.state, trainer.control)
            with stages.hp_modes(model):  # (an evaluation between epochs leaves the model in eval mode)
                for start_micro in range(0, len(batches), ga):
                    window = index_tensors[start_micro : start_micro + ga]
                    trainer.control = handler.on_step_begin(args, trainer.state, trainer.control)
                    # As the uncached step: each micro-batch's mean weighted by its share of the step's items (a
                    # single micro-batch has the whole share: the factor is exactly 1, so it is skipped).
                    labels = [view_labels.index_select(0, index) for index in window]
                    if len(window) > 1:
                        counts = [count_items(problem_type, y, args.ignore_index) for y in labels]
                        step_items = sum(counts).clamp(min=1)
                    for i, (index, y) in enumerate(zip(window, labels)):
                        z = features.index_select(0, index).to(device, non_blocking=True)
                        y = y.to(device, non_blocking=True)
                        with trainer.measurement_autocast():  # as the uncached step's forward
                            logits = trainer.split.head_logits(model, z, y)
                        # float32, as Accelerate's autocast wrapper returns the model's outputs to the uncached loss
                        loss = loss_fn(logits.float(), y, hp_smoothing)
                        if len(window) > 1:
                            loss = loss * (counts[i] / step_items).to(device)
                        loss.backward()
                        running_loss += loss.detach()
                        if trainer.guard.active:
                            trainer.guard.record_loss(loss, trainer.state.global_step)
                    grad_norm = None
                    if args.max_grad_norm is not None and args.max_grad_norm > 0:
                        grad_norm = torch.nn.utils.clip_grad_norm_(head_params, args.max_grad_norm)
                    trainer.control = handler.on_pre_optimizer_step(args, trainer.state, trainer.control)
                    trainer.optimizer.step()
                    learning_rate = trainer.lr_scheduler.get_last_lr()[0]  # the rate of this step, as Trainer logs
                    trainer.lr_scheduler.step()
                    for param in head_params:  # only these have gradients; model.zero_grad() would walk them all
                        param.grad = None
                    trainer.state.global_step += 1
                    trainer.state.epoch = epoch + (start_micro + len(window)) / len(batches)
                    trainer.control = handler.on_step_end(args, trainer.state, trainer.control)
                    total_loss, running_loss, last_logged_step = self._log_and_evaluate(
                        total_loss, running_loss, last_logged_step, learning_rate, grad_norm
                    )
            trainer.control = handler.on_epoch_end(args, trainer.state, trainer.control)
            total_loss, running_loss, last_logged_step = self._log_and_evaluate(
                total_loss, running_loss, last_logged_step, learning_rate, grad_norm
            )
            trainer.control.should_save = False  # no checkpoints of cached HP
        return total_loss + running_loss.item()

    def _log_and_evaluate(self, total_loss: float, running_loss, last_logged_step: int, learning_rate, grad_norm):
        """What the control asks for after a step or an epoch, as Trainer's loop does after each: a log record of the
        loss since the last one (with the step's learning rate and gradient norm), then an evaluation. Returns the
        updated loss sums and the last logged step."""
        trainer, args = self.trainer, self.args
        control = trainer.control
        steps = trainer.state.global_step - last_logged_step
        if control.should_log and args.logging_strategy != "no" and steps > 0:
            total_loss += running_loss.item()
            logs = {"loss": running_loss.item() / steps, "learning_rate": learning_rate}
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm.item()
            trainer.log(logs)
            running_loss, last_logged_step = torch.zeros((), device=running_loss.device), trainer.state.global_step
        control.should_log = False
        if control.should_evaluate and trainer.eval_dataset is not None:
            prepared_before = hasattr(trainer, "model_preparation_time")
            trainer.evaluate()
            if not prepared_before:
                # (the first evaluation of a model no training prepared sets Trainer's `model_preparation_time`,
                # which then joins every later evaluation's metrics: Trainer's default `compute_objective` summed it
                # in place of eval_loss, so each cached-HP search trial's objective was about 0.0002)
                trainer.__dict__.pop("model_preparation_time", None)
            trainer.stages.set_hp_modes(trainer.model, force=True)  # (evaluate() left the model in eval mode)
        control.should_evaluate = False
        return total_loss, running_loss, last_logged_step
