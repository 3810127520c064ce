"""Prepared heads: the state head probing produced, saved small (no backbone) so FT can start from it elsewhere.

A prepared-head folder holds

* `head.safetensors`: everything HP changed (`HeadPrepTrainer.hp_state_dict()`: the head, `reinit_modules`, and
  all buffers when `hp_backbone_mode="train"`), keyed by the model's own parameter names;
* `headprep_head.json`: what is needed to re-attach and reproduce it: head modules and type (MLP size), feature
  dimension, number and names of labels (`id2label`, when the model names its classes: the recipes record the data's
  class names on it), the backbone's identifier and checksum, tau, HP settings, energy and HP train accuracy, package
  version, and the sha256 of `head.safetensors` (`weights_sha256`), so the two files are only loaded as a pair.

`load_prepared_head(model, path)` attaches it to a backbone (building the MLP head first when needed) after checking
that the two files belong together, the feature dimension, label count and class names (errors) and the backbone
checksum (a warning, an error with `strict=True`); it gives the model the head's class names and remembers the
head's tau for the finetuned model's card. Weights are safetensors only; nothing is unpickled and no code is executed.
A head is saved or pushed only before FT starts (afterwards it is a finetuned head).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.trainer_utils import unwrap_peft_model

from .cards import _first_pretrained_cfg, base_model_id, head_probing_record, prepared_head_card
from .export import model_data_config, model_label_names, prepared_head_record, record_prepared_head, set_label_names
from .files import file_sha256
from .guard import check_finite, nonfinite_keys
from .heads import MLPHead, mlp_head_target, replace_head_with_mlp
from .split import ModelSplit, find_split
from .version import __version__

if TYPE_CHECKING:
    from .trainer import HeadPrepTrainer

HEAD_WEIGHTS_NAME = "head.safetensors"
HEAD_CONFIG_NAME = "headprep_head.json"
HEAD_FORMAT_VERSION = 1
PREPARED_HEAD_DIR = "prepared_head"


class PreparedHeadMixin:
    """The [`HeadPrepTrainer`] API of the prepared head and the cards: what HP changed, its BatchNorm statistics,
    saving and pushing it, the finetuned model's card. (Mixed into the trainer; uses its `split`, `stages`, `args`,
    `accelerator` and `model`.)"""

    def recompute_bn_statistics(self, cache=None) -> int:
        """Recompute the running statistics of the BatchNorm layers HP trains (head, `reinit_modules`) for the
        current weights, in the HP modes, over the training set (or `cache`, the cached head inputs; the live cache
        while cached HP runs); see `headprep_hf.batchnorm`. Done at the end of HP when `hp_recompute_bn_stats`.
        Returns the number of layers recomputed (0 when the HP modules have none)."""
        from .batchnorm import recompute_hp_statistics

        return recompute_hp_statistics(self, cache if cache is not None else self.hp_feature_cache)

    def prepared_hp_state_dict(self) -> dict[str, torch.Tensor]:
        """`hp_state_dict()` of the head as `probe_head()` would leave it at this point: BatchNorm statistics
        recomputed (`hp_recompute_bn_stats`). The live statistics are put back, so HP can go on (sweep snapshots)."""
        from .batchnorm import restored_statistics, tracked_batchnorms

        if not self.args.hp_recompute_bn_stats:
            return self.hp_state_dict()
        model = self.accelerator.unwrap_model(self.model)
        with restored_statistics(tracked_batchnorms(self.split.hp_modules(model))):
            self.recompute_bn_statistics()
            return self.hp_state_dict()

    def hp_state_dict(self) -> dict[str, torch.Tensor]:
        """Copy of everything head probing changes: the head and `reinit_modules` (parameters and buffers), plus
        every buffer of the model when `hp_backbone_mode="train"` (BatchNorm statistics move then). Loading it
        (`model.load_state_dict(sd, strict=False)`) onto the pretrained model gives the model FT starts from."""
        return self.stages.hp_state_dict(self.accelerator.unwrap_model(self.model))

    def save_prepared_head(self, save_directory: str, backbone_id: str | None = None, overwrite: bool = False) -> str:
        """Save the current head as a small prepared-head artifact (`head.safetensors` + `headprep_head.json`).

        Call it after `probe_head()` (before FT starts: afterwards the head is a finetuned one, and this raises a
        `ValueError`; `output_dir/prepared_head` holds the head saved at the HP/FT boundary).
        `load_prepared_head(model, save_directory)` attaches it to a backbone again. Only the main process writes.
        A folder that already holds a head or a README.md is refused (`FileExistsError`) unless `overwrite=True`.
        Returns the folder.
        """
        refuse_after_ft(self, "save_prepared_head()")
        check_finite(self.hp_state_dict(), f"the prepared head {save_directory}")  # on every rank: all raise
        refuse_existing_head_files(save_directory, overwrite)  # (on every rank: all raise)
        if self.args.should_save:
            save_prepared_head(self, save_directory, backbone_id=backbone_id, overwrite=overwrite)
        self.accelerator.wait_for_everyone()
        return str(save_directory)

    def push_head_to_hub(self, repo_id: str, backbone_id: str | None = None, **kwargs) -> str:
        """Upload the current head as a prepared-head repo (weights, json, card); see `hub.push_head_to_hub`. Before FT
        starts only, as `save_prepared_head`."""
        refuse_after_ft(self, "push_head_to_hub()")  # (on every rank: all raise)
        url, refusal = "", None
        if self.args.should_save:
            try:
                url = push_head_to_hub(self, repo_id, backbone_id=backbone_id, **kwargs)
            except FileExistsError as error:  # (the repo already holds a card or a head: raised on every rank)
                refusal = str(error)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            refusal = next((r for r in gather_object([refusal]) if r), None)
        else:
            self.accelerator.wait_for_everyone()
        if refusal:
            raise FileExistsError(refusal)
        return url

    def create_model_card(
        self,
        language: str | list[str] | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        sweep: dict | None = None,
        metrics: dict | None = None,
        **kwargs,
    ):
        """Write `output_dir/README.md` (`Trainer.create_model_card`'s arguments, plus `metrics` and a sweep's
        `sweep.json` content): Hub metadata with the model-index of `metrics` (`validation_*`/`eval_*`/`test_*`
        entries, given `tasks` and `dataset_tags`), the HP/FT settings (tau of this run's HP, or of the prepared
        head `load_prepared_head` attached), energy, drift and tau*. The base model defaults to the one the model
        names (timm `hf_hub_id`, transformers `_name_or_path`), the license to its `pretrained_cfg`'s, `metrics` to
        the last evaluation of each split in `state.log_history` (as Trainer's own card). Also what `push_to_hub()`
        uploads: `push_to_hub(**these arguments)` passes them here."""
        from .cards import last_evaluation_metrics, write_finetuned_model_card

        if metrics is None:  # (`Trainer.push_to_hub()` passes none: the card still reports the last evaluation)
            metrics = last_evaluation_metrics(self.state.log_history) or None
        if self.is_world_process_zero():
            with self._recording_outputs(self.args.output_dir):
                write_finetuned_model_card(
                    self,
                    finetuned_from=finetuned_from,
                    model_name=model_name,
                    tags=tags,
                    license=license,
                    sweep=sweep,
                    metrics=metrics,
                    tasks=tasks,
                    dataset_tags=dataset_tags,
                    dataset=dataset,
                    dataset_args=dataset_args,
                    language=language,
                )

    def _write_prepared_head(self) -> None:
        # At the end of HP (after its measurements): a small artifact FT can start from elsewhere.
        folder = os.path.join(self.run_output_dir, PREPARED_HEAD_DIR)
        if self.args.save_prepared_head and _peft_refusal(self.model) is not None:
            warnings.warn(f"The prepared head is not written: {_peft_refusal(self.model)}", UserWarning, stacklevel=2)
            return
        if self.args.save_prepared_head:
            check_finite(self.hp_state_dict(), f"the prepared head {folder}")  # on every rank: all raise
        if self.args.save_prepared_head and self.args.should_save:
            _save_prepared_head(self, folder)  # (at the boundary: FT is marked as started, no FT update ran)
            self.written_outputs.add(os.path.abspath(folder))


class BackboneMismatchWarning(UserWarning):
    """The prepared head was probed on other backbone weights, or on inputs prepared otherwise, than the model it is
    loaded onto has."""


def backbone_checksum(model: nn.Module, split: ModelSplit) -> str:
    """sha256 of the backbone's parameters (names, shapes, dtypes, values); the head and `reinit_modules` excluded.

    Buffers are left out on purpose: with `hp_backbone_mode="train"` HP moves BatchNorm statistics, and the head was
    still probed on these weights.
    """
    from .fingerprint import state_fingerprint

    return state_fingerprint({n: p for n, p in split.backbone_parameters(model)})


def _head_linears(model: nn.Module, split: ModelSplit) -> list[nn.Linear]:
    return [m for name in split.head_names for m in model.get_submodule(name).modules() if isinstance(m, nn.Linear)]


def feature_dim(model: nn.Module, split: ModelSplit) -> int | None:
    """Input size of the head's first linear layer (the dimension of the feature z)."""
    linears = _head_linears(model, split)
    return linears[0].in_features if linears else None


def _label_names(model: nn.Module) -> dict[str, str] | None:
    # Where the model's library keeps them (transformers `id2label`, timm `pretrained_cfg["label_names"]`); the task
    # loaders record the data's class names there (`headprep_hf.export.set_label_names`).
    names = model_label_names(model)
    return {str(i): name for i, name in enumerate(names)} if names else None


def prepared_head_config(trainer: HeadPrepTrainer, backbone_id: str | None = None, tau: int | None = None) -> dict:
    """The `headprep_head.json` content for the trainer's current head."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    split = trainer.split
    dyn = trainer.dynamics
    if backbone_id is None:  # (the Hub id the finetuned model's card names as base model, where there is one)
        backbone_id = base_model_id(model) or _first_pretrained_cfg(model).get("architecture") or type(model).__name__
    probing = head_probing_record(trainer)
    loaded = prepared_head_record(model) if probing["source"] is not None and tau is None else None
    if loaded is not None:
        # A loaded head saved again (no HP on this trainer): its record, not this trainer's settings, says how it was
        # probed. The review's run wrote head_type 'linear', reinit_modules [] and this trainer's HP learning rate
        # for an MLP head with a re-initialised layer4, and left layer4 out of the weights (a partial head).
        mine = {"head_type": args.head_type, "reinit_modules": sorted(split.reinit_names)}
        theirs = {"head_type": loaded.get("head_type"), "reinit_modules": sorted(loaded.get("reinit_modules") or [])}
        if mine != theirs:
            raise ValueError(
                f"The head this model carries was loaded from {loaded['source']} ({theirs}); saved through this "
                f"trainer ({mine}) it would be written as another head, or in part. Copy or push the folder it was "
                "loaded from instead."
            )
    return {
        "format_version": HEAD_FORMAT_VERSION,
        "headprep_version": __version__,
        "head_modules": list(split.head_names),
        "reinit_modules": list(split.reinit_names),
        "head_type": args.head_type,
        "mlp_hidden_size": args.mlp_hidden_size if args.head_type == "mlp" else None,
        "mlp_num_layers": args.mlp_num_layers if args.head_type == "mlp" else None,
        "feature_dim": feature_dim(model, split),
        "num_labels": split.num_classes,
        "id2label": _label_names(model),
        "backbone": {"id": backbone_id, "checksum": backbone_checksum(model, split), **_backbone_library(model)},
        "inputs": model_inputs(model),
        "tau": probing["tau"] if tau is None else tau,  # (0 for a head never probed)
        "hp_learning_rate": args.hp_learning_rate,
        "hp_lr_scheduler_type": args.hp_lr_scheduler_type,
        "hp_label_smoothing": args.hp_label_smoothing or args.label_smoothing_factor,
        "hp_backbone_mode": args.hp_backbone_mode,
        "hp_cache_features": args.hp_cache_features,
        "seed": args.seed,
        "energy": dyn.get("energy"),
        "hp_train_accuracy": dyn.get("hp_train_accuracy"),
        **(_loaded_settings(loaded) if loaded is not None else {}),
    }


def _backbone_library(model: nn.Module) -> dict:
    """Which library builds the backbone (the card's "Use" snippet): a timm model, or a transformers model class."""
    from transformers import PreTrainedModel

    from .export import is_timm_model

    if isinstance(model, PreTrainedModel):
        return {"library": "transformers", "class": type(model).__name__}
    return {"library": "timm" if is_timm_model(model) else None}  # (None: e.g. a segmentation model around timm)


def _loaded_settings(loaded: dict) -> dict:
    """The `headprep_head.json` fields of a loaded head that its record holds (`record_prepared_head`), and None for
    those it does not (they were this trainer's settings, not the head's)."""
    keys = ("hp_learning_rate", "hp_lr_scheduler_type", "hp_label_smoothing", "energy")
    unknown = ("hp_backbone_mode", "hp_cache_features", "seed", "hp_train_accuracy")
    return {**{k: loaded.get(k) for k in keys}, **dict.fromkeys(unknown)}


def refuse_after_ft(trainer: HeadPrepTrainer, what: str) -> None:
    """Raise a `ValueError` when FT has started on `trainer`: its head is then a finetuned one (on a finetuned
    backbone), not the prepared head the json would describe (tau, HP-end energy, the pretrained backbone's checksum).
    """
    trainer._refuse_interrupted_hp(what)
    plan = trainer.stage_plan
    # FT began (the boundary work ran), or a training loop ran updates past its HP steps (a plain run, hp_epochs=0,
    # whose loop marks no boundary without measurements). probe_head() alone leaves both false.
    ft_updates = plan.plan != "hp" and trainer.state.global_step > plan.hp_steps
    if not (plan.ft_started or ft_updates):
        return
    folder = os.path.join(trainer.run_output_dir, PREPARED_HEAD_DIR)
    if os.path.isfile(os.path.join(folder, HEAD_CONFIG_NAME)):
        where = f"{folder} holds the head saved at the HP/FT boundary: load or upload that folder"
    elif plan.plan == "ft" or trainer.args.hp_epochs == 0:
        where = "this run had no HP stage (finetune() alone, or hp_epochs=0), so it has no prepared head to save"
    elif not trainer.args.save_prepared_head:
        where = f"no head was saved at the HP/FT boundary (save_prepared_head=True writes it to {folder})"
    else:
        where = f"no head was saved at the HP/FT boundary ({folder} does not exist)"
    raise ValueError(
        f"{what} after FT started: the model's head is now finetuned, not the prepared head of tau="
        f"{trainer.args.hp_epochs} (and the backbone is no longer the pretrained one). {where}; or call {what} after "
        "probe_head() and before finetune()/train()'s FT."
    )


def save_prepared_head(
    trainer: HeadPrepTrainer,
    save_directory: str | os.PathLike,
    backbone_id: str | None = None,
    tau: int | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `head.safetensors`, `headprep_head.json` and a README.md model card for the trainer's current head
    into `save_directory` (see `write_prepared_head`). A `ValueError` once FT has started (`refuse_after_ft`), a
    `FileExistsError` where the folder already holds a head or a README.md, unless `overwrite=True`. Returns the
    folder."""
    refuse_after_ft(trainer, "save_prepared_head()")
    refuse_existing_head_files(save_directory, overwrite)
    return _save_prepared_head(trainer, save_directory, backbone_id=backbone_id, tau=tau, repo_id=repo_id)


def refuse_existing_head_files(save_directory: str | os.PathLike, overwrite: bool) -> None:
    """`FileExistsError` naming the files a prepared head would replace in `save_directory` (a model folder's own
    README.md, an earlier head), unless `overwrite`: they were replaced without a word (the review's run: a finetuned
    model's card became the head card, a tau-1 head was replaced by a tau-3 one)."""
    folder = Path(save_directory)
    existing = [name for name in (HEAD_WEIGHTS_NAME, HEAD_CONFIG_NAME, "README.md") if (folder / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"Not saving the prepared head into {folder}: it already holds {', '.join(existing)}, which the head "
            "would replace. Choose another folder, or pass overwrite=True to replace them."
        )


def _save_prepared_head(
    trainer: HeadPrepTrainer,
    save_directory: str | os.PathLike,
    backbone_id: str | None = None,
    tau: int | None = None,
    repo_id: str | None = None,
) -> Path:
    refusal = _peft_refusal(trainer.model)
    if refusal is not None:
        raise ValueError(f"Not writing the prepared head {save_directory}: {refusal}")
    state = trainer.hp_state_dict()
    check_finite(state, f"the prepared head {save_directory}")
    config = prepared_head_config(trainer, backbone_id=backbone_id, tau=tau)
    return write_prepared_head(save_directory, state, config, repo_id=repo_id)


def write_prepared_head(
    save_directory: str | os.PathLike,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    repo_id: str | None = None,
) -> Path:
    """Write a prepared-head folder from its weights and `headprep_head.json` content (and render its card).

    Every file is written under a temporary name and renamed into place, so no file is ever half-written. The
    renames are one by one: a save interrupted between them can leave the new `head.safetensors` beside the previous
    `headprep_head.json`. The json records the sha256 of the weights it belongs to (`weights_sha256`), and
    `load_prepared_head` refuses a pair that does not match. Returns the folder.
    """
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    weights_tmp = folder / (HEAD_WEIGHTS_NAME + ".tmp")
    config_tmp = folder / (HEAD_CONFIG_NAME + ".tmp")
    card_tmp = folder / "README.md.tmp"
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(weights_tmp), metadata={"format": "pt", "headprep_version": __version__})
    config = {**config, "weights_sha256": file_sha256(weights_tmp)}
    config_tmp.write_text(json.dumps(config, indent=2))
    prepared_head_card(config, repo_id=repo_id).save(str(card_tmp))
    os.replace(weights_tmp, folder / HEAD_WEIGHTS_NAME)
    os.replace(config_tmp, folder / HEAD_CONFIG_NAME)
    os.replace(card_tmp, folder / "README.md")
    return folder


def push_head_to_hub(
    trainer: HeadPrepTrainer,
    repo_id: str,
    backbone_id: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload prepared head",
    revision: str | None = None,
    overwrite: bool = False,
) -> str:
    """Upload the trainer's current head (weights, `headprep_head.json`, README.md card) to the Hub repo `repo_id`.

    This is the one place headprep_hf talks to the network (through `huggingface_hub.HfApi`: `create_repo`,
    `list_repo_files`, `create_branch` and `upload_folder`); nothing else in the package does, at import time or later.
    A `ValueError` once FT has started (`refuse_after_ft`). A `FileExistsError` where the repo's `revision` (main when
    None) already holds a README.md or a head, unless `overwrite=True`, as `save_prepared_head` does for a folder: a
    model repo's own card would be replaced by the head card. A branch that does not exist yet is created from main;
    what it inherits from main is replaced there only. Returns the commit URL.
    """
    import tempfile

    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    refuse_after_ft(trainer, "push_head_to_hub()")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        _save_prepared_head(trainer, tmp, backbone_id=backbone_id, repo_id=repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        try:
            present = set(api.list_repo_files(repo_id, revision=revision, repo_type="model"))
            new_branch = False
        except RevisionNotFoundError:
            present, new_branch = set(), True
        existing = [name for name in (HEAD_WEIGHTS_NAME, HEAD_CONFIG_NAME, "README.md") if name in present]
        if existing and not overwrite:
            where = f"{repo_id}@{revision}" if revision is not None else repo_id
            raise FileExistsError(
                f"Not pushing the prepared head to {where}: it already holds {', '.join(existing)}, which the head "
                "would replace (a model repo's own card would become the head card). Push to another repo or to a "
                "new branch (revision=...), or pass overwrite=True to replace them."
            )
        if new_branch and revision is not None and not revision.startswith("refs/pr"):
            # (upload_folder does not create a branch: a new one answered "Revision Not Found"; as transformers'
            # push_to_hub does)
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision, repo_type="model"
        )
    return str(getattr(commit, "commit_url", commit))


def _resolve(repo_id_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    path = Path(repo_id_or_path)
    if path.is_dir():
        return path
    name = str(repo_id_or_path)
    local = path.exists() or name.startswith((".", "/")) or name.count("/") != 1 or path.parent.is_dir()
    if local:  # (a path, or "owner/name" whose owner is a folder here: not sent to the Hub as a repo id)
        why = "it is not a folder" if path.exists() else "no such folder"
        raise FileNotFoundError(
            f"{repo_id_or_path} is not a prepared-head folder ({why}); give the folder save_prepared_head wrote, or "
            "a Hub repo id 'owner/name'."
        )
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            str(repo_id_or_path), revision=revision, allow_patterns=[HEAD_WEIGHTS_NAME, HEAD_CONFIG_NAME, "README.md"]
        )
    )


_REQUIRED_HEAD_KEYS = ("head_modules", "feature_dim", "num_labels", "backbone")


def model_inputs(model: nn.Module) -> dict[str, Any] | None:
    """How `model`'s inputs are prepared, where the model says: the data config a recipe recorded (`set_data_config`:
    input size, interpolation, crop, mean/std), else the normalisation `attach_input_normalization` put on it; None
    when neither (then nothing is checked). JSON-ready (lists, floats)."""
    from .data.device_inputs import input_normalization

    config = model_data_config(model) or input_normalization(model)
    if not config:
        return None
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in config.items()}


def _input_differences(theirs: dict[str, Any] | None, ours: dict[str, Any] | None) -> list[str]:
    """The keys both input descriptions give with different values (floats compared to 1e-6)."""
    if not theirs or not ours:
        return []

    def same(a, b) -> bool:
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return abs(float(a) - float(b)) < 1e-6
        return a == b

    return [k for k in sorted(theirs.keys() & ours.keys()) if not same(theirs[k], ours[k])]


def _read_head_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}); save the prepared head again.") from error
    missing = [k for k in _REQUIRED_HEAD_KEYS if k not in config]
    if not missing and not isinstance(config.get("backbone"), dict):
        missing = ["backbone"]
    elif not missing:
        missing = [f"backbone.{k}" for k in ("id", "checksum") if k not in config["backbone"]]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a complete prepared-head config.")
    if config.get("head_type") == "mlp":  # (the MLP is rebuilt from these before its weights are loaded)
        for key, least in (("mlp_hidden_size", 1), ("mlp_num_layers", 2)):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(
                    f"{path}: {key} is {'missing' if key not in config else repr(value)}; an MLP "
                    f"prepared head (head_type 'mlp') needs an integer >= {least} there. The file is damaged: save "
                    "the prepared head again, or restore the value the probing run used (its mlp_hidden_size/"
                    "mlp_num_layers)."
                )
    return config


def _peft_refusal(model: nn.Module) -> str | None:
    """Why a PEFT model's head cannot be a prepared head, or None for any other model."""
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
        model = model._orig_mod
    model = getattr(model, "module", model)  # (DDP)
    if unwrap_peft_model(model) is model:
        return None
    return (
        f"the model is a PEFT model ({type(model).__name__}), which keeps the head under the adapter's names "
        "(`base_model.model.classifier.modules_to_save...`) and no loader can attach that to the base model. Probe "
        "the head on the base model, save it, then wrap the model: load_prepared_head(model, head); "
        "model = get_peft_model(model, config)."
    )


def _unwrapped(model: nn.Module) -> nn.Module:
    # A torch.compile'd model shares its parameters with the module it wraps (`_orig_mod`): the head goes there.
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
        model = model._orig_mod
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        # PEFT renames the layers it wraps (`base_layer`, `modules_to_save`): neither the head's keys nor the
        # backbone checksum are those of the model the head was probed on.
        raise ValueError(
            f"load_prepared_head got a PEFT model ({type(model).__name__}): its layers are renamed by the adapters, "
            "so the head's tensors and the backbone checksum cannot be matched. Load the prepared head onto the base "
            "model first, then wrap it: load_prepared_head(model, head); model = get_peft_model(model, config)."
        )
    return model


def load_prepared_head(
    model: nn.Module, repo_id_or_path: str | os.PathLike, strict: bool = False, revision: str | None = None
) -> dict[str, Any]:
    """Attach a prepared head (a local folder or a Hub repo id) to `model`; returns its `headprep_head.json`.

    The model must have the architecture the head was probed on, with a task head of the same kind (a model built
    with `num_classes=num_labels`; an MLP head is built here when the prepared head is one). Afterwards
    `HeadPrepTrainer(model, HeadPrepConfig(head_type="linear", ...)).finetune()` starts FT from it (keep
    `head_type="linear"` there: the MLP is already in place). A `torch.compile`d model gets the head in the module it
    wraps; a PEFT model is refused (load the head first, then wrap). Nothing in the model changes unless the head
    loads.

    Raises:
        ValueError: `head.safetensors` is not the file `headprep_head.json` records (`weights_sha256`: two saves
            mixed), the json lacks a key or an MLP size, the feature dimension, the number of labels or the class
            names (where both name them) differ, or the weights do not fit the model or are not finite; with
            `strict=True` also when the backbone checksum differs or the head was probed on inputs prepared
            otherwise (`inputs` in `headprep_head.json`: input size, crop, interpolation, mean/std; where both the
            head and the model record them), otherwise a `BackboneMismatchWarning`. A json without `weights_sha256`
            (written before it was recorded) loads with a `UserWarning`.
    """
    model = _unwrapped(model)
    folder = _resolve(repo_id_or_path, revision)
    config_path, weights_path = folder / HEAD_CONFIG_NAME, folder / HEAD_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: {folder} is not a prepared head (see save_prepared_head).")
    config = _read_head_config(config_path)
    try:
        state = load_file(str(weights_path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types; nothing was executed
        raise ValueError(
            f"{weights_path} is not a readable safetensors file ({error}): a prepared head stores its weights as "
            "safetensors only (a pickle is never loaded). Save it again with save_prepared_head()."
        ) from error
    _check_pair(config, config_path, weights_path)
    split = find_split(model, config["head_modules"], config.get("reinit_modules") or [])
    want_dim, want_labels = config["feature_dim"], config["num_labels"]
    have_dim = feature_dim(model, split)
    if want_dim is not None and have_dim != want_dim:
        raise ValueError(
            f"The prepared head in {folder} takes {want_dim}-dimensional features but the model's head "
            f"{split.head_names} gets {have_dim}: it was probed on another architecture."
        )
    if want_labels is not None and split.num_classes != want_labels:
        raise ValueError(
            f"The prepared head in {folder} predicts {want_labels} labels but the model's head has "
            f"{split.num_classes}: build the model with num_classes={want_labels}."
        )
    head_names = _id2label_list(config.get("id2label"), folder)
    model_names = model_label_names(model)
    if head_names is not None and model_names is not None and head_names != model_names:
        raise ValueError(
            f"The prepared head in {folder} was probed for the classes {head_names} (in label order) but the model "
            f"names its classes {model_names}: label i must mean the same class in both. Build the model and the "
            "data with the head's class order, or probe a head for these classes."
        )
    checksum = backbone_checksum(model, split)
    if checksum != config["backbone"]["checksum"]:
        message = (
            f"The prepared head in {folder} was probed on other backbone weights ({config['backbone']['id']}, "
            f"checksum {config['backbone']['checksum'][:12]}...) than this model's ({checksum[:12]}...); its energy "
            "and accuracy do not hold for this backbone."
        )
        if strict:
            raise ValueError(message + " Pass strict=False to load it anyway.")
        warnings.warn(message, BackboneMismatchWarning, stacklevel=2)
    differ = _input_differences(config.get("inputs"), model_inputs(model))
    if differ:
        message = (
            f"The prepared head in {folder} was probed on inputs prepared otherwise than this model's ("
            + "; ".join(f"{k}: {config['inputs'][k]} there, {model_inputs(model)[k]} here" for k in differ)
            + "); its energy and accuracy do not hold for these inputs. Use the head's data settings (e.g. "
            "--image_size, --crop_pct, the same model's normalisation), or probe a head for these."
        )
        if strict:
            raise ValueError(message + " Pass strict=False to load it anyway.")
        warnings.warn(message, BackboneMismatchWarning, stacklevel=2)
    build_mlp = config.get("head_type") == "mlp" and len(_head_linears(model, split)) == 1
    # Everything is checked against the shapes the model will have (the MLP, when it is built here) before the model
    # is changed: a refused head leaves the caller's model as it was.
    model_shapes = _shapes_after_mlp(model, split, config) if build_mlp else _shapes(model)
    unknown = sorted(set(state) - set(model_shapes))
    wrong_shape = sorted(k for k in state if k in model_shapes and model_shapes[k] != state[k].shape)
    in_head = lambda key: any(key == name or key.startswith(name + ".") for name in split.head_names)  # noqa: E731
    missing = sorted(k for k in model_shapes if in_head(k) and k not in state)  # (it would stay as initialised)
    if unknown or wrong_shape or missing:
        raise ValueError(
            f"The prepared head in {folder} does not fit the model: unknown keys {unknown[:5]}, shape mismatches "
            f"{wrong_shape[:5]}, head tensors it lacks {missing[:5]}."
        )
    bad = nonfinite_keys(state)
    if bad:
        raise ValueError(
            f"The prepared head in {folder} holds NaN or inf values ({', '.join(bad[:5])}): it is not loaded. Probe "
            "the head again (the run that wrote it diverged, or the file was changed)."
        )
    if build_mlp:
        replace_head_with_mlp(model, split, config["mlp_hidden_size"], config["mlp_num_layers"])
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    if head_names is not None and model_names is None:
        set_label_names(model, head_names)  # the finetuned model (and its saved config) names the classes
    record_prepared_head(model, config, source=str(repo_id_or_path))  # the finetuned model's card reports its tau
    return config


def _check_pair(config: dict[str, Any], config_path: Path, weights_path: Path) -> None:
    """`headprep_head.json` must describe this `head.safetensors` (a save interrupted between its renames leaves new
    weights beside the previous json)."""
    recorded = config.get("weights_sha256")
    if recorded is None:
        warnings.warn(
            f"{config_path} records no weights_sha256 (written by headprep_hf before {__version__}, or edited): "
            f"whether it belongs to {weights_path} cannot be checked. Save the prepared head again to record it.",
            UserWarning,
            stacklevel=3,
        )
        return
    actual = file_sha256(weights_path)
    if actual != recorded:
        raise ValueError(
            f"{weights_path} (sha256 {actual[:12]}...) is not the file {config_path} describes (weights_sha256 "
            f"{str(recorded)[:12]}...): the two come from different saves (one interrupted between its renames, or a "
            "file replaced). Neither tau nor energy can be trusted for these weights: save the prepared head again."
        )


def _shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def _shapes_after_mlp(model: nn.Module, split: ModelSplit, config: dict[str, Any]) -> dict[str, torch.Size]:
    """The state-dict shapes `model` has once `replace_head_with_mlp` replaced its head's last linear layer, without
    changing it (the MLP is built on the meta device)."""
    name, linear = mlp_head_target(model, split)
    with torch.device("meta"):
        mlp = MLPHead(linear.in_features, linear.out_features, config["mlp_hidden_size"], config["mlp_num_layers"])
    shapes = {k: v for k, v in _shapes(model).items() if not k.startswith(name + ".")}
    shapes.update({f"{name}.{k}": v.shape for k, v in mlp.state_dict().items()})
    return shapes


def _id2label_list(id2label: dict[str, str] | None, folder: Path) -> list[str] | None:
    if not id2label:
        return None
    try:
        keys = sorted(id2label, key=int)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{folder / HEAD_CONFIG_NAME}: id2label keys must be label numbers, got {list(id2label)}."
        ) from error
    if [int(k) for k in keys] != list(range(len(keys))):
        raise ValueError(f"{folder / HEAD_CONFIG_NAME}: id2label must name labels 0..n-1, got keys {keys}.")
    return [str(id2label[k]) for k in keys]
