"""Measurements of the paper: energy at the start of FT, feature drift during FT, head gradient norm.

The tensor functions are pure; `measure` runs a model over a dataloader prepared by Accelerate and gathers the
per-sample values of every rank with `gather_for_metrics`, so each sample is counted exactly once in dataset order
whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import random
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import recursively_apply, send_to_device
from torch import nn

from .losses import task_energy
from .split import extract_logits, first_linear, reduce_features

DRIFT_KEYS = ("sq_dist", "dot", "sq_norm", "cos")


def drift_metrics(z0: torch.Tensor, zt: torch.Tensor) -> dict[str, float]:
    """Mean over samples of `||z_t - z_0||^2`, `z_t . z_0`, `||z_t||^2` and `cos(z_t, z_0)` (paper appendix C.1)."""
    if z0.shape != zt.shape:
        raise ValueError(f"z_0 has shape {tuple(z0.shape)} but z_t has {tuple(zt.shape)}; same probe set needed.")
    z0 = z0.double()
    zt = zt.double()
    return {
        "sq_dist": (zt - z0).pow(2).sum(dim=1).mean().item(),
        "dot": (zt * z0).sum(dim=1).mean().item(),
        "sq_norm": zt.pow(2).sum(dim=1).mean().item(),
        "cos": torch.nn.functional.cosine_similarity(zt, z0, dim=1, eps=1e-12).mean().item(),
    }


def grad_norm(parameters) -> torch.Tensor | None:
    """L2 norm of the gradients of `parameters` (None when no parameter has a gradient)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


@dataclass
class PassResult:
    """Per-sample values of one measurement pass, in dataset order, on CPU."""

    energy: torch.Tensor | None = None
    p_true: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    features: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    count: torch.Tensor | None = None

    def summary(self) -> dict[str, float]:
        """Means over valid positions: samples for classification, pixels for dense tasks (ignored ones excluded),
        samples with at least one present label for multi-task labels; None where a value is undefined."""
        valid = ~torch.isnan(self.energy)
        weight = (
            self.count[valid].double() if self.count is not None else torch.ones(int(valid.sum()), dtype=torch.float64)
        )

        def mean(values: torch.Tensor) -> float | None:
            if values is None or torch.isnan(values[valid]).all():
                return None  # undefined for the problem type (regression has no accuracy or p0)
            return ((values[valid].double() * weight).sum() / weight.sum()).item()

        return {"energy": mean(self.energy), "hp_train_accuracy": mean(self.correct), "p0_mean": mean(self.p_true)}


def _device_rngs() -> tuple[str, list[int] | None]:
    """The accelerator whose RNG state `forked_rng` keeps, and its devices: CUDA's current device once CUDA runs
    (none before: it holds no state yet), or every device of an MPS or XPU backend (`fork_rng`'s None)."""
    if torch.cuda.is_available():
        return "cuda", [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    for kind in ("mps", "xpu"):
        module = getattr(torch, kind, None)
        if module is not None and module.is_available():
            return kind, None
    return "cuda", []


_RNG_TYPES = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)


def _rng_state(rng):
    if isinstance(rng, torch.Generator):
        return rng.get_state()
    if isinstance(rng, np.random.Generator):
        return copy.deepcopy(rng.bit_generator.state)
    return rng.get_state() if isinstance(rng, np.random.RandomState) else rng.getstate()


def _set_rng_state(rng, state) -> None:
    if isinstance(rng, torch.Generator):
        rng.set_state(state)
    elif isinstance(rng, np.random.Generator):
        rng.bit_generator.state = state
    elif isinstance(rng, np.random.RandomState):
        rng.set_state(state)
    else:
        rng.setstate(state)


class _OwnGeneratorStates:
    """A collate function called with the generators it holds (closure cells, module globals read by its code) set to
    states of this object's own, and put back after each call: its draws are then not taken from the generators
    training draws from. Picklable where the function is (states, not a rebuilt function: a loader's workers started
    by spawn pickle the collator, and a rebuilt function is not the module's)."""

    def __init__(self, function, places: list[tuple[str, object]]):
        self.function, self.places = function, places
        self.states = [_rng_state(rng) for rng in self._rngs()]

    def _rngs(self) -> list:
        function = self.function
        return [
            function.__closure__[where].cell_contents if kind == "cell" else function.__globals__[where]
            for kind, where in self.places
        ]

    def __call__(self, *args, **kwargs):
        rngs = self._rngs()
        theirs = [_rng_state(rng) for rng in rngs]
        for rng, state in zip(rngs, self.states):
            _set_rng_state(rng, state)
        try:
            return self.function(*args, **kwargs)
        finally:
            self.states = [_rng_state(rng) for rng in rngs]
            for rng, state in zip(rngs, theirs):
                _set_rng_state(rng, state)


def copied_collator(collator):
    """A copy of `collator` for the measurement passes, drawing from random generators of its own: a deep copy (an
    object with a generator, `DataCollatorForLanguageModeling(seed=...)`), and for a plain function, which a deep copy
    returns as it is, one called with its own states of the generators (`torch.Generator`, numpy's
    `Generator`/`RandomState`, `random.Random`) in its closure cells and in the module globals its code reads
    (`_OwnGeneratorStates`): the passes' draws are then not taken from the generators training draws from (the global
    RNGs are forked by `forked_rng`). A generator reached through another object or function is not seen."""
    copied = copy.deepcopy(collator)
    if not isinstance(copied, types.FunctionType):
        return copied

    def holds_rng(cell) -> bool:
        try:
            return isinstance(cell.cell_contents, _RNG_TYPES)
        except ValueError:  # (an empty cell)
            return False

    places = [("cell", i) for i, cell in enumerate(copied.__closure__ or ()) if holds_rng(cell)]
    places += [
        ("global", name)
        for name in dict.fromkeys(copied.__code__.co_names)
        if isinstance(copied.__globals__.get(name), _RNG_TYPES)
    ]
    return _OwnGeneratorStates(copied, places) if places else copied


@contextlib.contextmanager
def forked_rng(seed: int | None = None):
    """Inside, torch's, Python's and NumPy's RNGs may be used freely (seeded with `seed` if given); outside, their
    streams continue as if nothing had drawn from them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    kind, devices = _device_rngs()
    with torch.random.fork_rng(devices=devices, device_type=kind):
        if seed is not None:
            # Only the generators forked here: `torch.manual_seed` would also reseed every other device (the other
            # GPUs of single-process DataParallel, MPS and XPU when the fork kept CUDA's), and queue a seeding of
            # CUDA for when it starts, outside the fork.
            torch.default_generator.manual_seed(seed)
            if devices is None or devices:
                getattr(torch, kind).manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def kept_buffers(model: nn.Module):
    """Every buffer of `model` as it was before, after: values a forward changed in place (observers of
    quantization-aware training, call counters: modules that update buffers in eval mode too) are written back, and a
    buffer that was replaced gets its tensor back.

    All are written back: version counters cannot tell which changed (the fused fake-quantize kernel updates its
    observers without counting). The values are kept as one flat copy per device and dtype and written back with one
    `_foreach_copy_` per group (on a GPU, a copy per buffer would launch a kernel per BatchNorm buffer)."""
    named = list(model.named_buffers())
    shapes = [b.shape for _, b in named]
    groups: dict[tuple, list[int]] = {}
    for i, (_, b) in enumerate(named):
        groups.setdefault((b.device, b.dtype), []).append(i)
    saved: dict[int, torch.Tensor] = {}  # buffer index -> its values
    with torch.no_grad():
        for idx in groups.values():
            tensors = [named[i][1] for i in idx]
            try:
                parts = torch.cat([t.reshape(-1) for t in tensors]).split([t.numel() for t in tensors])
                saved.update((i, part.view(shapes[i])) for i, part in zip(idx, parts))
            except (RuntimeError, NotImplementedError):  # (a dtype `cat` does not take, e.g. a quantized one)
                saved.update((i, t.clone()) for i, t in zip(idx, tensors))
    try:
        yield
    finally:
        with torch.no_grad():
            for i, (name, old) in enumerate(named):
                owner_name, _, attr = name.rpartition(".")
                owner = model.get_submodule(owner_name)
                if owner._buffers.get(attr) is not old:
                    owner._buffers[attr] = old
                if old.shape != shapes[i]:  # (an observer's buffer resized in place)
                    old.resize_(shapes[i])
            for idx in groups.values():
                targets, sources = [named[i][1] for i in idx], [saved[i] for i in idx]
                try:
                    torch._foreach_copy_(targets, sources)
                except (RuntimeError, NotImplementedError, AttributeError):
                    for target, source in zip(targets, sources):
                        target.copy_(source)


@contextlib.contextmanager
def preserved_state(model: nn.Module, seed: int | None = None):
    """Eval mode, no grad and untouched RNG streams inside (`forked_rng`); every module's train/eval flag and every
    buffer (`kept_buffers`) restored after.

    Forking the RNGs keeps a measurement (which may run random data augmentation) from changing the training run,
    so resumed and uninterrupted runs stay bit-identical. With `seed`, the RNGs are seeded inside, so a dataset with
    random augmentation yields the same views at every measurement (z_0 and z_t of the same inputs).
    """
    modes = [(m, m.training) for m in model.modules()]
    with forked_rng(seed), torch.no_grad(), kept_buffers(model):
        model.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode


PROBE_MEMORY_LIMIT = 512 * 2**20  # bytes of probe inputs kept in memory (larger probe sets are re-read every time)


class InMemoryDataset(torch.utils.data.Dataset):
    """Samples read once from a dataset, served from memory."""

    def __init__(self, samples: list):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]


class ReplayedBatches:
    """The batches of a fixed, in-memory probe set, collated once and replayed at every drift pass.

    The drift pass runs at every FT epoch end over the same samples (`probe_in_memory`). Reading them through the
    DataLoader each time collates, pins and copies the same batches again: on ResNet-50 at 224 px with the default
    256-sample probe that host work took longer than the forward itself (H100: a 40 ms pass, 16 ms of it kernels;
    `bench/throughput.py`). Here the batches the prepared loader yields are read once (RNGs seeded with `seed`, as a
    pass reads them, so a random collator gives the same batches) and kept on the host, pinned with `pin`, without
    the `drop_keys` (the label columns: the forward never gets them, see `ModelCaller`). Each pass sends them to
    `device` as Accelerate's loader does (`send_to_device`). One process only: with several, the loader's sharding and
    `gather_for_metrics`'s bookkeeping of the padded last batch are needed, and the loader is used as it is.
    """

    def __init__(self, loader, seed: int | None, drop_keys, device, pin: bool = False, non_blocking: bool = False):
        self.device, self.non_blocking = device, non_blocking and pin
        drop = set(drop_keys or ())
        with forked_rng(seed):
            self.batches = [self._to_host(batch, drop, pin) for batch in loader]

    @staticmethod
    def _to_host(batch, drop: set, pin: bool):
        if isinstance(batch, Mapping):  # (a graph `Batch` object goes whole: its labels are an attribute)
            batch = {k: v for k, v in batch.items() if k not in drop}
        batch = send_to_device(batch, "cpu")
        if pin:
            batch = recursively_apply(lambda t: t.pin_memory(), batch, error_on_other_type=False)
        return batch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        on_host = torch.device(self.device).type == "cpu"
        for batch in self.batches:
            if on_host:  # fresh tensors, as the loader's collate gave: a forward may change its input in place
                yield recursively_apply(torch.Tensor.clone, batch, error_on_other_type=False)
            else:
                yield send_to_device(batch, self.device, non_blocking=self.non_blocking)


def sample_nbytes(sample) -> int:
    """Bytes held by the tensors and arrays of a sample (dicts, sequences, objects with tensor attributes)."""
    if isinstance(sample, torch.Tensor):
        return sample.element_size() * sample.nelement()
    if isinstance(sample, np.ndarray):
        return sample.nbytes
    if isinstance(sample, Mapping):  # (a tokenizer's BatchEncoding is a UserDict, not a dict)
        return sum(sample_nbytes(v) for v in sample.values())
    if isinstance(sample, (list, tuple)):
        return sum(sample_nbytes(v) for v in sample)
    if hasattr(sample, "size") and hasattr(sample, "mode"):  # PIL image
        width, height = sample.size
        return width * height * len(sample.getbands())
    if hasattr(sample, "__dict__"):  # e.g. a PyG Data object
        return sum(sample_nbytes(v) for v in vars(sample).values())
    return 0


def probe_in_memory(dataset, seed: int | None, limit: int | None = None):
    """`dataset`'s samples read once (RNGs seeded with `seed`, training RNG untouched), when they fit in `limit` bytes
    (default `PROBE_MEMORY_LIMIT`, 512 MiB).

    The drift is measured on the same inputs at every FT epoch; reading (decoding, augmenting) them once instead of
    every time is most of a drift pass's cost on small backbones. With random augmentation the kept samples are one
    fixed view per sample, the same for z_0 and every z_t. Returns `dataset` itself when it is not a sized map-style
    dataset or when its samples would take more than `limit` bytes (estimated from the first sample).
    """
    if isinstance(dataset, (InMemoryDataset, torch.utils.data.IterableDataset)) or not hasattr(dataset, "__len__"):
        return dataset
    n = len(dataset)
    limit = PROBE_MEMORY_LIMIT if limit is None else limit
    if n == 0:
        return dataset
    samples = []
    with forked_rng(seed), torch.no_grad():
        for i in range(n):
            samples.append(dataset[i])
            if i == 0 and sample_nbytes(samples[0]) * n > limit:
                return dataset
    return InMemoryDataset(samples)


class FeatureModuleNotCalled(RuntimeError):
    """The model's forward did not call the module whose input is read as the features (e.g. a leftover `fc` that
    the forward no longer uses, or heads kept in a `ModuleDict`)."""


class HeadInputNotATensor(TypeError):
    """The head module was called with something other than one tensor first (a list of feature maps, a dict): there
    is no one feature `z` per sample to read."""


def head_input(args: tuple, kwargs: dict | None):
    """The head's input as its forward pre-hook (registered `with_kwargs=True`) sees it: the first positional
    argument, else the first keyword argument (`head(hidden_states=h)`)."""
    if args:
        return args[0]
    return next(iter(kwargs.values())) if kwargs else None


class OutputsDoNotFitLabels(ValueError):
    """The energy could not be computed from the model's outputs and the batch's labels (`losses.task_energy` failed
    on them; the original error is the cause). Errors of the pass itself (reading the data, the forward) are raised
    as they are."""


def measure(
    model: nn.Module,
    dataloader,
    call_model: Callable,
    feature_module: nn.Module | None,
    accelerator,
    label_name: str = "labels",
    with_energy: bool = True,
    max_features: int = 0,
    ignore_index: int = -100,
    problem_type: str = "single_label_classification",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    seed: int | None = None,
    raw_features: bool = False,
    keep_labels: bool = False,
    check_first_batch: Callable[[torch.Tensor, object], None] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    sink: Callable[[dict[str, torch.Tensor]], None] | None = None,
    class_last: bool | None = None,
) -> PassResult:
    """One pass of `model` (eval mode, no grad) over `dataloader`.

    Args:
        model: The unwrapped model.
        dataloader: A dataloader prepared by `accelerator` (as `Trainer.get_test_dataloader` returns); it is always
            run to the end, so that Accelerate's bookkeeping of the last (padded) batch stays right.
        call_model: `call_model(model, batch)` returns the model output.
        feature_module: Its input is the feature `z` (None when no features are kept).
        accelerator: Used to gather the per-sample values of all ranks.
        with_energy: Compute energy, p_true and correctness from the logits and `label_name`.
        max_features: Keep the features of the first `max_features` samples (0: none).
        ignore_index: Label value excluded from the energy.
        problem_type: Decides the energy (`losses.task_energy`).
        autocast: Context manager factory for the forward (mixed precision).
        seed: Seed the RNGs for the pass (same augmented views every time); the training RNG is untouched.
        raw_features: Keep the head inputs as they are (e.g. `B, C, H, W` maps) instead of one vector per sample
            (`split.reduce_features`, with the batch's `attention_mask` for sequences; for a head that reduces a
            sequence to one vector per sample itself, e.g. transformers' `RobertaClassificationHead`, the input of
            its first linear layer: the vector its classifier uses).
        keep_labels: Also return the labels (`PassResult.labels`), gathered like the rest.
        check_first_batch: Called as `check_first_batch(z, outputs)` on the first batch (features kept only).
        progress: Wraps the dataloader in a progress bar (`progress.pass_bar`).
        sink: Called with each batch's gathered values (`features`, `labels`, ... on the model's device) instead of
            keeping them: the result then holds none of them (the head exchange consumes each backbone's head inputs
            batch by batch, so a set's head inputs never have to fit in memory at once).
    """
    captured: list[torch.Tensor] = []
    wanted = [False]

    def hook(_module, args, kwargs):
        if wanted[0] and not captured:  # the first head call of the batch: its input is z
            z = head_input(args, kwargs)
            if not isinstance(z, torch.Tensor):
                raise HeadInputNotATensor(
                    f"The head module ({type(feature_module).__name__}) is called with a {type(z).__name__}, not one "
                    "tensor, so it has no one feature vector per sample to read"
                )
            # A copy: a head whose first op works in place (`Dropout(inplace=True)`, `Hardswish(inplace=True)`)
            # would otherwise turn the kept z into its own output.
            captured.append(z.detach().clone())

    # A head given a sequence (`B, T, H`) may itself reduce it to one vector per sample before its first linear layer
    # (transformers' `*ClassificationHead` reads the first token): that vector is what the classifier uses, so it is z.
    inner: list[torch.Tensor] = []

    def inner_hook(_module, args):
        sequence = captured and captured[0].dim() == 3  # (the head's pre-hook ran first: only sequences need it)
        if sequence and not inner and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
            inner.append(args[0].detach().clone())

    handle = feature_module.register_forward_pre_hook(hook, with_kwargs=True) if max_features > 0 else None
    linear = first_linear(feature_module) if max_features > 0 and not raw_features else None
    inner_handle = (
        linear.register_forward_pre_hook(inner_hook) if linear is not None and linear is not feature_module else None
    )
    keys = ("energy", "p_true", "correct", "count", "features", "labels")
    values: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    n_features = 0
    try:
        with preserved_state(model, seed):
            for batch in progress(dataloader) if progress is not None else dataloader:
                captured.clear()
                inner.clear()
                want_features = wanted[0] = n_features < max_features
                with autocast():
                    outputs = call_model(model, batch)
                to_gather = {}
                if with_energy:
                    try:
                        logits = extract_logits(outputs)
                        stats = task_energy(problem_type, logits, batch[label_name], ignore_index, class_last)
                    except (RuntimeError, ValueError, IndexError) as error:
                        if isinstance(error, torch.OutOfMemoryError):
                            raise
                        raise OutputsDoNotFitLabels(str(error)) from error
                    to_gather.update(stats)
                if want_features:
                    if not captured:
                        raise FeatureModuleNotCalled("The feature module was not called during the forward pass.")
                    if check_first_batch is not None and n_features == 0:
                        check_first_batch(captured[0], outputs)
                    z = captured[0]
                    if raw_features:
                        pass
                    elif z.dim() == 3 and inner and inner[0].shape[0] == z.shape[0]:
                        z = inner[0]
                    else:
                        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                        z = reduce_features(z, mask)
                    samples = _batch_samples(batch)
                    rows = z.shape[0] // samples if samples and z.shape[0] != samples else 1
                    if rows > 1 and z.shape[0] == rows * samples:
                        # Several head inputs per sample (a multiple-choice model: one per choice), gathered as one
                        # item per sample: Accelerate cuts the repeats of the last batch by samples, not rows.
                        z = z.reshape(samples, rows, *z.shape[1:])
                    else:
                        rows = 1
                    to_gather["features"] = z.float()
                if keep_labels:
                    to_gather["labels"] = batch[label_name]
                if not to_gather:
                    continue
                # (Replayed batches are one process's: nothing to gather, and `gather_for_metrics` would cut them to
                # the remainder of whichever prepared loader last ended, which it reads from Accelerate's state.)
                gathered = (
                    to_gather if isinstance(dataloader, ReplayedBatches) else accelerator.gather_for_metrics(to_gather)
                )
                if want_features and rows > 1:
                    gathered = {**gathered, "features": gathered["features"].flatten(0, 1)}
                if sink is not None:
                    sink(gathered)
                else:
                    for key, value in gathered.items():
                        values[key].append(value.detach().cpu())
                if want_features:
                    n_features += gathered["features"].shape[0]
    finally:
        for h in (handle, inner_handle):
            if h is not None:
                h.remove()
    result = PassResult()
    for key, chunks in values.items():
        if chunks:
            if key == "features" and len({tuple(c.shape[1:]) for c in chunks}) > 1:
                # (raw head inputs, kept for cached HP: one tensor per set)
                raise ValueError(
                    f"The head inputs differ in shape between batches ({sorted({tuple(c.shape[1:]) for c in chunks})}"
                    ", e.g. sequences padded to each batch's longest): they cannot be kept as one tensor for "
                    "cached HP. Pad every sequence to one length (the collator's padding='max_length'), or set "
                    "hp_cache_features=False."
                )
            tensor = torch.cat(chunks)
            setattr(result, key, tensor[:max_features] if key == "features" else tensor)
    return result


def _batch_samples(batch) -> int | None:
    """The number of samples in a batch: the first dimension of its first tensor (None without one)."""
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    first = next((item for item in items if isinstance(item, torch.Tensor) and item.dim() > 0), None)
    return None if first is None else int(first.shape[0])


def histogram(values: torch.Tensor, bins: int = 20) -> dict[str, list[float]]:
    """Counts of `values` in `bins` equal bins over [0, 1] (for p0)."""
    counts = torch.histc(values.double(), bins=bins, min=0.0, max=1.0)
    edges = torch.linspace(0.0, 1.0, bins + 1)
    return {"edges": [round(e, 6) for e in edges.tolist()], "counts": [int(c) for c in counts.tolist()]}
