import contextlib
import json
import os

import pytest
import torch
from conftest import TinyImages, clone_state, make_config, tiny_timm
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

from headprep_hf import HeadPrepTrainer


def _trainer(tmp_path, train_set, eval_set=None, model=None, **overrides):
    model = model if model is not None else tiny_timm()
    return HeadPrepTrainer(
        model=model, args=make_config(tmp_path, **overrides), train_dataset=train_set, eval_dataset=eval_set
    )


def _changed(before, after):
    return sorted(k for k in before if not torch.equal(before[k], after[k]))


def test_probe_head_freezes_backbone_params_and_buffers(tmp_path, train_set):
    trainer = _trainer(tmp_path, train_set)
    split, model = trainer.split, trainer.model
    backbone0 = clone_state(split.backbone_state(model))
    head0 = clone_state(dict(split.head_parameters(model)))
    assert any("running_mean" in k for k in backbone0)  # BatchNorm buffers are part of the check
    trainer.probe_head()
    assert _changed(backbone0, split.backbone_state(model)) == []
    assert _changed(head0, dict(split.head_parameters(model))) == sorted(head0)
    assert trainer.state.global_step == 2 * 3  # 2 HP epochs of 48/16 steps
    assert all(p.requires_grad for p in model.parameters())  # flags restored after the stage


def test_finetune_trains_backbone_with_a_fresh_optimizer_holding_every_parameter(tmp_path, train_set):
    trainer = _trainer(tmp_path, train_set)
    trainer.probe_head()
    hp_optimizer = trainer.optimizer
    backbone0 = clone_state(trainer.split.backbone_state(trainer.model))
    trainer.finetune()
    changed = _changed(backbone0, trainer.split.backbone_state(trainer.model))
    assert any(k.endswith("conv1.weight") for k in changed) and any("running_mean" in k for k in changed)
    assert trainer.optimizer is not hp_optimizer
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert os.path.isdir(tmp_path / "out") and trainer.dynamics["drift"]


def test_train_runs_both_stages_in_one_call(tmp_path, train_set, eval_set):
    trainer = _trainer(tmp_path, train_set, eval_set, eval_strategy="epoch", num_train_epochs=2)
    model, split = trainer.model, trainer.split
    snapshots = {}

    class Spy:
        def __init__(self):
            self.stages = []

    spy = Spy()
    original = trainer.training_step

    def step(model_, inputs, num_items_in_batch=None):
        loss = original(model_, inputs, num_items_in_batch)
        spy.stages.append(trainer.current_stage)
        if trainer.state.global_step == trainer.stage_plan.hp_steps - 1:
            snapshots["hp_end_backbone"] = clone_state(split.backbone_state(model))
        return loss

    trainer.training_step = step
    backbone0 = clone_state(split.backbone_state(model))
    trainer.train()
    assert spy.stages == ["hp"] * 6 + ["ft"] * 6
    assert _changed(backbone0, snapshots["hp_end_backbone"]) == []
    assert _changed(backbone0, split.backbone_state(model))
    optimizer_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimizer_params == {id(p) for p in model.parameters()}
    # Trainer's keys stay; stage-tagged copies beside them keep the stages apart, including evaluation
    keys = {k for record in trainer.state.log_history for k in record}
    assert {"hp/loss", "ft/loss", "eval_hp/loss", "eval_ft/loss", "ft/head_grad_norm", "drift/cos"} <= keys
    assert {"loss", "learning_rate", "eval_loss"} <= keys
    for record in trainer.state.log_history:
        for stage in ("hp", "ft"):
            if f"{stage}/loss" in record:
                assert record[f"{stage}/loss"] == record["loss"]
    hp_steps = [r["step"] for r in trainer.state.log_history if "hp/loss" in r]
    ft_steps = [r["step"] for r in trainer.state.log_history if "ft/loss" in r]
    assert max(hp_steps) == 6 and min(ft_steps) == 7
    with open(tmp_path / "out" / "headprep_dynamics.json") as f:
        written = json.load(f)
    assert written["energy"] == pytest.approx(trainer.dynamics["energy"])
    assert len(written["p0"]) == len(train_set)
    assert [d["step"] for d in written["drift"]] == [9, 12]


def test_hp_backbone_mode_train_moves_batchnorm_statistics_only(tmp_path, train_set):
    trainer = _trainer(tmp_path, train_set, hp_backbone_mode="train")
    backbone0 = clone_state(trainer.split.backbone_state(trainer.model))
    trainer.probe_head()
    changed = _changed(backbone0, trainer.split.backbone_state(trainer.model))
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)


def test_reinit_modules_train_with_the_head(tmp_path, train_set):
    model = tiny_timm()
    original = clone_state(model.layer4.state_dict())
    trainer = _trainer(tmp_path, train_set, model=model, reinit_modules=["layer4.0"])
    reinit = clone_state(model.layer4.state_dict())
    assert _changed(original, reinit)  # re-initialised at construction
    frozen = clone_state(trainer.split.backbone_state(model))
    assert not any(k.startswith("layer4.0.") for k in frozen)
    trainer.probe_head()
    assert _changed(frozen, trainer.split.backbone_state(model)) == []
    assert any(k.endswith("conv1.weight") for k in _changed(reinit, model.layer4.state_dict()))


def test_mlp_head_and_timm_wrapper(tmp_path, train_set):
    torch.manual_seed(0)
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=3))
    trainer = _trainer(tmp_path, train_set, model=model, head_type="mlp", mlp_hidden_size=16, num_train_epochs=1)
    assert trainer.split.head_names == ["timm_model.fc"]
    backbone0 = clone_state(trainer.split.backbone_state(model))
    trainer.train()
    assert _changed(backbone0, trainer.split.backbone_state(model))
    assert trainer.dynamics["num_probe_samples"] == 20


def test_label_smoothing_per_stage(tmp_path, train_set):
    seen = []

    class Recorder(HeadPrepTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                seen.append((self.current_stage, self.current_label_smoothing))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = make_config(tmp_path, hp_epochs=1, hp_label_smoothing=0.3, ft_label_smoothing=0.1)
    trainer = Recorder(model=tiny_timm(), args=args, train_dataset=train_set)
    trainer.train()
    assert seen == [("hp", 0.3)] * 3 + [("ft", 0.1)] * 3
    # Evaluation loss is never smoothed: it equals plain cross-entropy on the same batch.
    batch = {"pixel_values": train_set.x[:8], "labels": torch.tensor(train_set.labels[:8])}
    model = trainer.model.eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(batch["pixel_values"]), batch["labels"])
        assert trainer.compute_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_subclass_with_callback_still_gets_both_stages_and_measurements(tmp_path, train_set):
    from transformers import TrainerCallback

    class Count(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            Count.steps += 1

    class Custom(HeadPrepTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(inputs["pixel_values"])
            loss = torch.nn.functional.cross_entropy(logits, inputs["labels"])
            return (loss, {"logits": logits}) if return_outputs else loss

    model = tiny_timm()
    trainer = Custom(model=model, args=make_config(tmp_path), train_dataset=train_set, callbacks=[Count()])
    backbone0 = clone_state(trainer.split.backbone_state(model))
    trainer.train()
    assert Count.steps == 9
    assert "energy" in trainer.dynamics and trainer.dynamics["drift"] and trainer.dynamics["head_grad_norm"]
    assert _changed(backbone0, trainer.split.backbone_state(model))


@pytest.mark.parametrize("where", ["train", "eval"])
def test_out_of_range_labels_fail_before_training(tmp_path, train_set, eval_set, where):
    bad = TinyImages(16, seed=3)
    bad.labels[5] = 7
    trainer = _trainer(tmp_path, bad if where == "train" else train_set, bad if where == "eval" else eval_set)
    weights = clone_state(trainer.model.state_dict())
    name = "train_dataset" if where == "train" else "eval_dataset"
    with pytest.raises(ValueError, match=rf"{name}\[5\] has label 7, outside the 3 classes"):
        trainer.train()
    assert _changed(weights, trainer.model.state_dict()) == []


def test_constructor_rejects_unknown_reinit_module(tmp_path, train_set):
    with pytest.raises(ValueError, match=r"reinit_modules \['layer4.9'\] are not modules"):
        _trainer(tmp_path, train_set, reinit_modules=["layer4.9"])


def test_constructor_rejects_external_optimizers_with_head_probing(tmp_path, train_set):
    model = tiny_timm()
    with pytest.raises(ValueError, match="builds the two-stage optimizer and schedule"):
        HeadPrepTrainer(
            model=model,
            args=make_config(tmp_path),
            train_dataset=train_set,
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )


def test_learning_rates_follow_the_stages(tmp_path, train_set):
    trainer = _trainer(
        tmp_path,
        train_set,
        hp_epochs=1,
        num_train_epochs=1,
        learning_rate=1e-3,
        hp_learning_rate=0.05,
        lr_scheduler_type="constant",
    )
    trainer.train()
    schedules = trainer.lr_scheduler.lr_lambdas
    parts = [g["headprep_part"] for g in trainer.optimizer.param_groups]
    for part, fn in zip(parts, schedules):
        assert fn(0) == (0.05 if part == "head" else 0.0)
        assert fn(3) == 1e-3


def test_tensorboard_keeps_stages_apart_and_gets_the_p0_histogram(tmp_path, train_set, eval_set, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    trainer = _trainer(tmp_path, train_set, eval_set, report_to="tensorboard", eval_strategy="epoch")
    trainer.probe_head()
    trainer.finetune()  # global_step restarts at 0: the prefixes keep HP and FT curves apart
    events = EventAccumulator(str(logdir), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/hp/loss", "train/ft/loss", "eval/hp/loss", "eval/ft/loss", "train/drift/cos"} <= scalars
    assert "train/headprep/energy" in scalars
    assert "headprep/p0" in events.Tags()["histograms"]
    assert [e.step for e in events.Scalars("train/hp/loss")] == list(range(1, 7))
    assert [e.step for e in events.Scalars("train/ft/loss")] == [1, 2, 3]


def test_transformers_image_classifier_trains_in_both_stages(tmp_path, train_set):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    model = ResNetForImageClassification(config)  # forward(pixel_values=...), returns ImageClassifierOutput
    trainer = _trainer(tmp_path, train_set, model=model, hp_epochs=1)
    assert trainer.split.head_names == ["classifier"]
    backbone0 = clone_state(trainer.split.backbone_state(model))
    trainer.probe_head()
    assert _changed(backbone0, trainer.split.backbone_state(model)) == []
    trainer.finetune()
    assert any("running_mean" in k for k in _changed(backbone0, trainer.split.backbone_state(model)))
    assert trainer.dynamics["drift"][-1]["sq_dist"] > 0


def test_model_init_with_head_probing_prepares_and_stages_each_new_model(tmp_path, train_set):
    """train() builds the model anew from model_init: its head is probed with the backbone frozen, FT trains all."""
    models = []

    def model_init():
        models.append(tiny_timm())
        return models[-1]

    seen = {}

    class Watch(HeadPrepTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step == self.stage_plan.hp_steps - 1:  # the last HP update
                seen["backbone"] = clone_state(self.split.backbone_state(self.model))
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = Watch(model_init=model_init, args=make_config(tmp_path, hp_epochs=1), train_dataset=train_set)
    initial = clone_state(trainer.split.backbone_state(models[-1]))
    trainer.train()
    assert len(models) == 2 and trainer.model is models[-1]  # one for the constructor, one for train()
    assert _changed(initial, seen["backbone"]) == []  # the new model's backbone was frozen in HP ...
    assert any(k.endswith("conv1.weight") for k in _changed(initial, trainer.split.backbone_state(trainer.model)))
    assert all(p.requires_grad for p in trainer.model.parameters())  # ... and trained in FT


def test_reinit_refuses_parameters_it_cannot_redraw(tmp_path):
    """A module's own parameters (ConvNeXt's layer-scale gamma, a leaf without `reset_parameters`) have no known
    initialisation: re-initialising the block would leave them pretrained, so it is refused by name."""
    import timm

    from headprep_hf.heads import reinitialize_module

    block = timm.create_model("convnext_atto", pretrained=False).stages[3].blocks[0]
    with pytest.raises(ValueError, match=r"Cannot re-initialise \['gamma'\] of ConvNeXtBlock.*layer-scale"):
        reinitialize_module(block)
    resnet_block = timm.create_model("resnet10t", pretrained=False).layer4
    with torch.no_grad():
        for p in resnet_block.parameters():
            p.fill_(7.0)  # as if pretrained
    reinitialize_module(resnet_block)  # convolutions and BatchNorms only: every parameter re-drawn
    assert [n for n, p in resnet_block.named_parameters() if bool((p == 7.0).all())] == []


def test_the_lr_of_optimizer_cls_and_kwargs_is_the_ft_peak_with_head_probing(tmp_path):
    # Trainer (and hp_epochs=0) takes the kwargs' lr as the base rate the schedule scales; with HP the FT stage
    # trained at args.learning_rate instead, silently (0.001 for the 0.5 asked for).
    rates = {}
    for hp in (0, 1):
        args = make_config(tmp_path / str(hp), hp_epochs=hp, track_dynamics=False, learning_rate=1e-3,
                           lr_scheduler_type="linear")  # fmt: skip
        sgd = (torch.optim.SGD, {"lr": 0.5, "momentum": 0.9})
        trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(48),
                                  optimizer_cls_and_kwargs=sgd)  # fmt: skip
        trainer.train()
        key = "ft/learning_rate" if hp else "learning_rate"
        rates[hp] = [r[key] for r in trainer.state.log_history if key in r]
    assert rates[0] == pytest.approx([0.5, 1 / 3, 1 / 6]) and rates[1] == pytest.approx(rates[0])


def test_an_overridden_create_optimizer_with_its_own_rates_is_refused_with_head_probing(tmp_path):
    # Its groups carry their own lr: the two-stage schedule multiplied it by the stage's rate (FT at lr^2, HP 1000x
    # too low). Refused with the ways out; without HP any optimizer trains, as with Trainer.
    class Own(HeadPrepTrainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.args.learning_rate)
            return self.optimizer

    args = make_config(tmp_path / "hp", hp_epochs=1, track_dynamics=False)
    with pytest.raises(ValueError, match=r"groups \[0\] have no 'headprep_part'.*stages.param_groups.*hp_epochs=0"):
        Own(model=tiny_timm(), args=args, train_dataset=TinyImages(32)).train()
    Own(model=tiny_timm(), args=make_config(tmp_path / "plain", hp_epochs=0), train_dataset=TinyImages(32)).train()


def test_an_early_stopping_callback_added_later_is_held_back_during_hp_too(tmp_path):
    # Given to the constructor, it is held back during HP; added with add_callback() (Trainer's documented way), it
    # ran after the stage callback's veto and ended the run inside HP: FT never ran, and train() returned normally.
    from transformers import EarlyStoppingCallback

    args = make_config(tmp_path, hp_epochs=4, num_train_epochs=2, track_dynamics=False, eval_strategy="epoch",
                       save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="loss")  # fmt: skip
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(48),
                              eval_dataset=TinyImages(16, seed=1))  # fmt: skip
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=10.0))
    trainer.train()
    assert trainer.stage_plan.ft_started and trainer.state.global_step > trainer.stage_plan.hp_steps == 12


def test_resuming_with_hp_cache_features_switched_names_that_setting(tmp_path):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    settings = dict(hp_epochs=2, save_strategy="steps", save_steps=3, track_dynamics=False)
    HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, **settings), train_dataset=TinyImages(48),
                    callbacks=[Stop()]).train()  # fmt: skip
    cached = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, hp_cache_features=True, **settings),
                             train_dataset=TinyImages(48))  # fmt: skip
    with pytest.raises(ValueError, match="written without hp_cache_features; resume with the same setting"):
        cached.train(resume_from_checkpoint=True)


def test_a_stopper_added_later_moves_alone_and_a_subclass_passed_as_a_class_too(tmp_path):
    from transformers import EarlyStoppingCallback, TrainerCallback

    class Mine(TrainerCallback):
        pass

    class MyStopper(EarlyStoppingCallback):
        pass

    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path), train_dataset=TinyImages(16))
    trainer.add_callback(Mine())
    trainer.add_callback(MyStopper)
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    # the stopper runs before the stage callback, between its gates; the user's other callback keeps its place
    # after the trainer's
    assert names[-6:] == ["StopRequestGate", "MyStopper", "StopperHoldBack", "StageCallback", "MeasurementCallback",
                          "Mine"]  # fmt: skip


@pytest.mark.parametrize("budget_first", [True, False], ids=["budget-before-stopper", "budget-after-stopper"])
def test_another_callbacks_stop_during_hp_is_kept_when_a_stopper_is_out_of_patience(tmp_path, budget_first):
    # Holding back early stopping in HP cleared any stop request once a stopper had run out of patience, so a time
    # budget's stop at step 2 was cancelled and the run went on into FT; given after the stopper, the budget's stop
    # was still taken for the stopper's (the run went on to step 13).
    from transformers import EarlyStoppingCallback, TrainerCallback

    class Budget(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    args = make_config(tmp_path, hp_epochs=2, track_dynamics=False, eval_strategy="steps", eval_steps=1,
                       save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                       metric_for_best_model="loss")  # fmt: skip
    stopper = EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=10.0)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(48),
                              eval_dataset=TinyImages(16, seed=1),
                              callbacks=[Budget(), stopper] if budget_first else [stopper, Budget()])  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(auto_find_batch_size=True), "auto_find_batch_size=True cannot be used with hp_epochs > 0"),
        (
            dict(
                gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": True},
                reinit_modules=["layer4"],
            ),
            "Leave use_reentrant unset",
        ),  # fmt: skip
    ],
)
def test_settings_that_break_the_two_stages_are_refused(tmp_path, settings, message):
    # auto_find_batch_size's retry restarted Trainer's loop without the two-stage plan (HP steps at FT rates, the
    # backbone at 0); reentrant checkpointing gave the re-initialised block no gradient in HP.
    with pytest.warns(FutureWarning) if "gradient_checkpointing" in settings else contextlib.nullcontext():
        with pytest.raises(ValueError, match=message):
            make_config(tmp_path, hp_epochs=1, **settings)
    make_config(tmp_path, hp_epochs=0, **settings)  # (without HP: Trainer's behaviour)


@pytest.mark.parametrize("hp_epochs", [0, 1])
def test_activation_checkpointing_on_a_timm_model_names_timms_switch(tmp_path, hp_epochs):
    # Trainer failed in train() with "AttributeError: 'ResNet' object has no attribute
    # 'gradient_checkpointing_enable'". Refused when training starts: evaluation alone works, as with Trainer.
    args = make_config(tmp_path, activation_checkpointing=True, hp_epochs=hp_epochs)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(16))
    trainer.evaluate(TinyImages(16))
    with pytest.raises(ValueError, match=r"model\.set_grad_checkpointing\(True\)"):
        trainer.train()


def test_a_save_only_model_checkpoint_is_not_resumed_with_hp(tmp_path):
    # Without scheduler.pt the two-stage schedule restarted from HP in the middle of the run (FT at HP rates).
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    settings = dict(hp_epochs=1, save_strategy="steps", save_steps=4, save_only_model=True, track_dynamics=False)
    HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, **settings), train_dataset=TinyImages(48),
                    callbacks=[Stop()]).train()  # fmt: skip
    again = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, **settings), train_dataset=TinyImages(48))
    with pytest.raises(ValueError, match="checkpoint-4 holds no scheduler state.*save_only_model"):
        again.train(resume_from_checkpoint=True)
    # a loop without HP (finetune(), a sweep's FT job) restarts a plain schedule, as Trainer does: it resumes
    ft_dir, ft_settings = tmp_path / "ft", {**settings, "num_train_epochs": 2}
    HeadPrepTrainer(model=tiny_timm(), args=make_config(ft_dir, **ft_settings), train_dataset=TinyImages(48),
                    callbacks=[Stop()]).finetune()  # fmt: skip
    assert (ft_dir / "out" / "ft" / "checkpoint-4").is_dir()  # (one-stage calls with HP settings write to ft/)
    ft = HeadPrepTrainer(model=tiny_timm(), args=make_config(ft_dir, **ft_settings), train_dataset=TinyImages(48))
    ft.finetune(resume_from_checkpoint=True)
    assert ft.state.global_step == 6


def test_a_train_stopped_during_hp_says_that_ft_did_not_run(tmp_path, caplog):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, hp_epochs=2, track_dynamics=False),
                              train_dataset=TinyImages(48), callbacks=[Stop()])  # fmt: skip
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "Training stopped during HP, at update 2 of 6" in caplog.text and "FT did not run" in caplog.text


def test_the_stage_callbacks_keep_the_order_of_the_users_callbacks(tmp_path):
    # Moving the early stoppers behind the user's other callbacks (so that the gate could sit before them) changed
    # what a callback given after a stopper saw, in plain runs too.
    from transformers import EarlyStoppingCallback, TrainerCallback

    class Observer(TrainerCallback):
        pass

    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, hp_epochs=0), train_dataset=TinyImages(16),
                              callbacks=[EarlyStoppingCallback(), Observer()])  # fmt: skip
    trainer._add_own_callbacks()
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    user = [n for n in names if n in ("EarlyStoppingCallback", "Observer")]
    assert user == ["EarlyStoppingCallback", "Observer"]
    assert names.index("StopRequestGate") == names.index("EarlyStoppingCallback") - 1
    assert names[names.index("EarlyStoppingCallback") + 1] == "StopperHoldBack"
