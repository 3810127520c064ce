"""The `headprep` command and recipes/sweep_tau.py end to end on the offline toy task (tiny settings)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headprep_hf.cli import main
from headprep_hf.sweep_schema import validate_exchange, validate_sweep

ROOT = Path(__file__).resolve().parents[1]
PLOTS = {
    "ft_metric_vs_tau.png",
    "hp_accuracy_energy_vs_tau.png",
    "drift_vs_tau.png",
    "p0_histograms.png",
    "head_grad_norm.png",
}


def tiny(cache_dir, *extra):
    return [
        "--sweep_taus", "0", "1", "3",
        "--sweep_seeds", "0", "1",
        "--num_train_epochs", "1",
        "--source_epochs", "1",
        "--cache_dir", str(cache_dir),
        "--use_cpu", "true",
        "--drift_probe_samples", "32",
        "--sweep_progress", "false",
        "--toy_classes", "0", "1",  # two digits: a third less data than the default's three, same code paths
        *extra,
    ]  # fmt: skip


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "headprep sweep" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


def test_bad_sweep_arguments_are_refused_before_any_work(tmp_path, capsys):
    # argparse's one-line error (exit 2), as for a mistyped flag: these were tracebacks through the dataclass
    for flags, message in ((["--sweep_taus", "4", "2"], "sorted"), (["--sweep_shard", "3/2"], "sweep_shard")):
        code, err = _exit_message(capsys, ["sweep", *flags, "--output_dir", str(tmp_path / "x")])
        assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def _exit_message(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hp_epoch", "3"], "unrecognized arguments: --hp_epoch 3$"),  # not taken for --hp_epochs, not suggested:
        (["--hp_epcohs", "3"], "unrecognized arguments: --hp_epcohs 3$"),  # the sweep refuses it (the grid decides)
        (
            ["--learnin_rate", "3"],
            r"unrecognized arguments: --learnin_rate 3 \(did you mean: --learnin_rate -> "
            r"--learning_rate\?\)",
        ),  # (the closest known flag; Python 3.11's argparse names none)
        (["--do_train", "false"], "--do_train is not used here"),
        (["--do_eval"], "--do_eval is not used here"),
        (["--hp_epochs", "3"], "use --sweep_taus|set the grid with --sweep_taus"),  # the grid decides
        # argparse takes --hp-epochs for --hp_epochs: the dash spelling was accepted and then ignored by the sweep
        (["--hp-epochs", "3"], "--hp-epochs is not used here.*sweep_taus"),
        (["--do-train"], "--do-train is not used here"),
        (["--config", "a.yaml", "--config", "b.yaml"], "--config is given more than once"),
        (["--config", "missing.yaml"], "--config missing.yaml: no such file"),  # (was a bare FileNotFoundError)
    ],
)
def test_the_sweep_command_rejects_what_it_would_ignore(tmp_path, capsys, argv, message):
    code, err = _exit_message(capsys, ["sweep", *argv, "--output_dir", str(tmp_path / "x")])
    assert code == 2 and re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def _shard_folder(folder, tau, index):
    """A hand-made shard folder of the grid [0, 2] (one seed) holding the job at `tau`."""
    from headprep_hf.sweep import assemble_sweep

    result = {
        "tau": tau, "seed": 1, "hp_train_accuracy": 0.5, "energy": 1.0, "p0_mean": 0.5,
        "p0_histogram": {"edges": [0, 0.5, 1], "counts": [1, 1]}, "drift": None,
        "validation": {"accuracy": 0.5 + tau / 10}, "test": None, "head_grad_norm": [],
        "output_dir": f"tau_{tau}/seed_1",
    }  # fmt: skip
    sweep = assemble_sweep(
        results=[result],
        taus=[0, 2],
        seeds=[1],
        metric="accuracy",
        greater_is_better=True,
        hp={"cached_features": False, "seeds": {}},
        fingerprint={"taus": [0, 2], "model": "m", "config": "c", "seeded_heads": True},
        shard={"index": index, "count": 2},
    )
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps(sweep))
    return str(folder)


def test_merge_flag_forms(tmp_path, capsys):
    a, b = _shard_folder(tmp_path / "a", 0, 0), _shard_folder(tmp_path / "b", 2, 1)
    out = str(tmp_path / "m")
    assert main(["sweep", f"--merge={a}", b, "--output_dir", out, "--sweep_report", "false"]) == 0
    assert json.loads((tmp_path / "m" / "sweep.json").read_text())["merged_from"] == [a, b]
    assert "tau* = 2" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already exists"):
        main(["sweep", "--merge", a, b, "--output_dir", out, "--overwrite_output_dir", "false"])
    for flag in (["--overwrite_output_dir", "true"], ["--overwrite_output_dir"]):  # as every bool flag of the sweep
        assert main(["sweep", "--merge", a, b, "--output_dir", out, *flag, "--sweep_report", "false"]) == 0
    assert not (tmp_path / "m" / "plots").exists()


def test_recipe_flags_config_forms_and_resume_without_value(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "recipes"))
    import image_classification as recipe

    from headprep_hf.cli import parse_with_config

    config = tmp_path / "s.yaml"
    config.write_text("hp_epochs: 7\n")
    for form in (["--config", str(config)], [f"--config={config}"]):
        _, args = parse_with_config(recipe.make_parser(), [*form, "--output_dir", str(tmp_path / "o")])
        assert args.hp_epochs == 7
    _, args = parse_with_config(
        recipe.make_parser(), ["--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint"]
    )
    assert args.resume_from_checkpoint == "last"
    for text in ("", "# only a comment\n"):  # an empty YAML file sets nothing
        config.write_text(text)
        _, args = parse_with_config(recipe.make_parser(), ["--config", str(config), "--output_dir", str(tmp_path)])
        assert args.hp_epochs == recipe.make_parser().parse_args_into_dataclasses(["--output_dir", "x"])[1].hp_epochs
    for text, message in (("- 1\n- 2\n", "expected a mapping"), ("task: segmentation\n", "unknown settings")):
        config.write_text(text)
        with pytest.raises(SystemExit):
            parse_with_config(recipe.make_parser(), ["--config", str(config)])
        assert message in capsys.readouterr().err
    config.write_text("do_predict: true\n")
    with pytest.raises(SystemExit):
        parse_with_config(recipe.make_parser(), ["--config", str(config)])
    assert "do_predict is not used here" in capsys.readouterr().err


def test_sweep_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in ("--config", "--task", "--merge", "--sweep_taus", "--hp_learning_rate"):
        assert flag in out


@pytest.mark.slow
def test_console_command_sweep_exchange_report(tmp_path, shared_cache):
    out = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(Path(sys.executable).with_name("headprep")),
        "sweep",
        *tiny(shared_cache, "--output_dir", str(out)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tau* =" in proc.stdout and "HP-acc" in proc.stdout
    assert f"Sweep folder: {out} (stopped, the same command continues it" in proc.stderr  # (named before the work)
    sweep = json.loads((out / "sweep.json").read_text())
    validate_sweep(sweep)
    assert sweep["task"]["name"] == "image_classification" and sweep["hp"]["cached_features"]
    assert {p.name for p in (out / "plots").iterdir()} == PLOTS

    assert main(["exchange", str(out)]) == 0
    exchange = json.loads((out / "exchange.json").read_text())
    validate_exchange(exchange)
    diagonal = [exchange["validation_accuracy"][i][i] for i in range(3)]
    first_seed = [r["validation"]["accuracy"] for r in sweep["results"] if r["seed"] == 0]  # the first seed's jobs
    assert exchange["seed"] == 0 and diagonal == pytest.approx(first_seed, abs=1e-6)
    assert sweep["seeds"] == [0, 1] and "mean +- standard deviation over 2 seeds" in proc.stdout
    assert (out / "plots" / "exchange_heatmap.png").is_file()

    (out / "plots" / "p0_histograms.png").unlink()
    assert main(["report", str(out / "sweep.json")]) == 0  # (the file, as a newcomer passes it, or its folder)
    assert (out / "plots" / "p0_histograms.png").is_file()


def test_help_into_a_closed_pipe_ends_quietly():
    # `headprep --help | head -1` ended in a BrokenPipeError traceback.
    for command in (["--help"], ["sweep", "--help"]):
        proc = subprocess.Popen([str(Path(sys.executable).with_name("headprep")), *command], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        proc.stdout.close()  # (the reader is gone before the command writes: it is still importing)
        err = proc.stderr.read()
        proc.wait()
        assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_the_sweep_recipe_names_itself_in_its_usage_lines():
    # It said `usage: headprep sweep`: a user following the recipe's --help typed a command they had not run.
    recipe = [sys.executable, str(ROOT / "recipes" / "sweep_tau.py")]
    for flags, stream, usage in (
        (["--help"], "stdout", "usage: sweep_tau.py [--config FILE]"),
        (["--merge"], "stderr", "usage: sweep_tau.py --merge"),
    ):
        proc = subprocess.run([*recipe, *flags], capture_output=True, text=True, timeout=120)
        assert getattr(proc, stream).startswith(usage), (proc.stdout[:300], proc.stderr[:300])


@pytest.mark.slow
def test_sweep_recipe_shards_and_merge(tmp_path, capsys, shared_cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    recipe = [sys.executable, str(ROOT / "recipes" / "sweep_tau.py")]
    # One seed: 3 jobs over 2 shards. Shard 0 through the recipe script, shard 1 through the console command in this
    # process (the same entry point; the console command's own subprocess run is the test above).
    shard = [
        tiny(
            shared_cache,
            "--sweep_seeds",
            "0",
            "--sweep_shard",
            f"{i}/2",
            "--output_dir",
            str(tmp_path / f"s{i}"),
        )
        for i in (0, 1)
    ]
    proc = subprocess.run([*recipe, *shard[0]], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tau* not chosen" in proc.stdout
    assert main(["sweep", *shard[1]]) == 0
    assert "tau* not chosen" in capsys.readouterr().out
    assert (
        main(["sweep", "--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--output_dir", str(tmp_path / "m")])
        == 0
    )
    merged = json.loads((tmp_path / "m" / "sweep.json").read_text())
    assert merged["complete"] and merged["tau_star"] in (0, 1, 3)
    assert "tau* =" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "m" / "plots").iterdir()} == PLOTS


# ------------------------------------------------------------------ --help: groups, most important first
TRAINING_TITLE = "transformers TrainingArguments (the finetuning stage)"
RECIPE_TITLES = ["task and data", "model", "head probing (HP)", "task head", "measurements and outputs"]


def _help_text(capsys, parse) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _check_help(out: str, parser, titles: list[str]) -> None:
    assert re.findall(r"^(\S.*):$", out, flags=re.M) == ["options", *titles]
    start = {title: out.index(f"\n{title}:\n") for title in ["options", *titles]}
    bounds = dict(zip(start, [*list(start.values())[1:], len(out)]))

    def group_of(flag: str) -> str:
        (at,) = [m.start() for m in re.finditer(rf"^  {re.escape(flag)}\b", out, flags=re.M)]
        return next(title for title in start if start[title] < at < bounds[title])

    from headprep_hf.cli import IGNORED_FLAGS, SWEEP_IGNORED_FLAGS

    refused = {**IGNORED_FLAGS, **(SWEEP_IGNORED_FLAGS if "headprep sweep" in out else {})}
    assert group_of("--config") == "options"
    assert group_of("--model_name_or_path") == "model"
    assert group_of("--hp_learning_rate") == "head probing (HP)"
    if "--hp_epochs" not in refused:
        assert group_of("--hp_epochs") == "head probing (HP)"
    assert group_of("--head_type") == "task head" and group_of("--drift_probe_samples") == "measurements and outputs"
    assert group_of("--learning_rate") == group_of("--lr_scheduler_type") == TRAINING_TITLE
    for action in parser._actions:  # every option of the command is listed once; the refused ones not at all
        listed = len(re.findall(rf"^  {re.escape(action.option_strings[0])}\b", out, flags=re.M))
        assert listed == (0 if action.option_strings[0] in refused else 1), action


@pytest.mark.parametrize("recipe", ["image_classification", "semantic_segmentation", "graph_property"])
def test_recipe_help_lists_every_flag_in_groups_most_important_first(capsys, recipe):
    import importlib

    from headprep_hf.cli import parse_with_config

    sys.path.insert(0, str(ROOT / "recipes"))
    parser = importlib.import_module(recipe).make_parser()
    out = _help_text(capsys, lambda argv: parse_with_config(parser, argv))
    _check_help(out, parser, [*RECIPE_TITLES, TRAINING_TITLE])
    assert out.index("--hp_epochs") < out.index("--num_train_epochs")  # HP before the inherited flags


@pytest.mark.parametrize("task", ["image_classification", "segmentation", "graph"])
def test_sweep_help_lists_every_flag_in_groups_most_important_first(capsys, task):
    from headprep_hf.cli import parse_with_config, sweep_parser

    out = _help_text(capsys, lambda argv: main(["sweep", "--task", task, *argv]))
    parser = sweep_parser(task)
    parse_with_config(parser, ["--output_dir", "unused"])  # adds --config and the groups, as the command does
    _check_help(out, parser, [*RECIPE_TITLES, "tau sweep", TRAINING_TITLE])
    assert out.startswith("usage: headprep sweep [--config FILE]")
    for flag in ("--task", "--merge", "--config"):
        assert re.search(rf"^  {flag}\b", out, flags=re.M)


def test_listed_schedule_choices_are_the_working_ones(tmp_path):
    """lr_scheduler_type lists transformers' 12 schedules: each trains as in Trainer (tests/test_trainer_contract.py;
    after HP the 10 step-indexed ones, and reduce_lr_on_plateau/greedy with hp_epochs=0 or finetune()).
    hp_lr_scheduler_type lists the step-indexed ones that need no lr_scheduler_kwargs: each gives transformers' HP
    learning rates; the 3 left out fail in get_scheduler without kwargs."""
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    from headprep_hf import HeadPrepConfig
    from headprep_hf.cli import sweep_parser
    from headprep_hf.schedules import HP_SCHEDULES, STEP_SCHEDULES, two_stage_scheduler

    sys.path.insert(0, str(ROOT / "recipes"))
    import image_classification as recipe

    actions = {a.dest: a for a in sweep_parser("image_classification")._actions}
    assert actions["lr_scheduler_type"].choices == [s.value for s in SchedulerType]
    assert actions["hp_lr_scheduler_type"].choices == ["constant"]  # SweepConfig refuses the others
    recipe_actions = {a.dest: a for a in recipe.make_parser()._actions}
    assert recipe_actions["lr_scheduler_type"].choices == [s.value for s in SchedulerType]
    assert recipe_actions["hp_lr_scheduler_type"].choices == list(HP_SCHEDULES)
    for schedule in sorted(set(STEP_SCHEDULES) - set(HP_SCHEDULES)):
        with pytest.raises((ValueError, TypeError)):
            get_scheduler(schedule, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1, 10)
        with pytest.raises(ValueError, match="hp_lr_scheduler_type must be one of"):
            HeadPrepConfig(output_dir=str(tmp_path), hp_lr_scheduler_type=schedule)
    for schedule in HP_SCHEDULES:  # HP's schedule (what probe_head/train step): 6 HP steps, 2 of warmup
        warmup = 0.0 if schedule == "constant" else 0.3  # (constant takes no warmup: refused, see test_config.py)
        args = HeadPrepConfig(
            output_dir=str(tmp_path), hp_lr_scheduler_type=schedule, hp_warmup_ratio=warmup, use_cpu=True
        )
        head = torch.nn.Parameter(torch.zeros(1))
        group = {"params": [head], "headprep_part": "head"}  # (as the trainer's groups: `Stages.param_groups`)
        scheduler = two_stage_scheduler(torch.optim.SGD([group], lr=1.0), args, hp_steps=6, ft_steps=0)
        reference = get_scheduler(schedule, torch.optim.SGD([head], lr=args.hp_learning_rate), 2 if warmup else 0, 6)
        for _ in range(6):
            assert scheduler.get_last_lr()[0] == pytest.approx(reference.get_last_lr()[0]), schedule
            scheduler.optimizer.step(), reference.optimizer.step()
            scheduler.step(), reference.step()


@pytest.mark.parametrize(
    "content, message",
    [
        ("hp_label_smoothing: [0.1]\n", "hp_label_smoothing: expected a number, got \\[0.1\\]"),
        ("sweep_taus: 4\n", r"sweep_taus: expected a list, e.g. \[4\], got 4"),
        ("hp_learning_rate: [1, 2]\n", "hp_learning_rate: expected a number"),
        ("sweep_taus: [0, 1.5]\n", "sweep_taus: expected whole numbers"),
    ],
)
def test_a_config_file_value_of_the_wrong_kind_names_the_setting(tmp_path, capsys, content, message):
    # argparse converts string defaults only: a file's list where one number goes reached the config as it was and
    # failed with a bare TypeError ("'<=' not supported between instances of 'float' and 'list'").
    config = tmp_path / "c.yaml"
    config.write_text(content)
    code, err = _exit_message(capsys, ["sweep", "--config", str(config), "--output_dir", str(tmp_path / "x")])
    assert code == 2 and re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_a_config_file_sets_bools_dicts_and_lists_as_before(tmp_path):
    # The value check must not refuse what the dataclasses take: a bool defaulting to True (whose `--no_x` action
    # shares its dest and takes no value), a dict setting, a list for report_to.
    from headprep_hf.cli import parse_with_config, sweep_parser

    config = tmp_path / "c.yaml"
    config.write_text(
        "track_dynamics: false\nchannels_last: false\nlr_scheduler_kwargs: {min_lr: 1.0e-6}\nreport_to: [none]\n"
        "sweep_taus: [0, 2]\nhp_learning_rate: 1\n"
    )
    task, args = parse_with_config(sweep_parser("image_classification"), ["--config", str(config), "--output_dir",
                                   str(tmp_path / "x")])  # fmt: skip
    assert args.track_dynamics is False and task.channels_last is False
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-6} and args.report_to == []  # ("none": no integration)
    assert args.sweep_taus == [0, 2] and args.hp_learning_rate == 1


def test_the_paper_voc_config_serves_the_sweep_and_a_sweep_refuses_resume_from_checkpoint(tmp_path, capsys):
    # README and the file say `headprep sweep --task segmentation --config recipes/configs/deeplabv3_voc_paper.yaml`;
    # the sweep refused the file for its recipe setting hp_epochs. It is now left out with a warning (the command
    # line still refuses --hp_epochs). --resume_from_checkpoint was accepted by the sweep and ignored.
    from headprep_hf.cli import SWEEP_DROPPED_CONFIG_KEYS, SWEEP_IGNORED_FLAGS, parse_with_config, sweep_parser

    paper = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "deeplabv3_voc_paper.yaml"
    argv = ["--config", str(paper), "--voc_root", str(tmp_path / "voc"), "--output_dir", str(tmp_path / "x")]
    with pytest.warns(UserWarning, match="hp_epochs=16 is left out here"):
        task, args = parse_with_config(sweep_parser("segmentation"), argv, SWEEP_IGNORED_FLAGS,
                                       SWEEP_DROPPED_CONFIG_KEYS)  # fmt: skip
    assert args.hp_learning_rate == 0.3 and task.crop_size == 320
    assert args.hp_cache_features is False  # (the sweep's default cache would hold 77 GiB of head inputs)
    for flags in (["--resume_from_checkpoint"], ["--resume-from-checkpoint", "last"]):
        code, err = _exit_message(capsys, ["sweep", *flags, "--output_dir", str(tmp_path / "y")])
        assert code == 2 and "a sweep resumes on its own" in err and not (tmp_path / "y").exists()


def test_exchange_of_part_of_a_sweep_is_refused_before_the_task_is_loaded(tmp_path, monkeypatch):
    # It loaded the task's data and model (possibly pretraining a source model) before head_exchange refused.
    from test_report import make_sweep, write_json

    import headprep_hf.tasks as tasks

    write_json(tmp_path / "sweep.json", {**make_sweep(result_taus=[0, 1]), "task": {"name": "image_classification",
                                                                                  "args": {}}})  # fmt: skip
    monkeypatch.setattr(tasks, "load_task_from_record", lambda *a, **k: pytest.fail("the task was loaded"))
    with pytest.raises(SystemExit, match="holds part of a sweep"):
        main(["exchange", str(tmp_path)])


def test_recipe_flags_that_would_fail_after_the_data_is_built_are_refused_when_parsed(tmp_path, capsys, monkeypatch):
    # FT's schedule must be a function of the step when the recipe trains HP then FT in one loop: reduce_lr_on_plateau
    # was accepted and failed in Trainer's create_scheduler, after the data and the model had been built. An unreadable
    # --config file was a bare traceback.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "recipes"))
    import image_classification

    def parse(argv):
        with pytest.raises(SystemExit) as exit_info:
            image_classification.parse_args(image_classification.make_parser(), argv)
        return exit_info.value.code, capsys.readouterr().err

    out = ["--output_dir", str(tmp_path / "o")]
    code, err = parse(out + ["--lr_scheduler_type", "reduce_lr_on_plateau"])
    assert code == 2 and "reduce_lr_on_plateau is not a function of the step" in err and "--hp_epochs 0" in err
    args = image_classification.parse_args(
        image_classification.make_parser(), out + ["--lr_scheduler_type", "reduce_lr_on_plateau", "--hp_epochs", "0"]
    )[1]
    assert args.hp_epochs == 0  # (without HP, Trainer runs the plateau schedule as it does)
    cached = ["--lr_scheduler_type", "reduce_lr_on_plateau", "--hp_cache_features", "true"]
    args = image_classification.parse_args(image_classification.make_parser(), out + cached)[1]
    assert args.hp_epochs > 0 and args.hp_cache_features  # (cached HP runs before FT's loop: any schedule works)
    # a --config through a pipe or process substitution (/dev/fd/N) is read; a folder is named as one
    read, write = os.pipe()
    os.write(write, b'{"learning_rate": 0.005}')
    os.close(write)
    try:
        args = image_classification.parse_args(
            image_classification.make_parser(), ["--config", f"/dev/fd/{read}", *out]
        )[1]
    finally:
        os.close(read)
    assert args.learning_rate == 0.005
    code, err = parse(["--config", str(tmp_path), *out])
    assert code == 2 and "a folder, not a .yaml or .json file" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [1e-3\n")
    code, err = parse(["--config", str(broken), *out])
    assert code == 2 and f"--config {broken}: not valid YAML" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_recipes_pin_memory_only_where_there_is_a_device_to_copy_to(tmp_path):
    # On the CPU, torch warned in every loader that pinned memory was unused.
    from headprep_hf import HeadPrepConfig
    from headprep_hf.tasks.base import COMMON_RECIPE_DEFAULTS, TaskInputs, resolve_loader_settings

    args = HeadPrepConfig(output_dir=str(tmp_path), use_cpu=True, **COMMON_RECIPE_DEFAULTS)
    inputs = TaskInputs(model=None, train_dataset=[], eval_dataset=[], decodes_files=False)
    resolve_loader_settings(args, inputs)
    assert args.dataloader_pin_memory is False and args.accelerator_config.non_blocking is False


def test_recipes_prefetch_in_memory_batches_in_two_workers_on_a_gpu_only(monkeypatch):
    # In the main process, a GPU idled at every logging step's host sync while the next in-memory batch was collated
    # and pinned (H200, ResNet-50: plain Trainer 0.944 of the raw loop, 0.991 with 2 workers).
    import types

    import torch

    from headprep_hf.tasks.base import TaskInputs, resolve_loader_settings

    def resolved(device, cores, persistent=None, **fields):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        args = types.SimpleNamespace(
            dataloader_num_workers=-1,
            dataloader_persistent_workers=persistent,  # (None: the recipes' default, "the recipe decides")
            dataloader_pin_memory=True,
            accelerator_config=types.SimpleNamespace(non_blocking=True),
            device=torch.device(device),
        )
        resolve_loader_settings(args, TaskInputs(model=None, train_dataset=[], eval_dataset=[], **fields))
        return args.dataloader_num_workers, args.dataloader_persistent_workers

    # (in-memory workers not persistent: each epoch's are seeded from the random state at its start, so an epoch-end
    # resume draws the uninterrupted run's augmentation)
    assert resolved("cuda", 16) == (2, False)
    assert resolved("cuda", 16, decodes_files=True) == (8, True)
    assert resolved("cuda", 2) == (1, False)
    assert resolved("cuda", 1) == (0, False)
    assert resolved("cuda", 16, prefetch_in_memory=False) == (0, False)  # graphs
    assert resolved("cpu", 16) == (0, False)
    assert resolved("cpu", 16, decodes_files=True) == (8, True)
    # --dataloader_persistent_workers false (the fix a resume's warning names) is kept
    assert resolved("cuda", 16, persistent=False, decodes_files=True) == (8, False)


def test_disable_tqdm_on_the_command_line_also_silences_the_libraries_bars(tmp_path):
    # transformers draws "Writing model shards" at every save whatever Trainer's disable_tqdm says.
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging

    from headprep_hf.cli import parse_with_config, sweep_parser

    try:
        parse_with_config(sweep_parser("image_classification"), ["--output_dir", str(tmp_path / "a")])
        assert transformers.utils.logging.is_progress_bar_enabled()
        parse_with_config(
            sweep_parser("image_classification"), ["--output_dir", str(tmp_path / "b"), "--disable_tqdm", "true"]
        )
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert not datasets.is_progress_bar_enabled() and huggingface_hub.utils.are_progress_bars_disabled()
    finally:
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()
        huggingface_hub.utils.enable_progress_bars()


def test_refusals_after_parsing_end_in_one_line(tmp_path):
    # A refusal raised after parsing (a data folder that is not there) printed a 40-line traceback through the data
    # loading; the command line now prints the refusal alone (exit 1), and writes nothing.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("HEADPREP_TRACEBACK", None)
    cmd = [sys.executable, str(ROOT / "recipes" / "image_classification.py"), "--train_dir", str(tmp_path / "none")]
    proc = subprocess.run([*cmd, "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()[-2:]
    assert lines[0] == f"image_classification.py: error: train_dir={str(tmp_path / 'none')!r} is not a folder"
    assert "HEADPREP_TRACEBACK=1" in lines[1]
    assert not (tmp_path / "out").exists()


def test_a_sweep_json_that_is_not_one_ends_in_one_line(tmp_path, monkeypatch, capsys):
    # jsonschema's ValidationError is not a ValueError: `headprep report` on a damaged sweep.json printed a traceback
    # and the schema's dump, where the README promises one line.
    from headprep_hf import cli

    (tmp_path / "sweep.json").write_text(json.dumps({"format_version": 2, "taus": "x"}))
    monkeypatch.delenv("HEADPREP_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_command(cli.main, ["report", str(tmp_path)], prog="headprep")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[0].startswith("headprep: error: ")
    assert "sweep.json" in err.strip().splitlines()[0]


def test_run_command_shortens_only_its_own_refusals(tmp_path, monkeypatch, capsys):
    from headprep_hf import cli

    (tmp_path / "mod.py").write_text(
        "def refuse():\n    raise ValueError('x=1 is refused: pass x=2')\n\n"
        "def fails():\n    return int('not a number')\n\n"
        "def chained():\n    try:\n        fails()\n    except ValueError as error:\n"
        "        raise FileNotFoundError('checkpoint-5 cannot be read') from error\n\n"
        "def invariant():\n    raise RuntimeError('HP did not reach the grid epochs')\n"
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    import mod

    monkeypatch.delenv("HEADPREP_TRACEBACK", raising=False)
    # Raised by code outside headprep_hf: a library's or Python's error keeps its traceback (it is a bug report).
    with pytest.raises(ValueError, match="refused"):
        cli.run_command(mod.refuse, prog="cmd")
    monkeypatch.setattr(cli, "_PACKAGE_ROOT", tmp_path)  # now mod.py counts as headprep_hf's own code
    with pytest.raises(SystemExit) as exit_info:
        cli.run_command(mod.refuse, prog="cmd")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines()[0] == "cmd: error: x=1 is refused: pass x=2"
    # An error of Python's inside our own code (not a `raise` of ours) is a bug: its traceback stays.
    with pytest.raises(ValueError, match="invalid literal"):
        cli.run_command(mod.fails, prog="cmd")
    with pytest.raises(SystemExit):
        cli.run_command(mod.chained, prog="cmd")
    assert "checkpoint-5 cannot be read (caused by ValueError: invalid literal" in capsys.readouterr().err
    # A plain RuntimeError of ours is an internal check failing (a bug): its traceback stays too.
    with pytest.raises(RuntimeError, match="grid epochs"):
        cli.run_command(mod.invariant, prog="cmd")
    monkeypatch.setenv("HEADPREP_TRACEBACK", "0")  # (off, as unset)
    with pytest.raises(SystemExit):
        cli.run_command(mod.refuse, prog="cmd")
    monkeypatch.setenv("HEADPREP_TRACEBACK", "1")
    with pytest.raises(ValueError, match="refused"):
        cli.run_command(mod.refuse, prog="cmd")


def test_an_interrupted_sweep_names_its_folder_and_how_to_continue(tmp_path, shared_cache, monkeypatch, capsys):
    # The default folder is timestamped: interrupted, it was named nowhere, and the same command started anew.
    from headprep_hf import cli
    from headprep_hf.sweep import TauSweep

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(TauSweep, "run", interrupted)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["sweep", *[a for a in tiny(shared_cache) if a != "--output_dir"]])
    err = capsys.readouterr().err
    (folder,) = re.findall(
        r"Sweep folder: (runs/sweep-\d{8}-\d{6}) \(stopped, the same command with --output_dir", err
    )
    assert f"Interrupted. The same command with --output_dir {folder} continues the sweep in {folder}." in err


def test_a_refusal_raised_in_a_loader_worker_ends_in_one_line(tmp_path, monkeypatch, capsys):
    # torch re-raises a worker's error as its own, with the worker's traceback in the message: a corrupt image in an
    # image folder printed 32 frames above the one line naming the file.
    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader

    from headprep_hf import cli
    from headprep_hf.data import build_image_transforms, load_image_classification_dataset, resolve_image_data_config

    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "train" / name / f"{i}.png")
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    transform = build_image_transforms(resolve_image_data_config({}, image_size=8), is_training=False)
    splits, _ = load_image_classification_dataset(
        None, str(tmp_path / "train"), None, transform, transform, validation_split=0.5, seed=0,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip

    def read_all():
        for name in ("train", "validation"):  # (the broken file is in one of them)
            for _ in DataLoader(splits[name], batch_size=8, num_workers=1):
                pass

    monkeypatch.delenv("HEADPREP_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_command(read_all, prog="cmd")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DataLoader worker" not in err
    (first,) = [line for line in err.splitlines() if line.startswith("cmd: error: ")]
    assert "broken.png" in first and "could not be decoded" in first

    # an error of a library inside a worker (not a refusal of ours) keeps its traceback
    def fails(index):
        return int("x")

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        __getitem__ = staticmethod(fails)

    with pytest.raises(ValueError, match="invalid literal"):
        cli.run_command(lambda: list(DataLoader(Bad(), num_workers=1)), prog="cmd")


def test_console_command_refusal_after_parsing(tmp_path, monkeypatch, capsys):
    from headprep_hf.cli import console_main

    monkeypatch.delenv("HEADPREP_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["headprep", "exchange", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"headprep exchange: error: {tmp_path}/sweep.json not found" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError):  # Python callers of main() get the exception
        main(["exchange", str(tmp_path)])


def test_a_data_folder_that_is_not_there_is_named_before_the_model_loads(tmp_path):
    # It was named after the backbone had loaded (a download online; offline, the model's own error came first).
    from headprep_hf.tasks.image_classification import ImageClassificationArguments, load_image_classification

    args = ImageClassificationArguments(
        model_name_or_path=str(tmp_path / "no_model"), train_dir=str(tmp_path / "trian")
    )
    with pytest.raises(ValueError, match=r"^train_dir='.*trian' is not a folder$"):
        load_image_classification(args, seed=0)


def test_a_hub_model_that_cannot_be_reached_names_the_offline_ways(tmp_path):
    # It ended with huggingface_hub's "check your connection", with no offline way (the dataset's error had them).
    code = "from headprep_hf.models import load_timm_model; load_timm_model('timm/resnet50.a1_in1k', num_classes=3)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()[-1]
    assert "as a Hub id it could not be loaded" in message and "leave --model_name_or_path out" in message, message


def test_a_mistyped_task_is_a_parse_error_and_merge_has_help(capsys):
    # An unknown --task ended as a ValueError (exit 1); `--merge --help` answered "expected at least one argument".
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--task", "segmentaton"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'segmentaton' (choose from graph, image_classification, segmentation)" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--merge", "--help"])
    assert exit_info.value.code == 0 and "Shard folders to merge." in capsys.readouterr().out
