"""Prepared heads: save after HP, attach to a fresh backbone, and the mismatch checks."""

import json
import os

import pytest
import timm
import torch
from conftest import make_config, tiny_timm
from safetensors.torch import load_file
from transformers import TrainerCallback

from headprep_hf import BackboneMismatchWarning, HeadPrepTrainer, load_prepared_head
from headprep_hf.cards import head_probing_record
from headprep_hf.hub import HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME


def _probed(tmp_path, train_set, **overrides):
    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, **overrides), train_dataset=train_set)
    trainer.probe_head()
    folder = trainer.save_prepared_head(str(tmp_path / "head"))
    return trainer, folder


def _rewrite_weights(folder, state) -> None:
    """Replace the head's weights by `state` and record their sha256 in its json (a consistent, damaged pair)."""
    import hashlib

    from safetensors.torch import save_file

    path = os.path.join(folder, HEAD_WEIGHTS_NAME)
    save_file(state, path)
    config_path = os.path.join(folder, HEAD_CONFIG_NAME)
    config = json.loads(open(config_path).read())
    config["weights_sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    with open(config_path, "w") as f:
        json.dump(config, f)


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("head_type", ["linear", "mlp"])
def test_round_trip_gives_identical_logits(tmp_path, train_set, head_type):
    trainer, folder = _probed(tmp_path, train_set, head_type=head_type)
    x = torch.stack([train_set[i]["pixel_values"] for i in range(8)])
    expected = _logits(trainer.model, x)

    fresh = tiny_timm()  # same pretrained backbone, a new random head
    assert not torch.equal(_logits(fresh, x), expected)
    config = load_prepared_head(fresh, folder)
    assert torch.equal(_logits(fresh, x), expected)
    assert config["tau"] == 2 and config["head_type"] == head_type and config["num_labels"] == 3
    assert config["energy"] == trainer.dynamics["energy"] and config["feature_dim"] == fresh.num_features
    on_disk = json.loads((tmp_path / "head" / HEAD_CONFIG_NAME).read_text())
    assert on_disk == config
    assert (tmp_path / "head" / HEAD_WEIGHTS_NAME).stat().st_size < 200_000  # a head, not a backbone


def test_finetune_starts_from_a_loaded_head(tmp_path, train_set):
    trainer, folder = _probed(tmp_path, train_set)
    model = tiny_timm()
    load_prepared_head(model, folder)
    ft = HeadPrepTrainer(model=model, args=make_config(tmp_path / "ft", hp_epochs=0), train_dataset=train_set)
    ft.finetune()
    # FT measured the energy of the loaded head: the one the probing run measured
    assert ft.dynamics["energy"] == pytest.approx(trainer.dynamics["energy"], rel=1e-6)


def test_a_loaded_head_is_not_replaced_or_probed_further_without_a_word(tmp_path, train_set):
    # The review's runs: an FT trainer built with the settings the head was probed with (head_type="mlp",
    # reinit_modules) nested a new random MLP inside the loaded one and re-drew the probed layer4, and FT started from
    # them while the card reported the loaded head; train() with hp_epochs > 0 probed the loaded head (tau 2) on to
    # tau 2 + 2 and recorded tau 2.
    probed = dict(head_type="mlp", mlp_hidden_size=8, reinit_modules=["layer4"])
    _, folder = _probed(tmp_path, train_set, **probed)
    model = tiny_timm()
    load_prepared_head(model, folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for asked, settings in (
        ("head_type='mlp'", probed),
        ("reinit_modules=\\['layer4'\\]", dict(reinit_modules=["layer4"])),
    ):
        with pytest.raises(ValueError, match=rf"{asked} would replace the prepared head this model carries \(loaded "):
            HeadPrepTrainer(
                model=model, args=make_config(tmp_path / "ft", hp_epochs=0, **settings), train_dataset=train_set
            )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # (refused before any change)
    trainer = HeadPrepTrainer(model=model, args=make_config(tmp_path / "more", hp_epochs=2), train_dataset=train_set)
    for call in ("train", "probe_head"):
        with pytest.raises(
            ValueError, match=rf"{call}\(\) would probe further the prepared head .* tau = 2\): it would end"
        ):
            getattr(trainer, call)()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    trainer.finetune()  # (as loaded: what the README advises)
    assert trainer.dynamics["energy"] is not None


def test_probe_head_with_load_best_model_at_end_keeps_the_head_of_tau_hp_epochs(tmp_path, train_set, eval_set):
    # The review's run: Trainer loaded the best HP checkpoint (an earlier epoch's head) at the end of probe_head(),
    # and it was written as the prepared head of tau = hp_epochs. ("Best" on the loss with greater_is_better=True
    # makes an earlier epoch the best on purpose.)
    args = make_config(
        tmp_path, hp_epochs=3, eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
        metric_for_best_model="loss", greater_is_better=True,
    )  # fmt: skip
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train_set, eval_dataset=eval_set)
    trainer.probe_head()
    head = load_file(str(tmp_path / "out" / "prepared_head" / HEAD_WEIGHTS_NAME))
    last = load_file(str(tmp_path / "out" / "hp" / "checkpoint-9" / "model.safetensors"))
    first = load_file(str(tmp_path / "out" / "hp" / "checkpoint-3" / "model.safetensors"))
    assert torch.equal(head["fc.weight"], last["fc.weight"]) and not torch.equal(head["fc.weight"], first["fc.weight"])
    assert torch.equal(trainer.model.fc.weight.detach(), last["fc.weight"])
    trainer.finetune()  # (best model selection is FT's: the boundary model is its first candidate)
    assert trainer.state.best_model_checkpoint is not None and "/hp/" not in trainer.state.best_model_checkpoint


def test_a_loaded_head_saved_again_keeps_its_own_record_or_is_refused(tmp_path, train_set):
    # The review's run: a loaded MLP head with a re-initialised layer4, saved again through a trainer of other
    # settings, was written as head_type 'linear', reinit_modules [] and that trainer's HP learning rate, without
    # layer4 (a partial head), and a loaded linear head took the new trainer's HP settings and no energy.
    trainer, folder = _probed(tmp_path, train_set, hp_learning_rate=0.05)
    first = json.loads((tmp_path / "head" / HEAD_CONFIG_NAME).read_text())
    model = tiny_timm()
    load_prepared_head(model, folder)
    again = HeadPrepTrainer(model=model, args=make_config(tmp_path / "b", hp_epochs=0, hp_learning_rate=0.9),
                            train_dataset=train_set)  # fmt: skip
    again.save_prepared_head(str(tmp_path / "again"))
    second = json.loads((tmp_path / "again" / HEAD_CONFIG_NAME).read_text())
    for key in ("tau", "head_type", "reinit_modules", "hp_learning_rate", "hp_lr_scheduler_type", "energy"):
        assert second[key] == first[key], key
    assert (
        second["seed"] is None and second["hp_train_accuracy"] is None
    )  # (not recorded: unknown, not this trainer's)
    _, mlp_folder = _probed(tmp_path / "mlp", train_set, head_type="mlp", mlp_hidden_size=8, reinit_modules=["layer4"])
    model = tiny_timm()
    load_prepared_head(model, mlp_folder)
    plain = HeadPrepTrainer(model=model, args=make_config(tmp_path / "c", hp_epochs=0), train_dataset=train_set)
    with pytest.raises(ValueError, match=r"was loaded from .*'head_type': 'mlp'.* Copy or push the folder"):
        plain.save_prepared_head(str(tmp_path / "mlp_again"))
    assert not (tmp_path / "mlp_again" / HEAD_WEIGHTS_NAME).exists()


def test_mismatches(tmp_path, train_set):
    _, folder = _probed(tmp_path, train_set)
    with pytest.raises(ValueError, match="3 labels but the model.s head has 5"):
        load_prepared_head(tiny_timm(num_classes=5), folder)
    other_arch = timm.create_model("resnet10t", num_classes=3)
    with pytest.raises(ValueError, match="features"):
        load_prepared_head(other_arch, folder)
    other_weights = tiny_timm(seed=1)  # same architecture, other backbone weights
    with pytest.warns(BackboneMismatchWarning):
        load_prepared_head(other_weights, folder)
    with pytest.raises(ValueError, match="other backbone weights"):
        load_prepared_head(tiny_timm(seed=1), folder, strict=True)
    with pytest.raises(FileNotFoundError, match="not a prepared head"):
        load_prepared_head(tiny_timm(), tmp_path)
    # a mistyped local folder is named as such, not sent to the Hub as a repo id
    (tmp_path / "runs").mkdir()
    for missing in (tmp_path / "runs" / "typo" / "prepared_head", "runs/prepared_head"):
        with pytest.raises(FileNotFoundError, match="not a prepared-head folder \\(no such folder\\)"):
            cwd = os.getcwd()
            os.chdir(tmp_path)
            try:
                load_prepared_head(tiny_timm(), missing)
            finally:
                os.chdir(cwd)


def test_prepared_head_card_parses(tmp_path, train_set):
    from huggingface_hub import ModelCard

    trainer, folder = _probed(tmp_path, train_set, hp_label_smoothing=0.1)
    card = ModelCard.load(str(tmp_path / "head" / "README.md"))
    assert {"headprep_hf", "prepared-head", "tau-2"} <= set(card.data.tags)
    assert card.data.library_name == "headprep_hf"
    assert card.data.to_dict()["headprep_energy"] == pytest.approx(trainer.dynamics["energy"])
    assert f"{trainer.dynamics['energy']:.4f}" in card.text and "HP epochs (tau) | 2" in card.text
    assert "| HP label smoothing (eps_HP) | 0.1 |" in card.text
    # A Hub backbone: base_model, and a "Use" snippet timm runs as written ("hf-hub:" prefix; a bare id is refused)
    from headprep_hf.cards import prepared_head_card

    config = json.loads((tmp_path / "head" / HEAD_CONFIG_NAME).read_text())
    hub = prepared_head_card({**config, "backbone": {**config["backbone"], "id": "timm/resnet18.a1_in1k"}})
    assert hub.data.base_model == "timm/resnet18.a1_in1k"
    assert 'timm.create_model("hf-hub:timm/resnet18.a1_in1k", pretrained=True' in hub.text
    # A backbone not on the Hub (weights from a local file, a graph network: its architecture or class name): the
    # snippet said to build it with timm's pretrained Hub weights, whose checksum is not the probed-on one.
    local = prepared_head_card({**config, "backbone": {**config["backbone"], "id": "GCN"}})
    assert local.data.base_model is None
    assert "pretrained=True" not in local.text and "import timm" not in local.text
    checksum = config["backbone"]["checksum"][:12]
    assert f"model = ...  # the GCN whose weights this head was probed on (checksum {checksum}" in local.text


def test_push_head_to_hub_uploads_exactly_the_artifact(tmp_path, train_set, monkeypatch):
    """The upload is intercepted at the huggingface_hub API boundary: no network."""
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        from pathlib import Path

        folder = Path(folder_path)
        calls["upload"] = (repo_id, {p.name: p.read_bytes() for p in folder.iterdir()}, kwargs)
        return "https://huggingface.co/user/head/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "list_repo_files", fake_list_repo_files({None: [".gitattributes"]}))
    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path), train_dataset=train_set)
    trainer.probe_head()
    url = trainer.push_head_to_hub("user/head", private=True)
    assert url.endswith("/commit/0")
    assert calls["create_repo"] == ("user/head", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo_id, files, _ = calls["upload"]
    assert repo_id == "user/head" and sorted(files) == ["README.md", "head.safetensors", "headprep_head.json"]
    assert b"user/head" in files["README.md"]  # the card's usage snippet names the repo
    assert json.loads(files["headprep_head.json"])["tau"] == 2
    assert "create_branch" not in calls
    # A revision: its branch is created first (upload_folder does not create one; the Hub answers "Revision Not
    # Found"), and the upload goes there.
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.update(create_branch=(repo_id, kw)))
    trainer.push_head_to_hub("user/head", revision="tau2")
    assert calls["create_branch"] == ("user/head", {"branch": "tau2", "exist_ok": True, "repo_type": "model"})
    assert calls["upload"][2]["revision"] == "tau2"


def fake_list_repo_files(files_by_revision: dict):
    """`HfApi.list_repo_files` of a fake repo: the files of each revision (None: main); an unknown one raises the
    Hub's `RevisionNotFoundError`."""
    import httpx2
    from huggingface_hub.errors import RevisionNotFoundError

    def list_repo_files(self, repo_id, revision=None, **kwargs):
        if revision not in files_by_revision:
            request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}/revision/{revision}")
            raise RevisionNotFoundError("404 Revision Not Found", response=httpx2.Response(404, request=request))
        return list(files_by_revision[revision])

    return list_repo_files


def test_push_head_to_hub_does_not_replace_a_repos_card_or_head(tmp_path, train_set, monkeypatch):
    # The push replaced an existing model repo's README.md (its model card) with the head card, and an earlier head
    # with this one, without a word; as save_prepared_head() does for a folder, it is now refused unless overwrite.
    from huggingface_hub import HfApi

    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, repo_id, **kw: uploads.append(kw) or "url")
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: uploads.append(("branch", kw)))
    repo = {None: [".gitattributes", "README.md", "model.safetensors"], "tau1": ["head.safetensors", "README.md"]}
    monkeypatch.setattr(HfApi, "list_repo_files", fake_list_repo_files(repo))
    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path), train_dataset=train_set)
    trainer.probe_head()
    with pytest.raises(FileExistsError, match=r"user/model: it already holds README.md.*overwrite=True"):
        trainer.push_head_to_hub("user/model")
    with pytest.raises(FileExistsError, match=r"user/model@tau1: it already holds head.safetensors, README.md"):
        trainer.push_head_to_hub("user/model", revision="tau1")
    assert uploads == []
    # A new branch is created from main: what it inherits is replaced on that branch only, so it is not refused.
    trainer.push_head_to_hub("user/model", revision="tau2")
    assert uploads[0] == ("branch", {"branch": "tau2", "exist_ok": True, "repo_type": "model"})
    assert uploads[1]["revision"] == "tau2"
    # An existing branch that holds a head is not given a second create_branch call, and overwrite=True replaces it.
    trainer.push_head_to_hub("user/model", revision="tau1", overwrite=True)
    assert uploads[2]["revision"] == "tau1" and len(uploads) == 3


def test_a_head_that_never_went_through_hp_is_recorded_as_tau_0(tmp_path, train_set):
    # save_prepared_head() before probe_head() wrote tau = hp_epochs for the random initial head, and the card of a
    # model finetuned from it repeated "head probing (HP) for tau = 2 epochs".
    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path), train_dataset=train_set)
    folder = trainer.save_prepared_head(str(tmp_path / "head"))
    assert json.loads((tmp_path / "head" / HEAD_CONFIG_NAME).read_text())["tau"] == 0
    model = tiny_timm()
    load_prepared_head(model, folder)
    ft = HeadPrepTrainer(model=model, args=make_config(tmp_path / "ft", hp_epochs=0), train_dataset=train_set)
    ft.finetune()
    ft.create_model_card(model_name="ft")
    assert "headprep_tau: 0" in (tmp_path / "ft" / "out" / "README.md").read_text()


def test_a_second_probe_head_is_refused(tmp_path, train_set):
    # It trained the probed head on (energy 0.4877 -> 0.2691 in the review's run) while the prepared head and card
    # still said tau = hp_epochs.
    trainer, _ = _probed(tmp_path, train_set)
    with pytest.raises(ValueError, match=r"probe_head\(\) already ran on this trainer.*tau = 4 while.*tau = 2"):
        trainer.probe_head()


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"stopped at update {self.step + 1}")


@pytest.mark.parametrize("call", ["probe_head", "train"])
def test_a_head_probing_stopped_part_way_is_not_probed_on_saved_or_finetuned(tmp_path, train_set, call):
    # The review's run: save_prepared_head() recorded the partly probed head as tau 0, and a second probe_head() ran
    # 6 more updates on it (11 in all) and wrote a prepared head of tau = 2 with another head and energy.
    trainer = HeadPrepTrainer(
        model=tiny_timm(), args=make_config(tmp_path), train_dataset=train_set, callbacks=[_StopAt(2)]
    )
    with pytest.raises(KeyboardInterrupt):
        getattr(trainer, call)()
    assert trainer.hp_interrupted is not None
    trainer.pop_callback(_StopAt)
    for what in ("probe_head", "train", "finetune"):
        with pytest.raises(ValueError, match=rf"{what}\(\) on this trainer's model: its head probing stopped after 2"):
            getattr(trainer, what)()
    with pytest.raises(ValueError, match="head probing stopped .* partly probed"):
        trainer.save_prepared_head(str(tmp_path / "head"))
    assert not (tmp_path / "head").exists()


class _AskToStopAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True  # (a time budget, a user's stop button)


@pytest.mark.parametrize("call", ["probe_head", "train"])
def test_a_head_probing_a_callback_stopped_part_way_is_not_written_saved_or_finetuned(tmp_path, train_set, call):
    # The review's runs: probe_head() stopped by a callback after 1 of 6 HP updates still wrote prepared_head/ as
    # tau = hp_epochs (and hp_done let finetune() and the card claim it); train() stopped so warned, but
    # save_prepared_head() then saved the partly probed head as tau 0.
    trainer = HeadPrepTrainer(
        model=tiny_timm(), args=make_config(tmp_path), train_dataset=train_set, callbacks=[_AskToStopAfter(1)]
    )
    getattr(trainer, call)()
    assert trainer.state.global_step == 1 and not trainer.hp_done
    assert not (tmp_path / "out" / "prepared_head").exists()
    trainer.pop_callback(_AskToStopAfter)
    for what in ("probe_head", "train", "finetune"):
        with pytest.raises(ValueError, match=rf"{what}\(\) on this trainer's model: its head probing stopped \(a "):
            getattr(trainer, what)()
    with pytest.raises(ValueError, match="head probing stopped .* after 1 update.* partly probed"):
        trainer.save_prepared_head(str(tmp_path / "head"))
    assert not (tmp_path / "head").exists()


def test_a_head_probing_stopped_before_it_changed_the_head_can_run_again(tmp_path, train_set):
    trainer = HeadPrepTrainer(
        model=tiny_timm(), args=make_config(tmp_path), train_dataset=train_set, callbacks=[_StopAt(0)]
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.probe_head()
    assert trainer.hp_interrupted is None
    trainer.pop_callback(_StopAt)
    trainer.probe_head()
    assert trainer.hp_done


def test_a_resumed_finetune_keeps_the_head_it_started_from(tmp_path, train_set):
    # The resume took whichever prepared head the new process had loaded: the card of a run started from tau 1
    # said tau 4 (or tau 0 where none was loaded), while the weights went on from the tau-1 run's checkpoint.
    _, tau1 = _probed(tmp_path / "p1", train_set, hp_epochs=1)
    _, tau2 = _probed(tmp_path / "p2", train_set)
    settings = dict(hp_epochs=0, save_strategy="steps", save_steps=1)

    def finetune_from(folder, callbacks=(), **kwargs):
        model = tiny_timm()
        if folder is not None:
            load_prepared_head(model, folder)
        args = make_config(tmp_path / "ft", **settings)
        trainer = HeadPrepTrainer(model=model, args=args, train_dataset=train_set, callbacks=list(callbacks))
        trainer.finetune(**kwargs)
        return trainer

    with pytest.raises(KeyboardInterrupt):
        finetune_from(tau1, callbacks=[_StopAt(2)])
    with pytest.raises(
        ValueError, match=r"started from the prepared head of tau=1 .* carries the prepared head of tau=2"
    ):
        finetune_from(tau2, resume_from_checkpoint=True)
    resumed = finetune_from(None, resume_from_checkpoint=True)  # (its weights come from the checkpoint)
    assert head_probing_record(resumed)["tau"] == 1 and head_probing_record(resumed)["source"] == str(tau1)


def test_the_card_of_a_model_finetuned_from_an_mlp_head_names_it(tmp_path, train_set):
    # The card's HP row came from the finetuning run's own arguments ("| head | linear |", no re-initialised
    # modules) where the loaded head was an MLP probed with layer2 re-initialised.
    _, folder = _probed(tmp_path, train_set, head_type="mlp", reinit_modules=["layer2"])
    model = tiny_timm()
    load_prepared_head(model, folder)
    ft = HeadPrepTrainer(model=model, args=make_config(tmp_path / "ft", hp_epochs=0), train_dataset=train_set)
    ft.finetune()
    ft.create_model_card(model_name="ft")
    card = (tmp_path / "ft" / "out" / "README.md").read_text()
    assert "mlp" in card and "layer2" in card


def test_finetuned_model_card(tmp_path, train_set, eval_set):
    from huggingface_hub import ModelCard

    args = make_config(tmp_path, num_train_epochs=1)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train_set, eval_dataset=eval_set)
    trainer.train()
    sweep = {
        "taus": [0, 2, 4],
        "tau_star": 2,
        "selection_metric": "accuracy",
        "summary": {"HP0-FT": {"tau": 0, "validation": 0.5, "test": None}, "HPtau*-FT": None},
    }
    trainer.create_model_card(model_name="tiny-ft", sweep=sweep, metrics={"eval_accuracy": 0.75})
    card = ModelCard.load(str(tmp_path / "out" / "README.md"))
    data = card.data.to_dict()
    assert data["headprep_tau"] == 2 and data["headprep_tau_star"] == 2 and "headprep_hf" in card.data.tags
    assert data["headprep_energy"] == pytest.approx(trainer.dynamics["energy"])
    assert "tau\\* = 2" in card.text and "| eval_accuracy | 0.75 |" in card.text
    assert f"{trainer.dynamics['drift'][-1]['sq_dist']:.4f}" in card.text


def test_sweep_writes_prepared_heads_on_request(tmp_path, train_set, eval_set):
    from headprep_hf import SweepConfig, TauSweep

    args = SweepConfig(
        output_dir=str(tmp_path / "sweep"),
        sweep_taus=[0, 2],
        sweep_prepared_heads=True,
        sweep_metric="loss",  # no compute_metrics: tau* by validation loss
        sweep_report=False,
        sweep_progress=False,
        num_train_epochs=1,
        per_device_train_batch_size=16,
        hp_learning_rate=5e-2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        drift_probe_samples=20,
    )
    result = TauSweep(tiny_timm(), args, train_set, eval_set).run()
    x = torch.stack([train_set[i]["pixel_values"] for i in range(4)])
    for entry in result["results"]:
        folder = tmp_path / "sweep" / "heads" / f"seed_{entry['seed']}" / f"tau_{entry['tau']}"
        model = tiny_timm()
        config = load_prepared_head(model, folder, strict=True)  # probed on exactly this backbone
        assert config["tau"] == entry["tau"] and config["energy"] == entry["energy"]
        # the attached head gives the logits of the sweep's snapshot on the pretrained backbone
        reference = tiny_timm()
        snapshot = load_file(
            str(tmp_path / "sweep" / "heads" / f"seed_{entry['seed']}" / f"tau_{entry['tau']}.safetensors")
        )
        reference.load_state_dict(snapshot, strict=False)
        assert torch.equal(_logits(model, x), _logits(reference, x))


def test_push_to_hub_of_a_finetuned_model_uploads_its_card(tmp_path, train_set, monkeypatch):
    """Trainer.push_to_hub goes through our create_model_card; intercepted at the huggingface_hub API boundary."""
    from types import SimpleNamespace

    from huggingface_hub import HfApi, ModelCard

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        from pathlib import Path

        uploaded.update(repo_id=repo_id, files={p.name: p for p in Path(folder_path).iterdir()})
        uploaded["card"] = ModelCard.load(str(Path(folder_path) / "README.md"))
        return "https://huggingface.co/user/ft/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    args = make_config(tmp_path, num_train_epochs=1, hub_model_id="user/ft")
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train_set)
    trainer.train()
    trainer.push_to_hub()
    assert uploaded["repo_id"] == "user/ft"
    assert {"README.md", "model.safetensors", "headprep_dynamics.json"} <= set(uploaded["files"])
    assert not any(name.endswith((".bin", ".pt", ".pth")) and "model" in name for name in uploaded["files"])
    card = uploaded["card"]
    assert card.data.to_dict()["headprep_tau"] == 2 and "headprep_hf" in card.data.tags


@pytest.mark.parametrize("stage", ["probe_head", "train"])
def test_prepared_head_is_written_when_hp_ends(tmp_path, train_set, stage):
    args = make_config(tmp_path, num_train_epochs=1)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train_set)
    getattr(trainer, stage)()
    folder = tmp_path / "out" / "prepared_head"
    config = load_prepared_head(tiny_timm(), folder, strict=True)  # probed on the untouched pretrained backbone
    assert config["tau"] == 2 and config["energy"] == trainer.dynamics["energy"]
    off = HeadPrepTrainer(
        model=tiny_timm(), args=make_config(tmp_path / "off", save_prepared_head=False), train_dataset=train_set
    )
    off.probe_head()
    assert not (tmp_path / "off" / "out" / "prepared_head").exists()


def test_a_head_probed_on_other_inputs_is_named(tmp_path, train_set):
    """`inputs` in headprep_head.json (the data config a recipe recorded, or the attached normalisation): loading onto
    a model set up for other inputs warns (strict: raises) naming each setting; same or unrecorded inputs do not."""
    import warnings

    from headprep_hf.data import attach_input_normalization
    from headprep_hf.export import set_data_config

    config = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    config = {**config, "crop_pct": 0.95, "crop_mode": "center"}
    model = tiny_timm()
    set_data_config(model, config)
    trainer = HeadPrepTrainer(model=model, args=make_config(tmp_path), train_dataset=train_set)
    trainer.probe_head()
    folder = trainer.save_prepared_head(str(tmp_path / "head"))
    assert json.loads((tmp_path / "head" / HEAD_CONFIG_NAME).read_text())["inputs"]["input_size"] == [3, 32, 32]

    other = tiny_timm()
    set_data_config(other, {**config, "input_size": (3, 48, 48), "crop_pct": 1.0})
    with pytest.warns(BackboneMismatchWarning, match=r"input_size: \[3, 32, 32\] there, \[3, 48, 48\] here"):
        load_prepared_head(other, folder)
    with pytest.raises(ValueError, match="crop_pct: 0.95 there, 1.0 here.*strict=False"):
        load_prepared_head(other, folder, strict=True)
    same = tiny_timm()
    set_data_config(same, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_prepared_head(same, folder)  # the same inputs
        load_prepared_head(tiny_timm(), folder)  # a model that records none: nothing to compare
    normalized = attach_input_normalization(tiny_timm(), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    with pytest.warns(BackboneMismatchWarning, match="mean: "):
        load_prepared_head(normalized, folder)


@pytest.mark.parametrize("damage", ["nan", "missing"])
def test_a_prepared_head_with_nan_or_missing_tensors_is_not_loaded(tmp_path, train_set, damage):
    # Loading checked unknown keys and shapes only: a head holding NaN went into the model, and a head file without
    # fc.weight left the model's random fc.weight in place, both without a word.
    _, folder = _probed(tmp_path, train_set)
    path = os.path.join(folder, HEAD_WEIGHTS_NAME)
    state = {k: v.clone() for k, v in load_file(path).items()}
    if damage == "nan":
        state["fc.weight"][0, 0] = float("nan")
    else:
        del state["fc.weight"]
    _rewrite_weights(folder, state)  # (a consistent pair: the json records these weights' sha256)
    model = tiny_timm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = r"holds NaN or inf values \(fc.weight\)" if damage == "nan" else r"head tensors it lacks \['fc.weight'\]"
    with pytest.raises(ValueError, match=message):
        load_prepared_head(model, folder)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded


def test_push_to_hub_refuses_non_finite_weights(tmp_path, train_set, monkeypatch):
    # save_model refused NaN weights, but Trainer.push_to_hub saves through save_model(_internal_call=True), which
    # skipped the check: NaN weights were written to output_dir and uploaded.
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    from headprep_hf.guard import NonFiniteError

    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kwargs: uploads.append(kwargs))
    args = make_config(tmp_path, num_train_epochs=1, hub_model_id="user/ft")
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train_set)
    trainer.train()
    with torch.no_grad():
        trainer.model.fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="hold NaN or inf values"):
        trainer.push_to_hub()
    assert not uploads and not os.path.exists(os.path.join(args.output_dir, "model.safetensors"))


def test_a_prepared_head_is_not_saved_over_a_folders_files_unless_asked(tmp_path, train_set):
    # The review's runs: save_prepared_head() into a model folder replaced its README.md with the head card, and a
    # second save replaced a tau-1 head with a tau-3 one, without a word.
    trainer, folder = _probed(tmp_path, train_set, hp_epochs=1)
    model_folder = tmp_path / "finetuned"
    model_folder.mkdir()
    (model_folder / "README.md").write_text("My finetuned model")
    for target, held in ((model_folder, "README.md"), (folder, "head.safetensors, headprep_head.json, README.md")):
        with pytest.raises(
            FileExistsError, match=rf"already holds {held}, which the head would replace\. .*overwrite=True"
        ):
            trainer.save_prepared_head(str(target))
    assert (model_folder / "README.md").read_text() == "My finetuned model"
    assert not (model_folder / HEAD_WEIGHTS_NAME).exists()
    trainer.save_prepared_head(str(model_folder), overwrite=True)
    assert load_prepared_head(tiny_timm(), str(model_folder))["tau"] == 1


def test_an_interrupted_save_leaves_no_loadable_mix_of_two_heads(tmp_path, train_set, monkeypatch):
    # A save killed between its renames left the new head.safetensors beside the previous headprep_head.json (another
    # tau, energy, checksum), and load_prepared_head(strict=True) loaded the mix without a word.
    import warnings

    from headprep_hf import hub

    _, folder = _probed(tmp_path, train_set, hp_epochs=1)
    # (a second head, of another trainer, written into the same folder)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path / "second", hp_epochs=2),
                              train_dataset=train_set)  # fmt: skip
    trainer.probe_head()
    real_replace, renamed = os.replace, []

    def killed_after_the_weights(src, dst):
        if renamed:
            raise KeyboardInterrupt  # the process dies after the first rename
        renamed.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(hub.os, "replace", killed_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_prepared_head(folder, overwrite=True)
    monkeypatch.undo()
    assert json.loads((tmp_path / "head" / HEAD_CONFIG_NAME).read_text())["tau"] == 1  # the old json stayed
    with pytest.raises(ValueError, match=r"head\.safetensors .* is not the file .*headprep_head\.json describes"):
        load_prepared_head(tiny_timm(), folder, strict=True)
    # A json written before the sha256 was recorded still loads, with a warning that it cannot be checked.
    trainer.save_prepared_head(folder, overwrite=True)
    config = json.loads((tmp_path / "head" / HEAD_CONFIG_NAME).read_text())
    del config["weights_sha256"]
    (tmp_path / "head" / HEAD_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="records no weights_sha256"):
        assert load_prepared_head(tiny_timm(), folder, strict=True)["tau"] == 2
    trainer.save_prepared_head(folder, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_prepared_head(tiny_timm(), folder, strict=True)  # a complete save: no warning


def test_a_prepared_head_cannot_be_saved_or_pushed_after_ft_started(tmp_path, train_set, monkeypatch):
    # After train(), save_prepared_head() wrote the finetuned head as "prepared head, tau=2" with the HP-end energy.
    from huggingface_hub import HfApi

    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kwargs: uploads.append(kwargs))
    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path), train_dataset=train_set)
    trainer.train()
    boundary = os.path.join(trainer.args.output_dir, "prepared_head")
    with pytest.raises(ValueError, match=f"after FT started.*{boundary} holds the head saved at the HP/FT boundary"):
        trainer.save_prepared_head(str(tmp_path / "late"))
    with pytest.raises(ValueError, match="push_head_to_hub\\(\\) after FT started"):
        trainer.push_head_to_hub("user/head")
    assert not (tmp_path / "late").exists() and not uploads
    # probe_head() then finetune() on one trainer: refused after finetune(), the boundary folder named
    two = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path / "two"), train_dataset=train_set)
    two.probe_head()
    two.save_prepared_head(str(tmp_path / "in_time"))  # before FT: fine
    two.finetune()
    with pytest.raises(ValueError, match="after FT started"):
        two.save_prepared_head(str(tmp_path / "late2"))
    # a run without HP has no prepared head, which the error says (not "set save_prepared_head=True", already set)
    plain = HeadPrepTrainer(
        model=tiny_timm(), args=make_config(tmp_path / "plain", hp_epochs=0), train_dataset=train_set
    )
    plain.train()
    with pytest.raises(ValueError, match="this run had no HP stage"):
        plain.save_prepared_head(str(tmp_path / "late3"))


def test_backbone_id_of_transformers_and_segmentation_models_is_their_hub_id(tmp_path, train_set):
    from transformers import ViTConfig, ViTForImageClassification

    from headprep_hf.hub import prepared_head_config
    from headprep_hf.models import TimmDeepLabV3

    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    config.num_labels = 3
    config._name_or_path = "google/vit-base-patch16-224"  # what from_pretrained records
    vit = HeadPrepTrainer(model=ViTForImageClassification(config), args=make_config(tmp_path / "vit"))
    assert prepared_head_config(vit)["backbone"]["id"] == "google/vit-base-patch16-224"
    seg = HeadPrepTrainer(model=TimmDeepLabV3("test_resnet", 3), args=make_config(tmp_path / "seg"))
    assert prepared_head_config(seg)["backbone"]["id"] == "timm/test_resnet.r160_in1k"  # its timm backbone's
    # The card's "Use" snippet builds the backbone with its own library: it said
    # timm.create_model("hf-hub:google/vit-base-patch16-224", ...) for the transformers ViT, not a timm repo.
    from headprep_hf.cards import prepared_head_card

    text = prepared_head_card(prepared_head_config(vit)).text
    assert "from transformers import ViTForImageClassification" in text and "timm" not in text.split("```")[1]
    assert 'ViTForImageClassification.from_pretrained("google/vit-base-patch16-224", num_labels=3' in text
    # A segmentation model around a timm backbone: timm.create_model would build a classifier, not it.
    assert "timm.create_model" not in prepared_head_card(prepared_head_config(seg)).text
    resnet = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path / "resnet"))
    assert (
        'timm.create_model("hf-hub:timm/test_resnet.r160_in1k", pretrained=True'
        in prepared_head_card(prepared_head_config(resnet)).text
    )


def test_a_refused_mlp_head_leaves_the_model_as_it_was(tmp_path, train_set):
    # The model's linear head was replaced by a random MLP before the weights were read and refused.
    trainer, folder = _probed(tmp_path, train_set, head_type="mlp")
    state = {k: v.clone() for k, v in load_file(os.path.join(folder, HEAD_WEIGHTS_NAME)).items()}
    nan = {**state, "fc.0.bias": torch.full_like(state["fc.0.bias"], float("nan"))}
    wrong = {**state, "fc.2.weight": torch.zeros(3, 7)}
    for damaged, message in ((nan, "NaN or inf"), (wrong, r"shape mismatches \['fc.2.weight'\]")):
        _rewrite_weights(folder, damaged)
        model = tiny_timm()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            load_prepared_head(model, folder)
        assert isinstance(model.fc, torch.nn.Linear)
        assert before.keys() == model.state_dict().keys()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _rewrite_weights(folder, state)  # the intact head still loads and builds the MLP
    model = tiny_timm()
    load_prepared_head(model, folder)
    x = torch.stack([train_set[i]["pixel_values"] for i in range(4)])
    assert torch.equal(_logits(model, x), _logits(trainer.model, x))


@pytest.mark.parametrize("key", ["mlp_hidden_size", "mlp_num_layers"])
def test_a_damaged_mlp_config_names_file_and_key(tmp_path, train_set, key):
    # A missing or null MLP size gave a bare KeyError / TypeError from inside torch.
    _, folder = _probed(tmp_path, train_set, head_type="mlp")
    path = tmp_path / "head" / HEAD_CONFIG_NAME
    config = json.loads(path.read_text())
    for damaged, said in (({k: v for k, v in config.items() if k != key}, "missing"), ({**config, key: None}, "None")):
        path.write_text(json.dumps(damaged))
        model = tiny_timm()
        with pytest.raises(ValueError, match=f"{path}: {key} is {said}; an MLP prepared head .* save the prepared"):
            load_prepared_head(model, folder)
        assert isinstance(model.fc, torch.nn.Linear)


def test_loading_onto_a_compiled_model_goes_to_the_module_it_wraps(tmp_path, train_set):
    # torch.compile's wrapper hides the head under `_orig_mod`: loading failed with "head_modules ['fc'] are not
    # modules of OptimizedModule". (PEFT models are refused with the advice to load before wrapping.)
    trainer, folder = _probed(tmp_path, train_set)
    model = tiny_timm()
    compiled = torch.compile(model)  # (not run: the parameters are the wrapped module's)
    assert load_prepared_head(compiled, folder, strict=True)["tau"] == 2
    assert torch.equal(model.fc.weight, trainer.model.fc.weight.cpu())

    class FakePeftModel(torch.nn.Module):  # what PEFT's PeftModel looks like to the loader (peft is not required)
        peft_config = {"default": None}

        def __init__(self, base):
            super().__init__()
            self.base_model = base

        def get_base_model(self):
            return self.base_model

    with pytest.raises(ValueError, match=r"PEFT model .* load_prepared_head\(model, head\); model = get_peft_model"):
        load_prepared_head(FakePeftModel(tiny_timm()), folder)


def test_recipe_push_uploads_the_card_with_its_results(tmp_path, monkeypatch):
    # train_and_evaluate called save_model() before evaluating: with push_to_hub, Trainer.save_model pushed right
    # there with a card without results, datasets or model-index; the full card was written afterwards, locally only.
    from types import SimpleNamespace

    from conftest import TinyImages
    from huggingface_hub import HfApi, ModelCard

    from headprep_hf.metrics import accuracy_metrics
    from headprep_hf.tasks.base import TaskInputs, train_and_evaluate

    uploads = []

    def upload_folder(self, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, ModelCard.load(os.path.join(folder_path, "README.md"))))
        return SimpleNamespace(commit_url="https://huggingface.co/user/ft/commit/0")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    inputs = TaskInputs(
        model=tiny_timm(),
        train_dataset=TinyImages(32),
        eval_dataset=TinyImages(16, seed=1),
        test_dataset=TinyImages(16, seed=2),
        compute_metrics=accuracy_metrics(),
        card={"tasks": "image-classification", "dataset_tags": "cifar10", "dataset": "CIFAR-10"},
    )
    args = make_config(tmp_path, hp_epochs=1, push_to_hub=True, hub_model_id="user/ft")
    _, metrics = train_and_evaluate(inputs, args)
    assert len(uploads) == 1  # once, at the end
    repo_id, card = uploads[0]
    data = card.data.to_dict()
    assert repo_id == "user/ft" and data["datasets"] == ["cifar10"] and "model-index" in data
    assert f"| test_accuracy | {round(metrics['test_accuracy'], 4)} |" in card.text
    # Trainer.push_to_hub() with no arguments: the card reports the last evaluation (as Trainer's own card does)
    uploads.clear()
    trainer = HeadPrepTrainer(
        model=tiny_timm(),
        args=make_config(tmp_path / "plain", hub_model_id="user/ft2"),
        train_dataset=TinyImages(32),
        eval_dataset=TinyImages(16, seed=1),
        compute_metrics=accuracy_metrics(),
    )
    trainer.train()
    evaluated = trainer.evaluate()
    trainer.push_to_hub()
    ((_, card),) = uploads
    assert f"| eval_accuracy | {round(evaluated['eval_accuracy'], 4)} |" in card.text
    assert "eval_ft/" not in card.text and "eval_runtime" not in card.text
