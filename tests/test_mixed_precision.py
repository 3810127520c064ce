"""bf16 mixed precision (the recipes' GPU default) through every pass the trainer runs itself, on the CPU.

Accelerate applies autocast by wrapping `model.forward` when `train()` prepares the model; transformers 5's
`autocast_smart_context_manager` does nothing. The trainer's own passes must run in training's precision anyway: the
head called alone on bf16 inputs kept from a training forward (it crashed on an H100 with "mat1 and mat2 must have the
same dtype"), and the feature cache, computed before `train()` prepares the model (it was float32 while uncached HP
trained in bf16). CPU autocast runs the same code paths in bf16, so these run here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers.training_args
from conftest import TinyImages, bn_head_model, make_config, tiny_timm
from test_segmentation import TinySegmentation, tiny_deeplab
from test_segmentation import _config as segmentation_config

from headprep_hf import HeadPrepTrainer, SweepConfig, TauSweep
from headprep_hf.feature_cache import CachedHeadProbing
from headprep_hf.metrics import accuracy_metrics
from headprep_hf.tasks import base


@pytest.fixture(autouse=True)
def _no_onednn_bf16(monkeypatch):
    # torch 2.14.1's oneDNN bf16 kernels on this CI machine's CPU (AMD EPYC, AVX512-BF16) give inf/NaN gradients from
    # the second training run in one process on (plain transformers.Trainer, 4 runs of one model in one process: the
    # first finite, the next three with inf or NaN gradient norms; with oneDNN off, 4 equal finite runs). These tests
    # are about the toolkit's bf16 paths, not that bug: torch's native CPU kernels run them.
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


def _bf16_representable(t: torch.Tensor) -> bool:
    return torch.equal(t, t.bfloat16().float())


def _probe(tmp_path, name: str, **overrides) -> HeadPrepTrainer:
    args = make_config(tmp_path / name, bf16=True, hp_epochs=2, **overrides)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(40, seed=0))
    trainer.probe_head()
    return trainer


def test_energy_from_kept_bf16_head_inputs_equals_the_separate_pass(tmp_path):
    kept = _probe(tmp_path, "kept")
    passed = _probe(tmp_path, "pass", energy_from_hp_epoch=False)
    assert kept.dynamics["energy_source"] == "last HP epoch's head inputs"
    assert passed.dynamics["energy_source"] == "backbone pass"
    for key in ("energy", "hp_train_accuracy", "p0_mean"):
        assert kept.dynamics[key] == pytest.approx(passed.dynamics[key], rel=1e-6, abs=1e-7), key
    assert sorted(kept.dynamics["p0"]) == pytest.approx(sorted(passed.dynamics["p0"]), abs=1e-6)


def test_feature_cache_is_computed_in_the_training_precision(tmp_path):
    # Built before train() prepares the model, so outside Accelerate's autocast wrapper unless the trainer enters it.
    args = make_config(tmp_path / "c", bf16=True, hp_epochs=2, hp_cache_features=True)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(40, seed=0))
    cache = CachedHeadProbing(trainer).build_cache()
    assert _bf16_representable(cache.features)  # the pooled output of a bf16 backbone (float32: almost never)
    fp32 = HeadPrepTrainer(
        model=tiny_timm(), args=make_config(tmp_path / "f", hp_epochs=2, hp_cache_features=True),
        train_dataset=TinyImages(40, seed=0),
    )  # fmt: skip
    reference = CachedHeadProbing(fp32).build_cache().features
    assert not _bf16_representable(reference)  # the check above can fail
    torch.testing.assert_close(cache.features, reference, rtol=0.05, atol=0.05)  # the same features, rounded


def test_cached_and_uncached_hp_agree_under_bf16(tmp_path):
    uncached = _probe(tmp_path, "u")
    cached = _probe(tmp_path, "c", hp_cache_features=True)
    a, b = uncached.hp_state_dict(), cached.hp_state_dict()
    for key in a:  # both trained in bf16 (the backbone ran at different batch sizes: bf16 tolerance)
        torch.testing.assert_close(b[key], a[key], rtol=0.02, atol=0.02)
    assert cached.dynamics["energy"] == pytest.approx(uncached.dynamics["energy"], rel=0.02)


def test_segmentation_hp_and_ft_under_bf16(tmp_path):
    train = TinySegmentation(12)
    args = segmentation_config(tmp_path, bf16=True, hp_epochs=2, num_train_epochs=1)
    trainer = HeadPrepTrainer(model=tiny_deeplab(), args=args, train_dataset=train)
    trainer.train()
    assert math.isfinite(trainer.dynamics["energy"]) and trainer.dynamics["drift"]
    assert all(math.isfinite(v) for v in trainer.dynamics["drift"][-1].values() if isinstance(v, float))


@pytest.mark.slow  # a sweep: cached HP, BatchNorm in the head (statistics over the cache), two FT jobs, exchange
def test_bf16_sweep_with_a_batchnorm_head_and_the_exchange(tmp_path):
    values = make_config(tmp_path).to_dict()
    keep = ("per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate", "hp_learning_rate", "seed")
    config = SweepConfig(
        output_dir=str(tmp_path / "sweep"), **{k: values[k] for k in keep}, use_cpu=True, report_to="none",
        save_strategy="no", bf16=True, sweep_taus=[0, 2], hp_cache_features=True, drift_probe_samples=8,
        sweep_exchange=True, sweep_report=False, disable_tqdm=True,
    )  # fmt: skip
    TauSweep(
        bn_head_model(), config, TinyImages(32, seed=0), TinyImages(16, seed=1), compute_metrics=accuracy_metrics()
    ).run()
    exchange = json.loads((tmp_path / "sweep" / "exchange.json").read_text())
    values = [v for row in exchange["validation_accuracy"] + exchange["train_accuracy"] for v in row]
    assert len(values) == 8 and all(0.0 <= v <= 1.0 for v in values)


def _parse(argv):
    import image_classification

    return image_classification.parse_args(image_classification.make_parser(), argv)[1]


@pytest.fixture
def recipes_path(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "recipes"))


def test_recipe_decides_bf16_where_the_device_supports_it(recipes_path, monkeypatch, tmp_path):
    out = ["--output_dir", str(tmp_path / "o")]
    on_cpu = _parse(out)
    assert on_cpu.bf16 is False and on_cpu.mixed_precision == "no"  # this machine: no CUDA
    # As on an A100/H100: ours and transformers' check (which refuses bf16 without a GPU) say yes; nothing trains.
    monkeypatch.setattr(base, "cuda_supports_bf16", lambda: True)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    gpu = _parse(out)
    assert gpu.bf16 is True and gpu.mixed_precision == "bf16"  # what Accelerate reads
    assert _parse(out + ["--bf16", "false"]).mixed_precision == "no"  # the user decides
    assert _parse(out + ["--use_cpu", "true"]).bf16 is False
    monkeypatch.setattr(base, "cuda_supports_bf16", lambda: False)  # e.g. a V100
    assert _parse(out).bf16 is False


def test_emulated_bf16_is_not_a_default(monkeypatch):
    """A T4 or V100 (compute capability 7.x): torch's `is_bf16_supported()` answers yes by default (bf16 tensors can be
    made, by emulation), and the recipes turned bf16 on there, where it is slower than float32. Only native bf16
    counts; both kinds of device are simulated (this machine has no CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native in (False, True):
        monkeypatch.setattr(
            torch.cuda,
            "is_bf16_supported",
            lambda including_emulation=True, native=native: native or including_emulation,
        )
        assert base.cuda_supports_bf16() is native


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_head_gradient_norm_is_the_unscaled_one_under_a_gradient_scaler(tmp_path, max_grad_norm):
    # fp16 on a GPU: Accelerate's GradScaler multiplies the loss, so the gradients stay scaled until Trainer unscales
    # them for its gradient norm; the head gradient norm, read after the backward (before clipping, like Trainer's
    # `grad_norm`), was 1024 times the true one here. Simulated on the CPU with torch's CPU GradScaler on the
    # accelerator (the object and calls Accelerate uses on a GPU; fp16 autocast on the CPU). Reference: the norm of
    # the head's gradients where the optimizer reads them (Trainer has unscaled them by then), divided by the
    # clipping factor torch's `clip_grad_norm_` applied (from Trainer's logged pre-clipping `grad_norm`).
    from transformers import TrainerCallback

    class HeadGradients(TrainerCallback):
        def __init__(self, trainer):
            self.trainer, self.norms = trainer, {}

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads = [p.grad for name, p in self.trainer.model.named_parameters() if name.startswith("fc.")]
            self.norms[state.global_step + 1] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    args = make_config(tmp_path, fp16=True, max_grad_norm=max_grad_norm, num_train_epochs=2)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(48))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.accelerator.native_amp = True
    reference = HeadGradients(trainer)
    trainer.add_callback(reference)
    trainer.train()
    total = {r["step"]: r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r}
    expected = []
    for record in trainer.dynamics["head_grad_norm"]:  # (logging every update: one record per FT update)
        step = record["step"]
        clip = min(1.0, max_grad_norm / (total[step] + 1e-6)) if max_grad_norm > 0 else 1.0
        expected.append(reference.norms[step] / clip)
    assert len(expected) == 6 and (max_grad_norm == 0 or any(total[s] > max_grad_norm for s in total))
    assert [r["value"] for r in trainer.dynamics["head_grad_norm"]] == pytest.approx(expected, rel=1e-5)


def test_cached_hp_takes_its_loss_on_float32_logits_as_uncached_hp_under_bf16(tmp_path):
    # Accelerate's autocast wrapper hands the uncached loss float32 logits; cached HP computed it on the head's bf16
    # logits: after 3 HP epochs the heads differed by 0.05 (2.4% of HP's change to the head) with accumulation 2.
    heads = []
    for cached in (False, True):
        args = make_config(tmp_path / str(cached), bf16=True, hp_epochs=3, hp_cache_features=cached,
                           track_dynamics=False, gradient_accumulation_steps=2)  # fmt: skip
        trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(50))
        trainer.probe_head()
        heads.append(trainer.hp_state_dict()["fc.weight"])
    assert torch.allclose(heads[0], heads[1], atol=1e-6)


def test_the_exchange_under_bf16_scores_every_head_with_its_own_weights(tmp_path, monkeypatch):
    # The heads were swapped into the model in place inside one autocast context per batch, and autocast keeps its
    # bf16 copies of the weights until that context ends: every head ran with the first one's weights, and each row
    # of the matrix repeated its first cell. The heads here differ by a permutation of the classes only, so the
    # columns must differ; each cell is checked against the whole model with that backbone and head, in bf16.
    from safetensors.torch import save_file

    import headprep_hf.sweep as sweep_module
    from headprep_hf.exchange import head_exchange

    taus, base_state = [0, 1, 2], tiny_timm().state_dict()
    states = {}
    for tau in taus:
        state = {k: v.detach().clone() for k, v in base_state.items()}
        state["fc.weight"], state["fc.bias"] = state["fc.weight"].roll(tau, 0), state["fc.bias"].roll(tau, 0)
        states[tau] = state
        (tmp_path / f"tau_{tau}" / "seed_0").mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(tmp_path / f"tau_{tau}" / "seed_0" / "model.safetensors"),
        )
    record = {"complete": True, "seeds": [0], "taus": taus, "fingerprint": None,
              "results": [{"tau": t, "seed": 0, "output_dir": f"tau_{t}/seed_0"} for t in taus]}  # fmt: skip
    monkeypatch.setattr(sweep_module, "load_sweep", lambda folder: record)  # (the folder's sweep.json, as read)
    values = make_config(tmp_path / "m").to_dict()
    keep = ("per_device_train_batch_size", "per_device_eval_batch_size", "seed")
    config = SweepConfig(output_dir=str(tmp_path / "o"), **{k: values[k] for k in keep}, use_cpu=True,
                         report_to="none", bf16=True, sweep_taus=taus, measure_batch_size=8)  # fmt: skip
    val = TinyImages(30, seed=1)
    exchange = head_exchange(tiny_timm(), tmp_path, TinyImages(30, seed=0), val, config, output_file=tmp_path / "e")
    x, y = val.x, torch.as_tensor(val.labels)
    for i in taus:
        for j in taus:
            model = tiny_timm()
            model.load_state_dict({**states[i], "fc.weight": states[j]["fc.weight"], "fc.bias": states[j]["fc.bias"]})
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                accuracy = (model.eval()(x).argmax(-1) == y).float().mean().item()
            assert exchange["validation_accuracy"][i][j] == pytest.approx(accuracy, abs=1e-6), (i, j)
    assert len(set(exchange["validation_accuracy"][0])) == 3  # (the permuted heads score differently)
