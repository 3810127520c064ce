"""Statistics over the seeds of a replicated tau sweep: means, spreads, t-intervals, paired comparisons, verdicts.

The paper's claims are about expectations; one seed of a small task is noise. For each tau the sweep reports the
mean, the sample standard deviation (n - 1) and a two-sided 95% Student-t interval of the mean over seeds; tau* is the
best mean validation metric; tau* is compared with tau = 0 and with the largest tau by the paired differences over
seeds (the same seed = the same head initialisation, data order and augmentation draws on both sides), with a 95%
t-interval of the mean difference. The verdict says "beats" or "is worse than" only when that interval excludes 0.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

from scipy import stats as scipy_stats

logger = logging.getLogger(__name__)

CONFIDENCE = 0.95
# Two means closer than this (relative) are a tie: the same values summed in another seed order may differ in the
# last bit, which must not decide tau*.
TIE_REL_TOL = 1e-12
_LOWER_IS_BETTER = ("loss", "rmse", "mse", "mae", "error", "err")
# Last words of metric names: smaller is better (perplexity, word/character error rates, percentage error, negative
# log-likelihood, Brier score, expected calibration error), or larger is (the others a sweep is commonly judged by).
_LOWER_WORDS = {
    "perplexity",
    "ppl",
    "wer",
    "cer",
    "mape",
    "smape",
    "nll",
    "brier",
    "ece",
    "distance",
    "entropy",
    "xent",
}
_HIGHER_WORDS = {
    "accuracy", "acc", "f1", "precision", "recall", "auc", "rocauc", "ap", "map", "iou", "miou", "dice", "r2",
    "matthews", "correlation", "mcc", "pearson", "spearman", "pearsonr", "spearmanr", "bleu", "rouge", "rouge1",
    "rouge2", "rougel", "chrf", "meteor", "kappa", "top1", "top5", "score", "ndcg", "mrr", "hits",
}  # fmt: skip
_LOGGED_DIRECTIONS: set[str] = set()


# Words that qualify a metric's name rather than name it (`brier_score`, `f1_macro`, `rmse_mean`, `error_rate`): the
# word before them decides.
_QUALIFIERS = {"score", "metric", "value", "macro", "micro", "weighted", "samples", "mean", "avg", "overall", "rate"}
# A leading word that turns a smaller-is-better quantity into a larger-is-better score (scikit-learn's scorers:
# `neg_mean_squared_error`, `neg_log_loss`).
_NEGATIONS = {"neg", "negative"}


def _words(metric: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", metric.lower()) if w]


def _last_word(metric: str) -> str:
    words = _words(metric)
    while len(words) > 1 and words[-1] in _QUALIFIERS:
        words.pop()
    return words[-1] if words else ""


def _negated(metric: str) -> str | None:
    """The rest of `metric` after a leading negation (`neg_log_loss` -> `log_loss`; also after a split prefix such as
    `eval_`), else None."""
    words = _words(metric)
    for i, word in enumerate(words[:2]):
        if word in _NEGATIONS and i + 1 < len(words):
            return "_".join(words[i + 1 :])
    return None


def lower_is_better(metric: str) -> bool:
    """Whether a smaller `metric` is better: losses and errors (names whose last word, qualifiers such as `mean`,
    `macro` or `rate` left out, ends in `loss`, `rmse`, `mse`, `mae`, `error` or `err`) and names whose last word is
    in `_LOWER_WORDS` (`perplexity`, `wer`, `cer`, `mape`, `nll`, `brier`, `ece`, ...); a leading `neg_` turns it
    round (scikit-learn's `neg_mean_squared_error` is larger-is-better)."""
    rest = _negated(metric)
    if rest is not None and lower_is_better(rest):  # (`neg_precision`: the negative class's, larger is better)
        return False
    last = _last_word(metric)
    return last.endswith(_LOWER_IS_BETTER) or last in _LOWER_WORDS


def _known_direction(metric: str) -> bool:
    rest = _negated(metric)
    if rest is not None and lower_is_better(rest):
        return True
    return lower_is_better(metric) or _last_word(metric) in _HIGHER_WORDS


def infer_greater_is_better(metric: str) -> bool:
    """The direction of `metric` guessed from its name (see `lower_is_better`), logged once per metric so that a
    wrong guess is visible (set `sweep_greater_is_better` to decide it instead): a warning where the name is in
    neither list of known metrics."""
    greater = not lower_is_better(metric)
    if metric not in _LOGGED_DIRECTIONS:
        _LOGGED_DIRECTIONS.add(metric)
        known = _known_direction(metric)
        (logger.info if known else logger.warning)(
            "sweep_metric %r: %s is better, guessed from its name%s (set sweep_greater_is_better to decide).",
            metric,
            "higher" if greater else "lower",
            "" if known else ", which is not one the guess knows",
        )
    return greater


def is_tie(a: float, b: float) -> bool:
    """Whether two means are equal up to float rounding (`TIE_REL_TOL`)."""
    return math.isclose(a, b, rel_tol=TIE_REL_TOL, abs_tol=0.0)


def describe(values: Sequence[float | None], seeds: Sequence | None = None) -> dict | None:
    """`{n, mean, std, ci95, values}` of the finite `values` (std and ci95 null below two values); None if none.

    With `seeds` (one per value), also `seeds`: those of the values kept, so that `values[i]` belongs to `seeds[i]`
    where a missing or non-finite value was left out."""
    present = [float(v) for v in values if _finite(v)]
    if not present:
        return None
    n = len(present)
    if seeds is not None:
        result = describe(present)
        result["seeds"] = [seed for seed, v in zip(seeds, values, strict=True) if _finite(v)]
        return result
    # fsum: correctly rounded, so the same values in another order give the same mean (a tie stays a tie)
    mean = math.fsum(present) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None, "values": present}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in present) / (n - 1))
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "values": present}


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def paired_difference(a: dict[int, float | None], b: dict[int, float | None]) -> dict | None:
    """Statistics of `a[seed] - b[seed]` over the seeds both have a finite value for (see `describe`), with the seeds
    used (a seed whose value is missing or NaN on either side is in neither `n` nor `seeds`)."""
    seeds = sorted(s for s in a if s in b and _finite(a[s]) and _finite(b[s]))
    result = describe([a[s] - b[s] for s in seeds])
    if result is not None:
        result["seeds"] = seeds
    return result


def _units(fraction: bool):
    """`(format, unit)` of a difference: a metric that is a fraction (accuracy, IoU, ROC-AUC: every value in [0, 1]
    and higher is better) in percentage points with two decimals; any other (losses, RMSE, perplexity, PSNR) in its
    own units with three significant digits, so that a small but clear difference does not print as 0.00."""
    if fraction:
        return (lambda x, sign="": f"{100 * x:{sign}.2f}"), " points"
    return (lambda x, sign="": f"{x:{sign}.3g}"), ""


def verdict(
    tau_a: int,
    tau_b: int,
    difference: dict | None,
    metric: str,
    greater_is_better: bool,
    fraction: bool = False,
    selected: bool = False,
) -> str:
    """One sentence: does tau_a beat tau_b on `metric` beyond seed noise (the 95% interval of the paired difference
    `a - b` excludes 0)? `fraction`: the metric is a share in [0, 1] (see `_units`).

    `selected`: tau_a was chosen as the best of the grid on these very values (tau* on validation). Its lead over
    another tau is then biased in its favour, and the interval does not hold as a test: in simulated sweeps of equal
    taus, "tau* beats tau = 0" came out in 8-9% of them, for a nominal 2.5%. The sentence gives the difference and
    its interval without a verdict, and names the test set that gives one."""
    if difference is None:
        return f"tau = {tau_a} vs tau = {tau_b}: no paired seeds to compare."
    n = difference["n"]
    fmt, unit = _units(fraction)
    if selected and n >= 2:
        low, high = difference["ci95"]
        return (
            f"tau* = {tau_a} vs tau = {tau_b} on the {metric} it was chosen on: difference "
            f"{fmt(difference['mean'], '+')}{unit}, 95% interval [{fmt(low, '+')}, {fmt(high, '+')}] ({n} seeds). "
            "Biased in tau*'s favour, so not a test of it: a test set (test_dir, or the data's test split) gives one."
        )
    if n < 2:
        return (
            f"tau = {tau_a} vs tau = {tau_b}: {fmt(difference['mean'], '+')}{unit} of {metric} from one seed with a "
            "finite value on both sides; no uncertainty available (replicate with sweep_seeds=[...]; a seed whose "
            "value is missing or not finite on either side is left out)."
        )
    low, high = difference["ci95"]
    if difference["std"] <= 1e-9 * max(abs(difference["mean"]), 1e-3):
        # (a metric counted over a set, k/N, can move by the same count on every seed: the paired differences are
        # then equal up to float rounding, their standard deviation about 1e-16 and the t-interval a point, which
        # read "beats ... +- 0.00" from two seeds. A spread of zero estimates no noise.)
        return (
            f"tau = {tau_a} vs tau = {tau_b}: every one of the {n} seeds gives the same difference, "
            f"{fmt(difference['mean'], '+')}{unit} of {metric}; a spread of zero does not estimate the seed noise, so "
            "no verdict (add seeds: sweep_seeds)."
        )
    better = difference["mean"] > 0 if greater_is_better else difference["mean"] < 0
    size = f"{fmt(abs(difference['mean']))} +- {fmt((high - low) / 2)}{unit} of {metric} ({n} seeds, 95% t-interval)"
    if low > 0 or high < 0:
        return f"tau* = {tau_a} {'beats' if better else 'is worse than'} tau = {tau_b} by {size}."
    # (2 seeds: the t quantile is 12.7, so the interval may pass the metric's own range; say why, not only that)
    few = " Two seeds give an interval of 12.7 standard errors each side: add seeds (sweep_seeds)." if n == 2 else ""
    return (
        f"tau* = {tau_a} is not distinguishable from tau = {tau_b} at {n} seeds: difference "
        f"{fmt(difference['mean'], '+')}{unit}, 95% interval [{fmt(low, '+')}, {fmt(high, '+')}].{few}"
    )
