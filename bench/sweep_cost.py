"""HP cost of a tau sweep vs one HP run, and uncached vs cached-feature HP, alternated in one run.

Acceptance criteria (ratios of wall times measured in the same process, the compared runs alternated):

* (a) HP cost of a 7-point sweep / HP cost of one run to max tau, target <= 1.2. `TauSweep.probe()` (the sweep's
  single HP run to the largest grid tau, saving a head snapshot at every grid tau) vs a standalone
  `HeadPrepTrainer(...).probe_head()` with `hp_epochs = max(taus)` and the same settings. Primary figure: uncached HP;
  a second line repeats it with cached HP (`hp_cache_features=True`, `hp_cache_views=1`). For context the script
  also prints what separate HP runs per tau would cost relative to one run, sum(taus) / max(taus) (computed, not
  timed).
* (b) uncached HP / cached HP wall time at tau (default 32), target >= 20: `probe_head()` with
  `hp_cache_features=False` vs `True` (`hp_cache_views=1`; the cached time includes building the cache, i.e. the
  backbone pass over the training set, run at the default `measure_batch_size`, 4x the training batch). An
  extra line gives the ratio for `hp_cache_views=4` (context, no target: four backbone passes).

Workload: the offline toy task as the sweep loads it, `load_image_classification(ImageClassificationArguments(),
seed=0)` (900 augmented training images, the cached MNIST-5k source model `test_resnet` with a new 3-class head),
batch 64, hp_learning_rate 1e-2, constant HP schedule, CPU, no logging/saving/evaluation, `track_dynamics=False`.
Every timed run starts from a fresh deepcopy of the loaded model and a fresh temporary output_dir.

Timed: `probe()` for the sweep (it builds its trainer inside); trainer construction + `probe_head()` for a
standalone run in (a), and `probe_head()` alone in (b) (construction is ~0.01 s). Runs that (a) and (b) share (when
`--tau` equals the largest grid tau) are run once per repetition and used for both. Each repetition runs every
distinct variant once, in an order rotated by one per repetition; a ratio is computed within each repetition (so
slow drifts of the machine's load cancel) and the median over repetitions is reported. Inside the runs the time of
`CachedHeadProbing.build_cache` (backbone pass) and of the sweep's snapshot saves is recorded separately.

Usage::

    python bench/sweep_cost.py                       # defaults: taus 0 1 2 4 8 16 32, tau 32, 3 repeats (~2 min)
    python bench/sweep_cost.py --quick               # smoke run: taus 0 1 2 4, tau 4, 1 repeat
    python bench/sweep_cost.py --repeats 5 --threads 1 --json sweep_cost.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import timm
import torch
import transformers
from _common import machine_info, write_json
from safetensors.torch import load_file
from transformers import PrinterCallback

from headprep_hf import HeadPrepConfig, HeadPrepTrainer
from headprep_hf.feature_cache import CachedHeadProbing
from headprep_hf.sweep import SweepConfig, TauSweep
from headprep_hf.tasks.image_classification import ImageClassificationArguments, load_image_classification

DEFAULT_TAUS = [0, 1, 2, 4, 8, 16, 32]
TARGET_SWEEP = 1.2  # (a): sweep HP / one HP run <= this
TARGET_CACHE = 20.0  # (b): uncached HP / cached HP >= this


# ---------------------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One kind of timed run: the sweep's HP (`kind="sweep"`, to max(taus)) or a standalone `probe_head()`."""

    kind: str  # "sweep" or "single"
    cache: bool
    views: int
    epochs: int

    @property
    def name(self) -> str:
        hp = f"cached{self.views}" if self.cache else "uncached"
        what = "sweep.probe" if self.kind == "sweep" else "probe_head"
        return f"{what}/{hp}/tau={self.epochs}"


def build_variants(taus: list[int], tau: int) -> dict[str, Variant]:
    """The variants each ratio needs (by role); roles may share one variant (then it runs once per repetition)."""
    max_tau = taus[-1]
    return {
        "a_sweep_uncached": Variant("sweep", False, 1, max_tau),
        "a_single_uncached": Variant("single", False, 1, max_tau),
        "a_sweep_cached": Variant("sweep", True, 1, max_tau),
        "a_single_cached": Variant("single", True, 1, max_tau),
        "b_uncached": Variant("single", False, 1, tau),
        "b_cached1": Variant("single", True, 1, tau),
        "b_cached4": Variant("single", True, 4, tau),
    }


# (label, numerator role, denominator role, time field, target, direction, primary)
RATIOS = (
    ("a_uncached", "a_sweep_uncached", "a_single_uncached", "seconds", TARGET_SWEEP, "<=", True),
    ("a_cached", "a_sweep_cached", "a_single_cached", "seconds", TARGET_SWEEP, "<=", False),
    ("b_views1", "b_uncached", "b_cached1", "probe_seconds", TARGET_CACHE, ">=", True),
    ("b_views4", "b_uncached", "b_cached4", "probe_seconds", None, None, False),  # context: K backbone passes
)


# ---------------------------------------------------------------------------------------------------------- timing
class _MethodTimer:
    """Records the wall time of every call of `cls.name` (a class-level wrapper, bench side only; src untouched)."""

    def __init__(self, cls, name: str):
        self.calls: list[float] = []
        original = getattr(cls, name)
        timer = self

        def wrapped(self_, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(self_, *args, **kwargs)
            finally:
                timer.calls.append(time.perf_counter() - t0)

        setattr(cls, name, wrapped)

    def take(self) -> float:
        total, self.calls = sum(self.calls), []
        return total


class _Timers:
    def __init__(self):
        self.cache = _MethodTimer(CachedHeadProbing, "build_cache")
        self.probe_head = _MethodTimer(HeadPrepTrainer, "probe_head")

    def reset(self) -> None:
        self.cache.take()
        self.probe_head.take()


def config_kwargs(opts, output_dir: str, variant: Variant) -> dict[str, Any]:
    return dict(
        output_dir=output_dir,
        seed=opts.seed,
        per_device_train_batch_size=opts.batch_size,
        hp_learning_rate=opts.hp_lr,
        hp_lr_scheduler_type="constant",
        hp_warmup_ratio=0.0,
        hp_cache_features=variant.cache,
        hp_cache_views=variant.views,
        track_dynamics=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def run_once(variant: Variant, opts, inputs, taus: list[int], timers: _Timers) -> dict[str, Any]:
    """One timed run of `variant` on a fresh copy of the model in a fresh temporary folder."""
    transformers.set_seed(opts.seed)
    model = copy.deepcopy(inputs.model)
    gc.collect()
    timers.reset()
    result: dict[str, Any] = {"variant": variant.name, "kind": variant.kind, "epochs": variant.epochs}
    with tempfile.TemporaryDirectory(prefix="bench_sweep_cost_") as out:
        if variant.kind == "sweep":
            grid = [t for t in taus if t <= variant.epochs]
            args = SweepConfig(**config_kwargs(opts, out, variant), sweep_taus=grid, sweep_progress=False)
            sweep = TauSweep(
                model, args, inputs.train_dataset, inputs.eval_dataset, data_collator=inputs.data_collator
            )
            snapshot_calls: list[float] = []
            original_save = sweep._save_snapshot

            def timed_save(tau, seed, trainer, **kwargs):
                t0 = time.perf_counter()
                try:
                    return original_save(tau, seed, trainer, **kwargs)
                finally:
                    snapshot_calls.append(time.perf_counter() - t0)

            sweep._save_snapshot = timed_save
            c0, t0 = time.process_time(), time.perf_counter()
            hp_info = sweep.probe()
            seconds = time.perf_counter() - t0
            result["cpu_seconds"] = time.process_time() - c0
            result.update(
                seconds=seconds,
                probe_seconds=seconds,
                build_seconds=None,
                snapshot_seconds=sum(snapshot_calls),
                snapshots=len(snapshot_calls),
                sweep_reported_runtime=hp_info["runtime"],
            )
            head = load_file(os.path.join(out, hp_info["snapshots"][str(variant.epochs)]))
        else:
            args = HeadPrepConfig(**config_kwargs(opts, out, variant), hp_epochs=variant.epochs)
            c0, t0 = time.process_time(), time.perf_counter()
            trainer = HeadPrepTrainer(
                model=model, args=args, train_dataset=inputs.train_dataset, data_collator=inputs.data_collator
            )
            trainer.remove_callback(PrinterCallback)  # as the sweep does for its HP run
            t1 = time.perf_counter()
            output = trainer.probe_head()
            t2 = time.perf_counter()
            result["cpu_seconds"] = time.process_time() - c0
            result.update(
                seconds=t2 - t0,
                probe_seconds=t2 - t1,
                build_seconds=t1 - t0,
                global_step=output.global_step,
                hp_loss=float(output.training_loss),
            )
            head = trainer.hp_state_dict()
    result["cache_build_seconds"] = timers.cache.take()
    result["inside_probe_head_seconds"] = timers.probe_head.take()
    result["_head"] = head
    gc.collect()
    return result


def seed_cost(opts, inputs, taus: list[int], cache: bool) -> dict[str, Any]:
    """HP cost of an S-seed sweep (its S HP runs with snapshots, as `TauSweep.run` does them) / S standalone HP runs
    to the largest tau, alternated; median of the per-repetition ratios."""
    seeds = list(range(opts.seed, opts.seed + opts.seeds))
    variant = Variant("single", cache, 1, taus[-1])
    ratios = []
    for rep in range(opts.repeats):
        times = {}
        for kind in ("sweep", "single")[:: 1 if rep % 2 == 0 else -1]:
            with tempfile.TemporaryDirectory(prefix="bench_seeds_") as out:
                t0 = time.perf_counter()
                if kind == "sweep":
                    args = SweepConfig(
                        **config_kwargs(opts, out, variant), sweep_taus=taus, sweep_seeds=seeds, sweep_progress=False
                    )
                    sweep = TauSweep(copy.deepcopy(inputs.model), args, inputs.train_dataset, inputs.eval_dataset)
                    sweep._fingerprint = sweep.fingerprint()
                    for seed in seeds:
                        sweep.probe(seed)
                else:
                    for seed in seeds:
                        folder = os.path.join(out, f"seed_{seed}")
                        args = HeadPrepConfig(
                            **{**config_kwargs(opts, folder, variant), "seed": seed}, hp_epochs=taus[-1]
                        )
                        trainer = HeadPrepTrainer(
                            model=copy.deepcopy(inputs.model), args=args, train_dataset=inputs.train_dataset
                        )
                        trainer.remove_callback(PrinterCallback)
                        trainer.probe_head()
                times[kind] = time.perf_counter() - t0
        ratios.append(times["sweep"] / times["single"])
        print(
            f"  {len(seeds)}-seed HP ({'cached' if cache else 'uncached'}): sweep {times['sweep']:.2f} s, "
            f"{len(seeds)} x one HP run {times['single']:.2f} s",
            flush=True,
        )
    result = {"seeds": len(seeds), "ratio_median": statistics.median(ratios), "ratios": ratios}
    print(
        f"(a') HP of a {len(seeds)}-seed sweep / ({len(seeds)} x one HP run to tau={taus[-1]}), "
        f"{'cached' if cache else 'uncached'}: {result['ratio_median']:.3f} (target <= 1.2)"
    )
    return result


def cached_energy_saving(opts, inputs) -> dict[str, Any]:
    """Seconds of the start-of-FT energy measurement of one FT job: the backbone pass over the training set vs the
    head alone on the head inputs cached HP kept (what a cached sweep's FT jobs now do); median of 5."""
    from headprep_hf.feature_cache import CachedHeadProbing

    with tempfile.TemporaryDirectory(prefix="bench_energy_") as out:
        variant = Variant("single", True, 1, 1)
        args = HeadPrepConfig(**{**config_kwargs(opts, out, variant), "track_dynamics": True}, hp_epochs=1)
        trainer = HeadPrepTrainer(model=copy.deepcopy(inputs.model), args=args, train_dataset=inputs.train_dataset)
        trainer.keep_head_inputs = True
        CachedHeadProbing(trainer).train()
        kept = trainer.measurements.head_inputs
        times: dict[str, list[float]] = {"backbone pass": [], "cached head inputs": []}
        for rep in range(5):
            for source in list(times)[:: 1 if rep % 2 == 0 else -1]:
                trainer.measurements.head_inputs = kept if source == "cached head inputs" else None
                t0 = time.perf_counter()
                trainer.measurements.measure_start()
                times[source].append(time.perf_counter() - t0)
                assert trainer.dynamics["energy_source"] == source
    med = {k: statistics.median(v) for k, v in times.items()}
    saved = med["backbone pass"] - med["cached head inputs"]
    print(
        f"FT job start (energy, HP accuracy, p0 and z_0 of the probe): backbone pass {med['backbone pass']:.3f} s, "
        f"from cached head inputs {med['cached head inputs']:.3f} s -> {saved:.3f} s saved per FT job"
    )
    return {"median_seconds": med, "saved_seconds_per_job": saved}


def head_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two head state dicts (inf when their keys differ)."""
    if set(a) != set(b):
        return float("inf")
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].numel()), default=0.0)


def data_pass_seconds(dataset) -> float:
    """One pass of `dataset[i]` over the training set (image loading + augmentation, no model): context only."""
    t0 = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------- report
def summarize(runs: list[dict], roles: dict[str, Variant], repeats: int) -> dict[str, Any]:
    by = {(r["variant"], r["repeat"]): r for r in runs}
    ratios = {}
    for label, num, den, field_, target, direction, primary in RATIOS:
        values = [
            by[(roles[num].name, rep)][field_] / by[(roles[den].name, rep)][field_]
            for rep in range(repeats)
            if (roles[num].name, rep) in by and (roles[den].name, rep) in by
        ]
        med = statistics.median(values)
        ok = None if target is None else (med <= target if direction == "<=" else med >= target)
        ratios[label] = {
            "numerator": roles[num].name,
            "denominator": roles[den].name,
            "time": field_,
            "values": values,
            "median": med,
            "target": "" if target is None else f"{direction} {target}",
            "pass": ok,
            "primary": primary,
        }
    variants = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == name]
        entry = {"runs": len(rs)}
        for key in (
            "seconds",
            "cpu_seconds",
            "probe_seconds",
            "build_seconds",
            "cache_build_seconds",
            "inside_probe_head_seconds",
            "snapshot_seconds",
        ):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                entry[f"median_{key}"] = statistics.median(vals)
                entry[f"{key}_values"] = vals
        variants[name] = entry
    return {"ratios": ratios, "variants": variants}


LABELS = {
    "a_uncached": "(a) HP of sweep / one HP run to max tau, uncached",
    "a_cached": "(a) same, cached HP (hp_cache_views=1)",
    "b_views1": "(b) uncached / cached HP at tau, hp_cache_views=1",
    "b_views4": "(b) same, hp_cache_views=4",
}


def print_report(info, setup, runs, summary, taus, tau, context) -> None:
    print("\n== runs (execution order; cache = build_cache, snap = sweep snapshot saves) ==")
    print(f"  {'rep':>3} {'variant':34s} {'wall s':>7} {'cpu s':>7} {'probe s':>8} {'cache s':>8} {'snap s':>7}")
    for r in runs:
        snap = r.get("snapshot_seconds")
        print(
            f"  {r['repeat']:>3} {r['variant']:34s} {r['seconds']:7.2f} {r['cpu_seconds']:7.2f} "
            f"{r['probe_seconds']:8.2f} {r['cache_build_seconds']:8.2f} {'' if snap is None else f'{snap:7.3f}':>7}"
        )
    print(
        "  (wall s: what the ratios use for (a); probe s: probe_head() alone, used for (b); cpu s: process CPU time)"
    )

    print("\n== medians per variant ==")
    print(f"  {'variant':34s} {'wall s':>7} {'cache s':>8} {'per HP epoch s':>15}")
    for name, v in summary["variants"].items():
        epochs = int(name.rsplit("=", 1)[1])
        cache = v.get("median_cache_build_seconds", 0.0)
        per_epoch = (v["median_seconds"] - cache) / max(epochs, 1)
        print(f"  {name:34s} {v['median_seconds']:7.2f} {cache:8.2f} {per_epoch:15.4f}")
    print("  (per HP epoch: (wall - cache build) / tau)")

    print("\n== ratios (median over repetitions of the ratio within a repetition; * = primary figure) ==")
    max_tau = taus[-1]
    print(f"  grid taus {taus} (max tau {max_tau}, {len(taus)} points); (b) at tau={tau}")
    print(f"  {'':2}{'ratio':52s} {'median':>7}  {'target':>7}  {'':4}  values")
    for label, r in summary["ratios"].items():
        verdict = "" if r["pass"] is None else ("PASS" if r["pass"] else "MISS")
        star = "*" if r["primary"] else " "
        values = ", ".join(f"{v:.3f}" for v in r["values"])
        print(f"  {star} {LABELS[label]:51s} {r['median']:7.3f}  {r['target']:>7}  {verdict}  [{values}]")
        if label == "a_cached":
            print(
                f"    computed, not timed: separate HP runs per tau / one run = sum(taus)/max(taus) = "
                f"{sum(taus)}/{max_tau} = {context['separate_runs_ratio']:.3f}"
            )

    print("\n== where the time goes ==")
    v = summary["variants"]
    for label in ("a_uncached", "a_cached"):
        r = summary["ratios"][label]
        sweep, single = v[r["numerator"]], v[r["denominator"]]
        extra = sweep["median_seconds"] - single["median_seconds"]
        inside_sweep = sweep["median_inside_probe_head_seconds"]
        inside_single = single["median_inside_probe_head_seconds"]
        print(
            f"  {r['numerator']} {sweep['median_seconds']:.2f} s vs {r['denominator']} "
            f"{single['median_seconds']:.2f} s: sweep extra {extra:+.2f} s\n"
            f"    inside probe_head(): sweep {inside_sweep:.2f} s, standalone {inside_single:.2f} s; outside it "
            f"(sweep: config copy, trainer, fingerprint, tau=0 snapshot; standalone: trainer): "
            f"{sweep['median_seconds'] - inside_sweep:.3f} s vs {single['median_seconds'] - inside_single:.3f} s; "
            f"all snapshot saves {sweep['median_snapshot_seconds']:.3f} s"
        )
    for label in ("b_views1", "b_views4"):
        r = summary["ratios"][label]
        cached = v[r["denominator"]]
        build = cached.get("median_cache_build_seconds", 0.0)
        print(
            f"  {r['denominator']}: probe_head {cached['median_probe_seconds']:.2f} s, of which build_cache "
            f"{build:.2f} s ({100 * build / cached['median_probe_seconds']:.0f}%); head training on the cache "
            f"{cached['median_probe_seconds'] - build:.2f} s"
        )
    uncached = v[summary["ratios"]["b_views1"]["numerator"]]
    per_epoch = uncached["median_probe_seconds"] / max(tau, 1)
    print(
        f"  uncached HP: {per_epoch:.3f} s per epoch; one pass of train_dataset[i] (loading + augmentation, no "
        f"model) takes {context['data_pass_seconds']:.3f} s = {100 * context['data_pass_seconds'] / per_epoch:.0f}% "
        "of it"
    )
    diffs = context["head_max_abs_diff"]
    if diffs:
        print("  sweep head at max tau vs standalone head (max |diff| over repetitions, should be ~0):")
        for label, d in diffs.items():
            print(f"    {label}: {max(d):.3g}")


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=None, help="alternated repetitions (default 3; --quick: 1)")
    p.add_argument(
        "--taus", type=int, nargs="+", default=None, help="sweep grid (default 0 1 2 4 8 16 32; --quick: 0 1 2 4)"
    )
    p.add_argument("--tau", type=int, default=None, help="HP epochs of the (b) comparison (default 32; --quick: 4)")
    p.add_argument("--quick", action="store_true", help="smoke run: taus 0 1 2 4, tau 4, repeats 1")
    p.add_argument("--batch_size", type=int, default=64, help="per_device_train_batch_size (default 64)")
    p.add_argument("--hp_lr", type=float, default=1e-2, help="hp_learning_rate (default 1e-2)")
    p.add_argument("--seed", type=int, default=0, help="data/model seed and TrainingArguments.seed (default 0)")
    p.add_argument(
        "--model_arch",
        type=str,
        default=None,
        help="time another timm architecture (random init, e.g. resnet18) on the same toy data instead of the "
        "MNIST-5k test_resnet; ratios only, the weights do not matter for them",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for all runs (default: torch's)")
    p.add_argument("--no_warmup", action="store_true", help="skip the untimed short warm-up runs")
    p.add_argument("--json", type=str, default=None, metavar="PATH", help="write all raw times and ratios here")
    p.add_argument("--seeds", type=int, default=3, help="S of the S-seed HP cost (default 3; 1: skip)")
    opts = p.parse_args(argv)
    if opts.repeats is None:
        opts.repeats = 1 if opts.quick else 3
    if opts.taus is None:
        opts.taus = [0, 1, 2, 4] if opts.quick else list(DEFAULT_TAUS)
    if opts.tau is None:
        opts.tau = 4 if opts.quick else 32
    if opts.repeats < 1:
        p.error("--repeats must be >= 1")
    if opts.tau < 1:
        p.error("--tau must be >= 1 (HP epochs)")
    if opts.taus != sorted(set(opts.taus)) or opts.taus[0] < 0 or opts.taus[-1] < 1:
        p.error("--taus must be ascending, unique, >= 0, with a largest tau >= 1")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    transformers.logging.set_verbosity_error()
    logging.getLogger("headprep_hf").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    taus, tau = opts.taus, opts.tau

    t_start = time.perf_counter()
    inputs = load_image_classification(ImageClassificationArguments(), seed=opts.seed)
    model_desc = "source model test_resnet (MNIST-5k)"
    if opts.model_arch is not None:
        torch.manual_seed(opts.seed)
        inputs.model = timm.create_model(opts.model_arch, num_classes=len(inputs.class_names))
        n_params = sum(p.numel() for p in inputs.model.parameters()) / 1e6
        model_desc = f"timm {opts.model_arch} ({n_params:.1f}M parameters, random init)"
    info = machine_info()
    setup = {
        "workload": f"load_image_classification(ImageClassificationArguments(), seed={opts.seed}): "
        f"{len(inputs.train_dataset)} augmented train images, {model_desc}, "
        f"{len(inputs.class_names)} classes",
        "hp": f"batch {opts.batch_size}, hp_learning_rate {opts.hp_lr}, constant schedule, cpu, track_dynamics=False",
        "taus": taus,
        "tau": tau,
        "repeats": opts.repeats,
    }
    print(
        f"machine: {info['platform']}, {info['cpu_count']} CPUs, torch {info['torch']} "
        f"({info['torch_threads']} threads), transformers {info['transformers']}, load {info['loadavg_1_5_15']}"
    )
    load = info["loadavg_1_5_15"]
    if load and load[0] > 0.5 * (info["cpu_count"] or 1):
        print(
            f"WARNING: load average {load[0]:.2f} on {info['cpu_count']} CPUs: other jobs compete and wall times are "
            "noisy (with more torch threads than free cores small ops slow down a lot; --threads 1 is steadier)."
        )
    print(f"workload: {setup['workload']}\n          {setup['hp']}")
    print(f"sweep grid {taus}, (b) at tau={tau}, {opts.repeats} alternated repetition(s)", flush=True)

    timers = _Timers()
    roles = build_variants(taus, tau)
    variants = list(dict.fromkeys(roles.values()))  # distinct, in role order

    if not opts.no_warmup:
        short = [0, 1] if 0 in taus else [1]
        for v in dict.fromkeys(Variant(v.kind, v.cache, v.views, 1) for v in variants):
            run_once(v, opts, inputs, short, timers)
        print(f"warm-up done ({time.perf_counter() - t_start:.1f} s)", flush=True)

    context: dict[str, Any] = {"separate_runs_ratio": sum(taus) / taus[-1]}
    context["data_pass_seconds"] = data_pass_seconds(inputs.train_dataset)

    runs: list[dict] = []
    pairs = {"uncached": ("a_sweep_uncached", "a_single_uncached"), "cached": ("a_sweep_cached", "a_single_cached")}
    head_diffs: dict[str, list[float]] = {label: [] for label in pairs}
    for rep in range(opts.repeats):
        k = rep % len(variants)
        heads = {}
        for v in variants[k:] + variants[:k]:
            r = run_once(v, opts, inputs, taus, timers)
            heads[v] = r.pop("_head")
            r["repeat"] = rep
            runs.append(r)
            print(f"  rep {rep} {v.name:34s} {r['seconds']:7.2f} s", flush=True)
        for label, (sweep_role, single_role) in pairs.items():
            head_diffs[label].append(head_difference(heads[roles[sweep_role]], heads[roles[single_role]]))
    context["head_max_abs_diff"] = head_diffs

    summary = summarize(runs, roles, opts.repeats)
    info["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_report(info, setup, runs, summary, taus, tau, context)
    if opts.seeds > 1:
        summary["seeds"] = {cache: seed_cost(opts, inputs, taus, cache) for cache in (False, True)}
    summary["cached_energy"] = cached_energy_saving(opts, inputs)
    total = time.perf_counter() - t_start
    print(f"\nload average after: {info['loadavg_after']}; total wall time: {total:.1f} s")

    if opts.json:
        payload = {
            "machine": info,
            "setup": setup,
            "runs": runs,
            "summary": summary,
            "context": context,
            "total_seconds": total,
        }
        write_json(opts.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
