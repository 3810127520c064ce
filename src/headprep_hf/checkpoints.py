"""Atomic, verified checkpoints: a checkpoint counts only once it is complete, and is checked before it is resumed.

`transformers.Trainer` writes `checkpoint-N` in place, file by file. Around that, [`HeadPrepTrainer`] marks a
checkpoint being written (`.headprep_writing`, created before the first file), and commits it when every file is
written (its own files included): each file is fsynced, then `headprep_manifest.json` (name, size and sha256 of every
file) is written through a temporary file and a rename, and the mark is removed. So a folder is

* complete: a manifest and no mark;
* torn: the mark is there (the process died while writing it), or it has no manifest while a sibling has one;
* foreign: neither, and no sibling has a manifest (written by `transformers.Trainer`): Trainer's rules apply.

Resuming with `resume_from_checkpoint=True` takes the latest complete checkpoint and warns about each torn one it
skips; an explicit path is verified against its manifest before any state is loaded, and a torn, missing or damaged
file raises a `CheckpointError` naming the file, the folder and the checkpoint to resume from instead. Checkpoint
rotation (`save_total_limit`) runs after the commit, so it never deletes the last complete checkpoint first.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import time

from .files import file_sha256, write_json
from .stages import STATE_NAME as STAGE_STATE_NAME

logger = logging.getLogger(__name__)

MANIFEST_NAME = "headprep_manifest.json"
WRITING_NAME = ".headprep_writing"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the folder, the file and what to do."""


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: str) -> list[str]:
    names = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel not in (MANIFEST_NAME, WRITING_NAME) and not rel.endswith(".tmp"):
                names.append(rel)
    return sorted(names)


def begin_write(folder: str) -> None:
    """Mark `folder` as being written. What it holds is removed first: a leftover of a killed attempt at the same
    step, or a complete checkpoint of this step that a resumed run writes again (kept, a file the new write does not
    make, e.g. measurement state written under other settings, would enter the new manifest as this run's)."""
    parent, name = os.path.split(os.path.normpath(folder))
    for leftover in glob.glob(os.path.join(glob.escape(parent), f".removing-{glob.escape(name)}-*")):  # (killed)
        shutil.rmtree(leftover, ignore_errors=True)
    if os.path.isdir(folder):
        # Renamed away first, in one step, then removed: removed in place, a kill in the middle left a manifest
        # without some of its files, which resume_from_checkpoint=True took for a damaged checkpoint (an error)
        # rather than an incomplete one (skipped). The name is no `checkpoint-*`: Trainer's rotation lists those.
        aside = os.path.join(parent, f".removing-{name}-{os.getpid()}")
        os.replace(folder, aside)
        shutil.rmtree(aside)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, WRITING_NAME), "w") as f:
        f.write("a checkpoint is being written here; without headprep_manifest.json it is incomplete\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync(folder)


def commit(folder: str) -> dict:
    """Make `folder` complete: fsync every file, write the manifest atomically, remove the mark. Returns it."""
    entries = {}
    for rel in _files(folder):
        path = os.path.join(folder, rel)
        _fsync(path)
        entries[rel] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    manifest = {"format_version": 1, "files": entries}
    path = os.path.join(folder, MANIFEST_NAME)
    write_json(path, manifest)
    _fsync(path)
    os.remove(os.path.join(folder, WRITING_NAME))
    _fsync(folder)
    return manifest


def status(folder: str) -> str:
    """`"complete"`, `"torn"` (being written or killed while written) or `"unmarked"` (no manifest, no mark)."""
    if os.path.exists(os.path.join(folder, WRITING_NAME)):
        return "torn"
    with os.scandir(folder) as entries:
        if next(entries, None) is None:  # created, then killed before its mark: nothing in it to resume
            return "torn"
    return "complete" if os.path.isfile(os.path.join(folder, MANIFEST_NAME)) else "unmarked"


def checkpoints(run_dir: str) -> list[str]:
    """The `checkpoint-N` folders of `run_dir`, newest (highest N) first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(run_dir) if (m := _CHECKPOINT.match(name))]
    return [
        os.path.join(run_dir, name)
        for _, name in sorted(found, reverse=True)
        if os.path.isdir(os.path.join(run_dir, name))
    ]


def _not_resumable(folder: str, any_complete: bool) -> str | None:
    """Why checkpoint `folder` cannot be resumed (in a run folder with complete checkpoints or not), or None."""
    state = status(folder)
    if state == "torn":
        return f"is incomplete: the run was killed while writing it (no {MANIFEST_NAME})"
    if state == "unmarked" and os.path.isfile(os.path.join(folder, STAGE_STATE_NAME)):
        # headprep_hf commits every checkpoint it writes with a manifest, written last: this one's was removed
        return (
            f"holds headprep_hf's {STAGE_STATE_NAME} but no {MANIFEST_NAME} (headprep_hf writes one with every "
            "checkpoint: it was removed), so its files cannot be verified"
        )
    if state == "unmarked" and any_complete:
        return (
            f"has no {MANIFEST_NAME}, unlike the run's other checkpoints: the run was killed while writing it, "
            "or another tool (transformers.Trainer, or headprep_hf with hp_epochs=0 and track_dynamics=False, which "
            "writes Trainer's checkpoints) wrote it"
        )
    return None


def latest_resumable(run_dir: str, plain: bool = False) -> str | None:
    """The newest checkpoint of `run_dir` that can be resumed: the newest complete one (each newer torn one is skipped
    with a warning naming it), or, where no checkpoint has a manifest (written by `Trainer`), the newest one.

    `plain`: the resuming run has no stages (`hp_epochs=0`, `train()`), so it resumes as `Trainer` does: an unmarked
    checkpoint newer than the complete ones is taken, not skipped. Such a run writes `Trainer`'s unmarked checkpoints
    itself with `track_dynamics=False`, and a run that switched it between resumes went back to its last marked
    checkpoint (with a warning calling the newer ones torn or foreign), where `Trainer` took the newest."""
    found = checkpoints(run_dir)
    any_complete = any(status(c) == "complete" for c in found) and not plain
    for folder in found:
        why = _not_resumable(folder, any_complete)
        if why is None:
            return folder
        logger.warning("Skipping %s: it %s.", folder, why)
    return None


def _malformed_entries(entries) -> str | None:
    """What is wrong with a manifest's `files` (None where it is `{relative path: {"size": int, "sha256": str}}`, as
    `begin_write`'s commit writes it)."""
    if not isinstance(entries, dict):
        return f"'files' is a {type(entries).__name__}, not a mapping of file names"
    for rel, expected in entries.items():
        if not isinstance(expected, dict):
            return f"the entry of {rel!r} is a {type(expected).__name__}"
        size, digest = expected.get("size"), expected.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool):
            return f"the size of {rel!r} is {size!r}, not a whole number"
        if not isinstance(digest, str):
            return f"the sha256 of {rel!r} is {digest!r}"
    return None


def _previous(folder: str) -> str:
    run_dir, name = os.path.split(os.path.normpath(folder))
    step = int(_CHECKPOINT.match(name).group(1)) if _CHECKPOINT.match(name) else None
    found = checkpoints(run_dir)
    any_complete = any(status(c) == "complete" for c in found)
    for candidate in found:
        candidate_step = int(_CHECKPOINT.match(os.path.basename(candidate)).group(1))
        if (step is None or candidate_step < step) and _not_resumable(candidate, any_complete) is None:
            return f"resume from the previous complete checkpoint {candidate}"
    return "no earlier complete checkpoint exists: start the run again (without resume_from_checkpoint)"


def verify(
    folder: str,
    required: tuple[str | tuple[str, ...], ...] = (),
    use: str = "resumed",
    fix: str | None = None,
    plain: bool = False,
) -> None:
    """Check checkpoint `folder` before anything is loaded from it.

    A complete checkpoint: every file of its manifest is present with its size and sha256, and every entry of
    `required` (a name, or a tuple of alternatives) is in the manifest. A torn one is refused. An unmarked one
    (written by `transformers.Trainer`) passes as Trainer would take it. Raises `CheckpointError` naming the folder,
    the file and what to do: `fix`, or by default the checkpoint to resume from instead (`use` says what the
    checkpoint was to be: "resumed", "loaded as the best model", ...).
    """
    if not os.path.isdir(folder):
        return  # Trainer's own error ("Can't find a valid checkpoint at ...") follows
    state = status(folder)
    siblings = checkpoints(os.path.dirname(os.path.normpath(folder)))
    fix = fix or _previous(folder)
    why = _not_resumable(
        folder, any(status(c) == "complete" for c in siblings) and not plain
    )  # (see latest_resumable)
    if why is not None:
        raise CheckpointError(f"{folder} {why}; {fix}.")
    if state == "unmarked":
        return
    path = os.path.join(folder, MANIFEST_NAME)
    try:
        with open(path) as f:
            entries = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); {fix}.") from error
    malformed = _malformed_entries(entries)
    if malformed is not None:
        raise CheckpointError(f"{path} is malformed ({malformed}): it was changed after it was written; {fix}.")
    for rel, expected in entries.items():
        file = os.path.join(folder, rel)
        if not os.path.isfile(file):
            problem = "is missing"
        elif os.path.getsize(file) != expected["size"]:
            problem = f"has {os.path.getsize(file)} bytes instead of {expected['size']} (truncated or changed)"
        elif file_sha256(file) != expected["sha256"]:
            problem = "does not match its checksum (damaged or changed)"
        else:
            continue
        raise CheckpointError(f"{file} {problem}: checkpoint {folder} cannot be {use}; {fix}.")
    for names in required:
        names = (names,) if isinstance(names, str) else tuple(names)
        if not any(name in entries for name in names):
            on_disk = [name for name in names if os.path.exists(os.path.join(folder, name))]
            what = f"lists no {' or '.join(names)}" + (f" (though {on_disk[0]} is there)" if on_disk else "")
            raise CheckpointError(
                f"{folder}: its manifest {MANIFEST_NAME} {what}, which is needed for it to be {use}; {fix}."
            )


def check_weights_fit(folder: str, model) -> None:
    """Refuse a checkpoint whose `model.safetensors` holds the weights of another model (other tensor names or shapes:
    another `head_type`, `num_classes`, `reinit_modules` or architecture), naming the differences, before Trainer
    loads it. (For a model that is not a transformers `PreTrainedModel`, Trainer loads such weights non-strictly and
    then fails in its warning code with `AttributeError: ... '_keys_to_ignore_on_save'`.) Sharded or `.bin` weights are
    left to Trainer.

    Names are compared for every tensor, shapes for parameters only: a buffer may be state whose size changes as the
    model runs (a record of the data order, a queue), which the model's own `load_state_dict` takes at any size."""
    from safetensors import safe_open

    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        return
    plain = lambda name: name.replace("_orig_mod.", "")  # noqa: E731 - (a model saved or resumed under torch.compile)
    expected = {plain(name): tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    parameters = {plain(name) for name, _ in model.named_parameters()}
    with safe_open(path, framework="pt") as f:
        saved = {plain(name): tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    shapes = [
        f"{name} {saved[name]} in the checkpoint, {expected[name]} in the model"
        for name in sorted(expected.keys() & saved.keys() & parameters)
        if saved[name] != expected[name]
    ]
    if not (missing or unexpected or shapes):
        return
    parts = [
        f"{len(items)} {what} ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})"
        for what, items in (("missing", missing), ("not in the model", unexpected), ("of another shape", shapes))
        if items
    ]
    raise CheckpointError(
        f"{path} holds the weights of another model: tensors {'; '.join(parts)}. Resume with the model and settings "
        "it was written with (head_type, num_classes, reinit_modules, architecture), or start the new run in another "
        "output_dir."
    )


def resume_checkpoint(run_dir: str, resume_from_checkpoint, refuse_existing: bool, plain: bool = False) -> str | None:
    """The checkpoint a `train()` call resumes: `True` is the latest resumable one in `run_dir` (Trainer's error when
    there is none; `plain`: see `latest_resumable`), a path is itself, `None`/`False` none; then, with
    `refuse_existing`, a `run_dir` that already holds checkpoints of an earlier run is refused (a new run would mix
    its checkpoints with them)."""
    if resume_from_checkpoint is True:
        found = latest_resumable(run_dir, plain)
        if found is None:
            raise ValueError(f"No valid checkpoint found in output directory ({run_dir})")
        return found
    if resume_from_checkpoint not in (None, False):
        return str(resume_from_checkpoint)
    existing = checkpoints(run_dir)
    if refuse_existing and existing:
        raise ValueError(
            f"output_dir {run_dir} already holds checkpoints of an earlier run ({existing[0]}); a new run would mix "
            "its checkpoints with them. Resume it with resume_from_checkpoint=True, pick another output_dir, or set "
            "overwrite_output_dir=True."
        )
    return None


def required_files(args, writes_stage_state: bool, checkpoint: str | None = None) -> tuple:
    """What resuming a [`HeadPrepTrainer`] checkpoint reads, for `verify`: the model, `trainer_state.json`, the
    optimizer and scheduler (unless `save_only_model`, or `checkpoint` was written with it) and the stage plan where
    written. The measurement state is not required: a checkpoint written with `track_dynamics=False` has none, and one
    that lost it is caught by the manifest; resuming without it measures what it can (see
    `HeadPrepTrainer._load_stage_state`)."""
    # The weights as Trainer writes them: the model, or a PEFT model's adapter (which Trainer resumes from too).
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors",
               "adapter_model.bin")  # fmt: skip
    required = [weights, "trainer_state.json"]
    if not args.save_only_model and not (checkpoint is not None and written_without_optimizer(checkpoint)):
        required += ["optimizer.pt", "scheduler.pt"]
    if writes_stage_state:
        required.append("headprep_state.json")
    return tuple(required)


def refuse_earlier_outputs(
    output_dir: str, names: tuple[str, ...], own: set[str], overwrite: bool = False, who: str = "a new run"
) -> None:
    """Refuse a new run into `output_dir` when it holds outputs `names` of an earlier run (those in `own`, written by
    the same trainer, are its to replace): they would be overwritten. With `overwrite`, move them aside instead
    (`<name>.replaced-<time>`, a checkpoint `replaced-<time>.checkpoint-N`; logged), so that none is left in place
    beside the new run's outputs where the new run writes no such file (e.g. `save_prepared_head=False`: an earlier
    run's `prepared_head/` would pass for this run's), and nothing is lost (e.g. the prepared head the new run's model
    was loaded from)."""
    earlier = [
        p for p in (os.path.join(output_dir, n) for n in names) if os.path.exists(p) and os.path.abspath(p) not in own
    ]
    if earlier and overwrite:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in earlier:
            # A checkpoint's new name must not start with "checkpoint-": Trainer's rotation (`save_total_limit`) lists
            # `checkpoint-*` and would delete the moved folders, or keep them as the newest and delete this run's.
            head, base = os.path.split(path)
            stem = os.path.join(head, f"replaced-{stamp}.{base}") if base.startswith("checkpoint-") else None
            aside, n = stem or f"{path}.replaced-{stamp}", 1
            while os.path.exists(aside):
                aside, n = f"{stem}-{n}" if stem else f"{path}.replaced-{stamp}-{n}", n + 1
            os.replace(path, aside)
            logger.warning("overwrite_output_dir=True: moved %s of an earlier run to %s.", path, aside)
        return
    if earlier:
        raise ValueError(
            f"output_dir {output_dir} holds results of an earlier run ({', '.join(earlier)}); {who} would "
            "overwrite them. Pick another output_dir, or set overwrite_output_dir=True to replace them."
        )


def written_without_optimizer(checkpoint: str) -> bool:
    """Whether complete checkpoint `checkpoint` was written with `save_only_model=True`: its manifest lists neither
    the optimizer nor the scheduler state, and neither file is there. Trainer resumes such a checkpoint with a new
    optimizer (a run with HP in its loop refuses it: its schedule would restart in HP); it was refused as missing
    `optimizer.pt`, with the advice to resume an earlier checkpoint, which lacked it as well. A file that is there but
    not listed, or listed but gone, is damage, which `verify` names."""
    try:
        with open(os.path.join(checkpoint, MANIFEST_NAME)) as f:
            entries = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # (unreadable or unmarked: `verify` decides)
    names = ("optimizer.pt", "scheduler.pt")
    return not any(name in entries or os.path.exists(os.path.join(checkpoint, name)) for name in names)
