"""Model cards (README.md) for prepared heads and finetuned models, rendered from the Jinja templates in
`model_cards/` (shipped inside the package) with `huggingface_hub.ModelCard.from_template`."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from .version import __version__

if TYPE_CHECKING:
    from .trainer import HeadPrepTrainer

TAGS = ["headprep_hf", "head-probing", "finetuning"]


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
    card_data = ModelCardData(
        library_name="headprep_hf",
        tags=[*TAGS, "prepared-head", f"tau-{config['tau']}"],
        base_model=config["backbone"]["id"] if "/" in str(config["backbone"]["id"]) else None,
        headprep_tau=config["tau"],
        headprep_energy=config.get("energy"),
        headprep_hp_train_accuracy=config.get("hp_train_accuracy"),
    )
    return ModelCard.from_template(
        card_data,
        template_path=template_path("prepared_head"),
        backbone_id=config["backbone"]["id"],
        backbone_checksum=config["backbone"]["checksum"],
        repo_id=repo_id or "path/to/this/head",
        labels=labels,
        energy_text=_fmt(config.get("energy")),
        hp_train_accuracy_text=_fmt(config.get("hp_train_accuracy")),
        **{k: v for k, v in config.items() if k not in ("backbone", "id2label")},
    )


def finetuned_model_card(
    trainer: HeadPrepTrainer,
    model_name: str | None = None,
    base_model: str | None = None,
    sweep: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
) -> ModelCard:
    """Card of a model finetuned by `trainer`: HP/FT settings, energy, drift, metrics and the sweep's tau*."""
    args = trainer.args
    dyn = trainer.dynamics
    drift = (dyn.get("drift") or [{}])[-1]
    extra = {}
    if sweep is not None and sweep.get("tau_star") is not None:
        extra["headprep_tau_star"] = sweep["tau_star"]
    card_data = ModelCardData(
        library_name="headprep_hf",
        tags=[*TAGS, *(tags or [])],
        base_model=base_model,
        license=license,
        model_name=model_name,
        headprep_tau=args.hp_epochs,
        headprep_energy=dyn.get("energy"),
        **extra,
    )
    return ModelCard.from_template(
        card_data,
        template_path=template_path("finetuned_model"),
        model_name=model_name or "Finetuned model",
        base_model=base_model,
        tau=args.hp_epochs,
        hp_learning_rate=args.hp_learning_rate,
        hp_lr_scheduler_type=args.hp_lr_scheduler_type,
        hp_label_smoothing=args.hp_label_smoothing,
        head_type=args.head_type,
        reinit_modules=list(args.reinit_modules),
        num_train_epochs=args.num_train_epochs if args.max_steps <= 0 else f"{args.max_steps} steps",
        learning_rate=args.learning_rate,
        lr_scheduler_type=getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        ft_label_smoothing=args.ft_label_smoothing,
        optim=getattr(args.optim, "value", args.optim),
        batch_size=args.per_device_train_batch_size * max(args.world_size, 1),
        seed=args.seed,
        energy_text=_fmt(dyn.get("energy")),
        hp_train_accuracy_text=_fmt(dyn.get("hp_train_accuracy")),
        drift_sq_dist_text=_fmt(drift.get("sq_dist")),
        drift_cos_text=_fmt(drift.get("cos")),
        metrics={k: round(v, 4) if isinstance(v, float) else v for k, v in (metrics or {}).items()},
        sweep=sweep,
        headprep_version=__version__,
    )


def write_finetuned_model_card(
    trainer: HeadPrepTrainer,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tags: str | list[str] | None = None,
    license: str | None = None,
    sweep: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> None:
    """`output_dir/README.md` of `trainer`'s finetuned model (`finetuned_model_card`); the base model defaults to the
    timm model's `pretrained_cfg["hf_hub_id"]`."""
    import os

    if finetuned_from is None:
        cfg = getattr(trainer.accelerator.unwrap_model(trainer.model), "pretrained_cfg", None) or {}
        finetuned_from = cfg.get("hf_hub_id")
    card = finetuned_model_card(
        trainer,
        model_name=model_name or os.path.basename(os.path.normpath(trainer.args.output_dir)),
        base_model=finetuned_from,
        sweep=sweep,
        metrics=metrics,
        tags=[tags] if isinstance(tags, str) else tags,
        license=license,
    )
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    card.save(os.path.join(trainer.args.output_dir, "README.md"))
