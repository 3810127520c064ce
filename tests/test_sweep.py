"""The tau sweep: snapshots equal standalone HP, FT from the pristine backbone, sweep.json, shards, exchange."""

import dataclasses
import json
import os
import shutil

import pytest
import timm
import torch
from conftest import CONFIG_DEFAULTS, TinyImages, clone_state, tiny_timm
from safetensors.torch import load_file
from transformers import TrainerCallback

from headprep_hf import HeadPrepConfig, HeadPrepTrainer, SweepConfig, TauSweep, load_sweep, merge_sweeps
from headprep_hf.checkpoints import CheckpointError
from headprep_hf.exchange import head_exchange
from headprep_hf.metrics import accuracy_metrics
from headprep_hf.sweep import _fingerprint_tag, format_table, parse_shard, validate_taus
from headprep_hf.sweep_schema import validate_exchange, validate_sweep

COMMON = {k: v for k, v in CONFIG_DEFAULTS.items() if k != "hp_epochs"}  # the sweep sets tau per job


def sweep_config(path, **overrides):
    values = {**COMMON, "output_dir": str(path), "sweep_taus": [0, 2, 4], "sweep_progress": False}
    values.update(overrides)
    return SweepConfig(**values)


@pytest.fixture(scope="module")
def data():
    return TinyImages(48, seed=0), TinyImages(24, seed=1), TinyImages(24, seed=2)


def run_sweep(path, data, model=None, callbacks=None, **overrides):
    train, val, test = data
    model = model if model is not None else tiny_timm()
    kwargs = {"callbacks": callbacks} if callbacks else {}
    sweep = TauSweep(
        model, sweep_config(path, **overrides), train, val, test, compute_metrics=accuracy_metrics(), **kwargs
    )
    return sweep.run()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """One uncached sweep over taus 0, 2, 4 with exchange and report, shared by the checks below."""
    path = tmp_path_factory.mktemp("sweep")
    model = tiny_timm()
    before = clone_state(model.state_dict())
    result = run_sweep(path, data, model=model, sweep_exchange=True)
    return path, result, model, before


@pytest.mark.parametrize(
    "variant",
    [
        dict(hp_cache_features=False),
        dict(hp_cache_features=True),
        dict(head_type="mlp", hp_cache_features=True),
        dict(hp_backbone_mode="train"),  # BatchNorm statistics move in HP: the snapshot must carry them
        dict(reinit_modules=["layer4"]),  # BatchNorm in HP modules: statistics recomputed for every snapshot
    ],
    ids=["uncached", "cached", "mlp-cached", "backbone-train", "reinit-bn"],
)
def test_snapshot_equals_standalone_probe_head(tmp_path, data, variant):
    result = run_sweep(tmp_path / "sweep", data, sweep_report=False, **variant)
    for tau in (2, 4):
        args = HeadPrepConfig(**{**COMMON, "output_dir": str(tmp_path / f"hp{tau}")}, hp_epochs=tau, **variant)
        trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=data[0])
        trainer.probe_head()
        standalone = trainer.hp_state_dict()
        snapshot = load_file(str(tmp_path / "sweep" / result["hp"]["seeds"]["0"]["snapshots"][str(tau)]))
        assert sorted(snapshot) == sorted(standalone)
        assert any(k.startswith("fc.") for k in snapshot)
        if variant.get("hp_backbone_mode") == "train" or variant.get("reinit_modules"):
            assert any(k.endswith("running_mean") for k in snapshot)
        for key in snapshot:
            assert torch.equal(snapshot[key], standalone[key]), (tau, key)
        # and the FT job measured the energy of exactly that prepared model
        entry = next(r for r in result["results"] if r["tau"] == tau)
        assert entry["energy"] == pytest.approx(trainer.dynamics["energy"], rel=1e-6)


def _energy(model, dataset):
    """Mean ||e_y - softmax(q)||_2 over the dataset, plain torch."""
    model.eval()
    x = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    y = torch.tensor([dataset[i]["labels"] for i in range(len(dataset))])
    with torch.no_grad():
        p = model(x).softmax(dim=1)
    return (torch.nn.functional.one_hot(y, p.shape[1]).float() - p).norm(dim=1).mean().item()


def test_sweep_json_is_valid_and_consistent(finished, data):
    path, result, model, before = finished
    on_disk = json.loads((path / "sweep.json").read_text())
    validate_sweep(on_disk)
    assert on_disk == json.loads(json.dumps(result))
    assert [r["tau"] for r in result["results"]] == [0, 2, 4] and result["complete"]
    val = {r["tau"]: r["validation"]["accuracy"] for r in result["results"]}
    assert result["tau_star"] == min(t for t in val if val[t] == max(val.values()))
    assert result["summary"]["HP0-FT"]["tau"] == 0 and result["summary"]["HPmax-FT"]["tau"] == 4
    assert result["summary"]["HPtau*-FT"]["test"] == next(
        r["test"]["accuracy"] for r in result["results"] if r["tau"] == result["tau_star"]
    )
    for entry in result["results"]:
        dynamics = json.loads((path / entry["output_dir"] / "headprep_dynamics.json").read_text())
        assert entry["energy"] == dynamics["energy"] and entry["drift"] == {
            **dynamics["drift"][-1],
            "model": "last update",
        }
        assert entry["head_grad_norm"] and sum(entry["p0_histogram"]["counts"]) == 48
        assert entry["energy_views"] == "as training reads them"  # (no energy_dataset given)
    energies = [r["energy"] for r in result["results"]]
    assert energies == sorted(energies, reverse=True)  # more HP, lower energy
    assert "tau* =" in format_table(result)
    # no empty folders left behind: the HP run's output_dir and the jobs' checkpoint folders (none were written)
    assert [p for p in path.rglob("*") if p.is_dir() and not any(p.iterdir())] == []


def test_ft_jobs_start_from_the_untouched_pretrained_model(finished, data):
    path, result, model, before = finished
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    # tau=0: FT starts from the pretrained backbone with the initial head: energy computed independently
    assert result["results"][0]["energy"] == pytest.approx(_energy(tiny_timm(), data[0]), rel=1e-5)
    # every FT job then moved the backbone away from the pretrained weights
    for entry in result["results"]:
        tuned = load_file(str(path / entry["output_dir"] / "model.safetensors"))
        assert not torch.equal(tuned["conv1.0.weight"], before["conv1.0.weight"])


def test_report_and_exchange_of_a_finished_sweep(finished, data):
    from headprep_hf.files import file_sha256

    path, result, model, before = finished
    plots = sorted(p.name for p in (path / "plots").iterdir())
    assert plots == sorted(
        [
            "drift_vs_tau.png",
            "exchange_heatmap.png",
            "ft_metric_vs_tau.png",
            "head_grad_norm.png",
            "hp_accuracy_energy_vs_tau.png",
            "p0_histograms.png",
        ]
    )
    exchange = json.loads((path / "exchange.json").read_text())
    validate_exchange(exchange)
    assert exchange["sweep_fingerprint"] == _fingerprint_tag(result["fingerprint"])  # the sweep it was measured for
    # and the models it paired, by the sha256 of each job's file
    assert exchange["models"] == {
        str(r["tau"]): file_sha256(path / r["output_dir"] / "model.safetensors") for r in result["results"]
    }
    # the diagonal is each finetuned model itself: its validation accuracy as the trainer evaluated it
    for i, entry in enumerate(result["results"]):
        assert exchange["validation_accuracy"][i][i] == pytest.approx(entry["validation"]["accuracy"], abs=1e-6)
    # recomputing it through the API gives the same matrix
    again = head_exchange(tiny_timm(), path, data[0], data[1], sweep_config(path), output_file=path / "again.json")
    assert again["validation_accuracy"] == exchange["validation_accuracy"]


def test_the_exchange_refuses_a_finetuned_model_changed_after_its_job(finished, data, tmp_path):
    # The exchange read each job's model.safetensors unchecked: a flipped bit changed the matrix without a word.
    import shutil

    from safetensors.torch import load_file, save_file

    from headprep_hf.files import file_sha256

    path, result, _, _ = finished
    for entry in result["results"]:
        assert entry["model_sha256"] == file_sha256(path / entry["output_dir"] / "model.safetensors")
    copy = tmp_path / "sweep"
    shutil.copytree(path, copy)
    model_file = copy / "tau_2" / "seed_0" / "model.safetensors"
    state = load_file(model_file)
    state["fc.weight"][0, 0] *= 2
    save_file(state, model_file)
    with pytest.raises(
        ValueError, match=r"tau_2/seed_0/model.safetensors is not the model the sweep saved for tau = 2"
    ):
        head_exchange(tiny_timm(), copy, data[0], data[1], sweep_config(copy), output_file=copy / "damaged.json")
    assert not (copy / "damaged.json").exists()


def test_a_sweep_metric_compute_metrics_does_not_return_is_refused_before_anything_runs(tmp_path, data):
    # A misspelt sweep_metric was refused after HP and the first FT job, and the corrected rerun into the folder was
    # then refused as another sweep's (the metric is fingerprinted).
    with pytest.raises(ValueError, match=r"sweep_metric 'acuracy' is not among the validation metrics \['accuracy', "
                       r"'loss'\] \(compute_metrics returned these on one batch"):  # fmt: skip
        run_sweep(tmp_path / "sweep", data, sweep_metric="acuracy")
    assert not (tmp_path / "sweep").exists()

    # a compute_metrics that cannot score one batch does not block the sweep: the jobs' evaluations decide
    def needs_the_whole_set(prediction):
        if len(prediction.label_ids) < 24:
            raise ValueError("undefined on so few samples")
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    train, val, test = data
    args = sweep_config(tmp_path / "whole", sweep_taus=[0], per_device_eval_batch_size=8)
    result = TauSweep(tiny_timm(), args, train, val, None, compute_metrics=needs_the_whole_set).run()
    assert result["tau_star"] == 0


def test_rerunning_a_finished_sweep_reuses_it(finished, data):
    path, result, model, before = finished
    content = (path / "sweep.json").read_bytes()
    kept = (path / "tau_0" / "seed_0" / "model.safetensors").stat().st_mtime_ns
    assert run_sweep(path, data, sweep_exchange=True) == result  # nothing reran: the same sweep.json
    assert (path / "sweep.json").read_bytes() == content
    assert (path / "tau_0" / "seed_0" / "model.safetensors").stat().st_mtime_ns == kept


@pytest.mark.parametrize("moved", ["result", "snapshot"])
def test_a_result_or_snapshot_moved_into_another_jobs_place_is_refused(finished, data, tmp_path, moved):
    # The fingerprint holds no tau or seed: tau_0's result copied into tau_2's folder was taken as tau_2's, and the
    # complete sweep.json was replaced by one holding tau_0 twice (exit status 0).
    path = tmp_path / "copy"
    shutil.copytree(finished[0], path)
    if moved == "result":
        target = path / "tau_2" / "seed_0" / "sweep_result.json"
        shutil.copy(path / "tau_0" / "seed_0" / "sweep_result.json", target)
        match = r"holds the result of tau=0 seed=0, not of this folder's job \(tau=2 seed=0\)"
    else:
        target = path / "heads" / "seed_0" / "tau_2.safetensors"
        shutil.copy(path / "heads" / "seed_0" / "tau_4.safetensors", target)
        match = "is the head snapshot of tau=4 seed=0"
    before = tree_hash(path)
    with pytest.raises(ValueError, match=match) as error:
        run_sweep(path, data, sweep_exchange=True)
    assert str(target) in str(error.value) and tree_hash(path) == before


def test_interrupted_sweep_reuses_finished_jobs(tmp_path, data):
    path = tmp_path / "s"
    first = run_sweep(path, data, sweep_report=False)
    os.remove(path / "sweep.json")  # as if interrupted before the end ...
    os.remove(path / "tau_4" / "seed_0" / "sweep_result.json")  # ... during the last FT job
    kept = (path / "tau_0" / "seed_0" / "model.safetensors").stat().st_mtime_ns
    second = run_sweep(path, data, sweep_report=False)
    assert (path / "tau_0" / "seed_0" / "model.safetensors").stat().st_mtime_ns == kept  # reused, not rerun
    assert second["results"] == first["results"][:2] + [second["results"][2]]
    assert second["results"][2]["energy"] == pytest.approx(first["results"][2]["energy"], rel=1e-6)
    # a different sweep in the same folder is refused instead of mixed in, before anything is touched
    os.remove(path / "sweep.json")
    before = tree_hash(path)
    with pytest.raises(ValueError, match="belongs to another sweep"):
        run_sweep(path, data, learning_rate=5e-4, sweep_report=False)
    assert tree_hash(path) == before


@pytest.mark.parametrize("name", ["drift_dataset", "energy_dataset"])
def test_a_sweep_continued_with_another_measurement_set_is_refused(tmp_path, data, name):
    # The review's run: the finished jobs were reused and the rest measured on the other set, and sweep.json mixed
    # the two drifts (5.3524 on one probe set, 5.41431 on the other) without a word.
    train, val, test = data
    path = tmp_path / "s"

    def run(measured_on):
        args = sweep_config(path, sweep_taus=[0, 2], sweep_report=False)
        sweep = TauSweep(
            tiny_timm(), args, train, val, test, compute_metrics=accuracy_metrics(), **{name: measured_on}
        )
        return sweep.run()

    run(TinyImages(20, seed=5))
    os.remove(path / "sweep.json")  # as if interrupted during the last FT job
    os.remove(path / "tau_2" / "seed_0" / "sweep_result.json")
    before = tree_hash(path)
    with pytest.raises(ValueError, match=rf"belongs to another sweep .*{name}: other labels"):
        run(TinyImages(20, seed=6))
    assert tree_hash(path) == before


def test_a_damaged_job_checkpoint_is_named_with_what_a_sweep_can_do(tmp_path, data):
    # The error advised resuming from the previous checkpoint, which a sweep cannot be told: every rerun failed alike.
    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if args.output_dir.endswith(os.path.join("tau_2", "seed_0")) and state.global_step == 3:
                raise KeyboardInterrupt

    settings = dict(sweep_taus=[0, 2], sweep_report=False, save_strategy="steps", save_steps=1)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tmp_path, data, callbacks=[Stop()], **settings)
    ft = tmp_path / "tau_2" / "seed_0" / "ft"
    damaged = ft / "checkpoint-2"
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"tau=2 seed=0: .* move {damaged} out of {ft} .* rerun the sweep"):
        run_sweep(tmp_path, data, **settings)
    damaged.rename(tmp_path / "damaged")  # as the message says: the job resumes from checkpoint-1
    assert [r["tau"] for r in run_sweep(tmp_path, data, **settings)["results"]] == [0, 2]


def tree_hash(folder) -> dict[str, str]:
    """Every file under `folder` with its content hash (what a refused run must leave exactly as it was)."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class _Interrupt(Exception):
    pass


class _StopAt(TrainerCallback):
    """Interrupts the sweep at update `step` of the HP run (`job` 0) or of the `job`-th FT job, once."""

    def __init__(self, job, step):
        self.job, self.step, self.runs, self.fired = job, step, -1, False

    def on_train_begin(self, args, state, control, **kwargs):
        self.runs = 0 if args.output_dir.endswith("hp") else self.runs + 1

    def on_step_end(self, args, state, control, **kwargs):
        if not self.fired and self.runs == self.job and state.global_step == self.step:
            self.fired = True
            raise _Interrupt  # (before this step's checkpoint: checkpoint-2 exists at step 3)


@pytest.mark.parametrize("job, step", [(0, 4), (1, 3), (2, 3)], ids=["during-HP", "first-FT-job", "second-FT-job"])
def test_rerun_with_other_settings_is_refused_before_any_file_changes(tmp_path, data, job, step):
    """A sweep interrupted in HP (snapshots partly written), in its first FT job (a checkpoint, no result) or in the
    second (one finished job): a rerun with another learning rate changes nothing; the same settings continue it."""
    path = tmp_path / "s"
    settings = dict(sweep_report=False, save_strategy="steps", save_steps=2)
    with pytest.raises(_Interrupt):
        run_sweep(path, data, callbacks=[_StopAt(job, step)], **settings)
    before = tree_hash(path)
    assert before  # something was written before the interruption
    # (what differs is named where the files record it: a job's files, not the HP snapshots)
    what = r"it differs in the settings \(learning_rate: [0-9.e-]+ -> 0\.0005\)" if job else "other model, grid"
    with pytest.raises(ValueError, match=f"belongs to another sweep \\({what}.*nothing was changed"):
        run_sweep(path, data, learning_rate=5e-4, **settings)
    assert tree_hash(path) == before
    continued = run_sweep(path, data, **settings)
    reference = run_sweep(tmp_path / "reference", data, **settings)
    assert [r["validation"] for r in continued["results"]] == [r["validation"] for r in reference["results"]]


def test_shards_merge_into_the_full_sweep(tmp_path, data):
    full = run_sweep(tmp_path / "full", data, hp_cache_features=True, sweep_report=False)
    shard_a = run_sweep(tmp_path / "a", data, hp_cache_features=True, sweep_shard="0/2", sweep_report=False)
    shard_b = run_sweep(tmp_path / "b", data, hp_cache_features=True, sweep_shard="1/2", sweep_report=False)
    assert [r["tau"] for r in shard_a["results"]] == [0, 4] and [r["tau"] for r in shard_b["results"]] == [2]
    assert shard_a["tau_star"] is None and not shard_a["complete"]
    merged = merge_sweeps([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    assert merged["complete"] and merged["tau_star"] == full["tau_star"]
    for m, f in zip(merged["results"], full["results"]):
        assert m["validation"] == f["validation"] and m["energy"] == f["energy"]
        assert (tmp_path / "merged" / m["output_dir"] / "model.safetensors").is_file()
    assert load_sweep(tmp_path / "merged")["merged_from"] == [str(tmp_path / "a"), str(tmp_path / "b")]

    # bad merges: nothing is written
    with pytest.raises(ValueError, match="already exists"):
        merge_sweeps([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    with pytest.raises(ValueError, match="in two shards"):
        merge_sweeps([tmp_path / "a", tmp_path / "full"], tmp_path / "dup")
    other = run_sweep(tmp_path / "other", data, hp_cache_features=True, sweep_taus=[0, 2], sweep_report=False)
    assert other["complete"]
    with pytest.raises(ValueError, match="they differ in the grid of taus"):
        merge_sweeps([tmp_path / "a", tmp_path / "other"], tmp_path / "bad")
    assert not (tmp_path / "dup").exists() and not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "taus, match",
    [([], "empty"), ([0, 4, 2], "sorted"), ([0, 2, 2], "duplicates"), ([-1, 2], ">= 0"), ([0, 1.5], "integers")],
)
def test_bad_grids(tmp_path, taus, match):
    with pytest.raises(ValueError, match=match):
        validate_taus(taus)
    with pytest.raises(ValueError, match=match):
        sweep_config(tmp_path, sweep_taus=taus)


@pytest.mark.parametrize("spec", ["3/2", "2/2", "1/0", "x", "1-2"])
def test_bad_shard_specs(tmp_path, spec):
    with pytest.raises(ValueError, match="sweep_shard"):
        sweep_config(tmp_path, sweep_shard=spec)


def test_shard_selection_and_schedule_check(tmp_path):
    assert parse_shard("1/3") == (1, 3)
    args = sweep_config(tmp_path, sweep_taus=[0, 1, 2, 4, 8, 16, 32], sweep_shard="1/3")
    assert args.shard_taus() == [1, 8]
    with pytest.raises(ValueError, match="constant"):
        sweep_config(tmp_path, hp_lr_scheduler_type="cosine")
    # A warmup ratio got HeadPrepConfig's advice first (another HP schedule), which the sweep then refused too.
    with pytest.raises(ValueError, match=r"A tau sweep needs hp_lr_scheduler_type='constant' and hp_warmup_ratio=0"):
        sweep_config(tmp_path, hp_warmup_ratio=0.1)


def test_unknown_selection_metric_is_reported(tmp_path, data):
    with pytest.raises(ValueError, match="sweep_metric 'f1'"):
        run_sweep(tmp_path, data, sweep_metric="f1", sweep_taus=[0])


# ------------------------------------------------------------------ fingerprint: data, task and settings
class _Undecodable(torch.utils.data.Dataset):
    """A generic dataset (no `.labels`): the fingerprint may ask its length, never an item."""

    def __len__(self):
        return 7

    def __getitem__(self, i):
        raise AssertionError("the fingerprint read an item")


def test_fingerprint_describes_the_data_without_reading_items(tmp_path):
    from headprep_hf.sweep import describe_data

    a, same, other = TinyImages(24, seed=1), TinyImages(24, seed=1), TinyImages(24, seed=9)
    assert describe_data(validation=a) == describe_data(validation=same)
    assert describe_data(validation=a) != describe_data(validation=other)  # same length, other labels
    assert describe_data(train=_Undecodable(), test=None) == {"train": {"length": 7, "labels": None}, "test": None}
    subset = torch.utils.data.Subset(a, [0, 2, 4])
    assert (
        describe_data(s=subset)["s"]["labels"] != describe_data(s=torch.utils.data.Subset(a, [1, 2, 4]))["s"]["labels"]
    )

    def fingerprint(task, val=a):
        return TauSweep(tiny_timm(), sweep_config(tmp_path), _Undecodable(), val, task=task).fingerprint()

    task = {"name": "image_classification", "args": {"max_train_samples": 100, "cache_dir": "/a"}}
    assert fingerprint(task) == fingerprint({**task, "args": {**task["args"], "cache_dir": "/b"}})  # where, not what
    assert fingerprint(task) != fingerprint({**task, "args": {**task["args"], "max_train_samples": 5000}})
    assert fingerprint(task) != fingerprint(None)
    assert fingerprint(task) != fingerprint(task, val=other)


def test_rerun_on_other_data_is_refused_before_any_file_changes(tmp_path, data):
    path = tmp_path / "s"
    run_sweep(path, data, sweep_taus=[0], sweep_report=False)
    before = tree_hash(path)
    train, val, test = data
    cases = (((train, TinyImages(24, seed=9), test), r"validation: other labels"),
             ((TinyImages(32, seed=7), val, test), r"train: 48 -> 32 samples"))  # fmt: skip
    for other, what in cases:
        with pytest.raises(
            ValueError, match=rf"belongs to another sweep \(it differs in the data \({what}\)\).*nothing was changed"
        ):
            run_sweep(path, other, sweep_taus=[0], sweep_report=False)
        assert tree_hash(path) == before


@pytest.mark.parametrize(
    "a, b",
    [
        (dict(greater_is_better=True), dict(greater_is_better=False)),
        (dict(), dict(eval_strategy="steps", save_strategy="steps", eval_steps=1, save_steps=1)),
        (dict(eval_strategy="steps", save_strategy="steps", eval_steps=1, save_steps=1),
         dict(eval_strategy="steps", save_strategy="steps", eval_steps=2, save_steps=2)),
        (dict(on_nonfinite="skip"), dict(on_nonfinite="ignore")),
        (dict(optim_args=None), dict(optim_args="amsgrad=True")),
        (dict(track_dynamics=True), dict(track_dynamics=False)),
        (dict(sweep_greater_is_better=None), dict(sweep_greater_is_better=False)),
        (dict(), dict(train_sampling_strategy="sequential")),
        (dict(), dict(bf16_full_eval=True)),
        (dict(), dict(eval_delay=2)),
        (dict(), dict(label_names=["coarse_label"])),  # (a dataset with two label columns hashes the same either way)
        (dict(), dict(neftune_noise_alpha=5.0)),
        (dict(), dict(remove_unused_columns=False)),
        (dict(), dict(include_for_metrics=["inputs"])),
    ],
    ids=["greater_is_better", "strategy", "steps", "on_nonfinite", "optim_args", "track_dynamics", "sweep_direction",
         "sampling", "half_eval", "eval_delay", "label_names", "neftune", "columns", "metric_inputs"],
)  # fmt: skip
def test_settings_that_change_results_are_fingerprinted(tmp_path, a, b):
    from headprep_hf.sweep import config_fingerprint

    base = dict(load_best_model_at_end=True, metric_for_best_model="accuracy", eval_strategy="epoch")
    base["save_strategy"] = "epoch"
    first = config_fingerprint(sweep_config(tmp_path, **{**base, **a}))
    assert first != config_fingerprint(sweep_config(tmp_path, **{**base, **b}))
    # machine-dependent settings do not keep the shards of two machines apart
    assert first == config_fingerprint(sweep_config(tmp_path, **{**base, **a}, dataloader_num_workers=3))


def test_settings_added_to_the_fingerprint_later_keep_the_fingerprint_of_their_defaults(tmp_path):
    # train_sampling_strategy, half-precision evaluation, torch_compile, ... joined the fingerprint after sweeps
    # were written: at their defaults they leave it as it was, so an earlier sweep's folder is still continued.
    import hashlib

    from headprep_hf.sweep import _FINGERPRINT_FIELDS, _FINGERPRINT_FIELDS_IF_SET, config_fingerprint

    args = sweep_config(tmp_path)
    values = {name: getattr(getattr(args, name, None), "value", getattr(args, name, None)) for name in
              _FINGERPRINT_FIELDS}  # fmt: skip
    values["sweep_greater_is_better"] = args.selection_greater_is_better
    values["save_strategy"] = values["save_steps"] = None
    earlier = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()
    # Deliberately not kept: the measurement subsets became evenly spaced samples (they were the first N), so a sweep
    # measured the old way counts as another one; without measurements nothing changed.
    values["measurement_subsets"] = "evenly spaced"
    now = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()
    assert config_fingerprint(args) == now != earlier
    for name, default in _FINGERPRINT_FIELDS_IF_SET.items():
        assert getattr(args, name) == default, name
    unmeasured = dataclasses.replace(args, track_dynamics=False)
    del values["measurement_subsets"]
    values["track_dynamics"] = False
    assert (
        config_fingerprint(unmeasured)
        == hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()
    )


def test_the_models_settings_are_fingerprinted_beside_its_weights(tmp_path):
    # Equal weights and another dropout rate (timm's drop_rate attribute, a transformers config's dropout) were one
    # sweep: a rerun reused the other model's finished jobs.
    from transformers import BertConfig, BertForSequenceClassification

    from headprep_hf.fingerprint import settings_fingerprint

    a, b = tiny_timm(), tiny_timm()
    assert settings_fingerprint(a) == settings_fingerprint(b)
    b.drop_rate = 0.5
    assert settings_fingerprint(a) != settings_fingerprint(b)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1)
    before = settings_fingerprint(vit)
    vit.blocks[0].attn.fused_attn = not vit.blocks[
        0
    ].attn.fused_attn  # (TIMM_FUSED_ATTN, the torch build: a machine's)
    assert settings_fingerprint(vit) == before

    def bert(dropout, path):
        config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, hidden_dropout_prob=dropout)  # fmt: skip
        config._name_or_path = path  # (where it was loaded from: not what it computes)
        return BertForSequenceClassification(config)

    assert settings_fingerprint(bert(0.1, "/a/bert")) == settings_fingerprint(bert(0.1, "/mnt/b/bert"))
    assert settings_fingerprint(bert(0.1, "/a/bert")) != settings_fingerprint(bert(0.5, "/a/bert"))


def test_a_folder_of_an_earlier_version_is_named_as_such_not_as_a_changed_setting():
    from headprep_hf.sweep import fingerprint_differences

    mine = {"taus": [0], "model": "m", "model_settings": "s", "config": "c2", "seeded_heads": False}
    earlier = {k: v for k, v in mine.items() if k != "model_settings"}
    version = "the version that wrote it (an earlier headprep_hf, whose fingerprint has no model_settings)"
    assert fingerprint_differences(mine, earlier) == [version]
    assert fingerprint_differences(mine, {**earlier, "config": "c1"}) == ["the settings", version]
    # settings an earlier file did not record had their defaults: only the real change is named, either way round
    their = {"learning_rate": 1e-3}
    now = {"learning_rate": 3e-4, "remove_unused_columns": True, "include_for_metrics": []}
    assert fingerprint_differences(mine, {**mine, "config": "c1"}, now, their) == [
        "the settings (learning_rate: 0.001 -> 0.0003)"
    ]
    assert fingerprint_differences({**mine, "config": "c1"}, mine, their, now) == [
        "the settings (learning_rate: 0.0003 -> 0.001)"
    ]
    # a key a data set's description gained since (its content): the version, not other content
    data = {"train": {"length": 4, "labels": "l", "content": "c"}, "test": None}
    earlier_data = {"train": {"length": 4, "labels": "l"}, "test": None}
    assert fingerprint_differences({**mine, "data": data}, {**mine, "data": earlier_data}) == [
        "the data's content, which this run records and that file does not (written by an earlier headprep_hf "
        "version, or of data whose content was not read: more than 2 GB stored in its rows)"
    ]
    # and where something else differs too, that is named (a set with no content digest records none)
    other = {**mine, "config": "c1", "data": {"train": {"length": 5, "labels": "l"}, "test": None}}
    assert fingerprint_differences({**mine, "data": data}, other) == [
        "the settings",
        "the data (train: 5 -> 4 samples)",
    ]


def test_image_folders_of_one_layout_and_labels_are_told_apart_by_their_files(tmp_path):
    # Two image folders with the same class folders, file names and counts but other pictures were one sweep's data:
    # a rerun on the second reused the first's finished jobs. The files' names and sizes now count; a copy of the same
    # folder under another mount point (another machine's shard) does not.
    import shutil

    import numpy as np
    from PIL import Image

    from headprep_hf.data import build_image_transforms, load_image_classification_dataset, resolve_image_data_config
    from headprep_hf.sweep import describe_data

    def folder(root, seed):
        rng = np.random.default_rng(seed)
        for name in ("cat", "dog"):
            (root / name).mkdir(parents=True)
            for i in range(3):
                side = int(rng.integers(12, 30))
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
        return root

    transform = build_image_transforms(resolve_image_data_config({}, image_size=8), is_training=False)

    def description(root):
        splits, _ = load_image_classification_dataset(
            None, str(root), None, transform, transform, validation_split=0.5, seed=0, cache_dir=str(tmp_path / "c")
        )
        return describe_data(train=splits["train"], validation=splits["validation"])

    v1 = description(folder(tmp_path / "v1" / "train", seed=0))
    v2 = description(folder(tmp_path / "v2" / "train", seed=1))
    assert v1["train"]["labels"] == v2["train"]["labels"] and v1["train"]["content"] != v2["train"]["content"]
    shutil.copytree(tmp_path / "v1", tmp_path / "mnt" / "other" / "v1")
    assert description(tmp_path / "mnt" / "other" / "v1" / "train") == v1


def test_data_stored_in_rows_is_told_apart_by_its_values(tmp_path, monkeypatch):
    # Images stored as bytes (a Hub dataset, a `save_to_disk` folder) and a `datasets.Dataset` passed as it is had no
    # `content`: two sets of one length and labels with other pictures or texts were one sweep's data.
    import datasets
    import numpy as np
    from PIL import Image

    from headprep_hf.data import images
    from headprep_hf.data.images import HFImageClassificationDataset
    from headprep_hf.sweep import describe_data

    def png(seed):
        pixels = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
        buffer = __import__("io").BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})

    def stored(seeds, name):
        data = datasets.Dataset.from_dict({"image": [png(s) for s in seeds], "label": [0, 1, 0, 1]}, features=features)
        data.save_to_disk(str(tmp_path / name))
        return datasets.load_from_disk(str(tmp_path / name))

    first, other = stored([0, 1, 2, 3], "first"), stored([0, 1, 2, 4], "other")
    copy = stored([0, 1, 2, 3], "copy")  # (the same values in another folder: the same data)

    def wrapped(data):
        return HFImageClassificationDataset(data, "image", "label", lambda image: image, ["a", "b"], name="train")

    for describe in (lambda d: describe_data(train=d)["train"], lambda d: describe_data(train=wrapped(d))["train"]):
        a, b, c = describe(first), describe(other), describe(copy)
        assert a["labels"] == b["labels"] and a["content"] != b["content"] and a == c
        assert describe(first.shuffle(seed=0))["content"] != a["content"]  # (the rows in another order)
    # the transform is not the data: a raw set with one has the same content
    assert describe_data(train=first.with_transform(lambda batch: batch)) == describe_data(train=first)
    # nor are datasets' own records: a `map` whose function cannot be pickled gets a random fingerprint, which the
    # stored schema metadata carried into the digest (another digest in every process: a resume refused)
    unpicklable = (i for i in range(1))
    mapped = copy.map(lambda row, _g=unpicklable: row)
    assert describe_data(train=mapped) == describe_data(train=first)
    shuffled = first.shuffle(seed=0)  # (rows taken through the index mapping equal the same rows written out)
    assert describe_data(train=shuffled) == describe_data(train=shuffled.flatten_indices())
    texts = [datasets.Dataset.from_dict({"text": ["a", t], "label": [0, 1]}) for t in ("b", "c")]
    a, b = describe_data(a=texts[0], b=texts[1]).values()
    assert a["labels"] == b["labels"] and a["content"] != b["content"]
    # above the limit the rows are not read, and the set is told apart by its length and labels only
    monkeypatch.setattr(images, "ROWS_DIGEST_MAX_BYTES", 10)
    assert "content" not in describe_data(train=first)["train"]


def test_the_number_of_processes_is_fingerprinted(tmp_path, monkeypatch):
    from headprep_hf.sweep import _settings, config_fingerprint

    args = sweep_config(tmp_path)
    one = config_fingerprint(args)
    monkeypatch.setattr(SweepConfig, "world_size", property(lambda self: 2))
    assert config_fingerprint(args) != one
    assert "world_size" not in _settings(args)  # (settings rebuild a SweepConfig: its fields only)


def test_gpus_of_dataparallel_count_in_the_batch_as_processes_do(tmp_path, monkeypatch):
    # One process on several GPUs (Trainer's DataParallel) trains with per_device x GPUs per batch
    # (args.train_batch_size); the fingerprint, the card's batch size and the BatchNorm remainder read only the
    # processes (world_size), so two GPU counts shared one fingerprint.
    from types import SimpleNamespace

    from headprep_hf.labels import single_sample_batch_error
    from headprep_hf.sweep import config_fingerprint

    args = sweep_config(tmp_path, per_device_train_batch_size=4)
    one = config_fingerprint(args)
    monkeypatch.setattr(SweepConfig, "n_gpu", property(lambda self: 2))
    assert args.train_batch_size == 8  # (Trainer's own property)
    assert config_fingerprint(args) != one
    trainer = SimpleNamespace(args=args, train_dataset=list(range(17)))
    error = single_sample_batch_error(trainer, RuntimeError("Expected more than 1 value per channel when training"))
    assert "17 training samples leave 1 for the last batch of 8" in str(error)


def _shard(folder, jobs, index, count=2, task=None, greater_is_better=True, fingerprint=None, seeds=(1,)):
    """A hand-made shard folder `folder/sweep.json` holding `jobs` = [(tau, seed, validation accuracy)]."""
    from headprep_hf.sweep import assemble_sweep

    results = [
        {
            "tau": t, "seed": s, "hp_train_accuracy": 0.5, "energy": 1.0, "p0_mean": 0.5,
            "p0_histogram": {"edges": [0, 0.5, 1], "counts": [1, 1]}, "drift": None,
            "validation": {"accuracy": v}, "test": None, "head_grad_norm": [], "output_dir": f"tau_{t}/seed_{s}",
        }
        for t, s, v in jobs
    ]  # fmt: skip
    sweep = assemble_sweep(
        results=results,
        taus=[0, 2, 4],
        seeds=list(seeds),
        metric="accuracy",
        greater_is_better=greater_is_better,
        hp={"cached_features": False, "seeds": {}},
        fingerprint=fingerprint or {"taus": [0, 2, 4], "model": "m", "config": "c", "seeded_heads": True},
        shard={"index": index, "count": count},
        task=task,
    )
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps(sweep))
    return folder


def test_merge_keeps_the_seed_order_and_names_both_shards_of_a_job_twice(tmp_path):
    # The merge sorted the seeds, so `headprep exchange` (which pairs the first seed's jobs) took seed 5 of a merged
    # sweep and seed 7 of the same sweep run unsharded; a job in two shards named one folder and "another".
    jobs = [(t, s, 0.5 + t / 10) for t in (0, 2, 4) for s in (7, 5)]
    a = _shard(tmp_path / "a", jobs[::2], 0, seeds=(7, 5))
    b = _shard(tmp_path / "b", jobs[1::2], 1, seeds=(7, 5))
    assert merge_sweeps([a, b], tmp_path / "m")["seeds"] == [7, 5]
    stale = _shard(tmp_path / "stale", [(0, 7, 0.5)], 1, seeds=(7,))  # (run before seed 5 was added)
    with pytest.raises(ValueError, match="in two shards") as error:
        merge_sweeps([a, stale], tmp_path / "m2")
    message = str(error.value)
    assert str(a) in message and str(stale) in message and "[7, 5] in" in message and "[7] in" in message
    assert "before seeds were added" in message and not (tmp_path / "m2").exists()


def test_merge_refuses_shards_of_other_tasks_or_directions(tmp_path):
    task = {"name": "image_classification", "args": {"max_train_samples": 100, "hflip": True, "cache_dir": "/a"}}
    a = _shard(tmp_path / "a", [(0, 1, 0.5), (4, 1, 0.9)], 0, task=task)
    other_task = {**task, "args": {**task["args"], "max_train_samples": 5000, "hflip": False}}
    b = _shard(tmp_path / "b", [(2, 1, 0.95)], 1, task=other_task)
    with pytest.raises(ValueError, match=r"task records differ in \['hflip', 'max_train_samples'\]") as error:
        merge_sweeps([a, b], tmp_path / "m")
    assert str(a / "sweep.json") in str(error.value) and str(b / "sweep.json") in str(error.value)
    c = _shard(tmp_path / "c", [(2, 1, 0.95)], 1, task=task, greater_is_better=False)
    for order in ([a, c], [c, a]):  # (the first shard's direction no longer decides tau*)
        with pytest.raises(ValueError, match="sweep_greater_is_better"):
            merge_sweeps(order, tmp_path / "m")
    d = _shard(tmp_path / "d", [(2, 1, 0.95)], 1, task={**task, "args": {**task["args"], "cache_dir": "/b"}})
    merged = merge_sweeps([a, d], tmp_path / "m")  # (another machine's cache folder: the same data)
    assert merged["complete"] and merged["tau_star"] == 2
    assert not (tmp_path / "m" / "exchange.json").exists()


def test_invalid_or_newer_shard_files_are_named(tmp_path):
    import jsonschema

    a = _shard(tmp_path / "a", [(0, 1, 0.5)], 0, count=3)
    b = _shard(tmp_path / "b", [(2, 1, 0.5)], 1, count=3)
    damaged = json.loads((b / "sweep.json").read_text())
    damaged["results"][0]["energy"] = -1.0
    (b / "sweep.json").write_text(json.dumps(damaged))
    with pytest.raises(jsonschema.ValidationError, match="not a valid sweep.json") as error:
        merge_sweeps([a, b], tmp_path / "m")
    assert str(error.value).startswith(str(b / "sweep.json"))
    newer = json.loads((a / "sweep.json").read_text())
    newer["format_version"] = 3
    (a / "sweep.json").write_text(json.dumps(newer))
    with pytest.raises(jsonschema.ValidationError, match="written by a newer headprep_hf") as error:
        load_sweep(a)
    assert str(error.value).startswith(str(a / "sweep.json"))
    assert not (tmp_path / "m").exists()


def test_overwrite_moves_the_earlier_sweeps_artefacts_aside_only(tmp_path, data):
    path = tmp_path / "s"
    run_sweep(path, data, sweep_taus=[0, 1], sweep_report=False)
    (path / "exchange.json").write_text("{}")  # the earlier sweep's exchange and report ...
    (path / "plots").mkdir()
    (path / "plots" / "exchange_heatmap.png").write_bytes(b"old")
    (path / "plots" / "mine.png").write_bytes(b"user")  # ... and the user's own files
    (path / "notes.txt").write_text("user")
    first = run_sweep(path, data, sweep_taus=[0, 2], sweep_report=False, overwrite_output_dir=True)
    assert sorted(p.name for p in path.glob("tau_*")) == ["tau_0", "tau_2"]
    assert sorted(p.name for p in (path / "heads" / "seed_0").iterdir()) == ["tau_0.safetensors", "tau_2.safetensors"]
    assert not (path / "exchange.json").exists() and not (path / "plots" / "exchange_heatmap.png").exists()
    assert (path / "plots" / "mine.png").read_bytes() == b"user" and (path / "notes.txt").read_text() == "user"
    # moved aside, not deleted (they were deleted before the new sweep had produced anything)
    (aside,) = path.glob("replaced-*")
    assert sorted(p.name for p in aside.glob("tau_*")) == ["tau_0", "tau_1"] and (aside / "sweep.json").is_file()
    assert (aside / "plots" / "exchange_heatmap.png").read_bytes() == b"old" and (aside / "exchange.json").is_file()
    # the new sweep continues (here: every job reused) instead of being refused for the old one's leftovers
    assert run_sweep(path, data, sweep_taus=[0, 2], sweep_report=False) == first
    # a user's file named like a job folder is no sweep's: it was refused as another sweep's, even after overwrite
    (path / "tau_star_notes.txt").write_text("user")
    assert run_sweep(path, data, sweep_taus=[0, 2], sweep_report=False) == first


def test_a_job_checkpointed_without_its_optimizer_runs_again_rather_than_resume(tmp_path, data):
    # With save_only_model=True a killed FT job resumed with a fresh optimizer and schedule and was recorded as the
    # (tau, seed)'s result: another result than the job run whole, without a word.
    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if args.output_dir.endswith(os.path.join("tau_2", "seed_0")) and state.global_step == 3:
                raise KeyboardInterrupt

    settings = dict(sweep_taus=[0, 2], sweep_report=False, save_only_model=True, save_strategy="steps", save_steps=1)
    whole = run_sweep(tmp_path / "whole", data, **settings)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tmp_path / "killed", data, callbacks=[Kill()], **settings)
    assert any((tmp_path / "killed" / "tau_2" / "seed_0" / "ft").glob("checkpoint-*"))
    with pytest.warns(UserWarning, match=r"tau=2 seed=0: .*save_only_model=True .* runs again from its start"):
        again = run_sweep(tmp_path / "killed", data, **settings)
    for a, b in zip(whole["results"], again["results"]):
        assert a["validation"] == b["validation"] and a["drift"] == b["drift"]


def test_the_metric_direction_is_guessed_for_common_names_and_an_unknown_one_is_a_warning(caplog):
    from headprep_hf.replicates import infer_greater_is_better, lower_is_better

    for name in ("eval_loss", "rmse", "top1_error", "perplexity", "eval_wer", "cer", "mape", "nll", "brier", "ece"):
        assert lower_is_better(name), name
    for name in ("accuracy", "eval_f1", "roc_auc", "mean_iou", "r2", "bleu", "eval_matthews_correlation", "f1_macro"):
        assert not lower_is_better(name), name
    assert lower_is_better("eval_brier_score")  # (the word before a qualifier such as "score" decides)
    with caplog.at_level("INFO", logger="headprep_hf.replicates"):
        assert infer_greater_is_better("eval_accuracy") and not infer_greater_is_better("eval_perplexity")
        assert infer_greater_is_better("my_custom_metric")
    levels = {r.getMessage().split("'")[1]: r.levelname for r in caplog.records}
    assert levels == {"eval_accuracy": "INFO", "eval_perplexity": "INFO", "my_custom_metric": "WARNING"}


def test_settings_and_task_arguments_that_do_not_change_results_keep_one_sweep(tmp_path):
    """Checkpoint frequency without load_best_model_at_end (saving draws no random numbers), the metric direction set
    to what its name implies, and where the data lie on a machine (another mount point, a relative spelling, the
    weights' memory layout) leave the fingerprint as it is; another data folder name does not."""
    from headprep_hf.sweep import config_fingerprint, task_fingerprint

    plain = config_fingerprint(sweep_config(tmp_path))
    assert plain == config_fingerprint(sweep_config(tmp_path, save_strategy="steps", save_steps=7))
    assert plain == config_fingerprint(sweep_config(tmp_path, sweep_greater_is_better=True))  # accuracy: greater

    def task(**args):
        return {"name": "image_classification", "args": {"max_train_samples": 100, **args}}

    here = task(train_dir="/data/flowers/train", validation_dir="data/flowers/val", channels_last=True)
    there = task(train_dir="/mnt/disk2/flowers/train/", validation_dir="./val", channels_last=False)
    assert task_fingerprint(here) == task_fingerprint(there)
    assert task_fingerprint(here) != task_fingerprint(task(train_dir="/data/birds/test", validation_dir="val"))
    assert task_fingerprint(here) != task_fingerprint({**here, "args": {**here["args"], "max_train_samples": 200}})


def test_sweep_metric_takes_the_eval_prefix_as_metric_for_best_model_does(tmp_path):
    # "eval_accuracy" (metric_for_best_model's spelling) failed after HP and the first FT job, and the folder then
    # refused the corrected rerun as another sweep's.
    from headprep_hf.sweep import config_fingerprint

    prefixed = sweep_config(tmp_path, sweep_metric="eval_accuracy")
    assert prefixed.sweep_metric == "accuracy"
    assert config_fingerprint(prefixed) == config_fingerprint(sweep_config(tmp_path, sweep_metric="accuracy"))


def test_rerun_asking_for_prepared_heads_names_the_reused_jobs_that_have_none(tmp_path, data):
    # A finished sweep rerun with sweep_prepared_heads=True reused every FT job and wrote no prepared head, silently.
    import warnings

    path = tmp_path / "sweep"
    first = run_sweep(path, data, sweep_taus=[0, 2], sweep_report=False)
    with pytest.warns(UserWarning) as caught:
        again = run_sweep(path, data, sweep_taus=[0, 2], sweep_report=False, sweep_prepared_heads=True)
    assert again == first  # (the jobs are reused)
    named = [str(w.message) for w in caught if "sweep_prepared_heads=True" in str(w.message)]
    assert len(named) == 2
    for tau, message in zip((0, 2), named):
        assert f"tau={tau} seed=0" in message and str(path / "heads" / "seed_0" / f"tau_{tau}") in message
        assert "overwrite_output_dir=True" in message
    assert not (path / "heads" / "seed_0" / "tau_0").exists()
    # a sweep that wrote its prepared heads is reused without a word about them
    heads = tmp_path / "heads_sweep"
    run_sweep(heads, data, sweep_taus=[0], sweep_report=False, sweep_prepared_heads=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_sweep(heads, data, sweep_taus=[0], sweep_report=False, sweep_prepared_heads=True)
    assert not [w for w in caught if "sweep_prepared_heads" in str(w.message)]


def test_the_exchange_runs_heads_in_eval_mode_and_a_measurement_batch_at_a_time(tmp_path, data):
    # The head of each pair ran in the mode of the model passed in: a fresh model is in train mode, so a head with
    # BatchNorm (DeepLabV3's ASPP too) used batch statistics and its Dropout dropped units; the diagonal was then not
    # the finetuned model's own validation accuracy (0.833 against 0.75). And the head took a whole set at once.
    from conftest import bn_head_model

    model = bn_head_model()
    assert model.training
    sizes = []
    model.fc.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    result = run_sweep(tmp_path, data, model=model, sweep_taus=[0, 2], sweep_exchange=True, measure_batch_size=16)
    exchange = json.loads((tmp_path / "exchange.json").read_text())
    for i, entry in enumerate(result["results"]):
        assert exchange["validation_accuracy"][i][i] == pytest.approx(entry["validation"]["accuracy"], abs=1e-6)
    assert sizes and max(sizes) <= 16


def test_the_exchange_of_a_set_without_a_valid_label_is_null():
    from headprep_hf.exchange import _accuracy, _correct_and_count

    logits = torch.randn(10, 3)
    ignored = torch.full((10,), -100)
    assert _accuracy(*_correct_and_count(logits, ignored, -100, "single_label_classification")) is None
    labels = torch.randint(0, 3, (10,))
    whole = (logits.argmax(-1) == labels).float().mean().item()
    chunks = [_correct_and_count(logits[s : s + 3], labels[s : s + 3], -100, "single_label_classification")
              for s in range(0, 10, 3)]  # fmt: skip
    assert _accuracy(sum(c for c, _ in chunks), sum(n for _, n in chunks)) == round(whole, 6)


def test_a_regression_sweep_refuses_the_exchange_before_anything_runs(tmp_path):
    # It failed after the whole sweep had run, and the report was never drawn.
    from test_replicates import Linear, LinearNet, _sweep

    from headprep_hf.metrics import graph_metrics

    data = (Linear(48, 0), Linear(24, 1), Linear(24, 2))
    sweep = _sweep(tmp_path / "s", data, [0], model_fn=LinearNet, metrics=graph_metrics("regression"),
                   problem_type="regression", sweep_metric="rmse", sweep_exchange=True)  # fmt: skip
    with pytest.raises(ValueError, match="sweep_exchange=False"):
        sweep.run()
    assert not (tmp_path / "s").exists()


def test_a_sweep_takes_a_schedule_that_needs_evaluations_and_keeps_one_view_of_the_cache(tmp_path, data):
    # The HP run replaced eval_strategy by "no", which TrainingArguments refuses with reduce_lr_on_plateau: the
    # sweep failed after the data and the model were built. And the FT jobs' kept head inputs held the labels of
    # every cached view (the features were cut to view 0, the labels were a view into all of them).
    train, val, test = data
    config = sweep_config(
        tmp_path / "s", sweep_taus=[0, 1], eval_strategy="epoch", sweep_report=False,
        lr_scheduler_type="reduce_lr_on_plateau", hp_cache_features=True, hp_cache_views=3,
    )  # fmt: skip
    sweep = TauSweep(tiny_timm(), config, train, val, test, compute_metrics=accuracy_metrics())
    result = sweep.run()
    assert [r["tau"] for r in result["results"]] == [0, 1]
    kept = sweep._head_inputs[config.seeds[0]]
    for tensor in (kept.features, kept.labels):
        assert tensor.untyped_storage().nbytes() == tensor.nbytes  # view 0's own storage, not the stack's
