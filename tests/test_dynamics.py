"""Acceptance 3: energy and drift computed independently in plain torch match trainer.dynamics."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyImages, make_config, tiny_timm
from transformers import TrainerCallback

from headprep_hf import HeadPrepTrainer, cross_entropy_energy, drift_metrics
from headprep_hf.dynamics import histogram


def _features(model, x):
    model.eval()
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _energy_by_hand(model, x, y):
    model.eval()
    with torch.no_grad():
        p = model(x).softmax(dim=-1)
    one_hot = torch.nn.functional.one_hot(torch.as_tensor(y), p.shape[1]).float()
    energy = (one_hot - p).norm(dim=1)
    p_true = p[torch.arange(len(y)), torch.as_tensor(y)]
    accuracy = (p.argmax(1) == torch.as_tensor(y)).float()
    return energy.mean().item(), accuracy.mean().item(), p_true


@pytest.mark.parametrize("hp_epochs", [0, 2])
def test_energy_and_drift_match_plain_torch(tmp_path, train_set, hp_epochs):
    model = tiny_timm()
    args = make_config(
        tmp_path,
        hp_epochs=hp_epochs,
        num_train_epochs=2,
        hp_label_smoothing=0.2,
        drift_probe_samples=20,
        per_device_eval_batch_size=7,
    )
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=train_set)
    trainer.probe_head()
    start = copy.deepcopy(model)  # the state FT starts from
    trainer.finetune()

    energy, accuracy, p_true = _energy_by_hand(start, train_set.x, train_set.labels)
    dyn = trainer.dynamics
    assert dyn["energy"] == pytest.approx(energy, rel=1e-5, abs=1e-6)
    assert dyn["hp_train_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert torch.allclose(torch.tensor(dyn["p0"]), p_true, atol=1e-5)
    assert dyn["num_energy_samples"] == len(train_set)
    assert sum(dyn["p0_histogram"]["counts"]) == len(train_set)

    probe = [i * len(train_set) // 20 for i in range(20)]  # evenly spaced over the set, computed here by hand
    z0 = _features(start, train_set.x[probe])
    zt = _features(model, train_set.x[probe])
    expected = {
        "sq_dist": ((zt - z0) ** 2).sum(1).mean().item(),
        "dot": (zt * z0).sum(1).mean().item(),
        "sq_norm": (zt**2).sum(1).mean().item(),
        "cos": torch.nn.functional.cosine_similarity(zt, z0, dim=1).mean().item(),
    }
    final = dyn["drift"][-1]
    assert final["step"] == trainer.state.global_step
    for key, value in expected.items():
        assert final[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert expected["sq_dist"] > 0  # FT moved the features: the comparison is not trivial


def _kept_backbone_features(model, x):
    """test_resnet's output before layer4, spatially averaged: z = f(x; B) when layer4 is re-initialised."""
    model.eval()
    with torch.no_grad():
        x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        return model.layer3(model.layer2(model.layer1(x))).mean((2, 3))


def test_with_reinit_modules_drift_and_head_gradient_are_the_papers(tmp_path, train_set):
    # z was the classifier's input, after the re-initialised layer4: the drift then measured how far the freshly
    # trained blocks moved (x12 from tau 0 to 3 on this model), not the kept backbone's features, which the paper
    # measures (re-initialised blocks are part of the head); the head gradient left them out.
    model = tiny_timm()
    args = make_config(tmp_path, hp_epochs=2, num_train_epochs=1, reinit_modules=["layer4"], drift_probe_samples=20)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=train_set)
    trainer.probe_head()
    start = copy.deepcopy(model)
    trainer.finetune()
    probe = [i * len(train_set) // 20 for i in range(20)]
    z0, zt = _kept_backbone_features(start, train_set.x[probe]), _kept_backbone_features(model, train_set.x[probe])
    final = trainer.dynamics["drift"][-1]
    assert final["sq_dist"] == pytest.approx(((zt - z0) ** 2).sum(1).mean().item(), rel=1e-5, abs=1e-6)
    assert final["cos"] == pytest.approx(F.cosine_similarity(zt, z0, dim=1).mean().item(), rel=1e-5, abs=1e-6)
    head = {id(p) for p in [*model.fc.parameters(), *model.layer4.parameters()]}
    assert {id(p) for p in trainer.measurements._head_params} == head


class _UncalledFirst(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.aux = torch.nn.Conv2d(3, 3, 1)  # (first in the model's order, never called)
        self.net = tiny_timm()

    def forward(self, pixel_values):
        return self.net(pixel_values)


def test_a_reinit_module_the_forward_does_not_call_falls_back_to_the_heads_input(tmp_path, train_set):
    # It failed after HP with "The model's forward did not call the head ['net.fc']".
    args = make_config(tmp_path, hp_epochs=1, head_modules=["net.fc"], reinit_modules=["aux", "net.layer4"])
    trainer = HeadPrepTrainer(model=_UncalledFirst(), args=args, train_dataset=train_set)
    with pytest.warns(UserWarning, match=r"z is read at the head's input.*the forward does not call it"):
        trainer.train()
    assert trainer.measurements.drift_z == "head input" and trainer.dynamics["drift"]


def test_a_z0_read_after_the_reinit_blocks_by_an_earlier_version_is_not_resumed(tmp_path, train_set):
    # The two definitions of z can have one shape (a re-initialised block that keeps the width): the resumed drift
    # compared the old z_0 with the new z_t, 25 -> 54, without a word.
    from safetensors.torch import load_file, save_file

    common = dict(hp_epochs=1, num_train_epochs=2, reinit_modules=["layer4"], save_strategy="epoch")
    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, **common), train_dataset=train_set)
    trainer.train()
    checkpoint = sorted((tmp_path / "out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0]
    features = checkpoint / "headprep_measurements.safetensors"
    save_file(load_file(str(features)), str(features), metadata={"probe": "evenly spaced"})  # (as written before)
    from headprep_hf.checkpoints import WRITING_NAME, commit

    (checkpoint / WRITING_NAME).write_text("")  # (the file changed: committed again, as its writer would have)
    commit(str(checkpoint))
    resumed = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, **common), train_dataset=train_set)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert "z_0 was read after the re-initialised blocks" in resumed.dynamics["drift_not_measured"]


def test_drift_dataset_is_used_for_z(tmp_path, train_set, eval_set):
    trainer = HeadPrepTrainer(
        model=tiny_timm(), args=make_config(tmp_path, hp_epochs=0), train_dataset=train_set, drift_dataset=eval_set
    )
    trainer.train()
    assert trainer.dynamics["num_probe_samples"] == len(eval_set)
    assert trainer.dynamics["num_energy_samples"] == len(train_set)


def test_energy_max_samples(tmp_path, train_set):
    trainer = HeadPrepTrainer(
        model=tiny_timm(),
        args=make_config(tmp_path, hp_epochs=0, energy_max_samples=10, drift_probe_samples=15),
        train_dataset=train_set,
    )
    summary = trainer.measure_start()
    subset = [i * len(train_set) // 10 for i in range(10)]  # evenly spaced, not the first 10
    energy, _, _ = _energy_by_hand(trainer.model, train_set.x[subset], torch.as_tensor(train_set.labels)[subset])
    assert summary["energy"] == pytest.approx(energy, rel=1e-5)
    assert trainer.dynamics["num_energy_samples"] == 10 and trainer.dynamics["num_probe_samples"] == 15


def test_pure_functions():
    z0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    zt = torch.tensor([[2.0, 0.0], [0.0, -2.0]])
    m = drift_metrics(z0, zt)
    assert m == pytest.approx({"sq_dist": (1 + 16) / 2, "dot": (2 - 4) / 2, "sq_norm": (4 + 4) / 2, "cos": 0.0})
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    stats = cross_entropy_energy(logits, torch.tensor([0, 0]))
    assert stats["energy"][0].item() == pytest.approx(2**0.5 / 2)
    assert stats["energy"][1].item() == pytest.approx(0.0, abs=1e-6)
    # dense logits with an ignored pixel: mean over the valid positions only
    dense = torch.zeros(1, 2, 1, 2)
    dense[0, 0, 0, 1] = 100.0
    stats = cross_entropy_energy(dense, torch.tensor([[[-100, 0]]]))
    assert stats["energy"].item() == pytest.approx(0.0, abs=1e-6)
    assert histogram(torch.tensor([0.0, 0.5, 1.0]), bins=2)["counts"] == [1, 2]


class NoisyImages(torch.utils.data.Dataset):
    """Random augmentation on access (torch's global RNG), like a training set with transforms."""

    def __init__(self, base):
        self.base, self.labels = base, base.labels

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = self.base[i]
        return {**item, "pixel_values": item["pixel_values"] + 0.5 * torch.randn_like(item["pixel_values"])}


def test_drift_of_unchanged_weights_is_zero_under_augmentation(tmp_path, train_set):
    trainer = HeadPrepTrainer(
        model=tiny_timm(), args=make_config(tmp_path, hp_epochs=0), train_dataset=NoisyImages(train_set)
    )
    trainer.measure_start()
    torch.rand(1000)  # training would advance the RNG between measurements
    loaders = len(trainer.accelerator._dataloaders)
    first = trainer.measure_drift()
    second = trainer.measure_drift()
    assert first["sq_dist"] == 0.0 and first["cos"] == pytest.approx(1.0)
    assert second == first
    assert len(trainer.accelerator._dataloaders) == loaders  # the probe loader is reused, not rebuilt


class CountingReads(torch.utils.data.Dataset):
    """Counts `__getitem__` calls of a dataset."""

    def __init__(self, base):
        self.base, self.labels, self.reads = base, base.labels, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        return self.base[i]


def test_probe_inputs_are_read_once_per_run(tmp_path, train_set, eval_set):
    probe = CountingReads(NoisyImages(eval_set))
    args = make_config(tmp_path, hp_epochs=1, num_train_epochs=3)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train_set, drift_dataset=probe)
    trainer.train()
    assert len(trainer.dynamics["drift"]) == 3  # z_0 at FT start, then z_t at three epoch ends
    assert probe.reads == len(eval_set) + 1  # (+1: item 0, read once at train start to check the item format)


def test_probe_kept_or_re_read_gives_fixed_views_and_leaves_training_alone(tmp_path, train_set, monkeypatch):
    """Kept in memory, or re-read by every pass (over the memory limit): z_t of unchanged weights equals z_0 either
    way (fixed views of an augmenting probe set), and the trained weights do not depend on which."""
    import headprep_hf.dynamics as dynamics

    states = []
    for limit in (dynamics.PROBE_MEMORY_LIMIT, 0):
        monkeypatch.setattr(dynamics, "PROBE_MEMORY_LIMIT", limit)
        torch.manual_seed(0)
        args = make_config(tmp_path / str(limit), hp_epochs=1, num_train_epochs=2, drift_probe_samples=20)
        trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=NoisyImages(train_set))
        trainer.train()
        assert trainer.measurements._probe_loader is None  # not held after the run
        assert trainer.dynamics["drift"][-1]["sq_dist"] > 0
        trainer.measure_start()  # z_0 := features now; the weights do not change until the next measurement
        assert isinstance(trainer.measurements._probe_loader, dynamics.ReplayedBatches) == (limit > 0)
        torch.rand(100)
        assert trainer.measure_drift()["sq_dist"] == 0.0
        states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_kept_probe_batches_are_collated_once_and_replayed_exactly(tmp_path, monkeypatch):
    """A kept probe's batches are collated once per run and replayed at every drift pass (one process): its samples
    are read once, not once per pass, and every drift value equals the one re-reading them through the loader gives.
    """
    import headprep_hf.dynamics as dynamics
    import headprep_hf.measurements as measurements

    reads = {"n": 0}
    get = dynamics.InMemoryDataset.__getitem__

    def counted(self, index):
        reads["n"] += 1
        return get(self, index)

    monkeypatch.setattr(dynamics.InMemoryDataset, "__getitem__", counted)
    drift = {}
    for replay in (True, False):
        if not replay:
            monkeypatch.setattr(measurements, "ReplayedBatches", lambda loader, **kwargs: loader)
        reads["n"] = 0
        torch.manual_seed(0)
        args = make_config(tmp_path / str(replay), hp_epochs=1, num_train_epochs=3, drift_probe_samples=20)
        # 40 samples at batch 16: the training loader ends on a short batch (Accelerate keeps its remainder)
        trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=NoisyImages(TinyImages(40, seed=0)))
        trainer.train()
        drift[replay] = trainer.dynamics["drift"]
        assert len(drift[replay]) == 3 and drift[replay][-1]["sq_dist"] > 0
        assert trainer.dynamics["num_probe_samples"] == trainer.measurements.z0.shape[0] == 20
        assert reads["n"] == (20 if replay else 20 * 4)  # z_0 and three epoch ends
    assert drift[True] == drift[False]


def test_replayed_probe_batches_are_fresh_for_a_forward_that_changes_its_input(tmp_path, train_set):
    """A forward may change its input in place (legal under no_grad); on the CPU the replay must then hand it fresh
    tensors, as the loader's collate did, or the next pass sees shifted inputs."""

    class InPlace(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.m = model

        def forward(self, pixel_values):
            pixel_values.sub_(0.1)
            return self.m(pixel_values)

    args = make_config(tmp_path, hp_epochs=0, head_modules=["m.fc"])
    trainer = HeadPrepTrainer(model=InPlace(tiny_timm()), args=args, train_dataset=train_set)
    trainer.measure_start()
    assert type(trainer.measurements._probe_loader).__name__ == "ReplayedBatches"
    assert [trainer.measure_drift()["sq_dist"] for _ in range(2)] == [0.0, 0.0]  # unchanged weights


def test_probe_in_memory_reads_seeded_views_and_keeps_the_rng(train_set):
    from headprep_hf.dynamics import InMemoryDataset, probe_in_memory, sample_nbytes

    noisy = torch.utils.data.Subset(NoisyImages(train_set), range(10))
    torch.manual_seed(123)
    kept = probe_in_memory(noisy, seed=7)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the caller's RNG stream did not move
    assert isinstance(kept, InMemoryDataset) and len(kept) == 10
    torch.manual_seed(7)
    for i in range(10):
        assert torch.equal(kept[i]["pixel_values"], noisy[i]["pixel_values"])
    assert sample_nbytes(kept[0]) == 3 * 16 * 16 * 4
    assert probe_in_memory(noisy, seed=7, limit=10 * 3 * 16 * 16 * 4 - 1) is noisy  # over the limit: not kept


def test_energy_dataset_replaces_the_augmented_training_set(tmp_path, train_set):
    """energy_dataset=the training samples without augmentation: the energy of exactly those inputs."""
    model = tiny_timm()
    args = make_config(tmp_path, hp_epochs=1)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=NoisyImages(train_set), energy_dataset=train_set)
    trainer.probe_head()
    energy, accuracy, p_true = _energy_by_hand(model, train_set.x, train_set.labels)
    dyn = trainer.dynamics
    assert dyn["energy"] == pytest.approx(energy, rel=1e-5)
    assert dyn["hp_train_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert torch.allclose(torch.tensor(dyn["p0"]), p_true, atol=1e-5)
    # ... and not the energy of the augmented views the default would measure
    noisy = HeadPrepTrainer(model=model, args=args, train_dataset=NoisyImages(train_set))
    assert noisy.measure_start()["energy"] != pytest.approx(energy, rel=1e-3)


def test_energy_dataset_labels_are_checked(tmp_path, train_set):
    bad = TinyImages(8, seed=3)
    bad.labels[5] = 7
    trainer = HeadPrepTrainer(
        model=tiny_timm(), args=make_config(tmp_path), train_dataset=train_set, energy_dataset=bad
    )
    with pytest.raises(ValueError, match="energy_dataset"):
        trainer.probe_head()


def test_an_unreadable_sample_in_the_energy_pass_is_raised_not_taken_for_a_problem_type_mismatch(tmp_path, train_set):
    # The pass caught IndexError/ValueError from anywhere and warned that "the outputs do not fit the problem type":
    # a damaged sample went unnamed, and under several processes the rank that skipped the pass left the others'
    # collective calls out of step. Only the energy's own failure on the outputs is caught now.
    class Unreadable(TinyImages):
        def __getitem__(self, i):
            if i == 5:
                raise IndexError("sample 5 is unreadable")  # e.g. a damaged file
            return super().__getitem__(i)

    trainer = HeadPrepTrainer(
        model=tiny_timm(), args=make_config(tmp_path, hp_epochs=1), train_dataset=train_set,
        energy_dataset=Unreadable(8, seed=3),
    )  # fmt: skip
    with pytest.raises(IndexError, match="sample 5 is unreadable"):
        trainer.probe_head()


def test_forked_rng_draws_the_seeded_streams_inside_and_leaves_every_stream_alone_outside():
    # The measurement passes run inside `forked_rng(seed)`: inside, the streams a seeded run would draw (CPU torch,
    # Python, NumPy: same views at every drift pass); outside, each stream continues as if nothing had drawn.
    import random

    import numpy as np

    from headprep_hf.dynamics import forked_rng

    def draws():
        return torch.rand(3), random.random(), np.random.rand()

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected_outside = draws()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected_inside = draws()

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    with forked_rng(seed=1):
        inside = draws()
    outside = draws()
    assert torch.equal(inside[0], expected_inside[0]) and inside[1:] == expected_inside[1:]
    assert torch.equal(outside[0], expected_outside[0]) and outside[1:] == expected_outside[1:]


def test_forked_rng_seeds_no_generator_it_does_not_restore(monkeypatch):
    # `torch.manual_seed` inside the fork also reseeded every CUDA device (queued for when CUDA starts, where it had
    # not), MPS and XPU, while the fork restored the current CUDA device only: a seeded measurement pass reset those
    # streams to `seed` for the rest of training.
    from headprep_hf.dynamics import forked_rng

    calls = []
    for module in (torch.cuda, torch.xpu):
        monkeypatch.setattr(module, "manual_seed_all", lambda seed, name=module.__name__: calls.append(name))
    with forked_rng(seed=3):
        pass
    assert calls == []


class _Positions(torch.utils.data.Dataset):
    """1-D dense labels (N, L) with L == 3 == the number of classes, inputs (4, L) that show them."""

    def __init__(self, n=32, length=3):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 3, (n, length), generator=g)
        self.x = F.one_hot(self.y, 4).permute(0, 2, 1).float() * 2 + 0.3 * torch.randn(n, 4, length, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class _Conv1dNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone, self.classifier = torch.nn.Conv1d(4, 8, 1), torch.nn.Conv1d(8, 3, 1)

    def forward(self, x):
        return self.classifier(torch.relu(self.backbone(x)))  # (N, C, L), classes on axis 1 as Conv1d gives them


@pytest.mark.parametrize("length", [3, 4])
def test_a_conv1d_heads_classes_are_read_on_axis_1_when_the_length_equals_the_classes(tmp_path, length):
    # Logits (N, 3, 3) for labels (N, 3) fit both (N, C, L) and (N, L, C); they were read class-last, so HP trained
    # against transposed logits (true accuracy 0.39, reported 0.58) and the energy was another number. The head's last
    # layer (a convolution) now decides; L = 4 (unambiguous) gives the same results as before.
    data = _Positions(length=length)
    args = make_config(
        tmp_path, hp_epochs=8, hp_learning_rate=0.5, drift_probe_samples=8, per_device_train_batch_size=8
    )
    trainer = HeadPrepTrainer(model=_Conv1dNet(), args=args, train_dataset=data)
    assert trainer.class_axis_hint is False
    trainer.probe_head()
    with torch.no_grad():
        probs = trainer.model.eval()(data.x).softmax(dim=1)  # plain torch, classes on axis 1
    one_hot = F.one_hot(data.y, 3).permute(0, 2, 1).float()
    energy = (one_hot - probs).norm(dim=1).mean(dim=1).mean()
    accuracy = (probs.argmax(dim=1) == data.y).float().mean()
    assert trainer.dynamics["energy"] == pytest.approx(float(energy), abs=1e-5)
    assert trainer.dynamics["hp_train_accuracy"] == pytest.approx(float(accuracy), abs=1e-5)
    assert accuracy > 0.95  # HP learned the task (against the right axis)


def test_measurement_subsets_cover_a_class_sorted_set(tmp_path, train_set):
    # A set read from class folders is sorted by class: the drift probe and the energy_max_samples subset were its
    # first samples, i.e. its first classes only (a 3-class set sorted by class: a probe of class 0 alone). They are
    # evenly spaced over the set now, so every class is in them in its share.
    from headprep_hf.measurements import spread_indices

    order = torch.argsort(torch.as_tensor(train_set.labels), stable=True)
    ordered = torch.utils.data.Subset(train_set, order.tolist())
    labels = torch.as_tensor(train_set.labels)[order]
    trainer = HeadPrepTrainer(
        model=tiny_timm(),
        args=make_config(tmp_path, hp_epochs=0, energy_max_samples=9, drift_probe_samples=12),
        train_dataset=ordered,
    )
    summary = trainer.measure_start()
    subset = spread_indices(len(ordered), 9)
    assert set(labels[subset].tolist()) == set(labels.tolist()) and set(labels[:9].tolist()) != set(labels.tolist())
    x = torch.stack([ordered[i]["pixel_values"] for i in subset])
    energy, _, _ = _energy_by_hand(trainer.model, x, labels[subset])
    assert summary["energy"] == pytest.approx(energy, rel=1e-5)
    probe = spread_indices(len(ordered), 12)
    z0 = _features(trainer.model, torch.stack([ordered[i]["pixel_values"] for i in probe]))
    torch.testing.assert_close(trainer.measurements.z0, z0, rtol=1e-5, atol=1e-6)


def test_final_drift_is_the_returned_models_with_load_best_model_at_end(tmp_path):
    # Trainer loads the best checkpoint before `on_train_end`; the drift reported beside its metrics
    # (final_results.json, sweep.json, the card) was the last update's, another model's.
    from headprep_hf.measurements import final_drift_of
    from headprep_hf.metrics import accuracy_metrics

    args = make_config(
        tmp_path, hp_epochs=1, num_train_epochs=3, eval_strategy="epoch", save_strategy="epoch", learning_rate=5e-2,
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,  # (an early one: the worst)
    )  # fmt: skip
    trainer = HeadPrepTrainer(
        model=tiny_timm(), args=args, train_dataset=TinyImages(48), eval_dataset=TinyImages(16, seed=1),
        compute_metrics=accuracy_metrics(),
    )  # fmt: skip
    trainer.train()
    best, drift = trainer.state.best_global_step, trainer.dynamics["drift"]
    assert best != drift[-1]["step"]  # (the setting this is about)
    returned = drift_metrics(trainer.measurements.z0, trainer.measurements._probe())  # the model train() returned
    final = trainer.dynamics["final_drift"]
    assert final["step"] == best and final["model"] == "best checkpoint" and final_drift_of(trainer.dynamics) == final
    recorded = next(d for d in drift if d["step"] == best)  # (measured at that step, on the same weights)
    for key in ("sq_dist", "dot", "sq_norm", "cos"):
        assert final[key] == pytest.approx(returned[key], rel=1e-5) == pytest.approx(recorded[key], rel=1e-5)
    assert abs(final["sq_dist"] - drift[-1]["sq_dist"]) > 1e-3 * drift[-1]["sq_dist"]
    # without the best model loaded, the final drift is the last record
    args = make_config(tmp_path / "b", hp_epochs=1, num_train_epochs=2)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(48))
    trainer.train()
    assert trainer.dynamics["final_drift"] == {**trainer.dynamics["drift"][-1], "model": "last update"}

    # a later call on the trainer that measures no drift (stopped in HP) reports none, not the earlier call's
    class StopInHP(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = True

    trainer.args.overwrite_output_dir = True
    trainer.add_callback(StopInHP())
    trainer.train()
    assert final_drift_of(trainer.dynamics) is None
