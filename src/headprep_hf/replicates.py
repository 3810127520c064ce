"""Statistics over the seeds of a replicated tau sweep: means, spreads, t-intervals, paired comparisons, verdicts.

The paper's claims are about expectations; one seed of a small task is noise. For each tau the sweep reports the
mean, the sample standard deviation (n - 1) and a two-sided 95% Student-t interval of the mean over seeds; tau* is the
best mean validation metric; tau* is compared with tau = 0 and with the largest tau by the paired differences over
seeds (the same seed = the same head initialisation, data order and augmentation draws on both sides), with a 95%
t-interval of the mean difference. The verdict says "beats" or "is worse than" only when that interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as scipy_stats

CONFIDENCE = 0.95
_LOWER_IS_BETTER = ("loss", "rmse", "mse", "mae", "error")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller `metric` is better (losses and errors: `loss`, `rmse`, `mse`, `mae`, `*_error`)."""
    return metric.lower().endswith(_LOWER_IS_BETTER)


def describe(values: Sequence[float | None]) -> dict | None:
    """`{n, mean, std, ci95, values}` of the non-null `values` (std and ci95 null below two values); None if none."""
    present = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not present:
        return None
    n = len(present)
    mean = sum(present) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None, "values": present}
    std = math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1))
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "values": present}


def paired_difference(a: dict[int, float | None], b: dict[int, float | None]) -> dict | None:
    """Statistics of `a[seed] - b[seed]` over the seeds both have (see `describe`), with the seeds used."""
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    result = describe([a[s] - b[s] for s in seeds])
    if result is not None:
        result["seeds"] = seeds
    return result


def _scale(metric: str) -> tuple[float, str]:
    # Accuracy-like metrics (in [0, 1]) read as percentage points; losses and errors in their own units.
    return (1.0, "") if lower_is_better(metric) else (100.0, " points")


def verdict(tau_a: int, tau_b: int, difference: dict | None, metric: str, greater_is_better: bool) -> str:
    """One sentence: does tau_a beat tau_b on `metric` beyond seed noise (the 95% interval of the paired difference
    `a - b` excludes 0)?"""
    if difference is None:
        return f"tau = {tau_a} vs tau = {tau_b}: no paired seeds to compare."
    n = difference["n"]
    scale, unit = _scale(metric)
    if n < 2:
        return (
            f"tau = {tau_a} vs tau = {tau_b}: {scale * difference['mean']:+.2f}{unit} of {metric} with one seed; no "
            "uncertainty available (run more seeds: sweep_seeds=[...])."
        )
    low, high = difference["ci95"]
    better = difference["mean"] > 0 if greater_is_better else difference["mean"] < 0
    half = scale * (high - low) / 2
    size = f"{scale * abs(difference['mean']):.2f} +- {half:.2f}{unit} of {metric} ({n} seeds, 95% t-interval)"
    if low > 0 or high < 0:
        return f"tau* = {tau_a} {'beats' if better else 'is worse than'} tau = {tau_b} by {size}."
    return (
        f"tau* = {tau_a} is not distinguishable from tau = {tau_b} at {n} seeds: difference "
        f"{scale * difference['mean']:+.2f}{unit}, 95% interval [{scale * low:+.2f}, {scale * high:+.2f}]."
    )
