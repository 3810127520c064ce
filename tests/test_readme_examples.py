"""The README's code examples, run as written: "Use it in your code", "Try it offline", "Prepared heads",
"Hyperparameter search" and "The tau sweep".

A newcomer copies these first, so they are read from README.md and executed here; a renamed argument, a missing
import or pseudo-code in them fails this test. Two things are substituted, because neither exists offline: the
datasets the examples leave to the reader (`train`, `val`, `test`: tiny seeded image sets with 10 classes) and the
Hub weights of `resnet50.a1_in1k` (timm's tiny `test_resnet` with the same `num_classes`, built when the example asks
for the pretrained model; the test checks it asks with `pretrained=True`). (The "Subclassing" examples are run by
tests/test_subclassing.py.)"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import TinyImages

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_MODEL = "resnet50.a1_in1k"


def readme_code(heading: str) -> str:
    """The one ```python block of the README section `heading` (e.g. "## Use it in your code"), preceded by as many
    blank lines as come before it in README.md, so that a traceback names the README's own line."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    end = re.compile(r"\n#{2,3} ").search(text, start + 1).start()
    blocks = list(re.finditer(r"```python\n(.*?)```", text[start:end], flags=re.S))
    assert len(blocks) == 1, f"the test expects one code block in README's {heading!r}; update both together"
    return "\n" * text[: start + blocks[0].start(1)].count("\n") + blocks[0].group(1)


@pytest.fixture
def offline_hub_model(monkeypatch):
    """timm.create_model with the README's Hub model replaced by the tiny test_resnet (seeded); records the calls."""
    real, calls = timm.create_model, []

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        if name == HUB_MODEL:
            torch.manual_seed(0)
            return real("test_resnet", pretrained=False, **kwargs)
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    return calls


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write to relative folders ("out", "heads/...", "runs/...")
    return {
        "train": TinyImages(32, num_classes=10, seed=0),
        "val": TinyImages(20, num_classes=10, seed=1),
        "test": TinyImages(20, num_classes=10, seed=2),
    }


def _head(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.fc.state_dict().items()}


def test_use_it_in_your_code_runs_as_written(data, offline_hub_model, tmp_path):
    code = readme_code("## Use it in your code")
    namespace = dict(data)
    exec(compile(code, str(README), "exec"), namespace)

    assert offline_hub_model == [(HUB_MODEL, True)]
    trainer = namespace["trainer"]
    args = trainer.args
    assert (args.hp_epochs, args.num_train_epochs, args.hp_label_smoothing, args.head_type) == (4, 10, 0.1, "linear")
    # HP then FT ran: the dynamics file holds the start-of-FT energy the trainer reports, and FT moved the backbone.
    written = json.loads((tmp_path / "out" / "headprep_dynamics.json").read_text())
    energy = trainer.dynamics["energy"]
    assert energy is not None and energy == pytest.approx(written["energy"])
    assert (tmp_path / "out" / "prepared_head" / "head.safetensors").is_file()
    fresh = timm.create_model(HUB_MODEL, pretrained=True, num_classes=10)
    moved = [
        n
        for n, p in trainer.model.named_parameters()
        if not n.startswith("fc.") and not torch.equal(p.detach().cpu(), fresh.state_dict()[n])
    ]
    assert moved, "FT did not change the backbone"


def test_prepared_heads_example_runs_as_written(data, offline_hub_model, tmp_path):
    # The section continues "Use it in your code": a trainer built as there (not yet trained) probes the head.
    setup = readme_code("## Use it in your code").split("trainer.train()")[0]
    namespace = dict(data)
    exec(compile(setup, str(README), "exec"), namespace)
    exec(compile(readme_code("### Prepared heads"), str(README), "exec"), namespace)

    folder = tmp_path / "heads" / "resnet50-cifar10-tau4"
    assert {"head.safetensors", "headprep_head.json", "README.md"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "headprep_head.json").read_text())["tau"] == 4
    # The saved head is the probed one: loading it into a fresh model gives the probing trainer's head exactly.
    probed = _head(namespace["trainer"].model)
    from headprep_hf import load_prepared_head

    fresh = timm.create_model(HUB_MODEL, pretrained=True, num_classes=10)
    before = _head(fresh)
    load_prepared_head(fresh, str(folder))
    loaded = _head(fresh)
    assert all(torch.equal(loaded[k], probed[k].cpu()) for k in probed)
    assert not all(torch.equal(before[k], probed[k].cpu()) for k in probed)
    # and the example's FT-only run started from it and trained (its output folder holds the run's dynamics)
    assert json.loads((tmp_path / "ft" / "headprep_dynamics.json").read_text())["hp_epochs"] == 0


def test_hyperparameter_search_example_runs_as_written(data, offline_hub_model, tmp_path):
    pytest.importorskip("optuna")
    code = readme_code("### Hyperparameter search")
    namespace = dict(data)
    exec(compile(code, str(README), "exec"), namespace)

    assert offline_hub_model == [(HUB_MODEL, True)] * 5  # (Trainer builds one model, each of the 4 trials its own)
    best = namespace["best"]
    assert set(best.hyperparameters) == {"hp_epochs", "hp_label_smoothing", "learning_rate"}
    # Each trial ran with its own settings, its results in its own folder: the tau it drew, no shared files.
    for number in range(4):
        run = tmp_path / "search" / f"run-{number}"
        dynamics = json.loads((run / "headprep_dynamics.json").read_text())
        assert dynamics["hp_epochs"] in (0, 2, 8)
        assert (run / "prepared_head").is_dir() == (dynamics["hp_epochs"] > 0)
    assert not (tmp_path / "search" / "headprep_dynamics.json").exists()


@pytest.mark.slow  # 21 FT jobs (7 taus x 3 seeds) and the head exchange: about 15 s on 2 cores
def test_tau_sweep_example_runs_as_written(data, offline_hub_model, tmp_path):
    namespace = {**data, "model": timm.create_model(HUB_MODEL, pretrained=True, num_classes=10)}
    exec(compile(readme_code("## The tau sweep"), str(README), "exec"), namespace)

    result = namespace["result"]
    written = json.loads((tmp_path / "runs" / "my_sweep" / "sweep.json").read_text())
    assert result["tau_star"] in [0, 1, 2, 4, 8, 16, 32]
    assert written["tau_star"] == result["tau_star"]
    assert written["seeds"] == [42, 43, 44] and written["complete"]
    assert {(r["tau"], r["seed"]) for r in written["results"]} == {
        (tau, seed) for tau in [0, 1, 2, 4, 8, 16, 32] for seed in [42, 43, 44]
    }
    assert written["hp"]["cached_features"] and written["hp"]["cache_views"] == 4
    assert (tmp_path / "runs" / "my_sweep" / "exchange.json").is_file()
    assert any((tmp_path / "runs" / "my_sweep" / "plots").glob("*.png"))


# The commands of the README's shell blocks and of the recipes' docstrings, parsed (not run) by the parser each
# command would use: a renamed or removed flag, or a value the flag refuses, fails here with the command's line.
ROOT = README.parent
RECIPE_DIR = ROOT / "recipes"


def _commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of each `python recipes/...`, `accelerate launch ... recipes/...`, `torchrun ... recipes/...` and
    `headprep sweep ...` command in README.md's ```bash blocks and in the recipes' docstrings."""
    import shlex

    sources = []
    text = README.read_text()
    for block in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        sources.append((f"README.md:{text[: block.start()].count(chr(10)) + 2}", block.group(1)))
    for recipe in sorted(RECIPE_DIR.glob("*.py")):
        docstring = ast.get_docstring(ast.parse(recipe.read_text()))
        if docstring:
            sources.append((f"recipes/{recipe.name} docstring", docstring))
    commands = []
    for where, body in sources:
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():  # join continued lines
            if not re.match(r"\s*(python recipes/|accelerate launch|torchrun|headprep sweep)", line):
                continue  # prose, other commands
            words = shlex.split(line, comments=True)
            if words[:2] == ["headprep", "sweep"] and "--merge" not in words:
                commands.append((where, words))
            elif any(w.startswith("recipes/") and w.endswith(".py") for w in words):
                commands.append((where, words))
    return commands


def _parse(words: list[str]):
    from importlib.util import module_from_spec, spec_from_file_location

    from headprep_hf.cli import (
        IGNORED_FLAGS,
        SWEEP_DROPPED_CONFIG_KEYS,
        SWEEP_IGNORED_FLAGS,
        _pop_option,
        parse_with_config,
        sweep_parser,
    )

    if words[:2] == ["headprep", "sweep"]:
        script, argv = "sweep", words[2:]
    else:
        i = next(i for i, w in enumerate(words) if w.startswith("recipes/") and w.endswith(".py"))
        script, argv = Path(words[i]).stem, words[i + 1 :]
    argv = [w for w in argv if w != "..."]  # "..." stands for the reader's own flags
    if script in ("sweep", "sweep_tau"):
        task, argv = _pop_option(argv, "--task", "image_classification")
        ignored = {**IGNORED_FLAGS, **SWEEP_IGNORED_FLAGS}
        return parse_with_config(sweep_parser(task), argv, ignored, SWEEP_DROPPED_CONFIG_KEYS)
    spec = spec_from_file_location(f"_readme_recipe_{script}", RECIPE_DIR / f"{script}.py")
    module = sys.modules[spec.name] = module_from_spec(spec)  # (a recipe's own dataclasses look their module up)
    spec.loader.exec_module(module)
    if script == "pretrain_graph":
        from transformers import HfArgumentParser

        return parse_with_config(HfArgumentParser(module.PretrainArguments), argv)
    return parse_with_config(module.make_parser(), argv)


def test_readme_and_recipe_commands_parse(monkeypatch):
    monkeypatch.chdir(ROOT)  # (--config recipes/configs/... is relative to the repository)
    commands = _commands()
    assert len(commands) >= 20, commands  # the extraction found the commands (not an empty loop)
    for where, words in commands:
        try:
            parsed = _parse(words)
        except SystemExit as err:  # argparse's error: its message went to stderr
            pytest.fail(f"{where}: `{' '.join(words)}` does not parse (exit {err.code})")
        given = {w.split("=", 1)[0].lstrip("-").replace("-", "_") for w in words if w.startswith("--")}
        values = {k for part in parsed for k in vars(part)}
        launcher = {"multi_gpu", "num_processes", "nproc_per_node", "num_machines", "machine_rank",
                    "main_process_ip", "main_process_port", "config", "task"}  # fmt: skip
        assert given - launcher <= values, (where, sorted(given - launcher - values))


def test_try_it_offline_runs_as_written(tmp_path, monkeypatch, shared_cache):
    # The one example that needs no substitute data: only the source model's pretraining is shortened (1 epoch, in
    # the tests' shared cache) and the test set's accuracy is not checked (the README gives the full run's).
    import headprep_hf.models

    real = headprep_hf.models.pretrain_source_model
    monkeypatch.setattr(
        headprep_hf.models,
        "pretrain_source_model",
        lambda **kw: real(**{"cache_dir": shared_cache, "epochs": 1, **kw}),
    )
    monkeypatch.chdir(tmp_path)
    code = readme_code("### Try it offline")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.args.hp_epochs == 4 and trainer.dynamics["energy"] is not None
    assert (tmp_path / "toy" / "headprep_dynamics.json").is_file()
