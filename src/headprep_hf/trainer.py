"""`HeadPrepTrainer`: head probing (HP) then finetuning (FT) inside one `transformers.Trainer`.

How the two stages live in one training loop (and why):

* The stage is a function of `state.global_step`: steps `< hp_steps` are HP, the rest FT. A checkpoint therefore
  knows its stage, `checkpoint-N` names never collide, and resuming is exact in either stage.
* The optimizer holds every trainable parameter for the whole run, in fixed groups (head, backbone). During HP the
  backbone has `requires_grad=False` (no gradient, so torch optimizers skip it) and a learning rate of 0. At the
  first FT step the optimizer state is cleared, so FT starts from a fresh optimizer, as if rebuilt.
* The model is wrapped for DDP while everything requires grad, and frozen only afterwards: DDP then all-reduces the
  backbone's gradients in FT. (Freezing before wrapping leaves the backbone out of DDP: the ranks drift apart
  silently.) `ddp_find_unused_parameters` is forced on because HP leaves the backbone without gradients.
* `Trainer.training_step` calls `model.train()` every step; a forward pre-hook puts the frozen backbone back in
  eval mode during HP, so BatchNorm statistics do not move (unless `hp_backbone_mode="train"`).
* At the first FT step the trainer measures the energy, HP train accuracy, p0 and the probe features z_0; during FT
  the head's gradient norm (every update) and the feature drift (every epoch, evaluation and at the end).

`probe_head()` and `finetune()` run one stage each (each its own `train()` call, with checkpoints under
`output_dir/hp` and `output_dir/ft`); `finetune()` builds a new optimizer, scheduler and DDP wrapper.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint, has_length

from .batchnorm import recompute_statistics, restored_statistics, tracked_batchnorms
from .config import HeadPrepConfig
from .dynamics import DRIFT_KEYS, drift_metrics, forked_rng, grad_norm, histogram, measure, probe_in_memory
from .feature_cache import CachedHeadProbing
from .heads import reinitialize_module, replace_head_with_mlp
from .labels import check_dense_shapes, check_labels, check_task_labels
from .losses import count_items, resolve_problem_type, task_loss
from .schedules import StageSchedule
from .split import ModelCaller, ModelSplit, extract_logits, find_split

logger = logging.getLogger(__name__)

STATE_NAME = "headprep_state.json"
FEATURES_NAME = "headprep_state.safetensors"
DYNAMICS_NAME = "headprep_dynamics.json"
TRAINING_ARGS_JSON = "training_args.json"
PREPARED_HEAD_DIR = "prepared_head"
_STAGE_LOG_KEYS = ("loss", "grad_norm", "learning_rate")
_PLANS = ("both", "hp", "ft")


class _DynamicsCallback(TrainerCallback):
    """Measures drift at FT epoch ends, evaluations and the end of training; logs at the HP/FT boundary."""

    def __init__(self, trainer: HeadPrepTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        # One log exactly at the boundary keeps the loss of the two stages in separate records.
        if (
            self.trainer._plan == "both"
            and state.global_step == self.trainer._hp_steps > 0
            and args.logging_strategy != "no"
        ):
            control.should_log = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer._measure_drift()
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        self.trainer._measure_drift()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._measure_drift()
        return control


class HeadPrepTrainer(Trainer):
    r"""
    A [`~transformers.Trainer`] that prepares the task head before finetuning (Ren et al., ICLR 2023).

    `train()` runs head probing for `args.hp_epochs` epochs (backbone frozen, BatchNorm statistics fixed) and then
    finetunes everything for `args.num_train_epochs` epochs (or `args.max_steps` steps), measuring what the paper
    measures into `trainer.dynamics` (also written to `output_dir/headprep_dynamics.json` and logged):

    * `energy`: mean over the training set of `||e_y - softmax(q)||_2` at the start of FT (hard labels, eval mode),
    * `hp_train_accuracy`, `p0` (true-class probability per training sample) and its histogram,
    * `drift`: on the probe set, mean `||z_t-z_0||^2`, `z_t.z_0`, `||z_t||^2`, `cos(z_t, z_0)` during FT,
    * `head_grad_norm`: the head's gradient norm at each logging step of FT.

    Args:
        model: The model with its new task head (timm model, `TimmWrapperForImageClassification`, transformers
            `*ForImageClassification`, or any module with `head_modules` set in `args`).
        args: A [`HeadPrepConfig`].
        train_dataset / eval_dataset / data_collator / compute_metrics / callbacks / ...: as for `Trainer`. Batches
            are dicts with the model inputs and `labels`.
        drift_dataset: Probe set for the drift measurement; default: the first `args.drift_probe_samples`
            training samples.
        energy_dataset: The data of the energy, HP train accuracy and p0 at FT start; default: the training set as
            training reads it (with its augmentation). Pass the training samples with the evaluation transform to
            measure the energy of the un-augmented training data.
        split: An explicit [`ModelSplit`]; default: found by `find_split` (or `args.head_modules`).

    Example:

    ```python
    import timm
    from headprep_hf import HeadPrepConfig, HeadPrepTrainer

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
    # Our compute_loss returns a per-batch mean; the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

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
        if model is None:
            raise ValueError(
                "HeadPrepTrainer needs a model (model_init is not supported: the head split is per model)."
            )
        if args is None:
            args = HeadPrepConfig(output_dir="tmp_trainer")
        if not isinstance(args, HeadPrepConfig):
            raise TypeError(f"args must be a HeadPrepConfig, got {type(args).__name__}.")
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers is not None and any(o is not None for o in optimizers):
            raise ValueError(
                "HeadPrepTrainer builds its own two-stage optimizer and schedule; pass optimizer_cls_and_kwargs "
                "or set args.optim / args.lr_scheduler_type instead of optimizers=(...)."
            )

        # The new head is initialised here, so seed first: the same seed gives the same head.
        from transformers import set_seed

        set_seed(args.seed)
        self.split = split or find_split(model, args.head_modules, args.reinit_modules)
        if args.head_type == "mlp":
            replace_head_with_mlp(model, self.split, args.mlp_hidden_size, args.mlp_num_layers)
        for name in self.split.reinit_names:
            reinitialize_module(model.get_submodule(name))

        super().__init__(model, args, *trainer_args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.drift_dataset = drift_dataset
        self.energy_dataset = energy_dataset
        self._call_model = ModelCaller(self.accelerator.unwrap_model(self.model), self.label_names)
        self.problem_type = resolve_problem_type(args.problem_type, model)
        self._hook_handle = self.model.register_forward_pre_hook(self._hp_mode_hook)
        self.add_callback(_DynamicsCallback(self))

        self.dynamics: dict[str, Any] = {}
        self.resumed_stage: str | None = None
        self._plan = "both"
        self._train_calls = 0
        self._hp_steps = 0
        self._ft_steps = 0
        self._stage = "hp"
        self._ft_started = False
        self._z0: torch.Tensor | None = None
        self._last_drift_step: int | None = None
        self._resume_state: dict | None = None
        self._user_requires_grad: dict[str, bool] = {}
        self._applied_stage: str | None = None
        self._head_params: list[nn.Parameter] = []  # set per run in _run (the head may be replaced before)
        self._in_training_step = False
        self._hp_outside_loop = False  # HP ran on cached features before the training loop (FT-only loop)
        self._probe_loader = None
        self._probe_set = None
        self._feature_cache = None  # set by cached HP while its head trains
        self._reset_grad_norm_window()

    # ------------------------------------------------------------------ public stages
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """HP for `args.hp_epochs` epochs, then FT; `resume_from_checkpoint` resumes in whichever stage it was.

        With `hp_cache_features=True`, HP runs on cached features first and the training loop (and its checkpoints)
        covers FT only; resuming such a run restarts from its last FT checkpoint without redoing HP.
        """
        self._hp_outside_loop = self.args.hp_cache_features and self.args.hp_epochs > 0
        if self._hp_outside_loop and resume_from_checkpoint in (None, False):
            self._plan = "hp"
            self._check_all_labels()
            self._probe_head_cached()
        return self._run("both", resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def probe_head(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        """HP only: train the head (and `reinit_modules`) for `args.hp_epochs` epochs with the backbone frozen.

        Afterwards `dynamics` holds the energy, HP train accuracy and p0 of the prepared head.
        """
        if self.args.hp_epochs == 0 or (self.args.hp_cache_features and not resume_from_checkpoint):
            self._plan = "hp"
            self._hp_outside_loop = False
            self._check_all_labels()
            metrics = self._probe_head_cached() if self.args.hp_epochs > 0 else {}
            if self.args.hp_epochs == 0:
                self._prepare_bn_statistics()  # (cached HP did it on its cache)
            if self.args.track_dynamics:
                self.measure_start()
            self._write_dynamics()
            self._write_prepared_head()
            return TrainOutput(self.state.global_step, metrics.get("hp_loss", 0.0), metrics)
        self._hp_outside_loop = False
        output = self._run("hp", resume_from_checkpoint, **kwargs)
        self._prepare_bn_statistics()
        if self.args.track_dynamics:
            self.measure_start()
        self._write_dynamics()
        self._write_prepared_head()
        return output

    def finetune(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        """FT only, from the current head: everything trains with a fresh optimizer and schedule."""
        self._hp_outside_loop = False
        return self._run("ft", resume_from_checkpoint, **kwargs)

    def _probe_head_cached(self) -> dict[str, float]:
        if self._train_calls > 0:
            self._reset_for_new_stage()
        self._train_calls += 1
        metrics = CachedHeadProbing(self).train()
        self._stage = "hp"
        self._sync_buffers()
        return metrics

    def save_prepared_head(self, save_directory: str, backbone_id: str | None = None) -> str:
        """Save the current head as a small prepared-head artifact (`head.safetensors` + `headprep_head.json`).

        Call it after `probe_head()`; `load_prepared_head(model, save_directory)` attaches it to a backbone again.
        Only the main process writes. Returns the folder.
        """
        from .hub import save_prepared_head

        if self.args.should_save:
            save_prepared_head(self, save_directory, backbone_id=backbone_id)
        self.accelerator.wait_for_everyone()
        return str(save_directory)

    def push_head_to_hub(self, repo_id: str, backbone_id: str | None = None, **kwargs) -> str:
        """Upload the current head as a prepared-head repo (weights, json, card); see `hub.push_head_to_hub`."""
        from .hub import push_head_to_hub

        url = push_head_to_hub(self, repo_id, backbone_id=backbone_id, **kwargs) if self.args.should_save else ""
        self.accelerator.wait_for_everyone()
        return url

    def create_model_card(
        self,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
        sweep: dict | None = None,
        metrics: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        """Write `output_dir/README.md`: HP/FT settings, energy, drift, `metrics` and a sweep's tau* (`sweep`, the
        content of a `sweep.json`). Also what `push_to_hub()` uploads."""
        from .cards import finetuned_model_card

        if not self.is_world_process_zero():
            return
        if finetuned_from is None:
            cfg = getattr(self.accelerator.unwrap_model(self.model), "pretrained_cfg", None) or {}
            finetuned_from = cfg.get("hf_hub_id")
        card = finetuned_model_card(
            self,
            model_name=model_name or os.path.basename(os.path.normpath(self.args.output_dir)),
            base_model=finetuned_from,
            sweep=sweep,
            metrics=metrics,
            tags=[tags] if isinstance(tags, str) else tags,
            license=license,
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def _write_prepared_head(self) -> None:
        # At the end of HP (after its measurements): a small artifact FT can start from elsewhere.
        if self.args.save_prepared_head and self.args.should_save:
            from .hub import save_prepared_head

            save_prepared_head(self, os.path.join(self.args.output_dir, PREPARED_HEAD_DIR))

    def recompute_bn_statistics(self) -> int:
        """Recompute the running statistics of the BatchNorm layers HP trains (head, `reinit_modules`) for the
        current weights: one pass over the training set in the HP modes (during cached HP: over the cached features),
        cumulative average; see `headprep_hf.batchnorm`. Done at the end of HP when `hp_recompute_bn_stats`.

        Returns:
            The number of BatchNorm layers recomputed (0 when the HP modules have none).
        """
        model = self.accelerator.unwrap_model(self.model)
        hp_modules = self.split.hp_modules(model)
        layers = tracked_batchnorms(hp_modules)
        if not layers:
            return 0
        cache = self._feature_cache
        batch_size = self._measurement_loader_batch_size()

        def over_cache() -> None:  # every rank holds the whole cache: no reduction needed
            device = next(model.parameters()).device
            for view in cache.features:
                for start in range(0, view.shape[0], batch_size):
                    self.split.head_logits(model, view[start : start + batch_size].to(device))

        def over_train_set() -> None:
            loader = self._measurement_loader(self.train_dataset)
            with forked_rng(self.args.seed):  # seeded views; the training RNG does not move
                for batch in loader:
                    with self.autocast_smart_context_manager():
                        self._call_model(model, batch)

        if cache is None:
            self._sync_buffers()
        recompute_statistics(
            layers,
            hp_modules,
            model,
            over_cache if cache is not None else over_train_set,
            accelerator=None if cache is not None else self.accelerator,
        )
        return len(layers)

    def _prepare_bn_statistics(self) -> None:
        if self.args.hp_recompute_bn_stats:
            self.recompute_bn_statistics()

    def prepared_hp_state_dict(self) -> dict[str, torch.Tensor]:
        """`hp_state_dict()` of the head as `probe_head()` would leave it at this point: BatchNorm statistics
        recomputed (`hp_recompute_bn_stats`). The live statistics are put back, so HP can go on (sweep snapshots)."""
        if not self.args.hp_recompute_bn_stats:
            return self.hp_state_dict()
        model = self.accelerator.unwrap_model(self.model)
        with restored_statistics(tracked_batchnorms(self.split.hp_modules(model))):
            self.recompute_bn_statistics()
            return self.hp_state_dict()

    def hp_state_dict(self) -> dict[str, torch.Tensor]:
        """Copy of everything head probing changes: the head and `reinit_modules` (parameters and buffers), plus
        every buffer of the model when `hp_backbone_mode="train"` (BatchNorm statistics move then).

        Loading it (`model.load_state_dict(sd, strict=False)`) onto the pretrained model reproduces the prepared
        model FT starts from; the sweep saves one per tau.
        """
        model = self.accelerator.unwrap_model(self.model)
        buffers = {n for n, _ in model.named_buffers()} if self.args.hp_backbone_mode == "train" else set()
        return {
            n: t.detach().clone().cpu()
            for n, t in model.state_dict().items()
            if self.split.is_hp_trainable(n) or n in buffers
        }

    @property
    def current_stage(self) -> str:
        """`"hp"` or `"ft"`: the stage of the next (or current) update."""
        return self._stage

    @property
    def current_label_smoothing(self) -> float:
        """Label smoothing of the current stage (for subclasses that override `compute_loss`)."""
        return self.args.hp_label_smoothing if self._stage == "hp" else self.args.ft_label_smoothing

    # ------------------------------------------------------------------ orchestration
    def _run(self, plan: str, resume_from_checkpoint, trial=None, ignore_keys_for_eval=None, **kwargs):
        if plan not in _PLANS:
            raise ValueError(f"Unknown plan {plan!r}.")
        self._plan = plan
        if self._train_calls > 0:
            self._reset_for_new_stage()
        self._train_calls += 1
        self._check_all_labels()

        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self._get_output_dir(trial))
            if checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True but no checkpoint in {self._get_output_dir(trial)}.")
        elif checkpoint is False:
            checkpoint = None
        if checkpoint is None and not self.args.overwrite_output_dir:
            run_dir = self._get_output_dir(trial)
            existing = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
            if existing is not None:
                raise ValueError(
                    f"output_dir {run_dir} already holds checkpoints of an earlier run ({existing}); a new run would "
                    "overwrite them. Resume it with resume_from_checkpoint=True, pick another output_dir, or set "
                    "overwrite_output_dir=True."
                )

        self._ft_started = False
        self._z0 = None
        self._last_drift_step = None
        self._resume_state = None
        self.resumed_stage = None
        self._reset_grad_norm_window()
        if plan in ("both", "ft"):
            self.dynamics.pop("drift", None)
            self.dynamics.pop("head_grad_norm", None)
        if checkpoint is not None:
            self._load_headprep_state(checkpoint)

        self._user_requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self._head_params = [p for _, p in self.split.head_parameters(self.model)]
        self._probe_loader = None  # Trainer.train() frees Accelerate's prepared loaders
        self._applied_stage = None
        try:
            output = super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )
        finally:
            self._set_requires_grad("ft")
            self._stage = "ft" if self._ft_started else "hp"
        self._sync_buffers()
        if plan != "hp":
            self._write_dynamics()
        return output

    def _reset_for_new_stage(self) -> None:
        # A new stage gets a new optimizer, schedule and DDP wrapper: the old wrapper was built for the previous
        # stage's trainable set and reusing it can leave ranks out of sync.
        self.optimizer = None
        self.lr_scheduler = None
        self.model_wrapped = self.model

    def _check_all_labels(self) -> None:
        if self.split.num_classes is None:
            return
        label_name = self.label_names[0] if self.label_names else "labels"
        datasets = [("train_dataset", self.train_dataset), ("energy_dataset", self.energy_dataset)]
        if isinstance(self.eval_dataset, dict):
            datasets += [(f"eval_dataset[{k!r}]", v) for k, v in self.eval_dataset.items()]
        elif self.eval_dataset is not None:
            datasets.append(("eval_dataset", self.eval_dataset))
        for name, dataset in datasets:
            if dataset is None:
                continue
            if callable(getattr(dataset, "check_samples", None)):  # the dataset checks its raw samples itself
                dataset.check_samples(self.split.num_classes, name=name, ignore_index=self.args.ignore_index)
            elif self.problem_type != "single_label_classification":
                check_task_labels(dataset, self.split.num_classes, name, self.problem_type, label_name)
            else:
                check_dense_shapes(dataset, name, label_name)
                check_labels(dataset, self.split.num_classes, name, label_name, self.args.ignore_index)

    def set_initial_training_values(self, args, dataloader):
        values = list(super().set_initial_training_values(args, dataloader))
        num_train_epochs, steps_per_epoch, num_examples, _, total_batch, steps_in_epoch, max_steps = values
        if not has_length(dataloader):
            raise ValueError("HeadPrepTrainer counts HP in epochs and needs a training dataset with a length.")
        hp_steps = args.hp_epochs * steps_per_epoch if self._plan != "ft" and not self._hp_outside_loop else 0
        ft_steps = max_steps if self._plan != "hp" else 0
        if self._resume_state is not None:
            saved = (self._resume_state["hp_steps"], self._resume_state["ft_steps"])
            if saved != (hp_steps, ft_steps):
                raise ValueError(
                    f"The checkpoint was written for {saved[0]} HP + {saved[1]} FT steps but this configuration "
                    f"gives {hp_steps} + {ft_steps} (hp_epochs, num_train_epochs/max_steps, batch size or dataset "
                    "differ). Resume with the settings of the interrupted run."
                )
        self._hp_steps, self._ft_steps = hp_steps, ft_steps
        total = hp_steps + ft_steps
        if total == 0:
            raise ValueError("Nothing to train: hp_epochs and num_train_epochs/max_steps give 0 steps.")
        num_train_epochs = math.ceil(total / steps_per_epoch)
        num_train_samples = num_examples * total / steps_per_epoch
        return num_train_epochs, steps_per_epoch, num_examples, num_train_samples, total_batch, steps_in_epoch, total

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        # probe_head() and finetune() each restart global_step at 0: separate folders keep checkpoint names apart.
        return run_dir if self._plan == "both" else os.path.join(run_dir, self._plan)

    # ------------------------------------------------------------------ optimizer and schedule
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model
        decay = set(self.get_decay_parameter_names(opt_model))
        hp_decay = self.args.weight_decay if self.args.hp_weight_decay is None else self.args.hp_weight_decay
        groups = []
        for part in ("head", "backbone"):
            for with_decay in (True, False):
                params = [
                    p
                    for n, p in opt_model.named_parameters()
                    if p.requires_grad
                    and self.split.is_hp_trainable(n) == (part == "head")
                    and (n in decay) == with_decay
                ]
                if not params:
                    continue
                weight_decay = (hp_decay if part == "head" else self.args.weight_decay) if with_decay else 0.0
                groups.append(
                    {
                        "params": params,
                        "weight_decay": weight_decay,
                        "lr": 1.0,  # the scheduler's factors are absolute learning rates
                        "headprep_part": part,
                        "headprep_decay": with_decay,
                    }
                )
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model")}
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        optimizer = optimizer if optimizer is not None else self.optimizer
        hp_steps = self._hp_steps
        ft_steps = max(num_training_steps - hp_steps, 0)
        ft_kind = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
        lambdas = []
        for group in optimizer.param_groups:
            is_head = group.get("headprep_part", "head") == "head"
            lambdas.append(
                StageSchedule(
                    hp_steps=hp_steps,
                    ft_steps=ft_steps,
                    hp_lr=self.args.hp_learning_rate if is_head else 0.0,
                    ft_lr=self.args.learning_rate,
                    hp_kind=self.args.hp_lr_scheduler_type,
                    ft_kind=ft_kind,
                    hp_warmup=math.ceil(self.args.hp_warmup_ratio * hp_steps),
                    ft_warmup=self.args.get_warmup_steps(ft_steps),
                )
            )
        self.lr_scheduler = LambdaLR(optimizer, lambdas)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------ stage mechanics
    def _set_requires_grad(self, stage: str) -> None:
        if self._applied_stage == stage:
            return
        for name, param in self.model.named_parameters():
            user_flag = self._user_requires_grad.get(name, param.requires_grad)
            param.requires_grad_(user_flag and (stage == "ft" or self.split.is_hp_trainable(name)))
        self._applied_stage = stage

    def _hp_mode_hook(self, module: nn.Module, args):
        # Runs before every forward of the root module; Trainer.training_step has just called model.train().
        if module.training and self._stage == "hp" and self.args.hp_backbone_mode == "eval" and self.is_in_train:
            module.eval()
            for sub in self.split.hp_modules(module):
                sub.train()

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        in_hp = self.state.global_step < self._hp_steps
        if not in_hp and not self._ft_started:
            self._begin_ft()
        self._stage = "hp" if in_hp else "ft"
        self._set_requires_grad(self._stage)
        # Smoothing applies to training losses only. (model.training cannot tell: during HP the frozen backbone, and
        # with it the root module, is in eval mode.)
        self._in_training_step = True
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_training_step = False
        if not in_hp and self.args.track_dynamics and self.accelerator.sync_gradients:
            norm = grad_norm(self._head_params)
            if norm is not None:
                self._grad_norm_sum = self._grad_norm_sum + norm.detach()
                self._grad_norm_count += 1
        return loss

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        labels = inputs[self.label_names[0]]
        logits = extract_logits(self._call_model(model, inputs))
        smoothing = self.current_label_smoothing if self._in_training_step else 0.0
        loss = self.loss_from_logits(logits, labels, smoothing)
        if self._in_training_step and num_items_in_batch is not None:
            # The mean over this micro-batch's items, re-weighted so that the update is the mean over every item of
            # the optimizer step (all micro-batches, all ranks; DDP averages over ranks, hence the world size).
            local = count_items(self.problem_type, labels, self.args.ignore_index)
            loss = loss * (local * self.accelerator.num_processes / num_items_in_batch.clamp(min=1))
        return (loss, {"logits": logits}) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Items (valid labels: not `ignore_index`, not NaN) in an optimizer step's micro-batches, summed over ranks.

        `compute_loss` scales each micro-batch's mean by it, so masked losses (ignored pixels, missing graph labels)
        average over the step's items exactly as one process with the whole batch would, whatever the number of
        ranks and gradient-accumulation steps; the Trainer then does not divide by the accumulation steps."""
        name = self.label_names[0] if self.label_names else "labels"
        if not batch_samples or not all(isinstance(b, dict) and name in b for b in batch_samples):
            self.loss_is_scaled_for_ga = None
            return None
        count = sum(count_items(self.problem_type, b[name], self.args.ignore_index) for b in batch_samples)
        count = torch.as_tensor(count, device=device).reshape(1)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count)
        self.loss_is_scaled_for_ga = True
        return count.sum()

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """The training loss of both stages for `problem_type` (cross-entropy with `ignore_index`, masked BCE or
        masked MSE; `label_smoothing` for the classification types).

        Override this (rather than `compute_loss`) to change the loss for every path, cached HP included.
        """
        return task_loss(self.problem_type, logits, labels, label_smoothing, self.args.ignore_index)

    def _begin_ft(self) -> None:
        self._ft_started = True
        self.dynamics["ft_start_step"] = self.state.global_step
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        # FT starts from a fresh optimizer: no HP momentum or Adam moments carried over.
        optimizer.state.clear()
        for group in optimizer.param_groups:
            if group.get("headprep_part") == "head" and group.get("headprep_decay"):
                group["weight_decay"] = self.args.weight_decay
        if self._plan == "both" and not self._hp_outside_loop:
            self._prepare_bn_statistics()  # HP just ended in this loop (cached HP did it on its cache)
        if self.args.track_dynamics:
            # The measurement iterates its own dataloader inside the training step; keep the step's sync flag.
            sync = self.accelerator.gradient_state.sync_gradients
            self.measure_start()
            self.accelerator.gradient_state._set_sync_gradients(sync)
        if self._plan == "both":
            self._write_prepared_head()

    # ------------------------------------------------------------------ measurements
    def _sync_buffers(self) -> None:
        # DDP copies rank 0's buffers only at the start of a training forward; after the last step each rank holds
        # BatchNorm statistics updated with its own batch. Measurements, evaluation and the saved model must all
        # see rank 0's (the ones saved), or gathered values mix two models.
        if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
            for buffer in self.accelerator.unwrap_model(self.model).buffers():
                torch.distributed.broadcast(buffer.data, src=0)

    def evaluate(self, *args, **kwargs):
        self._sync_buffers()
        return super().evaluate(*args, **kwargs)

    def _measurement_loader(self, dataset):
        # Sequential, sharded across ranks by Accelerate. These passes only run forwards without autograd, which keep
        # a layer or two of activations alive instead of all of them: 4x the training batch fits where training
        # fits, and large batches are what makes forward-only passes fast (CPU: 64 -> 256 costs ~35% less).
        return self._get_dataloader(
            dataset, "headprep", self._measurement_loader_batch_size(), sampler_fn=self._get_eval_sampler
        )

    def _measurement_loader_batch_size(self) -> int:
        return self.args.measure_batch_size or max(
            self.args.per_device_eval_batch_size, 4 * self.args.per_device_train_batch_size
        )

    def _measure_dataset(self, dataset, with_energy: bool, max_features: int, loader=None, seed=None, **kwargs):
        self._sync_buffers()
        return measure(
            self.accelerator.unwrap_model(self.model),
            loader if loader is not None else self._measurement_loader(dataset),
            self._call_model,
            self.split.feature_module(self.accelerator.unwrap_model(self.model)),
            self.accelerator,
            label_name=self.label_names[0],
            with_energy=with_energy,
            max_features=max_features,
            ignore_index=self.args.ignore_index,
            problem_type=self.problem_type,
            autocast=self.autocast_smart_context_manager,
            seed=seed,
            **kwargs,
        )

    def _measure_probe(self) -> torch.Tensor:
        """Features z of the probe set at the current weights.

        The probe loader is built once per run (no new loader or workers per measurement). The probe samples are read
        once, with the RNGs seeded, and kept in memory when they fit (`dynamics.probe_in_memory`); larger probe sets
        are re-read by every pass with the RNGs seeded the same way. Either way a probe set with random augmentation
        gives the same views for z_0 and every z_t.
        """
        if self._probe_loader is None:
            self._probe_set = probe_in_memory(self._probe_dataset(), seed=self.args.seed)
            self._probe_loader = self._measurement_loader(self._probe_set)
        probe = self._probe_set
        return self._measure_dataset(probe, False, len(probe), loader=self._probe_loader, seed=self.args.seed).features

    def _probe_dataset(self):
        if self.drift_dataset is not None:
            return self.drift_dataset
        n = min(self.args.drift_probe_samples, len(self.train_dataset))
        return torch.utils.data.Subset(self.train_dataset, range(n))

    def measure_start(self) -> dict[str, float]:
        """Measure the state FT starts from, at the current weights: energy, HP train accuracy, p0 and z_0.

        Called automatically at the first FT step (and at the end of `probe_head()`); public so that a given model
        state can be measured. Updates and returns `dynamics` entries; the probe features become the new z_0.
        """
        energy_set = self.energy_dataset if self.energy_dataset is not None else self.train_dataset
        n_energy = len(energy_set)
        if self.args.energy_max_samples is not None:
            n_energy = min(n_energy, self.args.energy_max_samples)
        if n_energy < len(energy_set):
            energy_set = torch.utils.data.Subset(energy_set, range(n_energy))
        result = self._measure_dataset(energy_set, with_energy=True, max_features=0)
        z0 = self._z0 = self._measure_probe()
        summary = result.summary()
        p0 = result.p_true
        self.dynamics.update(
            {
                **summary,
                "p0": [None if v != v else round(v, 6) for v in p0.tolist()],  # None: no label / regression
                "p0_histogram": histogram(p0[~torch.isnan(p0)]),
                "num_energy_samples": int(result.energy.shape[0]),
                "num_probe_samples": int(z0.shape[0]),
                "hp_epochs": self.args.hp_epochs,
                "hp_label_smoothing": self.args.hp_label_smoothing,
                "ft_label_smoothing": self.args.ft_label_smoothing,
            }
        )
        self.dynamics.setdefault("ft_start_step", self.state.global_step)
        self._log_measurement({f"headprep/{k}": v for k, v in summary.items() if v is not None})
        if not torch.isnan(p0).all():
            self._log_histogram("headprep/p0", p0[~torch.isnan(p0)])
        return summary

    def measure_drift(self) -> dict[str, float]:
        """Drift of the probe features at the current weights from z_0 (mean `||z_t-z_0||^2`, `z_t.z_0`,
        `||z_t||^2`, `cos(z_t, z_0)`); recorded in `dynamics["drift"]` with the step and epoch."""
        if self._z0 is None:
            raise RuntimeError("No z_0 yet: call measure_start() (or run HP / start FT) before measure_drift().")
        zt = self._measure_probe()
        metrics = drift_metrics(self._z0, zt)
        self.dynamics.setdefault("drift", []).append(
            {"step": self.state.global_step, "epoch": self.state.epoch, **metrics}
        )
        self._log_measurement({f"drift/{k}": metrics[k] for k in DRIFT_KEYS})
        return metrics

    def _measure_drift(self) -> None:
        if not (self.args.track_dynamics and self._ft_started and self._z0 is not None and self.is_in_train):
            return
        step = self.state.global_step
        if step == self._last_drift_step or step == self.dynamics.get("ft_start_step"):
            return
        self._last_drift_step = step
        self.measure_drift()

    def _log_measurement(self, values: dict[str, float]) -> None:
        # Trainer.log only works once training state exists; probe_head() with hp_epochs=0 has none.
        if self.state is not None and self.is_in_train:
            self.log(dict(values))

    def _log_histogram(self, tag: str, values: torch.Tensor) -> None:
        from transformers.integrations import TensorBoardCallback

        for callback in self.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if isinstance(callback, TensorBoardCallback) and writer is not None:
                writer.add_histogram(tag, values[~torch.isnan(values)].numpy(), self.state.global_step)

    def _reset_grad_norm_window(self) -> None:
        self._grad_norm_sum: torch.Tensor | float = 0.0
        self._grad_norm_count = 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        stage = "ft" if self._ft_started else "hp"
        if "loss" in logs and stage == "ft" and self._grad_norm_count > 0:
            value = float(self._grad_norm_sum / self._grad_norm_count)
            logs = {**logs, "head_grad_norm": value}
            self.dynamics.setdefault("head_grad_norm", []).append(
                {"step": self.state.global_step, "epoch": self.state.epoch, "value": value}
            )
            self._reset_grad_norm_window()
        renamed = {}
        for key, value in logs.items():
            if key in _STAGE_LOG_KEYS or key == "head_grad_norm":
                renamed[f"{stage}/{key}"] = value
            elif key.startswith("eval_"):
                renamed[f"eval_{stage}/{key[len('eval_') :]}"] = value
            else:
                renamed[key] = value
        super().log(renamed, start_time)

    # ------------------------------------------------------------------ checkpoints and outputs
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """`Trainer._save`, with the training arguments written as JSON (`training_args.json`) instead of the pickled
        `training_args.bin`: nothing this trainer writes needs unpickling to be read (weights are safetensors)."""
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
        if os.path.isfile(pickled):
            os.remove(pickled)
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w") as f:
            f.write(self.args.to_json_string())

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        state = {
            "stage": "ft" if self._ft_started else "hp",
            "plan": self._plan,
            "global_step": self.state.global_step,
            "hp_steps": self._hp_steps,
            "ft_steps": self._ft_steps,
            "last_drift_step": self._last_drift_step,
            "dynamics": self.dynamics,
        }
        _write_json(os.path.join(folder, STATE_NAME), state)
        if self._z0 is not None:
            save_file({"z0": self._z0.contiguous()}, os.path.join(folder, FEATURES_NAME))

    def _load_headprep_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{checkpoint} has no {STATE_NAME}: it was not written by HeadPrepTrainer.")
        with open(path) as f:
            state = json.load(f)
        if state["plan"] != self._plan:
            method = {"both": "train", "hp": "probe_head", "ft": "finetune"}
            raise ValueError(
                f"{checkpoint} was written by {method[state['plan']]}(); resume it with "
                f"{method[state['plan']]}(resume_from_checkpoint=...), not {method[self._plan]}()."
            )
        self._resume_state = state
        self.dynamics = state["dynamics"]
        self._ft_started = state["stage"] == "ft"
        self._stage = state["stage"]
        self._last_drift_step = state.get("last_drift_step")
        features = os.path.join(checkpoint, FEATURES_NAME)
        if os.path.isfile(features):
            self._z0 = load_file(features)["z0"]
        self.resumed_stage = state["stage"]
        logger.info("Resuming %s in stage %s at step %d.", checkpoint, state["stage"], state["global_step"])

    def _write_dynamics(self) -> None:
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            _write_json(os.path.join(self.args.output_dir, DYNAMICS_NAME), self.dynamics)


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
