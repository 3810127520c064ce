"""Acceptance 4: a run interrupted in HP or in FT and resumed ends bit-identical to an uninterrupted one."""

import json

import pytest
import torch
from conftest import TinyImages, bn_head_model, make_config, tiny_timm
from transformers import TrainerCallback

from headprep_hf import HeadPrepTrainer


class Crash(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt(f"simulated crash at step {self.at_step}")


def _trainer(output_dir, callbacks=(), model_fn=tiny_timm, **overrides):
    args = make_config(
        output_dir,
        hp_epochs=2,
        num_train_epochs=2,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=8,
        hp_label_smoothing=0.1,
        optim="sgd",
        optim_args="momentum=0.9",
        **overrides,
    )
    args.output_dir = str(output_dir)
    return HeadPrepTrainer(
        model=model_fn(), args=args, train_dataset=TinyImages(24, seed=0), callbacks=list(callbacks)
    )


@pytest.mark.parametrize("crash_at, stage", [(5, "hp"), (9, "ft")])  # 3 steps/epoch: HP = steps 1..6
@pytest.mark.parametrize("model_fn", [tiny_timm, bn_head_model], ids=["linear-head", "bn-head"])
def test_resume_is_bit_identical(tmp_path, crash_at, stage, model_fn):
    """With a BatchNorm head the statistics recomputed at the HP/FT boundary are part of what must match."""
    reference = _trainer(tmp_path / "reference", model_fn=model_fn)
    reference.train()

    crashed = _trainer(tmp_path / "crashed", callbacks=[Crash(crash_at)], model_fn=model_fn)
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    checkpoint = tmp_path / "crashed" / f"checkpoint-{crash_at - 1}"
    with open(checkpoint / "headprep_state.json") as f:
        recorded = json.load(f)
    # Trainer's training_args.bin, and the same arguments as JSON beside it (readable without unpickling).
    assert (checkpoint / "training_args.bin").is_file()
    assert json.loads((checkpoint / "training_args.json").read_text())["hp_epochs"] == 2
    assert recorded["ft_started"] == (stage == "ft") and recorded["hp_steps"] == 6
    assert not (tmp_path / "crashed" / f"checkpoint-{crash_at + 1}").exists()

    resumed = _trainer(tmp_path / "crashed", model_fn=model_fn)  # a new process would start from a new model
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.resumed_stage == stage
    assert resumed.state.global_step == reference.state.global_step == 12
    ref_state, res_state = reference.model.state_dict(), resumed.model.state_dict()
    different = [k for k in ref_state if not torch.equal(ref_state[k], res_state[k])]
    assert different == []
    # A resume inside the last HP epoch (crash at 5) has not seen that epoch's head inputs: it measures the energy by
    # a pass of the model, where the uninterrupted run takes the head alone on the inputs it kept. The two agree to
    # float rounding (tests/test_energy_sources.py), bit for bit on some CPUs and 7e-9 apart on others (this Intel
    # Xeon: matmuls over other batch shapes round differently); the same path gives the same bits.
    if resumed.dynamics["energy_source"] == reference.dynamics["energy_source"]:
        assert resumed.dynamics["energy"] == reference.dynamics["energy"]
    else:
        assert (crash_at, resumed.dynamics["energy_source"]) == (5, "backbone pass")
        assert resumed.dynamics["energy"] == pytest.approx(reference.dynamics["energy"], rel=1e-6)
    assert resumed.dynamics["drift"][-1] == reference.dynamics["drift"][-1]


def test_resume_with_other_settings_is_refused(tmp_path):
    args = make_config(tmp_path, hp_epochs=1, num_train_epochs=1, save_strategy="steps", save_steps=3)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(48, seed=0))
    trainer.train()
    other = make_config(tmp_path, hp_epochs=2, num_train_epochs=1)
    fresh = HeadPrepTrainer(model=tiny_timm(), args=other, train_dataset=TinyImages(48, seed=0))
    pretrained = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(ValueError, match="written with 3 HP steps but this configuration gives 6"):
        fresh.train(resume_from_checkpoint=True)
    # refused before Trainer loaded the checkpoint's weights: a new run on this model starts from the pretrained one
    assert all(torch.equal(v, pretrained[k]) for k, v in fresh.model.state_dict().items())
    with pytest.raises(ValueError, match="written by train\\(\\); resume it with train"):
        fresh.finetune(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))


def test_new_run_refuses_to_overwrite_checkpoints(tmp_path):
    first = _trainer(tmp_path / "run")
    first.train()
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    second = _trainer(tmp_path / "run")
    with pytest.raises(ValueError, match="already holds checkpoints of an earlier run"):
        second.train()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    second.args.overwrite_output_dir = True
    second.train()


def test_overwrite_moves_the_earlier_runs_checkpoints_aside(tmp_path):
    """overwrite_output_dir=True left an earlier run's checkpoints in place: a new run killed at update 5 then
    resumed (resume_from_checkpoint=True) from the earlier run's checkpoint-12 as its own, trained nothing and ended
    with the earlier run's model."""
    run = tmp_path / "run"
    _trainer(run).train()
    # (save_total_limit: Trainer's rotation must neither delete the moved folders nor keep them as the newest)
    crashed = _trainer(run, callbacks=[Crash(5)], overwrite_output_dir=True, seed=1, save_total_limit=2)
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    moved = sorted(p.name.split(".", 1)[1] for p in run.glob("replaced-*.checkpoint-*"))
    assert moved == sorted(f"checkpoint-{n}" for n in (2, 4, 6, 8, 10, 12))  # (moved aside, none lost)
    resumed = _trainer(run, overwrite_output_dir=True, seed=1)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.resumed_stage == "hp" and resumed.state.global_step == 12
    reference = _trainer(tmp_path / "reference", seed=1)
    reference.train()
    ref_state, res_state = reference.model.state_dict(), resumed.model.state_dict()
    assert [k for k in ref_state if not torch.equal(ref_state[k], res_state[k])] == []


def test_cached_hp_refuses_a_used_output_dir_before_it_probes_the_head(tmp_path):
    # train() with hp_cache_features ran cached HP before the output_dir checks: the refused run left the caller's
    # head probed, and the retry the refusal advises (overwrite_output_dir=True, the same model) probed it again.
    settings = dict(hp_epochs=2, hp_cache_features=True)
    for earlier in (dict(save_strategy="no"), dict(save_strategy="steps", save_steps=2)):  # (results; checkpoints)
        run = tmp_path / earlier["save_strategy"]
        first = HeadPrepTrainer(model=tiny_timm(), args=make_config(run, **settings, **earlier),
                                train_dataset=TinyImages(48))  # fmt: skip
        first.train()
        model = tiny_timm()
        pretrained = {k: v.clone() for k, v in model.state_dict().items()}
        again = HeadPrepTrainer(
            model=model, args=make_config(run, **settings, **earlier), train_dataset=TinyImages(48)
        )
        with pytest.raises(ValueError, match="earlier run"):
            again.train()
        assert all(torch.equal(v, pretrained[k]) for k, v in model.state_dict().items())
        retry = HeadPrepTrainer(model=model, args=make_config(run, **settings, **earlier, overwrite_output_dir=True),
                                train_dataset=TinyImages(48))  # fmt: skip
        retry.train()
        assert retry.dynamics["energy"] == first.dynamics["energy"]  # (the same run again: tau = 2, not 4)


def test_a_resume_from_another_folder_refuses_an_output_dir_of_another_run(tmp_path):
    # Resuming run X from its checkpoint into an output_dir holding run Z's checkpoints was accepted; a later
    # resume_from_checkpoint=True there took Z's newest checkpoint for X's and ended with Z's model.
    _trainer(tmp_path / "z").train()
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "x", callbacks=[Crash(5)]).train()
    z_out = tmp_path / "z"
    before = {p: p.read_bytes() for p in z_out.rglob("*") if p.is_file()}
    x_checkpoint = str(tmp_path / "x" / "checkpoint-4")
    model = tiny_timm()
    resumed = _trainer(tmp_path / "z", model_fn=lambda: model)
    with pytest.raises(ValueError, match=r"holds results of an earlier run \(.*checkpoint-12.*the run resumed from "):
        resumed.train(resume_from_checkpoint=x_checkpoint)
    assert {p: p.read_bytes() for p in z_out.rglob("*") if p.is_file()} == before  # (nothing of Z's touched)
    # overwrite_output_dir moves Z's aside; the run is X's to the end, and resuming it there takes X's checkpoints
    resumed = _trainer(tmp_path / "z", overwrite_output_dir=True)
    resumed.train(resume_from_checkpoint=x_checkpoint)
    reference = _trainer(tmp_path / "reference")
    reference.train()
    assert all(torch.equal(v, reference.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    assert sorted(p.name for p in z_out.glob("checkpoint-*")) == [f"checkpoint-{n}" for n in (10, 12, 6, 8)]
    # resuming from a checkpoint of the output_dir itself stays as it was
    again = _trainer(tmp_path / "z", overwrite_output_dir=True)
    again.train(resume_from_checkpoint=str(z_out / "checkpoint-10"))
    assert again.state.global_step == 12


def test_new_run_refuses_to_overwrite_an_earlier_runs_results(tmp_path):
    """No checkpoints, but an earlier run's prepared head and measurements: a new HP run leaves them untouched."""
    args = make_config(tmp_path, hp_epochs=1)
    HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(24, seed=0)).train()
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert (out / "prepared_head").is_dir() and (out / "headprep_dynamics.json").is_file()
    again = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, hp_epochs=1), train_dataset=TinyImages(24))
    with pytest.raises(ValueError, match="holds results of an earlier run.*prepared_head"):
        again.train()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    again.args.overwrite_output_dir = True
    again.train()
    # A new run that writes no prepared head (nor measurements) left the earlier run's beside its own model, where
    # they passed for this run's (and were uploaded with it): overwrite_output_dir moves them aside (not deleted: the
    # new run's model may have been loaded from that prepared head).
    args = make_config(tmp_path, hp_epochs=2, overwrite_output_dir=True, save_prepared_head=False,
                       track_dynamics=False)  # fmt: skip
    HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(24)).train()
    assert not (out / "prepared_head").exists() and not (out / "headprep_dynamics.json").exists()
    asides = sorted(out.glob("prepared_head.replaced-*"))  # (those of the first run, then of `again`)
    assert len(asides) == 2 and all((a / "head.safetensors").is_file() for a in asides)
    assert len(list(out.glob("headprep_dynamics.json.replaced-*"))) == 2


def test_a_plain_run_resuming_a_head_probing_runs_checkpoint_is_refused_before_the_weights_load(tmp_path):
    # It was refused ("written with 6 HP steps but this configuration gives 0") after Trainer had loaded the
    # checkpoint's weights into the caller's model.
    out = tmp_path / "hp"
    _trainer(out).train()
    model = tiny_timm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = make_config(tmp_path / "hp", hp_epochs=0, num_train_epochs=2, save_strategy="steps", save_steps=2,
                       per_device_train_batch_size=8)  # fmt: skip
    args.output_dir = str(out)
    plain = HeadPrepTrainer(model=model, args=args, train_dataset=TinyImages(24, seed=0))
    with pytest.raises(ValueError, match="written with 6 HP steps but this configuration gives 0"):
        plain.train(resume_from_checkpoint=str(out / "checkpoint-8"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_plain_run_moves_an_earlier_runs_measurements_and_prepared_head_aside(tmp_path):
    # Its headprep_dynamics.json replaced the earlier HP run's (energy of tau 1 -> energy of tau 0) and that run's
    # prepared_head/ stayed beside it as if it were this run's.
    HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, hp_epochs=1), train_dataset=TinyImages(24)).train()
    out = tmp_path / "out"
    earlier = (out / "headprep_dynamics.json").read_bytes()
    plain = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, hp_epochs=0), train_dataset=TinyImages(24))
    plain.train()
    (aside,) = out.glob("headprep_dynamics.json.replaced-*")
    assert aside.read_bytes() == earlier and json.loads((out / "headprep_dynamics.json").read_text())["hp_epochs"] == 0
    assert not (out / "prepared_head").exists() and len(list(out.glob("prepared_head.replaced-*"))) == 1


def test_overwrite_moves_an_earlier_runs_model_results_and_card_aside_too(tmp_path):
    # Only prepared_head/ and headprep_dynamics.json were moved: a finished new run replaced the earlier model,
    # results and card without a trace, and a failed one left them beside its own measurements.
    first = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, hp_epochs=1), train_dataset=TinyImages(24))
    first.probe_head()
    first.save_model()  # (a trainer's own outputs are its to replace: its finetune() goes on)
    first.save_metrics("final", {"validation_accuracy": 0.5})
    first.save_state()
    first.create_model_card(model_name="first")
    first.finetune()
    first.save_model()
    first.create_model_card(model_name="first")
    out = tmp_path / "out"
    finals = ["README.md", "config.json", "final_results.json", "model.safetensors", "trainer_state.json"]
    assert all((out / name).is_file() for name in finals)
    earlier = {name: (out / name).read_bytes() for name in finals}
    again = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, hp_epochs=1), train_dataset=TinyImages(24))
    with pytest.raises(ValueError, match=r"holds results of an earlier run.*model\.safetensors"):
        again.train()
    again.args.overwrite_output_dir = True
    again.train()
    for name in finals:
        assert not (out / name).exists()  # (this run saved no model: nothing of the earlier one passes for it)
        (aside,) = out.glob(f"{name}.replaced-*")
        assert aside.read_bytes() == earlier[name]


def test_resume_from_an_epochs_last_update_keeps_every_drift_record(tmp_path):
    """With save_strategy="steps", a checkpoint at an epoch's last update is written before `on_epoch_end` measures
    that epoch's drift: it is measured before the checkpoint instead, so the resumed run has every drift record."""

    def trainer(output_dir, callbacks=()):
        t = _trainer(output_dir, callbacks)
        t.args.save_steps = 3  # 3 updates per epoch: every checkpoint ends an epoch
        return t

    reference = trainer(tmp_path / "reference")
    reference.train()
    crashed = trainer(tmp_path / "crashed", callbacks=[Crash(10)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = trainer(tmp_path / "crashed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "crashed" / "checkpoint-9"))
    assert [d["step"] for d in reference.dynamics["drift"]] == [9, 12]
    assert resumed.dynamics["drift"] == reference.dynamics["drift"]
    drift_logs = [
        [
            {k: v for k, v in r.items() if k.startswith("drift/") or k == "step"}
            for r in t.state.log_history
            if "drift/cos" in r
        ]
        for t in (reference, resumed)
    ]
    assert drift_logs[0] == drift_logs[1] and len(drift_logs[0]) == 2


def test_a_checkpoint_written_without_measurements_resumes_with_them_on(tmp_path, caplog):
    """A run with track_dynamics=False resumed with the default: the checkpoint (committed, manifest checked) holds
    no measurement state, which is not damage; the run resumes bit-identical and says what it cannot measure."""
    reference = _trainer(tmp_path / "reference")
    reference.args.track_dynamics = False
    reference.train()
    crashed = _trainer(tmp_path / "crashed", callbacks=[Crash(9)])
    crashed.args.track_dynamics = False
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = _trainer(tmp_path / "crashed")  # track_dynamics=True
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "crashed" / "checkpoint-8"))
    assert "holds no measurement state (written with track_dynamics=False" in caplog.text
    ref_state, res_state = reference.model.state_dict(), resumed.model.state_dict()
    assert [k for k in ref_state if not torch.equal(ref_state[k], res_state[k])] == []


@pytest.mark.parametrize(
    "change",
    [
        dict(learning_rate=5e-3),
        dict(hp_learning_rate=0.2),
        dict(lr_scheduler_type="cosine"),
        dict(seed=1),
        dict(ft_label_smoothing=0.1),
        dict(weight_decay=0.1),
        dict(optim="sgd"),
        dict(train_sampling_strategy="sequential"),  # (the data order changed in the middle of the run)
        dict(drift_probe_samples=8),  # (the drift was dropped, with a warning that blamed an earlier version)
    ],  # fmt: skip
)
def test_a_resume_with_a_changed_setting_is_refused_naming_it(tmp_path, change):
    # Only the HP step count was compared: a resume with another learning rate, schedule, seed, smoothing or optimizer
    # went on with the new setting from the checkpoint's step (FT at 0.0033 where the run had 0.00067), silently.
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    settings = dict(hp_epochs=1, num_train_epochs=2, save_strategy="steps", save_steps=4, track_dynamics=False)
    HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, **settings), train_dataset=TinyImages(48),
                    callbacks=[Stop()]).train()  # fmt: skip
    changed = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, **settings, **change),
                              train_dataset=TinyImages(48))  # fmt: skip
    (key,) = change
    pretrained = {k: v.clone() for k, v in changed.model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"checkpoint-4 was written with other settings than this run's \({key}: "):
        changed.train(resume_from_checkpoint=True)
    # (refused before Trainer loaded the checkpoint's weights into the model: the new run the message advises, on the
    # same model, started from finetuned weights)
    assert all(torch.equal(v, pretrained[k]) for k, v in changed.model.state_dict().items())
    # the same settings resume; evaluation and logging settings may change
    same = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, **settings, logging_steps=3),
                           train_dataset=TinyImages(48))  # fmt: skip
    same.train(resume_from_checkpoint=True)
    assert same.state.global_step == 9


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step


def _probe_then_stop_in_ft(folder) -> dict:
    """probe_head() (tau 2), then finetune() stopped after its first checkpoint (step 2); returns the settings."""
    settings = dict(hp_epochs=2, num_train_epochs=1, save_strategy="steps", save_steps=2, track_dynamics=False)
    first = HeadPrepTrainer(model=tiny_timm(), args=make_config(folder, **settings), train_dataset=TinyImages(48))
    first.probe_head()
    first.add_callback(StopAt(2))
    first.finetune()
    return settings


def test_a_fresh_trainer_resuming_finetune_after_probe_head_keeps_the_cards_tau(tmp_path):
    # The card of the resumed run said tau = 0: that HP had run was known only to the trainer that ran it.
    from headprep_hf.cards import head_probing_record

    settings = _probe_then_stop_in_ft(tmp_path)
    resumed = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, **settings), train_dataset=TinyImages(48))
    resumed.finetune(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3 and head_probing_record(resumed)["tau"] == 2
    # a finetune() without probe_head() before it stays at tau 0 after its resume too
    alone = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path / "alone", **settings),
                            train_dataset=TinyImages(48), callbacks=[StopAt(2)])  # fmt: skip
    alone.finetune()
    again = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path / "alone", **settings),
                            train_dataset=TinyImages(48))  # fmt: skip
    again.finetune(resume_from_checkpoint=True)
    assert head_probing_record(again)["tau"] == 0


@pytest.mark.parametrize("old_z0", ["3-D", "flattened", "first samples", "first samples = whole set"])
def test_a_checkpoint_whose_z0_an_earlier_version_wrote_resumes_without_drift(tmp_path, old_z0):
    # Before sequences were reduced to one vector per sample, a text model's z_0 was kept as (P, T, H) or flattened to
    # (P, T * H). Resumed now, such a checkpoint trained a whole FT epoch and then failed on the drift ("z_0 has shape
    # ... but z_t has ...; same probe set needed": a message about the probe, not the checkpoint). And before the probe
    # was evenly spaced over the set, z_0 held its first samples: same shape, other samples, so the resumed drift
    # compared z_t of other samples with it (silently). Such a z_0 is dropped now: the run goes on, says why the
    # drift is not measured, and records it; weights are those of the uninterrupted run. Where the first samples are
    # the whole set (the probe is all of it), nothing differs and the drift goes on.
    from safetensors.torch import load_file, save_file

    from headprep_hf.checkpoints import MANIFEST_NAME, WRITING_NAME, commit

    probe = {"drift_probe_samples": 24} if old_z0 == "first samples = whole set" else {}
    reference = _trainer(tmp_path / "reference", **probe)
    reference.train()
    crashed = _trainer(tmp_path / "crashed", callbacks=[Crash(9)], **probe)
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    checkpoint = tmp_path / "crashed" / "checkpoint-8"  # in FT (HP = steps 1..6)
    path = checkpoint / "headprep_measurements.safetensors"
    z0 = load_file(str(path))["z0"]
    sequences = z0[:, None, :].expand(z0.shape[0], 5, z0.shape[1]).contiguous()
    old = {"3-D": sequences, "flattened": sequences.reshape(z0.shape[0], -1)}.get(old_z0, z0)
    (checkpoint / MANIFEST_NAME).unlink()  # (committed again below: the manifest holds the file as written)
    (checkpoint / WRITING_NAME).write_text("")
    save_file({"z0": old}, str(path))  # as earlier versions wrote it: no probe definition in its metadata
    commit(str(checkpoint))
    resumed = _trainer(tmp_path / "crashed", **probe)
    if old_z0 == "first samples = whole set":
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed.dynamics["drift"] == reference.dynamics["drift"]
        return
    with pytest.warns(UserWarning, match="drift is not measured after this resume"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert "an earlier version" in resumed.dynamics["drift_not_measured"]
    assert all(record["step"] <= 8 for record in resumed.dynamics.get("drift", []))
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


class AugmentedTinyImages(TinyImages):
    """TinyImages with random noise drawn on every access (torch's RNG, in whichever process loads the sample)."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        return {**item, "pixel_values": item["pixel_values"] + 0.2 * torch.randn_like(item["pixel_values"])}


@pytest.mark.parametrize("persistent", [False, True], ids=["workers", "persistent-workers"])
def test_an_epoch_end_resume_with_loader_workers_is_exact_unless_they_persist(tmp_path, caplog, persistent):
    # The recipes load in-memory tensors in workers on a GPU. Non-persistent workers are seeded from the random state
    # at each epoch's start, which the checkpoint restores: the resumed run draws the same augmentation. Persistent
    # workers keep their first epoch's streams (Trainer's behaviour too): the resume says so.
    def trainer(folder, callbacks=()):
        args = make_config(
            folder,
            output_dir=str(folder),
            hp_epochs=2,
            num_train_epochs=2,
            save_strategy="epoch",
            per_device_train_batch_size=8,
            dataloader_num_workers=1,
            dataloader_persistent_workers=persistent,
        )
        return HeadPrepTrainer(
            model=tiny_timm(), args=args, train_dataset=AugmentedTinyImages(24), callbacks=list(callbacks)
        )

    reference = trainer(tmp_path / "reference")
    reference.train()
    crashed = trainer(tmp_path / "crashed", callbacks=[Crash(10)])  # 3 updates per epoch: FT's first epoch ends at 9
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = trainer(tmp_path / "crashed")
    with caplog.at_level("WARNING", logger="headprep_hf"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "crashed" / "checkpoint-9"))
    warned = "Resuming with persistent loader workers" in caplog.text
    assert warned == persistent
    expected = reference.model.state_dict()
    same = all(torch.equal(resumed.model.state_dict()[k], expected[k]) for k in expected)
    assert same == (not persistent)  # (persistent: other augmentation after the resume, as the warning says)
    if not persistent:
        assert resumed.dynamics["drift"][-1] == reference.dynamics["drift"][-1]


def test_a_refused_resume_changes_nothing(tmp_path):
    # The refusals for changed settings came after the trainer took the checkpoint's hp_done (a later probe_head()
    # was refused and the card said tau = 2 for a head never probed), after the model took its prepared-head record,
    # and, from another folder's checkpoint with overwrite_output_dir, after this folder's checkpoints were moved.
    from headprep_hf.cards import head_probing_record
    from headprep_hf.hub import prepared_head_record

    settings = _probe_then_stop_in_ft(tmp_path)
    other = make_config(tmp_path, **settings, learning_rate=5e-4)
    resumed = HeadPrepTrainer(model=tiny_timm(), args=other, train_dataset=TinyImages(48))
    before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    with pytest.raises(ValueError, match="other settings"):
        resumed.finetune(resume_from_checkpoint=True)
    assert resumed.hp_done is False and prepared_head_record(resumed.model) is None
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in before.items())
    assert head_probing_record(resumed)["tau"] == 0
    # from another folder's checkpoint: this folder's own checkpoints stay where they were
    for name in ("A", "B"):
        try:
            _trainer(tmp_path / name, [Crash(5)]).train()
        except KeyboardInterrupt:
            pass
    own = sorted(p.name for p in (tmp_path / "B").iterdir())
    with pytest.raises(ValueError, match="other settings"):
        _trainer(tmp_path / "B", learning_rate=5e-4, overwrite_output_dir=True).train(
            resume_from_checkpoint=str(tmp_path / "A" / "checkpoint-4")
        )
    assert sorted(p.name for p in (tmp_path / "B").iterdir()) == own
    assert _trainer(tmp_path / "B").train(resume_from_checkpoint=True).global_step == 12  # (B's run continues)


def test_a_plain_run_resumes_a_checkpoint_written_without_its_optimizer_as_trainer_does(tmp_path):
    # hp_epochs=0: a checkpoint written with save_only_model=True, resumed with save_only_model=False. Trainer resumes
    # it with a new optimizer; the trainer refused it as missing optimizer.pt and advised an earlier checkpoint, which
    # lacked it too.
    from test_trainer_contract import COMMON, FcClassifier, XYData
    from transformers import Trainer, TrainingArguments

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    from headprep_hf import HeadPrepConfig

    finals = {}
    for cls, args_cls, extra in (
        (Trainer, TrainingArguments, {}),
        (HeadPrepTrainer, HeadPrepConfig, {"hp_epochs": 0}),
    ):
        settings = dict(COMMON, output_dir=str(tmp_path / cls.__name__), save_strategy="steps", save_steps=2, **extra)
        torch.manual_seed(0)
        first = args_cls(**settings, save_only_model=True)
        cls(model=FcClassifier(), args=first, train_dataset=XYData(), callbacks=[Stop()]).train()
        torch.manual_seed(0)
        trainer = cls(model=FcClassifier(), args=args_cls(**settings, save_only_model=False), train_dataset=XYData())
        trainer.train(resume_from_checkpoint=True)
        finals[cls.__name__] = trainer.model.state_dict()
    assert finals["HeadPrepTrainer"].keys() == finals["Trainer"].keys()
    assert all(torch.equal(finals["Trainer"][k], v) for k, v in finals["HeadPrepTrainer"].items())


def test_a_refused_train_keeps_the_trainers_records(tmp_path):
    # train() after probe_head() is refused (a new run into a folder with the probe's results), but it had already
    # emptied the trainer's records: the finetune() after it was refused for the trainer's own prepared head, and a
    # finished run's energy and drift were gone from its card.
    trainer = _trainer(tmp_path)
    trainer.args.save_strategy = "no"  # (results, no checkpoints: the refusal is for the probe's own files)
    trainer.probe_head()
    energy = trainer.dynamics["energy"]
    with pytest.raises(ValueError, match="holds results of an earlier run"):
        trainer.train()
    assert trainer.dynamics["energy"] == energy
    trainer.finetune()  # goes on from the probed head, as without the refused call
    assert trainer.dynamics["energy"] == pytest.approx(energy, rel=1e-5) and trainer.dynamics["drift"]
    with pytest.raises(ValueError, match="holds results of an earlier run"):
        trainer.train()  # (a notebook cell run again)
    assert trainer.dynamics["energy"] == pytest.approx(energy, rel=1e-5) and trainer.dynamics["drift"]


def test_a_plain_run_resumes_the_newest_checkpoint_as_trainer_after_track_dynamics_was_switched(tmp_path, caplog):
    # hp_epochs=0 with track_dynamics=False writes Trainer's unmarked checkpoints; a run that switched it between
    # resumes went back to its last marked checkpoint (calling the newer ones torn or foreign), where Trainer takes the
    # newest. A run with stages still skips them.
    from transformers.trainer_utils import get_last_checkpoint

    def run(resume, stop=None, **overrides):
        args = make_config(tmp_path, hp_epochs=0, num_train_epochs=4, save_strategy="steps", save_steps=2,
                           per_device_train_batch_size=8, **overrides)  # fmt: skip
        trainer = HeadPrepTrainer(
            model=tiny_timm(), args=args, train_dataset=TinyImages(24), callbacks=[StopAt(stop)] if stop else []
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    run(None, stop=4)  # measurements on: checkpoints 2 and 4 marked
    run(True, stop=8, track_dynamics=False)  # checkpoints 6 and 8 as Trainer writes them
    from headprep_hf.checkpoints import latest_resumable

    newest = get_last_checkpoint(str(tmp_path / "out"))
    assert newest.endswith("checkpoint-8") and latest_resumable(str(tmp_path / "out"), plain=True) == newest
    assert latest_resumable(str(tmp_path / "out")).endswith("checkpoint-4")  # (a run with stages: marked ones only)
    caplog.clear()
    with caplog.at_level("WARNING"):
        resumed = run(True)
    assert "Skipping" not in caplog.text and "checkpoint-8 holds no measurement state" in caplog.text
    assert resumed.state.global_step == 12
