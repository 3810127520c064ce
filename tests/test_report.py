"""`write_report`: figures of a tau sweep from hand-made `sweep.json` / `exchange.json` files (no training)."""

from __future__ import annotations

import json
import math
import os
import stat

import jsonschema
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from headprep_hf.report import _plot_metric_vs_tau, write_report  # noqa: E402
from headprep_hf.sweep_schema import validate_exchange, validate_sweep  # noqa: E402

TAUS = [0, 1, 2, 4, 8]
VALIDATION = {0: 0.90, 1: 0.93, 2: 0.95, 4: 0.94, 8: 0.92}
BASE_FILES = [
    "ft_metric_vs_tau.png",
    "hp_accuracy_energy_vs_tau.png",
    "drift_vs_tau.png",
    "p0_histograms.png",
    "head_grad_norm.png",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_result(tau: int, num_classes: int = 10, samples: int = 500) -> dict:
    """A plausible FT result after `tau` HP epochs: the longer HP, the higher p0 and the lower energy and drift."""
    hp_accuracy = 1 - 0.9 * math.exp(-tau / 2)  # 0.1 (chance) at tau = 0
    p0_mean = 1 / num_classes + (0.85 - 1 / num_classes) * (1 - math.exp(-tau / 2))
    # p0 histogram: a bump around p0_mean over 20 bins of [0, 1]
    weights = [math.exp(-(((i + 0.5) / 20 - p0_mean) ** 2) / 0.01) for i in range(20)]
    counts = [int(samples * w / sum(weights)) for w in weights]
    counts[min(int(p0_mean * 20), 19)] += samples - sum(counts)
    sq_dist = 40.0 * math.exp(-tau / 3) + 2.0
    sq_norm = 100.0 + 0.5 * sq_dist
    dot = (sq_norm + 100.0 - sq_dist) / 2
    return {
        "tau": tau,
        "hp_train_accuracy": hp_accuracy,
        "energy": math.sqrt(2) * (1 - p0_mean),  # ||e_y - p_0|| when the rest of the mass sits on one class
        "p0_mean": p0_mean,
        "p0_histogram": {"edges": [i / 20 for i in range(21)], "counts": counts},
        "drift": {
            "sq_dist": sq_dist,
            "dot": dot,
            "sq_norm": sq_norm,
            "cos": dot / math.sqrt(sq_norm * 100.0),
            "step": 300,
            "epoch": 3.0,
        },
        "validation": {"accuracy": VALIDATION.get(tau, 0.9), "loss": 1.0 - VALIDATION.get(tau, 0.9)},
        "test": {"accuracy": VALIDATION.get(tau, 0.9) - 0.01, "loss": 1.01 - VALIDATION.get(tau, 0.9)},
        "head_grad_norm": [
            {"step": step, "epoch": step / 100, "value": 2.0 * math.exp(-tau / 4) * (1 + 10 / step) + 0.05}
            for step in range(10, 301, 10)
        ],
        "output_dir": f"ft/tau_{tau}",
        "train_runtime": 12.5,
    }


def make_sweep(taus=TAUS, result_taus=None, tau_star=2, shard=None) -> dict:
    """A `sweep.json` over `taus` with results for `result_taus` (all by default)."""
    result_taus = taus if result_taus is None else result_taus
    results = [make_result(t) for t in result_taus]

    def row(tau):
        return {"tau": tau, "validation": VALIDATION.get(tau, 0.9), "test": VALIDATION.get(tau, 0.9) - 0.01}

    summary = {"HP0-FT": None, "HPmax-FT": None, "HPtau*-FT": None}
    if 0 in result_taus:
        summary["HP0-FT"] = row(0)
    if max(taus) in result_taus:
        summary["HPmax-FT"] = row(max(taus))
    if tau_star is not None:
        summary["HPtau*-FT"] = row(tau_star)
    return {
        "format_version": 1,
        "headprep_version": "0.1.0",
        "taus": list(taus),
        "selection_metric": "accuracy",
        "greater_is_better": True,
        "tau_star": tau_star,
        "complete": list(result_taus) == list(taus),
        "results": results,
        "summary": summary,
        "hp": {
            "cached_features": True,
            "cache_views": 1,
            "runtime": 30.0,
            "snapshots": {str(t): f"hp/head_tau_{t}.safetensors" for t in taus},
        },
        "fingerprint": {"taus": list(taus), "model": "test_resnet", "config": "0123abcd"},
        "shard": shard,
        "task": {"name": "tiny", "args": {}},
        "settings": {"ft_epochs": 3},
    }


def make_exchange(taus=TAUS) -> dict:
    """An `exchange.json` measured for `make_sweep(taus)` (its sweep_fingerprint)."""
    from headprep_hf.sweep import _fingerprint_tag

    n = len(taus)
    train = [[0.99 - 0.02 * abs(i - j) for j in range(n)] for i in range(n)]
    validation = [[0.95 - 0.03 * abs(i - j) - 0.01 * i for j in range(n)] for i in range(n)]
    return {
        "taus": list(taus),
        "sweep_fingerprint": _fingerprint_tag(make_sweep(taus)["fingerprint"]),
        "rows": "backbone",
        "columns": "head",
        "train_accuracy": train,
        "validation_accuracy": validation,
    }


def write_json(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def assert_pngs(paths, folder, names) -> None:
    assert paths == [folder / name for name in names]
    for path in paths:
        content = path.read_bytes()
        assert content.startswith(PNG_SIGNATURE), path
        assert len(content) > 5_000, (path, len(content))
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temporary file left behind


def test_fixtures_follow_the_schema():
    validate_sweep(make_sweep())
    validate_sweep(make_sweep(result_taus=[1, 4], tau_star=None, shard={"index": 1, "count": 2}))
    validate_exchange(make_exchange())


def test_writes_the_five_figures(tmp_path):
    write_json(tmp_path / "sweep.json", make_sweep())
    paths = write_report(tmp_path)
    assert_pngs(paths, tmp_path / "plots", BASE_FILES)
    assert not (tmp_path / "plots" / "exchange_heatmap.png").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(paths[0].stat().st_mode) == 0o666 & ~umask  # not the 0600 of a private temporary file
    assert plt.get_fignums() == []


def test_exchange_heatmap_only_with_exchange_json(tmp_path):
    write_json(tmp_path / "sweep.json", make_sweep())
    write_json(tmp_path / "exchange.json", make_exchange())
    out = tmp_path / "figures" / "nested"
    paths = write_report(str(tmp_path), output_dir=str(out))
    assert_pngs(paths, out, BASE_FILES + ["exchange_heatmap.png"])
    assert not (tmp_path / "plots").exists()


def test_exchange_of_the_wrong_shape_still_plots(tmp_path):
    write_json(tmp_path / "sweep.json", make_sweep())
    exchange = make_exchange()
    exchange["validation_accuracy"] = exchange["validation_accuracy"][:-1]
    exchange["train_accuracy"][0] = exchange["train_accuracy"][0][:2]
    write_json(tmp_path / "exchange.json", exchange)
    assert_pngs(write_report(tmp_path), tmp_path / "plots", BASE_FILES + ["exchange_heatmap.png"])


def test_overwrites_previous_report(tmp_path):
    write_json(tmp_path / "sweep.json", make_sweep())
    write_report(tmp_path)
    assert_pngs(write_report(tmp_path), tmp_path / "plots", BASE_FILES)


def test_missing_sweep_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sweep\.json.*headprep sweep"):
        write_report(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_invalid_sweep_raises_before_writing(tmp_path):
    data = make_sweep()
    data["results"][2]["hp_train_accuracy"] = 1.5  # accuracy above 1
    write_json(tmp_path / "sweep.json", data)
    with pytest.raises(jsonschema.ValidationError):
        write_report(tmp_path)
    assert not (tmp_path / "plots").exists()

    data = make_sweep()
    del data["results"][0]["p0_histogram"]
    write_json(tmp_path / "sweep.json", data)
    with pytest.raises(jsonschema.ValidationError):
        write_report(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_a_complete_sweep_missing_a_result_is_refused_naming_it(tmp_path):
    # A result removed by hand from a sweep.json still marked complete: the report drew every figure from fewer runs
    # than its statistics said, without a word, and the exchange failed with KeyError.
    data = make_sweep()
    data["results"] = [r for r in data["results"] if r["tau"] != 2]
    write_json(tmp_path / "sweep.json", data)
    with pytest.raises(ValueError, match=r"says the sweep is complete but holds no result for tau=2: it was edited"):
        write_report(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_invalid_exchange_raises_before_writing(tmp_path):
    write_json(tmp_path / "sweep.json", make_sweep())
    exchange = make_exchange()
    exchange["rows"] = "head"
    write_json(tmp_path / "exchange.json", exchange)
    with pytest.raises(jsonschema.ValidationError):
        write_report(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_shard_without_tau_star(tmp_path):
    data = make_sweep(result_taus=[4, 1], tau_star=None, shard={"index": 1, "count": 2})
    data["results"][0]["drift"] = None
    data["results"][0]["test"] = None
    data["results"][1]["validation"]["accuracy"] = None
    write_json(tmp_path / "sweep.json", data)
    assert_pngs(write_report(tmp_path), tmp_path / "plots", BASE_FILES)


def test_single_tau(tmp_path):
    data = make_sweep(taus=[0], tau_star=0)
    data["results"][0]["head_grad_norm"] = []
    data["results"][0]["drift"] = None
    write_json(tmp_path / "sweep.json", data)
    write_json(tmp_path / "exchange.json", make_exchange(taus=[0]))
    assert_pngs(write_report(tmp_path), tmp_path / "plots", BASE_FILES + ["exchange_heatmap.png"])


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    write_json(tmp_path / "sweep.json", make_sweep())

    def broken_savefig(self, fname, **kwargs):
        fname.write(PNG_SIGNATURE + b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path)
    assert list((tmp_path / "plots").iterdir()) == []
    assert plt.get_fignums() == []


def test_tau_star_marker_at_tau_star():
    data = make_sweep()
    fig, ax = plt.subplots()
    try:
        _plot_metric_vs_tau(ax, data)
        stars = [line for line in ax.lines if list(line.get_xdata()) == [2]]
        assert len(stars) == 1
        assert list(stars[0].get_ydata()) == [VALIDATION[2]]
        assert stars[0].get_marker() == "*"
        assert any("= 2" in text.get_text() for text in ax.get_legend().get_texts())
        assert ax.get_xscale() == "symlog"
        assert list(ax.get_xticks()) == TAUS
        assert [label.get_text() for label in ax.get_xticklabels()] == [str(t) for t in TAUS]
        # validation and test curves, sorted by tau
        curves = [line for line in ax.lines if len(line.get_xdata()) == len(TAUS)]
        assert [list(c.get_xdata()) for c in curves] == [TAUS, TAUS]
        assert list(curves[0].get_ydata()) == [VALIDATION[t] for t in TAUS]
    finally:
        plt.close(fig)


def test_no_tau_star_marker_for_a_shard():
    data = make_sweep(result_taus=[1, 4], tau_star=None, shard={"index": 0, "count": 2})
    fig, ax = plt.subplots()
    try:
        _plot_metric_vs_tau(ax, data)
        assert all(line.get_marker() != "*" for line in ax.lines)
        assert all(len(line.get_xdata()) == 2 for line in ax.lines)
        assert list(ax.get_xticks()) == TAUS  # the whole grid, so shards share one axis
    finally:
        plt.close(fig)


def test_dense_grid_leaves_crowded_ticks_unlabelled():
    taus = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 32]
    data = make_sweep(taus=taus, tau_star=2)
    fig, ax = plt.subplots(figsize=(4, 3))
    try:
        _plot_metric_vs_tau(ax, data)
        assert list(ax.get_xticks()) == taus  # every tau keeps its tick
        labels = [label.get_text() for label in ax.get_xticklabels()]
        assert labels[0] == "0" and labels[-1] == "32"
        assert "" in labels
        assert all(text in ("", str(tau)) for text, tau in zip(labels, taus))
    finally:
        plt.close(fig)


def _replicated(jobs, seeds, taus=(0, 2)) -> dict:
    """A format-2 `sweep.json` of hand-made FT jobs `[(tau, seed)]` (validation accuracy 0.9 + tau/100)."""
    from headprep_hf.sweep import assemble_sweep

    results = []
    for tau, seed in jobs:
        result = make_result(tau)
        result.update(seed=seed, validation={"accuracy": 0.9 + tau / 100}, output_dir=f"tau_{tau}/seed_{seed}")
        results.append(result)
    return assemble_sweep(
        results=results,
        taus=list(taus),
        seeds=seeds,
        metric="accuracy",
        greater_is_better=True,
        hp={"cached_features": False, "seeds": {}},
        fingerprint={"taus": list(taus), "model": "m", "config": "c", "seeded_heads": True},
        shard={"index": 0, "count": 2},
    )


def test_part_of_the_jobs_is_said_and_n_per_point_given():
    from headprep_hf.sweep import format_table

    # a shard of a replicated sweep: every tau, but one of the two seeds each
    data = _replicated([(0, 1), (2, 1)], seeds=[1, 2])
    assert "results for 2 of 4 (tau, seed) jobs" in format_table(data)
    fig, ax = plt.subplots()
    try:
        _plot_metric_vs_tau(ax, data)
        assert "results for 2 of 4" in ax.get_title()
        assert ax.get_legend_handles_labels()[1][:2] == [
            "validation accuracy (one seed per point)",
            "test accuracy (one seed per point)",
        ]
    finally:
        plt.close(fig)
    data = _replicated([(0, 1), (0, 2), (2, 1)], seeds=[1, 2])
    fig, ax = plt.subplots()
    try:
        _plot_metric_vs_tau(ax, data)
        assert "results for 3 of 4" in ax.get_title()
        assert ax.get_legend_handles_labels()[1][0] == "validation accuracy (mean +- sd, n = 1-2 seeds per point)"
    finally:
        plt.close(fig)


def test_exchange_of_another_sweep_is_skipped(tmp_path):
    from headprep_hf.sweep import _fingerprint_tag

    sweep = make_sweep()
    write_json(tmp_path / "sweep.json", sweep)
    write_json(
        tmp_path / "exchange.json", {**make_exchange(), "sweep_fingerprint": _fingerprint_tag(sweep["fingerprint"])}
    )
    assert_pngs(write_report(tmp_path), tmp_path / "plots", BASE_FILES + ["exchange_heatmap.png"])
    # the folder now holds another sweep (e.g. rerun with overwrite_output_dir by an earlier version)
    write_json(tmp_path / "sweep.json", {**sweep, "fingerprint": {**sweep["fingerprint"], "config": "other"}})
    assert_pngs(write_report(tmp_path), tmp_path / "plots", BASE_FILES)  # the earlier heatmap is removed too


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda e: e.pop("sweep_fingerprint"), "it records no sweep_fingerprint"),  # written before the field
        (
            lambda e: e.update(taus=[0, 8, 16], train_accuracy=[[0.5] * 3] * 3, validation_accuracy=[[0.5] * 3] * 3),
            "its taus",
        ),  # fmt: skip
    ],
)
def test_an_exchange_not_known_to_be_this_sweeps_is_skipped(tmp_path, caplog, change, why):
    # An exchange.json without a fingerprint (an earlier version's, left by overwrite_output_dir) was drawn as this
    # sweep's, even with other taus.
    write_json(tmp_path / "sweep.json", make_sweep())
    exchange = make_exchange()
    change(exchange)
    write_json(tmp_path / "exchange.json", exchange)
    with caplog.at_level("WARNING"):
        assert_pngs(write_report(tmp_path), tmp_path / "plots", BASE_FILES)
    assert why in caplog.text and "headprep exchange" in caplog.text


def test_exchange_of_another_seed_is_skipped_and_null_cells_are_drawn(tmp_path, caplog):
    from headprep_hf.sweep import _fingerprint_tag

    sweep = _replicated([(0, 3), (0, 4), (2, 3), (2, 4)], seeds=[3, 4])
    write_json(tmp_path / "sweep.json", sweep)
    exchange = {**make_exchange(taus=(0, 2)), "seed": 7, "sweep_fingerprint": _fingerprint_tag(sweep["fingerprint"])}
    write_json(tmp_path / "exchange.json", exchange)
    with caplog.at_level("WARNING"):
        assert_pngs(write_report(tmp_path), tmp_path / "plots", BASE_FILES)
    assert "its seed 7 is not among the sweep's seeds [3, 4]" in caplog.text
    exchange["seed"] = 3
    exchange["validation_accuracy"][0][1] = None  # a set without a valid label: null in exchange.json
    write_json(tmp_path / "exchange.json", exchange)
    assert_pngs(write_report(tmp_path), tmp_path / "plots", BASE_FILES + ["exchange_heatmap.png"])


def test_the_accuracy_and_energy_legend_names_both_curves():
    # The legend read "_nolegend_" twice: it took the label of the errorbar's data line, not of the errorbar.
    from headprep_hf.report import _figure_hp_accuracy_energy
    from headprep_hf.sweep import upgrade_sweep

    fig = _figure_hp_accuracy_energy(plt, upgrade_sweep(make_sweep()))
    try:
        texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert texts[0].startswith("HP train accuracy") and texts[1].startswith(r"energy $\|e_y - p_0\|_2$")
    finally:
        plt.close(fig)
    regression = make_sweep()
    for result in regression["results"]:  # (regression stores no accuracy or p0; its energy is ||q - y||)
        result.update(hp_train_accuracy=None, p0_mean=None, p0_histogram=None)
    fig = _figure_hp_accuracy_energy(plt, upgrade_sweep(regression))
    try:
        assert fig.axes[0].get_ylabel() == r"energy $\|q - y\|_2$ at the start of FT"
        assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [r"energy $\|q - y\|_2$"]
    finally:
        plt.close(fig)


def test_binary_tasks_get_their_own_energy_and_accuracy_labels():
    # A multi-task binary sweep (molecules) was labelled ||e_y - p_0|| where it plots ||sigmoid(q) - y||.
    from headprep_hf.report import _figure_hp_accuracy_energy
    from headprep_hf.sweep import upgrade_sweep

    data = make_sweep()
    for result in data["results"]:
        result["problem_type"] = "multi_label_classification"
    validate_sweep(data)
    fig = _figure_hp_accuracy_energy(plt, upgrade_sweep(data))
    try:
        texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert texts == ["HP train accuracy (per sample, over its labels)", r"energy $\|\sigma(q) - y\|_2$"]
    finally:
        plt.close(fig)


def test_a_sweep_without_measurements_is_not_called_regression():
    from headprep_hf.report import _figure_hp_accuracy_energy
    from headprep_hf.sweep import upgrade_sweep

    data = make_sweep()
    for result in data["results"]:
        result.update(hp_train_accuracy=None, energy=None)  # track_dynamics=False
    fig = _figure_hp_accuracy_energy(plt, upgrade_sweep(data))
    try:
        assert "not measured (track_dynamics=False)" in fig.axes[0].get_title()
    finally:
        plt.close(fig)


def test_an_exchange_of_models_finetuned_again_is_skipped(tmp_path, caplog):
    # A job run again (its damaged model deleted as the exchange advises; a GPU rerun gives other weights) keeps the
    # sweep's fingerprint: the heatmap was drawn from the models it no longer has, without a word.
    from headprep_hf.sweep import _fingerprint_tag

    sweep = _replicated([(0, 3), (2, 3)], seeds=[3])
    for result in sweep["results"]:
        result["model_sha256"] = f"{result['tau']}" * 64
    write_json(tmp_path / "sweep.json", sweep)
    exchange = {**make_exchange(taus=(0, 2)), "seed": 3, "sweep_fingerprint": _fingerprint_tag(sweep["fingerprint"])}
    exchange["models"] = {"0": "0" * 64, "2": "2" * 64}
    validate_exchange(exchange)
    write_json(tmp_path / "exchange.json", exchange)
    assert_pngs(write_report(tmp_path), tmp_path / "plots", BASE_FILES + ["exchange_heatmap.png"])
    sweep["results"][1]["model_sha256"] = "f" * 64  # tau = 2 finetuned again
    write_json(tmp_path / "sweep.json", sweep)
    with caplog.at_level("WARNING"):
        assert_pngs(write_report(tmp_path), tmp_path / "plots", BASE_FILES)
    assert "the models of tau = 2 were finetuned again since it was measured" in caplog.text


@pytest.mark.parametrize("content", [[], "x", 3])
def test_a_sweep_json_that_is_not_an_object_is_named(tmp_path, content):
    # `data.get` raised an AttributeError, a traceback instead of the one line naming the file.
    write_json(tmp_path / "sweep.json", content)
    with pytest.raises(jsonschema.ValidationError, match=r"sweep.json is not a valid sweep.json \(.* is not of type"):
        write_report(tmp_path)


def test_the_energy_figure_says_which_views_of_the_training_set_it_shows():
    from headprep_hf.report import _figure_hp_accuracy_energy

    titles = {}
    for views in ("eval transform", "as training reads them", None):
        sweep = _replicated([(0, 3), (2, 3)], seeds=[3])
        for result in sweep["results"]:
            result["energy_views"] = views
        fig = _figure_hp_accuracy_energy(plt, sweep)
        try:
            titles[views] = fig.axes[0].get_title()
        finally:
            plt.close(fig)
    assert titles["eval transform"].endswith(
        "train accuracy and energy\non the training set through the eval transform"
    )
    assert titles["as training reads them"].endswith("as training reads it (augmentation included)")
    assert titles[None].endswith("train accuracy and energy")  # (not recorded: not claimed)


def test_the_exchange_command_prints_a_cell_without_labels_as_na():
    # A set without a valid label is null in exchange.json; printing it raised a TypeError after the file was written.
    from headprep_hf.cli import format_exchange

    exchange = make_exchange(taus=(0, 2))
    exchange["validation_accuracy"][0][1] = None
    assert format_exchange(exchange).splitlines()[2:] == ["      0  0.9500     n/a", "      2  0.9100  0.9400"]
