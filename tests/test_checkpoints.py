"""Atomic, verified checkpoints: killed writes never resume, damaged files are named, rotation waits for the commit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headprep_hf.checkpoints import (
    MANIFEST_NAME,
    WRITING_NAME,
    CheckpointError,
    begin_write,
    commit,
    latest_resumable,
    status,
    verify,
)

sys.path.insert(0, str(Path(__file__).parent))
import kill_worker  # noqa: E402

WORKER = Path(__file__).parent / "kill_worker.py"


def _run(output_dir: Path, resume=None) -> kill_worker.HeadPrepTrainer:
    trainer = kill_worker.trainer_for(str(output_dir))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    trainer = _run(tmp_path_factory.mktemp("reference") / "out")
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}, trainer.dynamics


def _same(reference_state, model) -> list[str]:
    state = model.state_dict()
    return [k for k in reference_state if not torch.equal(reference_state[k], state[k])]


def test_checkpoints_are_committed_and_rotated_after_the_commit(tmp_path, reference):
    trainer = _run(tmp_path / "out")
    found = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert found == ["checkpoint-12"]  # save_total_limit=1: the older ones were rotated out after each commit
    folder = tmp_path / "out" / "checkpoint-12"
    assert status(str(folder)) == "complete" and not (folder / WRITING_NAME).exists()
    manifest = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    for name in (
        "model.safetensors",
        "optimizer.pt",
        "trainer_state.json",
        "headprep_state.json",
        "headprep_measurements.json",
        "headprep_measurements.safetensors",
        "training_args.bin",
    ):
        assert manifest[name]["size"] == (folder / name).stat().st_size
    assert _same(reference[0], trainer.model) == []
    # The arguments inside are the run's: they were written while the commit held back rotation and the Hub upload
    # (save_total_limit None, push_to_hub False), so a run rebuilt from them kept every checkpoint.
    saved = torch.load(folder / "training_args.bin", weights_only=False)
    assert saved.save_total_limit == trainer.args.save_total_limit == 1 and saved.to_dict() == trainer.args.to_dict()
    assert json.loads((folder / "training_args.json").read_text())["save_total_limit"] == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "step, phase, resumed_from",
    [(4, "model-torn", 2), *[(8, phase, 6) for phase in kill_worker.PHASES[:-1]], (8, "committed", 8)],
)
def test_killed_checkpoint_write_resumes_bit_identical_from_the_last_complete_one(
    tmp_path, reference, step, phase, resumed_from, caplog
):
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, str(WORKER), str(out), str(step), phase], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    torn = out / f"checkpoint-{step}"
    assert torn.is_dir() and status(str(torn)) == ("complete" if phase == "committed" else "torn")
    assert latest_resumable(str(out)) == str(out / f"checkpoint-{resumed_from}")
    if phase != "committed":
        with pytest.raises(CheckpointError, match=rf"checkpoint-{step} is incomplete.*checkpoint-{resumed_from}"):
            kill_worker.trainer_for(str(out)).train(resume_from_checkpoint=str(torn))
    with caplog.at_level("WARNING"):
        resumed = _run(out, resume=True)
    if phase != "committed":
        assert f"Skipping {torn}" in caplog.text
    assert resumed.resumed_stage == ("hp" if resumed_from < 6 else "ft")
    assert _same(reference[0], resumed.model) == []
    assert resumed.dynamics["drift"] == reference[1]["drift"]


@pytest.mark.parametrize(
    "damage, file",
    [
        ("truncate", "model.safetensors"),
        ("delete", "optimizer.pt"),
        ("garbage", "headprep_state.json"),
        ("truncate", "headprep_measurements.safetensors"),
        ("garbage", MANIFEST_NAME),
    ],
)
def test_damaged_or_missing_checkpoint_file_is_named_before_anything_is_loaded(tmp_path, damage, file):
    trainer = kill_worker.trainer_for(str(tmp_path / "out"))
    trainer.args.save_total_limit = None  # keep every checkpoint: the error names the previous one
    trainer.train()
    folder = tmp_path / "out" / "checkpoint-10"
    path = folder / file
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    else:
        path.write_text("{ not json")
    fresh = kill_worker.trainer_for(str(tmp_path / "out"))
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        fresh.train(resume_from_checkpoint=str(folder))
    message = str(error.value)
    assert str(path) in message and message.endswith(
        f"resume from the previous complete checkpoint {folder.parent}/checkpoint-8."
    )
    assert _same(before, fresh.model) == []  # nothing was loaded


def test_hub_upload_of_a_checkpoint_waits_for_its_commit(tmp_path, monkeypatch):
    """`hub_strategy="checkpoint"`: Trainer uploads each checkpoint folder (`_push_from_checkpoint`, a private method:
    this test is also its canary). The upload must see the committed folder, with the stage plan and no write mark,
    and happen before the rotation removes older checkpoints."""
    seen = []

    def record(self, folder):
        names = sorted(p.name for p in Path(folder).iterdir())
        seen.append((Path(folder).name, status(folder), names, len(list(Path(folder).parent.glob("checkpoint-*")))))

    monkeypatch.setattr(kill_worker.HeadPrepTrainer, "init_hf_repo", lambda self, token=None: None)  # no Hub here
    monkeypatch.setattr(kill_worker.HeadPrepTrainer, "_push_from_checkpoint", record)
    trainer = kill_worker.trainer_for(str(tmp_path / "out"))
    trainer.args.push_to_hub, trainer.args.hub_strategy = True, "checkpoint"
    trainer.train()
    assert [s[0] for s in seen] == [f"checkpoint-{step}" for step in (2, 4, 6, 8, 10, 12)]
    for name, state, names, _present in seen:
        assert state == "complete" and WRITING_NAME not in names, name
        assert {MANIFEST_NAME, "headprep_state.json", "headprep_measurements.json"} <= set(names), name
    assert all(present == 2 for *_, present in seen[1:])  # save_total_limit=1: the older one is rotated out after
    assert trainer.args.push_to_hub  # (switched off only inside Trainer's save)


def _damage_one_value(path: Path, key: str) -> None:
    """Add 100 to the first float of tensor `key` in a safetensors file (same size: only the checksum tells)."""
    import struct

    raw = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    start = 8 + header_len + json.loads(raw[8 : 8 + header_len])[key]["data_offsets"][0]
    raw[start : start + 4] = struct.pack("<f", struct.unpack("<f", raw[start : start + 4])[0] + 100.0)
    path.write_bytes(bytes(raw))


def test_a_damaged_best_checkpoint_is_not_loaded_at_the_end(tmp_path):
    # load_best_model_at_end loaded the best checkpoint's weights unchecked: a file damaged after its commit (same
    # size) became the final model without a word. It is verified against its manifest first.
    from conftest import TinyImages, make_config, tiny_timm
    from transformers import TrainerCallback

    from headprep_hf import HeadPrepTrainer

    class Damage(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                _damage_one_value(Path(state.best_model_checkpoint) / "model.safetensors", "fc.weight")

    args = make_config(tmp_path, hp_epochs=1, num_train_epochs=2, per_device_train_batch_size=8, eval_strategy="steps",
                       eval_steps=3, save_strategy="steps", save_steps=3, load_best_model_at_end=True,
                       track_dynamics=False)  # fmt: skip
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(24), eval_dataset=TinyImages(16),
                              callbacks=[Damage()])  # fmt: skip
    match = r"model.safetensors does not match its checksum.*cannot be loaded as the best model; the model of the last"
    with pytest.raises(CheckpointError, match=match):
        trainer.train()


def test_a_checkpoint_of_another_model_is_named_before_it_is_loaded(tmp_path):
    # A checkpoint written with head_type="mlp", resumed into a linear-head model: Trainer loaded it non-strictly and
    # failed with "AttributeError: 'ResNet' object has no attribute '_keys_to_ignore_on_save'".
    from conftest import TinyImages, make_config, tiny_timm

    from headprep_hf import HeadPrepTrainer

    settings = dict(hp_epochs=1, per_device_train_batch_size=8, save_strategy="steps", save_steps=3,
                    track_dynamics=False)  # fmt: skip
    args = make_config(tmp_path, head_type="mlp", mlp_hidden_size=8, max_steps=6, **settings)
    HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(24)).train()
    linear = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, max_steps=9, **settings),
                             train_dataset=TinyImages(24))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"checkpoint-9/model.safetensors holds the weights of another model: "
                       r"tensors 2 missing \(fc.bias, fc.weight\); 4 not in the model \(fc.0.bias"):  # fmt: skip
        linear.train(resume_from_checkpoint=True)


def test_an_empty_checkpoint_folder_is_not_taken_for_a_trainer_checkpoint(tmp_path):
    # A kill between creating checkpoint-N and writing its mark left an empty folder, which resuming took for a
    # checkpoint of transformers.Trainer ("resume it with hp_epochs=0"): it is incomplete.
    run = tmp_path / "out"
    (run / "checkpoint-3").mkdir(parents=True)
    assert status(str(run / "checkpoint-3")) == "torn" and latest_resumable(str(run)) is None
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")  # a Trainer checkpoint (no manifest anywhere)
    assert latest_resumable(str(run)) == str(run / "checkpoint-2")


def test_a_checkpoint_whose_manifest_was_removed_is_not_resumed_unverified(tmp_path, caplog):
    # A lone checkpoint that had lost its manifest but kept headprep_state.json was loaded without any check (a
    # truncated model then failed with safetensors' raw error); one beside complete checkpoints was called "killed
    # while writing it" even when another tool wrote it.
    out = tmp_path / "out"
    first = kill_worker.trainer_for(str(out))
    first.args.save_total_limit = None  # keep every checkpoint
    first.train()
    found = sorted((p for p in out.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))
    newest, previous = found[-1], found[-2]
    (newest / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match=rf"{newest.name} holds headprep_hf's headprep_state.json but no "
                       rf"{MANIFEST_NAME}.*cannot be verified; resume from the previous complete checkpoint "
                       rf".*{previous.name}"):  # fmt: skip
        kill_worker.trainer_for(str(out)).train(resume_from_checkpoint=str(newest))
    with caplog.at_level("WARNING"):
        assert latest_resumable(str(out)) == str(previous)
    assert f"Skipping {newest}: it holds headprep_hf's" in caplog.text
    # a folder another tool wrote beside the run's complete checkpoints is named as possibly that
    (newest / "headprep_state.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{newest.name} has no {MANIFEST_NAME}, unlike the run's other "
                       r"checkpoints: the run was killed while writing it, or another tool"):  # fmt: skip
        kill_worker.trainer_for(str(out)).train(resume_from_checkpoint=str(newest))


def test_a_complete_checkpoint_written_again_keeps_none_of_its_files(tmp_path):
    # A resumed run writing a step again kept the complete folder's files, so one the new write did not make (the
    # measurement state of a run under other settings) entered the new manifest as this run's.
    folder = tmp_path / "checkpoint-4"
    begin_write(str(folder))
    (folder / "model.safetensors").write_bytes(b"old")
    (folder / "headprep_measurements.json").write_text("{}")
    commit(str(folder))
    assert status(str(folder)) == "complete"
    begin_write(str(folder))
    (folder / "model.safetensors").write_bytes(b"new")
    commit(str(folder))
    assert sorted(json.loads((folder / MANIFEST_NAME).read_text())["files"]) == ["model.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST_NAME, "model.safetensors"]


def test_a_kill_while_a_checkpoint_is_replaced_leaves_no_damaged_one(tmp_path, monkeypatch):
    # A resumed run writing checkpoint-4 again removed the old one in place: killed in the middle, the folder kept its
    # manifest without some of its files, and resume_from_checkpoint=True raised on it instead of skipping it.
    import shutil

    from headprep_hf import checkpoints as module

    tmp_path = tmp_path / "lr[1e-3]"  # (a glob character in the path: the leftover is still found)
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        begin_write(str(folder))
        for name in ("model.safetensors", "trainer_state.json", "optimizer.pt"):
            (folder / name).write_bytes(b"x" * 100)
        commit(str(folder))
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        (Path(path) / "optimizer.pt").unlink()
        raise KeyboardInterrupt("killed while removing")

    monkeypatch.setattr(module.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        begin_write(str(tmp_path / "checkpoint-4"))
    monkeypatch.setattr(module.shutil, "rmtree", real_rmtree)
    assert latest_resumable(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    begin_write(str(tmp_path / "checkpoint-4"))  # the next write removes the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda m: {**m, "files": list(m["files"])}, r"is malformed \('files' is a list, not a mapping"),
        (lambda m: {"files": {k: {"size": v["size"]} for k, v in m["files"].items()}}, r"the sha256 of 'model"),
        (lambda m: {"files": {k: {**v, "size": str(v["size"])} for k, v in m["files"].items()}}, r"the size of 'mo"),
        (lambda m: {"files": {}}, r"its manifest headprep_manifest.json lists no model.safetensors .*\(though "),
    ],
    ids=["list", "no-sha256", "size-as-text", "empty"],
)
def test_an_edited_manifest_is_named_with_what_is_wrong_in_it(tmp_path, edit, named):
    # They raised a bare AttributeError or KeyError, "688 bytes instead of 688", or "has no model.safetensors"
    # beside the file.
    folder = tmp_path / "checkpoint-4"
    begin_write(str(folder))
    (folder / "model.safetensors").write_bytes(b"weights")
    commit(str(folder))
    verify(str(folder), required=("model.safetensors",))  # (as written: it passes)
    manifest = folder / MANIFEST_NAME
    manifest.write_text(json.dumps(edit(json.loads(manifest.read_text()))))
    with pytest.raises(CheckpointError, match=named):
        verify(str(folder), required=("model.safetensors",))
