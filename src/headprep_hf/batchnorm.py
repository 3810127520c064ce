"""BatchNorm statistics of the modules head probing trains, recomputed for the prepared head ("precise BN").

During HP the head (and `reinit_modules`) run in train mode, so their BatchNorm layers normalise with batch
statistics and keep a momentum average (momentum 0.1) of them for eval mode. After few HP updates that average is far
from the statistics of the final weights (a fresh layer starts at mean 0, variance 1; 20 updates still keep 12% of
that), and everything measured in eval mode at FT start (energy, HP train accuracy, p0, evaluation) would describe a
head that was never trained. `recompute_statistics` resets them and runs one pass over the data in the HP modes
(frozen parts in eval mode, the HP modules in train mode) with a cumulative average (`momentum=None`): afterwards the
running mean is the mean of the batch means and the running variance the mean of the (unbiased) batch variances of
the final weights. Under several processes the ranks' averages are combined, weighted by their batch counts.
The HP modes themselves are `stages.Stages.hp_modes`; this module only resets and averages the statistics.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .guard import nonfinite_value

logger = logging.getLogger(__name__)

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def tracked_batchnorms(modules: Iterable[nn.Module]) -> list[_BatchNorm]:
    """BatchNorm layers with running statistics inside `modules` (each once, in module order)."""
    found: dict[int, _BatchNorm] = {}
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, _BatchNorm) and sub.track_running_stats and id(sub) not in found:
                found[id(sub)] = sub
    return list(found.values())


@torch.no_grad()
def recompute_statistics(layers: list[_BatchNorm], run_batches: Callable[[], None], accelerator=None) -> None:
    """Reset `layers` and recompute their running statistics over the batches `run_batches()` feeds the model.

    The caller puts the model in the modes HP trains in (`Stages.hp_modes`: frozen parts in eval mode, the HP modules
    in train mode); `run_batches` calls the model (or the head alone, on cached features) on every batch of one pass
    and owns the data and the RNG handling. With `accelerator`, the ranks' averages are combined.
    """
    if not layers:
        return
    momenta = [bn.momentum for bn in layers]
    try:
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches of the pass
        run_batches()
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
    if accelerator is not None and accelerator.num_processes > 1:
        _average_over_ranks(layers, accelerator)


def _average_over_ranks(layers: list[_BatchNorm], accelerator) -> None:
    for bn in layers:
        batches = bn.num_batches_tracked.to(torch.float64)
        weighted = torch.cat([bn.running_mean.double(), bn.running_var.double()]) * batches
        total_batches = accelerator.reduce(batches.reshape(1).to(accelerator.device), reduction="sum")
        total = accelerator.reduce(weighted.to(accelerator.device), reduction="sum")
        total = (total / total_batches.clamp(min=1)).to(bn.running_mean.device)
        size = bn.running_mean.numel()
        bn.running_mean.copy_(total[:size])
        bn.running_var.copy_(total[size:])
        bn.num_batches_tracked.copy_(total_batches.reshape(()).long())


def recompute_hp_statistics(trainer, cache=None) -> int:
    """`recompute_statistics` for the modules a [`HeadPrepTrainer`] probes, in its HP modes (`trainer.stages`): over
    `cache` (the cached head inputs; every rank holds the whole cache, no reduction) or one seeded pass over the
    training set (the training RNG does not move; the ranks' averages are combined). Returns the layer count."""
    from .dynamics import forked_rng
    from .measurements import broadcast_buffers
    from .progress import pass_bar

    model = trainer.accelerator.unwrap_model(trainer.model)
    split = trainer.split
    layers = tracked_batchnorms(split.hp_modules(model))
    if not layers:
        return 0
    batch_size = trainer.measure_batch_size

    # A last batch of one sample is left out of the pass: a train-mode BatchNorm over one value per channel
    # (BatchNorm1d, a 1x1 pooling branch) cannot take it, and in this average of batch statistics it would weigh as
    # much as a full batch.
    skip_nonfinite = getattr(trainer.guard, "policy", None) == "skip"

    def over_cache() -> None:
        device = next(model.parameters()).device
        left_out = 0
        for view in cache.features:
            for start in range(0, view.shape[0], batch_size):
                chunk = view[start : start + batch_size]
                if skip_nonfinite:
                    # (the updates of the samples whose head inputs hold NaN/inf were dropped; so are the rows here:
                    # one made the recomputed statistics NaN, and the run stopped at writing the prepared head)
                    finite = torch.isfinite(chunk).flatten(1).all(1)
                    left_out += int((~finite).sum())
                    chunk = chunk[finite]
                if chunk.shape[0] == 0 or (chunk.shape[0] == 1 and view.shape[0] > 1):
                    continue
                with trainer.measurement_autocast():
                    split.head_logits(model, chunk.to(device))
        if left_out:
            logger.warning(
                "on_nonfinite='skip': the BatchNorm statistics of the HP modules leave out %d cached head input(s) "
                "holding NaN/inf.",
                left_out,
            )

    def one_sample(batch) -> bool:
        labels = batch.get(trainer.label_key) if isinstance(batch, Mapping) else None
        return isinstance(labels, torch.Tensor) and labels.dim() > 0 and labels.shape[0] == 1

    def over_train_set() -> None:
        loader = trainer.measurement_loader(trainer.train_dataset)
        # Several processes: Accelerate gives rank r the batches r, r + W, ... of the sequential batches and, to keep
        # the ranks' batch counts even, refills the last ones with samples from the start. Those repeats would
        # count twice here (each rank averages its own batches; nothing is gathered), so the loader pads nothing:
        # the ranks' batches together are then exactly the batches one process takes (`even_batches` is
        # Accelerate's public switch of its sharded batch sampler, as `Accelerator.join_uneven_inputs` sets it).
        world = trainer.accelerator.num_processes
        if world > 1 and hasattr(getattr(loader, "batch_sampler", None), "even_batches"):
            loader.batch_sampler.even_batches = False
        rank = trainer.accelerator.process_index if world > 1 else 0
        # Under on_nonfinite="skip", the updates whose inputs held NaN/inf were dropped; so are those batches here
        # (one of them made the recomputed statistics NaN, and the run then stopped at writing the prepared head).
        # Labels are not inputs: NaN marks a missing one (multi-label, regression), and every batch was left out.
        labels = set(trainer.label_names or [trainer.label_key])
        skipped = []
        with forked_rng(trainer.args.seed):
            for index, batch in enumerate(pass_bar(trainer, loader, "BatchNorm statistics")):
                if skip_nonfinite:
                    kept = _finite_samples(batch, labels)
                    if kept is not batch:
                        skipped.append(index * world + rank)
                        if kept is None or one_sample(kept):  # (a BatchNorm in train mode needs two values)
                            continue
                    batch = kept
                if index * world + rank > 0 and one_sample(batch):  # (the position among all ranks' batches)
                    continue
                with trainer.measurement_autocast():
                    trainer.model_caller(model, batch)
        if skipped:
            logger.warning(
                "on_nonfinite='skip': the BatchNorm statistics of the HP modules leave out the training samples whose "
                "inputs hold NaN/inf, in %d batch(es) of %d (sequential batches %s).",
                len(skipped),
                batch_size,
                skipped[:8],
            )

    if cache is None:
        broadcast_buffers(model, trainer.accelerator)
    with trainer.stages.hp_modes(model):
        recompute_statistics(
            layers,
            over_cache if cache is not None else over_train_set,
            None if cache is not None else trainer.accelerator,
        )
    # (reset to 0 and 1 by a pass over no batch, and written as such; counted over every layer: a BatchNorm the forward
    # does not call sees none in any run)
    if skip_nonfinite and max(int(bn.num_batches_tracked) for bn in layers) == 0:
        raise ValueError(
            "The BatchNorm statistics of the HP modules were recomputed over no batch: every batch was left out "
            "(on_nonfinite='skip': NaN/inf in the inputs of every batch). Fix the data, or set "
            "hp_recompute_bn_stats=False to keep the statistics HP's updates left."
        )
    return len(layers)


def _finite_samples(batch, labels):
    """`batch` without its samples whose input values (not the `labels` keys) hold NaN or inf: the batch itself where
    none does, None where nothing is left (or the values cannot be told apart by sample). Dropping the whole batch
    left a pass over one batch with no batch, and the statistics reset to 0 and 1."""
    if not _nonfinite_inputs(batch, labels):
        return batch
    if not isinstance(batch, Mapping):
        return None
    from .dynamics import _batch_samples

    n = _batch_samples(batch)
    per_sample = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n}
    if n is None or any(nonfinite_value(v) for k, v in batch.items() if k not in labels and k not in per_sample):
        return None
    if any(isinstance(v, (list, tuple)) and len(v) == n for v in batch.values()):
        return None  # (per-sample values that are no tensors, e.g. ids: the whole batch goes, as before)
    bad = torch.zeros(n, dtype=torch.bool)
    for key, value in per_sample.items():
        if key not in labels and value.is_floating_point():
            bad |= ~torch.isfinite(value.reshape(n, -1)).all(1).cpu()
    keep = ~bad
    if not keep.any():
        return None
    return {k: v[keep.to(v.device)] if k in per_sample else v for k, v in batch.items()}


def _nonfinite_inputs(batch, labels=frozenset()) -> bool:
    """Whether a batch's floating-point values, other than the `labels` keys, hold NaN or inf (the guard's test of an
    item's values)."""
    if isinstance(batch, Mapping):
        values = [v for k, v in batch.items() if k not in labels]
    else:
        values = batch if isinstance(batch, (list, tuple)) else [batch]
    return any(nonfinite_value(v) for v in values)


@contextlib.contextmanager
def restored_statistics(layers: list[_BatchNorm]):
    """Inside, `layers` may be recomputed; their running statistics are put back on exit."""
    saved = [{name: getattr(bn, name).clone() for name in BN_BUFFERS} for bn in layers]
    try:
        yield
    finally:
        for bn, buffers in zip(layers, saved):
            for name, value in buffers.items():
                getattr(bn, name).copy_(value)
