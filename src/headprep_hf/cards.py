"""Model cards (README.md) for prepared heads and finetuned models, rendered from the Jinja templates in
`model_cards/` (shipped inside the package) with `huggingface_hub.ModelCard.from_template`; the Hub metadata is a
`huggingface_hub.ModelCardData` (library, pipeline tag, license, datasets, base model, tags, and the evaluation
results as `EvalResult`s, which huggingface_hub writes as the model-index)."""

from __future__ import annotations

import os
import re
from importlib import resources
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .export import model_label_names
from .measurements import final_drift_of
from .version import __version__

if TYPE_CHECKING:
    from .trainer import HeadPrepTrainer

TAGS = ["headprep_hf", "head-probing", "finetuning"]
# "owner/name": what a Hub repo id looks like (a local path or a bare name is not one).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A Hub dataset id: "owner/name", or a canonical dataset's bare "name" (cifar10, mnist).
_HUB_DATASET_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def template_path(name: str) -> str:
    """Path of the shipped template `model_cards/<name>.md` (works for editable and regular installs)."""
    path = resources.files("headprep_hf") / "model_cards" / f"{name}.md"
    if not path.is_file():
        raise FileNotFoundError(f"Model card template {name!r} is not installed with headprep_hf ({path}).")
    return str(path)


def _fmt(value: Any, digits: int = 4) -> str:
    return "not measured" if value is None else f"{value:.{digits}f}"


def prepared_head_card(config: dict[str, Any], repo_id: str | None = None) -> ModelCard:
    """Card of a prepared head from its `headprep_head.json` content."""
    labels = list((config.get("id2label") or {}).values())
    backbone = str(config["backbone"]["id"])
    on_hub = bool(_HUB_ID.match(backbone)) and not os.path.exists(backbone)
    card_data = ModelCardData(
        library_name="headprep_hf",
        tags=[*TAGS, "prepared-head", f"tau-{config['tau']}"],
        base_model=backbone if on_hub else None,
        headprep_tau=config["tau"],
        headprep_energy=config.get("energy"),
        headprep_hp_train_accuracy=config.get("hp_train_accuracy"),
    )
    # (which library builds the backbone, recorded since this version: every Hub backbone got the timm snippet, e.g.
    # `timm.create_model("hf-hub:google/vit-base-patch16-224", ...)` for a transformers ViT, which is not a timm
    # repo; a config saved before keeps it)
    library = config["backbone"].get("library", "timm")
    model_class = config["backbone"].get("class")
    if on_hub and library == "timm":  # timm takes a Hub repo as "hf-hub:owner/name" (a bare "owner/name" is refused)
        model_import = "import timm\n"
        model_line = (
            f'model = timm.create_model("hf-hub:{backbone}", pretrained=True, num_classes={config.get("num_labels")})'
        )
    elif on_hub and library == "transformers" and model_class:
        model_import = f"from transformers import {model_class}\n"
        model_line = (
            f'model = {model_class}.from_pretrained("{backbone}", num_labels={config.get("num_labels")}, '
            "ignore_mismatched_sizes=True)"
        )
    else:  # weights from a local file, or a model of another library: the card cannot say how to build it
        model_import = ""
        model_line = (
            f"model = ...  # the {backbone} whose weights this head was probed on (checksum "
            f"{str(config['backbone']['checksum'])[:12]}...), with num_classes={config.get('num_labels')}"
        )
    return ModelCard.from_template(
        card_data,
        template_path=template_path("prepared_head"),
        model_import=model_import,
        model_line=model_line,
        backbone_id=f"hf-hub:{backbone}" if on_hub and library == "timm" else backbone,
        backbone_checksum=config["backbone"]["checksum"],
        repo_id=repo_id or "path/to/this/head",
        labels=labels,
        energy_text=_fmt(config.get("energy")),
        hp_train_accuracy_text=_fmt(config.get("hp_train_accuracy")),
        **{k: v for k, v in config.items() if k not in ("backbone", "id2label")},
    )


# Trainer bookkeeping the results table and the model-index leave out: not a property of the model.
_NOISE_SUFFIXES = ("runtime", "samples_per_second", "steps_per_second", "epoch", "total_flos")
# Measurements of the training dynamics (`train_and_evaluate`'s `energy`, `drift_*`): the card's training-dynamics
# table shows some, none is an evaluation result.
_DYNAMICS_KEYS = ("energy", "hp_train_accuracy", "p0_mean", "drift_sq_dist", "drift_dot", "drift_sq_norm", "drift_cos")
# `datasets`' packaged loaders (a local folder's type in the model-index), not datasets on the Hub.
_PACKAGED_LOADERS = ("imagefolder", "audiofolder", "videofolder", "csv", "json", "parquet", "text", "arrow")
# Pretty task names of the pipeline tags our tasks use (the model-index's task.name).
_TASK_NAMES = {
    "image-classification": "Image Classification",
    "image-segmentation": "Image Segmentation",
    "graph-ml": "Graph Machine Learning",
}
# Metric-name prefixes of `Trainer.evaluate` results, and the dataset split each one reports on.
_SPLIT_PREFIXES = {"validation_": "validation", "eval_": "validation", "test_": "test"}


def is_noise_metric(name: str) -> bool:
    """Run bookkeeping (runtime, samples/steps per second, epoch, FLOs): kept out of cards."""
    return name == "epoch" or name.endswith(tuple(f"_{s}" for s in _NOISE_SUFFIXES)) or name in _NOISE_SUFFIXES


def _split_metric(name: str) -> tuple[str, str] | None:
    for prefix, split in _SPLIT_PREFIXES.items():
        if name.startswith(prefix):
            return split, name[len(prefix) :]
    return None


def eval_results(
    metrics: dict[str, Any],
    task_type: str | None,
    dataset_type: str | None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
) -> list[EvalResult]:
    """`huggingface_hub.EvalResult`s (the card's model-index) of the `validation_*`/`eval_*`/`test_*` entries of
    `metrics`, losses and run bookkeeping left out (as transformers' cards keep only metrics to the model-index).
    Empty without a task type and a dataset: the Hub rejects partial model-index entries."""
    if not task_type or not dataset_type:
        return []
    results = []
    for name, value in metrics.items():
        parsed = _split_metric(name)
        if parsed is None or is_noise_metric(name) or not isinstance(value, (int, float)):
            continue
        split, metric = parsed
        if metric == "loss" or metric.endswith("_loss"):
            continue
        results.append(
            EvalResult(
                task_type=task_type,
                task_name=_TASK_NAMES.get(task_type),
                dataset_type=dataset_type,
                dataset_name=dataset_name or dataset_type,
                dataset_config=dataset_config,
                dataset_split=split,
                metric_type=metric,
                metric_value=round(float(value), 4),
                metric_name=f"{split} {metric}",
            )
        )
    return results


def last_evaluation_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The metrics of the last evaluation of each split in a Trainer's `state.log_history` (the last record with
    `eval_*` keys, and the last with `test_*` keys), as transformers' own card takes its results from the last
    evaluation (`modelcard.parse_log_history`). The stage-tagged copies (`eval_ft/accuracy`) are left out."""
    metrics: dict[str, float] = {}
    for prefix in ("eval_", "test_"):
        for record in reversed(log_history):
            found = {k: v for k, v in record.items() if k.startswith(prefix) and "/" not in k}
            if found:
                metrics.update(found)
                break
    return metrics


def _is_hub_dataset(tag: str) -> bool:
    # A Hub dataset id ("owner/name", or a canonical "name" such as cifar10), as `base_model_id` tells a Hub model id
    # from a local folder: a local path (a folder here, or written as a path) names no Hub dataset.
    return bool(_HUB_DATASET_ID.match(tag)) and not os.path.exists(tag) and tag not in _PACKAGED_LOADERS


def _dataset_of(tag: str | None, name: str | None) -> tuple[str | None, str | None]:
    """(model-index dataset type, dataset name) of a `dataset_tags` entry and its pretty name: a local data folder
    (`--dataset_name /data/my_set`) is named by its basename, in both, not by its path."""
    if tag is None or tag in _PACKAGED_LOADERS or _is_hub_dataset(tag):
        return tag, name
    local = os.path.basename(os.path.normpath(tag)) or tag
    return local, local if name in (None, tag) else name


def hub_weights_id(cfg: dict[str, Any]) -> str | None:
    """The Hub repo a timm `pretrained_cfg` says the weights came from; None where they came from a local file
    (timm loads `file` before `hf_hub_id`) or it names none."""
    if cfg.get("file") or not cfg.get("hf_hub_id"):
        return None
    return str(cfg["hf_hub_id"])


def _first_pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    # The model's own timm pretrained_cfg, or its backbone's (a segmentation model around a timm backbone).
    for module in model.modules():
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("architecture"):
            return cfg
    return {}


def base_model_id(model: nn.Module) -> str | None:
    """The Hub id of the model `model` was finetuned from, where it says so: a timm `pretrained_cfg["hf_hub_id"]`
    (the model's or its backbone's), or a transformers config's `_name_or_path` when that is a Hub id, not a local
    folder. None otherwise (the Hub validates `base_model` against its repos).

    A timm model whose weights came from a local file (`pretrained_cfg["file"]`, as `load_timm_model` loads a weights
    file) keeps its architecture's default `hf_hub_id` in its config although none of those weights were loaded: it
    names no Hub model. `load_timm_model(..., pretrained=False)` clears `hf_hub_id`; a model built directly with
    `timm.create_model(..., pretrained=False)` cannot be told apart from its config: pass `finetuned_from=`."""
    import os

    hub_id = hub_weights_id(_first_pretrained_cfg(model))
    if hub_id:
        return hub_id
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if name and _HUB_ID.match(str(name)) and not os.path.exists(str(name)):
        return str(name)
    return None


def pipeline_tag_of(model: nn.Module) -> str | None:
    """The Hub pipeline tag a model's kind implies: a timm classifier or a transformers `*ForImageClassification`
    is an image classifier; `*ForSemanticSegmentation` segments images. None when its kind does not say."""
    from .export import is_timm_model

    name = type(model).__name__
    if is_timm_model(model) or name.endswith("ForImageClassification"):
        return "image-classification"
    if name.endswith(("ForSemanticSegmentation", "DeepLabV3")):
        return "image-segmentation"
    return None


def _library_name(model: nn.Module) -> str:
    from transformers import PreTrainedModel

    from .export import timm_rebuildable

    if isinstance(model, PreTrainedModel):
        from .heads import MLPHead

        # (an MLP head is not in the architecture's config: transformers would load the folder with a random head)
        return "headprep_hf" if any(isinstance(m, MLPHead) for m in model.modules()) else "transformers"
    if timm_rebuildable(model):
        return "timm"  # the folder is a timm save_for_hf folder: the Hub shows timm's loading snippet
    return "headprep_hf"


def head_probing_record(trainer: HeadPrepTrainer) -> dict[str, Any]:
    """The head probing the finetuned model went through: this trainer's own HP (`hp_epochs` > 0 outside
    `finetune()`), else the prepared head loaded onto the model (`load_prepared_head` remembered its tau and
    settings), else none (tau 0). Keys: tau, hp_learning_rate, hp_lr_scheduler_type, hp_label_smoothing, source,
    head_type, reinit_modules."""
    from .export import prepared_head_record

    args = trainer.args
    # Own HP: it ran to its end on this trainer, or train() resumed past it. Not a head that never went through HP
    # (saved before probe_head(), or a train() stopped before its boundary): that one is tau 0, or the loaded head's.
    plan = trainer.stage_plan
    own = args.hp_epochs > 0 and (trainer.hp_done or (plan.plan == "both" and plan.ft_started))
    loaded = prepared_head_record(trainer.accelerator.unwrap_model(trainer.model))
    if not own and loaded is not None:
        return {
            "tau": loaded.get("tau"),
            "hp_learning_rate": loaded.get("hp_learning_rate"),
            "hp_lr_scheduler_type": loaded.get("hp_lr_scheduler_type"),
            "hp_label_smoothing": loaded.get("hp_label_smoothing"),
            "source": loaded.get("source"),
            "head_type": loaded.get("head_type", args.head_type),
            "reinit_modules": list(loaded.get("reinit_modules") or []),
        }
    return {
        "tau": args.hp_epochs if own else 0,
        "hp_learning_rate": args.hp_learning_rate,
        "hp_lr_scheduler_type": args.hp_lr_scheduler_type,
        "hp_label_smoothing": args.hp_label_smoothing or args.label_smoothing_factor,  # (the trainer's fallback)
        "source": None,
        "head_type": args.head_type,
        "reinit_modules": list(args.reinit_modules),
    }


def _first(value: str | list[str] | None) -> str | None:
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def finetuned_model_card(
    trainer: HeadPrepTrainer,
    model_name: str | None = None,
    base_model: str | None = None,
    sweep: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
    language: str | list[str] | None = None,
) -> ModelCard:
    """Card of a model finetuned by `trainer`: Hub metadata (`huggingface_hub.ModelCardData`: library, pipeline tag,
    license, datasets, base model, tags, the model-index of `metrics`) and the HP/FT settings, energy, drift, metrics
    and the sweep's tau*.

    The dataset arguments are `Trainer.create_model_card`'s: `tasks` the pipeline tag (default: what the model's kind
    implies), `dataset_tags` the dataset ids (a Hub id, a loader name such as `imagefolder`, or a local data folder,
    named by its basename; only Hub ids go to the `datasets` metadata), `dataset` their pretty names, `dataset_args`
    the dataset configs. `metrics` entries named `validation_*`/`eval_*`/`test_*` become model-index results once a
    task and a dataset are known.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    args = trainer.args
    dyn = trainer.dynamics
    drift = final_drift_of(dyn) or {}  # (the card's model: the best checkpoint's where it was loaded)
    hp = head_probing_record(trainer)
    pipeline_tag = _first(tasks) or pipeline_tag_of(model)
    dataset_type, dataset_name = _dataset_of(_first(dataset_tags), _first(dataset))
    model_name = model_name or "finetuned-model"
    shown = {k: v for k, v in (metrics or {}).items() if not is_noise_metric(k) and k not in _DYNAMICS_KEYS}
    results = eval_results(shown, pipeline_tag, dataset_type, dataset_name, _first(dataset_args))
    hub_datasets = [d for d in _as_list(dataset_tags) if _is_hub_dataset(d)]
    extra = {}
    if sweep is not None and sweep.get("tau_star") is not None:
        extra["headprep_tau_star"] = sweep["tau_star"]
    card_data = ModelCardData(
        library_name=_library_name(model),
        pipeline_tag=pipeline_tag,
        license=license or _first_pretrained_cfg(model).get("license"),
        datasets=hub_datasets or None,
        base_model=base_model,
        language=language,
        tags=[*TAGS, *([pipeline_tag] if pipeline_tag else []), *(tags or [])],
        model_name=model_name,
        eval_results=results or None,
        headprep_tau=hp["tau"],
        headprep_energy=dyn.get("energy"),
        **extra,
    )
    return ModelCard.from_template(
        card_data,
        template_path=template_path("finetuned_model"),
        model_name=model_name,
        base_model=base_model,
        tau=hp["tau"],
        hp_source=hp["source"],
        hp_learning_rate=hp["hp_learning_rate"],
        hp_lr_scheduler_type=hp["hp_lr_scheduler_type"],
        hp_label_smoothing=hp["hp_label_smoothing"],
        head_type=hp["head_type"],
        reinit_modules=hp["reinit_modules"],
        num_train_epochs=args.num_train_epochs if args.max_steps <= 0 else f"{args.max_steps} steps",
        learning_rate=args.learning_rate,
        lr_scheduler_type=getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        ft_label_smoothing=args.ft_label_smoothing or args.label_smoothing_factor,
        optim=getattr(args.optim, "value", args.optim),
        batch_size=args.train_batch_size * max(args.world_size, 1) * args.gradient_accumulation_steps,  # (as Trainer)
        seed=args.seed,
        energy_text=_fmt(dyn.get("energy")),
        hp_train_accuracy_text=_fmt(dyn.get("hp_train_accuracy")),
        drift_sq_dist_text=_fmt(drift.get("sq_dist")),
        drift_cos_text=_fmt(drift.get("cos")),
        metrics={k: round(v, 4) if isinstance(v, float) else v for k, v in shown.items()},
        dataset_name=dataset_name or dataset_type,
        label_names=model_label_names(model),
        sweep=sweep,
        headprep_version=__version__,
        stopped_text=_stopped_text(trainer),
    )


def _stopped_text(trainer) -> str | None:
    """A line for the card of a run that was interrupted (an error or Ctrl-C in `train()`/`finetune()`), where the
    settings above describe the planned run and the last evaluation may predate the model's weights."""
    stopped = getattr(trainer, "stopped_at", None)
    if not stopped:
        return None
    step, planned = stopped
    return (
        f"This run was interrupted at update {step} of {planned}: the model holds the weights of that update, not "
        "those of the finished run the settings below describe, and the results were evaluated before it stopped."
    )


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def write_finetuned_model_card(trainer: HeadPrepTrainer, finetuned_from: str | None = None, **kwargs) -> None:
    """`output_dir/README.md` of `trainer`'s finetuned model (`finetuned_model_card`, `kwargs` passed on); the base
    model defaults to what the model says it came from (`base_model_id`), the model name to the output folder's."""
    import os

    model = trainer.accelerator.unwrap_model(trainer.model)
    kwargs["model_name"] = kwargs.get("model_name") or os.path.basename(os.path.normpath(trainer.args.output_dir))
    if isinstance(kwargs.get("tags"), str):
        kwargs["tags"] = [kwargs["tags"]]
    card = finetuned_model_card(trainer, base_model=finetuned_from or base_model_id(model), **kwargs)
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    card.save(os.path.join(trainer.args.output_dir, "README.md"))
