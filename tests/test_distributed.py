"""Multi-process acceptance tests: `torchrun --nproc_per_node 2` (gloo, CPU) against the 1-process run.

Each launch pays the import of torch/transformers/timm per process (about 10 s on 2 cores), so the scenarios of
`tests/ddp_worker.py` run in one 2-rank job and one 1-process job, shared by the tests of this module; each test
reads its scenario's files (`rank<r>.safetensors`, `rank<r>.json`, `init.safetensors`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import ddp_worker as W
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from headprep_hf.dynamics import DRIFT_KEYS

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO_ROOT = WORKER.parent.parent
TIMEOUT_S = 300
# hp and measure first in both jobs, so the 1- and 2-rank processes run them in the same order.
SCENARIOS_2 = "hp,measure,sweep,graph,hpft,bn,bnpad,cachedeval,mcprobe,plainbn,refuse,search"
SCENARIOS_1 = "hp,measure,sweep,graph,bnpad,mcprobe"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, nproc: int | None, scenarios: str, states: Path) -> None:
    """Run the worker with `nproc` torchrun ranks (None: a plain subprocess, no torchrun) and wait for it."""
    worker_args = [str(WORKER), "--out", str(out), "--scenarios", scenarios, "--states", str(states)]
    worker_args += ["--graph_data", str(states / "graphs" / "ddp_graphs")]
    if nproc is None:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *worker_args,
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if nproc is None:  # a plain process must not pick up a launcher's rendezvous variables
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
    # Own session, so that a hung job can be killed with all its ranks (and nothing else).
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {TIMEOUT_S}s:\n{output[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-6000:]}")


# ------------------------------------------------------------------ model states for the measurement scenario
def _make_states(folder: Path) -> tuple[dict, dict]:
    """S0: a seeded model with non-trivial BatchNorm statistics; S1: S0 with a perturbed backbone."""
    model = W.tiny_model(seed=1)
    g = torch.Generator().manual_seed(123)
    s0 = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().clone()
        if name.endswith("running_mean"):
            t = 0.2 * torch.randn(t.shape, generator=g)
        elif name.endswith("running_var"):
            t = 0.5 + torch.rand(t.shape, generator=g)
        s0[name] = t.contiguous()
    s1 = {}
    for name, t in s0.items():
        if t.is_floating_point() and not name.startswith("fc."):
            t = t + 0.05 * torch.randn(t.shape, generator=g) * (t.abs().mean() + 1e-3)
            if name.endswith("running_var"):
                t = t.abs() + 0.1
        s1[name] = t.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(s0, str(folder / "s0.safetensors"))
    save_file(s1, str(folder / "s1.safetensors"))
    return s0, s1


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    from conftest import SMILES, graph_labels

    from headprep_hf.data.graphs import load_ogb_dataset, write_ogb_dataset

    folder = tmp_path_factory.mktemp("states")
    s0, s1 = _make_states(folder)
    # 25 training graphs: not divisible by the 2 ranks. Loaded once here so that OGB's processing (which writes the
    # processed file) is done before the ranks read it.
    split = {"train": range(25), "valid": range(25, 29), "test": range(29, 32)}
    graphs = write_ogb_dataset(SMILES, graph_labels(32, W.GRAPH_TASKS, seed=7), folder / "graphs", "ddp-graphs",
                               split=split)  # fmt: skip
    load_ogb_dataset(str(graphs))
    return folder, s0, s1


@pytest.fixture(scope="module")
def run2(tmp_path_factory, states):
    out = tmp_path_factory.mktemp("ranks2")
    _launch(out, 2, SCENARIOS_2, states[0])
    return out


@pytest.fixture(scope="module")
def run1(tmp_path_factory, states):
    out = tmp_path_factory.mktemp("ranks1")
    _launch(out, None, SCENARIOS_1, states[0])
    return out


def _ranks(folder: Path, world_size: int) -> tuple[list[dict], list[dict]]:
    """Per-rank state dicts and metadata; checks the job really had `world_size` processes."""
    files = sorted(p.name for p in folder.glob("rank*.safetensors"))
    assert files == [f"rank{r}.safetensors" for r in range(world_size)], files
    metas = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world_size)]
    for r, meta in enumerate(metas):
        assert meta["world_size"] == world_size and meta["num_processes"] == world_size, meta
        assert meta["process_index"] == r
    return [load_file(str(folder / f"rank{r}.safetensors")) for r in range(world_size)], metas


def _is_head(name: str) -> bool:
    return name.startswith("fc.")


# ------------------------------------------------------------------ (a) HP + FT: ranks identical
def _rank_mismatches(a: dict, b: dict, keys) -> dict[str, float]:
    return {k: (a[k].double() - b[k].double()).abs().max().item() for k in keys if not torch.equal(a[k], b[k])}


def test_hpft_two_ranks_identical_parameters(run2):
    states, metas = _ranks(run2 / "hpft", 2)
    init = load_file(str(run2 / "hpft" / "init.safetensors"))
    # 32 samples, 8 per device: 2 updates per epoch on 2 ranks (4 on one), 1 HP epoch + 1 FT epoch.
    for meta in metas:
        assert meta["wrapper"] == "DistributedDataParallel"
        assert (meta["hp_steps"], meta["ft_steps"], meta["global_step"]) == (2, 2, 4)
    params = {k for k in init if "running_" not in k and "num_batches_tracked" not in k}
    assert states[0].keys() == states[1].keys() == init.keys()
    assert _rank_mismatches(states[0], states[1], sorted(params)) == {}
    # Not trivially equal: FT moved the backbone (and HP + FT the head) on both ranks.
    backbone = [k for k in params if not _is_head(k)]
    moved = [k for k in backbone if (states[0][k] - init[k]).abs().max() > 1e-4]
    assert len(moved) > len(backbone) // 2, f"only {moved} of {backbone} changed in FT"
    assert all(not torch.equal(states[0][k], init[k]) for k in params if _is_head(k))


def test_hpft_two_ranks_identical_buffers(run2):
    states, _ = _ranks(run2 / "hpft", 2)
    buffers = [k for k in states[0] if "running_" in k or "num_batches_tracked" in k]
    assert buffers
    init = load_file(str(run2 / "hpft" / "init.safetensors"))
    assert any(not torch.equal(states[0][k], init[k]) for k in buffers), "FT did not update BatchNorm statistics"
    mismatches = _rank_mismatches(states[0], states[1], buffers)
    worst = max(mismatches.items(), key=lambda kv: kv[1], default=None)
    assert mismatches == {}, f"{len(mismatches)} of {len(buffers)} buffers differ between ranks (worst {worst})"


# ------------------------------------------------------------------ (b) HP: 2 x B/2 == 1 x B
def test_hp_two_ranks_half_batch_equals_one_rank(run1, run2):
    (one,), (meta1,) = _ranks(run1 / "hp", 1)
    two, metas2 = _ranks(run2 / "hp", 2)
    init1 = load_file(str(run1 / "hp" / "init.safetensors"))
    init2 = load_file(str(run2 / "hp" / "init.safetensors"))
    assert all(torch.equal(init1[k], init2[k]) for k in init1), "the two jobs did not start from the same model"
    # 32 samples, global batch 8, 2 HP epochs: the same 8 updates in both jobs.
    assert meta1["hp_steps"] == meta1["global_step"] == 8
    assert all(m["hp_steps"] == m["global_step"] == 8 for m in metas2)

    head = [k for k in init1 if _is_head(k)]
    assert sorted(head) == ["fc.bias", "fc.weight"]
    for k in head:
        assert not torch.equal(one[k], init1[k]), f"HP did not train {k}"
        diff = (one[k] - two[0][k]).abs().max().item()
        assert diff <= 1e-5, f"{k}: 1 rank x 8 vs 2 ranks x 4 differ by {diff}"
        assert torch.equal(two[0][k], two[1][k]), f"{k} differs between the 2 ranks"
    # The frozen backbone, BatchNorm buffers included, is bit-identical to the initial model on every rank.
    for state in (one, *two):
        changed = [k for k in init1 if not _is_head(k) and not torch.equal(state[k], init1[k])]
        assert changed == [], f"HP changed backbone tensors {changed}"


# ------------------------------------------------------------------ (c) energy and drift: 2 ranks == 1 rank
def _reference(state0: dict, state1: dict) -> dict:
    """Energy, accuracy, p0, z_0 and drift of the given states in plain torch (one batch, eval mode)."""
    data = W.TinyImages(W.MEASURE_SAMPLES, seed=3)
    x, y = data.x, torch.as_tensor(data.labels, dtype=torch.long)
    model = W.tiny_model(seed=0).eval()
    captured = []
    model.fc.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    probe = [i * W.MEASURE_SAMPLES // W.MEASURE_PROBE for i in range(W.MEASURE_PROBE)]  # evenly spaced
    with torch.no_grad():
        model.load_state_dict(state0)
        probs = model(x).double().softmax(dim=-1)
        z0 = captured.pop().double()[probe]
        model.load_state_dict(state1)
        model(x[probe])
        zt = captured.pop().double()
    one_hot = torch.nn.functional.one_hot(y, W.NUM_CLASSES).double()
    p0 = probs.gather(1, y[:, None]).squeeze(1)
    return {
        "energy": (one_hot - probs).norm(dim=1).mean().item(),
        "hp_train_accuracy": (probs.argmax(1) == y).double().mean().item(),
        "p0": p0,
        "z0": z0,
        "sq_dist": (zt - z0).pow(2).sum(1).mean().item(),
        "dot": (zt * z0).sum(1).mean().item(),
        "sq_norm": zt.pow(2).sum(1).mean().item(),
        "cos": torch.nn.functional.cosine_similarity(zt, z0, dim=1).mean().item(),
    }


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def test_measurements_two_ranks_equal_one_rank(run1, run2, states):
    _, s0, s1 = states
    assert W.MEASURE_SAMPLES % 2 and W.MEASURE_SAMPLES % W.MEASURE_EVAL_BATCH and W.MEASURE_PROBE % 2
    (_,), (m1,) = _ranks(run1 / "measure", 1)
    _, metas2 = _ranks(run2 / "measure", 2)
    ref = _reference(s0, s1)
    n, n_probe = W.MEASURE_SAMPLES, W.MEASURE_PROBE

    for label, meta in (("1 rank", m1), ("2 ranks/rank 0", metas2[0]), ("2 ranks/rank 1", metas2[1])):
        dyn = meta["dynamics"]
        # Every sample counted exactly once: no padding duplicate, nothing dropped.
        assert dyn["num_energy_samples"] == n and len(dyn["p0"]) == n, (label, dyn["num_energy_samples"])
        assert dyn["num_probe_samples"] == n_probe, label
        assert sum(dyn["p0_histogram"]["counts"]) == n, label
        for key in ("energy", "hp_train_accuracy"):
            assert _close(meta["start"][key], m1["start"][key]), (label, key, meta["start"][key], m1["start"][key])
            assert _close(meta["start"][key], ref[key]), (label, key, meta["start"][key], ref[key])
        # p0 is stored rounded to 6 decimals.
        p0 = torch.tensor(dyn["p0"], dtype=torch.float64)
        assert (p0 - torch.tensor(m1["dynamics"]["p0"], dtype=torch.float64)).abs().max() <= 2e-6, label
        assert (p0 - ref["p0"]).abs().max() <= 2e-6, label
        assert len(dyn["drift"]) == 1
        for key in DRIFT_KEYS:
            assert _close(meta["drift"][key], m1["drift"][key]), (label, key, meta["drift"][key], m1["drift"][key])
            assert _close(meta["drift"][key], ref[key]), (label, key, meta["drift"][key], ref[key])
            assert meta["drift"][key] == dyn["drift"][0][key]

    # z_0 itself, in dataset order.
    for folder in (run1, run2):
        z0 = load_file(str(folder / "measure" / "z0.safetensors"))["z0"].double()
        assert z0.shape == ref["z0"].shape
        torch.testing.assert_close(z0, ref["z0"], rtol=1e-5, atol=1e-5)
    # The perturbation is large enough that the drift is not trivially zero.
    assert ref["sq_dist"] > 1e-3 and ref["cos"] < 1 - 1e-5


# ------------------------------------------------------------------ the tau sweep on 2 ranks
def test_sweep_two_ranks_equals_one_rank(run1, run2):
    """Cached HP with global batches, FT jobs under DDP and the exchange (gathered passes) on 2 ranks."""
    results = [json.loads((run2 / "sweep" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in results] == [2, 2]

    def without_timings(sweep):
        sweep = json.loads(json.dumps(sweep))
        for record in sweep["hp"]["seeds"].values():
            record.pop("runtime")
        for entry in sweep["results"]:
            entry.pop("train_runtime")
        return sweep

    assert without_timings(results[0]["result"]) == without_timings(results[1]["result"])  # every rank, same sweep
    single = json.loads((run1 / "sweep" / "rank0.json").read_text())["result"]
    two = results[0]["result"]
    assert two["complete"] and [r["tau"] for r in two["results"]] == [0, 1, 2]
    for a, b in zip(single["results"], two["results"]):
        assert a["energy"] == pytest.approx(b["energy"], rel=1e-5)
        assert a["hp_train_accuracy"] == pytest.approx(b["hp_train_accuracy"], abs=1e-9)
    for tau in (1, 2):  # cached HP: the same global batches give the same head
        h1 = load_file(str(run1 / "sweep" / "out" / "heads" / "seed_0" / f"tau_{tau}.safetensors"))
        h2 = load_file(str(run2 / "sweep" / "out" / "heads" / "seed_0" / f"tau_{tau}.safetensors"))
        for key in h1:
            torch.testing.assert_close(h2[key], h1[key], rtol=1e-5, atol=1e-6)
    exchange = json.loads((run2 / "sweep" / "out" / "exchange.json").read_text())
    diagonal = [exchange["validation_accuracy"][i][i] for i in range(3)]
    assert diagonal == pytest.approx([r["validation"]["accuracy"] for r in two["results"]], abs=1e-6)


# ------------------------------------------------------------------ graphs: dict batches of PyG graphs under DDP
def test_graph_batches_under_two_ranks(run1, run2):
    (one,), (meta1,) = _ranks(run1 / "graph", 1)
    two, metas2 = _ranks(run2 / "graph", 2)
    assert meta1["num_train"] == 25
    # Energy, HP label accuracy and p0 of the same initial state: every graph counted once (25 on 2 ranks).
    for meta in metas2:
        assert len(meta["start_p0"]) == 25
        for key in ("energy", "hp_train_accuracy", "p0_mean"):
            assert meta["start"][key] == pytest.approx(meta1["start"][key], rel=1e-5), key
        np.testing.assert_allclose(meta["start_p0"], meta1["start_p0"], rtol=1e-5, atol=1e-6)
    # HP with missing labels, global batch 8: 2 ranks x 4 == 1 rank x 8 (the step's mean counts every rank's labels).
    one_head = load_file(str(run1 / "graph" / "hp_head_rank0.safetensors"))
    for rank in (0, 1):
        two_head = load_file(str(run2 / "graph" / f"hp_head_rank{rank}.safetensors"))
        for key, value in one_head.items():
            torch.testing.assert_close(two_head[key], value, rtol=1e-5, atol=1e-6)
    # After HP + FT both ranks hold the same GCN (backbone gradients were all-reduced) and it moved.
    init = load_file(str(run2 / "graph" / "init.safetensors"))
    assert all(torch.equal(two[0][k], two[1][k]) for k in two[0]), "ranks differ after HP + FT"
    assert not torch.equal(two[0]["convs.0.linear.weight"], init["convs.0.linear.weight"])


# ------------------------------------------------------------------ BatchNorm statistics of the prepared head
def test_head_bn_statistics_recomputed_over_both_ranks(run2):
    """Each rank runs its share of the statistics pass; the combined statistics are those of all 8 batches."""
    states, _ = _ranks(run2 / "bn", 2)
    buffers = ["fc.1.running_mean", "fc.1.running_var", "fc.1.num_batches_tracked"]
    assert _rank_mismatches(states[0], states[1], buffers) == {}
    assert int(states[0]["fc.1.num_batches_tracked"]) == W.HP_SAMPLES // W.BN_MEASURE_BATCH == 8

    _assert_bn_statistics_of_batches(states[0], W.TinyImages(W.HP_SAMPLES, seed=0).x)


def _assert_bn_statistics_of_batches(state: dict, x: torch.Tensor) -> None:
    """The head BatchNorm's running statistics in `state` are the mean of its batch statistics over `x` in batches of
    BN_MEASURE_BATCH, computed here from the head's first layer."""
    model = W.bn_head_model()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        h = model.fc[0](model.forward_head(model.forward_features(x), pre_logits=True))
    chunks = h.split(W.BN_MEASURE_BATCH)
    mean = torch.stack([c.mean(0) for c in chunks]).mean(0)
    var = torch.stack([c.var(0, unbiased=True) for c in chunks]).mean(0)
    assert torch.allclose(state["fc.1.running_mean"], mean, atol=1e-5)
    assert torch.allclose(state["fc.1.running_var"], var, rtol=1e-4, atol=1e-5)


def test_head_bn_statistics_count_no_padding_sample_twice(run1, run2):
    """37 samples at 4: the two ranks' batches together are one process's 9 (the last, of one sample, left out);
    the samples Accelerate repeats to even out the ranks' batch counts are not counted."""
    one, _ = _ranks(run1 / "bnpad", 1)
    two, _ = _ranks(run2 / "bnpad", 2)
    buffers = ["fc.1.running_mean", "fc.1.running_var", "fc.1.num_batches_tracked"]
    assert _rank_mismatches(two[0], two[1], buffers) == {}
    assert int(two[0]["fc.1.num_batches_tracked"]) == int(one[0]["fc.1.num_batches_tracked"]) == 9
    _assert_bn_statistics_of_batches(two[0], W.TinyImages(W.MEASURE_SAMPLES, seed=0).x[:36])


def test_an_evaluation_before_fts_loop_leaves_ft_distributed(run2):
    """Cached HP evaluates before FT's training loop; FT must still run under DistributedDataParallel (ranks equal)."""
    states, metas = _ranks(run2 / "cachedeval", 2)
    assert [m["wrapper"] for m in metas] == ["DistributedDataParallel"] * 2
    assert _rank_mismatches(states[0], states[1], [k for k in states[0] if "num_batches" not in k]) == {}


def test_a_multiple_choice_probe_keeps_every_choice_on_two_ranks(run1, run2):
    """The head sees one row per choice; the last gathered batch's repeated question was cut by rows (13 of 15)."""
    (_,), (one,) = _ranks(run1 / "mcprobe", 1)
    _, two = _ranks(run2 / "mcprobe", 2)
    for meta in (one, *two):
        assert meta["dynamics"]["num_probe_samples"] == W.MC_QUESTIONS
        assert meta["dynamics"]["num_probe_rows"] == 3 * W.MC_QUESTIONS
    z1 = load_file(str(run1 / "mcprobe" / "z0.safetensors"))["z0"]
    z2 = load_file(str(run2 / "mcprobe" / "z0.safetensors"))["z0"]
    torch.testing.assert_close(z2, z1, rtol=1e-5, atol=1e-6)


def test_a_plain_run_evaluates_with_each_ranks_statistics_as_trainer(run2):
    """hp_epochs=0: evaluation and predict under two ranks give Trainer's numbers for a model with BatchNorm. The
    trainer broadcast rank 0's statistics before each evaluation (and its drift pass left them so): eval_loss 1.4864
    against Trainer's 1.4851 in the review's run, predictions 0.033 apart."""

    def timeless(record: dict) -> dict:
        return {k: v for k, v in record.items() if "runtime" not in k and "per_second" not in k}

    _, metas = _ranks(run2 / "plainbn", 2)
    for meta in metas:
        trainer, headprep = meta["trainer"], meta["headprep"]
        assert len(trainer["evals"]) == len(headprep["evals"]) >= 3
        for ours, theirs in zip(headprep["evals"], trainer["evals"]):
            assert {k: ours[k] for k in timeless(theirs)} == timeless(theirs)
        assert {k: headprep["final"][k] for k in timeless(trainer["final"])} == timeless(trainer["final"])
        assert headprep["predictions"] == trainer["predictions"]
    assert metas[0]["dynamics"]["drift"], "the drift pass ran inside the comparison"


def test_an_earlier_runs_results_are_refused_on_every_rank(run2):
    _, metas = _ranks(run2 / "refuse", 2)
    assert [m["refusal"] is not None and "holds results of an earlier run" in m["refusal"] for m in metas] == [
        True
    ] * 2
    assert metas[0]["refusal"] == metas[1]["refusal"]
    assert [m["push_refusal"] is not None and "already holds README.md" in m["push_refusal"] for m in metas] == [
        True
    ] * 2


def test_a_search_with_hp_runs_every_trial_on_both_ranks(run2):
    # Trainer's Optuna search under DDP: rank 0 holds the study and the other rank follows each trial. Every trial
    # failed after the first with an AttributeError (the trainer's checks read the model the search had released).
    _, metas = _ranks(run2 / "search", 2)
    assert metas[0]["best"] is not None and set(metas[0]["best"]) == {"hp_epochs"} and metas[1]["best"] is None
    for number in range(2):
        run = run2 / "search" / "out" / f"run-{number}"
        dynamics = json.loads((run / "headprep_dynamics.json").read_text())
        assert dynamics["hp_epochs"] in (1, 2) and (run / "prepared_head" / "head.safetensors").is_file()
        finals = [load_file(str(run2 / "search" / f"trial{number}-rank{r}.safetensors")) for r in range(2)]
        assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])  # (the ranks trained one model)
    assert not (run2 / "search" / "out" / "headprep_dynamics.json").exists()
