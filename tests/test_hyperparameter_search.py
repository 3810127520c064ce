"""`Trainer.hyperparameter_search` and `model_init` on HeadPrepTrainer.

Without HP, a search is the plain `Trainer`'s: the same trials, objectives, weights and checkpoint files (compared
on the same inputs). With HP, every trial is the two-stage run its settings give (`hp_epochs` and the other
HeadPrepConfig fields can be searched), with its results in its own folder beside its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_trainer_contract import COMMON, FcClassifier, XYData
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from headprep_hf import HeadPrepConfig, HeadPrepTrainer

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)

SEARCH = dict(COMMON, save_strategy="epoch", eval_strategy="epoch")


class EvalLosses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.losses.append(metrics["eval_loss"])


def _search(trainer, space, n_trials):
    return trainer.hyperparameter_search(
        hp_space=space,
        backend="optuna",
        n_trials=n_trials,
        direction="minimize",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )


def _last_checkpoint(run_dir):
    steps = [int(d.split("-")[1]) for d in os.listdir(run_dir) if d.startswith("checkpoint-")]
    return os.path.join(run_dir, f"checkpoint-{max(steps)}")


def _lr_space(trial):
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True)}


def _search_with_both(tmp_path, model_init, space, n_trials, **overrides):
    """The same search by the plain Trainer and by HeadPrepTrainer(hp_epochs=0): {class: (best run, every evaluation's
    loss, output_dir)}."""
    results = {}
    for cls, args_cls, extra in (
        (Trainer, TrainingArguments, {}),
        (HeadPrepTrainer, HeadPrepConfig, {"hp_epochs": 0}),
    ):
        losses = EvalLosses()
        out = tmp_path / cls.__name__
        trainer = cls(
            model_init=model_init,
            args=args_cls(output_dir=str(out), **{**SEARCH, **overrides}, **extra),
            train_dataset=XYData(),
            eval_dataset=XYData(seed=1),
            callbacks=[losses],
        )
        results[cls] = _search(trainer, space, n_trials), losses.losses, out
    return results


def test_a_search_without_head_probing_is_trainers(tmp_path):
    results = _search_with_both(tmp_path, lambda: FcClassifier(), _lr_space, n_trials=3)
    (plain_best, plain_losses, plain_out), (best, losses, out) = results[Trainer], results[HeadPrepTrainer]
    assert (best.run_id, best.objective, best.hyperparameters) == (
        plain_best.run_id,
        plain_best.objective,
        plain_best.hyperparameters,
    )
    assert len(losses) == 6 and losses == plain_losses  # (3 trials, 2 evaluations each)
    for run in sorted(os.listdir(plain_out)):
        for checkpoint in sorted(os.listdir(plain_out / run)):
            plain_files, files = set(os.listdir(plain_out / run / checkpoint)), set(os.listdir(out / run / checkpoint))
            assert plain_files <= files
            plain_weights = load_file(plain_out / run / checkpoint / "model.safetensors")
            weights = load_file(out / run / checkpoint / "model.safetensors")
            assert all(torch.equal(plain_weights[k], weights[k]) for k in plain_weights)


def _randomly_initialised():
    """A model initialised from the global random state (Trainer seeds it with `args.seed` before `model_init`)."""
    return FcClassifier(seed=int(torch.randint(0, 2**31, ())))


def test_trainers_default_search_space_with_the_seed_gives_trainers_trials(tmp_path):
    # Trainer's default Optuna space searches `seed` (with the batch size, epochs and learning rate). Trainer 5.24
    # seeds a trial's model_init with the seed args hold before the trial's settings are applied: the same here.
    results = _search_with_both(tmp_path, _randomly_initialised, None, n_trials=3, save_strategy="no")
    (plain_best, plain_losses, _), (best, losses, _) = results[Trainer], results[HeadPrepTrainer]
    assert (best.run_id, best.objective, best.hyperparameters) == (
        plain_best.run_id,
        plain_best.objective,
        plain_best.hyperparameters,
    )
    assert losses == plain_losses and len(set(losses)) > 3  # (the trials differ)


def test_model_init_builds_a_new_model_for_every_train_call_as_trainer_does(tmp_path):
    finals = {}
    for cls, args_cls, extra in (
        (Trainer, TrainingArguments, {}),
        (HeadPrepTrainer, HeadPrepConfig, {"hp_epochs": 0}),
    ):
        trainer = cls(
            model_init=lambda: FcClassifier(),
            args=args_cls(output_dir=str(tmp_path / cls.__name__), **COMMON, **extra),
            train_dataset=XYData(),
        )
        first = trainer.train().training_loss
        second = trainer.train().training_loss
        finals[cls] = first, second, {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert finals[Trainer][:2] == finals[HeadPrepTrainer][:2]
    assert finals[Trainer][0] == finals[Trainer][1]  # (a new model each time: the same run twice)
    plain, ours = finals[Trainer][2], finals[HeadPrepTrainer][2]
    assert all(torch.equal(plain[k], ours[k]) for k in plain)


@pytest.mark.parametrize("cached", [False, True], ids=["in-loop-hp", "cached-hp"])
def test_a_search_trial_with_head_probing_is_the_run_its_settings_give(tmp_path, cached):
    chosen = {}

    def space(trial):
        params = {
            "hp_epochs": trial.suggest_categorical("hp_epochs", [1, 2]),
            "hp_learning_rate": trial.suggest_float("hp_learning_rate", 1e-3, 1e-1, log=True),
        }
        chosen[trial.number] = params
        return params

    args = HeadPrepConfig(output_dir=str(tmp_path / "search"), **SEARCH, hp_epochs=1, hp_cache_features=cached)
    trainer = HeadPrepTrainer(
        model_init=lambda: FcClassifier(), args=args, train_dataset=XYData(), eval_dataset=XYData(seed=1)
    )
    _search(trainer, space, n_trials=3)
    assert sorted(chosen) == [0, 1, 2] and len({p["hp_epochs"] for p in chosen.values()}) == 2
    for number, params in chosen.items():
        run_dir = tmp_path / "search" / f"run-{number}"
        # The trial's own results beside its checkpoints, with its tau (not another trial's, not the args' default).
        dynamics = json.loads((run_dir / "headprep_dynamics.json").read_text())
        head = json.loads((run_dir / "prepared_head" / "headprep_head.json").read_text())
        assert dynamics["hp_epochs"] == head["tau"] == params["hp_epochs"]
        assert head["hp_learning_rate"] == params["hp_learning_rate"]
        # The same run started directly with those settings: the same weights, energy and head.
        direct_args = dataclasses.replace(args, output_dir=str(tmp_path / f"direct-{number}"), **params)
        direct = HeadPrepTrainer(
            model=FcClassifier(), args=direct_args, train_dataset=XYData(), eval_dataset=XYData(seed=1)
        )
        direct.train()
        weights = load_file(os.path.join(_last_checkpoint(run_dir), "model.safetensors"))
        expected = direct.model.state_dict()
        assert all(torch.equal(weights[k], expected[k]) for k in weights)
        assert dynamics["energy"] == direct.dynamics["energy"]
    assert not (tmp_path / "search" / "headprep_dynamics.json").exists()
    assert not (tmp_path / "search" / "prepared_head").exists()


def test_searched_module_names_are_names_not_characters(tmp_path):
    # Trainer sets a searched value as type(current value)(value): with a plain list, "body.0" became six one-letter
    # module names, and a head_modules of "fc" failed as ['f', 'c'].
    chosen = {}

    def space(trial):
        params = {
            "reinit_modules": trial.suggest_categorical("reinit_modules", ["", "body.0"]),
            # ("" = the automatic split, which finds fc here: a trial after one that named the head goes back to it)
            "head_modules": trial.suggest_categorical("head_modules", ["fc", ""]),
        }
        chosen[trial.number] = params
        return params

    args = HeadPrepConfig(output_dir=str(tmp_path / "search"), **SEARCH, hp_epochs=1)
    trainer = HeadPrepTrainer(
        model_init=lambda: FcClassifier(), args=args, train_dataset=XYData(), eval_dataset=XYData(seed=1)
    )
    _search(trainer, space, n_trials=4)
    assert {p["reinit_modules"] for p in chosen.values()} == {"", "body.0"}
    assert [p["head_modules"] for p in chosen.values()][:2] == ["fc", ""]  # (the order the sampler's seed gives)
    for number, params in chosen.items():
        run_dir = tmp_path / "search" / f"run-{number}"
        head = json.loads((run_dir / "prepared_head" / "headprep_head.json").read_text())
        names = [params["reinit_modules"]] if params["reinit_modules"] else []
        assert head["reinit_modules"] == names
        # The trial's recorded arguments in the form the config gives them (Trainer sets the trial's values twice).
        recorded = json.loads((run_dir / _last_checkpoint(run_dir) / "training_args.json").read_text())
        assert recorded["reinit_modules"] == names
        assert recorded["head_modules"] == (["fc"] if params["head_modules"] else None)
        direct_args = dataclasses.replace(
            args, output_dir=str(tmp_path / f"direct-{number}"), reinit_modules=names, head_modules=["fc"]
        )
        # (model_init as in the search: the re-initialisation draws from the random state model_init leaves)
        direct = HeadPrepTrainer(
            model_init=lambda: FcClassifier(), args=direct_args, train_dataset=XYData(), eval_dataset=XYData(seed=1)
        )
        direct.train()
        weights = load_file(os.path.join(_last_checkpoint(run_dir), "model.safetensors"))
        assert all(torch.equal(weights[k], v) for k, v in direct.model.state_dict().items())


def test_a_search_without_stages_records_searched_module_names_as_the_config_gives_them(tmp_path):
    # Trainer sets a trial's values twice (the second time inside Trainer.train), and without HP or measurements no
    # callback of this trainer runs: a searched "" and None were recorded raw ('' and null) and stayed on the args.
    chosen = {}

    def space(trial):
        params = {
            "head_modules": trial.suggest_categorical("head_modules", ["fc", ""]),
            "reinit_modules": trial.suggest_categorical("reinit_modules", [None, "body.0"]),
        }
        chosen[trial.number] = params
        return params

    args = HeadPrepConfig(output_dir=str(tmp_path), **SEARCH, hp_epochs=0, track_dynamics=False)
    trainer = HeadPrepTrainer(
        model_init=lambda: FcClassifier(), args=args, train_dataset=XYData(), eval_dataset=XYData(seed=1)
    )
    _search(trainer, space, n_trials=4)
    assert len({(p["head_modules"], p["reinit_modules"]) for p in chosen.values()}) > 2
    for number, params in chosen.items():
        run_dir = tmp_path / f"run-{number}"
        recorded = json.loads((run_dir / _last_checkpoint(run_dir) / "training_args.json").read_text())
        assert recorded["head_modules"] == (["fc"] if params["head_modules"] else None)
        assert recorded["reinit_modules"] == ([params["reinit_modules"]] if params["reinit_modules"] else [])
    assert trainer.args.reinit_modules == ([params["reinit_modules"]] if params["reinit_modules"] else [])


def test_module_names_given_as_a_string_are_names_separated_by_commas(tmp_path):
    args = HeadPrepConfig(output_dir=str(tmp_path), reinit_modules="layer4.1, layer4.2", head_modules="fc")
    assert args.reinit_modules == ["layer4.1", "layer4.2"] and args.head_modules == ["fc"]
    assert HeadPrepConfig(output_dir=str(tmp_path), reinit_modules="").reinit_modules == []
    assert HeadPrepConfig(output_dir=str(tmp_path), head_modules="").head_modules is None  # the automatic split
    # The command line gives a list: a comma inside one of its words separates names too.
    parsed = HfArgumentParser(HeadPrepConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--reinit_modules", "layer4.1,layer4.2", "layer3"]
    )[0]
    assert parsed.reinit_modules == ["layer4.1", "layer4.2", "layer3"]
    with pytest.raises(ValueError, match="reinit_modules must be a list of module names or a string"):
        HeadPrepConfig(output_dir=str(tmp_path), reinit_modules=3)


def test_a_search_value_out_of_range_is_named(tmp_path):
    args = HeadPrepConfig(output_dir=str(tmp_path), **SEARCH, hp_epochs=1)
    trainer = HeadPrepTrainer(
        model_init=lambda: FcClassifier(), args=args, train_dataset=XYData(), eval_dataset=XYData(seed=1)
    )
    with pytest.raises(ValueError, match="hp_epochs must be an integer >= 0"):
        _search(trainer, lambda trial: {"hp_epochs": trial.suggest_int("hp_epochs", -3, -1)}, n_trials=1)


def test_a_searched_value_that_is_not_module_names_is_named(tmp_path):
    # Trainer casts a searched value to the type of the one it replaces (`ModuleNames`): a number is named by the
    # field's check, not refused inside transformers without the field's name.
    args = HeadPrepConfig(output_dir=str(tmp_path), **SEARCH, hp_epochs=1)
    trainer = HeadPrepTrainer(
        model_init=lambda: FcClassifier(), args=args, train_dataset=XYData(), eval_dataset=XYData(seed=1)
    )
    with pytest.raises(ValueError, match="reinit_modules must be a list of module names .* got 2"):
        _search(trainer, lambda trial: {"reinit_modules": trial.suggest_int("reinit_modules", 2, 2)}, n_trials=1)


@pytest.mark.parametrize("cached", [False, True], ids=["in-loop-hp", "cached-hp"])
def test_with_head_probing_model_init_gives_every_train_call_the_same_two_stage_run(tmp_path, cached):
    args = HeadPrepConfig(
        output_dir=str(tmp_path), **COMMON, hp_epochs=2, hp_cache_features=cached, overwrite_output_dir=True
    )
    trainer = HeadPrepTrainer(model_init=lambda: FcClassifier(), args=args, train_dataset=XYData())
    runs = []
    for _ in range(2):
        loss = trainer.train().training_loss
        head = json.loads((tmp_path / "prepared_head" / "headprep_head.json").read_text())
        runs.append(
            (
                loss,
                trainer.dynamics["energy"],
                head["tau"],
                {k: v.clone() for k, v in trainer.model.state_dict().items()},
            )
        )
    direct = HeadPrepTrainer(
        model=FcClassifier(),
        args=dataclasses.replace(args, output_dir=str(tmp_path / "direct")),
        train_dataset=XYData(),
    )
    loss = direct.train().training_loss
    expected = (loss, direct.dynamics["energy"], 2, direct.model.state_dict())
    for run in runs:  # (each call the run of a model given directly, not a head probed on another model)
        assert run[:3] == expected[:3]
        assert all(torch.equal(run[3][k], expected[3][k]) for k in expected[3])


def test_with_model_init_finetune_goes_on_from_the_head_probe_head_prepared(tmp_path):
    # finetune() started from a new model_init model (Trainer.train rebuilt it): the probed head was thrown away.
    kwargs = dict(train_dataset=XYData(), eval_dataset=XYData(seed=1))
    runs = {}
    for name, model_kwargs in (
        ("init", {"model_init": lambda: FcClassifier()}),
        ("direct", {"model": FcClassifier()}),
    ):
        args = HeadPrepConfig(output_dir=str(tmp_path / name), **COMMON, hp_epochs=2)
        trainer = HeadPrepTrainer(args=args, **model_kwargs, **kwargs)
        trainer.probe_head()
        probed = trainer.model
        trainer.finetune()
        assert trainer.model is probed
        runs[name] = trainer.model.state_dict(), trainer.dynamics["energy"]
    assert runs["init"][1] == runs["direct"][1]
    assert all(torch.equal(runs["init"][0][k], runs["direct"][0][k]) for k in runs["direct"][0])


def test_after_a_search_probe_head_builds_its_model_and_finetune_without_one_is_named(tmp_path):
    args = HeadPrepConfig(output_dir=str(tmp_path / "search"), **SEARCH, hp_epochs=1)
    trainer = HeadPrepTrainer(
        model_init=lambda: FcClassifier(), args=args, train_dataset=XYData(), eval_dataset=XYData(seed=1)
    )
    _search(trainer, _lr_space, n_trials=1)
    assert trainer.model is None  # (Trainer's search releases it)
    with pytest.raises(ValueError, match="finetune\\(\\) has no model to finetune"):
        trainer.finetune()
    trainer.args.output_dir = str(tmp_path / "after")
    trainer.probe_head()  # (a new model from model_init, as train() builds one)
    assert trainer.model is not None and trainer.hp_done


def test_a_trial_reports_ft_evaluations_only_at_fts_own_steps(tmp_path):
    # In-loop HP's evaluations (a frozen backbone) were reported to the pruner, at the steps where other trials
    # report FT's: a MedianPruner pruned the trial with HP during HP, though it would have been the best one.
    args = HeadPrepConfig(output_dir=str(tmp_path), **dict(SEARCH, save_strategy="no"), hp_epochs=1)
    trainer = HeadPrepTrainer(
        model_init=lambda: FcClassifier(), args=args, train_dataset=XYData(), eval_dataset=XYData(seed=1)
    )
    study = {}

    def space(trial):
        study["study"] = trial.study
        return {"hp_epochs": [0, 3][trial.number], "learning_rate": 0.01}

    trainer.hyperparameter_search(
        hp_space=space,
        backend="optuna",
        n_trials=2,
        direction="minimize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )
    plain, probed = study["study"].trials
    assert plain.state == probed.state == optuna.trial.TrialState.COMPLETE
    assert sorted(plain.intermediate_values) == sorted(probed.intermediate_values) == [5, 10]  # FT's steps
    # each FT evaluation's loss, as the trial's run logged it
    hp_run = json.loads((tmp_path / f"run-{probed.number}" / "headprep_dynamics.json").read_text())
    assert hp_run["hp_epochs"] == 3
    assert probed.value == pytest.approx(probed.intermediate_values[10])


def test_a_new_run_starts_a_new_measurement_record(tmp_path):
    # The record outlived the run: a second train() with model_init (and every search trial) appended the first
    # one's non-finite notes and skipped updates to its own.
    class OneNaN(XYData):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "input_x": torch.full_like(item["input_x"], float("nan"))} if i == 5 else item

    args = HeadPrepConfig(output_dir=str(tmp_path), **COMMON, hp_epochs=1, on_nonfinite="skip")
    args.overwrite_output_dir = True
    trainer = HeadPrepTrainer(model_init=lambda: FcClassifier(), args=args, train_dataset=OneNaN())
    records = []
    for _ in range(2):
        trainer.train()
        records.append(json.loads((tmp_path / "headprep_dynamics.json").read_text()))
    assert [s["update"] for s in records[0]["skipped_updates"]] == [1, 6, 15]
    assert records[1]["skipped_updates"] == records[0]["skipped_updates"]
    assert len(records[1]["nonfinite"]) == len(records[0]["nonfinite"]) > 0
    # the first run's files were moved aside (overwrite_output_dir), not replaced in place without a trace
    assert any(".replaced-" in p.name for p in tmp_path.iterdir())


def test_a_trials_ddp_setting_follows_its_own_hp_epochs():
    # hp_epochs > 0 turns ddp_find_unused_parameters on (HP leaves the backbone without gradients); a search trial
    # with hp_epochs=0 after one with HP kept it on, which is not Trainer's setting.
    args = HeadPrepConfig(output_dir="unused", **COMMON, hp_epochs=2)
    assert args.ddp_find_unused_parameters is True
    args.hp_epochs = 0  # (as the search sets a trial's settings)
    args._validate_headprep_fields()
    assert args.ddp_find_unused_parameters is None
    args.hp_epochs = 3
    args._validate_headprep_fields()
    assert args.ddp_find_unused_parameters is True
    mine = HeadPrepConfig(output_dir="unused", **COMMON, hp_epochs=2, ddp_find_unused_parameters=True)
    mine.hp_epochs = 0
    mine._validate_headprep_fields()
    assert mine.ddp_find_unused_parameters is True  # (the user's own setting stays)


def test_a_cached_trials_objective_is_its_evaluation_loss(tmp_path):
    # Cached HP evaluates before FT's loop; Trainer then added `eval_model_preparation_time` to every later
    # evaluation, and its default compute_objective summed that (about 0.0002) in place of eval_loss: an Optuna search
    # that minimised picked a cached trial every time.
    args = HeadPrepConfig(output_dir=str(tmp_path), **SEARCH, hp_epochs=1, hp_cache_features=True)
    trainer = HeadPrepTrainer(
        model_init=lambda: FcClassifier(), args=args, train_dataset=XYData(), eval_dataset=XYData(seed=1)
    )
    best = _search(trainer, lambda trial: {"learning_rate": 0.01}, n_trials=1)
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert not any(key.endswith("model_preparation_time") for e in evaluations for key in e)
    assert best.objective == pytest.approx(evaluations[-1]["eval_loss"])
