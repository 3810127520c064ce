"""Replicated sweeps: per-seed jobs equal single-seed sweeps, statistics equal numpy/scipy, seeds can be added,
and regression sweeps run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CONFIG_DEFAULTS, TinyImages, tiny_timm
from safetensors.torch import load_file
from scipy import stats
from torch import nn

from headprep_hf import SweepConfig, TauSweep
from headprep_hf.metrics import accuracy_metrics, graph_metrics
from headprep_hf.replicates import describe, paired_difference, verdict
from headprep_hf.sweep import format_table, upgrade_sweep
from headprep_hf.sweep_schema import validate_sweep

COMMON = {k: v for k, v in CONFIG_DEFAULTS.items() if k != "hp_epochs"}


@pytest.fixture(scope="module")
def data():
    return TinyImages(48, seed=0), TinyImages(24, seed=1), TinyImages(24, seed=2)


def _sweep(path, data, seeds, model_fn=tiny_timm, metrics=None, **overrides):
    values = {**COMMON, "output_dir": str(path), "sweep_taus": [0, 2], "sweep_seeds": seeds, "sweep_progress": False}
    values.update({"sweep_report": False, **overrides})
    train, val, test = data
    return TauSweep(model_fn(), SweepConfig(**values), train, val, test, compute_metrics=metrics or accuracy_metrics())


def test_statistics_equal_numpy_and_scipy():
    values = [0.91, 0.95, 0.88, 0.93]
    got = describe(values)
    mean, std = np.mean(values), np.std(values, ddof=1)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=std / np.sqrt(len(values)))
    assert got["n"] == 4 and got["mean"] == pytest.approx(mean) and got["std"] == pytest.approx(std)
    assert got["ci95"] == pytest.approx([low, high])
    one = describe([0.5, None])
    assert one["n"] == 1 and one["std"] is None and one["ci95"] is None
    difference = paired_difference({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.8, 1: 0.8, 2: 0.5, 3: 0.1})
    assert difference["seeds"] == [0, 1, 2] and difference["mean"] == pytest.approx(np.mean([0.1, 0.0, 0.2]))
    assert "beats tau = 0 by" in verdict(4, 0, describe([0.02, 0.03, 0.025]), "accuracy", True)
    assert "is worse than" in verdict(4, 0, describe([0.02, 0.03, 0.025]), "loss", False)
    assert "not distinguishable from tau = 0 at 3 seeds" in verdict(4, 0, describe([0.02, -0.03, 0.01]), "acc", True)
    assert "add seeds" not in verdict(4, 0, describe([0.02, -0.03, 0.01]), "acc", True)
    two = verdict(4, 0, describe([0.5, -0.0]), "accuracy", True, fraction=True)  # an interval past +-100 points
    assert "at 2 seeds" in two and "12.7 standard errors" in two and "add seeds" in two
    assert "no uncertainty available" in verdict(4, 0, describe([0.02]), "accuracy", True)


def test_tau_star_never_rests_on_fewer_seeds():
    from headprep_hf.sweep import select_tau_star

    rows = [
        {"tau": 0, "seeds": [1, 2, 3], "validation": describe([0.90, 0.91, 0.92])},
        {"tau": 2, "seeds": [1, 2, 3], "validation": describe([0.99, None, 0.98])},  # one seed diverged
    ]
    assert select_tau_star(rows, greater_is_better=True) == 0


def test_two_seed_sweep_equals_two_single_seed_sweeps_and_its_statistics(tmp_path, data):
    both = _sweep(tmp_path / "both", data, [3, 7]).run()
    singles = {seed: _sweep(tmp_path / f"s{seed}", data, [seed]).run() for seed in (3, 7)}
    for entry in both["results"]:
        single = next(r for r in singles[entry["seed"]]["results"] if r["tau"] == entry["tau"])
        assert {k: v for k, v in entry.items() if k != "train_runtime"} == {
            k: v for k, v in single.items() if k != "train_runtime"
        }
        a = load_file(str(tmp_path / "both" / entry["output_dir"] / "model.safetensors"))
        b = load_file(str(tmp_path / f"s{entry['seed']}" / single["output_dir"] / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the seeds draw different heads: the tau = 0 jobs start from different energies
    energies = [r["energy"] for r in both["results"] if r["tau"] == 0]
    assert energies[0] != energies[1]
    # per-tau statistics are those of numpy/scipy over the per-seed values
    for row in both["per_tau"]:
        values = [r["validation"]["accuracy"] for r in both["results"] if r["tau"] == row["tau"]]
        mean, std = np.mean(values), np.std(values, ddof=1)
        half = stats.t.ppf(0.975, 1) * std / np.sqrt(2)
        assert row["validation"]["mean"] == pytest.approx(mean) and row["validation"]["std"] == pytest.approx(std)
        assert row["validation"]["ci95"] == pytest.approx([mean - half, mean + half])
        assert row["energy"]["values"] == [r["energy"] for r in both["results"] if r["tau"] == row["tau"]]
    best = max(both["per_tau"], key=lambda r: (r["validation"]["mean"], -r["tau"]))
    assert both["tau_star"] == best["tau"] and both["seeds"] == [3, 7]
    validate_sweep(json.loads((tmp_path / "both" / "sweep.json").read_text()))
    table = format_table(both)
    assert "+-" in table and "over 2 seeds" in table and f"tau* = {both['tau_star']}" in table


def test_adding_a_seed_runs_only_the_new_jobs(tmp_path, data):
    first = _sweep(tmp_path / "s", data, [3]).run()
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*.safetensors")}
    grown = _sweep(tmp_path / "s", data, [3, 7]).run()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # seed 3's snapshots and models untouched
    assert [r for r in grown["results"] if r["seed"] == 3] == first["results"]
    assert sorted((r["tau"], r["seed"]) for r in grown["results"]) == [(0, 3), (0, 7), (2, 3), (2, 7)]
    assert grown["complete"] and grown["comparisons"]["vs_first"] is not None
    # Going back to fewer seeds, or running one shard into the folder, replaced the complete sweep.json (its tau*
    # and statistics over both seeds) with the subset's: refused before anything runs.
    before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    for overrides in ({}, {"sweep_shard": "0/2"}):
        seeds = [3] if not overrides else [3, 7]
        with pytest.raises(ValueError, match=r"holds the results of \d job\(s\) this run does not cover \(tau="):
            _sweep(tmp_path / "s", data, seeds, **overrides).run()
    assert {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()} == before


def test_a_seed_added_to_a_sharded_sweep_as_the_readme_says(tmp_path, data):
    """README: add a seed to each shard's rerun, then merge; positions shift, so each shard reruns a job another had
    finished, and the merge is the full sweep. The check against running fewer jobs refused the shard's rerun (its
    earlier sweep.json held a job now at the other shard's position), and the merge's advice was that rerun."""
    from headprep_hf import merge_sweeps

    for name, shard in (("a", "0/2"), ("b", "1/2")):
        _sweep(tmp_path / name, data, [3], sweep_shard=shard).run()
    for name, shard in (("a", "0/2"), ("b", "1/2")):
        grown = _sweep(tmp_path / name, data, [3, 7], sweep_shard=shard).run()
        assert {(r["tau"], r["seed"]) for r in grown["results"]} == set(grown_jobs := _shard_jobs(shard, [3, 7]))
        assert len(grown_jobs) == 2
    merged = merge_sweeps([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    full = _sweep(tmp_path / "full", data, [3, 7]).run()
    assert merged["complete"] and merged["tau_star"] == full["tau_star"]
    assert [(r["tau"], r["seed"], r["validation"]) for r in merged["results"]] == [
        (r["tau"], r["seed"], r["validation"]) for r in full["results"]
    ]
    # the shard of another count, or fewer seeds, is still refused
    with pytest.raises(ValueError, match=r"this run does not cover"):
        _sweep(tmp_path / "a", data, [3], sweep_shard="0/2").run()


def test_a_sweep_is_not_continued_or_merged_with_another_compute_metrics(tmp_path, data):
    """The fingerprint does not hold compute_metrics: a sweep continued with a seed added and "accuracy" redefined as
    the error rate reused the first seed's jobs and averaged both definitions into one tau*, without a word."""
    from headprep_hf import merge_sweeps

    accuracy = accuracy_metrics()

    def error_rate(prediction):
        out = accuracy(prediction)
        return {**out, "accuracy": 1 - out["accuracy"]}

    _sweep(tmp_path / "s", data, [3]).run()
    before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"sweep.json was evaluated with another compute_metrics \(.*error_rate"):
        _sweep(tmp_path / "s", data, [3, 7], metrics=error_rate).run()
    assert {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()} == before
    grown = _sweep(tmp_path / "s", data, [3, 7]).run()  # the same function (another instance) continues it
    assert grown["complete"] and "accuracy_metrics" in grown["evaluation"]["compute_metrics"]

    # A function that keeps state (a call counter) is described as the sweep found it: the same code continues.
    class Counting:
        def __init__(self):
            self.calls = 0

        def __call__(self, prediction):
            self.calls += 1
            return accuracy(prediction)

    _sweep(tmp_path / "c", data, [3], metrics=Counting()).run()
    assert _sweep(tmp_path / "c", data, [3, 7], metrics=Counting()).run()["complete"]
    _sweep(tmp_path / "a", data, [3], sweep_shard="0/2").run()
    _sweep(tmp_path / "b", data, [3], sweep_shard="1/2", metrics=error_rate).run()
    with pytest.raises(ValueError, match="they were evaluated with other compute_metrics"):
        merge_sweeps([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")


def _shard_jobs(shard, seeds):
    index, count = map(int, shard.split("/"))
    jobs = [(tau, seed) for tau in (0, 2) for seed in seeds]
    return [job for p, job in enumerate(jobs) if p % count == index]


def test_format_1_sweep_files_still_load():
    old = {
        "format_version": 1,
        "taus": [0, 2],
        "selection_metric": "accuracy",
        "greater_is_better": True,
        "tau_star": 2,
        "results": [
            {"tau": t, "energy": e, "hp_train_accuracy": a, "p0_mean": 0.5, "validation": {"accuracy": v},
             "test": None, "drift": None, "head_grad_norm": [], "p0_histogram": {"edges": [0, 1], "counts": [4]},
             "output_dir": "x"}
            for t, e, a, v in ((0, 0.8, 0.3, 0.9), (2, 0.2, 0.9, 0.95))
        ],
        "summary": {"HP0-FT": None, "HPmax-FT": None, "HPtau*-FT": None},
    }  # fmt: skip
    upgraded = upgrade_sweep(old)
    assert [row["validation"]["mean"] for row in upgraded["per_tau"]] == [0.9, 0.95]
    assert "one seed: no uncertainty available" in format_table(old)


class LinearNet(nn.Module):
    """The paper's linear setting: a linear backbone and a linear head (`fc`), float targets."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 1)

    def forward(self, x):
        return self.fc(self.backbone(x))


class Linear(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i : i + 1]}


def test_regression_sweep_picks_tau_star_by_rmse_and_draws_its_plots(tmp_path):
    data = (Linear(48, 0), Linear(24, 1), Linear(24, 2))
    sweep = _sweep(
        tmp_path / "r", data, [0, 1], model_fn=LinearNet, metrics=graph_metrics("regression"),
        problem_type="regression", sweep_metric="rmse", sweep_report=True, hp_learning_rate=0.05,
    ).run()  # fmt: skip
    assert sweep["greater_is_better"] is False and sweep["complete"]
    best = min(sweep["per_tau"], key=lambda r: (r["validation"]["mean"], r["tau"]))
    assert sweep["tau_star"] == best["tau"]
    assert all(r["hp_train_accuracy"] is None and r["p0_mean"] is None and r["energy"] > 0 for r in sweep["results"])
    plots = sorted(p.name for p in (tmp_path / "r" / "plots").iterdir())
    assert "hp_accuracy_energy_vs_tau.png" in plots and "ft_metric_vs_tau.png" in plots


def test_cached_sweep_takes_the_ft_energy_from_the_cache_exactly(tmp_path, data, monkeypatch):
    """No FT job of a cached sweep runs a backbone pass for its energy; the values equal the backbone pass's."""
    from headprep_hf import HeadPrepConfig, HeadPrepTrainer
    from headprep_hf.measurements import MeasurementCallback

    passes = []
    original = MeasurementCallback._energy_pass
    monkeypatch.setattr(MeasurementCallback, "_energy_pass", lambda self: passes.append(1) or original(self))
    sweep = _sweep(tmp_path / "c", data, [5], hp_cache_features=True).run()
    assert passes == [] and len(sweep["results"]) == 2
    monkeypatch.setattr(MeasurementCallback, "_energy_pass", original)
    for entry in sweep["results"]:
        dynamics = json.loads((tmp_path / "c" / entry["output_dir"] / "headprep_dynamics.json").read_text())
        assert dynamics["energy_source"] == "cached head inputs"
        # the reference: the same prepared model measured with the backbone pass
        model = tiny_timm()
        from headprep_hf.heads import reinitialize_head
        from headprep_hf.split import find_split

        reinitialize_head(model, find_split(model), 5)
        snapshot = load_file(str(tmp_path / "c" / "heads" / "seed_5" / f"tau_{entry['tau']}.safetensors"))
        model.load_state_dict(snapshot, strict=False)
        args = HeadPrepConfig(**{**COMMON, "output_dir": str(tmp_path / "ref"), "hp_epochs": 0, "seed": 5})
        reference = HeadPrepTrainer(model=model, args=args, train_dataset=data[0])
        measured = reference.measure_start()
        assert reference.dynamics["energy_source"] == "backbone pass"
        assert entry["energy"] == pytest.approx(measured["energy"], rel=1e-6)
        assert entry["hp_train_accuracy"] == pytest.approx(measured["hp_train_accuracy"], rel=1e-6)
        assert entry["p0_mean"] == pytest.approx(measured["p0_mean"], rel=1e-6)


def _job(tau, seed, value, metric="accuracy"):
    """A hand-made FT job result (what `TauSweep.finetune_from` returns) with validation `metric` = `value`."""
    return {
        "tau": tau, "seed": seed, "hp_train_accuracy": 0.5, "energy": 1.0, "p0_mean": 0.5,
        "p0_histogram": {"edges": [0, 0.5, 1], "counts": [1, 1]}, "drift": None, "validation": {metric: value},
        "test": None, "head_grad_norm": [], "output_dir": f"tau_{tau}/seed_{seed}",
    }  # fmt: skip


def _assemble(jobs, seeds, metric="accuracy", greater_is_better=True, taus=(0, 2, 4)):
    from headprep_hf.sweep import assemble_sweep

    return assemble_sweep(
        results=jobs,
        taus=list(taus),
        seeds=seeds,
        metric=metric,
        greater_is_better=greater_is_better,
        hp={"cached_features": False, "seeds": {}},
        fingerprint={"taus": list(taus), "model": "m", "config": "c", "seeded_heads": True},
        shard=None,
    )


def test_equal_means_in_another_seed_order_are_a_tie_for_the_smallest_tau():
    # 0.7 + 0.6 + 0.8 and 0.8 + 0.7 + 0.6 differ in the last bit when summed left to right
    values = {0: (0.7, 0.6, 0.8), 2: (0.8, 0.7, 0.6), 4: (0.5, 0.5, 0.5)}
    jobs = [_job(t, s, v) for t, vs in values.items() for s, v in zip((1, 2, 3), vs)]
    sweep = _assemble(jobs, [1, 2, 3])
    assert sweep["per_tau"][0]["validation"]["mean"] == sweep["per_tau"][1]["validation"]["mean"]
    assert sweep["tau_star"] == 0 and sweep["tau_star_note"] is None
    values = {0: (0.3, 0.2, 0.1), 2: (0.1, 0.2, 0.3), 4: (0.0, 0.0, 0.0)}
    jobs = [_job(t, s, v) for t, vs in values.items() for s, v in zip((1, 2, 3), vs)]
    assert _assemble(jobs, [1, 2, 3])["tau_star"] == 0


def test_tau_star_when_every_tau_lost_a_seed_to_nan():
    nan = float("nan")
    values = {0: (nan, 0.5, 0.5), 2: (0.9, nan, 0.9), 4: (0.95, 0.95, nan)}
    jobs = [_job(t, s, v) for t, vs in values.items() for s, v in zip((1, 2, 3), vs)]
    sweep = _assemble(jobs, [1, 2, 3])
    assert sweep["tau_star"] == 4  # the best mean among the taus with the most (2) finite seeds, not taus[0]
    assert "finite for 2 of 3 seeds" in sweep["tau_star_note"]
    assert "finite for 2 of 3 seeds" in format_table(sweep)
    # a tau with fewer finite seeds than the others is left out, and the note names it
    values = {0: (0.5, 0.5, 0.5), 2: (0.9, nan, nan), 4: (0.6, 0.6, 0.6)}
    jobs = [_job(t, s, v) for t, vs in values.items() for s, v in zip((1, 2, 3), vs)]
    sweep = _assemble(jobs, [1, 2, 3])
    assert sweep["tau_star"] == 4 and "left out: tau = 2 (1 of 3)" in sweep["tau_star_note"]


def test_a_metric_nan_at_every_tau_gives_no_tau_star_and_strict_json():
    nan = float("nan")
    sweep = _assemble([_job(t, 1, nan, "roc_auc") for t in (0, 2, 4)], [1], metric="roc_auc")
    assert sweep["complete"] and sweep["tau_star"] is None
    assert "roc_auc" in sweep["tau_star_note"] and "every tau" in sweep["tau_star_note"]
    assert sweep["summary"]["HPtau*-FT"] is None and sweep["summary"]["HP0-FT"]["validation"] is None
    table = format_table(sweep)  # no crash on the null means
    assert "tau* not chosen" in table and "roc_auc" in table
    validate_sweep(sweep)

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in sweep.json"))

    assert strict(json.dumps(sweep))["results"][0]["validation"]["roc_auc"] is None
    # a NaN seed is in neither the paired statistics nor their seeds
    values = {0: (nan, 0.5, 0.5), 2: (0.9, 0.9, 0.9), 4: (0.95, 0.96, 0.97)}
    sweep = _assemble([_job(t, s, v) for t, vs in values.items() for s, v in zip((1, 2, 3), vs)], [1, 2, 3])
    strict(json.dumps(sweep))
    difference = sweep["comparisons"]["vs_first"]["validation"]
    assert difference["n"] == 2 and difference["seeds"] == [2, 3]
    difference = paired_difference({1: nan, 2: 0.9, 3: 0.8}, {1: 0.5, 2: 0.5, 3: float("inf")})
    assert difference["n"] == 1 and difference["seeds"] == [2]


def test_a_guessed_metric_direction_is_logged_once(tmp_path, caplog):
    import logging

    values = {**COMMON, "output_dir": str(tmp_path), "sweep_metric": "guessed_rmse"}
    with caplog.at_level(logging.INFO, logger="headprep_hf.replicates"):
        assert SweepConfig(**values).selection_greater_is_better is False
        assert SweepConfig(**values).selection_greater_is_better is False
        assert SweepConfig(**values, sweep_greater_is_better=True).selection_greater_is_better is True
    logged = [r.getMessage() for r in caplog.records if "guessed_rmse" in r.getMessage()]
    assert len(logged) == 1 and "lower is better, guessed from its name" in logged[0]


@pytest.mark.parametrize(
    "metric, lower",
    [("rmse_mean", True), ("loss_avg", True), ("mae_macro", True), ("mse_weighted", True), ("error_mean", True),
     ("error_rate", True), ("word_error_rate", True), ("top1_err", True), ("cross_entropy", True),
     ("neg_mean_squared_error", False), ("neg_log_loss", False), ("eval_neg_log_loss", False),
     ("eval_loss", True), ("nll_mean", True), ("accuracy", False), ("f1_macro", False), ("mean_iou", False),
     ("brier_score", True), ("perplexity", True), ("negative_recall", False), ("neg_precision", False)],
)  # fmt: skip
def test_a_metrics_direction_is_read_past_qualifiers_and_negations(metric, lower):
    """Qualifiers were skipped for some lower-is-better words only: `rmse_mean` and `error_rate` were taken as
    larger-is-better (tau* the worst tau, with a warning); scikit-learn's `neg_mean_squared_error` as smaller-is-better
    (an info line only)."""
    from headprep_hf.replicates import _known_direction, lower_is_better

    assert lower_is_better(metric) is lower and _known_direction(metric)


def test_verdicts_read_shares_in_points_and_other_metrics_in_their_own_units():
    # Every metric whose name is not a loss or an error was read as a share: a perplexity 0.52 lower printed as
    # "51.67 points", and a clear RMSE difference of 0.0039 (interval width 0.0005) as "0.00 +- 0.00".
    def verdict_of(values, metric, greater_is_better):
        # (the test values: the validation ones chose tau*, and their comparison gives no verdict)
        jobs = [_job(t, s, v, metric) for t, vs in values.items() for s, v in zip((1, 2, 3), vs)]
        jobs = [{**job, "test": job["validation"]} for job in jobs]
        sweep = _assemble(jobs, [1, 2, 3], metric=metric, greater_is_better=greater_is_better)
        return sweep["comparisons"]["vs_first"]["test_verdict"]

    perplexity = verdict_of({0: (12.1, 12.6, 12.4), 2: (11.5, 12.1, 11.9), 4: (13, 13, 13)}, "perplexity", False)
    assert "beats tau = 0 by 0.533 +- " in perplexity and "points" not in perplexity
    rmse = verdict_of({0: (0.0131, 0.0133, 0.0129), 2: (0.0092, 0.0093, 0.0091), 4: (0.02,) * 3}, "rmse", False)
    assert "beats tau = 0 by 0.0039 +- 0.000" in rmse
    psnr = verdict_of({0: (20.0, 21.0, 22.0), 2: (20.5, 21.4, 22.6), 4: (1.0,) * 3}, "psnr", True)
    assert "by 0.5 +- " in psnr and "points" not in psnr
    accuracy = verdict_of({0: (0.60, 0.62, 0.61), 2: (0.70, 0.73, 0.71), 4: (0.5,) * 3}, "accuracy", True)
    assert "beats tau = 0 by 10.33 +- " in accuracy and "points of test accuracy" in accuracy


def test_without_a_test_set_tau_star_gets_no_verdict_on_the_values_it_was_chosen_on():
    """Simulated null sweeps (7 equal taus, no test set) printed "tau* beats tau = 0" in 8-9% of them where the 95%
    interval claims 2.5%: tau* is the best of the grid on those very values. The difference and its interval are
    given, as biased, with no verdict."""
    values = {0: (0.60, 0.62, 0.61), 2: (0.70, 0.73, 0.71), 4: (0.5,) * 3}
    jobs = [_job(t, s, v) for t, vs in values.items() for s, v in zip((1, 2, 3), vs)]
    sweep = _assemble(jobs, [1, 2, 3])
    said = sweep["comparisons"]["vs_first"]["validation_verdict"]
    assert "beats" not in said and "Biased in tau*'s favour, so not a test of it" in said
    assert "difference +10.33 points" in said and "(3 seeds)" in said
    from headprep_hf.sweep import format_table

    assert said in format_table(sweep)


def test_each_statistic_names_the_seeds_of_its_values():
    # A seed whose value is NaN was dropped from `values` while the row's `seeds` listed every seed: read by
    # position, seed 2 got seed 3's value.
    nan = float("nan")
    values = {0: (0.6, nan, 0.9), 2: (0.7, 0.8, 0.9), 4: (0.5, 0.5, 0.5)}
    sweep = _assemble([_job(t, s, v) for t, vs in values.items() for s, v in zip((1, 2, 3), vs)], [1, 2, 3])
    row = sweep["per_tau"][0]
    assert row["seeds"] == [1, 2, 3]
    assert row["validation"]["seeds"] == [1, 3] and row["validation"]["values"] == [0.6, 0.9]
    assert row["energy"]["seeds"] == [1, 2, 3]
    validate_sweep(sweep)


def test_a_replicated_sweep_with_one_finite_seed_is_not_told_to_run_seeds():
    nan = float("nan")
    values = {0: (0.6, nan, nan), 2: (nan, 0.8, nan), 4: (nan, nan, 0.5)}
    table = format_table(_assemble([_job(t, s, v) for t, vs in values.items() for s, v in zip((1, 2, 3), vs)],
                                   [1, 2, 3]))  # fmt: skip
    assert "at most one of the 3 seeds has a finite validation accuracy" in table
    assert "one seed: no uncertainty available (sweep_seeds" not in table


def test_a_sweep_of_one_named_seed_is_told_to_give_two_or_more():
    table = format_table(_assemble([_job(t, 42, 0.5 + t / 10) for t in (0, 2, 4)], [42]))
    assert "one seed (42): no uncertainty available (sweep_seeds with two or more seeds replicates it)." in table


def test_means_over_fewer_seeds_say_so_and_small_values_keep_their_digits():
    """A seed's test value NaN at tau*: the summary's test mean was over 2 seeds while the table said 3 (and HP0-FT's
    over 3: two seed sets compared). And an MSE of 1e-5 printed as 0.0000 at every tau, all looking tied."""
    from headprep_hf.sweep import format_table

    nan = float("nan")
    jobs = []
    for tau, (val, test) in {
        0: ((0.6, 0.62, 0.61), (0.5, 0.55, 0.6)),
        2: ((0.7, 0.73, 0.71), (0.7, nan, 0.8)),
    }.items():
        for seed, v, t in zip((1, 2, 3), val, test):
            jobs.append({**_job(tau, seed, v), "test": {"accuracy": t}})
    sweep = _assemble(jobs, [1, 2, 3], taus=(0, 2))
    assert sweep["summary"]["HPtau*-FT"]["n"] == 3 and sweep["summary"]["HPtau*-FT"]["n_test"] == 2
    validate_sweep(sweep)
    table = format_table(sweep)
    assert "over fewer seeds (a value missing or not finite): tau=2 test n=2" in table
    assert "HP0-FT 0.5500  HPmax-FT 0.7500 (n=2)  HPtau*-FT 0.7500 (n=2)" in table
    tiny = {0: (4.2e-05, 4.0e-05, 4.4e-05), 2: (1.15e-05, 1.2e-05, 1.1e-05)}
    jobs = [_job(t, s, v, "mse") for t, vs in tiny.items() for s, v in zip((1, 2, 3), vs)]
    table = format_table(_assemble(jobs, [1, 2, 3], metric="mse", greater_is_better=False, taus=(0, 2)))
    assert "4.2e-05 +- 2e-06" in table and "1.15e-05 +- 5e-07" in table
    assert "HP0-FT 4.2e-05  HPmax-FT 1.15e-05" in table  # (the energy's std is exactly 0 here: 0.0000 as before)


def test_a_toy_sweep_recorded_with_no_aug_is_not_continued_without_augmentation():
    """--no_aug did nothing on the toy task until it turned the toy's augmentation off: a toy sweep recorded with it
    ran augmented and must not be continued without (its fingerprint differs now). Other records keep theirs."""
    from headprep_hf.sweep import _task_args

    toy = {"name": "image-classification", "args": {"no_aug": True, "train_dir": None, "dataset_name": None}}
    assert _task_args(toy)["args"]["no_aug"] == "toy augmentation off"
    real = {"name": "image-classification", "args": {"no_aug": True, "train_dir": "/data/train", "dataset_name": None}}
    assert _task_args(real)["args"]["no_aug"] is True
    added = {"name": "image-classification", "args": {"energy_on_eval_transform": False, "train_dir": "/d/train"}}
    assert "energy_on_eval_transform" not in _task_args(added)["args"]  # (recorded before it existed: the same)


def test_a_written_sweep_is_read_back_with_this_versions_tau_star_and_verdicts(tmp_path, caplog):
    """A format-2 sweep.json of an earlier version was shown with its own tau* and verdicts: a validation "beats" on
    the values tau* was chosen on, and a tau* = taus[0] when every tau had lost a seed. They are derived again."""
    from headprep_hf.replicates import verdict
    from headprep_hf.sweep import load_sweep

    values = {0: (0.90, 0.904, 0.902), 2: (0.95, 0.958, 0.954), 4: (0.93, 0.935, 0.932)}
    sweep = _assemble([_job(t, s, v) for t, vs in values.items() for s, v in zip((1, 2, 3), vs)], [1, 2, 3])
    old = json.loads(json.dumps(sweep))
    comparison = old["comparisons"]["vs_first"]
    comparison["validation_verdict"] = verdict(2, 0, comparison["validation"], "validation accuracy", True, True)
    assert comparison["validation_verdict"].startswith("tau* = 2 beats tau = 0")  # (the earlier versions' sentence)
    (tmp_path / "sweep.json").write_text(json.dumps(old))
    loaded = load_sweep(tmp_path)
    assert "it was chosen on" in loaded["comparisons"]["vs_first"]["validation_verdict"]
    assert "beats" not in format_table(loaded)
    nan = float("nan")
    values = {0: (nan, 0.90, 0.91), 2: (0.93, nan, 0.94), 4: (0.92, 0.93, nan)}
    sweep = _assemble([_job(t, s, v) for t, vs in values.items() for s, v in zip((1, 2, 3), vs)], [1, 2, 3])
    assert sweep["tau_star"] == 2
    old = json.loads(json.dumps(sweep))
    old["tau_star"], old["tau_star_note"] = 0, None  # the earlier rule: every tau ranked last, so the first
    (tmp_path / "sweep.json").write_text(json.dumps(old))
    with caplog.at_level("WARNING"):
        loaded = load_sweep(tmp_path)
    assert loaded["tau_star"] == 2 and "finite for 2 of 3 seeds" in loaded["tau_star_note"]
    assert "records tau* = 0" in caplog.text and "results give tau* = 2" in caplog.text
    assert loaded["comparisons"] == sweep["comparisons"] and loaded["per_tau"] == sweep["per_tau"]
    assert json.loads((tmp_path / "sweep.json").read_text())["tau_star"] == 0  # the file is not changed
    caplog.clear()
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    with caplog.at_level("WARNING"):
        assert load_sweep(tmp_path) == json.loads(json.dumps(sweep))  # this version's own file reads back as it is
    assert "records tau*" not in caplog.text


def test_a_paired_difference_without_spread_gives_no_verdict():
    # +1 test image of 300 on each of 2 seeds: the differences are equal up to rounding (std ~1e-16), the t-interval
    # a point, and the verdict read "tau* = 4 beats tau = 0 by 0.33 +- 0.00 points".
    jobs = []
    for tau, extra in ((0, 0), (4, 1)):
        for seed, (val, base) in zip((1, 2), ((0.90, 270), (0.94, 282))):
            jobs.append({**_job(tau, seed, val + tau / 100), "test": {"accuracy": (base + extra) / 300}})
    sweep = _assemble(jobs, [1, 2], taus=(0, 4))
    difference = sweep["comparisons"]["vs_first"]["test"]
    assert difference["std"] < 1e-12 and difference["mean"] == pytest.approx(1 / 300)
    text = sweep["comparisons"]["vs_first"]["test_verdict"]
    assert "beats" not in text and "every one of the 2 seeds gives the same difference, +0.33 points" in text
    assert "no verdict" in text
    # a real spread still gives the verdict
    jobs = [{**j, "test": {"accuracy": j["test"]["accuracy"] + (0.0005 if j["seed"] == 2 and j["tau"] == 4 else 0)}}
            for j in jobs]  # fmt: skip
    assert "beats" in _assemble(jobs, [1, 2], taus=(0, 4))["comparisons"]["vs_first"]["test_verdict"]


def test_the_table_counts_the_seeds_run_and_says_which_views_the_energy_saw():
    # One seed NaN on validation at every tau: the header said "over 2 seeds: [1, 2, 3]" beside energies over 3, and
    # the summary's means over 2 seeds were not flagged.
    nan = float("nan")
    jobs = [
        {**_job(t, s, nan if s == 3 else 0.5 + t / 10 + s / 100), "energy_views": "eval transform"}
        for t in (0, 2, 4)
        for s in (1, 2, 3)
    ]
    jobs[0]["energy"] = None  # tau = 0, seed 1: no energy
    table = format_table(_assemble(jobs, [1, 2, 3]))
    assert "(mean +- standard deviation over 3 seeds: [1, 2, 3])" in table
    assert "tau=0 energy n=2, tau=0 validation n=2, tau=2 validation n=2" in table
    assert "HP-acc n=" not in table  # (HP-acc is over the 3 seeds everywhere)
    assert "HP0-FT 0.5150 (n=2)" in table
    assert "(energy and HP-acc at the start of FT, on the training set through the eval transform)" in table
    jobs = [{**j, "energy_views": "as training reads them"} for j in jobs]
    assert "on the training set as training reads it (augmentation included)" in format_table(
        _assemble(jobs, [1, 2, 3])
    )
    jobs = [{k: v for k, v in j.items() if k != "energy_views"} for j in jobs]  # written before it was recorded
    assert "which views of the training set is not recorded" in format_table(_assemble(jobs, [1, 2, 3]))


def test_a_shards_table_counts_the_seeds_it_holds():
    # The header counts the seeds the sweep ran only for a complete sweep: a shard holds part of the jobs by design,
    # and said "over 2 seeds" with every mean over one, all flagged "over fewer seeds (a value missing or not finite)".
    from headprep_hf.sweep import assemble_sweep

    jobs = [_job(t, s, 0.5 + t / 10) for t, s in ((0, 1), (2, 2), (4, 1))]
    shard = assemble_sweep(
        results=jobs, taus=[0, 2, 4], seeds=[1, 2], metric="accuracy", greater_is_better=True,
        hp={"cached_features": False, "seeds": {}}, fingerprint={"taus": [0, 2, 4], "model": "m", "config": "c"},
        shard={"index": 0, "count": 2},
    )  # fmt: skip
    table = format_table(shard)
    assert not shard["complete"] and "over fewer seeds" not in table and "over 2 seeds" not in table
    assert "results for 3 of 6 (tau, seed) jobs" in table
