"""`HeadPrepConfig`: `TrainingArguments` plus the settings of the head-probing (HP) stage."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .guard import POLICIES
from .launch import check_launch
from .losses import PROBLEM_TYPES
from .schedules import HP_SCHEDULES

HEAD_TYPES = ("linear", "mlp")
BACKBONE_MODES = ("eval", "train")


class ModuleNames(list):
    """The value of `head_modules` and `reinit_modules`: a list of module names, where a string (or a string in the
    list, as the command line's `--reinit_modules layer4.1,layer4.2` gives) is names separated by commas
    (`"layer4.1,layer4.2"`; `""` is none), not its characters. `None` stays `None`, and a value that is not names
    (a number) stays as it is, for the config's check to name the field.

    Its own type because `Trainer.hyperparameter_search` sets each searched value as `type(current value)(value)`:
    with a plain list, a searched `"layer4"` became `list("layer4")`, six one-letter module names. Search spaces
    (Optuna's categorical choices among them) give strings, so a string has to convert here."""

    def __new__(cls, names=()):
        if names is None:  # (Trainer's search casting a searched None: `head_modules`' automatic split)
            return None
        if not isinstance(names, (str, Iterable)):
            # Not names (a searched number): returned as it is, so that the config's check names the field. Raising
            # here would stop Trainer's search inside transformers with no field's name.
            return names
        return super().__new__(cls)

    def __init__(self, names=()):
        if isinstance(names, str):
            names = [names]
        items = list(names)
        names = []
        for item in items:
            if isinstance(item, str):
                names.extend(part.strip() for part in item.split(",") if part.strip())
            else:  # (kept as it is, for the config's check to name)
                names.append(item)
        super().__init__(names)


def _module_names(name: str, value):
    """`value` of `head_modules` or `reinit_modules` as `ModuleNames`: None and no names are `head_modules`' automatic
    split (None) and no `reinit_modules` (an empty list). A `head_modules=[]` given as a list stays, for the config's
    check to refuse; a value that is not names stays, for the check to name."""
    if value is None:
        return None if name == "head_modules" else ModuleNames()
    if name == "head_modules" and type(value) is list and not value:
        return value
    names = ModuleNames(value)
    if not isinstance(names, ModuleNames):  # (not names: kept for the check to name)
        return names
    return None if name == "head_modules" and not names else names


class OppositeEnergyWarning(UserWarning):
    """Raised (as a warning) when HP smooths labels less than FT: the paper's "opposite energy" case (section 5.3)."""


@dataclass
class HeadPrepConfig(TrainingArguments):
    r"""
    Configuration of [`HeadPrepTrainer`]: every [`~transformers.TrainingArguments`] field, which describes the
    finetuning (FT) stage (`learning_rate`, `num_train_epochs`, `lr_scheduler_type`, ...), plus the fields below,
    which describe the head-probing (HP) stage that runs before it and the measurements taken between the two.

    Parameters that control the head-probing stage:
        hp_epochs (`int`, defaults to `4`):
            tau, the number of HP epochs (backbone frozen, only the head trains). `0` is plain finetuning.
        hp_learning_rate (`float`, defaults to `1e-2`):
            Peak learning rate of the head during HP.
        hp_lr_scheduler_type (`str`, defaults to `"constant"`):
            Schedule of the HP learning rate: a step-indexed `lr_scheduler_type` of transformers that needs no
            `lr_scheduler_kwargs` (`"constant"`, `"linear"`, `"cosine"`, `"constant_with_warmup"`, ...), listed in
            `schedules.HP_SCHEDULES` and shaped by `transformers.get_scheduler`.
        hp_warmup_ratio (`float`, defaults to `0.0`):
            Fraction of the HP steps used for a linear warmup.
        hp_weight_decay (`float` or `None`, defaults to `None`):
            Weight decay of the head during HP; `None` uses `weight_decay`.
        hp_label_smoothing (`float`, defaults to `0.0`):
            eps_HP, label smoothing during HP only (the paper's eta_HP = 1 - eps_HP), in [0, 1). With smoothing, the
            stage's loss is the trainer's own (`loss_from_logits`), also for models that compute a loss.
        ft_label_smoothing (`float`, defaults to `0.0`):
            eps_FT, label smoothing during FT, in [0, 1). (`label_smoothing_factor` smooths both stages, as in
            `Trainer`; it cannot be combined with these two.)
        hp_backbone_mode (`str`, defaults to `"eval"`):
            `"eval"` keeps the frozen backbone in eval mode during HP, so BatchNorm statistics do not move.
            `"train"` lets them move, as the paper authors' research code did.
        hp_recompute_bn_stats (`bool`, defaults to `True`):
            At the end of HP, recompute the running statistics of the BatchNorm layers HP trains (head,
            `reinit_modules`) for the final weights: one pass over the training set (the cached features with
            `hp_cache_features`), cumulative average ("precise BN"). Without it, eval-mode measurements at FT start
            (energy, HP train accuracy, p0) use a momentum average over the last HP updates, far off after few of
            them. No effect when those modules have no BatchNorm (the default linear and MLP heads).
        hp_cache_features (`bool`, defaults to `False`):
            Cached-feature HP: run the frozen backbone once over the training set (eval mode), keep the head inputs
            in memory and train the head on them, with the same batches, optimizer, schedule and loss as uncached HP
            (without augmentation the heads compute the same function to float tolerance; a parameter the loss
            cannot see, such as a bias before a BatchNorm layer, can differ under Adam). Needs
            `hp_backbone_mode="eval"` and no `reinit_modules`. Memory: `hp_cache_views x N x feature size` floats.
        hp_cache_views (`int`, defaults to `1`):
            Number of augmented views of the training set to cache (view `e % K` is used in HP epoch `e`); with a
            deterministic training transform one view is exact.

    Parameters that control the task head:
        head_type (`str`, defaults to `"linear"`):
            `"linear"` keeps the model's own classifier; `"mlp"` replaces its last linear layer by an MLP.
        mlp_hidden_size (`int`, defaults to `256`):
            Width of the MLP head's hidden layers (the paper uses 256).
        mlp_num_layers (`int`, defaults to `2`):
            Number of linear layers in the MLP head (>= 2).
        head_modules (`list[str]` or `None`, defaults to `None`):
            Names of the modules that form the head, overriding the automatic split. The input of the first one is
            the feature `z` used by the drift measurements. A string is names separated by commas; `""` is the
            automatic split, as `None`.
        reinit_modules (`list[str]`, defaults to `[]`):
            Partial backbone: backbone modules (e.g. `["layer4.2"]`) that are re-initialised and trained together
            with the head during HP. A string is names separated by commas (`"layer4.1,layer4.2"`; `""` is none),
            so a hyperparameter search can choose among strings. As in the paper, they count as part of the head
            for the measurements: the drift's `z` is the input of the first of them, and `head_grad_norm` includes
            them.

    Parameters that control the measurements:
        track_dynamics (`bool`, defaults to `True`):
            Measure energy, HP train accuracy and p0 at the start of FT, feature drift during FT and the head's
            gradient norm.
        drift_probe_samples (`int` or `None`, defaults to `None`):
            Drift is measured on N training samples, evenly spaced over the set (`i * n // N`: every class of a
            class-sorted set in its share; or on the `drift_dataset` given to the trainer).
            `None`: `min(256, max(64, n // 16))` of the `n` training samples (all of them when fewer), so that the
            per-epoch drift pass stays about 1-2% of a training epoch on small sets (a forward-only pass over n/16
            samples) while the mean over at least 64 samples keeps the statistic (`measurements.default_probe_size`).
        energy_max_samples (`int` or `None`, defaults to `None`):
            Measure the energy on N training samples only, evenly spaced as the drift probe's; `None` uses the
            whole training set.
        energy_from_hp_epoch (`bool`, defaults to `True`):
            Measure the start-of-FT energy, HP train accuracy and p0 on the head inputs of the last (uncached) HP
            epoch, by a pass of the head alone, instead of a separate pass of the model over the training set. Exact:
            the backbone is frozen in eval mode during HP, so these are the head inputs a separate pass over the same
            views would compute. Used only where that holds (one process, eval-mode backbone, no `reinit_modules`,
            no `torch_compile`, whole training set read in the last HP epoch, inputs under 1 GiB); otherwise the
            separate pass runs. `headprep_dynamics.json` says which (`energy_source`); `p0` is put back in dataset
            order (`p0_order`).
        measure_batch_size (`int` or `None`, defaults to `None`):
            Per-device batch size of the forward-only passes (energy, drift, feature cache); `None` uses the larger
            of 4x the train batch size and the eval batch size (no activations are kept for a backward pass).
        ignore_index (`int`, defaults to `-100`):
            Label value ignored by the loss and the measurements.
        problem_type (`str` or `None`, defaults to `None`):
            `"single_label_classification"` (cross-entropy), `"multi_label_classification"` (binary tasks, masked BCE,
            NaN = missing label) or `"regression"` (masked MSE); `None` takes the model's `config.problem_type` or
            `problem_type` attribute, else what the training labels show (integers: single-label, a float per
            sample: regression, 0/1 vectors: multi-label). Decides the trainer's loss, the energy and the label
            checks; setting it makes the trainer's loss replace a model's own loss.
        on_nonfinite (`str` or `None`, defaults to `None`):
            What a NaN or inf loss or gradient does: `"raise"` stops training with an error naming the stage, step and
            samples (checked on the device, read at logging/evaluation/save steps: no synchronisation per step), and
            nothing non-finite is saved; `"skip"` drops the update (one synchronisation per step) and counts it in
            `dynamics["skipped_updates"]`; `"ignore"` is `Trainer`'s behaviour. Unset: `"raise"` for runs with head
            probing (`hp_epochs > 0`, `probe_head()`, `finetune()`), `"ignore"` for plain runs.
        save_prepared_head (`bool`, defaults to `True`):
            When HP ends (and its energy is measured), write the head as a prepared-head folder
            `output_dir/prepared_head` (weights, `headprep_head.json`, model card; kilobytes).
        overwrite_output_dir (`bool`, defaults to `False`):
            A new run with head probing (`hp_epochs > 0`, `probe_head()`, `finetune()`) refuses an `output_dir` that
            already holds checkpoints, or an earlier run's prepared head and measurements (they would mix with the
            new run's, and a later resume could pick the wrong run or stage); resume instead, or set this to move them
            aside (`replaced-<time>.checkpoint-N`, `prepared_head.replaced-<time>`, logged) and start the run. Plain
            runs write as `Trainer` does.
    """

    # Parameters that control the head probing stage
    hp_epochs: int = field(
        default=4, metadata={"help": "tau: number of head-probing epochs (backbone frozen). 0 = plain finetuning."}
    )
    hp_learning_rate: float = field(default=1e-2, metadata={"help": "Peak learning rate of the head during HP."})
    hp_lr_scheduler_type: str = field(
        default="constant",
        metadata={"help": "HP learning-rate schedule.", "choices": list(HP_SCHEDULES)},
    )
    hp_warmup_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of HP steps for linear warmup, in [0, 1)."}
    )
    hp_weight_decay: float | None = field(
        default=None, metadata={"help": "Weight decay of the head during HP; unset = same as weight_decay."}
    )
    hp_label_smoothing: float = field(
        default=0.0, metadata={"help": "eps_HP: label smoothing during HP only, in [0, 1) (eta_HP = 1 - eps_HP)."}
    )
    ft_label_smoothing: float = field(default=0.0, metadata={"help": "eps_FT: label smoothing during FT, in [0, 1)."})
    hp_backbone_mode: str = field(
        default="eval",
        metadata={
            "help": "Frozen backbone mode in HP: eval keeps BatchNorm statistics fixed, train lets them move.",
            "choices": list(BACKBONE_MODES),
        },
    )
    hp_recompute_bn_stats: bool = field(
        default=True,
        metadata={
            "help": "Recompute the BatchNorm statistics of the HP-trained modules for the final HP weights (one pass "
            "over the training set); no effect without BatchNorm in the head / reinit_modules."
        },
    )
    hp_cache_features: bool = field(
        default=False,
        metadata={"help": "HP on cached backbone features (computed once, eval mode): much faster for long HP."},
    )
    hp_cache_views: int = field(
        default=1, metadata={"help": "Augmented views of the training set to cache; HP epoch e uses view e mod K."}
    )

    # Parameters that control the task head
    head_type: str = field(
        default="linear",
        metadata={
            "help": "linear keeps the model's classifier; mlp replaces it by an MLP.",
            "choices": list(HEAD_TYPES),
        },
    )
    mlp_hidden_size: int = field(default=256, metadata={"help": "Hidden width of the MLP head (paper: 256)."})
    mlp_num_layers: int = field(default=2, metadata={"help": "Number of linear layers of the MLP head (>= 2)."})
    head_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names forming the head (overrides the automatic split); z is the first one's input."
        },
    )
    reinit_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "Backbone modules re-initialised and trained with the head in HP, e.g. layer4.2."},
    )

    # Parameters that control the measurements
    track_dynamics: bool = field(
        default=True, metadata={"help": "Measure energy, p0, feature drift and the head gradient norm."}
    )
    drift_probe_samples: int | None = field(
        default=None,
        metadata={
            "help": "Drift is measured on N training samples, evenly spaced over the set (or the drift_dataset); "
            "unset = min(256, max(64, N_train // 16))."
        },
    )
    energy_max_samples: int | None = field(
        default=None,
        metadata={"help": "Measure energy on N training samples only, evenly spaced over the set; unset = all."},
    )
    energy_from_hp_epoch: bool = field(
        default=True,
        metadata={
            "help": "Start-of-FT energy from the last uncached HP epoch's head inputs (head-only pass) where exact; "
            "false = always a separate pass over the training set."
        },
    )
    measure_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Per-device batch size of the forward-only passes (energy, drift, feature cache); "
            "unset = max(4 x train, eval)."
        },
    )
    ignore_index: int = field(default=-100, metadata={"help": "Label value ignored by the loss and measurements."})
    problem_type: str | None = field(
        default=None,
        metadata={
            "help": "single_label_classification | multi_label_classification (masked BCE, NaN = missing) | "
            "regression (masked MSE); unset = the model's problem_type, else read off the training labels (integers: "
            "single-label, floats: regression, 0/1 vectors: multi-label)."
        },
    )

    on_nonfinite: str | None = field(
        default=None,
        metadata={
            "help": "A NaN/inf loss or gradient: raise (stop, nothing non-finite saved), skip (drop the update, "
            "count it) or ignore (Trainer's behaviour); unset = raise with head probing, ignore without.",
            "choices": ["raise", "skip", "ignore"],
        },
    )
    save_prepared_head: bool = field(
        default=True,
        metadata={"help": "Write output_dir/prepared_head (head weights, json, card) when HP ends."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "A new (not resumed) HP run in an output_dir that holds an earlier run's checkpoints or prepared "
            "head moves them aside (replaced-<time>.checkpoint-N, <name>.replaced-<time>) and starts; else it refuses."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_headprep_fields()

    def __setattr__(self, name, value):
        # Module names in the form the config defines, whoever sets them: the constructor, a keyword, YAML, the command
        # line, or Trainer's hyperparameter search, which sets each trial's values with setattr (twice per trial:
        # before HeadPrepTrainer prepares the model and again inside Trainer.train), casting each to the type of the
        # value it replaces.
        if name in ("head_modules", "reinit_modules"):
            value = _module_names(name, value)
        super().__setattr__(name, value)

    def _validate_headprep_fields(self) -> None:
        for name in ("head_modules", "reinit_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, list):
                raise ValueError(
                    f"{name} must be a list of module names or a string of names separated by commas, got {value!r}."
                )
        if not isinstance(self.hp_epochs, int) or isinstance(self.hp_epochs, bool) or self.hp_epochs < 0:
            raise ValueError(f"hp_epochs must be an integer >= 0 (0 = plain finetuning), got {self.hp_epochs!r}.")
        if self.hp_learning_rate < 0:
            raise ValueError(f"hp_learning_rate must be >= 0, got {self.hp_learning_rate}.")
        if self.hp_lr_scheduler_type not in HP_SCHEDULES:
            raise ValueError(
                f"hp_lr_scheduler_type must be one of {list(HP_SCHEDULES)}, got {self.hp_lr_scheduler_type!r} (the "
                "other schedules are not functions of the step, or need lr_scheduler_kwargs, which HP has none of)."
            )
        if not 0.0 <= self.hp_warmup_ratio < 1.0:
            raise ValueError(f"hp_warmup_ratio must be in [0, 1), got {self.hp_warmup_ratio}.")
        if self.hp_warmup_ratio > 0 and str(
            getattr(self.hp_lr_scheduler_type, "value", self.hp_lr_scheduler_type)
        ) in (
            "constant",
            "reduce_lr_on_plateau",
        ):
            raise ValueError(
                f"hp_warmup_ratio={self.hp_warmup_ratio} has no effect with hp_lr_scheduler_type="
                f"{getattr(self.hp_lr_scheduler_type, 'value', self.hp_lr_scheduler_type)!r} (transformers' "
                "get_scheduler ignores warmup for it); set hp_lr_scheduler_type='constant_with_warmup' (or another "
                "schedule with warmup), or hp_warmup_ratio=0."
            )
        if self.hp_weight_decay is not None and self.hp_weight_decay < 0:
            raise ValueError(f"hp_weight_decay must be >= 0 or unset, got {self.hp_weight_decay}.")
        for name in ("hp_label_smoothing", "ft_label_smoothing"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1) (0 = no smoothing), got {value}.")
        if self.label_smoothing_factor != 0.0 and (self.hp_label_smoothing or self.ft_label_smoothing):
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} smooths both stages, hp_label_smoothing="
                f"{self.hp_label_smoothing} / ft_label_smoothing={self.ft_label_smoothing} each one: set one or the "
                "other."
            )
        if self.hp_label_smoothing < self.ft_label_smoothing:
            warnings.warn(
                f"hp_label_smoothing={self.hp_label_smoothing} < ft_label_smoothing={self.ft_label_smoothing}: "
                "eta_HP > eta_FT, the paper's 'opposite energy' case (section 5.3): FT then pushes the features "
                "back instead of adapting them. Smooth more during HP than during FT.",
                OppositeEnergyWarning,
                stacklevel=3,
            )
        if self.hp_backbone_mode not in BACKBONE_MODES:
            raise ValueError(f"hp_backbone_mode must be one of {list(BACKBONE_MODES)}, got {self.hp_backbone_mode!r}.")
        if not isinstance(self.hp_cache_views, int) or self.hp_cache_views < 1:
            raise ValueError(f"hp_cache_views must be an integer >= 1, got {self.hp_cache_views!r}.")
        if self.hp_cache_features and self.hp_backbone_mode != "eval":
            raise ValueError(
                "hp_cache_features=True needs hp_backbone_mode='eval': cached features are computed once with the "
                "backbone in eval mode, while 'train' mode moves BatchNorm statistics every step."
            )
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {list(HEAD_TYPES)}, got {self.head_type!r}.")
        if self.mlp_hidden_size < 1:
            raise ValueError(f"mlp_hidden_size must be >= 1, got {self.mlp_hidden_size}.")
        if self.mlp_num_layers < 2:
            raise ValueError(
                f"mlp_num_layers must be >= 2 (use head_type='linear' for one layer), got {self.mlp_num_layers}."
            )
        if self.head_modules is not None and (
            not self.head_modules or not all(isinstance(n, str) and n for n in self.head_modules)
        ):
            raise ValueError(
                f"head_modules must be a non-empty list of module names or unset, got {self.head_modules!r}."
            )
        if not all(isinstance(n, str) and n for n in self.reinit_modules):
            raise ValueError(f"reinit_modules must be a list of module names, got {self.reinit_modules!r}.")
        if self.hp_cache_features and self.reinit_modules:
            raise ValueError(
                f"hp_cache_features=True is not available with reinit_modules={self.reinit_modules}: the "
                "re-initialised blocks train during HP, so the features they produce change every step and cannot be "
                "cached. Set hp_cache_features=False (or drop reinit_modules)."
            )
        if self.on_nonfinite is not None and self.on_nonfinite not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {list(POLICIES)} or unset, got {self.on_nonfinite!r}.")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {list(PROBLEM_TYPES)} or unset, got {self.problem_type!r}.")
        if self.drift_probe_samples is not None and self.drift_probe_samples < 1:
            raise ValueError(f"drift_probe_samples must be >= 1, got {self.drift_probe_samples}.")
        if self.measure_batch_size is not None and self.measure_batch_size < 1:
            raise ValueError(f"measure_batch_size must be >= 1 or unset, got {self.measure_batch_size}.")
        if self.energy_max_samples is not None and self.energy_max_samples < 1:
            raise ValueError(f"energy_max_samples must be >= 1 or unset, got {self.energy_max_samples}.")
        if self.hp_epochs > 0 and self.ddp_find_unused_parameters is False:
            raise ValueError(
                "ddp_find_unused_parameters=False cannot be used with hp_epochs > 0: during HP the frozen backbone "
                "gets no gradients, which DDP only tolerates with find_unused_parameters. Leave it unset."
            )
        if self.hp_epochs > 0 and self.auto_find_batch_size:
            raise ValueError(
                "auto_find_batch_size=True cannot be used with hp_epochs > 0: Trainer's retry at a smaller batch "
                "restarts its loop without the two-stage plan (the schedule kept the first attempt's HP length, and "
                "an attempt that failed in FT ran HP again). Set per_device_train_batch_size (and "
                "gradient_accumulation_steps) to what fits, or use hp_epochs=0."
            )
        reentrant = (self.activation_checkpointing_kwargs or {}).get("use_reentrant")
        if self.hp_epochs > 0 and self.activation_checkpointing and self.reinit_modules and reentrant:
            raise ValueError(
                "activation_checkpointing_kwargs={'use_reentrant': True} (gradient_checkpointing_kwargs) with "
                "reinit_modules: reentrant checkpointing "
                "gives no gradients to a checkpointed block whose inputs come from the frozen backbone, so the "
                "re-initialised modules would not train in HP. Leave use_reentrant unset (non-reentrant)."
            )
        if self.hp_epochs > 0 and self.ddp_find_unused_parameters is None:
            # The frozen backbone produces no gradients in HP; DDP must be told so (see above). Without HP the
            # Trainer's default stands: a search trial with hp_epochs=0 after one with HP kept True (the check runs
            # again for each trial's settings), which is not Trainer's setting for a model with checkpointing.
            self.ddp_find_unused_parameters = True
            self._find_unused_set_for_hp = True
        elif self.hp_epochs == 0 and getattr(self, "_find_unused_set_for_hp", False):
            self.ddp_find_unused_parameters = None
            self._find_unused_set_for_hp = False

    @property
    def hp_eta(self) -> float:
        """The paper's eta_HP = 1 - eps_HP."""
        return 1.0 - self.hp_label_smoothing

    @property
    def ft_eta(self) -> float:
        """The paper's eta_FT = 1 - eps_FT."""
        return 1.0 - self.ft_label_smoothing


def check_trainer_inputs(args, trainer_kwargs: dict, model=None) -> None:
    """What `HeadPrepTrainer` refuses before building anything: other arguments than a `HeadPrepConfig`, an external
    optimizer with HP (the trainer builds the two-stage one), `compute_loss_func` with stage label smoothing
    (the smoothing lives in the trainer's own loss, which `compute_loss_func` replaces), and a multi-process launch
    whose processes would each train alone (`launch.check_launch`)."""
    if not isinstance(args, HeadPrepConfig):
        raise TypeError(
            f"args must be a HeadPrepConfig (TrainingArguments plus the HP fields), got {type(args).__name__}."
        )
    check_launch(args)
    if args.label_smoothing_factor and model is not None and not hasattr(model, "config"):
        raise ValueError(
            f"label_smoothing_factor={args.label_smoothing_factor}: transformers.Trainer reads model.config for it, "
            f"which {type(model).__name__} has not. Set hp_label_smoothing and ft_label_smoothing instead (the same "
            "value in both smooths the whole run)."
        )
    optimizers = trainer_kwargs.get("optimizers") or (None, None)
    if args.hp_epochs > 0 and any(o is not None for o in optimizers):
        raise ValueError(
            "optimizers=(...) with hp_epochs > 0: HeadPrepTrainer builds the two-stage optimizer and schedule "
            "itself. Pass optimizer_cls_and_kwargs or set args.optim / args.lr_scheduler_type, or use hp_epochs=0."
        )
    if trainer_kwargs.get("compute_loss_func") is not None and (args.hp_label_smoothing or args.ft_label_smoothing):
        raise ValueError(
            "compute_loss_func with hp_label_smoothing/ft_label_smoothing: the stage smoothing lives in the "
            "trainer's own loss, which compute_loss_func replaces. Smooth inside your function "
            "(trainer.current_label_smoothing gives the stage's value) and set both to 0."
        )


def check_activation_checkpointing(args, model) -> None:
    """Before training: `activation_checkpointing=True` with a model Trainer cannot switch it on for (a timm model)
    is refused naming the model's own switch. (Trainer fails in `train()` with an `AttributeError` naming neither
    the setting nor the fix; evaluation alone is unaffected, as with Trainer.)"""
    switches = ("activation_checkpointing_enable", "gradient_checkpointing_enable")
    if args.activation_checkpointing and not any(hasattr(model, s) for s in switches):
        how = (
            "Call model.set_grad_checkpointing(True) (timm's switch)"
            if hasattr(model, "set_grad_checkpointing")
            else "Turn checkpointing on in the model yourself"
        )
        raise ValueError(
            f"activation_checkpointing=True (gradient_checkpointing): Trainer turns it on through "
            f"model.activation_checkpointing_enable(), which {type(model).__name__} has not (transformers models "
            f"have it). {how} and leave the setting off."
        )
