"""The `headprep` command: `sweep`, `exchange` and `report`.

    headprep sweep                                   # offline default: MNIST-5k source, toy task, taus 0..32
    headprep sweep --sweep_taus 0 2 8 --num_train_epochs 10 --output_dir runs/s1
    headprep sweep --sweep_shard 0/2 --output_dir runs/s_a    # on machine A
    headprep sweep --sweep_shard 1/2 --output_dir runs/s_b    # on machine B
    headprep sweep --merge runs/s_a runs/s_b --output_dir runs/s
    headprep exchange runs/s                         # backbone x head accuracy matrix (paper Fig. 3)
    headprep report runs/s                           # PNGs into runs/s/plots

`headprep sweep` takes every field of `SweepConfig` (and so of `TrainingArguments`) and of the task's arguments
(`--task image_classification`, the default), or `--config file.yaml|json` with command-line flags overriding it.
Under `accelerate launch` use `recipes/sweep_tau.py`, which runs the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import sys
import time
import traceback
import warnings
from pathlib import Path

import jsonschema
import yaml
from transformers import HfArgumentParser, TrainingArguments

SWEEP_DEFAULTS = dict(
    output_dir=None,  # set per run: runs/sweep-<time>
    hp_cache_features=True,
    hp_cache_views=4,
    eval_strategy="no",  # tau* uses the validation metric at the end of FT
    save_strategy="no",
    report_to="none",
    # Bars: over the FT jobs, the HP run, each FT job and the passes; the jobs' log records are not printed (sweep.json
    # holds them). `--disable_tqdm true` turns every bar off (the libraries' own too, see `_silence_library_bars`).
    disable_tqdm=False,
)


# Flags of TrainingArguments that the recipes and the sweep do not read: refused with what does the job instead.
IGNORED_FLAGS = {
    "--do_train": "the recipes always train (HP, then FT); to skip training, evaluate a saved model instead",
    "--do_eval": "the recipes always evaluate on the validation split (and on test when there is one)",
    "--do_predict": "the recipes always evaluate on the test split when there is one",
}
SWEEP_IGNORED_FLAGS = {
    "--hp_epochs": "a sweep runs one HP per seed to the largest tau of its grid; set the grid with --sweep_taus",
    "--resume_from_checkpoint": "a sweep resumes on its own: rerun it into the same --output_dir (finished jobs are "
    "reused, an unfinished one resumes from its last checkpoint when save_strategy wrote one)",
}
# Settings a recipe's config file may hold that the sweep does not read: dropped from a `--config` file with a
# warning (one file serves the recipe and the sweep, e.g. recipes/configs/deeplabv3_voc_paper.yaml); on the command
# line they are refused (SWEEP_IGNORED_FLAGS).
SWEEP_DROPPED_CONFIG_KEYS = ("hp_epochs", "resume_from_checkpoint")


# `--help` groups, most important first; TrainingArguments' own flags (the FT stage) come last.
MODEL_FIELDS = (
    "model_name_or_path", "model_arch", "output_stride", "num_layers", "hidden_size", "dropout", "source_epochs",
    "source_max_graphs", "channels_last",
)  # fmt: skip
HEAD_FIELDS = ("head_type", "mlp_hidden_size", "mlp_num_layers", "head_modules", "reinit_modules")
HELP_GROUPS = (
    "task and data",
    "model",
    "head probing (HP)",
    "task head",
    "measurements and outputs",
    "tau sweep",
    "transformers TrainingArguments (the finetuning stage)",
)


def _help_group(
    dest: str, script_fields: set[str], headprep_fields: set[str], training_fields: set[str]
) -> str | None:
    if dest in script_fields:
        return HELP_GROUPS[1] if dest in MODEL_FIELDS else HELP_GROUPS[0]
    if dest.startswith("sweep_"):
        return HELP_GROUPS[5]
    if dest in headprep_fields:
        if dest.startswith("hp_") or dest == "ft_label_smoothing":
            return HELP_GROUPS[2]
        return HELP_GROUPS[3] if dest in HEAD_FIELDS else HELP_GROUPS[4]
    return HELP_GROUPS[6] if dest in training_fields else None


def group_help(parser: HfArgumentParser) -> None:
    """Sort the parser's flags into `HELP_GROUPS` for `--help` (HfArgumentParser puts every field of a dataclass
    without `_argument_group_name` into one "options" group; HeadPrepConfig is one dataclass with TrainingArguments').
    Parsing is unchanged: argparse's groups only order the help. Flags of no group (-h, --config, --task, --merge)
    stay first, under "options"."""
    import dataclasses

    from .config import HeadPrepConfig

    training_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    headprep_fields = {f.name for f in dataclasses.fields(HeadPrepConfig)} - training_fields
    script_fields = {
        f.name
        for dtype in parser.dataclass_types
        if not issubclass(dtype, TrainingArguments)
        for f in dataclasses.fields(dtype)
    }
    groups = {}
    for action in list(parser._actions):
        title = _help_group(action.dest, script_fields, headprep_fields, training_fields)
        if title is None:
            continue
        for container in parser._action_groups:
            if action in container._group_actions:
                container._group_actions.remove(action)
        groups.setdefault(title, []).append(action)
    for title in HELP_GROUPS:
        if title in groups:
            parser.add_argument_group(title)._group_actions.extend(groups[title])
    if parser.usage is None:  # argparse's usage would list every flag (150 lines) before the first group
        parser.usage = "%(prog)s [--config FILE] [--flag VALUE ...]"


def _underscored(flag: str) -> str:
    """`--hp-epochs` as `--hp_epochs` (argparse, through HfArgumentParser, accepts both spellings of a flag)."""
    return "--" + flag[2:].replace("-", "_") if flag.startswith("--") else flag


def _flag_suggestions(parser: argparse.ArgumentParser, remaining: list[str], ignored=()) -> str:
    """The known flags closest to each unknown one (`--hp_epoch -> --hp_epochs`): Python 3.11's argparse names none."""
    import difflib

    refused = {_underscored(flag) for flag in ignored}  # (`headprep sweep` sets HP by --sweep_taus: not suggested)
    known = sorted(
        {_underscored(o) for action in parser._actions for o in action.option_strings if o.startswith("--")} - refused
    )
    hints = []
    for arg in remaining:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--"):
            close = difflib.get_close_matches(_underscored(flag), known, n=1, cutoff=0.8)
            if close:
                hints.append(f"{flag} -> {close[0]}")
    return f" (did you mean: {', '.join(hints)}?)" if hints else ""


def parse_with_config(
    parser: HfArgumentParser,
    argv: list[str],
    ignored: dict[str, str] | None = None,
    dropped_in_config: tuple[str, ...] = (),
):
    """`parser.parse_args_into_dataclasses(argv)`, where `--config FILE` or `--config=FILE` (.json/.yaml) supplies
    defaults that flags on the command line override. Unknown keys in the file are an error naming them.

    Strict, so that nothing given is silently ignored: no abbreviated flags (`--hp_epoch` is not `--hp_epochs`), an
    unknown flag ends in argparse's one-line error, flags the command does not read (`ignored`, default
    `IGNORED_FLAGS`) are refused with what to use instead, and `--resume_from_checkpoint` without a value means the
    latest checkpoint (`last`). Keys of `dropped_in_config` in the config file are left out with a warning (a file
    shared with a command that reads them)."""
    parser.allow_abbrev = False
    if not any("--config" in action.option_strings for action in parser._actions):
        parser.add_argument(
            "--config",
            default=argparse.SUPPRESS,  # read before parsing; listed here for --help
            metavar="FILE",
            help="Settings from a .yaml or .json file (keys: any flag below); flags on the command line override it.",
        )
    if not any(group.title in HELP_GROUPS for group in parser._action_groups):
        group_help(parser)
    for action in parser._actions:
        if action.dest == "bf16" and action.default is None and "recipe decides" not in (action.help or ""):
            action.help = (
                "bf16 mixed precision. Unset (None): the recipe decides, bf16 on a CUDA GPU that supports it (Ampere "
                "or newer) unless --fp16, off on the CPU; --bf16 true/false decides instead."
            )
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    ignored = IGNORED_FLAGS if ignored is None else ignored
    for action in parser._actions:  # (refused flags are not offered by --help either)
        if any(_underscored(option) in ignored for option in action.option_strings):
            action.help = argparse.SUPPRESS
    for arg in argv:
        flag = _underscored(arg.split("=", 1)[0])  # (HfArgumentParser takes --hp-epochs for --hp_epochs too)
        if flag in ignored:
            parser.error(f"{arg.split('=', 1)[0]} is not used here: {ignored[flag]}")
    for i, arg in enumerate(argv):
        if _underscored(arg) == "--resume_from_checkpoint" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "last")
            break
    if argv.count("--config") > 1:
        parser.error("--config is given more than once: give one file (flags on the command line override it)")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a .json or .yaml file")
        path = argv[i + 1]
        del argv[i : i + 2]
        try:
            with open(path) as f:  # (also a pipe or process substitution, /dev/fd/N)
                values = yaml.safe_load(f) if path.endswith((".yaml", ".yml")) else json.load(f)
        except FileNotFoundError:
            parser.error(f"--config {path}: no such file")
        except IsADirectoryError:
            parser.error(f"--config {path}: a folder, not a .yaml or .json file")
        except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as error:
            kind = "YAML" if path.endswith((".yaml", ".yml")) else "JSON (a .yaml or .yml name is read as YAML)"
            parser.error(f"--config {path}: not valid {kind}: {error}")
        values = {} if values is None else values  # (an empty or all-comment YAML file)
        if not isinstance(values, dict):
            parser.error(f"{path}: expected a mapping of setting: value at its top level, got {type(values).__name__}")
        # The command's settings; not the command line's own options (--config, --task, --merge, --help).
        known = {a.dest for a in parser._actions} - {"help", "config", "task", "merge"}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"{path}: unknown settings {unknown}")
        actions = {}
        for action in parser._actions:  # (a `--no_x` action shares its dest with `--x`: keep the one taking values)
            if action.dest not in actions or actions[action.dest].nargs == 0:
                actions[action.dest] = action
        for key in [k for k in values if k in dropped_in_config]:
            warnings.warn(
                f"{path}: {key}={values.pop(key)!r} is left out here ({ignored.get(f'--{key}', 'not read')}).",
                stacklevel=2,
            )
        for key, value in values.items():
            if f"--{key}" in ignored:
                parser.error(f"{path}: {key} is not used here: {ignored[f'--{key}']}")
            problem = _config_value_problem(actions[key], value)
            if problem:
                parser.error(f"{path}: {key}: {problem}")
        parser.set_defaults(**values)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:
        # A setting its dataclass refuses (`__post_init__`: e.g. an unsorted --sweep_taus): argparse's one-line error,
        # as for a mistyped flag, instead of a traceback through the dataclass machinery (HEADPREP_TRACEBACK=1 keeps
        # the traceback, e.g. for an error of the device setup, which runs there too).
        if _traceback_asked():
            raise
        parser.error(str(error))
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}{_flag_suggestions(parser, remaining, ignored)}")
    from .tasks.base import resolve_mixed_precision

    parsed = [resolve_mixed_precision(a) if isinstance(a, TrainingArguments) else a for a in parsed]
    _check_recipe_schedule(parser, parsed)
    if any(isinstance(a, TrainingArguments) and a.disable_tqdm for a in parsed):
        _silence_library_bars()
    for args in parsed:
        if isinstance(args, TrainingArguments) and args.output_dir == parser.get_default("output_dir"):
            _agree_on_output_dir(args)
    return tuple(parsed)


def _silence_library_bars() -> None:
    """`--disable_tqdm true` on the command line: also the bars the libraries draw on their own (transformers' "Writing
    model shards" at every save, datasets' map/load bars, huggingface_hub's downloads), which `Trainer`'s flag does
    not reach. Their public switches, process-wide: a command's process is one run (a Python caller of
    `parse_with_config` gets them switched off too; each library's `enable_progress_bar(s)` turns them back on). OGB's
    conversion bars have no switch."""
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def _check_recipe_schedule(parser: argparse.ArgumentParser, parsed) -> None:
    """A recipe trains HP and FT in one `train()` loop, so FT's schedule must be a function of the step: a schedule
    that is not (`reduce_lr_on_plateau`) was accepted here and failed in `create_scheduler` after the data and the
    model had been built. A sweep runs FT on its own (`finetune()`), where any schedule works."""
    from .config import HeadPrepConfig
    from .schedules import STEP_SCHEDULES
    from .sweep import SweepConfig

    for args in parsed:
        if not isinstance(args, HeadPrepConfig) or isinstance(args, SweepConfig) or args.hp_epochs <= 0:
            continue
        if args.hp_cache_features:
            continue  # (cached HP runs before the loop: FT's loop is Trainer's own, with any schedule)
        kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        if kind not in STEP_SCHEDULES:
            parser.error(
                f"--lr_scheduler_type {kind} is not a function of the step, so FT cannot follow HP with it in one run "
                f"(the recipe trains both stages in one loop; --hp_epochs is {args.hp_epochs}). Use one of "
                f"{', '.join(STEP_SCHEDULES)}, --hp_cache_features true (HP on cached features, before FT's loop), "
                "or --hp_epochs 0."
            )


def _config_value_problem(action: argparse.Action, value) -> str | None:
    """What is wrong with a config file's `value` for `action`, or None. argparse converts string defaults only, so a
    file's list where one number goes (or a number where a list goes) reached the dataclass as it was and failed
    there with a bare TypeError naming no setting. Only numbers and lists are checked: bools, dicts and settings that
    take several kinds (`report_to`, `lr_scheduler_kwargs`, `accelerator_config`) pass as the dataclass takes them."""
    if value is None or isinstance(value, str):
        return None  # (strings are parsed as on the command line)
    many = action.nargs in ("+", "*")
    if many and not isinstance(value, list):
        return f"expected a list, e.g. [{value!r}], got {value!r}"
    if action.type not in (int, float) or action.nargs not in (None, "?", "+", "*"):
        return None
    for item in value if many else [value]:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            return f"expected {'numbers' if many else 'a number'}, got {value!r}"
        if action.type is int and isinstance(item, float) and not item.is_integer():
            return f"expected {'whole numbers' if many else 'a whole number'}, got {value!r}"
    return None


def _agree_on_output_dir(args: TrainingArguments) -> None:
    """The default `output_dir` of the recipes and the sweep is stamped with the time each process read it; the
    ranks of one launch could straddle a second and write two folders. They take rank 0's."""
    if args.world_size > 1:
        from accelerate.utils import broadcast_object_list

        args.output_dir = broadcast_object_list([args.output_dir], from_process=0)[0]


def _pop_option(argv: list[str], name: str, default: str | None = None) -> tuple[str | None, list[str]]:
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return value, argv
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1], argv
    return default, argv


def sweep_parser(task_name: str, prog: str = "headprep sweep") -> HfArgumentParser:
    from .sweep import SweepConfig
    from .tasks import get_task
    from .tasks.base import explain_auto_workers

    task = get_task(task_name)
    parser = HfArgumentParser((task.arguments, SweepConfig), prog=prog)
    defaults = {**task.defaults, **SWEEP_DEFAULTS, **task.sweep_defaults}
    defaults["output_dir"] = time.strftime("runs/sweep-%Y%m%d-%H%M%S")
    parser.set_defaults(**defaults)
    explain_auto_workers(parser)
    for action in parser._actions:
        if action.dest == "hp_lr_scheduler_type":  # SweepConfig refuses others: list only the one that works
            action.choices = ["constant"]
            action.help = "A sweep's HP is constant (the head saved at each tau comes from one HP run)."
        if action.dest == "hp_warmup_ratio":  # (its help offered a range; any value but 0 is refused)
            action.help = "0 in a sweep: the head saved at each tau comes from one HP run, without warmup."
    # Read before parsing (`_pop_option`, the merge parser); listed here so that --help shows them.
    parser.add_argument(
        "--task", default=argparse.SUPPRESS, help="image_classification (default), segmentation or graph."
    )
    parser.add_argument(
        "--merge", nargs="+", default=argparse.SUPPRESS, metavar="DIR", help="Merge these shard folders instead."
    )
    return parser


def _setting_given(argv: list[str], name: str) -> bool:
    """Whether the command line sets `name`: as a flag in any spelling argparse takes (`--sweep_metric x`,
    `--sweep-metric x`, `--sweep_metric=x`) or as a key of its `--config` file."""
    if any(_underscored(arg.split("=", 1)[0]) == f"--{name}" for arg in argv):
        return True
    path, _ = _pop_option(argv, "--config")
    if path is None:
        return False
    with open(path) as f:  # (parse_with_config has read it: it exists and holds a mapping)
        values = yaml.safe_load(f) if path.endswith((".yaml", ".yml")) else json.load(f)
    return isinstance(values, dict) and name in values


def sweep_main(argv: list[str], prog: str = "headprep sweep") -> dict:
    """`headprep sweep ...`: run a sweep (or a shard), or merge shards with `--merge DIR...`. `prog`: the name usage
    lines and parse errors give the command (a script that runs it passes its own)."""
    from .sweep import TauSweep, format_table, merge_sweeps
    from .tasks import get_task, task_record
    from .tasks.base import resolve_loader_settings

    if any(arg == "--merge" or arg.startswith("--merge=") for arg in argv):
        from transformers.hf_argparser import string_to_bool

        # `--merge=A B`: argparse gives an `=` value alone to a nargs="+" flag; split it so that B follows too
        argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--merge=") else [arg])]
        parser = argparse.ArgumentParser(prog=f"{prog} --merge", allow_abbrev=False)
        parser.add_argument("--merge", nargs="+", required=True, metavar="DIR", help="Shard folders to merge.")
        parser.add_argument("--output_dir", required=True, help="Folder of the merged sweep.json.")
        # bool flags as `headprep sweep` takes them: `--flag`, `--flag true`, `--flag false`
        parser.add_argument(
            "--overwrite_output_dir", type=string_to_bool, nargs="?", const=True, default=False, metavar="{true,false}"
        )
        parser.add_argument("--sweep_report", type=string_to_bool, nargs="?", const=True, default=True)
        if "-h" in argv or "--help" in argv:  # (`--merge --help`: argparse took --help for a missing folder)
            parser.print_help()
            raise SystemExit(0)
        ns = parser.parse_args(argv)
        merged = merge_sweeps(ns.merge, ns.output_dir, overwrite=ns.overwrite_output_dir)
        if ns.sweep_report:
            from .report import write_report

            write_report(ns.output_dir)
        print(format_table(merged))
        return merged

    task_name, argv = _pop_option(argv, "--task", "image_classification")
    from .tasks import TASKS

    if task_name not in TASKS:  # (a parse error, exit 2, as the README says of the other flags)
        argparse.ArgumentParser(prog=prog).error(
            f"argument --task: invalid choice: {task_name!r} (choose from {', '.join(sorted(TASKS))})"
        )
    task = get_task(task_name)
    task_args, args = parse_with_config(
        sweep_parser(task_name, prog), argv, {**IGNORED_FLAGS, **SWEEP_IGNORED_FLAGS}, SWEEP_DROPPED_CONFIG_KEYS
    )
    inputs = task.load(task_args, args.seed)
    if inputs.selection_metric is not None and not _setting_given(argv, "sweep_metric"):
        # The data's own metric (a graph dataset's OGB eval_metric: ROC-AUC, AP or RMSE) over the task's default.
        args.sweep_metric = inputs.selection_metric
        logging.getLogger(__name__).warning(
            "sweep_metric %r: the metric of the data (set --sweep_metric to choose another)", args.sweep_metric
        )
    resolve_loader_settings(args, inputs)
    sweep = TauSweep(
        inputs.model,
        args,
        inputs.train_dataset,
        inputs.eval_dataset,
        test_dataset=inputs.test_dataset,
        compute_metrics=inputs.compute_metrics,
        task=task_record(task, task_args),
        exchange_train_dataset=inputs.train_eval_dataset,
        data_collator=inputs.data_collator,
        preprocess_logits_for_metrics=inputs.preprocess_logits_for_metrics,
        **({"energy_dataset": inputs.energy_dataset} if inputs.energy_dataset is not None else {}),
    )
    # The folder is named before the work starts: interrupted, the default (timestamped) folder was named nowhere,
    # and the same command started again from scratch in a new one.
    given = _setting_given(argv, "output_dir")
    again = f"the same command{'' if given else f' with --output_dir {shlex.quote(args.output_dir)}'}"
    if args.process_index == 0:
        print(f"Sweep folder: {args.output_dir} (stopped, {again} continues it: finished jobs are reused)",
              file=sys.stderr)  # fmt: skip
    try:
        result = sweep.run()
    except KeyboardInterrupt:
        if args.process_index == 0:
            print(f"\nInterrupted. {again.capitalize()} continues the sweep in {args.output_dir}.", file=sys.stderr)
        raise
    if args.process_index == 0:
        print(format_table(result))
        print(f"sweep.json and plots in {args.output_dir}")
    return result


def exchange_main(argv: list[str]) -> dict:
    """`headprep exchange SWEEP_DIR`: the head-exchange matrix of a finished sweep run from the command line."""
    from .exchange import head_exchange
    from .sweep import SweepConfig, load_sweep
    from .tasks import load_task_from_record
    from .tasks.base import resolve_loader_settings

    parser = argparse.ArgumentParser(prog="headprep exchange", description=exchange_main.__doc__)
    parser.add_argument("sweep_dir")
    parser.add_argument("--report", default="true", choices=["true", "false"], help="Redraw the plots afterwards.")
    ns = parser.parse_args(argv)
    sweep = load_sweep(ns.sweep_dir)
    if not sweep.get("task"):
        raise SystemExit(
            f"{ns.sweep_dir}/sweep.json records no task (the sweep was run from Python): call "
            "headprep_hf.exchange.head_exchange(model, sweep_dir, train, val, args) instead."
        )
    if not sweep.get("complete"):  # (before the task's data and model are loaded, which may take minutes)
        raise SystemExit(
            f"{ns.sweep_dir} holds part of a sweep (a shard, or an unfinished sweep): merge the shards first "
            "(headprep sweep --merge), or finish the sweep by running it again."
        )
    settings = {k: v for k, v in sweep["settings"].items() if v is not None}
    args = SweepConfig(
        output_dir=os.path.join(ns.sweep_dir, "exchange"),
        sweep_taus=sweep["taus"],
        report_to="none",
        disable_tqdm=True,
        **settings,
    )
    inputs = load_task_from_record(sweep["task"], args.seed)
    resolve_loader_settings(args, inputs)
    exchange = head_exchange(
        inputs.model,
        ns.sweep_dir,
        inputs.train_dataset,
        inputs.eval_dataset,
        args,
        data_collator=inputs.data_collator,
        measure_train_dataset=inputs.train_eval_dataset,
    )
    if ns.report == "true":
        from .report import write_report

        write_report(ns.sweep_dir)
    print(format_exchange(exchange))
    return exchange


def format_exchange(exchange: dict) -> str:
    """The validation matrix of an `exchange.json` as text; "n/a" where a set held no valid label (null)."""
    taus = exchange["taus"]
    lines = ["validation accuracy, rows: backbone finetuned from tau, columns: head finetuned from tau"]
    lines.append("       " + "".join(f"{t:>8}" for t in taus))
    for t, row in zip(taus, exchange["validation_accuracy"]):  # (null: `:.4f` raised a TypeError after the file)
        lines.append(f"{t:>7}" + "".join(f"{v:>8.4f}" if v is not None else f"{'n/a':>8}" for v in row))
    return "\n".join(lines)


def report_main(argv: list[str]) -> list[Path]:
    """`headprep report DIR`: write the sweep's PNGs (into DIR/plots unless --output_dir)."""
    from .report import write_report

    parser = argparse.ArgumentParser(prog="headprep report", description=report_main.__doc__)
    parser.add_argument("sweep_dir")
    parser.add_argument("--output_dir", default=None)
    ns = parser.parse_args(argv)
    if os.path.basename(ns.sweep_dir) == "sweep.json" and os.path.isfile(ns.sweep_dir):  # (the file itself, given)
        ns.sweep_dir = os.path.dirname(ns.sweep_dir) or "."
    paths = write_report(ns.sweep_dir, ns.output_dir)
    for path in paths:
        print(path)
    return paths


COMMANDS = {"sweep": sweep_main, "exchange": exchange_main, "report": report_main}

_PACKAGE_ROOT = Path(__file__).resolve().parent
# What a deliberate refusal raises (`CheckpointError` and `OutputsDoNotFitLabels` are ValueErrors, `NonFiniteError`
# and `LaunchError` RuntimeErrors of our own, the feature cache's size check a MemoryError, a missing extra an
# ImportError, a `sweep.json` that is not one `sweep_schema`'s jsonschema.ValidationError).
_REFUSALS = (ValueError, OSError, MemoryError, RuntimeError, ImportError, jsonschema.ValidationError)


def _traceback_asked() -> bool:
    """`HEADPREP_TRACEBACK` set to anything but empty, 0, false or no."""
    return os.environ.get("HEADPREP_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no")


def _own_refusal(error: BaseException, scripts: tuple[Path, ...]) -> bool:
    """Whether `error` comes from a `raise` statement of headprep_hf itself or of `scripts` (a deliberate refusal
    whose message names the setting and the fix), not from a library below it or from Python (a bug, whose traceback
    is the useful part)."""
    if not isinstance(error, _REFUSALS):
        return False
    if isinstance(error, RuntimeError) and not type(error).__module__.startswith("headprep_hf"):
        return False  # (a plain RuntimeError of ours is an internal check failing: a bug, its traceback kept)
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    path = Path(last.filename).resolve()
    ours = path.is_relative_to(_PACKAGE_ROOT) or path in scripts
    return ours and (last.line or "").lstrip().startswith("raise")


# torch's `ExceptionWrapper.reraise`: an error raised in a DataLoader worker comes back as a new exception of the same
# type, raised by torch, whose message holds the worker's traceback as text.
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback[^\n]*\n(.*)", re.S)
_TRACEBACK_FRAME = re.compile(r'^  File "([^"]+)", line \d+, in [^\n]*\n    ([^\n]*)\n', re.M)


def _worker_refusal(error: BaseException, scripts: tuple[Path, ...]) -> str | None:
    """The message of a refusal of headprep_hf (or of `scripts`) raised in a DataLoader worker (an image that cannot be
    decoded, a bad sample), or None: torch re-raises it from its own code, with the worker's traceback in the message,
    so `_own_refusal` does not see it, and the command printed a 30-frame traceback above the one line it promises."""
    match = _WORKER_ERROR.match(str(error))
    if match is None or match.group(1) != type(error).__name__:
        return None
    text = match.group(2)
    frames = list(_TRACEBACK_FRAME.finditer(text))
    if not frames:
        return None
    last = frames[-1]
    path = Path(last.group(1)).resolve()
    if not ((path.is_relative_to(_PACKAGE_ROOT) or path in scripts) and last.group(2).lstrip().startswith("raise")):
        return None
    head = f"{match.group(1)}: "
    rest = text[last.end() :]
    start = rest.find("\n" + head) + 1 if not rest.startswith(head) else 0
    if start == 0 and not rest.startswith(head):
        return None
    return rest[start + len(head) :].strip() or None


@contextlib.contextmanager
def _own_records_shown():
    """headprep_hf's INFO records on stderr while a command runs (the data config and transforms a run uses, finished
    sweep jobs reused, where the energy came from), on the main process, where the program configured no logging of
    its own: Python shows only warnings otherwise."""
    package, root = logging.getLogger("headprep_hf"), logging.getLogger()
    if package.handlers or root.handlers or os.environ.get("RANK", "0") != "0":
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = package.level
    package.addHandler(handler)
    if level == logging.NOTSET:  # (a level the program set is kept: it has no handler to show it otherwise)
        package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


def run_command(function, *args, prog: str | None = None):
    """`function(*args)` for a command line: a refusal raised by headprep_hf itself (or by the script that runs it)
    after parsing (a data folder that is not there, a checkpoint that fails verification, a cache that does not fit,
    a diverged run) ends in one line on stderr naming it, exit status 1, as the refusals at parse time do (status 2)
    instead of a traceback through the data loading or the training loop. Errors from other libraries and Python keep
    their traceback, and so does every error with `HEADPREP_TRACEBACK=1`."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    scripts = (Path(main_file).resolve(),) if main_file else ()
    try:
        with _own_records_shown():
            return function(*args)
    except _REFUSALS as error:
        worker = _worker_refusal(error, scripts)  # (raised in a DataLoader worker: torch re-raises it as its own)
        if _traceback_asked() or not (worker is not None or _own_refusal(error, scripts)):
            raise
        prog = prog or Path(sys.argv[0]).name
        if os.environ.get("RANK") is not None and os.environ.get("WORLD_SIZE", "1") != "1":  # (under a launcher)
            prog += f" [rank {os.environ['RANK']}]"
        # (a jsonschema error's str() appends the schema and the instance: its message is the line)
        message = (error.message if isinstance(error, jsonschema.ValidationError) else str(error)) or type(
            error
        ).__name__
        cause = error.__cause__
        if worker is not None:
            message, cause = worker, None
        if cause is not None and str(cause) and str(cause) not in message:
            message += f" (caused by {type(cause).__name__}: {cause})"
        print(f"{prog}: error: {message}", file=sys.stderr)
        print(f"{prog}: ({type(error).__name__}; HEADPREP_TRACEBACK=1 prints the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    COMMANDS[argv[0]](argv[1:])
    return 0


def console_main() -> int:
    """The `headprep` console script: `main()`, with the refusals raised after parsing as one line (`run_command`).
    Python callers of `main(argv)` get the exceptions themselves."""
    argv = sys.argv[1:]
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        try:
            return run_command(main, argv, prog=f"headprep {command}" if command else "headprep")
        finally:
            sys.stdout.flush()  # (here, not at exit, so that a closed pipe is caught below, also after --help)
    except BrokenPipeError:  # (output into a pipe its reader closed, `headprep --help | head -1`: as other tools)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's advice: no second error at exit)
        return 1


if __name__ == "__main__":
    sys.exit(console_main())
