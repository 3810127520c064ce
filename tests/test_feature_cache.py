"""Cached-feature head probing: same head as uncached HP, views, errors; and HP label smoothing really applies."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyImages, clone_state, make_config, tiny_timm
from transformers import PretrainedConfig

from headprep_hf import HeadPrepTrainer
from headprep_hf.feature_cache import CachedHeadProbing, global_batches


def _probe(tmp_path, name, train_set, **overrides):
    args = make_config(tmp_path / name, hp_epochs=3, **overrides)
    model = tiny_timm()
    model.config = PretrainedConfig()  # Trainer reads model.config when label_smoothing_factor is set
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=train_set)
    trainer.probe_head()
    return trainer


@pytest.mark.parametrize(
    "accumulation, smoothing",
    [(1, {"hp_label_smoothing": 0.2}), (2, {"hp_label_smoothing": 0.2}), (1, {"label_smoothing_factor": 0.2})],
)
def test_cached_head_equals_uncached_head(tmp_path, accumulation, smoothing):
    train_set = TinyImages(50, seed=0)  # 50 / 16: a partial last batch every epoch
    common = dict(gradient_accumulation_steps=accumulation, max_grad_norm=0.5, **smoothing)
    uncached = _probe(tmp_path, "u", train_set, **common)
    cached = _probe(tmp_path, "c", train_set, hp_cache_features=True, **common)
    a, b = uncached.hp_state_dict(), cached.hp_state_dict()
    assert sorted(a) == ["fc.bias", "fc.weight"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6)
    assert cached.state.global_step == uncached.state.global_step
    # the measurements at the prepared head agree too
    assert cached.dynamics["energy"] == pytest.approx(uncached.dynamics["energy"], rel=1e-5)


def test_cached_probe_keeps_backbone_and_logs_hp(tmp_path, train_set):
    args = make_config(tmp_path, hp_epochs=2, hp_cache_features=True)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train_set)
    backbone0 = clone_state(trainer.split.backbone_state(trainer.model))
    head0 = clone_state(dict(trainer.split.head_parameters(trainer.model)))
    trainer.probe_head()
    after = trainer.split.backbone_state(trainer.model)
    assert all(torch.equal(backbone0[k], after[k]) for k in backbone0)
    assert all(not torch.equal(head0[k], v) for k, v in trainer.split.head_parameters(trainer.model))
    assert all(p.requires_grad for p in trainer.model.parameters())
    losses = [h["hp/loss"] for h in trainer.state.log_history if "hp/loss" in h]
    assert len(losses) == 2 * 3 and losses[-1] < losses[0]


def test_train_with_cached_hp_runs_ft_in_the_loop(tmp_path, train_set, eval_set):
    args = make_config(tmp_path, hp_epochs=2, hp_cache_features=True, num_train_epochs=1)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train_set, eval_dataset=eval_set)
    backbone0 = clone_state(trainer.split.backbone_state(trainer.model))
    trainer.train()
    assert trainer.state.global_step == 3  # the loop holds the FT steps only
    assert trainer.dynamics["ft_start_step"] == 0 and trainer.dynamics["drift"]
    after = trainer.split.backbone_state(trainer.model)
    assert any(not torch.equal(backbone0[k], after[k]) for k in backbone0)


def test_hp_label_smoothing_applies_to_the_hp_loss(tmp_path, train_set):
    """Regression: the frozen backbone puts the root module in eval mode during HP; smoothing must still apply."""
    args = make_config(tmp_path, hp_epochs=1, hp_label_smoothing=0.3)
    model = tiny_timm()
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=train_set)
    first = global_batches(trainer.get_train_dataloader(), 0)[0]
    x = torch.stack([train_set[i]["pixel_values"] for i in first])
    y = torch.tensor([train_set[i]["labels"] for i in first])
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y, label_smoothing=0.3).item()
        unsmoothed = F.cross_entropy(model(x), y).item()
    trainer.probe_head()
    logged = next(h["hp/loss"] for h in trainer.state.log_history if "hp/loss" in h)
    assert logged == pytest.approx(expected, rel=1e-5)
    assert abs(logged - unsmoothed) > 1e-3


class NoisyImages(TinyImages):
    """Random augmentation: fresh noise from the torch RNG at every access."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "pixel_values": item["pixel_values"] + torch.randn_like(item["pixel_values"])}


def test_cache_views_differ_with_augmentation_only(tmp_path):
    for dataset, expect_equal in ((TinyImages(20), True), (NoisyImages(20), False)):
        args = make_config(tmp_path, hp_cache_features=True, hp_cache_views=3)
        trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=dataset)
        cache = CachedHeadProbing(trainer).build_cache()
        assert cache.features.shape[:2] == (3, 20)
        assert all(torch.equal(labels, torch.as_tensor(dataset.labels)) for labels in cache.labels)
        assert torch.equal(cache.features[0], cache.features[1]) == expect_equal
        assert torch.equal(cache.features[1], cache.features[2]) == expect_equal


class ScaledLogits(torch.nn.Module):
    """A model that does more after its head: the head's output is not the logits."""

    def __init__(self):
        super().__init__()
        self.body = tiny_timm(num_classes=0)
        self.fc = torch.nn.Linear(self.body.num_features, 3)

    def forward(self, pixel_values):
        return 2.0 * self.fc(self.body(pixel_values))


def test_cached_hp_refuses_models_whose_head_output_is_not_the_logits(tmp_path, train_set):
    args = make_config(tmp_path, hp_cache_features=True, head_modules=["fc"])
    trainer = HeadPrepTrainer(model=ScaledLogits(), args=args, train_dataset=train_set)
    with pytest.raises(ValueError, match="hp_cache_features=False"):
        trainer.probe_head()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(reinit_modules=["layer2"]), "reinit_modules"),
        (dict(hp_backbone_mode="train"), "hp_backbone_mode='eval'"),
        (dict(hp_cache_views=0), "hp_cache_views"),
    ],
)
def test_cache_config_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, hp_cache_features=True, **overrides)


def test_cached_hp_optimizer_keeps_head_groups_and_settings(tmp_path, train_set):
    from headprep_hf.feature_cache import _head_only_optimizer

    # Decay 0.05 on weights, 0 on biases: two head groups with different settings stay two groups.
    args = make_config(tmp_path, hp_cache_features=True, weight_decay=0.05, adam_beta2=0.98)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train_set)
    trainer.stage_plan.hp_steps = 3  # as cached HP plans it: the two-stage optimizer
    full = trainer.create_optimizer()
    lean = _head_only_optimizer(full)
    assert type(lean) is type(full) and lean is not full
    head_groups = [g for g in full.param_groups if g["headprep_part"] == "head"]
    assert len(lean.param_groups) == len(head_groups) < len(full.param_groups)
    for a, b in zip(lean.param_groups, head_groups):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        assert {k: v for k, v in a.items() if k != "params"} == {k: v for k, v in b.items() if k != "params"}
    assert lean.defaults["betas"] == (0.9, 0.98)


def test_cached_hp_optimizer_merges_equal_head_groups_exactly(tmp_path, train_set):
    """With no weight decay the head's decay and no-decay groups have equal settings: one group, same updates."""
    from headprep_hf.feature_cache import _head_only_optimizer

    args = make_config(tmp_path, hp_cache_features=True, weight_decay=0.0)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train_set)
    trainer.stage_plan.hp_steps = 3  # as cached HP plans it: the two-stage optimizer
    full = trainer.create_optimizer()
    head_groups = [g for g in full.param_groups if g["headprep_part"] == "head"]
    assert len(head_groups) == 2
    lean = _head_only_optimizer(full)
    assert len(lean.param_groups) == 1
    assert [id(p) for p in lean.param_groups[0]["params"]] == [id(p) for g in head_groups for p in g["params"]]

    # The same gradients through the two groups and through the one (on copies of the head): bit-identical results.
    kwargs = {k: full.defaults[k] for k in ("lr", "betas", "eps", "fused") if k in full.defaults}
    start = [p.detach().clone() for p in lean.param_groups[0]["params"]]
    results = []
    for groups in (head_groups, lean.param_groups):
        copies = iter([torch.nn.Parameter(t.clone()) for t in start])
        rebuilt = [{**g, "params": [next(copies) for _ in g["params"]]} for g in groups]
        params = [p for g in rebuilt for p in g["params"]]
        optimizer = type(full)(rebuilt, **kwargs)
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        results.append([p.detach() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert not any(torch.equal(a, b) for a, b in zip(results[0], start))


@pytest.mark.parametrize(
    "settings",
    [dict(logging_steps=0.1), dict(logging_strategy="epoch"),
     dict(logging_steps=4, eval_strategy="steps", eval_steps=0.5), dict(logging_steps=100, eval_strategy="steps",
                                                                        eval_steps=2)],
    ids=["log-ratio", "log-epoch", "eval-ratio", "eval-steps"],
)  # fmt: skip
def test_cached_hp_logs_and_evaluates_at_the_steps_uncached_hp_does(tmp_path, settings):
    # Cached HP kept a fractional logging/eval_steps as a raw float (0.1: no log at all), never logged with
    # logging_strategy="epoch", and evaluated with eval_strategy="steps" only at epoch ends.
    seen = {}
    for cached in (False, True):
        args = make_config(tmp_path / str(cached), hp_epochs=3, hp_cache_features=cached, track_dynamics=False,
                           **settings)  # fmt: skip
        trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(48),
                                  eval_dataset=TinyImages(16, seed=1))  # fmt: skip
        trainer.probe_head()
        history = trainer.state.log_history
        seen[cached] = ([r["step"] for r in history if "loss" in r], [r["step"] for r in history if "eval_loss" in r])
    assert seen[True] == seen[False] and (seen[False][0] or seen[False][1])


def test_cached_hp_trains_the_head_in_train_mode_after_an_evaluation_within_an_epoch(tmp_path):
    # An evaluation at a step inside an epoch left the model in eval mode: the head's BatchNorm then normalised with
    # its running statistics (and did not update them) for the rest of the epoch.
    from conftest import bn_head_model

    model = bn_head_model()
    modes = []
    model.fc[1].register_forward_pre_hook(lambda m, i: modes.append(m.training) if torch.is_grad_enabled() else None)
    args = make_config(tmp_path, hp_cache_features=True, eval_strategy="steps", eval_steps=1, hp_epochs=2,
                       per_device_train_batch_size=8)  # fmt: skip
    HeadPrepTrainer(
        model=model, args=args, train_dataset=TinyImages(48), eval_dataset=TinyImages(16, seed=1)
    ).probe_head()
    assert modes == [True] * 12


def test_a_cache_that_cannot_fit_in_memory_is_refused_at_its_first_batch(tmp_path, monkeypatch):
    # The cache was gathered whole in host memory without a look at its size: the sweep's default of 4 views of
    # DeepLabV3's head inputs on PASCAL VOC (13 MB per 320 px crop: 77 GiB) ran the backbone over most of the set and
    # ended in the kernel's out-of-memory kill. Its size is known at the first batch: refused there, with the fix.
    import headprep_hf.feature_cache as feature_cache

    assert feature_cache.available_host_memory() > 0  # (this machine's figure is readable)
    dataset = TinyImages(20)
    probe = tiny_timm()
    per_sample = 4 * probe.num_features + 8  # float32 head inputs of the pooled features, an int64 label
    need = 3 * 20 * per_sample
    batches = []
    monkeypatch.setattr(feature_cache, "available_host_memory", lambda: int(need / 0.8) - 1)
    args = make_config(tmp_path, hp_cache_features=True, hp_cache_views=3, hp_epochs=1, measure_batch_size=4)
    trainer = HeadPrepTrainer(model=probe, args=args, train_dataset=dataset)
    trainer.model.register_forward_hook(lambda *a: batches.append(1))
    with pytest.raises(MemoryError) as error:
        trainer.train()
    message = str(error.value)
    assert "3 view(s) x 20 head inputs" in message and "hp_cache_features=False" in message
    assert "hp_cache_views=1" in message
    assert len(batches) == 1  # at the first batch, not after the pass
    # the error says to retry without the cache: this trainer must then find every parameter trainable as it was
    # (the refusal left HP's frozen backbone behind, and a retry finetuned the head alone without a word)
    assert all(p.requires_grad for p in trainer.model.parameters()) and trainer.optimizer is None
    backbone = trainer.model.conv1[0].weight.detach().clone()
    trainer.args.hp_cache_features = False
    trainer.train()
    assert not torch.equal(trainer.model.conv1[0].weight, backbone)  # FT moved the backbone
    # with room for it, the same cache is built, equal to the one made without the check
    monkeypatch.setattr(feature_cache, "available_host_memory", lambda: int(need / 0.8) + 1)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=dataset)
    cache = CachedHeadProbing(trainer).build_cache()
    assert cache.features.shape == (3, 20, probe.num_features) and cache.features.dtype == torch.float32
    with torch.no_grad():
        expected = tiny_timm().eval().forward_features(torch.stack([dataset[i]["pixel_values"] for i in range(20)]))
        expected = tiny_timm().forward_head(expected, pre_logits=True)
    torch.testing.assert_close(cache.features[0], expected, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(labels, torch.as_tensor(dataset.labels)) for labels in cache.labels)


class FlippedMasks(torch.utils.data.Dataset):
    """Images with per-pixel labels, flipped left-right together at random (the usual segmentation augmentation)."""

    def __init__(self, n=12):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 3, (n, 8, 8), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x, y = self.x[i], self.y[i]
        if bool(torch.rand(()) < 0.5):
            x, y = x.flip(-1), y.flip(-1)
        return {"pixel_values": x, "labels": y}


class DenseNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.head = torch.nn.Conv2d(6, 3, 1)

    def forward(self, pixel_values):
        return self.head(self.backbone(pixel_values))


def test_each_cached_view_keeps_the_labels_of_its_own_augmentation(tmp_path):
    # The cache kept one label set for all views (the last view's): with masks flipped with their images, cached HP
    # trained views 0..K-2 against another view's masks, and the start-of-FT energy paired view 0 with them.
    dataset = FlippedMasks()
    args = make_config(tmp_path, hp_cache_features=True, hp_cache_views=3, head_modules=["head"], measure_batch_size=4)
    trainer = HeadPrepTrainer(model=DenseNet(), args=args, train_dataset=dataset)
    cache = CachedHeadProbing(trainer).build_cache()
    assert cache.labels.shape == (3, 12, 8, 8)
    backbone = DenseNet().backbone
    with torch.no_grad():
        plain, flipped = backbone(dataset.x), backbone(dataset.x.flip(-1))
    for k in range(3):
        for i in range(12):
            if torch.allclose(cache.features[k, i], plain[i], atol=1e-6):
                assert torch.equal(cache.labels[k, i], dataset.y[i]), (k, i)
            else:
                torch.testing.assert_close(cache.features[k, i], flipped[i])
                assert torch.equal(cache.labels[k, i], dataset.y[i].flip(-1)), (k, i)
    assert not torch.equal(cache.labels[0], cache.labels[1]) or not torch.equal(cache.labels[1], cache.labels[2])
