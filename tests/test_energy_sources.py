"""The start-of-FT energy from the head inputs the last uncached HP epoch kept equals the separate pass's, and the
drift probe's default size follows its rule."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyImages, make_config, tiny_timm

from headprep_hf import HeadPrepTrainer
from headprep_hf.measurements import default_probe_size


class CountingImages(TinyImages):
    """TinyImages (no augmentation: every read is the same view) that counts its reads."""

    reads = 0

    def __getitem__(self, i: int) -> dict:
        CountingImages.reads += 1
        return super().__getitem__(i)


def _run(tmp_path, name: str, n: int = 40, **overrides):
    data = CountingImages(n, seed=0)
    model = tiny_timm()
    args = make_config(tmp_path / name, hp_epochs=2, num_train_epochs=1, **overrides)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=data)
    reads = {}

    original = trainer.measurements.measure_start

    def timed():
        before = CountingImages.reads
        try:
            return original()
        finally:
            reads["measure_start"] = CountingImages.reads - before

    trainer.measurements.measure_start = timed
    trainer.probe_head()
    return trainer, reads["measure_start"]


@pytest.mark.parametrize("head_type", ["linear", "mlp"])
def test_energy_from_last_hp_epoch_equals_separate_pass(tmp_path, head_type):
    # n = 40 with batch 16: a short last batch, so the kept micro-batches are not all the same size.
    kept, kept_reads = _run(tmp_path, "kept", head_type=head_type)
    passed, pass_reads = _run(tmp_path, "pass", head_type=head_type, energy_from_hp_epoch=False)
    assert kept.dynamics["energy_source"] == "last HP epoch's head inputs"
    assert kept.dynamics["p0_order"] == "dataset"  # put back in dataset order (it was the epoch's order)
    assert passed.dynamics["energy_source"] == "backbone pass" and passed.dynamics["p0_order"] == "dataset"
    # Same HP (the recorder only reads): identical heads; the measurements agree to float tolerance.
    for (name, a), b in zip(kept.model.state_dict().items(), passed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for key in ("energy", "hp_train_accuracy", "p0_mean"):
        assert kept.dynamics[key] == pytest.approx(passed.dynamics[key], rel=1e-6, abs=1e-7), key
    assert kept.dynamics["num_energy_samples"] == passed.dynamics["num_energy_samples"] == 40
    # p0 holds the same values in the same (dataset) order: a resume inside the last HP epoch, which measures by a
    # separate pass, writes the same list.
    assert kept.dynamics["p0"] == pytest.approx(passed.dynamics["p0"], abs=2e-6)
    assert kept.dynamics["p0_histogram"] == passed.dynamics["p0_histogram"]
    # No pass over the training set: only the drift probe is read (default size for 40 samples: all 40).
    probe = kept.dynamics["num_probe_samples"]
    assert kept_reads == probe and pass_reads == 40 + probe
    assert kept.measurements.hp_epoch_inputs is None  # released after use


@pytest.mark.parametrize(
    "overrides, why",
    [
        ({"dataloader_drop_last": True}, "the last HP epoch read 32 of 40 samples"),
        ({"reinit_modules": ["layer2"]}, "re-initialised blocks move the head inputs during HP"),
        ({"energy_max_samples": 20}, "the energy is asked for on a subset"),
        ({"hp_backbone_mode": "train"}, "BatchNorm statistics move during HP"),
    ],
)
def test_separate_pass_where_kept_inputs_are_not_exact(tmp_path, overrides, why):
    trainer, reads = _run(tmp_path, "x", **overrides)
    assert trainer.dynamics["energy_source"] == "backbone pass", why
    assert reads > trainer.dynamics["num_probe_samples"], why
    assert trainer.dynamics["num_energy_samples"] == (20 if "energy_max_samples" in overrides else 40), why


def test_energy_from_hp_epoch_after_gradient_accumulation(tmp_path):
    kept, _ = _run(tmp_path, "kept", gradient_accumulation_steps=2, per_device_train_batch_size=8)
    passed, _ = _run(
        tmp_path, "pass", gradient_accumulation_steps=2, per_device_train_batch_size=8, energy_from_hp_epoch=False
    )
    assert kept.dynamics["energy_source"] == "last HP epoch's head inputs"
    assert kept.dynamics["energy"] == pytest.approx(passed.dynamics["energy"], rel=1e-6)


def test_train_with_hp_uses_kept_inputs_and_evaluation_is_not_recorded(tmp_path):
    data, evaluation = TinyImages(40, seed=0), TinyImages(24, seed=1)
    results = {}
    for flag in (True, False):
        args = make_config(
            tmp_path / str(flag), hp_epochs=2, eval_strategy="epoch", energy_from_hp_epoch=flag, num_train_epochs=1
        )
        trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=data, eval_dataset=evaluation)
        trainer.train()
        results[flag] = trainer.dynamics
    assert results[True]["energy_source"] == "last HP epoch's head inputs"
    assert results[True]["num_energy_samples"] == 40  # the evaluation passes of the HP epochs were not kept
    assert results[True]["energy"] == pytest.approx(results[False]["energy"], rel=1e-6)


@pytest.mark.parametrize(
    "n, expected", [(10, 10), (64, 64), (100, 64), (900, 64), (1600, 100), (4096, 256), (10**6, 256)]
)
def test_default_probe_size_rule(n, expected):
    assert default_probe_size(n) == expected


def test_default_probe_size_is_used_and_explicit_value_kept(tmp_path):
    data = TinyImages(200, seed=0)
    for value, expected in ((None, 64), (30, 30)):
        args = make_config(tmp_path / str(value), hp_epochs=0, drift_probe_samples=value)
        trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=data)
        trainer.measure_start()
        assert trainer.dynamics["num_probe_samples"] == expected


class _InplaceHeadNet(torch.nn.Module):
    """A backbone and a head whose first op works in place on its input (torchvision EfficientNet's classifier is
    `Sequential(Dropout(p, inplace=True), Linear)`; MobileNetV3's starts with `Hardswish(inplace=True)` after a
    Linear)."""

    def __init__(self, first: torch.nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )
        self.classifier = torch.nn.Sequential(first, torch.nn.Linear(8, 3))

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.mark.parametrize("first", ["dropout", "hardswish"])
def test_a_head_changing_its_input_in_place_leaves_the_kept_inputs_alone(tmp_path, first):
    # The kept head inputs (energy, drift probe z, feature cache) were the head's input tensor itself: an in-place
    # first op turned them into its output (dropped-out and rescaled in training mode, hardswish'd in eval mode).
    # Reference: the head input and the energy computed here in plain torch at the same weights.
    op = torch.nn.Dropout(0.5, inplace=True) if first == "dropout" else torch.nn.Hardswish(inplace=True)
    data = TinyImages(40, seed=0)
    args = make_config(tmp_path, hp_epochs=2, num_train_epochs=1, head_modules=["classifier"])
    trainer = HeadPrepTrainer(model=_InplaceHeadNet(op), args=args, train_dataset=data)
    trainer.probe_head()  # (ends with the start-of-FT measurements)
    assert trainer.dynamics["energy_source"] == "last HP epoch's head inputs"
    model = trainer.model.eval()
    x = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
    with torch.no_grad():
        z = model.features(x)
        p = torch.softmax(model.classifier(z.clone()), dim=-1)
    e_y = torch.nn.functional.one_hot(torch.as_tensor(data.labels), 3).float()
    assert trainer.dynamics["energy"] == pytest.approx(float((e_y - p).norm(dim=1).mean()), rel=1e-5)
    probe = trainer.measurements._probe()  # the probe's z: the head's input, not the head's first output
    from headprep_hf.measurements import spread_indices

    assert torch.allclose(probe, z[spread_indices(len(data), len(probe))], atol=1e-6)


def test_a_sampler_drawing_with_replacement_gets_the_separate_pass(tmp_path):
    # The kept inputs were trusted when their count equalled the training set's: a class-balancing sampler drawing
    # with replacement passes that count with repeated and missing samples (energy 0.5361 instead of 0.5351).
    class Balanced(HeadPrepTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            n = len(self.train_dataset)
            return torch.utils.data.WeightedRandomSampler(torch.ones(n), n, replacement=True)

    def run(name, **overrides):
        args = make_config(tmp_path / name, hp_epochs=2, num_train_epochs=1, **overrides)
        trainer = Balanced(model=tiny_timm(), args=args, train_dataset=TinyImages(48))
        trainer.probe_head()
        return trainer.dynamics

    kept, passed = run("default"), run("pass", energy_from_hp_epoch=False)
    assert kept["energy_source"] == passed["energy_source"] == "backbone pass"
    assert kept["energy"] == passed["energy"] and kept["hp_train_accuracy"] == passed["hp_train_accuracy"]


def test_a_non_finite_energy_from_the_last_hp_epoch_names_the_dataset_index(tmp_path):
    # The note named the sample's position in the last HP epoch's order (3) as if it were its index (20).
    class InfImages(TinyImages):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.x[20, 0, 0, 0] = float("inf")

    args = make_config(tmp_path, hp_epochs=2, on_nonfinite="skip")
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=InfImages(24, seed=0))
    trainer.train()
    assert trainer.dynamics["energy_source"] == "last HP epoch's head inputs"
    assert trainer.dynamics["nonfinite"] == [
        "energy at step 4: the outputs on 1 training sample(s) are NaN/inf (samples [20])",
        # (the 20-sample probe, evenly spaced, holds sample 20: z_0 is not finite, and is dropped, not written)
        "z_0 (the probe's features at the start of FT) holds NaN/inf: the drift is not measured",
    ]
