"""Figures of a tau sweep, drawn from the `sweep.json` (and optional `exchange.json`) that `headprep sweep` writes.

A tau sweep runs head probing (HP) once to the largest tau of a grid, then finetunes (FT) from the head snapshot
after each tau and picks tau* on the validation set (Ren et al., "How to prepare your task head for finetuning",
ICLR 2023). `write_report` turns the stored measurements into PNG figures:

* `ft_metric_vs_tau.png`: FT validation selection metric (and test, when stored) against tau, tau* marked.
* `hp_accuracy_energy_vs_tau.png`: HP train accuracy and energy `||e_y - p_0||` (regression: `||q - y||`) at the
  start of FT against tau.
* `drift_vs_tau.png`: feature drift at the end of FT (`||z_t - z_0||^2`, `z_t . z_0`, `||z_t||^2`,
  `cos(z_t, z_0)`) against tau.
* `p0_histograms.png`: histogram of the true-class probability `p_0` at the start of FT, one panel per tau.
* `head_grad_norm.png`: head gradient norm during FT against the FT step, one line per tau.
* `exchange_heatmap.png` (only with an `exchange.json` of this sweep): train and validation accuracy of a backbone
  finetuned from tau_i combined with a head finetuned from tau_j.

Only the data stored in the files is plotted (nothing is recomputed), so a report can be drawn on any machine,
including from a shard that holds part of the grid (the metric figure's title then says how many of the (tau, seed)
jobs it shows).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

from .files import read_json
from .sweep_schema import validate_exchange_file

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
EXCHANGE_FILE = "exchange.json"
DPI = 120

_DRIFT_PANELS = (
    ("sq_dist", r"$\|z_t - z_0\|^2$", "squared distance to the initial features"),
    ("dot", r"$z_t \cdot z_0$", "dot product with the initial features"),
    ("sq_norm", r"$\|z_t\|^2$", "squared norm of the features"),
    ("cos", r"$\cos(z_t, z_0)$", "cosine with the initial features"),
)
_TAU = r"$\tau$"
_ENERGY = r"energy $\|e_y - p_0\|_2$"
_REGRESSION_ENERGY = r"energy $\|q - y\|_2$"  # (regression: the head's output q against the target y)
_MULTILABEL_ENERGY = r"energy $\|\sigma(q) - y\|_2$"  # (binary tasks: over the present labels)


def write_report(sweep_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> list[Path]:
    """Draw the figures of a tau sweep as PNG files.

    Both input files are read and validated before anything is written, and every PNG is written to a temporary
    name in `output_dir` then renamed, so a failed call never leaves a half-written figure behind.

    Args:
        sweep_dir (`str` or `os.PathLike`):
            Folder of the sweep, holding `sweep.json` and optionally `exchange.json`.
        output_dir (`str` or `os.PathLike`, *optional*):
            Folder of the PNG files, created if needed. Defaults to `sweep_dir/plots`.

    Returns:
        `list[pathlib.Path]`: The written files, in this order: `ft_metric_vs_tau.png`,
        `hp_accuracy_energy_vs_tau.png`, `drift_vs_tau.png`, `p0_histograms.png`, `head_grad_norm.png`, then
        `exchange_heatmap.png` when `exchange.json` exists and was measured for this sweep (its `sweep_fingerprint`);
        one of another sweep (e.g. left by an earlier version's `overwrite_output_dir=True`) is skipped with a
        warning, and an earlier `exchange_heatmap.png` in `output_dir` is removed then.

    Raises:
        `FileNotFoundError`: `sweep_dir/sweep.json` does not exist.
        `jsonschema.ValidationError`: `sweep.json` or `exchange.json` does not follow its schema
            (see `headprep_hf.sweep_schema`).
    """
    sweep_dir = Path(sweep_dir)
    sweep_path = sweep_dir / SWEEP_FILE
    if not sweep_path.is_file():
        raise FileNotFoundError(
            f"{sweep_path} not found: a report needs the sweep.json written by `headprep sweep` in the sweep folder."
        )
    from .sweep import _fingerprint_tag, load_sweep

    data = load_sweep(sweep_dir)  # (checked; format 1, one seed, is drawn as a replicated sweep with n = 1)
    exchange = None
    exchange_path = sweep_dir / EXCHANGE_FILE
    if exchange_path.is_file():
        exchange = read_json(exchange_path)
        validate_exchange_file(exchange, exchange_path)
        theirs, ours = exchange.get("sweep_fingerprint"), _fingerprint_tag(data.get("fingerprint"))
        why = None
        if theirs != ours and ours is not None:  # (a file without one predates the field: not known to be this one's)
            why = "its sweep_fingerprint differs" if theirs is not None else "it records no sweep_fingerprint"
        elif list(exchange["taus"]) != list(data["taus"]):
            why = f"its taus {exchange['taus']} are not the sweep's {data['taus']}"
        elif data.get("seeds") and exchange.get("seed") not in data["seeds"]:
            why = f"its seed {exchange.get('seed')} is not among the sweep's seeds {data['seeds']}"
        else:
            # (a job run again, e.g. after its damaged model was deleted as the exchange advises, keeps the
            # fingerprint but not the weights: the matrix was drawn from the replaced models without a word)
            paired = exchange.get("models") or {}
            now = {
                str(r["tau"]): r.get("model_sha256") for r in data["results"] if r.get("seed") == exchange.get("seed")
            }
            changed = [tau for tau, sha in paired.items() if sha is not None and now.get(tau) not in (None, sha)]
            if changed:
                why = f"the models of tau = {', '.join(changed)} were finetuned again since it was measured"
        if why:
            logger.warning(
                "%s was measured for another sweep than %s (%s): no exchange_heatmap.png. "
                "Run `headprep exchange %s` to measure this sweep's head exchange.",
                exchange_path,
                sweep_path,
                why,
                sweep_dir,
            )
            exchange = None

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir) if output_dir is not None else sweep_dir / "plots"
    output_dir.mkdir(parents=True, exist_ok=True)

    figures = [
        ("ft_metric_vs_tau.png", _figure_metric_vs_tau),
        ("hp_accuracy_energy_vs_tau.png", _figure_hp_accuracy_energy),
        ("drift_vs_tau.png", _figure_drift),
        ("p0_histograms.png", _figure_p0_histograms),
        ("head_grad_norm.png", _figure_head_grad_norm),
    ]
    if exchange is not None:
        figures.append(("exchange_heatmap.png", lambda plt, data: _figure_exchange(plt, exchange)))
    elif (output_dir / "exchange_heatmap.png").is_file():  # an earlier report's, of an exchange that is not this one
        os.remove(output_dir / "exchange_heatmap.png")
    written = []
    for name, draw in figures:
        before = set(plt.get_fignums())
        try:
            fig = draw(plt, data)
        except BaseException:  # close the figure a failed drawing left open
            for number in set(plt.get_fignums()) - before:
                plt.close(number)
            raise
        written.append(_save_atomically(plt, fig, output_dir / name))
    return written


def _save_atomically(plt, fig, path: Path) -> Path:
    """Save `fig` as PNG to a temporary file next to `path`, rename it to `path` and close the figure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            with open(tmp, "xb") as f:  # unlike mkstemp, the permissions follow the umask
                fig.savefig(f, format="png", dpi=DPI)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    finally:
        plt.close(fig)
    return path


def _results(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The results of the sweep sorted by tau."""
    return sorted(data["results"], key=lambda r: r["tau"])


def _number(value: Any) -> float | None:
    """`value` as a float, or None when it is missing, null or not finite."""
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _points(data: dict[str, Any], get) -> tuple[list[int], list[float]]:
    """Taus and values `get(result)` over the results (every seed) sorted by tau, skipping missing values."""
    taus, values = [], []
    for result in _results(data):
        value = _number(get(result))
        if value is not None:
            taus.append(result["tau"])
            values.append(value)
    return taus, values


def _means(data: dict[str, Any], get) -> tuple[list[int], list[float], list[float]]:
    """Taus, means and standard deviations (0 for one seed) of `get(per_tau row)` (a statistics record)."""
    taus, means, stds = [], [], []
    for row in sorted(data["per_tau"], key=lambda r: r["tau"]):
        stats = get(row)
        if stats is not None and _number(stats["mean"]) is not None:
            taus.append(row["tau"])
            means.append(stats["mean"])
            stds.append(stats["std"] or 0.0)
    return taus, means, stds


def _seed_counts(data: dict[str, Any], get) -> list[int]:
    """The number of seeds `n` behind each plotted mean of `get(per_tau row)`."""
    counts = []
    for row in data["per_tau"]:
        stats = get(row)
        if stats is not None and _number(stats["mean"]) is not None:
            counts.append(int(stats["n"]))
    return counts


def _partial_note(data: dict[str, Any]) -> str:
    """`results for X of Y (tau, seed) jobs` when the file holds part of the grid's jobs, else an empty string."""
    from .sweep import job_counts

    done, total = job_counts(data)
    return f"results for {done} of {total} ({_TAU}, seed) jobs" if done < total else ""


def _plot_replicated(ax, data, get_stats, get_value, fmt: str, color: str, label: str) -> list:
    """Means over seeds with error bars (standard deviation) and, for several seeds, each seed as a faint point; the
    label gives the number of seeds per point (a range where points rest on different numbers, e.g. a shard)."""
    taus, means, stds = _means(data, get_stats)
    if not taus:
        return []
    several = len(data.get("seeds") or []) > 1
    if several:
        seed_taus, values = _points(data, get_value)
        ax.plot(seed_taus, values, ".", color=color, alpha=0.35, zorder=1)
        counts = _seed_counts(data, get_stats)
        low, high = min(counts), max(counts)
        n = f"{low}" if low == high else f"{low}-{high}"
        label += f" (mean +- sd, n = {n} seeds per point)" if high > 1 else " (one seed per point)"
    container = ax.errorbar(taus, means, yerr=stds if several else None, fmt=fmt, color=color, label=label, capsize=3)
    return [container]  # (the label is the container's; its data line's is "_nolegend_")


def _tau_axis(ax, data: dict[str, Any], label: bool = True) -> None:
    """Log2 tau axis (symlog so that tau = 0 fits) with a tick at each tau of the grid, labelled as an integer.

    Ticks too close to their neighbours for their labels to fit (a dense grid such as 4, 5, 6, 8) stay unlabelled.
    """
    import numpy as np
    from matplotlib.ticker import NullLocator

    taus = sorted(set(data["taus"]) | {r["tau"] for r in data["results"]})
    ax.set_xscale("symlog", base=2, linthresh=1)
    low, high = taus[0], taus[-1]
    left = low - 0.5 if low <= 1 else low / 1.5
    right = high + 0.5 if high <= 1 else high * 1.5
    ax.set_xlim(left, right)
    # position of each tick in inches from the left end (the axes size before layout is close enough)
    transform = ax.xaxis.get_transform()
    ends = transform.transform(np.array([left, right], dtype=float))
    width = ax.get_position().width * ax.figure.get_figwidth()
    inches = (transform.transform(np.array(taus, dtype=float)) - ends[0]) / (ends[1] - ends[0]) * width
    labelled = []
    for i, tau in enumerate(taus):
        if labelled and not _labels_fit(taus[labelled[-1]], inches[labelled[-1]], tau, inches[i]):
            if i != len(taus) - 1:
                continue
            labelled.pop()  # the largest tau is always labelled, in place of its neighbour
        labelled.append(i)
    ax.set_xticks(taus, labels=[str(tau) if i in labelled else "" for i, tau in enumerate(taus)])
    ax.xaxis.set_minor_locator(NullLocator())
    if label:
        ax.set_xlabel(f"{_TAU} (HP epochs before FT)")
    ax.grid(True, alpha=0.3)


def _labels_fit(tau_a: int, inch_a: float, tau_b: int, inch_b: float) -> bool:
    """Whether tick labels `tau_a` and `tau_b` centred `inch_b - inch_a` inches apart leave a gap between them."""
    digit = 0.08  # width of a digit at the default tick label size, in inches
    return inch_b - inch_a >= (len(str(tau_a)) + len(str(tau_b))) / 2 * digit + digit


def _no_data(ax, message: str) -> None:
    """Write `message` in the middle of an axes that has nothing to plot."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _plot_metric_vs_tau(ax, data: dict[str, Any]) -> None:
    """Plot the FT validation selection metric (and test, when stored) against tau on `ax`, with tau* marked.

    tau* is drawn as a star at its validation value (a `Line2D` whose x data is `[tau_star]`), a vertical dashed line
    and the legend entry "tau* = N"; nothing is marked when `tau_star` is null (a shard).

    Args:
        ax (`matplotlib.axes.Axes`):
            The axes to draw on.
        data (`dict`):
            The content of `sweep.json`.
    """
    from .sweep import upgrade_sweep

    data = upgrade_sweep(data)
    metric = data["selection_metric"]
    _tau_axis(ax, data)
    _plot_replicated(
        ax, data, lambda r: r["validation"], lambda r: r["validation"].get(metric), "o-", "C0", f"validation {metric}"
    )
    _plot_replicated(
        ax, data, lambda r: r["test"], lambda r: (r["test"] or {}).get(metric), "s--", "C1", f"test {metric}"
    )
    val_taus, val_values, _ = _means(data, lambda r: r["validation"])
    test_taus = _means(data, lambda r: r["test"])[0]
    tau_star = data["tau_star"]
    if tau_star is not None:
        label = rf"$\tau^*$ = {tau_star}"
        vline = ax.axvline(tau_star, color="C3", linestyle="--", linewidth=1, zorder=1)
        star_value = dict(zip(val_taus, val_values)).get(tau_star)
        if star_value is not None:
            ax.plot([tau_star], [star_value], "*", color="C3", markersize=16, zorder=3, label=label)
        else:  # tau* without a stored value (should not happen): the dashed line carries the legend
            vline.set_label(label)
    if not val_taus and not test_taus:
        _no_data(ax, f"no FT {metric} stored")
    direction = "higher" if data["greater_is_better"] else "lower"
    ax.set_ylabel(f"FT {metric} ({direction} is better)")
    title = f"FT {metric} after HP for {_TAU} epochs"
    partial = _partial_note(data)
    if partial:
        title += f"\n({partial})"
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")


def _figure_metric_vs_tau(plt, data: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    _plot_metric_vs_tau(ax, data)
    return fig


def _figure_hp_accuracy_energy(plt, data: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    _tau_axis(ax, data)
    has_accuracy = bool(_means(data, lambda r: r["hp_train_accuracy"])[0])  # (regression: none)
    has_energy = bool(_means(data, lambda r: r["energy"])[0])  # (track_dynamics=False: neither)
    multilabel = any(r.get("problem_type") == "multi_label_classification" for r in data.get("results", []))
    # (binary tasks: each sample's label accuracy, averaged over samples; the energy over its present labels)
    accuracy_label = "HP train accuracy (per sample, over its labels)" if multilabel else "HP train accuracy"
    energy_ax = ax
    lines = []
    if has_accuracy:
        lines = _plot_replicated(
            ax,
            data,
            lambda r: r["hp_train_accuracy"],
            lambda r: r["hp_train_accuracy"],
            "o-",
            "C0",
            accuracy_label,
        )
        ax.set_ylabel(accuracy_label, color="C0")
        ax.tick_params(axis="y", labelcolor="C0")
        energy_ax = ax.twinx()
    energy = _REGRESSION_ENERGY if has_energy and not has_accuracy else _ENERGY  # (regression: energy, no accuracy)
    energy = _MULTILABEL_ENERGY if multilabel else energy
    lines += _plot_replicated(energy_ax, data, lambda r: r["energy"], lambda r: r["energy"], "s--", "C1", energy)
    energy_ax.set_ylabel(f"{energy} at the start of FT", color="C1")
    energy_ax.tick_params(axis="y", labelcolor="C1")
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize="small")
    else:
        _no_data(ax, "no energy stored")
    what = "train accuracy and energy"
    if not has_accuracy:
        what = "energy (no accuracy: regression)" if has_energy else "not measured (track_dynamics=False)"
    partial = _partial_note(data)
    from .sweep import energy_views

    views = energy_views(data) if has_energy else None
    if views:  # (augmented views or the eval transform: the title said neither)
        what += f"\non {views}"
    ax.set_title(f"Head after {_TAU} HP epochs: {what}" + (f"\n({partial})" if partial else ""))
    return fig


def _figure_drift(plt, data: dict[str, Any]):
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), layout="constrained")
    for ax, (key, symbol, description) in zip(axes.flat, _DRIFT_PANELS):
        _tau_axis(ax, data, label=ax in axes[1])
        drawn = _plot_replicated(
            ax,
            data,
            lambda r, key=key: (r["drift"] or {}).get(key),
            lambda r, key=key: (r["drift"] or {}).get(key),
            "o-",
            "C2",
            symbol,
        )
        if not drawn:
            _no_data(ax, "no drift stored")
        ax.set_ylabel(symbol)
        ax.set_title(f"{symbol}: {description}", fontsize="medium")
    title = f"Feature drift at the end of FT against {_TAU} (mean over the probe set)"
    partial = _partial_note(data)
    fig.suptitle(title + (f"\n({partial})" if partial else ""))
    return fig


def _figure_p0_histograms(plt, data: dict[str, Any]):
    import numpy as np

    results = _pooled_p0(data)
    n = max(len(results), 1)
    ncols = n if n <= 4 else math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(max(2.8 * ncols + 0.6, 6.4), 2.3 * nrows + 0.9),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    for ax, result in zip(axes.flat, results):
        edges = np.asarray(result["p0_histogram"]["edges"], dtype=float)
        counts = np.asarray(result["p0_histogram"]["counts"], dtype=float)
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="C0", edgecolor="white", linewidth=0.5)
        ax.axvline(result["p0_mean"], color="C3", linestyle="--", linewidth=1)
        seeds = f", {result['n']} seeds" if result["n"] > 1 else ""
        ax.set_title(f"{_TAU} = {result['tau']}, energy {result['energy']:.3g}{seeds}", fontsize="medium")
    axes[0, 0].set_xlim(0, 1)
    for ax in axes[:, 0]:
        ax.set_ylabel("training samples")
    if not results:
        _no_data(axes[0, 0], "no p0 stored (regression has none)")
    for i, ax in enumerate(axes.flat):
        if results and i >= len(results):  # empty cell of the last row: label the panel above instead
            ax.set_visible(False)
            axes.flat[i - ncols].xaxis.set_tick_params(labelbottom=True)
            axes.flat[i - ncols].set_xlabel(r"$p_0(y \mid x)$")
        elif i >= (nrows - 1) * ncols:
            ax.set_xlabel(r"$p_0(y \mid x)$")
    fig.suptitle(r"True-class probability $p_0(y \mid x)$ at the start of FT (dashed line: mean)")
    return fig


def _pooled_p0(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per tau: the p0 histograms of its seeds summed, the mean p0 and energy over seeds (taus without p0 left out)."""
    pooled = []
    for tau in sorted({r["tau"] for r in data["results"]}):
        group = [
            r for r in data["results"] if r["tau"] == tau and r.get("p0_histogram") and r.get("p0_mean") is not None
        ]
        if not group:
            continue
        counts = [sum(c) for c in zip(*(r["p0_histogram"]["counts"] for r in group))]
        energies = [r["energy"] for r in group if r["energy"] is not None]
        pooled.append(
            {
                "tau": tau,
                "n": len(group),
                "p0_histogram": {"edges": group[0]["p0_histogram"]["edges"], "counts": counts},
                "p0_mean": sum(r["p0_mean"] for r in group) / len(group),
                "energy": sum(energies) / len(energies) if energies else float("nan"),
            }
        )
    return pooled


def _plain_log_formatter_class():
    """A `LogFormatter` that writes its labels as plain numbers (0.3, 2, 40) instead of 3x10^-1."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter


def _figure_head_grad_norm(plt, data: dict[str, Any]):
    import matplotlib as mpl

    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    results = [r for r in _results(data) if r["head_grad_norm"]]
    taus = sorted({r["tau"] for r in results})
    cmap = mpl.colormaps["viridis"]
    all_values, labelled = [], set()
    for result in results:  # every seed of a tau in the tau's colour; the first labelled
        points = sorted((p for p in result["head_grad_norm"] if p["value"] is not None), key=lambda p: p["step"])
        steps = [p["step"] for p in points]
        values = [p["value"] for p in points]
        all_values += values
        color = cmap(taus.index(result["tau"]) / max(len(taus) - 1, 1) * 0.9)
        label = None if result["tau"] in labelled else f"{_TAU} = {result['tau']}"
        labelled.add(result["tau"])
        ax.plot(
            steps, values, "-", color=color, label=label, linewidth=1.5 if label else 0.8, alpha=1 if label else 0.5
        )
    if all_values and all(v > 0 for v in all_values):
        ax.set_yscale("log")
        plain_log_formatter = _plain_log_formatter_class()
        ax.yaxis.set_major_formatter(plain_log_formatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(plain_log_formatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    if results:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", ncols=2 if len(taus) > 12 else 1)
    else:
        _no_data(ax, "no head gradient norm stored")
    ax.set_xlabel("FT step")
    ax.set_ylabel(r"head gradient norm $\|\nabla_v L\|_2$")
    ax.set_title(f"Head gradient norm during FT, by {_TAU}")
    ax.grid(True, alpha=0.3)
    return fig


def _figure_exchange(plt, exchange: dict[str, Any]):
    import numpy as np

    taus = exchange["taus"]
    n = len(taus)
    side = max(3.2, 0.55 * n + 1.6)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.6, side + 0.6), layout="constrained")
    views = exchange.get("train_views")
    # "as training reads them": augmented where the training set augments (not every set does: graphs never)
    train_title = {"eval transform": "train accuracy (eval transform)", "as training reads them": (
        "train accuracy (as training reads the set)")}.get(views, "train accuracy")  # fmt: skip
    panels = (("train_accuracy", train_title), ("validation_accuracy", "validation accuracy"))
    for ax, (key, title) in zip(axes, panels):
        rows = exchange[key]
        if len(rows) != n or any(len(row) != n for row in rows):
            _no_data(ax, f"{key} is not a {n}x{n} matrix")
            ax.set_axis_off()
            continue
        values = np.asarray(rows, dtype=float)
        image = ax.imshow(values, cmap="viridis", origin="upper")
        ax.set_xticks(range(n), labels=[str(t) for t in taus])
        ax.set_yticks(range(n), labels=[str(t) for t in taus])
        ax.set_xlabel(r"head from FT at $\tau_j$")
        ax.set_ylabel(r"backbone from FT at $\tau_i$")
        ax.set_title(title)
        low, high = np.nanmin(values), np.nanmax(values)
        middle = (low + high) / 2
        fontsize = "small" if n <= 8 else "x-small"
        for i in range(n):
            for j in range(n):
                color = "black" if values[i, j] > middle else "white"
                text = f"{values[i, j]:.2f}" if np.isfinite(values[i, j]) else "n/a"  # (null: no valid label)
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)
        fig.colorbar(image, ax=ax, shrink=0.85, label=title)
    seed = f" (seed {exchange['seed']})" if exchange.get("seed") is not None else ""
    fig.suptitle(r"Head exchange: backbone from $\tau_i$ with head from $\tau_j$" + seed)
    return fig
