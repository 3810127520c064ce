"""Progress: HP and FT bars in single runs, the HP->FT line, the sweep's bars, the passes' bars, `disable_tqdm`.

The bars are read from what tqdm writes to the (captured) terminal: each redraw starts with a carriage return, nested
bars move the cursor with ANSI escapes (removed here), so a bar's states are the lines between them.
"""

from __future__ import annotations

import re
import time

import pytest
from conftest import CONFIG_DEFAULTS, TinyImages, bn_head_model, make_config, tiny_timm
from transformers.utils import logging as hf_logging

from headprep_hf import HeadPrepTrainer, SweepConfig, TauSweep
from headprep_hf.metrics import accuracy_metrics

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
BAR = re.compile(r"^(?P<desc>.*?):?\s*(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+) \[(?P<mm>\d+):(?P<ss>\d+)")


@pytest.fixture(autouse=True)
def bars_on():
    # transformers' switch (and HF_HUB_DISABLE_PROGRESS_BARS) would turn the passes' bars off whatever the config says.
    active = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    if not active:
        hf_logging.disable_progress_bar()


def bar_states(text: str) -> list[dict]:
    """Every drawn bar state: description, percent, n, total, elapsed seconds."""
    states = []
    for line in re.split(r"[\r\n]", ANSI.sub("", text)):
        match = BAR.match(line.strip())
        if match:
            states.append(
                {
                    "desc": match["desc"].strip(),
                    "n": int(match["n"]),
                    "total": int(match["total"]),
                    "elapsed": 60 * int(match["mm"]) + int(match["ss"]),
                }
            )
    return states


def finished(states: list[dict]) -> dict[str, int]:
    """Description -> total of the bars that reached their end (a bar left on screen draws its end when closed)."""
    return {s["desc"]: s["total"] for s in states if s["n"] == s["total"] > 0}


def drawn(states: list[dict]) -> dict[str, int]:
    """Description -> total of every bar drawn (a transient bar over a pass faster than tqdm's 0.1 s redraw interval
    is drawn at its start only, and cleared)."""
    return {s["desc"]: s["total"] for s in states}


def _trainer(tmp_path, model=None, n=32, **overrides):
    # 32 samples, batches of 16: 2 updates per epoch; hp_epochs=2 (conftest): 4 HP updates, then 2 FT updates.
    args = make_config(tmp_path, disable_tqdm=False, logging_steps=100, **overrides)
    return HeadPrepTrainer(model=model or tiny_timm(), args=args, train_dataset=TinyImages(n, seed=0))


def test_train_draws_an_hp_bar_then_an_ft_bar_and_the_passes(tmp_path, capsys):
    # BatchNorm in the head: the statistics pass runs; the energy by its own pass (not the last HP epoch's inputs).
    trainer = _trainer(tmp_path, model=bn_head_model(), energy_from_hp_epoch=False)
    trainer.train()
    out, err = capsys.readouterr()
    states = bar_states(err)
    done = finished(states)
    assert done["HP"] == 4 and done["FT"] == 2  # one bar per stage, each over its own updates
    assert not any(s["total"] == 6 and s["n"] > 0 for s in states)  # never one bar counting both stages
    passes = drawn(states)  # one batch each (32 samples, measure_batch_size 64)
    assert {name: passes.get(name) for name in ("BatchNorm statistics", "energy", "drift probe")} == dict.fromkeys(
        ("BatchNorm statistics", "energy", "drift probe"), 1
    )
    dynamics = trainer.dynamics
    line = (
        f"HP -> FT at step 4: energy {dynamics['energy']:.4f}, HP train accuracy {dynamics['hp_train_accuracy']:.4f}"
    )
    assert out.count("HP -> FT") == 1 and line in out


def test_cached_hp_labels_its_bars_and_the_feature_cache_pass(tmp_path, capsys):
    trainer = _trainer(tmp_path, hp_cache_features=True, hp_cache_views=2)
    trainer.train()
    out, err = capsys.readouterr()
    states = bar_states(err)
    done = finished(states)
    assert done["HP"] == 4 and done["FT"] == 2
    assert drawn(states)["feature cache (view 1/2)"] == 1 and drawn(states)["feature cache (view 2/2)"] == 1
    assert f"HP -> FT: energy {trainer.dynamics['energy']:.4f}, HP train accuracy" in out


def test_resumed_ft_bar_counts_ft_updates_only(tmp_path, capsys):
    first = _trainer(tmp_path, save_strategy="steps", save_steps=5, num_train_epochs=2)  # checkpoint-5: FT 1 of 4
    first.args.disable_tqdm = True
    first.train()
    capsys.readouterr()
    resumed = _trainer(tmp_path, save_strategy="steps", save_steps=5, num_train_epochs=2, overwrite_output_dir=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-5"))
    states = bar_states(capsys.readouterr().err)
    ft = [s for s in states if s["desc"] == "FT"]
    assert ft and all(s["total"] == 4 for s in ft) and ft[-1]["n"] == 4
    assert min(s["n"] for s in ft) >= 1  # starts at the FT update the checkpoint holds
    assert not [s for s in states if s["desc"] == "HP"]


def test_disable_tqdm_draws_no_bar_and_prints_the_line(tmp_path, capsys):
    trainer = HeadPrepTrainer(
        model=bn_head_model(),
        args=make_config(tmp_path, disable_tqdm=True, logging_steps=100, hp_cache_features=True),
        train_dataset=TinyImages(32, seed=0),
    )
    trainer.train()
    out, err = capsys.readouterr()
    assert bar_states(out + err) == [] and "%|" not in out + err
    assert f"HP -> FT: energy {trainer.dynamics['energy']:.4f}" in out  # printed as the log records are


class SlowHP(TauSweep):
    """A sweep whose HP takes 2 s longer, timing its FT jobs."""

    ft_seconds = 0.0

    def probe(self, seed=None):
        record = super().probe(seed)
        time.sleep(2.0)
        return record

    def finetune_from(self, tau, seed=None):
        start = time.perf_counter()
        try:
            return super().finetune_from(tau, seed)
        finally:
            self.ft_seconds += time.perf_counter() - start


def _sweep_config(tmp_path, **overrides):
    # The unit-test settings (conftest), as a sweep: taus 0 and 2 on cached HP, no report.
    values = {k: v for k, v in CONFIG_DEFAULTS.items() if k not in ("hp_epochs", "disable_tqdm")}
    values.update(output_dir=str(tmp_path / "sweep"), sweep_taus=[0, 2], hp_cache_features=True, drift_probe_samples=8)
    return SweepConfig(**{**values, "sweep_report": False, **overrides})


@pytest.mark.slow  # end to end: HP and two FT jobs (about 15 s)
def test_sweep_bars_hp_each_ft_job_and_the_jobs_clock(tmp_path, capsys):
    sweep = SlowHP(
        tiny_timm(), _sweep_config(tmp_path), TinyImages(32, seed=0), TinyImages(16, seed=1),
        compute_metrics=accuracy_metrics(),
    )  # fmt: skip
    sweep.run()
    out, err = capsys.readouterr()
    states = bar_states(err)
    done = finished(states)
    assert done["HP seed=0"] == 4  # the HP run to tau = 2: 2 epochs of 2 updates
    assert done["FT tau=0 seed=0"] == 2 and done["FT tau=2 seed=0"] == 2  # a bar inside each FT job
    assert drawn(states)["feature cache"] == 1
    overall = [s for s in states if s["desc"] == "tau sweep"]
    assert overall and {s["total"] for s in overall} == {2} and overall[-1]["n"] == 2  # one step per FT job
    # Its clock counts the FT jobs only: without excluding HP (2 s of sleep alone) it would show >= ft + 1 s.
    assert overall[-1]["elapsed"] < sweep.ft_seconds + 1.0
    assert out.count("HP -> FT") == 2  # one line per FT job
    assert "{'loss'" not in out  # the jobs' log records are not printed


@pytest.mark.slow  # end to end: HP and two FT jobs
def test_sweep_with_disable_tqdm_draws_no_bar(tmp_path, capsys):
    config = _sweep_config(tmp_path, sweep_taus=[0, 1], disable_tqdm=True, sweep_exchange=True)
    assert (
        config.sweep_progress
    )  # (the sweep's own and the head exchange's bars are on, but disable_tqdm turns every bar off)
    TauSweep(
        tiny_timm(), config, TinyImages(32, seed=0), TinyImages(16, seed=1), compute_metrics=accuracy_metrics()
    ).run()
    out, err = capsys.readouterr()
    assert bar_states(out + err) == [] and "%|" not in out + err
    assert "HP -> FT" not in out  # a sweep's jobs print nothing (their lines go to the logger)
