"""The non-finite guard: NaN/inf inputs or logits stop the run with a named cause; nothing non-finite is written."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyImages, bn_head_model, make_config, tiny_timm
from safetensors.torch import load_file
from transformers import TrainerCallback

from headprep_hf import HeadPrepTrainer
from headprep_hf.guard import NonFiniteError


class NaNLogitsAt(TrainerCallback):
    """Makes the model's logits NaN during update `step` (a forward hook on the head)."""

    def __init__(self, model, step):
        self.step, self.on = step, False
        model.fc.register_forward_hook(lambda module, args, out: out * float("nan") if self.on else out)

    def on_step_begin(self, args, state, control, **kwargs):
        self.on = state.global_step == self.step

    def on_step_end(self, args, state, control, **kwargs):
        self.on = False


def _nonfinite_files(folder) -> list[str]:
    bad = []
    for path in folder.rglob("*.safetensors"):
        bad += [
            f"{path}:{k}" for k, v in load_file(path).items() if v.is_floating_point() and not torch.isfinite(v).all()
        ]
    return bad


def _trainer(tmp_path, train=None, **overrides):
    args = make_config(tmp_path, **{"save_strategy": "steps", "save_steps": 2, **overrides})
    return HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train or TinyImages(48, seed=0))


def test_inf_input_stops_head_probing_naming_the_sample(tmp_path):
    data = TinyImages(48, seed=0)
    data.x[5, 0, 3, 3] = float("inf")
    trainer = _trainer(tmp_path, data)
    with pytest.raises(NonFiniteError, match=r"\(HP\).*sample 5 'pixel_values'") as error:
        trainer.train()
    assert "5" in str(error.value).split("training samples")[1]
    out = tmp_path / "out"
    assert _nonfinite_files(out) == [] and not (out / "prepared_head").exists()


class _NumpyImages(TinyImages):
    """The same items with numpy values (as `datasets`' `with_format("numpy")` gives)."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "pixel_values": item["pixel_values"].numpy()}


@pytest.mark.parametrize("kind", ["numpy-items", "cached-hp"])
def test_inf_input_is_named_in_numpy_items_and_in_cached_head_probing(tmp_path, kind):
    # Numpy values were not inspected (8 samples named, not the one holding inf); with cached HP an inf in the first
    # cache batch was blamed on the model's head ("does not give the model's logits ... GPT-2's score ...").
    data = _NumpyImages(48, seed=0) if kind == "numpy-items" else TinyImages(48, seed=0)
    data.x[5, 0, 3, 3] = float("inf")
    trainer = _trainer(tmp_path, data, hp_cache_features=kind == "cached-hp")
    with pytest.raises(NonFiniteError, match=r"\(HP\).*sample 5 'pixel_values'"):
        trainer.train()


def test_skip_policy_leaves_a_non_finite_sample_out_of_the_batchnorm_statistics_too(tmp_path):
    # HP dropped the bad updates, then the end-of-HP statistics pass read the sample: the head's BatchNorm statistics
    # became NaN and the run stopped at writing the prepared head ("Training diverged; ...").
    data = TinyImages(24, seed=0)
    data.x[7, 0, 3, 3] = float("inf")
    args = make_config(tmp_path, on_nonfinite="skip", num_train_epochs=1, per_device_train_batch_size=8)
    trainer = HeadPrepTrainer(model=bn_head_model(), args=args, train_dataset=data)
    trainer.train()
    norm = trainer.model.fc[1]
    assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
    assert (tmp_path / "out" / "prepared_head").is_dir() and _nonfinite_files(tmp_path / "out") == []


@pytest.mark.parametrize("step, stage", [(3, "HP"), (8, "FT")])  # 3 updates per epoch, 2 HP epochs
def test_nan_logits_stop_the_run_before_anything_non_finite_is_written(tmp_path, step, stage):
    trainer = _trainer(tmp_path)
    trainer.add_callback(NaNLogitsAt(trainer.model, step))
    with pytest.raises(NonFiniteError, match=rf"update {step + 1} \({stage}\)"):
        trainer.train()
    out = tmp_path / "out"
    assert _nonfinite_files(out) == []
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved and max(saved) <= step  # the last good checkpoint stays; none after the bad update
    with pytest.raises(NonFiniteError, match="Not writing the model"):
        trainer.save_model()


class InfGradientAt(TrainerCallback):
    """Makes one backbone gradient inf during update `step` while the loss stays finite (a tensor hook)."""

    def __init__(self, model, step):
        self.step, self.on = step, False
        next(model.conv1.parameters()).register_hook(lambda grad: grad * float("inf") if self.on else grad)

    def on_step_begin(self, args, state, control, **kwargs):
        self.on = state.global_step == self.step


def test_an_inf_gradient_under_a_finite_loss_is_caught_from_trainers_own_gradient_norm(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, save_strategy="no")
    trainer.add_callback(InfGradientAt(trainer.model, 7))  # FT: 3 updates per epoch after 2 HP epochs
    own_norms = []
    original = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: own_norms.append(1) or original(*a, **k))
    received = []
    note = trainer.guard.note_grad_norm
    trainer.guard.note_grad_norm = lambda norm: received.append(float(norm)) or note(norm)
    with pytest.raises(NonFiniteError, match=r"update 8 \(FT\)"):
        trainer.train()
    # The guard read the norm Trainer computed for every update and computed none itself (the patched function is the
    # module attribute the guard calls; Trainer's clipping goes through torch.nn.utils.clip_grad_norm_).
    assert len(received) == 8 and received[-1] == math.inf and all(math.isfinite(v) for v in received[:-1])
    assert own_norms == []


def test_skip_policy_drops_the_update_and_counts_it(tmp_path):
    trainer = _trainer(tmp_path, on_nonfinite="skip")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.add_callback(NaNLogitsAt(trainer.model, 8))
    trainer.train()
    assert trainer.dynamics["skipped_updates"] == [{"stage": "ft", "update": 9}]
    assert all(math.isfinite(p["value"]) for p in trainer.dynamics["head_grad_norm"])  # the skipped norm left out
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.save_model()
    assert _nonfinite_files(tmp_path / "out") == []


def test_plain_runs_keep_trainers_behaviour_unless_asked(tmp_path):
    trainer = _trainer(tmp_path, hp_epochs=0, save_strategy="no")
    trainer.add_callback(NaNLogitsAt(trainer.model, 1))
    trainer.train()  # Trainer carries on (logging_nan_inf_filter); the guard is off by default without HP
    guarded = _trainer(tmp_path / "g", hp_epochs=0, save_strategy="no", on_nonfinite="raise")
    guarded.add_callback(NaNLogitsAt(guarded.model, 1))
    with pytest.raises(NonFiniteError, match=r"update 2 \(FT\)"):
        guarded.train()


def test_non_finite_energy_is_recorded_as_null_with_the_reason(tmp_path):
    trainer = _trainer(tmp_path, save_strategy="no")
    trainer.model.fc.register_forward_hook(lambda module, args, out: out * float("nan"))
    summary = trainer.measure_start()
    assert summary["energy"] is None and trainer.dynamics["energy"] is None
    assert "outputs on 48 training sample(s) are NaN/inf" in trainer.dynamics["nonfinite"][0]


def test_skip_policy_puts_back_the_running_statistics_the_dropped_update_changed(tmp_path):
    # A NaN input makes the forward's BatchNorm statistics NaN before the gradient says the update is dropped: "skip"
    # discarded the gradients only, so the run ended with 30 NaN buffers (and its next checkpoint was refused).
    model = tiny_timm()
    state = {"on": False}

    def nan_input(module, args):
        return (args[0] * float("nan"),) if state["on"] else None

    model.register_forward_pre_hook(nan_input)

    class At(TrainerCallback):
        def on_step_begin(self, args, state_, control, **kwargs):
            state["on"] = state_.global_step == 8
            if state["on"]:
                state["before"] = {k: v.clone() for k, v in model.named_buffers()}

        def on_step_end(self, args, state_, control, **kwargs):
            if state["on"]:
                state["after"] = {k: v.clone() for k, v in model.named_buffers()}
            state["on"] = False

    args = make_config(tmp_path, on_nonfinite="skip", save_strategy="steps", save_steps=3)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=TinyImages(48, seed=0), callbacks=[At()])
    trainer.train()
    assert trainer.dynamics["skipped_updates"] == [{"stage": "ft", "update": 9}]
    assert state["before"].keys() == state["after"].keys() and len(state["before"]) > 10
    assert all(torch.equal(state["before"][k], state["after"][k]) for k in state["before"])
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert _nonfinite_files(tmp_path / "out") == []


@pytest.mark.parametrize("bf16, onednn", [(True, True), (True, False), (False, True)])
def test_the_error_names_torchs_onednn_bf16_issue_only_where_it_can_be_the_cause(tmp_path, monkeypatch, bf16, onednn):
    # torch 2.14.1's oneDNN bf16 kernels gave inf/NaN gradients from the second training in one process on an
    # AVX512-BF16 CPU (README, bf16): the error says so under bf16 on the CPU with oneDNN on, and only there.
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", onednn)
    trainer = _trainer(tmp_path, bf16=bf16)
    trainer.add_callback(NaNLogitsAt(trainer.model, 1))
    with pytest.raises(NonFiniteError) as error:
        trainer.train()
    assert ("torch.backends.mkldnn.enabled = False" in str(error.value)) == (bf16 and onednn)


@pytest.mark.parametrize("where", ["fc.weight", "bn1.running_var"])
@pytest.mark.parametrize("cached", [False, True])
def test_a_model_given_with_nan_weights_is_named_before_training(tmp_path, where, cached):
    # A NaN in the given weights was reported as a diverged loss at update 1 ("lower the learning rate"); in a
    # BatchNorm buffer under hp_backbone_mode="train" it trained on and failed at the first checkpoint as divergence.
    from headprep_hf.guard import NonFiniteError

    model = tiny_timm()
    with torch.no_grad():
        model.state_dict()[where].view(-1)[0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mode = "eval" if cached else "train"  # (cached HP computes its features in eval mode)
    args = make_config(tmp_path, hp_epochs=1, hp_backbone_mode=mode, hp_cache_features=cached)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=TinyImages(24))
    with pytest.raises(
        NonFiniteError, match=rf"given to the trainer holds NaN or inf values before any update.*{where}"
    ):
        trainer.train()
    assert all(torch.equal(v, before[k]) or k == where for k, v in model.state_dict().items())  # (nothing trained)
    assert not any((tmp_path / "out").glob("checkpoint-*"))


class _MissingLabels(torch.utils.data.Dataset):
    """Multi-label items where NaN marks a missing label (the graph tasks' convention); inputs all finite."""

    def __init__(self, n=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x[:, :3] > 0).float()
        self.y[torch.rand(n, 3, generator=g) < 0.3] = float("nan")
        self.y[:, 0] = (self.x[:, 0] > 0).float()  # (every sample keeps one label)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_x": self.x[i], "labels": self.y[i]}


class _BatchNormHeadNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        self.fc = torch.nn.Sequential(
            torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
        )

    def forward(self, input_x):
        return self.fc(self.body(input_x))


def test_missing_labels_are_neither_skipped_inputs_nor_named_as_non_finite(tmp_path):
    # NaN labels (missing) made on_nonfinite="skip" leave every batch out of the end-of-HP BatchNorm pass, and the
    # prepared head was written with statistics reset to 0 and 1; and the guard's message listed every sample with a
    # missing label as holding non-finite input values, before (or instead of) the one that did.
    common = dict(problem_type="multi_label_classification", head_modules=["fc"], per_device_train_batch_size=8)
    heads = {}
    for policy in ("raise", "skip"):
        args = make_config(tmp_path / policy, on_nonfinite=policy, **common)
        trainer = HeadPrepTrainer(model=_BatchNormHeadNet(), args=args, train_dataset=_MissingLabels())
        trainer.probe_head()
        heads[policy] = {k: v.clone() for k, v in trainer.model.fc.state_dict().items()}
    assert int(heads["skip"]["1.num_batches_tracked"]) > 0
    assert all(torch.equal(heads["raise"][k], heads["skip"][k]) for k in heads["raise"])
    bad = _MissingLabels()
    bad.x[30, 1] = float("inf")
    trainer = HeadPrepTrainer(
        model=_BatchNormHeadNet(), args=make_config(tmp_path / "inf", **common), train_dataset=bad
    )
    with pytest.raises(NonFiniteError, match=r"Non-finite input values in: sample 30 'input_x'\. "):
        trainer.train()


def test_skip_leaves_out_the_samples_not_the_batch_from_the_batchnorm_pass(tmp_path):
    # With the whole training set in one measurement batch, the batch holding the NaN sample was left out, the pass
    # ran over no batch, and the statistics were reset to 0 and 1 (cached HP: the NaN row made them NaN, and the run
    # stopped at the prepared head). Now the pass leaves out the sample (the cached row).
    reference = None
    for cached in (False, True):
        train = TinyImages(16)
        train.x[5] = float("nan")
        args = make_config(
            tmp_path / str(cached), on_nonfinite="skip", hp_cache_features=cached, measure_batch_size=64
        )
        trainer = HeadPrepTrainer(model=bn_head_model(), args=args, train_dataset=train)
        trainer.probe_head()
        bn = trainer.model.fc[1]
        assert int(bn.num_batches_tracked) == 1 and torch.isfinite(bn.running_var).all()
        clean = TinyImages(16)
        keep = [i for i in range(16) if i != 5]
        expected = _bn_input_statistics(trainer.model, clean.x[keep])
        assert torch.allclose(bn.running_mean, expected[0], atol=1e-5)
        reference = reference if reference is not None else bn.running_mean.clone()
        assert torch.allclose(bn.running_mean, reference, atol=1e-5)  # (cached and uncached agree)


def test_skip_leaves_out_a_batch_left_with_one_sample(tmp_path):
    # 18 samples at measure batch 8: the last batch is samples 16 and 17; with 17 NaN, one sample was left, which a
    # train-mode BatchNorm cannot take ("Expected more than 1 value per channel").
    train = TinyImages(18)
    train.x[17] = float("nan")
    args = make_config(tmp_path, on_nonfinite="skip", measure_batch_size=8)
    trainer = HeadPrepTrainer(model=bn_head_model(), args=args, train_dataset=train)
    trainer.probe_head()
    assert int(trainer.model.fc[1].num_batches_tracked) == 2


class _UnusedNormHead(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.aux_norm = torch.nn.BatchNorm1d(n)  # (registered first, never called)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
        )

    def forward(self, x):
        return self.net(x)


def test_a_batchnorm_the_forward_does_not_call_is_no_pass_over_no_batch(tmp_path):
    model = tiny_timm()
    model.fc = _UnusedNormHead(model.num_features)
    trainer = HeadPrepTrainer(model=model, args=make_config(tmp_path), train_dataset=TinyImages(16))
    trainer.probe_head()
    assert int(model.fc.net[1].num_batches_tracked) == 1


def _bn_input_statistics(model, x):
    """Mean and (unbiased) variance of the head's BatchNorm input over `x`, by hand (eval-mode backbone)."""
    model.eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        hidden = model.fc[0](features)
    return hidden.mean(0), hidden.var(0, unbiased=True)


@pytest.mark.parametrize("policy", [None, "raise"])
def test_save_model_before_any_run_refuses_non_finite_weights(tmp_path, policy):
    # The guard starts with a run: a trainer built to export a model (after load_prepared_head, say) wrote and
    # uploaded NaN weights, even with on_nonfinite="raise", and save_prepared_head() blamed a diverged training.
    model = tiny_timm()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    trainer = HeadPrepTrainer(
        model=model, args=make_config(tmp_path, on_nonfinite=policy), train_dataset=TinyImages(8)
    )
    with pytest.raises(NonFiniteError, match=r"\(fc\.weight\)\. No update has run: the weights came so"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "model.safetensors").exists()


class _InfWithoutGrad(torch.nn.Module):
    """Finite in training; inf features in the no-grad passes (the measurements')."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_timm()
        self.fc = self.inner.fc
        self.inner.fc = torch.nn.Identity()

    def forward(self, pixel_values):
        z = self.inner(pixel_values)
        if not torch.is_grad_enabled():
            z = z + float("inf")
        return self.fc(z)


def test_a_non_finite_z0_is_not_written_into_checkpoints(tmp_path):
    args = make_config(tmp_path, head_modules=["fc"], save_strategy="epoch", num_train_epochs=2)
    trainer = HeadPrepTrainer(model=_InfWithoutGrad(), args=args, train_dataset=TinyImages(16))
    trainer.train()
    assert "holds NaN/inf" in trainer.dynamics["drift_not_measured"] and "drift" not in trainer.dynamics
    written = list((tmp_path / "out").rglob("*.safetensors"))
    assert written and all(all(torch.isfinite(t).all() for t in load_file(str(p)).values()) for p in written)


def test_accuracy_of_non_finite_logits_is_nan(caplog):
    # argmax read a NaN row as class 0: a plausible accuracy, by which load_best_model_at_end chose a checkpoint.
    from transformers import EvalPrediction

    from headprep_hf.metrics import accuracy_metrics

    logits = torch.tensor([[0.1, 0.9], [float("nan"), 0.2], [0.7, 0.3]]).numpy()
    labels = torch.tensor([1, 0, 0]).numpy()
    with caplog.at_level("WARNING"):
        assert math.isnan(accuracy_metrics()(EvalPrediction(predictions=logits, label_ids=labels))["accuracy"])
    assert "1 evaluation sample(s) are NaN/inf (samples [1])" in caplog.text
    good = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.7, 0.3]]).numpy()
    assert accuracy_metrics()(EvalPrediction(predictions=good, label_ids=labels))["accuracy"] == 1.0
