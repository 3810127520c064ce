"""The Trainer contract: with hp_epochs=0, HeadPrepTrainer does what transformers.Trainer does.

Every case runs the plain `Trainer` and `HeadPrepTrainer` on the same model, data and arguments and compares their
results: weights (bit-identical where the work is identical), losses, `log_history` keys, checkpoint files and
predictions. The models are tiny and built here; each case takes about a second.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import SchedulerType

from headprep_hf import HeadPrepConfig, HeadPrepTrainer
from headprep_hf.dynamics import copied_collator
from headprep_hf.schedules import STEP_SCHEDULES

# Measurement keys the trainer adds to log records (beside Trainer's, never instead of them).
MEASUREMENT_PREFIXES = ("headprep/", "drift/", "head_grad_norm")


class XYData(torch.utils.data.Dataset):
    """`{"input_x", "labels"}` samples: float features, integer classes (or float targets with `regression`)."""

    def __init__(self, n=40, dim=4, num_classes=3, regression=False, seed=0, ignore_every=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        if regression:
            self.y = (self.x @ torch.arange(1.0, dim + 1) / dim + 0.1 * torch.randn(n, generator=g)).tolist()
        else:
            self.y = torch.randint(0, num_classes, (n,), generator=g).tolist()
            if ignore_every:
                self.y = [-100 if i % ignore_every == 0 else y for i, y in enumerate(self.y)]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_x": self.x[i], "labels": self.y[i]}


class RootRegressor(nn.Module):
    """Parameters on the root module (no head module at all); its own MSE loss, plus an auxiliary term."""

    def __init__(self, dim=4, aux_weight=0.0, two_outputs=False, as_dict=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.w = nn.Parameter(torch.randn(dim) * 0.1)
        self.b = nn.Parameter(torch.zeros(()))
        self.aux_weight, self.two_outputs, self.as_dict = aux_weight, two_outputs, as_dict

    def forward(self, input_x, labels=None):
        y = input_x @ self.w + self.b
        second = 2.0 * y
        loss = None
        if labels is not None:
            loss = F.mse_loss(y, labels.float()) + self.aux_weight * self.w.pow(2).sum()
        if self.as_dict:
            out = {"loss": loss, "prediction": y} if loss is not None else {"prediction": y}
            if self.two_outputs:
                out["second"] = second
            return out
        outputs = (y, second) if self.two_outputs else (y,)
        return (loss, *outputs) if loss is not None else outputs


class FcClassifier(nn.Module):
    """A classifier with an `fc` head computing its own cross-entropy (ignore_index -100)."""

    def __init__(self, dim=4, num_classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(dim, 16), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, input_x, labels=None):
        logits = self.fc(self.body(input_x))
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels, ignore_index=-100), "logits": logits}


class FcLogitsOnly(FcClassifier):
    """The same network without a loss: `forward(x)` returns logits only (like a timm model)."""

    def forward(self, input_x):
        return self.fc(self.body(input_x))


COMMON = dict(
    per_device_train_batch_size=8,
    per_device_eval_batch_size=8,
    num_train_epochs=2,
    learning_rate=0.05,
    use_cpu=True,
    report_to="none",
    logging_steps=1,
    save_strategy="no",
    disable_tqdm=True,
    seed=0,
)


def _args(cls, tmp_path, name, **overrides):
    extra = {"hp_epochs": 0} if cls is HeadPrepConfig else {}
    return cls(output_dir=str(tmp_path / name), **{**COMMON, **extra, **overrides})


def _pair(
    tmp_path,
    make_model,
    train=None,
    args=None,
    headprep_args=None,
    optimizers_fn=None,
    callbacks_fn=None,
    **trainer_kwargs,
):
    """Train the plain Trainer and HeadPrepTrainer(hp_epochs=0) on the same inputs; returns both trainers.

    `optimizers_fn(model)` builds the `optimizers=(...)` pair and `callbacks_fn()` the callbacks of each trainer."""
    train = train if train is not None else XYData()
    runs = []
    for trainer_cls, args_cls, name in (
        (Trainer, TrainingArguments, "plain"),
        (HeadPrepTrainer, HeadPrepConfig, "ours"),
    ):
        extra = (headprep_args or {}) if trainer_cls is HeadPrepTrainer else {}
        model = None if "model_init" in trainer_kwargs else make_model()
        kwargs = dict(trainer_kwargs, optimizers=optimizers_fn(model)) if optimizers_fn else dict(trainer_kwargs)
        if callbacks_fn is not None:
            kwargs["callbacks"] = callbacks_fn()
        args_ = _args(args_cls, tmp_path, name, **(args or {}), **extra)
        trainer = trainer_cls(model=model, args=args_, train_dataset=train, **kwargs)
        trainer.train()
        runs.append(trainer)
    return runs


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert different == []


def _assert_same_logs(plain: Trainer, ours: HeadPrepTrainer, exact: bool = True) -> None:
    """Same records, same Trainer keys and values; ours may add measurement keys only."""
    assert len(plain.state.log_history) == len(ours.state.log_history)
    for p, o in zip(plain.state.log_history, ours.state.log_history):
        extra = set(o) - set(p)
        assert all(k.startswith(MEASUREMENT_PREFIXES) for k in extra), extra
        assert set(p) <= set(o)
        for key, value in p.items():
            if key.endswith(("runtime", "per_second")) or key == "total_flos":
                continue
            assert o[key] == value if exact else o[key] == pytest.approx(value, rel=1e-5), key


# ---------------------------------------------------------------------------------------------- model families
@pytest.mark.parametrize("track_dynamics", [False, True])
def test_model_without_head_module_trains_as_with_trainer(tmp_path, track_dynamics):
    """Parameters on the root module: nothing needs a head at hp_epochs=0, so nothing looks for one first."""
    plain, ours = _pair(
        tmp_path, RootRegressor, XYData(regression=True), headprep_args={"track_dynamics": track_dynamics}
    )
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    if track_dynamics:  # energy needs logits and labels only; drift (the head's input) is skipped
        assert ours.dynamics["problem_type"] == "regression" and ours.dynamics["energy"] > 0
        assert "drift" not in ours.dynamics
    else:
        assert ours.dynamics == {} and not os.path.exists(tmp_path / "ours" / "headprep_dynamics.json")
    assert not os.path.exists(tmp_path / "ours" / "prepared_head")


@pytest.mark.parametrize("hp_epochs", [0, 1])
def test_trainers_argument_errors_come_before_the_head_search(tmp_path, hp_epochs):
    """The same invalid arguments give Trainer's error, even where HP would then fail to find a head."""
    errors = []
    for trainer_cls, args_cls in ((Trainer, TrainingArguments), (HeadPrepTrainer, HeadPrepConfig)):
        extra = {"hp_epochs": hp_epochs} if args_cls is HeadPrepConfig else {}
        args = _args(args_cls, tmp_path, "x", eval_strategy="epoch", **extra)  # no eval_dataset given
        with pytest.raises(ValueError) as error:
            trainer_cls(model=RootRegressor(), args=args, train_dataset=XYData(regression=True))
        errors.append(str(error.value))
    assert errors[0] == errors[1] and "eval_dataset" in errors[0]


def test_head_probing_without_a_head_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="Set head_modules=\\[...\\] in HeadPrepConfig"):
        HeadPrepTrainer(
            model=RootRegressor(), args=_args(HeadPrepConfig, tmp_path, "b", hp_epochs=1), train_dataset=XYData()
        )


def test_float_labels_with_declared_regression_use_the_trainers_masked_mse(tmp_path):
    """`problem_type="regression"`: float labels are accepted and the trainer's masked MSE equals the model's MSE."""
    data = XYData(regression=True)
    plain, ours = _pair(tmp_path, RootRegressor, data, headprep_args={"problem_type": "regression"})
    assert ours.uses_trainer_loss()
    for a, b in zip(plain.model.parameters(), ours.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    _assert_same_logs(plain, ours, exact=False)


def test_auxiliary_loss_term_of_the_model_is_kept(tmp_path):
    plain, ours = _pair(tmp_path, lambda: RootRegressor(aux_weight=0.5), XYData(regression=True))
    assert not ours.uses_trainer_loss()
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)


def test_compute_loss_func_is_used(tmp_path):
    calls = []

    def loss_func(outputs, labels, num_items_in_batch=None):
        calls.append(num_items_in_batch)
        return (outputs["prediction"] - labels).abs().mean()

    plain, ours = _pair(tmp_path, RootRegressor, XYData(regression=True), compute_loss_func=loss_func)
    assert len(calls) == 2 * 10  # both trainers, 5 steps x 2 epochs each
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_fc_classifier_with_own_loss_ignore_index_and_uneven_accumulation(tmp_path, accumulation):
    """40 samples, batch 8: 5 micro-batches, accumulation 3 gives uneven steps (3 + 2); every 4th label ignored."""
    data = XYData(ignore_every=4)
    plain, ours = _pair(tmp_path, FcClassifier, data, args={"gradient_accumulation_steps": accumulation})
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    assert ours.find_head().head_names == ["fc"]  # found when the measurements asked for it


class WeightedTargets(FcClassifier):
    """Its own class-weighted loss, from labels passed as `targets` (no "label" in the name)."""

    def forward(self, input_x, targets=None):
        logits = self.fc(self.body(input_x))
        if targets is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, targets, weight=torch.tensor([1.0, 5.0, 0.2])), "logits": logits}


class KwargsWrapper(nn.Module):
    """Takes its labels through `**kwargs` and hands them to a model computing its own loss."""

    def __init__(self):
        super().__init__()
        self.inner = WeightedTargets()

    def forward(self, input_x, **kwargs):
        return self.inner(input_x, targets=kwargs.get("labels"))


class TargetsData(XYData):
    def __getitem__(self, i):
        return {"input_x": self.x[i], "targets": self.y[i]}


@pytest.mark.parametrize("model_cls", [WeightedTargets, KwargsWrapper])
def test_labels_under_declared_label_names_reach_the_models_own_loss(tmp_path, model_cls):
    # The model takes its labels as `targets` (label_names=["targets"]) or through **kwargs (label_names=["labels"]):
    # Trainer hands them over and trains with the model's own weighted loss. Only names containing "label" were
    # recognised before, so these models trained with the trainer's unweighted cross-entropy (weights 0.09 apart).
    train, names = (TargetsData(), ["targets"]) if model_cls is WeightedTargets else (XYData(), ["labels"])
    plain, ours = _pair(tmp_path, model_cls, train, args={"label_names": names})
    assert not ours.uses_trainer_loss()
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)


def test_a_target_without_label_names_trains_as_with_trainer(tmp_path):
    # forward(input_x, targets=None) and no label_names: Trainer passes `targets` to the model and uses its loss. The
    # trainer read labels under "labels" and failed at its first batch with a bare KeyError; then it refused the run
    # before training, naming label_names=["targets"] (with which it is Trainer: the test above). Now it trains as
    # Trainer does, and the measurements, which have no labels to read, name the fix.
    with pytest.warns(UserWarning, match=r"hold no 'labels' \(their keys: \['input_x', 'targets'\]\).*label_names"):
        plain, ours = _pair(tmp_path, WeightedTargets, TargetsData())
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)


class SingularLabel(XYData):
    def __getitem__(self, i):
        return {"input_x": self.x[i], "label": self.y[i]}  # (the default collator batches it as "labels")


def test_items_with_a_label_key_train_as_with_trainer(tmp_path):
    plain, ours = _pair(tmp_path, FcClassifier, SingularLabel())
    _same_weights(plain.model, ours.model)
    trainer = HeadPrepTrainer(
        model=FcLogitsOnly(), args=_args(HeadPrepConfig, tmp_path, "l"), train_dataset=SingularLabel()
    )
    trainer.train()  # (the trainer's loss: no refusal, the collator gives "labels")
    assert trainer.state.global_step == 10


class SingularBadLabel(SingularLabel):
    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "label": 7} if i == 5 else item


@pytest.mark.parametrize("hp_epochs", [0, 1])
def test_a_bad_label_under_the_key_label_is_named_before_training(tmp_path, hp_epochs):
    # Items keyed "label" (batched as "labels") were read as having no labels, so the range check checked nothing:
    # "IndexError: Target 7 is out of bounds" after one update (a device-side assert on a GPU).
    args = _args(HeadPrepConfig, tmp_path, "b", hp_epochs=hp_epochs)
    trainer = HeadPrepTrainer(model=FcLogitsOnly(), args=args, train_dataset=SingularBadLabel())
    with pytest.raises(ValueError, match=r"train_dataset\[5\] has label 7, outside the 3 classes"):
        trainer.train()


def test_cached_head_probing_checks_the_labels_it_trains_on(tmp_path):
    # Cached HP trains the head with the trainer's loss whatever the model computes itself; its labels went
    # unchecked for a model with its own loss ("IndexError: Target 7 is out of bounds" in loss_from_logits).
    args = _args(HeadPrepConfig, tmp_path, "c", hp_epochs=1, hp_cache_features=True)
    trainer = HeadPrepTrainer(model=FcClassifier(), args=args, train_dataset=SingularBadLabel())
    with pytest.raises(ValueError, match=r"train_dataset\[5\] has label 7, outside the 3 classes"):
        trainer.train()


class RawTargets(XYData):
    """torchvision's layout: raw `targets` (10..12) that `target_transform` turns into the items' classes (0..2)."""

    def __init__(self, n=0, **kwargs):
        super().__init__(**kwargs)
        self.targets = [y + 10 for y in self.y]
        self.target_transform = lambda t: t - 10

    def __getitem__(self, i):
        return {"input_x": self.x[i], "labels": self.target_transform(self.targets[i])}


def test_labels_are_read_from_the_items_where_a_target_transform_changes_them(tmp_path):
    # The label check read the raw `targets` attribute and refused "label 11, outside the 3 classes".
    trainer = HeadPrepTrainer(
        model=FcLogitsOnly(), args=_args(HeadPrepConfig, tmp_path, "r"), train_dataset=RawTargets()
    )
    trainer.train()
    assert trainer.state.global_step == 10


def test_the_problem_type_is_read_from_the_items_where_a_target_transform_changes_them(tmp_path):
    # The first label was read from the raw `targets` (class ids: single-label) where the items hold multi-hot
    # vectors: the first update failed with "Expected floating point type for target with class probabilities".
    from headprep_hf.labels import infer_problem_type

    class MultiHot(RawTargets):
        def __init__(self):
            super().__init__()
            self.target_transform = lambda t: [float(t - 10 == c) for c in range(3)]

    data = MultiHot()
    assert infer_problem_type(data) == "multi_label_classification"
    trainer = HeadPrepTrainer(model=FcLogitsOnly(), args=_args(HeadPrepConfig, tmp_path, "m"), train_dataset=data)
    trainer.train()
    assert trainer.problem_type == "multi_label_classification"


def test_labels_are_checked_for_a_plain_run_that_smooths_in_ft(tmp_path):
    # The trainer's loss computes FT's loss (ft_label_smoothing), but the check asked the stage before the run ("hp"),
    # found the model's own loss there and checked nothing: "IndexError: Target 5 is out of bounds" at step 0.
    class BadLabel(XYData):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "labels": 5} if i == 9 else item

    args = _args(HeadPrepConfig, tmp_path, "s", ft_label_smoothing=0.1)
    trainer = HeadPrepTrainer(model=FcClassifier(), args=args, train_dataset=BadLabel())
    with pytest.raises(ValueError, match=r"train_dataset\[9\] has label 5, outside the 3 classes"):
        trainer.train()


def test_tuple_items_behind_a_target_transform_take_their_problem_type_from_the_attribute(tmp_path):
    # The items cannot be read (tuples, batched by the user's collator): the raw attribute is all there is, as before
    # (float targets: regression). Skipping it read nothing and inferred single-label classification.
    from headprep_hf.labels import infer_problem_type

    class Pairs(torch.utils.data.Dataset):
        targets = np.linspace(0.0, 1.0, 8).astype(np.float32)
        target_transform = staticmethod(lambda t: t)

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.zeros(4), self.target_transform(self.targets[i])

    assert infer_problem_type(Pairs()) == "regression"


@pytest.mark.parametrize("track_dynamics", [True, False])
def test_an_explicit_empty_label_names_is_kept_as_with_trainer(tmp_path, track_dynamics):
    # label_names=[] was replaced by ["labels"]: evaluate() gained an eval_loss, predict() label_ids and a lone
    # prediction array where Trainer gives None and a tuple.
    plain, ours = _pair(
        tmp_path,
        FcClassifier,
        args={"label_names": [], "eval_strategy": "epoch"},
        headprep_args={"track_dynamics": track_dynamics},
        eval_dataset=XYData(n=16, seed=1),
    )
    assert ours.label_names == plain.label_names == []
    if track_dynamics:  # (measured: the labels are read under "labels")
        assert ours.dynamics["energy"] is not None and len(ours.dynamics["drift"]) == 2
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    assert sorted(ours.evaluate()) == sorted(plain.evaluate())
    mine, theirs = ours.predict(XYData(n=16, seed=1)), plain.predict(XYData(n=16, seed=1))
    assert mine.label_ids is None and theirs.label_ids is None
    assert type(mine.predictions) is type(theirs.predictions)


class EvalMemoryLimit(FcClassifier):
    """Runs out of memory (as accelerate recognises it) for an eval-mode batch of more than 16 samples."""

    def forward(self, input_x, labels=None):
        if not self.training and input_x.shape[0] > 16:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB.")
        return super().forward(input_x, labels)


def test_auto_find_batch_size_measures_after_the_retry(tmp_path):
    # The energy pass (at 4x the training batch) ran out of memory; Trainer's retry at half the batch found FT
    # already begun and went on without energy, z_0 or drift, and its passes kept 4x the first batch size.
    args = _args(HeadPrepConfig, tmp_path, "ours", auto_find_batch_size=True)
    trainer = HeadPrepTrainer(model=EvalMemoryLimit(), args=args, train_dataset=XYData())
    trainer.train()
    assert trainer._train_batch_size == 4 and trainer.measure_batch_size == 16
    assert trainer.dynamics["energy"] is not None and len(trainer.dynamics["drift"]) == 2


NOISE = torch.Generator()


def _plain_collate(items):
    return {
        "input_x": torch.stack([i["input_x"] for i in items]),
        "labels": torch.tensor([i["labels"] for i in items]),
    }


def _global_noise_collator(items):
    batch = _plain_collate(items)
    batch["input_x"] = batch["input_x"] + 0.1 * torch.randn(batch["input_x"].shape, generator=NOISE)
    return batch


def _closure_noise_collator(seed):
    generator = torch.Generator().manual_seed(seed)

    def collate(items):
        batch = _plain_collate(items)
        batch["input_x"] = batch["input_x"] + 0.1 * torch.randn(batch["input_x"].shape, generator=generator)
        return batch

    return collate


def test_an_explicit_empty_label_names_for_a_model_without_labels_reads_them_under_labels(tmp_path):
    # Kept as [], Trainer's column removal dropped "labels", which the trainer's loss reads: the first step failed.
    args = _args(HeadPrepConfig, tmp_path, "ours", label_names=[])
    trainer = HeadPrepTrainer(model=FcLogitsOnly(), args=args, train_dataset=XYData())
    trainer.train()
    assert trainer.label_names == ["labels"] and trainer.dynamics["energy"] is not None


def test_the_measurement_copy_of_a_collate_function_pickles_and_keeps_its_own_generator():
    # A rebuilt function (new globals) could not be pickled: loader workers started by spawn failed.
    import pickle

    NOISE.manual_seed(3)
    items = [XYData()[i] for i in range(4)]
    copied = copied_collator(_global_noise_collator)
    again = pickle.loads(pickle.dumps(copied))
    first = copied(items)["input_x"]
    assert torch.equal(again(items)["input_x"], first)  # (the same state: the same draws)
    NOISE.manual_seed(3)
    assert torch.equal(_global_noise_collator(items)["input_x"], first)  # (the copy's draws are the original's ...)
    after = NOISE.get_state()
    assert not torch.equal(copied(items)["input_x"], first)  # (... and its own generator moved on,
    assert torch.equal(NOISE.get_state(), after)  # the module's not)


@pytest.mark.parametrize("where", ["closure", "module-global"])
def test_a_collate_function_with_its_own_generator_trains_as_with_trainer(tmp_path, where):
    # A deep copy returns a function as it is: the measurement passes drew from the generator training then drew
    # from, and the weights differed from Trainer's (1e-4).
    runs = []
    for trainer_cls, args_cls, name in (
        (Trainer, TrainingArguments, "plain"),
        (HeadPrepTrainer, HeadPrepConfig, "ours"),
    ):
        NOISE.manual_seed(7)
        collate = _closure_noise_collator(7) if where == "closure" else _global_noise_collator
        args = _args(args_cls, tmp_path, name)
        trainer = trainer_cls(model=FcClassifier(), args=args, train_dataset=XYData(), data_collator=collate)
        trainer.train()
        runs.append(trainer)
    assert runs[1].dynamics["energy"] is not None and runs[1].dynamics["drift"]
    _same_weights(runs[0].model, runs[1].model)


class WeightedItems(XYData):
    def __getitem__(self, i):
        return {**super().__getitem__(i), "sample_weight": torch.tensor(1.0 + i % 3)}


def _weighted_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    weight, labels = inputs.pop("sample_weight"), inputs.pop("labels")
    outputs = model(**inputs)
    loss = (F.cross_entropy(outputs["logits"], labels, reduction="none") * weight).mean()
    return (loss, outputs) if return_outputs else loss


def _tuple_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    x, y = inputs
    outputs = model(input_x=x)
    loss = F.cross_entropy(outputs["logits"], y)
    return (loss, outputs) if return_outputs else loss


def _as_tuples(items):
    return torch.stack([item["input_x"] for item in items]), torch.tensor([item["labels"] for item in items])


@pytest.mark.parametrize("batches", ["extra-key", "tuples"])
def test_batches_only_a_compute_loss_of_the_users_own_understands_train_as_with_trainer(tmp_path, batches):
    # A compute_loss that consumes a key the forward does not take (sample weights), or (x, y) tuples from a
    # collator: Trainer trains; the default track_dynamics failed in the start-of-FT energy pass before the first
    # update. The measurements now leave out keys the forward does not take, or are skipped with a warning.
    loss = _weighted_loss if batches == "extra-key" else _tuple_loss
    data = WeightedItems() if batches == "extra-key" else XYData()
    extra = {"remove_unused_columns": False} if batches == "extra-key" else {}
    kwargs = {"data_collator": _as_tuples} if batches == "tuples" else {}
    runs = []
    for base, args_cls, name in ((Trainer, TrainingArguments, "plain"), (HeadPrepTrainer, HeadPrepConfig, "ours")):
        cls = type(f"Custom{base.__name__}", (base,), {"compute_loss": loss})
        args = _args(args_cls, tmp_path, name, **extra)
        trainer = cls(model=FcClassifier(), args=args, train_dataset=data, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        runs.append(trainer)
    plain, ours = runs
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    said = " ".join(str(w.message) for w in caught)
    if batches == "extra-key":  # measured, without the key the forward does not take (and says so)
        assert ours.dynamics["energy"] is not None and ours.dynamics["drift"]
        assert "call the model without the batch keys ['sample_weight']" in said
    else:
        assert ours.dynamics.get("energy") is None and "drift" not in ours.dynamics
        assert "Energy, HP accuracy and p0 were not measured: The batch is a tuple" in said
        assert "Drift is not measured: The batch is a tuple" in said


def test_an_empty_evaluation_set_trains_as_with_trainer(tmp_path):
    plain, ours = _pair(tmp_path, FcClassifier, eval_dataset=XYData(n=0), args={"eval_strategy": "epoch"})
    _same_weights(plain.model, ours.model)


def test_a_kwargs_forward_without_declared_label_names_trains_with_the_trainers_loss(tmp_path):
    # A wrapper around a timm-like model (`forward(x, **kwargs)` returning logits): Trainer cannot train it (no loss);
    # without declared label_names it gets the trainer's cross-entropy, as a forward(x) does (README's table).
    class LogitsKwargs(FcLogitsOnly):
        def forward(self, input_x, **kwargs):
            return self.fc(self.body(input_x))

    model = LogitsKwargs()
    trainer = HeadPrepTrainer(model=model, args=_args(HeadPrepConfig, tmp_path, "k"), train_dataset=XYData())
    assert trainer.uses_trainer_loss()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # With label_names declared it gets the labels, as with Trainer, which then fails ("did not return a loss", or
    # for bare logits a first row taken for the loss): the error names the two ways to the trainer's loss.
    for returns_dict in (False, True):

        class Wrapper(LogitsKwargs):
            as_dict = returns_dict

            def forward(self, input_x, **kwargs):
                logits = self.fc(self.body(input_x))
                return {"logits": logits} if self.as_dict else logits

        args = _args(HeadPrepConfig, tmp_path, f"named{returns_dict}", label_names=["labels"])
        with pytest.raises(ValueError, match="returns no loss. Drop label_names .* or set problem_type"):
            HeadPrepTrainer(model=Wrapper(), args=args, train_dataset=XYData()).train()
        args.problem_type = "single_label_classification"
        HeadPrepTrainer(model=Wrapper(), args=args, train_dataset=XYData()).train()


def test_bf16_training_with_every_measurement_is_trainers(tmp_path):
    """bf16 autocast (the image recipes' GPU default, CPU autocast here): the measurement passes run inside
    `measurement_autocast` at the start of FT and every epoch end, and leave weights and logs as Trainer's."""
    plain, ours = _pair(tmp_path, FcClassifier, XYData(ignore_every=4), args={"bf16": True})
    assert ours.args.mixed_precision == plain.args.mixed_precision == "bf16"
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    assert ours.dynamics["energy"] > 0 and len(ours.dynamics["drift"]) == 2  # the passes ran, in bf16


def test_stage_smoothing_uses_the_trainers_loss_in_that_stage_only(tmp_path):
    """A model with its own loss and hp_label_smoothing: HP steps take the trainer's smoothed cross-entropy, FT steps
    (no FT smoothing) the model's own loss; evaluation is never smoothed."""
    seen = []

    class Recorder(HeadPrepTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.in_training_step:
                seen.append((self.current_stage, self.uses_trainer_loss()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = _args(HeadPrepConfig, tmp_path, "o", hp_epochs=1, num_train_epochs=1, hp_label_smoothing=0.2)
    trainer = Recorder(model=FcClassifier(), args=args, train_dataset=XYData())
    trainer.train()
    assert seen == [("hp", True)] * 5 + [("ft", False)] * 5
    batch = {"input_x": XYData().x[:8], "labels": torch.tensor(XYData().y[:8])}
    with torch.no_grad():
        expected = F.cross_entropy(trainer.model(batch["input_x"])["logits"], batch["labels"])
    assert trainer.compute_loss(trainer.model.eval(), batch).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_trainers_loss_for_a_logits_only_model_matches_exact_item_averaging(tmp_path, accumulation):
    """A model without a loss gets the trainer's cross-entropy, averaged over the valid labels of the whole step;
    the plain Trainer does the same with a model whose loss is the sum over `num_items_in_batch`."""

    class SumLoss(FcClassifier):
        def forward(self, input_x, labels=None, num_items_in_batch=None):
            logits = self.fc(self.body(input_x))
            if labels is None:
                return {"logits": logits}
            loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items_in_batch
            return {"loss": loss, "logits": logits}

    data = XYData(ignore_every=4)
    args = {"gradient_accumulation_steps": accumulation, "average_tokens_across_devices": False}
    plain = Trainer(model=SumLoss(), args=_args(TrainingArguments, tmp_path, "plain", **args), train_dataset=data)
    plain.model_accepts_loss_kwargs = True
    plain.train()
    ours = HeadPrepTrainer(
        model=FcLogitsOnly(), args=_args(HeadPrepConfig, tmp_path, "ours", **args), train_dataset=data
    )
    assert ours.uses_trainer_loss() and ours.label_names == ["labels"]
    ours.train()
    for a, b in zip(plain.model.parameters(), ours.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- predictions
@pytest.mark.parametrize("as_dict", [True, False], ids=["dict-without-logits", "tuple"])
def test_predict_returns_every_model_output(tmp_path, as_dict):
    data = XYData(n=20, regression=True)
    plain, ours = _pair(tmp_path, lambda: RootRegressor(two_outputs=True, as_dict=as_dict), data)
    p, o = plain.predict(data), ours.predict(data)
    assert isinstance(o.predictions, tuple) and len(o.predictions) == len(p.predictions) == 2
    for a, b in zip(p.predictions, o.predictions):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(p.label_ids, o.label_ids)
    assert p.metrics["test_loss"] == o.metrics["test_loss"]


# ---------------------------------------------------------------------------------------------- arguments
def test_model_init_and_external_optimizers(tmp_path):
    plain, ours = _pair(tmp_path, FcClassifier, model_init=lambda: FcClassifier())
    _same_weights(plain.model, ours.model)

    def optimizers(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)

    plain, ours = _pair(tmp_path, FcClassifier, optimizers_fn=optimizers)
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)


SCHEDULER_KWARGS = {
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 3},
    "reduce_lr_on_plateau": {},
}


@pytest.mark.parametrize("schedule", [s.value for s in SchedulerType])
def test_every_lr_scheduler_type_gives_trainers_learning_rates(tmp_path, schedule):
    args = {
        "lr_scheduler_type": schedule,
        "warmup_steps": 2,
        "lr_scheduler_kwargs": SCHEDULER_KWARGS.get(schedule, {}),
    }
    if schedule in ("reduce_lr_on_plateau", "greedy"):  # stepped with the evaluation metric
        args.update(eval_strategy="epoch")
        plain, ours = _pair(tmp_path, FcClassifier, args=args, eval_dataset=XYData(n=16, seed=1))
    else:
        plain, ours = _pair(tmp_path, FcClassifier, args=args)
    rates = [[r["learning_rate"] for r in t.state.log_history if "learning_rate" in r] for t in (plain, ours)]
    assert rates[0] == rates[1] and len(rates[0]) == 10
    _same_weights(plain.model, ours.model)


@pytest.mark.parametrize("schedule", STEP_SCHEDULES)
def test_with_head_probing_the_ft_stage_follows_trainers_schedule(tmp_path, schedule):
    """Every step-indexed schedule also works after HP: FT restarts it and its rates are Trainer's, step for step."""
    args = {
        "lr_scheduler_type": schedule,
        "warmup_steps": 2,
        "lr_scheduler_kwargs": SCHEDULER_KWARGS.get(schedule, {}),
    }
    plain = Trainer(model=FcClassifier(), args=_args(TrainingArguments, tmp_path, "p", **args), train_dataset=XYData())
    plain.train()
    ours = HeadPrepTrainer(
        model=FcClassifier(), args=_args(HeadPrepConfig, tmp_path, "o", hp_epochs=1, **args), train_dataset=XYData()
    )
    ours.train()
    expected = [r["learning_rate"] for r in plain.state.log_history if "learning_rate" in r]
    assert [r["ft/learning_rate"] for r in ours.state.log_history if "ft/learning_rate" in r] == expected
    assert [r["hp/learning_rate"] for r in ours.state.log_history if "hp/learning_rate" in r] == [1e-2] * 5


@pytest.mark.parametrize("cached", [False, True])
def test_probe_head_takes_any_ft_schedule(tmp_path, cached):
    """HP alone never reaches the FT schedule: one that cannot follow HP in a loop is fine for probe_head()."""
    args = _args(
        HeadPrepConfig, tmp_path, "p", hp_epochs=1, lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="epoch"
    )
    args.hp_cache_features = cached
    trainer = HeadPrepTrainer(model=FcLogitsOnly(), args=args, train_dataset=XYData(), eval_dataset=XYData(8, seed=1))
    trainer.probe_head()
    assert trainer.state.global_step == 5


def test_label_smoothing_factor_and_find_unused_parameters_are_accepted(tmp_path):
    from transformers import PretrainedConfig

    class Configured(FcClassifier):  # Trainer's label smoother reads model.config
        def __init__(self):
            super().__init__()
            self.config = PretrainedConfig()

    args = {"label_smoothing_factor": 0.1, "ddp_find_unused_parameters": False}
    plain, ours = _pair(tmp_path, Configured, args=args)
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)


def test_default_arguments_are_trainers(tmp_path):
    ours = HeadPrepTrainer(model=FcClassifier(), args=_args(HeadPrepConfig, tmp_path, "o"), train_dataset=XYData())
    plain = Trainer(model=FcClassifier(), args=_args(TrainingArguments, tmp_path, "p"), train_dataset=XYData())
    assert ours.label_names == plain.label_names == ["labels"]
    assert ours.args.remove_unused_columns is plain.args.remove_unused_columns is True
    assert ours.args.ddp_find_unused_parameters is plain.args.ddp_find_unused_parameters is None


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_hold_trainers_files_and_resume_from_a_plain_trainer_checkpoint(tmp_path):
    save = {"save_strategy": "steps", "save_steps": 3}
    reference = Trainer(
        model=FcClassifier(), args=_args(TrainingArguments, tmp_path, "ref", **save), train_dataset=XYData()
    )
    reference.train()

    class Stop(TrainerCallback):  # ends the plain run after step 6, with checkpoint-6 written
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                control.should_training_stop = True

    interrupted = Trainer(
        model=FcClassifier(),
        args=_args(TrainingArguments, tmp_path, "run", **save),
        train_dataset=XYData(),
        callbacks=[Stop()],
    )
    interrupted.train()
    checkpoint = tmp_path / "run" / "checkpoint-6"
    plain_files = set(os.listdir(checkpoint))
    assert "training_args.bin" in plain_files

    resumed = HeadPrepTrainer(
        model=FcClassifier(seed=5), args=_args(HeadPrepConfig, tmp_path, "run", **save), train_dataset=XYData()
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    _same_weights(reference.model, resumed.model)
    assert resumed.state.global_step == reference.state.global_step == 10
    ours_files = set(os.listdir(tmp_path / "run" / "checkpoint-9"))
    assert plain_files <= ours_files  # Trainer's files, plus ours beside them
    assert all(f.startswith(("headprep_", "training_args.json")) for f in ours_files - plain_files)

    with pytest.raises(ValueError, match="Can't find a valid checkpoint at"):
        HeadPrepTrainer(model=FcClassifier(), args=_args(HeadPrepConfig, tmp_path, "x"), train_dataset=XYData()).train(
            resume_from_checkpoint=str(tmp_path / "missing")
        )


def test_load_best_model_at_end_and_early_stopping(tmp_path):
    evaluation = XYData(n=16, seed=1)
    args = dict(
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        num_train_epochs=6,
    )
    plain, ours = _pair(
        tmp_path,
        FcClassifier,
        args=args,
        eval_dataset=evaluation,
        callbacks_fn=lambda: [EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=0.05)],
    )
    assert plain.state.global_step == ours.state.global_step < 30  # stopped early, at the same step
    assert os.path.basename(plain.state.best_model_checkpoint) == os.path.basename(ours.state.best_model_checkpoint)
    _same_weights(plain.model, ours.model)


# ---------------------------------------------------------------------------------------------- subclasses, data
def _entropy_penalized_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """A subclass's own `compute_loss` (a per-micro-batch mean; it calls the model itself)."""
    logits = model(inputs["input_x"])
    logits = logits["logits"] if isinstance(logits, dict) else logits
    log_p = logits.log_softmax(-1)
    loss = F.cross_entropy(logits, inputs["labels"]) + 0.1 * (log_p.exp() * log_p).sum(-1).mean()
    return (loss, {"logits": logits}) if return_outputs else loss


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("model_cls", [FcLogitsOnly, FcClassifier], ids=["logits-only", "own-loss"])
def test_compute_loss_override_is_averaged_over_accumulation_as_with_trainer(tmp_path, accumulation, model_cls):
    """A subclass overriding `compute_loss` owns the loss: Trainer divides its micro-batch mean by the accumulation
    steps, for a model without labels (where the trainer's own loss would otherwise be in charge) too."""
    runs = []
    for base, args_cls, name in ((Trainer, TrainingArguments, "plain"), (HeadPrepTrainer, HeadPrepConfig, "ours")):
        cls = type(f"Custom{base.__name__}", (base,), {"compute_loss": _entropy_penalized_loss})
        args = _args(
            args_cls,
            tmp_path,
            name,
            per_device_train_batch_size=8 // accumulation,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=0.0,  # (clipping would hide a wrongly scaled gradient)
            remove_unused_columns=False,
        )
        trainer = cls(model=model_cls(), args=args, train_dataset=XYData())
        trainer.train()
        runs.append(trainer)
    plain, ours = runs
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)


class XYPairs(XYData):
    """The same samples as `(x, y)` tuples."""

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _collate_pairs(batch):
    return {"input_x": torch.stack([x for x, _ in batch]), "labels": torch.tensor([y for _, y in batch])}


def test_tuple_dataset_with_a_collator_trains_as_with_trainer(tmp_path):
    plain, ours = _pair(tmp_path, FcClassifier, XYPairs(), data_collator=_collate_pairs)
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)


def test_tuple_dataset_with_the_default_collator_is_refused_where_trainer_fails_later(tmp_path):
    plain = Trainer(model=FcClassifier(), args=_args(TrainingArguments, tmp_path, "plain"), train_dataset=XYPairs())
    with pytest.raises(TypeError, match="vars"):
        plain.train()
    ours = HeadPrepTrainer(model=FcClassifier(), args=_args(HeadPrepConfig, tmp_path, "o"), train_dataset=XYPairs())
    with pytest.raises(ValueError, match=r"train_dataset\[0\] is a tuple \(Tensor, int\).*'input_x': <model input>"):
        ours.train()


class ConvClassifier(nn.Module):
    """A small convolutional classifier with an `fc` head and its own cross-entropy, for channels_last runs."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 3)

    def forward(self, input_x, labels=None):
        logits = self.fc(self.body(input_x.view(-1, 3, 4, 4)))
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_channels_last_model_trains_saves_and_resumes_as_with_trainer(tmp_path):
    """`to_channels_last` weights (the recipes' default) under hp_epochs=0, with the optimizer-state layout hook that
    `create_optimizer` registers: the same weights and logs as plain Trainer, and a resume from a checkpoint the plain
    Trainer wrote (same layout: the hook leaves the state as loaded) ends where the uninterrupted plain run ends."""
    from headprep_hf.data import to_channels_last

    def make_model(seed=0):
        return to_channels_last(ConvClassifier(seed))

    data = XYData(dim=48)
    plain, ours = _pair(tmp_path, make_model, train=data, headprep_args={"track_dynamics": False})
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)

    save = {"save_strategy": "steps", "save_steps": 3}

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 6

    Trainer(
        model=make_model(),
        args=_args(TrainingArguments, tmp_path, "run", **save),
        train_dataset=data,
        callbacks=[Stop()],
    ).train()
    resumed = HeadPrepTrainer(
        model=make_model(seed=5), args=_args(HeadPrepConfig, tmp_path, "run", **save), train_dataset=data
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    _same_weights(plain.model, resumed.model)
    assert resumed.model.body[0].weight.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------- returned metrics and data
def test_train_and_evaluate_return_trainers_metrics(tmp_path):
    """`Trainer.log` edits the record its caller returns (adds "epoch", the printing callbacks drop "total_flos"):
    `train()`'s and `evaluate()`'s metrics, `save_metrics` files and `on_evaluate`'s metrics are Trainer's, without the
    measurement keys added to the log record."""
    evaluated = {}

    class Seen(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            evaluated.setdefault(type(kwargs["model"]).__name__ + str(id(self)), []).append(sorted(metrics))

    results = []
    for trainer_cls, args_cls, name in (
        (Trainer, TrainingArguments, "plain"),
        (HeadPrepTrainer, HeadPrepConfig, "ours"),
    ):
        args = _args(args_cls, tmp_path, name, eval_strategy="epoch", num_train_epochs=1)
        trainer = trainer_cls(
            model=FcClassifier(),
            args=args,
            train_dataset=XYData(),
            eval_dataset=XYData(10, seed=3),
            callbacks=[Seen()],
        )
        trained, metrics = trainer.train().metrics, trainer.evaluate()
        trainer.save_metrics("eval", metrics)
        saved = (tmp_path / name / "eval_results.json").read_text()
        results.append((trained, metrics, saved))
    (plain_train, plain_eval, _), (our_train, our_eval, our_saved) = results
    timing = ("runtime", "per_second")
    assert sorted(plain_train) == sorted(our_train) and "epoch" in our_train and "total_flos" not in our_train
    assert {k: v for k, v in plain_train.items() if not k.endswith(timing)} == {
        k: v for k, v in our_train.items() if not k.endswith(timing)
    }
    assert sorted(plain_eval) == sorted(our_eval) and our_eval["eval_loss"] == plain_eval["eval_loss"]
    assert '"epoch": 1.0' in our_saved
    plain_seen, our_seen = evaluated.values()
    assert plain_seen == our_seen and all("epoch" in keys for keys in our_seen)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, n=40):
        self.data = XYData(n)

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


def test_iterable_dataset_trains_as_with_trainer_and_skips_what_needs_a_length(tmp_path):
    """An IterableDataset (Trainer runs it for max_steps): the same weights and logs; energy and drift, which take
    their samples from the training set, are skipped with a warning naming `energy_dataset`/`drift_dataset`."""
    with pytest.warns(UserWarning) as caught:
        plain, ours = _pair(tmp_path, FcClassifier, train=_Stream(), args={"max_steps": 7})
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    messages = " ".join(str(w.message) for w in caught)
    assert "energy_dataset=" in messages and "drift_dataset=" in messages
    assert "energy" not in ours.dynamics and "drift" not in ours.dynamics
    assert ours.dynamics["head_grad_norm"]  # the head gradient needs no pass over the data


@pytest.mark.parametrize("cached", [False, True])
def test_head_probing_on_an_iterable_dataset_names_the_fix(tmp_path, cached):
    args = _args(HeadPrepConfig, tmp_path, "hp", hp_epochs=1, max_steps=7, hp_cache_features=cached)
    for run in ("train", "probe_head"):
        trainer = HeadPrepTrainer(model=FcClassifier(), args=args, train_dataset=_Stream())
        with pytest.raises(ValueError, match=r"hp_epochs=1 counts epochs.*no length.*hp_epochs=0"):
            getattr(trainer, run)()


class ModuleDictHeads(nn.Module):
    """Multi-task style: the heads sit in a `ModuleDict` named `head`, which is never called itself."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(4, 16)
        self.head = nn.ModuleDict({"cls": nn.Linear(16, 3), "aux": nn.Linear(16, 1)})

    def forward(self, input_x, labels=None):
        logits = self.head["cls"](torch.relu(self.body(input_x)))
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


class LeftoverFc(FcClassifier):
    """An `fc` left from the pretrained model; the forward uses `out` instead."""

    def __init__(self, seed=0):
        super().__init__(seed=seed)
        self.out = nn.Linear(16, 3)

    def forward(self, input_x, labels=None):
        logits = self.out(self.body(input_x))
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("model_cls", [ModuleDictHeads, LeftoverFc])
def test_a_guessed_head_the_forward_does_not_call_trains_as_with_trainer(tmp_path, model_cls):
    with pytest.warns(UserWarning, match=r"did not call the head.*head_modules=\[...\]"):
        plain, ours = _pair(tmp_path, model_cls)
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    assert ours.dynamics["energy"] > 0 and "drift" not in ours.dynamics
    # The head gradient norm is over the guessed head's parameters that got a gradient: `head["cls"]`, or none.
    assert ("head_grad_norm" in ours.dynamics) == (model_cls is ModuleDictHeads)


def test_a_named_head_the_forward_does_not_call_is_an_error_naming_it(tmp_path):
    args = _args(HeadPrepConfig, tmp_path, "named", head_modules=["fc"])
    with pytest.raises(RuntimeError, match=r"did not call the head \['fc'\].*head_modules=\[...\].*track_dynamics"):
        HeadPrepTrainer(model=LeftoverFc(), args=args, train_dataset=XYData()).train()


def test_a_batch_whose_labels_are_all_ignored_adds_nothing_and_stops_nothing(tmp_path):
    """The trainer's cross-entropy (used for logits-only models and in smoothing stages) over a batch whose labels
    are all `ignore_index`: 0 with zero gradients (torch's mean is 0/0 = NaN), so the non-finite guard of an HP run
    does not take it for divergence."""
    from headprep_hf import smoothed_cross_entropy

    logits = torch.randn(4, 3, requires_grad=True)
    for smoothing in (0.0, 0.1):
        loss = smoothed_cross_entropy(logits, torch.full((4,), -100), smoothing)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits.grad))
        partial = torch.tensor([1, -100, 2, -100])
        expected = F.cross_entropy(logits, partial, ignore_index=-100, label_smoothing=smoothing)
        assert torch.equal(smoothed_cross_entropy(logits, partial, smoothing), expected)
    data = XYData(16, ignore_every=4)  # samples 0, 4, 8, 12 unlabelled: batches of one hold nothing to learn
    args = _args(HeadPrepConfig, tmp_path, "hp", hp_epochs=1, per_device_train_batch_size=1, num_train_epochs=1)
    trainer = HeadPrepTrainer(model=FcLogitsOnly(), args=args, train_dataset=data)
    trainer.train()  # on_nonfinite="raise" in runs with HP
    assert all(math.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)


class DataOrderRecorder(FcClassifier):
    """An `FcClassifier` with state that grows as it trains (a buffer of the first feature of every training
    sample), loaded at any size by its own `load_state_dict` (transformers' `test_resume_batch_order` model)."""

    def __init__(self, seed=0):
        super().__init__(seed=seed)
        self.register_buffer("seen", torch.zeros(0))

    def forward(self, input_x, labels=None):
        if self.training:
            self.seen = torch.cat([self.seen, input_x[:, 0].detach()])
        return super().forward(input_x, labels)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self.seen = state_dict["seen"].clone()
        return super().load_state_dict(state_dict, strict, assign)


@pytest.mark.parametrize("track_dynamics", [True, False])
def test_a_buffer_that_grows_resumes_as_with_trainer(tmp_path, track_dynamics):
    # The check that a checkpoint holds this model's weights compared every tensor's shape, buffers too: the model's
    # own checkpoint was refused ("data_order (12,) in the checkpoint, (0,) in the model"), which Trainer resumes.
    save = {"save_strategy": "steps", "save_steps": 3}

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 6

    reference = Trainer(
        model=DataOrderRecorder(), args=_args(TrainingArguments, tmp_path, "plain", **save), train_dataset=XYData()
    )
    reference.train()
    ours = _args(HeadPrepConfig, tmp_path, "ours", **save, track_dynamics=track_dynamics)
    HeadPrepTrainer(model=DataOrderRecorder(), args=ours, train_dataset=XYData(), callbacks=[Stop()]).train()
    resumed = HeadPrepTrainer(model=DataOrderRecorder(seed=5), args=ours, train_dataset=XYData())
    resumed.train(resume_from_checkpoint=str(tmp_path / "ours" / "checkpoint-6"))
    assert resumed.model.seen.shape == reference.model.seen.shape == (80,)
    _same_weights(reference.model, resumed.model)


def test_compute_loss_func_with_a_kwargs_forward_and_label_names_is_trainers(tmp_path):
    # The usual compute_loss_func set-up: a forward(x, **kwargs) returning logits, label_names=["labels"], the loss in
    # the user's function. The check for a **kwargs model that returns no loss took its bare logits for a missing
    # loss and refused it; Trainer computes the loss with the function.
    class LogitsKwargs(FcLogitsOnly):
        def forward(self, input_x, **kwargs):
            return self.fc(self.body(input_x))

    def loss_func(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs, labels)

    plain, ours = _pair(tmp_path, LogitsKwargs, args={"label_names": ["labels"]}, compute_loss_func=loss_func)
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)


class OneRequiredInput(FcClassifier):
    """`forward(input_x, scale=1.0)`: one required input and an option, no labels (its loss comes from
    `compute_loss_func`), like timm's ViTs' `forward(x, attn_mask=None, is_causal=False)`."""

    def forward(self, input_x, scale=1.0):
        return {"logits": self.fc(self.body(input_x)) * scale}


def test_a_forward_with_one_required_input_named_in_the_data_keeps_trainers_column_removal(tmp_path):
    # A forward with one required input is called positionally; column removal is turned off only where Trainer's
    # would drop that input. Here the data names it, so the string column goes as with Trainer (left in, it broke the
    # default collator).
    datasets = pytest.importorskip("datasets")
    xy = XYData()
    data = datasets.Dataset.from_dict(
        {"input_x": xy.x.tolist(), "labels": xy.y, "note": [f"sample {i}" for i in range(len(xy))]}
    ).with_format("torch")

    def loss_func(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs["logits"], labels)

    plain, ours = _pair(
        tmp_path, OneRequiredInput, data, args={"label_names": ["labels"]}, compute_loss_func=loss_func
    )
    assert ours.model_caller.positional and ours.args.remove_unused_columns
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)

    # An iterable set (here one that can be read once): Trainer's removal item by item, nothing read ahead (a peek at
    # its first item made the run skip it).
    class Stream(torch.utils.data.IterableDataset):
        def __init__(self):
            self.items = iter([{"input_x": xy.x[i], "labels": xy.y[i], "idx": i} for i in range(len(xy))])

        def __iter__(self):
            return self.items

    runs = []
    for trainer_cls, args_cls in ((Trainer, TrainingArguments), (HeadPrepTrainer, HeadPrepConfig)):
        args = _args(args_cls, tmp_path, f"stream-{trainer_cls.__name__}", label_names=["labels"], max_steps=4)
        runs.append(
            trainer_cls(model=OneRequiredInput(), args=args, train_dataset=Stream(), compute_loss_func=loss_func)
        )
        runs[-1].train()
    assert runs[1].args.remove_unused_columns
    _same_weights(runs[0].model, runs[1].model)


# ------------------------------------------------------------------ found by a review of the contract (2026-11-28)
def _both_trained(build):
    """`build(trainer class, arguments class, name)` for the plain Trainer and for HeadPrepTrainer, each trained;
    returns both (for trainers that `_pair` cannot build: subclasses, a collator of each run's own)."""
    runs = []
    for trainer_cls, args_cls, name in (
        (Trainer, TrainingArguments, "plain"),
        (HeadPrepTrainer, HeadPrepConfig, "ours"),
    ):
        trainer = build(trainer_cls, args_cls, name)
        trainer.train()
        runs.append(trainer)
    return runs


class SelfSupervised(nn.Module):
    """A forward that takes no labels and returns a loss of its own (a reconstruction objective), on data that also
    holds `labels`: `Trainer` trains it with that loss."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Linear(4, 16)
        self.fc = nn.Linear(16, 3)
        self.dec = nn.Linear(3, 4)

    def forward(self, input_x):
        logits = self.fc(torch.relu(self.enc(input_x)))
        return {"loss": F.mse_loss(self.dec(logits), input_x), "logits": logits}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_labelless_model_that_returns_its_own_loss_trains_with_it_as_with_trainer(tmp_path, accumulation):
    args = {"per_device_train_batch_size": 8 // accumulation, "gradient_accumulation_steps": accumulation}
    plain, ours = _pair(tmp_path, SelfSupervised, args={**args, "max_grad_norm": 0.0})
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    assert ours.dynamics["energy"] > 0  # (the labels are still there to measure with)
    # problem_type asks for the trainer's loss instead: the cross-entropy on the labels, another run.
    trainer = HeadPrepTrainer(
        model=SelfSupervised(),
        args=_args(HeadPrepConfig, tmp_path, "ce", problem_type="single_label_classification", **args),
        train_dataset=XYData(),
    )
    trainer.train()
    assert trainer.state.log_history[0]["loss"] != plain.state.log_history[0]["loss"]


class InputsOnly(torch.utils.data.Dataset):
    """`XYData`'s inputs without labels (data for a self-supervised objective)."""

    def __init__(self):
        self.x = XYData().x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_x": self.x[i]}


def test_a_labelless_model_that_returns_its_own_loss_trains_on_data_without_labels_as_with_trainer(tmp_path):
    """`ViTMAEForPreTraining` on images alone: `Trainer` trains it with its own loss. It was refused before training
    ("train_dataset[0] holds no 'labels'"); now it trains the same, energy is skipped with a warning (nothing to
    measure it against) and drift is measured."""
    with pytest.warns(UserWarning, match=r"train_dataset's items hold no 'labels'.*energy_dataset"):
        plain, ours = _pair(tmp_path, SelfSupervised, InputsOnly())
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    assert ours.dynamics.get("energy") is None and len(ours.dynamics["drift"]) > 0
    # With HP (uncached): the head trains on the model's own loss, the backbone stays as it was.
    model = SelfSupervised()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = HeadPrepTrainer(
        model=model, args=_args(HeadPrepConfig, tmp_path, "hp", hp_epochs=1, max_steps=-1), train_dataset=InputsOnly()
    )
    with pytest.warns(UserWarning, match="hold no 'labels'"):
        trainer.probe_head()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc.weight", "fc.bias"}
    # Labels given through energy_dataset are measured against.
    trainer = HeadPrepTrainer(
        model=SelfSupervised(),
        args=_args(HeadPrepConfig, tmp_path, "energy"),
        train_dataset=InputsOnly(),
        energy_dataset=XYData(),
    )
    trainer.train()
    assert trainer.dynamics["energy"] > 0


def test_vit_mae_pretraining_on_images_alone_trains_as_with_trainer(tmp_path):
    """The real model of that case: transformers' `ViTMAEForPreTraining` (tiny, random weights) on pixel values
    alone. Its random masking draws from the global RNG, so the measurement passes (forked RNG) must not move it."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )  # fmt: skip
    pixels = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(pixels)

        def __getitem__(self, i):
            return {"pixel_values": pixels[i]}

    def make_model():
        torch.manual_seed(0)
        return ViTMAEForPreTraining(config)

    with pytest.warns(UserWarning, match="hold no 'labels'"):
        plain, ours = _pair(tmp_path, make_model, Images(), args={"per_device_train_batch_size": 4})
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)


def test_a_labelless_model_without_a_loss_on_data_without_labels_is_named_at_its_first_step(tmp_path):
    """The same data for a model that returns logits only: nothing to train with. `Trainer` fails with "did not
    return a loss"; here the first step names the missing labels and the fix (before training where the run asks for
    the trainer's loss, e.g. with problem_type)."""

    class LogitsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, input_x):
            return {"logits": self.fc(input_x)}

    args = _args(HeadPrepConfig, tmp_path, "logits", track_dynamics=False)
    trainer = HeadPrepTrainer(model=LogitsOnly(), args=args, train_dataset=InputsOnly())
    with pytest.raises(
        ValueError, match=r"train_dataset\[0\] holds no 'labels' \(its keys: \['input_x'\]\).*LogitsOnly"
    ):
        trainer.train()
    assert trainer.state.global_step == 0
    args = _args(HeadPrepConfig, tmp_path, "declared", problem_type="single_label_classification")
    trainer = HeadPrepTrainer(model=LogitsOnly(), args=args, train_dataset=InputsOnly())
    with pytest.raises(ValueError, match=r"train_dataset\[0\] holds no 'labels'"):
        trainer.train()


class _AcceptsLossKwargs(FcClassifier):
    accepts_loss_kwargs = True  # (as transformers' models declare)

    def forward(self, input_x, labels=None, num_items_in_batch=None):
        return super().forward(input_x, labels)


def test_loss_scaling_a_subclass_sets_on_the_instance_is_kept(tmp_path):
    """Trainer's docstring: a subclass computing its own loss sets `loss_is_scaled_for_ga`; set on the instance it
    was put back to the class's value at every optimizer step, so a per-micro-batch mean was not divided."""

    def mean_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(input_x=inputs["input_x"])
        loss = F.cross_entropy(out["logits"], inputs["labels"])
        return (loss, out) if return_outputs else loss

    def init(self, *args, **kwargs):
        type(self).__mro__[1].__init__(self, *args, **kwargs)
        self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: Trainer divides it by the accumulation steps

    def build(base, args_cls, name):
        cls = type(f"Mean{base.__name__}", (base,), {"compute_loss": mean_loss, "__init__": init})
        args = _args(args_cls, tmp_path, name, per_device_train_batch_size=4, gradient_accumulation_steps=2)
        return cls(model=_AcceptsLossKwargs(), args=args, train_dataset=XYData())

    plain, ours = _both_trained(build)
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    assert ours.loss_is_scaled_for_ga is False


class _OwnGenerator:
    """A collator drawing from a generator of its own (as `DataCollatorForLanguageModeling(seed=...)` masks): noise
    on the inputs."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(7)

    def __call__(self, items):
        x = torch.stack([item["input_x"] for item in items])
        noise = torch.randn(x.shape, generator=self.generator)
        return {"input_x": x + 0.5 * noise, "labels": torch.tensor([item["labels"] for item in items])}


class _CountingClassifier(FcClassifier):
    """Buffers the forward updates in eval mode too, as quantization observers do, and uses: a call counter (in
    place) and a running mean of the inputs (replaced). Measurement passes that fed them would change training."""

    def __init__(self, seed=0):
        super().__init__(seed=seed)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, input_x, labels=None):
        self.calls += 1
        self.mean = 0.9 * self.mean + 0.1 * input_x.mean(0)
        return super().forward((input_x - self.mean) * (1 + 0.01 * self.calls), labels)


@pytest.mark.parametrize("cached_probe", [True, False], ids=["replayed-probe", "reread-probe"])
def test_measurements_draw_nothing_from_the_collator_and_change_no_buffer(tmp_path, cached_probe, monkeypatch):
    if not cached_probe:  # (the probe read again at every pass, as for probes too large for memory)
        monkeypatch.setattr("headprep_hf.dynamics.PROBE_MEMORY_LIMIT", 0)
    plain, ours = _both_trained(
        lambda trainer_cls, args_cls, name: trainer_cls(
            model=_CountingClassifier(),
            args=_args(args_cls, tmp_path, name),
            train_dataset=XYData(),
            data_collator=_OwnGenerator(),  # (one for each: the plain run must not draw the other's numbers)
        )
    )
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    assert ours.dynamics["energy"] > 0 and len(ours.dynamics["drift"]) == 2


class _KeywordHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(16, 3)

    def forward(self, hidden_states):
        return self.dense(hidden_states)


class _HeadByKeyword(FcClassifier):
    def __init__(self, seed=0):
        super().__init__(seed=seed)
        del self.fc
        self.head = _KeywordHead()

    def forward(self, input_x, labels=None):
        logits = self.head(hidden_states=self.body(input_x))
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


class _MultiScaleHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16 + 8, 3)

    def forward(self, feats):
        return self.proj(torch.cat(feats, dim=-1))


class _HeadOnAList(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.head = nn.Linear(4, 16), nn.Linear(16, 8), _MultiScaleHead()

    def forward(self, input_x, labels=None):
        h1 = torch.relu(self.a(input_x))
        logits = self.head([h1, torch.relu(self.b(h1))])
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_a_head_called_by_keyword_or_with_a_list_trains_as_with_trainer(tmp_path):
    plain, ours = _pair(tmp_path / "keyword", _HeadByKeyword)
    _same_weights(plain.model, ours.model)
    direct = ours.model.body(XYData().x[:1])  # the drift is measured on the head's keyword input
    assert len(ours.dynamics["drift"]) == 2 and direct.shape[-1] == 16
    with pytest.warns(UserWarning, match=r"called with a list, not one tensor.*head_modules=\[\.\.\.\]"):
        plain, ours = _pair(tmp_path / "list", _HeadOnAList)
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    assert "drift" not in ours.dynamics and ours.dynamics["energy"] > 0


class _SizedStream(_Stream):
    def __len__(self):
        return len(self.data)


def test_a_stream_with_a_length_trains_as_with_trainer_and_names_drift_dataset(tmp_path):
    """An IterableDataset with `__len__` (Trainer runs it by epochs): its samples cannot be picked for the probe."""
    with pytest.warns(UserWarning, match="an IterableDataset .* drift_dataset="):
        plain, ours = _pair(tmp_path, FcClassifier, train=_SizedStream())
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    assert ours.dynamics["energy"] > 0 and "drift" not in ours.dynamics


class _RequiredLabels(FcClassifier):
    def forward(self, input_x, labels):
        return super().forward(input_x, labels)


class _OwnVocabulary(FcClassifier):
    def __init__(self, seed=0):
        super().__init__(seed=seed)
        self.problem_type = "multiclass"  # (the model's own word: not one of the toolkit's problem types)


@pytest.mark.parametrize("model_cls", [_RequiredLabels, _OwnVocabulary], ids=["labels-required", "own-problem-type"])
def test_models_the_measurements_failed_on_train_as_with_trainer(tmp_path, model_cls):
    plain, ours = _pair(tmp_path, model_cls)
    _same_weights(plain.model, ours.model)
    _assert_same_logs(plain, ours)
    assert ours.dynamics["energy"] > 0 and len(ours.dynamics["drift"]) == 2
