"""The benchmark scripts run end to end at tiny sizes (a GPU lease is not spent on a crash) and report every side."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    yield
    for name in ("throughput", "_common"):
        sys.modules.pop(name, None)


@pytest.mark.slow  # JPEG folders, worker processes and 16 short training runs (about 30 s)
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_throughput_runs_every_side_on_both_data_sources(bench_modules, tmp_path, task):
    import throughput

    tiny = ["--device", "cpu", "--task", task, "--arch", "test_resnet", "--image_size", "32", "--batch_size", "4"]
    tiny += ["--steps", "2", "--warmup", "1", "--repeats", "1", "--workers", "1", "--json", str(tmp_path / "t.json")]
    payload = throughput.main(tiny)
    for data in ("jpeg", "memory"):
        sides = payload["summary"][data]
        assert set(sides) == set(throughput.SIDES)
        for side, result in sides.items():
            assert result["median_samples_per_s"] > 0 and math.isfinite(result["ratio_to_raw_timm"]), (data, side)
        assert sides["raw_timm"]["ratio_to_raw_timm"] == 1.0
        assert 0 < sides["headprep_ft"]["drift_share_of_window"] < 1  # the epoch-end drift pass, timed in the window
        # what the windows leave out, timed beside them: the start-of-FT measurements, and (d)'s end of call
        assert (
            sides["headprep_ft"]["start_measurements_s"] > 0 and sides["headprep_ft"]["start_measurements_epochs"] > 0
        )
        assert sides["headprep_hp"]["after_window_s"] >= sides["headprep_hp"]["start_measurements_s"] > 0
    assert payload["loader"]["images_per_s"] > 0 and (tmp_path / "t.json").is_file()
    assert payload["settings"]["task"] == task and payload["repeats_done"] == 1


@pytest.mark.slow
def test_throughput_runs_one_data_source_alone_and_keeps_each_repeat(bench_modules, tmp_path):
    import json

    import throughput

    tiny = ["--device", "cpu", "--arch", "test_resnet", "--image_size", "32", "--batch_size", "4", "--steps", "2"]
    tiny += ["--warmup", "1", "--repeats", "2", "--data", "memory", "--sides", "raw_timm", "trainer"]
    tiny += ["--logging_steps", "1000", "--memory_workers", "1"]  # (gpu.sh's memoryworkers part, on every side)
    payload = throughput.main(tiny + ["--json", str(tmp_path / "m.json")])
    assert set(payload["summary"]) == {"memory"} and payload["loader"] is None
    assert payload["settings"]["memory_workers"] == 1
    # what ran: warm-up raised to 2 x 2 x workers for the loader's buffer; in-memory workers not persistent (recipe's)
    assert payload["plans"]["memory"] == {"warmup": 4, "steps": 6, "workers": 1, "persistent_workers": False}
    assert [len(payload["runs"]["memory"][s]) for s in ("raw_timm", "trainer")] == [2, 2]
    written = json.loads((tmp_path / "m.json").read_text())  # rewritten after each repeat, complete at the end
    assert written["repeats_done"] == 2 and written["summary"] == json.loads(json.dumps(payload["summary"]))


def test_throughput_keeps_in_memory_workers_only_when_asked(bench_modules):
    import throughput

    opts = throughput.parse_args(["--device", "cpu", "--memory_workers", "2"])
    assert throughput._loader_settings(opts, "memory")["dataloader_persistent_workers"] is False  # (the recipe's)
    assert throughput._loader_settings(opts, "jpeg")["dataloader_persistent_workers"] is True
    opts = throughput.parse_args(["--device", "cpu", "--memory_workers", "2", "--memory_persistent_workers"])
    assert throughput._loader_settings(opts, "memory")["dataloader_persistent_workers"] is True


@pytest.mark.slow
def test_throughput_profile_finds_what_trainer_does_and_the_raw_loop_does_not(bench_modules, tmp_path):
    """`--profile`, the device check prepared for a GPU lease, run on the CPU: per update, where the time goes, and the
    operators that differ. Trainer clips gradients (`max_grad_norm=1.0`) and the raw loop does not: the gradient norm's
    operators must show up on Trainer's side only."""
    import json

    import throughput

    tiny = ["--device", "cpu", "--arch", "test_resnet", "--image_size", "32", "--batch_size", "4", "--warmup", "1"]
    tiny += [
        "--data",
        "memory",
        "--sides",
        "raw_timm",
        "trainer",
        "--profile",
        "3",
        "--json",
        str(tmp_path / "p.json"),
    ]
    payload = throughput.main(tiny)
    raw, trainer = (payload["profile"]["memory"][side] for side in ("raw_timm", "trainer"))
    for side in (raw, trainer):
        assert side["updates"] == 3 and side["wall_ms_per_update"] > 0
        assert 0 < side["busy_ms_per_update"] <= 1.05 * side["wall_ms_per_update"]
        assert side["ops"]["aten::convolution_backward"]["calls_per_update"] == pytest.approx(
            raw["ops"]["aten::convolution_backward"]["calls_per_update"]
        )  # the same model, the same backward
    assert trainer["ops"]["aten::linalg_vector_norm"]["calls_per_update"] >= 1
    assert "aten::linalg_vector_norm" not in raw["ops"]
    assert {row["op"] for row in trainer["differences_from_raw_timm"]}  # printed and kept
    assert json.loads((tmp_path / "p.json").read_text())["profile"]["memory"]["trainer"]["updates"] == 3
