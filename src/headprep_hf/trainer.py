"""`HeadPrepTrainer`: head probing (HP) then finetuning (FT) inside one `transformers.Trainer`.

With `hp_epochs=0` it is a `transformers.Trainer` (the README lists the few deliberate differences). With HP, the
stage is a function of `state.global_step` (`stages.StagePlan`), so checkpoints know their stage and resume exactly;
the optimizer holds every parameter in fixed groups, the frozen backbone gets no gradient and a learning rate of 0
in HP, and its optimizer state is cleared at the HP->FT boundary. The model is wrapped for DDP while everything
requires grad and frozen afterwards, so DDP all-reduces the backbone's gradients in FT. Where each job lives:
`stages` (trainable sets, HP modes, optimizer groups, the boundary), `measurements` (energy, drift, head gradient
norm: a callback), `schedules`, `feature_cache` (cached HP), `hub` (the prepared head), `batchnorm`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import re
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import EarlyStoppingCallback, PreTrainedModel, Trainer, set_seed
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    TrainOutput,
    enable_full_determinism,
    has_length,
    rotate_checkpoints,
    unwrap_peft_model,
)

from .checkpoints import (
    begin_write,
    check_weights_fit,
    checkpoints,
    commit,
    refuse_earlier_outputs,
    required_files,
    resume_checkpoint,
    verify,
)
from .config import HeadPrepConfig, OppositeEnergyWarning, check_activation_checkpointing, check_trainer_inputs
from .dynamics import InMemoryDataset, copied_collator
from .export import is_timm_model, prepared_head_record, restore_prepared_head_record, write_timm_config
from .feature_cache import CachedHeadProbing
from .guard import NonFiniteError, NonFiniteGuard, check_finite, nonfinite_keys
from .heads import MLPHead, mlp_head_target, reinitialize_module, replace_head_with_mlp
from .hub import PREPARED_HEAD_DIR, PreparedHeadMixin
from .labels import (
    check_item_format,
    check_label_key,
    check_not_empty,
    check_trainer_datasets,
    infer_problem_type,
    keys_without_labels,
    shape_mismatch_error,
    single_sample_batch_error,
)
from .losses import TrainerLossMixin, declared_problem_type
from .measurements import DYNAMICS_NAME, MeasurementCallback, broadcast_buffers
from .progress import announce, format_values
from .runlock import first_process_lock
from .schedules import two_stage_scheduler
from .split import (
    HeadFinder,
    ModelCaller,
    ModelSplit,
    forward_label_route,
    language_model_kind,
    module_names_in_wrapper,
)
from .stages import PLANS, StageCallback, StagePlan, Stages

logger = logging.getLogger(__name__)
# Accelerate's distributed types whose `prepare` wraps the model in DistributedDataParallel.
DDP_TYPES = tuple(
    getattr(DistributedType, name)
    for name in (
        "MULTI_GPU",
        "MULTI_CPU",
        "MULTI_XPU",
        "MULTI_NPU",
        "MULTI_MLU",
        "MULTI_SDAA",
        "MULTI_MUSA",
        "MULTI_HPU",
        "MULTI_NEURON",
    )  # fmt: skip
    if hasattr(DistributedType, name)
)

TRAINING_ARGS_JSON = "training_args.json"
# Settings a run with stages cannot change between a checkpoint and its resume: each changes what the rest of the run
# computes (schedule, data order, head, losses, which updates apply, the drift's probe), and the resumed run would mix
# the two silently. Logging, evaluation, saving and loader settings may change.
RESUME_SETTINGS = (
    "seed", "data_seed", "hp_epochs", "hp_learning_rate", "hp_lr_scheduler_type", "hp_warmup_ratio", "hp_weight_decay",
    "hp_label_smoothing", "ft_label_smoothing", "label_smoothing_factor", "hp_backbone_mode", "hp_cache_features",
    "hp_cache_views", "hp_recompute_bn_stats", "head_type", "mlp_hidden_size", "mlp_num_layers", "head_modules",
    "reinit_modules", "learning_rate", "num_train_epochs", "max_steps", "lr_scheduler_type", "lr_scheduler_kwargs",
    "warmup_steps", "weight_decay", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "per_device_train_batch_size", "gradient_accumulation_steps", "dataloader_drop_last", "fp16", "bf16",
    "on_nonfinite", "problem_type", "ignore_index", "train_sampling_strategy", "drift_probe_samples",
)  # fmt: skip
_STAGE_LOG_KEYS = ("loss", "grad_norm", "learning_rate", "head_grad_norm")


class KeepPositionalInput:
    """A collator wrapper removing an item's unused keys as Trainer's `RemoveColumnsCollator` does (those not in
    `keep`), except for an item without `input_name`: it is passed whole, its one input besides the labels going to a
    forward called by position (see `HeadPrepTrainer._keeping_positional_input`)."""

    def __init__(self, collator, keep: set[str], input_name: str):
        self.collator, self.keep, self.input_name = collator, keep, input_name

    def __call__(self, features: list):
        features = [
            {k: v for k, v in f.items() if k in self.keep} if isinstance(f, dict) and self.input_name in f else f
            for f in features
        ]
        return self.collator(features)


def shutdown_persistent_workers(loader) -> None:
    """Stop the workers of a DataLoader with `persistent_workers=True` now (torch keeps its live iterator in
    `loader._iterator`; pinned by `tests/test_upstream_canaries.py`); its next iteration starts new workers."""
    # Accelerate's prepared loader wraps the torch DataLoader (`base_dataloader`), which holds the iterator.
    for holder in (loader, getattr(loader, "base_dataloader", None)):
        iterator = getattr(holder, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            holder._iterator = None


_LAYOUT_HOOKED: weakref.WeakSet = weakref.WeakSet()


def state_follows_param_layout(optimizer):
    """Makes `optimizer.load_state_dict` (a resume) give each per-parameter state tensor its parameter's memory layout.

    torch keeps the layout the state was saved with. A checkpoint written with contiguous weights and resumed into
    channels_last ones (`to_channels_last`: an earlier version, or `--channels_last` switched) then hands fused AdamW
    `exp_avg` tensors of another layout than the weights: on CUDA it refuses them, on the CPU it silently pairs the
    wrong elements. Returns `optimizer`.
    """
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):  # accelerate's AcceleratedOptimizer
        inner = inner.optimizer
    if isinstance(inner, torch.optim.Optimizer) and inner not in _LAYOUT_HOOKED:
        inner.register_load_state_dict_post_hook(_state_in_param_layout)
        _LAYOUT_HOOKED.add(inner)
    return optimizer


def _state_in_param_layout(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# What a finished run leaves at the top of its output_dir besides the toolkit's own files: the model `save_model`
# writes, its arguments, the results the recipes save (`save_metrics`) and the card. A new run with stages moves them
# aside with the rest under overwrite_output_dir (else it refuses): left in place, a failed new run left the earlier
# run's model, results and card beside its own measurements, and a finished one replaced them without a trace.
FINAL_OUTPUT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "config.json",
    "training_args.bin",
    "training_args.json",
    "trainer_state.json",
    "final_results.json",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "test_results.json",
    "README.md",
)


def final_outputs(output_dir: str) -> list[str]:
    """The names in `output_dir` of an earlier run's final outputs (`FINAL_OUTPUT_NAMES`, and weight shards)."""
    if not os.path.isdir(output_dir):
        return []
    shard = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")
    return sorted(n for n in os.listdir(output_dir) if n in FINAL_OUTPUT_NAMES or shard.fullmatch(n))


class HeadPrepTrainer(TrainerLossMixin, PreparedHeadMixin, Trainer):
    r"""
    A [`~transformers.Trainer`] that prepares the task head before finetuning (Ren et al., ICLR 2023).

    `train()` runs head probing for `args.hp_epochs` epochs (backbone frozen, BatchNorm statistics fixed), then
    finetunes everything for `args.num_train_epochs` epochs (or `args.max_steps` steps), and measures what the paper
    measures into `trainer.dynamics` (`output_dir/headprep_dynamics.json`, merged into the logs): the energy
    `||e_y - softmax(q)||_2`, HP train accuracy and p0 at the start of FT, the drift of the head's input from z_0
    during FT and the head's gradient norm. With `hp_epochs=0` it behaves as `Trainer`; the head is only looked for
    when HP or a head-based measurement needs it.

    Args:
        model / args / data_collator / train_dataset / ... / model_init / compute_loss_func / optimizers: as for
            `Trainer`; `args` is a [`HeadPrepConfig`]. Models that take no labels (timm's `forward(x)`) get the
            trainer's loss (`loss_from_logits`); models computing their own loss keep it (`uses_trainer_loss`).
        drift_dataset: Probe set of the drift; default: `args.drift_probe_samples` training samples, evenly spaced.
        energy_dataset: Data of the energy, HP train accuracy and p0; default: the training set as training reads it.
        split: An explicit [`ModelSplit`]; default: found by `find_split` (or `args.head_modules`).

    Example:

    ```python
    model = timm.create_model("resnet18", pretrained=True, num_classes=10)
    args = HeadPrepConfig(output_dir="out", hp_epochs=4, hp_learning_rate=1e-2, num_train_epochs=10,
                          learning_rate=3e-4, eval_strategy="epoch")
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    trainer.train()
    print(trainer.dynamics["energy"], trainer.dynamics["drift"][-1])
    ```
    """

    _tag_names = ["headprep", "head-probing"]
    _name = "HeadPrep"

    def __init__(
        self,
        model: nn.Module | None = None,
        args: HeadPrepConfig | None = None,
        *trainer_args,
        drift_dataset=None,
        energy_dataset=None,
        split: ModelSplit | None = None,
        **kwargs,
    ):
        args = HeadPrepConfig(output_dir="tmp_trainer") if args is None else args
        check_trainer_inputs(args, kwargs, model)
        self._explicit_split, self._headprep_ready = split, False
        self._generation_model = False  # (decided by `_prepare_model`)
        super().__init__(model, args, *trainer_args, **kwargs)
        self.drift_dataset = drift_dataset
        self.energy_dataset = energy_dataset
        self.resumed_stage: str | None = None
        self.hp_done = False  # HP ran to its end on this trainer (`probe_head()` or `train()`): the card's tau
        self.hp_interrupted: str | None = None  # HP stopped part-way with the head changed (`_watching_hp`)
        self.stopped_at: tuple[int, int] | None = None  # (update, planned updates) where the last run was interrupted
        self.run_tag: str | None = None  # recorded in checkpoints; resuming needs the same (a sweep's fingerprint)
        self._lock_depth = 0  # (>0 while a run holds output_dir's lock: `_output_dir_lock`)
        self.progress_label: str | None = None  # after HP/FT in the progress bars (a sweep's "tau=2 seed=42")
        self.stage_plan = StagePlan()
        self.hp_feature_cache = None  # the cached head inputs while cached HP runs (BatchNorm passes use them)
        self.written_outputs: set[str] = set()  # outputs this trainer wrote (a later stage may replace them)
        self.keep_head_inputs = False  # cached HP keeps its head inputs for the start-of-FT energy (`head_inputs`)
        self.measurements = MeasurementCallback(self)
        self.guard = NonFiniteGuard(self)
        self._stage = "hp"
        self.in_training_step = False  # a training step runs: its loss is smoothed and item-weighted
        self._train_calls, self._last_plain = 0, True
        self._worker_loaders: list = []  # training loaders of this trainer's runs (their workers end with the run)
        self._training = False
        self._warned_drops: set[int] = set()  # evaluated sets whose dropped last batch was reported
        self._checked_finite = False  # a checkpoint's weights were just checked (its save_model need not again)
        self._trial_for_dir = None
        self._hp_hook, self._attach = None, (False, False)  # this run's (stage mechanics, HP-mode hook)
        self._resume_plan: StagePlan | None = None
        self._resume_dir: str | None = None
        self.hp_steps_per_epoch = 0  # updates per epoch of this run's in-loop HP (0: none)
        self._prepare_model(self.model)
        self._headprep_ready = True
        if not self.label_names and (self.args.label_names is None or not self.model_takes_labels):
            # The model takes no labels: the trainer's loss reads them under "labels" (and Trainer's column removal
            # must keep them). An explicit label_names=[] for a model that takes labels is Trainer's "no labels" (no
            # label_ids, no evaluation loss from them) and is kept; the measurements read "labels" (`label_key`).
            self.label_names = ["labels"]
        if self.args.hp_epochs > 0 or self.track_dynamics:
            self._add_own_callbacks()

    @contextlib.contextmanager
    def _keeping_positional_input(self, dataset):
        """A context for building a loader over `dataset`: Trainer's column removal, except where it would drop the
        one input of a forward called by position (`forward(x)`, timm ViTs' `forward(x, attn_mask=None, ...)`),
        whose batches name it otherwise (`pixel_values`): with Trainer such a model never gets its input, and the
        trainer passes it by position. A `datasets.Dataset` is decided by its columns; other sets item by item, as
        Trainer removes their columns (`KeepPositionalInput`), so that no item is read ahead."""
        caller = self.model_caller
        if not (self.args.remove_unused_columns and caller.positional) or dataset is None:
            yield
            return
        columns = getattr(dataset, "column_names", None)
        if isinstance(columns, list) and caller.input_name in columns:
            yield  # (kept by name: the other columns go, as for any model)
            return
        collator = self.data_collator
        if not isinstance(columns, list):
            # Trainer's signature columns (`Trainer._set_signature_columns_if_needed`): the forward's arguments and
            # the label names.
            model = unwrap_peft_model(self.accelerator.unwrap_model(self.model))
            keep = {*inspect.signature(model.forward).parameters, "label", "label_ids", *self.label_names}
            self.data_collator = KeepPositionalInput(collator, keep, caller.input_name)
        try:
            with self._loader_settings(remove_unused_columns=False):
                yield
        finally:
            self.data_collator = collator

    @property
    def track_dynamics(self) -> bool:
        """Whether this trainer measures: `args.track_dynamics`, except for a generation model (decided by the trainer,
        not on the arguments: `trainer.args is args`, as with Trainer, and other trainers given them still measure)."""
        return self.args.track_dynamics and not self._generation_model

    def _check_generation_model(self, model: nn.Module) -> None:
        kind = language_model_kind(model)
        self._generation_model = kind is not None
        if kind is not None and self.args.track_dynamics:
            # The measurements pair each position's logits with that position's label and call the model without its
            # labels: an encoder-decoder model then has no decoder inputs (T5 fails, BART makes other ones) and a
            # causal LM's logits predict the NEXT label (GPT-2's energy read its own input token). Off, with a word.
            logger.warning(
                "%s is a generation model (%s, can_generate()): energy, p0, HP accuracy and drift are not measured "
                "for it (its logits do not score the labels at the same positions); it trains as with "
                "transformers.Trainer. Set track_dynamics=False to silence this.",
                type(unwrap_peft_model(model)).__name__,
                "encoder-decoder" if kind == "encoder-decoder" else "decoder-only",
            )

    def _guard_policy(self) -> str:
        """The non-finite policy of this trainer's runs: `on_nonfinite`, or its default (see `HeadPrepConfig`)."""
        return self.args.on_nonfinite or ("raise" if self.has_stages else "ignore")

    def _start_guard(self) -> None:
        self.guard.reset(self._guard_policy())
        if self.guard.active and self.guard not in self.callback_handler.callbacks:
            self.add_callback(self.guard)

    def _refuse_nonfinite_model(self) -> None:
        """Where the guard is on, refuse a model that holds NaN/inf before its first update (not on resume: a
        checkpoint is never written non-finite). It failed at the first update as a diverged loss ("lower the
        learning rate"), or, in a BatchNorm buffer under `hp_backbone_mode="train"`, at the first checkpoint."""
        if not self.guard.active:
            return
        bad = nonfinite_keys(self.accelerator.unwrap_model(self.model).state_dict())
        if bad:
            raise NonFiniteError(
                f"The model given to the trainer holds NaN or inf values before any update, in {len(bad)} tensor(s) "
                f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): its weights or buffers were damaged before "
                "training (a damaged weight file, a failed conversion, or an initialisation that divided by zero). "
                "Load the pretrained weights again and check them with torch.isfinite."
            )

    def add_callback(self, callback):
        """Trainer's `add_callback`; an `EarlyStoppingCallback` (or subclass) added after the trainer was built is put
        just before the trainer's own callbacks (stage, measurements, guard), as one given to the constructor is, so
        that the stage callback still holds back early stopping during HP (it reads the stopper's decision in
        `on_evaluate`, after the stopper)."""
        super().add_callback(callback)
        stopper_class = callback if isinstance(callback, type) else type(callback)
        if issubclass(stopper_class, EarlyStoppingCallback):
            callbacks = self.callback_handler.callbacks
            mine = (getattr(self, "measurements", None), getattr(self, "guard", None))
            first_own = next(
                (i for i, c in enumerate(callbacks) if isinstance(c, StageCallback) or any(c is m for m in mine)), None
            )
            if first_own is not None:  # (the stopper alone moves: every other callback keeps its place)
                callbacks.insert(first_own, callbacks.pop())
                self._place_stop_gates()

    def _place_stop_gates(self) -> None:
        """The stage callback's two gates just before the first early stopper and just after the last (both at the
        end of the user's callbacks without a stopper): what changes the stop request between them is the stoppers'
        decision, which the stage callback holds back in HP; a stop asked for by another callback, before or after
        them, stays. Nothing else moves: every callback keeps Trainer's order."""
        stage = next((c for c in self.callback_handler.callbacks if isinstance(c, StageCallback)), None)
        if stage is None:
            return
        callbacks = self.callback_handler.callbacks
        callbacks[:] = [c for c in callbacks if c is not stage.gate and c is not stage.gate_after]
        stoppers = [i for i, c in enumerate(callbacks) if isinstance(c, EarlyStoppingCallback)]
        end = callbacks.index(stage)
        first, last = (stoppers[0], stoppers[-1] + 1) if stoppers else (end, end)
        callbacks.insert(last, stage.gate_after)
        callbacks.insert(first, stage.gate)

    def _add_own_callbacks(self) -> None:
        # The stage boundary and the measurements; a plain run without measurements needs neither (Trainer's list).
        if self.measurements not in self.callback_handler.callbacks:
            # The stage callback, after every callback given to the constructor, holds back the early stoppers' stop
            # in HP (its gates tell it which stop request is theirs).
            stage = StageCallback(self, self._begin_ft)
            self.add_callback(stage)
            self._place_stop_gates()
            self.add_callback(self.measurements)

    # ------------------------------------------------------------------ the model and its head
    def _prepare_model(self, model: nn.Module) -> None:
        """Head preparation for a (new) model: split, MLP head, `reinit_modules`; then reseed as the Trainer does."""
        args = self.args
        unwrapped = self.accelerator.unwrap_model(model)
        self._check_generation_model(unwrapped)
        self._heads = HeadFinder(unwrapped, args.head_modules, args.reinit_modules, self._explicit_split)
        self._class_axis_hint: tuple[ModelSplit, bool | None] | None = None
        self._stages, self._problem_type = None, None
        route = forward_label_route(unwrapped, self.args.label_names)
        self.model_takes_labels = route is not None
        # (through **kwargs only: a loss the model does not return is then named with the fix, `compute_loss`)
        self.labels_through_kwargs = route == "kwargs"
        self.model_caller = ModelCaller(unwrapped, self.label_names or ["labels"])
        needs_head = args.hp_epochs > 0 or args.head_type != "linear" or args.reinit_modules or args.head_modules
        if not needs_head:
            return
        split = self.find_head(required=True)
        # (an MLP head replaces the head's last linear layer: its tie goes with it, the other layers keep theirs)
        tied = split.tied_to_backbone(
            unwrapped, mlp_head_target(unwrapped, split)[0] if args.head_type == "mlp" else None
        )
        if args.hp_epochs > 0 and tied:
            # (HP freezes a weight shared with the backbone, and trains nothing, or trains it, and the backbone moves
            # in HP: which one depends on the name PyTorch meets first)
            raise ValueError(
                f"Head probing trains {split.trainable_in_hp_names} with the backbone frozen, but these weights are "
                f"tied to backbone parameters ({', '.join(tied)}; e.g. a language-model head tied to the input "
                "embeddings, `tie_word_embeddings`): HP would train nothing or change the backbone too. Untie them "
                "(config.tie_word_embeddings=False before the model is built), name another head in head_modules, "
                "or set hp_epochs=0."
            )
        if args.hp_epochs > 0 and args.head_type != "mlp" and not any(True for _ in split.hp_parameters(unwrapped)):
            raise ValueError(
                f"Head probing trains {split.trainable_in_hp_names}, which hold no parameters: HP would train "
                "nothing. Name the module that holds the task head's weights in head_modules, or set hp_epochs=0."
            )
        # (re-drawn, then left frozen by the stages, which keep the user's requires_grad=False: random weights. PEFT's
        # `original_module` beside the `modules_to_save` copy that trains is not used, re-drawn or not.)
        frozen = [
            f"{name}.{param_name}"
            for name in split.reinit_names
            for param_name, param in unwrapped.get_submodule(name).named_parameters()
            if not param.requires_grad and "original_module" not in param_name.split(".")
        ]
        if frozen:
            raise ValueError(
                f"reinit_modules would re-draw parameters that do not train ({', '.join(frozen[:4])}"
                f"{', ...' if len(frozen) > 4 else ''}: requires_grad=False, e.g. frozen by PEFT outside its "
                "adapters, a LoRA layer's base_layer): they would stay random. Make them trainable (a PEFT model: "
                "modules_to_save=[...]) or leave those modules out of reinit_modules."
            )
        loaded = prepared_head_record(unwrapped)
        if loaded is not None and (args.head_type == "mlp" or split.reinit_names):
            # (the review's run: FT built with the settings the head was probed with nested a new random MLP inside
            # the loaded one, or re-drew the probed blocks, and the card still reported the loaded head's tau)
            asked = "head_type='mlp'" if args.head_type == "mlp" else f"reinit_modules={list(split.reinit_names)}"
            raise ValueError(
                f"{asked} would replace the prepared head this model carries (loaded from {loaded['source']}, tau = "
                f"{loaded['tau']}, head_type={loaded.get('head_type')!r}, reinit_modules="
                f"{loaded.get('reinit_modules')}) with newly drawn weights, and FT would start from them while the "
                "card reports the loaded head. The loaded head already holds its MLP and re-initialised blocks: "
                "build this trainer with head_type='linear' and reinit_modules=[]."
            )
        if args.head_type == "mlp":
            set_seed(args.seed)  # the same seed gives the same head
            replace_head_with_mlp(unwrapped, split, args.mlp_hidden_size, args.mlp_num_layers)
        for name in split.reinit_names:
            reinitialize_module(unwrapped.get_submodule(name))
        if args.head_type == "mlp" or split.reinit_names:
            enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if self._headprep_ready:  # a new model: prepare its head, attach this run's stages to it
            self._prepare_model(model)
            self._attach_stages(model)
        return model

    def _attach_stages(self, model: nn.Module) -> None:
        if self._hp_hook is not None:
            self._hp_hook.remove()
            self._hp_hook = None
        with_stages, with_hook = self._attach
        if with_stages:
            self.stages.remember_trainable(model)
        if with_hook:
            self._hp_hook = model.register_forward_pre_hook(self._hp_mode_hook)

    def find_head(self, required: bool = False, warn: bool = False) -> ModelSplit | None:
        """The model's backbone/head split (`find_split`, or `args.head_modules`), looked for on first use; None when
        there is none. `required`: raise the error (it names the `head_modules` fix); `warn`: log once that the
        head-based measurements (drift, head gradient norm) are skipped."""
        return self._heads.get(required=required, warn=warn)

    @property
    def class_axis_hint(self) -> bool | None:
        """Where the head's 3-D logits keep their classes when their length equals the number of classes
        (`ModelSplit.class_axis_hint`; None without a head: the class axis is then taken to be last)."""
        split = self.find_head()
        if split is None:
            return None
        if self._class_axis_hint is None or self._class_axis_hint[0] is not split:
            model = self.accelerator.unwrap_model(self.model)
            self._class_axis_hint = (split, split.class_axis_hint(model))
        return self._class_axis_hint[1]

    @property
    def split(self) -> ModelSplit:
        """The backbone/head split (raises when the model has no head `find_split` can find)."""
        return self.find_head(required=True)

    @property
    def stages(self) -> Stages:
        """The stage mechanics of this model (`headprep_hf.stages.Stages`)."""
        if self._stages is None:
            self._stages = Stages(self.split, self.args.hp_backbone_mode)
        return self._stages

    @property
    def label_key(self) -> str:
        """The key the trainer's own loss, label checks and measurements read labels under: `label_names[0]`, or
        "labels" where `label_names` is empty (an explicit `label_names=[]`, kept as Trainer keeps it)."""
        return self.label_names[0] if self.label_names else "labels"

    @property
    def problem_type(self) -> str:
        """The problem type the config or the model declares, else the one the training labels show."""
        if self._problem_type is None:
            declared = declared_problem_type(self.args.problem_type, self.accelerator.unwrap_model(self.model))
            self._problem_type = declared or infer_problem_type(self.train_dataset, self.label_key)
        return self._problem_type

    @property
    def declares_problem_type(self) -> bool:
        """Whether the config or the model declares the problem type (else it is read off the labels)."""
        return declared_problem_type(self.args.problem_type, self.accelerator.unwrap_model(self.model)) is not None

    @property
    def dynamics(self) -> dict[str, Any]:
        """What was measured (`headprep_dynamics.json`)."""
        return self.measurements.dynamics

    @dynamics.setter
    def dynamics(self, value: dict[str, Any]) -> None:
        self.measurements.dynamics = value

    @property
    def current_stage(self) -> str:
        """`"hp"` or `"ft"`: the stage of the next (or current) update."""
        return self._stage

    @property
    def current_label_smoothing(self) -> float:
        """Label smoothing of the current stage (`label_smoothing_factor` in both when the stage values are 0)."""
        value = self.args.hp_label_smoothing if self._stage == "hp" else self.args.ft_label_smoothing
        return value or self.args.label_smoothing_factor

    @property
    def writes_stage_state(self) -> bool:
        """Whether checkpoints and outputs get the headprep files (HP, a single stage, or measurements)."""
        return self.args.hp_epochs > 0 or self.track_dynamics or self.stage_plan.plan != "both"

    @property
    def has_stages(self) -> bool:
        """Whether this run has head probing or runs a single stage (`probe_head()` / `finetune()`): then a new run
        refuses an `output_dir` holding checkpoints. Plain runs (`hp_epochs=0`, `train()`) write as `Trainer` does."""
        return self.args.hp_epochs > 0 or self.stage_plan.plan != "both"

    # ------------------------------------------------------------------ public stages
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """HP for `args.hp_epochs` epochs, then FT; `resume_from_checkpoint` resumes in whichever stage it was.

        With `hp_cache_features=True`, HP runs on cached features first and the training loop (and its checkpoints)
        covers FT only; resuming such a run restarts from its last FT checkpoint without redoing HP.
        """
        self._trial_for_dir = trial
        with self._model_of_this_call(trial):
            with self._output_dir_lock("HeadPrepTrainer.train()", self.args.hp_epochs > 0):  # (plain: as Trainer)
                self._refuse_interrupted_hp("train()", resume_from_checkpoint)
                self._refuse_probing_a_loaded_head("train()", resume_from_checkpoint)
                with self._watching_hp():
                    return self._train_stages(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    @contextlib.contextmanager
    def _model_of_this_call(self, trial=None, new_model: bool = True):
        """What `Trainer.train` does first, done here before this trainer's checks, run lock and cached HP, in
        Trainer's order: a new model from `model_init` (seeded with `args.seed` as it stands, as Trainer seeds it),
        then a search trial's settings applied to `args`; the model's head is prepared after them (a searched
        `head_type` or `reinit_modules` applies). Those checks ran on the previous trial's model (None after Trainer's
        search released it: an AttributeError), cached HP probed a head that Trainer.train then replaced, and a
        trial's `hp_epochs` took effect after the run was planned. Trainer.train then finds the model built: its
        `model_init` is hidden for the call (`new_model=False`, finetune(): only hidden, FT goes on from the head
        this trainer holds), so the random state after the initialisation is Trainer's; it applies the same trial
        settings again."""
        model_init = self.model_init
        if model_init is not None and new_model:
            enable_full_determinism(self.args.seed) if self.args.full_determinism else set_seed(self.args.seed)
            model = Trainer.call_model_init(self, trial)
        if trial is not None and self.hp_search_backend is not None:
            self._hp_search_setup(trial)
            self.args._validate_headprep_fields()  # (the search set them with setattr: a bad value is named here)
        if model_init is None:
            yield
            return
        if new_model:
            self._prepare_model(model)
            self.model, self.hp_done, self.hp_interrupted = model, False, None  # (a new head: no HP ran on it)
            self.optimizer, self.lr_scheduler = None, None
            if self.place_model_on_device:
                self._move_model_to_device(self.model, self.args.device)
            self.model_wrapped = self.model
        elif self.model is None:
            raise ValueError(
                "finetune() has no model to finetune: the trainer's model was released (hyperparameter_search "
                "leaves it None). Run probe_head() first (it builds one from model_init), or train()."
            )
        self.model_init = None
        try:
            yield
        finally:
            self.model_init = model_init

    def _train_stages(self, resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs):
        outside = bool(self.args.hp_cache_features and self.args.hp_epochs > 0)
        check_activation_checkpointing(self.args, self.accelerator.unwrap_model(self.model))  # (before cached HP)
        if outside and resume_from_checkpoint in (None, False):
            self._check_all_labels("both")
            # Before cached HP trains the caller's head: a refusal afterwards left it probed, and the retry the
            # refusal advises (overwrite_output_dir=True, the same model) probed it again (tau doubled, unrecorded).
            resume_checkpoint(self.run_output_dir, None, not self.args.overwrite_output_dir)
            self._refuse_earlier_outputs(self.run_output_dir, owned=set())
            self._new_run_records()
            self._probe_head_cached()
        return self._run(
            "both", resume_from_checkpoint, trial, ignore_keys_for_eval, hp_outside_loop=outside, **kwargs
        )

    def probe_head(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        """HP only: train the head (and `reinit_modules`) for `args.hp_epochs` epochs with the backbone frozen.

        Afterwards `dynamics` holds the energy, HP train accuracy and p0 of the prepared head.
        """
        self._trial_for_dir = None
        with self._model_of_this_call():  # (with model_init: a new model, as every train() call builds one)
            with self._output_dir_lock("HeadPrepTrainer.probe_head()", True):
                self._refuse_interrupted_hp("probe_head()", resume_from_checkpoint)
                self._refuse_probing_a_loaded_head("probe_head()", resume_from_checkpoint)
                with self._watching_hp():
                    return self._probe_head(resume_from_checkpoint, **kwargs)

    def _probe_head(self, resume_from_checkpoint, **kwargs) -> TrainOutput:
        self.find_head(required=True)
        if self.hp_done and self.args.hp_epochs > 0 and not resume_from_checkpoint:
            raise ValueError(
                f"probe_head() already ran on this trainer: its head went through hp_epochs={self.args.hp_epochs} "
                f"epochs of HP. A second call would train it on to tau = {2 * self.args.hp_epochs} while its "
                f"prepared head and card said tau = {self.args.hp_epochs}. Build a new trainer on the pretrained "
                "model for another tau (or one probe_head() with hp_epochs set to the total)."
            )
        check_activation_checkpointing(self.args, self.accelerator.unwrap_model(self.model))
        self._add_own_callbacks()
        if self.args.hp_epochs == 0 or (self.args.hp_cache_features and not resume_from_checkpoint):
            self._refuse_earlier_outputs(owned=set())
            self._check_all_labels("hp")
            self._new_run_records()
            metrics = self._probe_head_cached() if self.args.hp_epochs > 0 else {}
            self._finish_hp(recompute_bn=self.args.hp_epochs == 0)  # (cached HP recomputed on its cache)
            return TrainOutput(self.state.global_step, metrics.get("hp_loss", 0.0), metrics)
        output = self._run("hp", resume_from_checkpoint, **kwargs)
        if self.state.global_step < self.state.max_steps:  # a callback stopped HP part-way: no prepared head
            self._note_stopped_hp()
            return output
        self._finish_hp(recompute_bn=True)
        return output

    def _new_run_records(self) -> None:
        """A new run (`train()`, `probe_head()`; not a resume, which restores its checkpoint's record, nor
        `finetune()`, which goes on from `probe_head()`'s) starts with empty `dynamics` and no outputs of its own
        (`written_outputs`), once its refusals have passed (a refused call keeps the trainer's records: a
        `finetune()` after it goes on as before). Both outlived the run: a trial of a hyperparameter search, or a
        second `train()` with `model_init`, carried the previous one's energy, tau and FT start, and appended to its
        `nonfinite` and `skipped_updates` lists. (The refusals of a new run with stages own nothing either
        (`owned=set()`): a second search on the same trainer replaced the first one's trial results without a word,
        where a new trainer refuses them, or moves them aside with overwrite_output_dir.)"""
        self.measurements.dynamics = {}
        self.written_outputs = set()

    def _note_stopped_hp(self) -> None:
        """HP that a callback stopped part-way (`should_training_stop`): the head is neither the pretrained one nor
        the prepared head of tau = hp_epochs. Writing it as the prepared head, or saving it later, recorded a tau it
        did not get (tau = hp_epochs from `probe_head()`, 0 from `train()`); it is now noted as `hp_interrupted`, so
        that `finetune()`, `save_prepared_head()` and a second probing refuse it, as after an error."""
        logger.warning(
            "Training stopped during HP, at update %d of %d (a callback asked to stop): FT did not run, and no "
            "start-of-FT measurements or prepared head were written.", self.state.global_step,
            self.stage_plan.hp_steps if self.stage_plan.plan == "both" else self.state.max_steps,
        )  # fmt: skip
        if self.state.global_step > 0:
            self.hp_interrupted = (
                f"head probing stopped (a callback asked to) after {self.state.global_step} update(s) of "
                f"hp_epochs={self.args.hp_epochs} epochs, with the head partly probed"
            )

    def finetune(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        """FT only, from the current head: everything trains with a fresh optimizer and schedule."""
        self._trial_for_dir = None
        with self._model_of_this_call(new_model=False), self._output_dir_lock("HeadPrepTrainer.finetune()", True):
            self._refuse_interrupted_hp("finetune()", resume_from_checkpoint)
            check_activation_checkpointing(self.args, self.accelerator.unwrap_model(self.model))
            return self._run("ft", resume_from_checkpoint, **kwargs)

    @contextlib.contextmanager
    def _watching_hp(self):
        """Note (`hp_interrupted`) a head probing that stopped part-way (an error, Ctrl-C) after it changed the head:
        that head is neither the pretrained one (tau 0) nor the prepared head of tau = hp_epochs, so a second
        `probe_head()` on it, a `finetune()` or a saved head would record a tau it did not get."""
        before = None
        if self.args.hp_epochs > 0 and not self.hp_done and self.model is not None:
            try:
                before = self.hp_state_dict()
            except ValueError:  # (no head: the stage's own check names it)
                before = None
        try:
            yield
        except BaseException:
            if before is not None and not self.hp_done and not self.stage_plan.ft_started:
                try:
                    after = self.hp_state_dict()
                except Exception:  # noqa: BLE001 - the error that stopped HP is the one to raise
                    after = {}
                if any(not torch.equal(before[k], after[k]) for k in before if k in after):
                    self.hp_interrupted = (
                        f"head probing stopped after {self.state.global_step} update(s) of hp_epochs="
                        f"{self.args.hp_epochs} epochs, with the head partly probed"
                    )
            raise

    def _refuse_interrupted_hp(self, what: str, resume_from_checkpoint=None) -> None:
        """Refuse to go on from a head that an interrupted head probing left partly probed (`_watching_hp`)."""
        if self.hp_interrupted is None or resume_from_checkpoint:
            return
        raise ValueError(
            f"{what} on this trainer's model: its {self.hp_interrupted}. Probing it again would give it more than "
            f"tau = {self.args.hp_epochs} epochs, and finetuning or saving it would record a tau it did not get. "
            "Resume the interrupted run (resume_from_checkpoint=True, where it saved a checkpoint), or start again "
            "from the pretrained model (a new model, or model_init)."
        )

    def _refuse_probing_a_loaded_head(self, what: str, resume_from_checkpoint=None) -> None:
        """Refuse head probing on a head `load_prepared_head` attached: it would end at the loaded tau + hp_epochs
        while the prepared head and the card recorded tau = hp_epochs (the review's run: loaded tau 2, hp_epochs 2,
        recorded 2, without a warning)."""
        if self.args.hp_epochs == 0 or resume_from_checkpoint or self.model is None:
            return
        loaded = prepared_head_record(self.accelerator.unwrap_model(self.model))
        if loaded is None:
            return
        raise ValueError(
            f"{what} would probe further the prepared head this model carries (loaded from {loaded['source']}, tau = "
            f"{loaded['tau']}): it would end at tau = {loaded['tau']} + {self.args.hp_epochs} while its prepared head "
            f"and card would say tau = {self.args.hp_epochs}. Finetune the loaded head as it is (finetune(), or "
            "hp_epochs=0), or probe a head from the pretrained model without loading one."
        )

    @contextlib.contextmanager
    def _output_dir_lock(self, what: str, needed: bool):
        """Hold `output_dir`'s run lock (`runlock.RunLock`) for a run with stages: two runs started into one folder
        replaced each other's checkpoints and results without an error. The first process takes it; every process
        refuses together (the others would wait in the first collective)."""
        if not needed or self._lock_depth > 0:  # (a stage call inside train() or a subclass's: the lock is held)
            self._lock_depth += needed
            try:
                yield
            finally:
                self._lock_depth -= needed
            return
        with first_process_lock(self.run_output_dir, what, self.args.process_index, self.accelerator.num_processes):
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    def _refuse_unsized_hp(self) -> None:
        raise ValueError(
            f"hp_epochs={self.args.hp_epochs} counts epochs of the training set, but it has no length (an "
            "IterableDataset, which Trainer runs for max_steps): HP cannot tell where an epoch ends. Pass a "
            "dataset with a length, or set hp_epochs=0 to finetune without head probing."
        )

    def _probe_head_cached(self) -> dict[str, float]:
        if not has_length(self.train_dataset):
            self._refuse_unsized_hp()
        self._new_call(plain=False)
        self.stage_plan = StagePlan(plan="hp")
        self._start_guard()
        self._refuse_nonfinite_model()
        self.warn_if_cached_hp_bypasses_the_loss()
        metrics = CachedHeadProbing(self).train()
        self._stage = "hp"
        broadcast_buffers(self.accelerator.unwrap_model(self.model), self.accelerator)
        return metrics

    def _finish_hp(self, recompute_bn: bool) -> None:
        # The end of HP: BatchNorm statistics of the HP modules, the start-of-FT measurements, the prepared head.
        self.hp_done = self.args.hp_epochs > 0
        self.hp_interrupted = None  # (a resumed HP ran to its end)
        if recompute_bn and self.args.hp_recompute_bn_stats:
            self.recompute_bn_statistics()
        if self.track_dynamics:
            self.measure_start()
            self.measurements.write(self.run_output_dir)
        self._write_prepared_head()

    def _begin_ft(self) -> None:
        self.guard.check()  # a diverged HP is named as such before its head is measured or written
        plan = self.stage_plan
        plan.ft_started = True
        in_loop_hp = plan.plan == "both" and plan.hp_steps > 0
        if in_loop_hp:
            Stages.begin_ft(self.optimizer, self.args.weight_decay)
        if plan.plan == "both" and self.args.hp_epochs > 0:
            self._finish_hp(recompute_bn=in_loop_hp)
        elif self.track_dynamics:
            try:
                self.measure_start()
            except BaseException:
                # (`auto_find_batch_size` runs the loop again after an out-of-memory error here: FT begins again
                # then, and measures; it went on without energy, z_0 or drift, without a word)
                plan.ft_started = False
                raise
        if plan.plan == "ft" or self.args.hp_epochs > 0:  # (a run without HP prints what Trainer prints)
            self._announce_ft_start()

    def _announce_ft_start(self) -> None:
        # One line where the Trainer's log records appear at default settings (above the progress bars).
        step = self.state.global_step  # (0 when HP ran outside this loop: cached HP, probe_head(), a loaded head)
        message = f"HP -> FT{f' at step {step}' if step else ''}: "
        if self.track_dynamics and "energy" in self.dynamics:
            names = {"energy": "energy", "hp_train_accuracy": "HP train accuracy"}
            message += format_values({label: self.dynamics.get(key) for key, label in names.items()})
        else:
            why = (
                "see the warning above"
                if self.track_dynamics or self._generation_model and self.args.track_dynamics
                else "track_dynamics=False"
            )
            message += f"energy and HP train accuracy not measured ({why})"
        announce(self, message)

    # ------------------------------------------------------------------ measurements (see MeasurementCallback)
    def measure_start(self) -> dict[str, float]:
        """Measure the state FT starts from, at the current weights: energy, HP train accuracy, p0 and z_0.

        Called automatically at the start of FT (and at the end of `probe_head()`); public so that a given model
        state can be measured. Updates and returns `dynamics` entries; the probe features become the new z_0.
        """
        summary = self.measurements.measure_start()
        self.dynamics["ft_start_step"] = self.state.global_step
        return summary

    def measure_drift(self) -> dict[str, float]:
        """Drift of the probe features at the current weights from z_0 (mean `||z_t-z_0||^2`, `z_t.z_0`,
        `||z_t||^2`, `cos(z_t, z_0)`); recorded in `dynamics["drift"]` with the step and epoch."""
        return self.measurements.measure_drift()

    def measurement_autocast(self):
        """The mixed-precision context of training's forward, for the passes the trainer runs itself: energy, drift,
        BatchNorm statistics, the feature cache, cached HP and the head alone on its inputs (kept HP inputs, head
        exchange).

        Accelerate applies bf16/fp16 autocast by wrapping `model.forward` when it prepares the model (so transformers
        5's `autocast_smart_context_manager` is a no-op), which leaves two paths outside it: a head module called
        directly (bf16 head inputs kept from a training forward would meet float32 weights), and a pass before
        `train()` prepares the model (the feature cache would be computed, and the head trained on it, in float32
        while the uncached stage runs in bf16). This is Accelerate's own context (`Accelerator.autocast`), the one its
        wrapper uses, so every pass runs in training's precision; without mixed precision it does nothing."""
        return self.accelerator.autocast()

    def measurement_loader(self, dataset):
        """A sequential loader over `dataset` for forward-only passes (energy, drift, feature cache, BatchNorm),
        sharded across ranks by Accelerate, at `measure_batch_size` (default 4x the training batch: no activations
        are kept for a backward pass, and large batches make forward-only passes fast).

        Its workers are never persistent: each pass is read once, and persistent measurement workers of a finished
        run were found to hold their shutdown for seconds per worker when garbage-collected later (30 s at the start
        of the next trainer's `train()` with 2 workers on a JPEG folder). Samples already in memory (the drift probe,
        cached head inputs) are served by the main process: worker processes would only copy them through pipes.
        It never drops a last partial batch, whatever `dataloader_drop_last` says."""
        # Every sample is measured: `dataloader_drop_last` is for training batches (Trainer's evaluation loaders drop
        # too; a measurement that silently skipped the last batch would describe another set).
        settings = dict(dataloader_persistent_workers=False, dataloader_drop_last=False)
        if isinstance(dataset, InMemoryDataset):
            settings.update(dataloader_num_workers=0, dataloader_prefetch_factor=None)
        collator = self.data_collator
        try:
            # A copy: a collator with a random generator of its own (`DataCollatorForLanguageModeling(seed=...)`'s
            # masking, a function's generator in its closure) would otherwise give the measurement passes draws that
            # training then does not see.
            self.data_collator = copied_collator(collator)
        except Exception as error:  # (anything a collator's own state raises when copied)
            logger.info("The data collator could not be copied for the measurement passes (%s): they use it.", error)
        try:
            with self._loader_settings(**settings), self._keeping_positional_input(dataset):
                return self._get_dataloader(dataset, "headprep", self.measure_batch_size)
        finally:
            self.data_collator = collator

    @contextlib.contextmanager
    def _loader_settings(self, **settings):
        """`args` with these `dataloader_*` values while a loader is built by Trainer's `_get_dataloader`."""
        saved = {name: getattr(self.args, name) for name in settings}
        try:
            for name, value in settings.items():
                setattr(self.args, name, value)
            yield
        finally:
            for name, value in saved.items():
                setattr(self.args, name, value)

    @property
    def measure_batch_size(self) -> int:
        # (the training batch in use: `auto_find_batch_size` halves Trainer's `_train_batch_size` after an
        # out-of-memory error, not `per_device_train_batch_size`; a pass at 4x the first size ran out again)
        per_device = getattr(self, "_train_batch_size", None) or self.args.train_batch_size
        per_device = per_device // max(1, self.args.n_gpu)
        return self.args.measure_batch_size or max(self.args.per_device_eval_batch_size, 4 * per_device)

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        if self.has_stages:  # (a plain run evaluates as Trainer: each rank with its own BatchNorm statistics)
            broadcast_buffers(self.accelerator.unwrap_model(self.model), self.accelerator)
        self._warn_dropped_eval_samples(eval_dataset)
        try:
            return super().evaluate(eval_dataset, *args, **kwargs)
        finally:
            if not self._training:  # during training the persistent evaluation workers serve every evaluation
                self.release_workers()

    def _warn_dropped_eval_samples(self, eval_dataset) -> None:
        """`dataloader_drop_last=True` (e.g. set against a training batch of one sample reaching BatchNorm) also drops
        the last partial batch of every evaluation in `Trainer`: say so once per evaluated set, with the count."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if not self.args.dataloader_drop_last or isinstance(dataset, dict) or dataset is None:
            return  # (a dict is evaluated set by set, through this method again)
        if isinstance(dataset, torch.utils.data.IterableDataset):
            return  # (Trainer's loader drops nothing of an iterable set)
        name = dataset if isinstance(dataset, str) else "eval_dataset" if dataset is self.eval_dataset else "dataset"
        dataset = self.eval_dataset[dataset] if isinstance(dataset, str) else dataset
        batch = self.args.eval_batch_size * max(self.accelerator.num_processes, 1)
        try:
            n = len(dataset)
        except TypeError:
            return
        if n % batch and id(dataset) not in self._warned_drops:
            self._warned_drops.add(id(dataset))
            logger.warning(
                "dataloader_drop_last=True also applies to evaluation in transformers' Trainer: the last %d of the %d "
                "samples of %s are not evaluated (batches of %d). Pick a per_device_eval_batch_size that divides %d, "
                "or set dataloader_drop_last=False.",
                n % batch, n, name, batch, n,
            )  # fmt: skip

    def get_eval_dataloader(self, eval_dataset=None):
        """`Trainer.get_eval_dataloader`, except for a dataset passed as an object under
        `dataloader_persistent_workers=True` (`evaluate(test_set)`, or a dict of datasets given to `evaluate`).

        Trainer caches its persistent evaluation loaders under the dataset's name, and under `"eval"` for every
        dataset passed as an object: once `eval_dataset` was evaluated, `evaluate(test_set)` got the cached
        validation loader back and reported the validation metrics as `test_*` (and the reverse when the test set
        came first). Such a dataset gets a loader of its own here, read once and not cached, so its workers are not
        persistent: they stop when the evaluation has read it. `eval_dataset` itself and datasets named by key keep
        Trainer's cached loaders.
        """
        if (
            self.args.dataloader_persistent_workers
            and eval_dataset is not None
            and not isinstance(eval_dataset, str)
            and eval_dataset is not self.eval_dataset
        ):
            return self._single_use_loader(eval_dataset, "Evaluation")
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str) and isinstance(self.eval_dataset, dict):
            dataset = self.eval_dataset.get(dataset)
        with self._keeping_positional_input(dataset):
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        """`Trainer.get_test_dataloader`, with workers that stop when `predict()` has read the set: Trainer builds a
        new loader for every call, and its persistent workers outlived it (5 s per worker when the garbage collector
        reached them)."""
        return self._single_use_loader(test_dataset, "test")

    def _single_use_loader(self, dataset, description: str):
        with self._loader_settings(dataloader_persistent_workers=False), self._keeping_positional_input(dataset):
            return self._get_dataloader(dataset, description, self.args.eval_batch_size, self._get_eval_sampler)

    def get_train_dataloader(self):
        with self._keeping_positional_input(self.train_dataset):
            loader = super().get_train_dataloader()
        self._worker_loaders.append(loader)
        return loader

    def release_workers(self) -> None:
        """Shut down the worker processes that persistent loaders of this trainer keep alive (the training loader and
        Trainer's cached evaluation loaders); a later pass starts new ones. Called at the end of every training call
        and of every evaluation outside training.

        Why: a trainer sits in reference cycles, so its loaders are freed by the garbage collector, which finalizes
        the loader's queues before the iterator that would stop its workers; each worker then times out (5 s). On a
        JPEG folder with 8 workers this added about 2 minutes to the next trainer's start, on every FT job of a sweep.
        Shut down explicitly, right after the run, the same workers stop in well under a second.
        """
        loaders = [*self._worker_loaders, *getattr(self, "_eval_dataloaders", {}).values()]
        self._worker_loaders.clear()
        for loader in loaders:
            shutdown_persistent_workers(loader)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log`, with the measurements merged in and, in runs with HP, stage-tagged copies of the loss,
        learning rate and evaluation keys beside them (`hp/loss`, `ft/loss`, `eval_hp/accuracy`, ...)."""
        record = {**logs, **self.measurements.pop_logs(logs)}
        if self.args.hp_epochs > 0 or self.stage_plan.plan != "both":
            stage = self.stage_plan.stage_at(self.state.global_step - 1)
            for key, value in list(record.items()):
                if key in _STAGE_LOG_KEYS:
                    record[f"{stage}/{key}"] = value
                elif key.startswith("eval_") and "/" not in key:
                    record[f"eval_{stage}/{key[len('eval_') :]}"] = value
        ours = record.keys() - logs.keys()
        super().log(record, start_time)
        # `Trainer.log` edits the record in place (adds "epoch"; the printing callbacks drop "total_flos"), and its
        # callers return that dict (`train()`'s and `evaluate()`'s metrics): the caller's dict gets those edits, as
        # with Trainer, and not the keys added here for the log alone.
        for key in [key for key in logs if key not in record]:
            del logs[key]
        logs.update({key: value for key, value in record.items() if key not in ours})

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        self._stage = self.stage_plan.stage_at(self.state.global_step)
        if self._stages is not None:
            self.stages.apply(self.model, self._stage)
        # The last HP epoch's head inputs give the start-of-FT energy (see MeasurementCallback.hp_epoch_recorder).
        recorder = self.measurements.hp_epoch_recorder() if self._stage == "hp" else None
        # (Mapping: tokenizer collators return a BatchEncoding, a UserDict)
        labels = inputs.get(self.label_key) if recorder is not None and isinstance(inputs, Mapping) else None
        self.in_training_step = True  # smoothing applies to training losses only
        if recorder is not None:
            recorder.active = True
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.in_training_step = False
            if recorder is not None:
                recorder.active = False
        if recorder is not None:
            recorder.record(labels)
        if self.guard.active:
            self.guard.record_loss(loss, self.state.global_step)
        if self._stage == "ft" and self.track_dynamics and self.accelerator.sync_gradients:
            self.measurements.record_head_grad()
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # Override (pinned by tests/test_upstream_canaries.py): Trainer computes the gradient norm of every update,
        # for clipping and logging, right before `on_pre_optimizer_step`; the guard checks that one instead of
        # computing a second norm over every gradient (2.3% of an update on the toy task).
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.guard.watches_steps:
            self.guard.note_grad_norm(grad_norm)
        return grad_norm

    # ------------------------------------------------------------------ optimizer and schedule
    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.stage_plan.hp_steps == 0:
            return state_follows_param_layout(super().create_optimizer(model))
        hp_decay = self.args.weight_decay if self.args.hp_weight_decay is None else self.args.hp_weight_decay
        decay = set(self.get_decay_parameter_names(self.model))
        groups = self.stages.param_groups(self.model, decay, hp_decay, self.args.weight_decay)
        optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
            self.args, self.model
        )
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model")}
        # The FT peak rate: the `lr` of optimizer_cls_and_kwargs where given (Trainer's base rate then), else
        # learning_rate; each group is at 1.0 and the two-stage schedule sets the rate.
        self._ft_learning_rate = optimizer_kwargs.get("lr", self.args.learning_rate)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return state_follows_param_layout(self.optimizer)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None or self.stage_plan.hp_steps == 0:
            return super().create_scheduler(num_training_steps, optimizer)
        hp_steps = self.stage_plan.hp_steps
        optimizer = optimizer if optimizer is not None else self.optimizer
        self.lr_scheduler = two_stage_scheduler(
            optimizer,
            self.args,
            hp_steps,
            max(num_training_steps - hp_steps, 0),
            ft_learning_rate=getattr(self, "_ft_learning_rate", None),
        )
        return self.lr_scheduler

    def _hp_mismatch_cause(self) -> str:
        """What to check when a checkpoint's HP step count differs from this configuration's."""
        if self._resume_plan.hp_outside_loop != self.stage_plan.hp_outside_loop:
            written = "with" if self._resume_plan.hp_outside_loop else "without"
            return f"the checkpoint was written {written} hp_cache_features; resume with the same setting"
        return "hp_epochs, batch size or dataset differ"

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        plan = self.stage_plan
        num_train_epochs, steps_per_epoch, num_examples, _, total_batch, steps_in_epoch, max_steps = values
        hp_steps = args.hp_epochs * steps_per_epoch if plan.plan != "ft" and not plan.hp_outside_loop else 0
        if hp_steps and not has_length(dataloader):
            self._refuse_unsized_hp()
        if self._resume_plan is not None and plan.plan != "ft":  # (checked before loading too: `_run`; with
            self._check_resumed_hp_steps(hp_steps)  # auto_find_batch_size only here, after Trainer's restore)
        plan.hp_steps, plan.ft_steps = hp_steps, (max_steps if plan.plan != "hp" else 0)
        self.hp_steps_per_epoch = steps_per_epoch if hp_steps else 0
        if hp_steps == 0 and plan.plan != "hp":
            return values  # no HP in this loop: exactly the Trainer's plan
        total = hp_steps + plan.ft_steps
        if total == 0:
            raise ValueError("Nothing to train: hp_epochs and num_train_epochs/max_steps give 0 steps.")
        num_train_epochs = math.ceil(total / steps_per_epoch)
        num_train_samples = num_examples * total / steps_per_epoch
        return num_train_epochs, steps_per_epoch, num_examples, num_train_samples, total_batch, steps_in_epoch, total

    # ------------------------------------------------------------------ orchestration
    def _new_call(self, plain: bool) -> None:
        # A new stage gets a new optimizer, schedule and DDP wrapper: the old wrapper was built for the previous
        # stage's trainable set and reusing it can leave ranks out of sync. Repeated plain runs keep Trainer's reuse.
        if self._train_calls > 0 and not (plain and self._last_plain):
            self.optimizer, self.lr_scheduler, self.model_wrapped = None, None, self.model
        self._train_calls += 1
        self._last_plain = plain

    def _run(
        self, plan: str, resume_from_checkpoint, trial=None, ignore_keys_for_eval=None, hp_outside_loop=False, **kwargs
    ):
        if plan not in PLANS:
            raise ValueError(f"Unknown plan {plan!r}.")
        plain = plan == "both" and self.args.hp_epochs == 0
        if not plain or self.track_dynamics:
            self._add_own_callbacks()
        self._new_call(plain and not hp_outside_loop)
        self.stage_plan = StagePlan(
            plan=plan,
            hp_outside_loop=hp_outside_loop,
            tag=self.run_tag,
            hp_done=self.hp_done,
            start_head=prepared_head_record(self.accelerator.unwrap_model(self.model)),
        )
        self._start_guard()
        self._trial_for_dir = trial
        self._check_all_labels(plan)
        refuse = self.has_stages and not self.args.overwrite_output_dir
        checkpoint = resume_checkpoint(
            self._get_output_dir(trial), resume_from_checkpoint, refuse, not self.has_stages
        )
        if checkpoint is None:
            # A new run (not finetune(), which goes on from probe_head(), nor the loop after cached HP) owns none of
            # the outputs it finds; a plain run's are Trainer's to replace, as before (`_refuse_earlier_outputs`).
            new_run = plan != "ft" and not hp_outside_loop
            self._refuse_earlier_outputs(self._get_output_dir(trial), owned=set() if new_run else None)
            self._refuse_nonfinite_model()
            if new_run:
                self._new_run_records()
        self.measurements.start_run(plan)
        self.resumed_stage = self._resume_plan = self._resume_dir = None
        if checkpoint is not None and os.path.isdir(checkpoint):
            verify(
                checkpoint, required_files(self.args, self.writes_stage_state, checkpoint), plain=not self.has_stages
            )
            in_loop_hp = self.args.hp_epochs > 0 and plan != "ft" and not hp_outside_loop
            if in_loop_hp and not os.path.isfile(os.path.join(checkpoint, "scheduler.pt")):
                # (Trainer restarts its schedule from step 0 there; the two-stage schedule would restart in HP. A loop
                # without HP, finetune()'s or after cached HP, restarts a plain schedule, as Trainer's does.)
                raise ValueError(
                    f"{checkpoint} holds no scheduler state (written with save_only_model=True), and a run with HP "
                    "in its loop cannot resume without it: the two-stage schedule would restart from HP in the middle "
                    "of the run. Resume from a checkpoint written without save_only_model, or start a new run from "
                    "its weights."
                )
            unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if not isinstance(unwrapped, PreTrainedModel):  # (transformers models: Trainer's own loading decides)
                check_weights_fit(checkpoint, unwrapped)
            # Every refusal comes before anything changes: a refused resume had already taken the checkpoint's
            # hp_done (a later probe_head() refused, the card's tau wrong), its prepared-head record and its
            # measurements, and moved this folder's own checkpoints aside.
            saved = self._resume_plan = StagePlan.for_resume(checkpoint, plan, self.args.hp_epochs, self.run_tag)
            self._resume_start_head(checkpoint, saved, apply=False)
            # Refused before Trainer loads the checkpoint's weights into the caller's model; also in a plain run
            # resuming a checkpoint of a run with stages (it was refused after the weights were loaded). A plain
            # run's checkpoint resumes in a plain run as with Trainer, whatever settings changed.
            written = StagePlan.load(checkpoint)
            by_stages = written is not None and (
                written.hp_steps > 0 or written.hp_outside_loop or written.plan != "both"
            )
            if self.has_stages or by_stages:
                self._refuse_other_hp_steps(plan, hp_outside_loop)
                self._refuse_changed_settings(checkpoint)
            if os.path.realpath(os.path.dirname(os.path.normpath(checkpoint))) != os.path.realpath(
                self._get_output_dir(trial)
            ):
                # A run resumed from another folder's checkpoint writes into this one as a new run does: another
                # run's checkpoints left there, a later resume_from_checkpoint=True took their newest for this run's.
                # (The last refusal: with overwrite_output_dir it moves them aside instead.)
                self._refuse_earlier_outputs(
                    self._get_output_dir(trial),
                    who=f"the run resumed from {checkpoint} (in another folder; where these are that run's own "
                    "checkpoints, written before it stopped, continue it with resume_from_checkpoint=True)",
                )
            self._load_stage_state(checkpoint, plan, saved)
            self._resume_dir = checkpoint
            if self.has_stages:
                if self.args.dataloader_num_workers > 0 and self.args.dataloader_persistent_workers:
                    # Trainer's, measured with the plain Trainer: persistent workers keep the random streams they
                    # were seeded with at the first epoch; the resumed run's new workers are seeded anew.
                    logger.warning(
                        "Resuming with persistent loader workers (dataloader_persistent_workers=True): random "
                        "augmentation drawn in the workers will differ from what the uninterrupted run would have "
                        "drawn, as with Trainer. For an exact resume from a checkpoint at an epoch end, set "
                        "dataloader_persistent_workers=False (the workers then start every epoch from the restored "
                        "random state)."
                    )
        self._attach = (not plain, not plain and plan != "ft" and not hp_outside_loop)
        self._attach_stages(self.model)
        self._stage = "ft" if plain or plan == "ft" else "hp"
        self._unmark_evaluation_prepared_model()
        self._training = True
        self.stopped_at, completed = None, False
        try:
            output = super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )
            completed = True
        except (RuntimeError, ValueError) as error:  # a batch that could not be stacked, or of one sample: say why
            named = error
            if "stack expects each tensor to be equal size" in str(error):
                named = shape_mismatch_error(self.train_dataset, "train_dataset", error)
            elif checkpoint is not None and "parameter group that doesn't match the size" in str(error):
                # torch's error names neither the checkpoint nor the cause: other trainable parts than its writer's
                named = ValueError(
                    f"{checkpoint}'s optimizer state does not fit this run's parameter groups: the trainable parts "
                    f"differ from those of the run that wrote it (this run's head: {self.find_head().head_names}; "
                    "head_modules, reinit_modules or head_type changed, or an earlier headprep_hf version found "
                    "another head, e.g. DistilBERT's pre_classifier joined the head in this version). Resume with "
                    "the settings and version that wrote it, or start a new run."
                )
            elif isinstance(error, ValueError):
                named = single_sample_batch_error(self, error)
            if named is error:
                raise
            raise named from error
        finally:
            if not completed:  # (an error or Ctrl-C: the model is the weights of the last update; the card says so)
                self.stopped_at = (self.state.global_step, self.state.max_steps)
            self._training = False
            self.release_workers()
            if self._stages is not None:
                self.stages.restore(self.model)
            self._attach = (False, False)
            self._attach_stages(self.model)  # (removes the hook)
            self._stage = "ft" if self.stage_plan.ft_started else "hp"
        if self.has_stages:
            broadcast_buffers(self.accelerator.unwrap_model(self.model), self.accelerator)
        stopped_in_hp = plan == "both" and self.stage_plan.hp_steps > 0 and not self.stage_plan.ft_started
        if stopped_in_hp:
            self._note_stopped_hp()
        if plan != "hp" and self.track_dynamics and not stopped_in_hp:  # (HP stopped: nothing of FT was measured)
            self.measurements.write(self.run_output_dir)
        return output

    def create_accelerator_and_postprocess(self) -> None:
        """`Trainer.create_accelerator_and_postprocess`, with the config's checks made first: a search trial's settings
        are applied by `setattr` just before the accelerator is built anew, so that DDP's `find_unused_parameters`
        follows the trial's `hp_epochs` (`HeadPrepConfig._validate_headprep_fields`)."""
        validate = getattr(self.args, "_validate_headprep_fields", None)
        if validate is not None:
            with warnings.catch_warnings():  # (said once already, where the config or the trial's settings were made)
                warnings.simplefilter("ignore", OppositeEnergyWarning)
                validate()
        super().create_accelerator_and_postprocess()

    def _report_to_hp_search(self, trial, step: int, metrics: dict[str, float]) -> None:
        """`Trainer._report_to_hp_search`, for FT's evaluations only, at FT's own step. An evaluation during in-loop HP
        scores the head on a frozen backbone: reported, a pruner compared it with other trials' FT scores at the same
        step (and pruned what would have been the best trial), and FT's were reported at hp_steps + k where a trial
        without HP or with cached HP reports k. Upgrade hazard (a private method Trainer's evaluation calls):
        tests/test_upstream_canaries.py checks it."""
        hp_steps = self.stage_plan.hp_steps if self.stage_plan is not None and self.has_stages else 0
        if hp_steps > 0:
            if step <= hp_steps:
                return
            step -= hp_steps
        super()._report_to_hp_search(trial, step, metrics)

    def _refuse_other_hp_steps(self, plan: str, hp_outside_loop: bool) -> None:
        """The check `set_initial_training_values` makes (the checkpoint's HP steps against this configuration's),
        made before `Trainer.train` loads the checkpoint's weights: refused there, the caller's model already held
        them, and the new run the refusal advises started from finetuned weights. (With `auto_find_batch_size`,
        Trainer restores the batch size after loading; only the later check runs then.)"""
        if self._resume_plan is None or plan == "ft" or self.args.auto_find_batch_size:
            return
        hp_steps = 0
        if self.args.hp_epochs > 0 and not hp_outside_loop:
            loader = self.get_train_dataloader()
            if not has_length(loader):
                return  # (refused by set_initial_training_values, with its own message)
            hp_steps = self.args.hp_epochs * Trainer.set_initial_training_values(self, self.args, loader)[1]
        self._check_resumed_hp_steps(hp_steps)

    def _check_resumed_hp_steps(self, hp_steps: int) -> None:
        if self._resume_plan.hp_steps != hp_steps:
            raise ValueError(
                f"The checkpoint was written with {self._resume_plan.hp_steps} HP steps but this configuration gives "
                f"{hp_steps} ({self._hp_mismatch_cause()}). Resume with the HP settings of the interrupted run."
            )

    def _refuse_changed_settings(self, checkpoint: str) -> None:
        """Refuse to resume `checkpoint` when its `training_args.json` differs from this run's in `RESUME_SETTINGS`
        (a checkpoint without the file, written by another tool, is not compared)."""
        path = os.path.join(checkpoint, TRAINING_ARGS_JSON)
        if not os.path.isfile(path):
            return
        with open(path) as f:
            written = json.load(f)
        current = json.loads(self.args.to_json_string())
        for key in ("head_modules", "reinit_modules"):  # a PEFT model's modules may be named two ways (find_split)
            for settings in (written, current):
                if settings.get(key):
                    settings[key] = module_names_in_wrapper(self.model, settings[key])
        changed = [
            f"{key}: {written[key]!r} -> {current[key]!r}"
            for key in RESUME_SETTINGS
            if key in written and key in current and written[key] != current[key]
        ]
        if changed:
            raise ValueError(
                f"{checkpoint} was written with other settings than this run's ({'; '.join(changed)}): resuming would "
                "mix the two runs. Resume with the checkpoint's settings (its training_args.json), or start a new run "
                "(another output_dir, or overwrite_output_dir=True)."
            )

    def _unmark_evaluation_prepared_model(self) -> None:
        """Let `train()` wrap the model for DDP again after an evaluation that ran before it.

        Trainer's evaluation loop prepares a model that no training prepared yet with
        `accelerator.prepare_model(model, evaluation_mode=True)`, which returns it unwrapped but marks it
        `_is_accelerate_prepared`; the `prepare` at the start of training then returns it as it is, without the
        DistributedDataParallel wrapper: gradients are never averaged across processes, every rank trains its own
        copy, and rank 0 saves a model trained on its shard alone. `evaluate()` before `train()` does this to a plain
        `Trainer` too (transformers 5.24 with accelerate 1.15); cached HP evaluates before FT's training loop by
        itself (`eval_strategy`), so every such multi-process run was hit. Upgrade hazard (accelerate's private
        `_is_accelerate_prepared` and `_models`): tests/test_upstream_canaries.py checks both."""
        model, accelerator = self.model, self.accelerator
        ddp = accelerator.num_processes > 1 and accelerator.distributed_type in DDP_TYPES
        if ddp and self.model_wrapped is model and getattr(model, "_is_accelerate_prepared", False):
            model._is_accelerate_prepared = False
            accelerator._models = [m for m in accelerator._models if m is not model]

    def _refuse_earlier_outputs(
        self, run_dir: str | None = None, who: str = "a new run", owned: set[str] | None = None
    ) -> None:
        # (not this trainer's own outputs, e.g. probe_head()'s before finetune(): `owned`, default
        # `written_outputs`; a new run with stages owns none, a plain run keeps replacing its trainer's own)
        owned = self.written_outputs if owned is None else owned
        if not self.has_stages:
            # A plain run writes what Trainer writes, where Trainer writes it; of the toolkit's own outputs, an
            # earlier run's measurements and prepared head are moved aside (logged) rather than left to pass for this
            # run's or be replaced: its headprep_dynamics.json replaced the earlier run's without a trace.
            if self.track_dynamics and self.args.should_save:
                refuse_earlier_outputs(
                    self.run_output_dir, (PREPARED_HEAD_DIR, DYNAMICS_NAME), self.written_outputs, overwrite=True
                )
            return
        refusal = None
        if self.args.should_save:  # (the ranks that write: they look, and move aside under overwrite_output_dir)
            # Earlier checkpoints too (a new run without overwrite_output_dir refused them already, in
            # `resume_checkpoint`): left in place, resume_from_checkpoint=True took the earlier run's newest one for
            # this run's, and a checkpoint this run wrote again at the same step kept the earlier run's other files.
            output_dir = self.run_output_dir
            earlier = [os.path.relpath(c, output_dir) for c in checkpoints(run_dir)] if run_dir else []
            try:
                refuse_earlier_outputs(
                    output_dir,
                    (PREPARED_HEAD_DIR, DYNAMICS_NAME, *earlier, *final_outputs(output_dir)),
                    owned,
                    overwrite=self.args.overwrite_output_dir,
                    who=who,
                )
            except ValueError as error:
                refusal = str(error)
        if self.accelerator.num_processes > 1:
            # Every rank refuses, not only those that looked: the others went on into training and waited in its
            # first collective until the refused process ended (then a bare "Connection closed by peer").
            from accelerate.utils import gather_object

            refusal = next((r for r in gather_object([refusal]) if r), None)
        if refusal:
            raise ValueError(refusal)

    def _load_stage_state(self, checkpoint: str, plan: str, saved: StagePlan) -> None:
        """The resumed run takes the checkpoint's stage state (`saved`, its plan), after every refusal."""
        self._resume_start_head(checkpoint, saved, apply=True)
        self.stage_plan.ft_started = saved.ft_started
        if saved.hp_done and plan == "ft":  # (probe_head() ran on the trainer that wrote it: the card's tau)
            self.hp_done = self.stage_plan.hp_done = True
        if not self.measurements.load(checkpoint) and self.track_dynamics and saved.ft_started:
            logger.warning(
                "%s holds no measurement state (written with track_dynamics=False, or by transformers.Trainer): "
                "energy and drift are not measured in this run.",
                checkpoint,
            )
        self.resumed_stage = "ft" if saved.ft_started else "hp"

    def _resume_start_head(self, checkpoint: str, saved: StagePlan, apply: bool) -> None:
        """The prepared head the checkpoint's run started from is the resumed run's: the resuming model's record
        (`load_prepared_head`) must be the same head, and a model that loaded none takes the checkpoint's (its weights
        come from the checkpoint). Refused before Trainer loads the weights: the card reported whichever head the
        resuming process had loaded (tau 4 for a run started from tau 1), or tau 0. `apply=False` only refuses; the
        record is taken with `apply=True`, after the resume's other refusals."""
        if saved.start_head == "unrecorded":  # (a checkpoint of an earlier version)
            return
        model = self.accelerator.unwrap_model(self.model)
        current = prepared_head_record(model)

        def same(a, b) -> bool:  # (the source is where it was loaded from: the same head may come from elsewhere)
            return {k: v for k, v in (a or {}).items() if k != "source"} == {
                k: v for k, v in (b or {}).items() if k != "source"
            }

        if current is None and saved.start_head is not None:
            if apply:
                restore_prepared_head_record(model, saved.start_head)
        elif not same(current, saved.start_head):
            then = saved.start_head
            then = (
                f"the prepared head of tau={then.get('tau')} from {then.get('source')}" if then else "no prepared head"
            )
            raise ValueError(
                f"{checkpoint} is of a run that started from {then}, but this model carries the prepared head of tau="
                f"{current.get('tau')} from {current.get('source')}: the resumed run goes on from the checkpoint's "
                "weights, and its card would name the other head. Resume with the model that run started from "
                "(load the same prepared head, or none), or start a new run from this head."
            )
        if apply:
            self.stage_plan.start_head = saved.start_head

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint`, made atomic (see `headprep_hf.checkpoints`): the folder is marked before the
        first file, the stage plan and measurement state are written beside Trainer's files, then the checkpoint is
        committed (manifest of sizes and sha256, written last) and only then are old checkpoints rotated out."""
        folder = self.checkpoint_dir()
        if self.guard.active:  # nothing non-finite becomes a checkpoint; the last good one stays
            self.guard.check()
            check_finite(self.accelerator.unwrap_model(self.model).state_dict(), f"checkpoint {folder}")
        self._checked_finite = True  # (Trainer's save_model inside need not check the same weights again)
        try:
            self._write_checkpoint(model, trial, folder)
        finally:
            self._checked_finite = False

    def _write_arguments(self, folder: str, binary: bool = True) -> None:
        """The training arguments as `Trainer._save` writes them (`training_args.bin`; `binary=False`: Trainer wrote
        it), and as JSON beside them, readable without unpickling."""
        if binary:
            torch.save(self.args, os.path.join(folder, TRAINING_ARGS_NAME))
        with open(os.path.join(folder, TRAINING_ARGS_JSON), "w") as f:
            f.write(self.args.to_json_string())

    def _write_checkpoint(self, model, trial, folder: str) -> None:
        if not self.writes_stage_state:
            return super()._save_checkpoint(model, trial)
        if self.track_dynamics:
            self.measurements.before_checkpoint()
        if self.args.should_save:
            begin_write(folder)
        self.accelerator.wait_for_everyone()  # the mark (and a torn leftover removed) before any rank writes
        # Rotation and the Hub upload (`hub_strategy="checkpoint"`/`"all_checkpoints"`) wait for the commit: an
        # upload started inside Trainer's save would send the folder with its write mark and without the stage plan.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        push, self.args.push_to_hub = self.args.push_to_hub, False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit, self.args.push_to_hub = limit, push
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states) are written
        if self.args.should_save:
            self._write_arguments(folder)  # (written inside with the two settings held back: the run's own)
            self.stage_plan.save(folder)
            if self.track_dynamics:
                self.measurements.save(folder)
            commit(folder)
        if push:
            self._push_from_checkpoint(folder)  # (as Trainer: every rank calls it, the main process uploads)
        if self.args.should_save:
            rotate_checkpoints(self._get_output_dir(trial), limit, self.state.best_model_checkpoint, use_mtime=True)

    def _load_best_model(self) -> None:
        # Override (pinned by tests/test_upstream_canaries.py): `load_best_model_at_end` loads the best checkpoint's
        # weights; they are checked against the checkpoint's manifest first (Trainer loads them unchecked: a damaged
        # file became the final model without a word).
        best = self.state.best_model_checkpoint
        verify(  # (the manifest only: DeepSpeed ZeRO-3, FSDP sharded and PEFT checkpoints hold other weight files)
            best,
            use="loaded as the best model",
            fix="the model of the last update is kept (save it with trainer.save_model()); the damaged checkpoint "
            "stays for inspection",
        )
        super()._load_best_model()

    @property
    def run_output_dir(self) -> str:
        """The folder of this run's own outputs (run lock, `headprep_dynamics.json`, `prepared_head/`):
        `args.output_dir`, or in a `hyperparameter_search` trial the trial's folder in it (`run-<id>`, where `Trainer`
        writes the trial's checkpoints), so that trials neither replace nor lock out each other's results."""
        return Trainer._get_output_dir(self, self._trial_for_dir)

    def checkpoint_dir(self) -> str:
        """The folder of the checkpoint the Trainer writes at the current step."""
        return os.path.join(
            self._get_output_dir(self._trial_for_dir), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        # probe_head() and finetune() each restart global_step at 0: separate folders keep checkpoint names apart.
        return run_dir if self.stage_plan.plan == "both" else os.path.join(run_dir, self.stage_plan.plan)

    def _check_all_labels(self, plan: str) -> None:
        # Empty datasets are named (an empty evaluation set with stages only: a plain run takes it, as Trainer does).
        # Labels are checked when the trainer's loss says what they must be; a model computing its own loss gets its
        # labels as they are (as with Trainer).
        check_not_empty(self, evaluation=self.has_stages)
        check_item_format(self)
        checked = self._checks_labels(plan)
        check_label_key(self, checked and not self._may_take_own_loss(plan))
        # (read here, before training, for the start-of-FT energy: `MeasurementCallback._can_measure_energy`)
        if self.track_dynamics:
            keys_without_labels(self, self.energy_dataset if self.energy_dataset is not None else self.train_dataset)
        if checked:
            check_trainer_datasets(self)
            self._refuse_regression_smoothing(plan)

    def _refuse_regression_smoothing(self, plan: str) -> None:
        """Label smoothing has no meaning for regression targets: the loss ignored it, while the measurements and the
        sweep recorded the run as smoothed (two runs differing only in it trained bit-identical heads)."""
        if self.problem_type != "regression":
            return
        stages = {"hp": ("hp",), "ft": ("ft",), "both": ("hp", "ft")}[plan]
        given = []
        for stage in stages:
            if stage == "hp" and self.args.hp_epochs == 0 or not self.uses_trainer_loss(stage=stage):
                continue
            for name in (f"{stage}_label_smoothing", "label_smoothing_factor"):  # (the stage's, else Trainer's)
                if getattr(self.args, name) > 0:
                    given.append(f"{name}={getattr(self.args, name)}")
                    break
        given = list(dict.fromkeys(given))
        if given:
            raise ValueError(
                f"{', '.join(given)} with a regression task: label smoothing applies to class labels, and a "
                "regression loss ignores it. Set it to 0 (or declare the problem type the labels have)."
            )

    def check_labels_of(self, **datasets) -> None:
        """Check datasets that will be evaluated after training (`test_dataset=...`) as `train()` checks its own, so
        that a bad label stops the run before training rather than after it (the error names the keyword)."""
        if self._checks_labels("both"):
            check_trainer_datasets(self, {name: d for name, d in datasets.items() if d is not None})

    def _may_take_own_loss(self, plan: str) -> bool:
        """Whether every step of `plan` may train with a loss the model returns although its forward takes no labels
        (`_own_loss_of_labelless_model`): nothing asks for the trainer's loss and no stage is cached HP. Such a model
        (e.g. `ViTMAEForPreTraining`) trains with `Trainer` on data without labels."""
        hp = self.args.hp_epochs > 0 and plan in ("hp", "both")
        stages = (("hp",) if hp else ()) + (("ft",) if plan in ("ft", "both") else ())
        if self.model_takes_labels or self.compute_loss_func is not None or (hp and self.args.hp_cache_features):
            return False
        return not any(self._trainer_loss_asked(True, stage) for stage in stages)

    def _checks_labels(self, plan: str) -> bool:
        """Whether the trainer's loss computes the loss in a stage that `plan` ("hp", "ft", "both") runs: cached HP
        always (it trains the head on its cache with `loss_from_logits`), else as `uses_trainer_loss` says for each
        stage (asked by name: the current one is still "hp" before a run starts). Not a model computing its own loss,
        even one whose config declares a problem type: Trainer hands it the labels as they are (soft multi-label
        targets for its BCE)."""
        hp = self.args.hp_epochs > 0 and plan in ("hp", "both")
        stages = (("hp",) if hp else ()) + (("ft",) if plan in ("ft", "both") else ())
        if hp and self.args.hp_cache_features:
            return True
        return self.compute_loss_func is None and any(self.uses_trainer_loss(stage=stage) for stage in stages)

    def _hp_mode_hook(self, module: nn.Module, args):
        # Before every forward of the root module; Trainer.training_step has just called model.train().
        if module.training and self._stage == "hp" and self.is_in_train:
            self.stages.set_hp_modes(module)

    # ------------------------------------------------------------------ outputs
    @contextlib.contextmanager
    def _recording_outputs(self, folder: str):
        """Note the final outputs (`FINAL_OUTPUT_NAMES`) written into `folder` inside the block as this trainer's
        own (`written_outputs`): a later stage of the same trainer (`probe_head()`, `save_model()`, then
        `finetune()`) may replace them, where a new run would refuse or move them aside."""
        before = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in final_outputs(folder)}
        try:
            yield
        finally:
            for name in final_outputs(folder):
                path = os.path.join(folder, name)
                if before.get(name) != os.stat(path).st_mtime_ns:
                    self.written_outputs.add(os.path.abspath(path))

    def save_metrics(self, split, metrics, combined=True):
        """`Trainer.save_metrics`; the files are this trainer's own outputs (`_recording_outputs`)."""
        with self._recording_outputs(self.args.output_dir):
            super().save_metrics(split, metrics, combined)

    def save_state(self):
        """`Trainer.save_state`; `trainer_state.json` is this trainer's own output (`_recording_outputs`)."""
        with self._recording_outputs(self.args.output_dir):
            super().save_state()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus the training arguments as JSON (`training_args.json`) beside Trainer's
        `training_args.bin`, so they can be read without unpickling, and, for a timm model, timm's `config.json`
        (architecture, `num_classes`, `label_names`, the data config): the folder then loads with
        `timm.create_model("local-dir:<folder>")` (`headprep_hf.export.write_timm_config`). The weights stay the
        Trainer's `model.safetensors`; transformers models describe themselves through `save_pretrained`."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        # (also Trainer's internal calls: `push_to_hub`; and before any run, by the policy the runs would have: the
        # guard starts with a run, and a trainer built to export a loaded model wrote and uploaded NaN weights)
        if (self.guard.active or self._guard_policy() != "ignore") and not self._checked_finite:
            check_finite(
                model.state_dict(),
                f"the model in {output_dir}",
                trained=self.state.global_step > 0 or bool(self.hp_done),
            )
        with self._recording_outputs(output_dir):
            super().save_model(output_dir, _internal_call)
            if self.args.should_save and os.path.isdir(output_dir):
                self._write_arguments(output_dir, binary=False)
                if is_timm_model(model):
                    write_timm_config(model, output_dir)
        if self.args.should_save and os.path.isdir(output_dir) and not is_timm_model(model):
            if isinstance(model, PreTrainedModel) and any(isinstance(m, MLPHead) for m in model.modules()):
                # save_pretrained's config.json describes the architecture's own (linear) classifier: from_pretrained
                # would load the folder with a random classifier in place of the trained MLP head, without an error.
                logger.warning(
                    "%s holds a transformers model whose classifier was replaced by an MLP head (head_type='mlp'): "
                    "AutoModel...from_pretrained(%r) would build a linear classifier and leave it random. Load the "
                    "weights into a model rebuilt with headprep_hf.heads.replace_head_with_mlp, or use head_type="
                    "'linear' for a folder that transformers loads as it is.",
                    output_dir,
                    output_dir,
                )
