"""The image recipe's data pipeline: the model's own data config through timm, uint8 loading, normalisation on the
model's device in one hook that every pass goes through."""

from __future__ import annotations

import random

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform

from headprep_hf.data import (
    attach_input_normalization,
    build_image_transforms,
    image_processor_data_config,
    input_normalization,
    resolve_image_data_config,
)

A1_LIKE = dict(crop_pct=0.95, interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _a1_like_model():
    """resnet18.a1_in1k's data config (crop 0.95, bicubic) on a small net, built offline."""
    return timm.create_model("resnet18", pretrained=False, num_classes=3, pretrained_cfg_overlay=A1_LIKE)


def _image(seed=0, size=(40, 52)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8))


def _seed(seed):
    random.seed(seed)  # timm's RandomResizedCrop and flip draw from `random`, ColorJitter from torch
    torch.manual_seed(seed)


def _float_of(transform_uint8, image, mean, std, seed=0):
    _seed(seed)
    x = transform_uint8(image)
    assert x.dtype == torch.uint8
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (x.float() / 255 - mean) / std


def test_data_config_is_the_models_own_and_each_flag_overrides_one_value():
    model = _a1_like_model()
    config = resolve_image_data_config(model)
    assert config["crop_pct"] == 0.95 and config["interpolation"] == "bicubic"
    assert config["input_size"] == (3, 224, 224)
    changed = resolve_image_data_config(model, image_size=32, crop_pct=1.0, interpolation="bilinear")
    assert changed["input_size"] == (3, 32, 32) and changed["crop_pct"] == 1.0
    assert changed["interpolation"] == "bilinear" and changed["mean"] == config["mean"]
    with pytest.raises(ValueError, match="crop_pct=1.5"):
        resolve_image_data_config(model, crop_pct=1.5)
    with pytest.raises(ValueError, match="image_size=0"):
        resolve_image_data_config(model, image_size=0)


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"no_aug": True},
        {"scale": (0.5, 1.0)},
        {"hflip": 0.0},
        {"color_jitter": 0.0},
        {"scale": (0.2, 0.9), "hflip": 1.0, "color_jitter": 0.1},
    ],
)
def test_transforms_equal_timms_create_transform_for_the_models_config(flags):
    config = resolve_image_data_config(_a1_like_model(), image_size=32)
    image = _image()
    ours_train = build_image_transforms(config, is_training=True, **flags)
    timm_train = create_transform(**config, is_training=True, **flags)  # timm's float pipeline, normalised
    _seed(3)
    expected = timm_train(image)
    assert torch.allclose(_float_of(ours_train, image, config["mean"], config["std"], seed=3), expected, atol=1e-6)
    ours_eval, timm_eval = build_image_transforms(config, is_training=False), create_transform(**config)
    assert torch.allclose(_float_of(ours_eval, image, config["mean"], config["std"]), timm_eval(image), atol=1e-6)
    # The eval transform is the model's: resize the short side to floor(32 / 0.95) = 33 px bicubic, crop 32.
    assert "bicubic" in repr(ours_eval) and "size=33," in repr(ours_eval)


def test_bad_augmentation_flags_name_the_fix():
    config = resolve_image_data_config({})
    with pytest.raises(ValueError, match=r"scale=\[0.5, 0.2\]"):
        build_image_transforms(config, is_training=True, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hflip=2"):
        build_image_transforms(config, is_training=True, hflip=2)
    # (timm's own error for these was a bare KeyError, and 'random' failed only at the eval transform)
    with pytest.raises(ValueError, match=r"interpolation='cubic' is not a resampling mode; give one of bilinear"):
        resolve_image_data_config({}, interpolation="cubic")
    with pytest.raises(ValueError, match="'random' is timm's --train-interpolation choice"):
        resolve_image_data_config({}, interpolation="random")


def test_processor_config_matches_the_processors_own_preprocessing():
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    config = image_processor_data_config(processor)
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0
    image = _image(size=(32, 32))
    ours = _float_of(build_image_transforms(config, is_training=False), image, config["mean"], config["std"])
    theirs = processor(image, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(ours, theirs, atol=1e-5)


_REPRODUCED = ["ViT", "DeiT", "Beit", "CLIP", "ConvNext", "PoolFormer", "MobileNetV2", "Segformer", "Siglip"]
_NOT_REPRODUCED = {  # what each processor does beyond resize, crop, 1/255 and mean/std
    "MobileViT": "flips the channel order",  # (BGR, and no normalisation)
    "EfficientNet": "",  # include_top divides by the std twice; its default include_top=True (named when set)
    "Levit": "",  # resizes the short side to 256/224 of the crop
    "Perceiver": r"shape \(3, 224, 224\), the recipe's \(3, 256, 256\)",  # crops 256, then resizes to 224
}


@pytest.mark.parametrize("family", _REPRODUCED + list(_NOT_REPRODUCED))
def test_a_processor_the_recipe_cannot_reproduce_is_refused_by_name(family):
    # The recipe reads a processor's size, crop, resample and mean/std into timm's transforms; a processor doing more
    # (MobileViT, EfficientNet, LeViT, Perceiver at their defaults) trained on other inputs than its own, silently.
    # The recipe now compares the two on a test image; the processors it reproduces pass (by 1e-4 or less).
    import transformers

    from headprep_hf.data.images import check_processor_reproduced

    processor = getattr(transformers, f"{family}ImageProcessor")()
    config = resolve_image_data_config(image_processor_data_config(processor))
    if family in _REPRODUCED:
        check_processor_reproduced(processor, config)
        return
    with pytest.raises(ValueError, match=rf"image processor \({family}ImageProcessor\).*{_NOT_REPRODUCED[family]}"):
        check_processor_reproduced(processor, config)


@pytest.mark.parametrize("flags", [dict(image_size=48), dict(image_size=40, interpolation="bicubic")])
def test_processor_saved_with_the_model_is_set_to_the_runs_data_config(tmp_path, flags):
    from transformers import AutoImageProcessor, ViTImageProcessor

    from headprep_hf.data.images import image_processor_for_data_config

    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    config = resolve_image_data_config(image_processor_data_config(processor), **flags)
    updated = image_processor_for_data_config(processor, config)
    updated.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    image = _image(size=(64, 64))
    # The saved processor preprocesses as this run's eval transform did (not as the source's 32-px processor).
    ours = _float_of(build_image_transforms(config, is_training=False), image, config["mean"], config["std"])
    theirs = loaded(image, return_tensors="pt")["pixel_values"][0]
    assert theirs.shape == ours.shape == (3, flags["image_size"], flags["image_size"])
    assert (ours - theirs).abs().max() < 0.05  # (PIL vs torchvision resize kernels differ slightly)
    assert processor.size["height"] == 32  # the source's processor is not changed
    # A crop: warp to floor(40 / 0.9) = 44, crop 40, which ViTImageProcessor expresses with do_center_crop (until
    # crop shares were compared by the sizes they give, 40 / 44 = 0.909 read back against 0.9 refused it).
    cropped = resolve_image_data_config(image_processor_data_config(processor), image_size=40, crop_pct=0.9)
    with_crop = image_processor_for_data_config(processor, cropped)
    assert with_crop.size["height"] == 44 and with_crop.crop_size["height"] == 40 and with_crop.do_center_crop
    ours = _float_of(build_image_transforms(cropped, is_training=False), image, cropped["mean"], cropped["std"])
    assert (ours - with_crop(image, return_tensors="pt")["pixel_values"][0]).abs().max() < 0.05


@pytest.mark.parametrize("resample", ["BOX", "HAMMING", "LANCZOS", "NEAREST"])
def test_a_processors_resampling_filter_is_read_and_saved_as_its_own(tmp_path, resample):
    # Only bicubic, nearest and lanczos were read from a processor: BOX and HAMMING became bilinear, and a run with
    # --interpolation box or hamming saved a processor saying bilinear (both filters are timm's and PIL's too).
    from PIL import Image
    from transformers import ViTImageProcessor

    from headprep_hf.data.images import image_processor_for_data_config

    processor = ViTImageProcessor(size={"height": 40, "width": 40}, resample=Image.Resampling[resample])
    config = resolve_image_data_config(image_processor_data_config(processor))
    assert config["interpolation"] == resample.lower()  # (timm's eval transform then resizes with that filter)
    bilinear = ViTImageProcessor(size={"height": 40, "width": 40})
    changed = resolve_image_data_config(image_processor_data_config(bilinear), interpolation=resample.lower())
    saved = image_processor_for_data_config(bilinear, changed)
    saved.save_pretrained(tmp_path)
    assert ViTImageProcessor.from_pretrained(tmp_path).resample == Image.Resampling[resample]
    with pytest.raises(ValueError, match=r"resample=17 is not a PIL resampling filter"):
        image_processor_data_config(ViTImageProcessor(resample=17))
    from torchvision.transforms import InterpolationMode  # (transformers' fast processors take one)

    mode = getattr(InterpolationMode, resample)
    assert image_processor_data_config(ViTImageProcessor(resample=mode))["interpolation"] == resample.lower()


def test_the_batch_that_reaches_the_model_equals_the_float_pipelines():
    model = _a1_like_model().eval()
    config = resolve_image_data_config(model, image_size=32)
    uint8_tf, float_tf = build_image_transforms(config, is_training=False), create_transform(**config)
    images = [_image(seed) for seed in range(4)]
    uint8_batch = torch.stack([uint8_tf(im) for im in images])
    float_batch = torch.stack([float_tf(im) for im in images])
    seen = []
    model.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    with torch.no_grad():
        reference = model(float_batch)
        attach_input_normalization(model, config["mean"], config["std"], channels_last=True)
        out = model(uint8_batch)
    assert seen[1].dtype == torch.float32 and seen[1].is_contiguous(memory_format=torch.channels_last)
    assert (seen[1] - float_batch).abs().max() <= 1e-6
    assert torch.allclose(out, reference, atol=1e-5)
    # A float batch passes untouched; the state dict (what is saved) holds no normalisation buffers.
    with torch.no_grad():
        assert torch.equal(model(float_batch), out) or torch.allclose(model(float_batch), out, atol=1e-5)
    assert not any("headprep_input" in k for k in model.state_dict())
    assert input_normalization(model)["mean"] == pytest.approx(list(config["mean"]))
    # A deep copy (what a sweep's jobs start from) normalises the same way; attaching again replaces, never stacks.
    import copy

    twin = attach_input_normalization(copy.deepcopy(model), config["mean"], config["std"])
    with torch.no_grad():
        assert torch.allclose(twin(uint8_batch), out, atol=1e-5)
    assert len(twin._forward_pre_hooks) == 1 and len(model._forward_pre_hooks) == 1


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_channels_last_converts_the_weights_as_timm_and_state_dicts_stay_saveable(tmp_path):
    import copy

    from safetensors.torch import load_file, save_file
    from transformers import Trainer, TrainingArguments

    model = attach_input_normalization(_a1_like_model(), (0.5,) * 3, (0.25,) * 3, channels_last=True)
    kernels = {n: p for n, p in model.named_parameters() if p.dim() == 4 and p.shape[-1] > 1}
    assert kernels and all(_channels_last(p) for p in kernels.values())  # as timm's train.py's model.to(...)
    # What is saved is contiguous and equal; the parameters keep their memory and their identity.
    state = model.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    assert all(torch.equal(state[n], p) for n, p in kernels.items())
    assert all(model.state_dict(keep_vars=True)[n] is p for n, p in kernels.items())
    assert all(_channels_last(p) for p in kernels.values())
    save_file(state, str(tmp_path / "own.safetensors"))  # raised "non contiguous tensor" before the hook
    # A plain transformers.Trainer saves the model (a timm model: its `_save` calls safetensors' save_file).
    args = TrainingArguments(str(tmp_path / "run"), report_to="none", use_cpu=True)
    Trainer(model=model, args=args).save_model(str(tmp_path / "saved"))
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert all(torch.equal(saved[n], p) for n, p in kernels.items())
    # Loading copies into the channels_last parameters; a sub-module's own state dict is contiguous too.
    twin = attach_input_normalization(copy.deepcopy(model), (0.5,) * 3, (0.25,) * 3, channels_last=True)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    twin.load_state_dict(saved)
    assert all(_channels_last(p) and torch.equal(p, kernels[n]) for n, p in twin.named_parameters() if n in kernels)
    assert all(t.is_contiguous() for t in twin.layer1.state_dict().values())
    # Converting a copy again does not stack a second hook.
    assert all(len(m._state_dict_hooks) == len(o._state_dict_hooks) for m, o in zip(twin.modules(), model.modules()))
    assert max(len(m._state_dict_hooks) for m in twin.modules()) == 1


def test_channels_last_runs_through_the_whole_deeplabv3_head():
    """DeepLabV3's ASPP pooling branch is a 1x1 map: with contiguous weights its convolution and upsampling came out
    contiguous, the concatenation with them too, and the rest of the head (projection, 3x3 convolution, classifier,
    upsampled logits) ran in the contiguous format."""
    from headprep_hf.models import TimmDeepLabV3

    torch.manual_seed(0)
    model = attach_input_normalization(TimmDeepLabV3("resnet10t", 5), (0.5,) * 3, (0.25,) * 3, channels_last=True)
    outputs = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o, name=name: outputs.append((name, o)))
    out = model(torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8))["out"]
    spatial = [(name, o) for name, o in outputs if o.shape[-1] * o.shape[-2] > 1]
    assert len(spatial) > 10 and any(name.startswith("classifier") for name, _ in spatial)
    assert [name for name, o in spatial if not _channels_last(o)] == []
    assert _channels_last(out)


def test_normalisation_takes_the_transformers_keyword_input():
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(
        ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            num_labels=3,
        )
    ).eval()
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        reference = model(pixel_values=(x.float() / 255 - 0.5) / 0.5).logits
        attach_input_normalization(model, [0.5] * 3, [0.5] * 3)
        out = model(pixel_values=x).logits
    assert torch.allclose(out, reference, atol=1e-6)


class _Uint8Images(torch.utils.data.Dataset):
    """uint8 images (as the recipes' loaders yield them) with image-dependent labels."""

    def __init__(self, n=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randint(0, 200, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
        for c in range(3):
            self.x[self.labels == c, c] += 55

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": int(self.labels[i])}


@pytest.mark.parametrize("cached", [False, True])
def test_every_pass_sees_the_same_normalised_inputs_as_training(tmp_path, cached):
    from conftest import bn_head_model, make_config

    from headprep_hf import HeadPrepTrainer

    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    train, val = _Uint8Images(48, seed=0), _Uint8Images(16, seed=1)
    expected = {}
    for name, data in (("train", train), ("validation", val)):
        expected[name] = (data.x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
            1, 3, 1, 1
        )
    reference = torch.cat([expected["train"], expected["validation"]]).flatten(1)
    model = attach_input_normalization(bn_head_model(), mean, std)
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    stem.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().flatten(1).clone()))
    args = make_config(tmp_path, hp_cache_features=cached, eval_strategy="epoch", hp_recompute_bn_stats=True)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    trainer.train()
    rows = torch.cat(seen)
    assert rows.dtype == torch.float32
    # Every row any pass fed the backbone (HP or its feature cache, the BatchNorm pass, the energy and drift passes,
    # FT, evaluation) is a normalised training or validation image, to float32 rounding.
    nearest = torch.cdist(rows, reference, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert nearest.max() <= 1e-4
    dyn = trainer.dynamics
    # More rows than training and evaluation read: the measurement passes went through the same hook.
    steps_rows = 48 * (args.num_train_epochs + (0 if cached else args.hp_epochs))
    assert len(rows) > steps_rows + 16 * (args.num_train_epochs + args.hp_epochs)
    assert dyn["energy"] is not None and dyn["drift"]


def test_persistent_workers_end_with_the_run_and_the_evaluation(tmp_path):
    import gc
    import multiprocessing
    import time

    from conftest import make_config, tiny_timm

    from headprep_hf import HeadPrepTrainer

    before = set(multiprocessing.active_children())
    args = make_config(
        tmp_path, dataloader_num_workers=2, dataloader_persistent_workers=True, eval_strategy="epoch", hp_epochs=1
    )
    trainer = HeadPrepTrainer(
        model=attach_input_normalization(tiny_timm(), (0.5,) * 3, (0.25,) * 3),
        args=args,
        train_dataset=_Uint8Images(48),
        eval_dataset=_Uint8Images(16, seed=1),
    )
    trainer.train()
    assert set(multiprocessing.active_children()) <= before  # training and evaluation workers have stopped
    trainer.evaluate()
    assert set(multiprocessing.active_children()) <= before
    trainer.predict(_Uint8Images(12, seed=2))  # (its workers outlived it, 5 s per worker in the collector)
    assert set(multiprocessing.active_children()) <= before
    del trainer
    start = time.perf_counter()
    gc.collect()
    assert time.perf_counter() - start < 2.0  # nothing left to time out in the collector (was 5 s per worker)


@pytest.mark.parametrize("order", ["validation_first", "test_first"])
def test_evaluating_another_dataset_with_persistent_workers_evaluates_that_dataset(tmp_path, order):
    # Trainer caches persistent evaluation loaders under "eval" for any dataset passed as an object: after
    # `evaluate()`, `evaluate(test_set)` returned the validation metrics as test_* (the recipes and the sweep evaluate
    # their test split this way, with persistent workers on file data). Reference: the same evaluations without
    # persistent workers, where Trainer builds a loader per call.
    import multiprocessing

    from conftest import make_config, tiny_timm

    from headprep_hf import HeadPrepTrainer

    def evaluations(persistent):
        args = make_config(
            tmp_path / str(persistent),
            hp_epochs=0,
            track_dynamics=False,
            dataloader_num_workers=1,
            dataloader_persistent_workers=persistent,
        )
        torch.manual_seed(0)
        model = attach_input_normalization(tiny_timm(), (0.5,) * 3, (0.25,) * 3)
        trainer = HeadPrepTrainer(model=model, args=args, eval_dataset=_Uint8Images(16, seed=1))
        test = _Uint8Images(12, seed=2)
        if order == "validation_first":
            out = [trainer.evaluate()["eval_loss"], trainer.evaluate(test, metric_key_prefix="test")["test_loss"]]
        else:
            out = [trainer.evaluate(test, metric_key_prefix="test")["test_loss"], trainer.evaluate()["eval_loss"]]
        return out + [trainer.evaluate()["eval_loss"]]

    before = set(multiprocessing.active_children())
    expected = evaluations(persistent=False)
    assert len({round(v, 6) for v in expected}) == 2  # the two sets give different losses
    assert evaluations(persistent=True) == pytest.approx(expected, abs=1e-6)
    assert set(multiprocessing.active_children()) <= before  # the test set's own loader stopped its workers too


def test_evaluating_another_dataset_during_training_leaves_no_workers_behind(tmp_path):
    # The test set's loader is read once: its workers are not persistent, so a callback evaluating it at every epoch
    # end does not add a set of worker processes per evaluation until train() returns.
    import multiprocessing

    from conftest import make_config, tiny_timm
    from transformers import TrainerCallback

    from headprep_hf import HeadPrepTrainer

    before, alive = set(multiprocessing.active_children()), []

    class EvaluateTest(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            trainer.evaluate(_Uint8Images(12, seed=2), metric_key_prefix="test")
            alive.append(len(set(multiprocessing.active_children()) - before))

    args = make_config(tmp_path, hp_epochs=0, num_train_epochs=3, track_dynamics=False, dataloader_num_workers=1,
                       dataloader_persistent_workers=True)  # fmt: skip
    model = attach_input_normalization(tiny_timm(), (0.5,) * 3, (0.25,) * 3)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=_Uint8Images(32), callbacks=[EvaluateTest()])
    trainer.train()
    assert alive == [1, 1, 1]  # the training loader's persistent worker only
    assert set(multiprocessing.active_children()) <= before


def test_real_data_flags_on_the_toy_task_are_refused_before_any_work():
    from headprep_hf.tasks.image_classification import ImageClassificationArguments, load_image_classification

    with pytest.raises(ValueError, match="--image_size applies to real data"):
        load_image_classification(ImageClassificationArguments(image_size=32, cache_dir="/nonexistent"), seed=0)
    # timm's augmentation flags have nothing to act on there (they were ignored without a word)
    with pytest.raises(ValueError, match="--energy_on_eval_transform applies to real data"):
        load_image_classification(ImageClassificationArguments(energy_on_eval_transform=True, cache_dir="/x"), seed=0)
    for flag in (dict(hflip=0.0), dict(scale=[1.0, 1.0]), dict(color_jitter=0.0)):
        name = next(iter(flag))
        with pytest.raises(ValueError, match=f"--{name} sets timm's augmentation of real images"):
            load_image_classification(ImageClassificationArguments(**flag, cache_dir="/nonexistent"), seed=0)


def test_a_recorded_toy_run_with_ignored_augmentation_flags_loads_without_them(caplog):
    # Versions that ignored timm's flags on the toy task recorded them in sweep.json; `headprep exchange` then hit the
    # toy task's refusal of them, and the record could not be loaded at all.
    import dataclasses

    from headprep_hf.tasks import get_task, task_record
    from headprep_hf.tasks.image_classification import ImageClassificationArguments, without_ignored_toy_augmentation

    recorded = task_record(get_task("image_classification"), ImageClassificationArguments(hflip=0.0, scale=[0.5, 1]))
    args = ImageClassificationArguments(**recorded["args"])
    with caplog.at_level("WARNING"):
        loaded = without_ignored_toy_augmentation(args)
    assert loaded == ImageClassificationArguments() and "--scale [0.5, 1], --hflip 0.0" in caplog.text
    real = dataclasses.replace(args, train_dir="/data/train")  # (real data: the flags act, and are kept)
    assert without_ignored_toy_augmentation(real) is real


def test_no_aug_turns_off_the_toy_tasks_augmentation(tmp_path):
    """--no_aug on the offline toy task: its training images were still rotated and zoomed on every read."""
    import timm

    from headprep_hf.tasks.image_classification import ImageClassificationArguments, load_image_classification

    source = tmp_path / "source"
    timm.models.save_for_hf(timm.create_model("test_resnet", num_classes=10), str(source))
    for no_aug in (False, True):
        args = ImageClassificationArguments(model_name_or_path=str(source), no_aug=no_aug)
        train = load_image_classification(args, seed=0).train_dataset
        assert torch.equal(train[0]["pixel_values"], train[0]["pixel_values"]) is no_aug


def test_torch_compile_traces_each_stage_once(tmp_path):
    # `--torch_compile` through HP and FT with uint8 inputs normalised by the model's hook: dynamo traces the model
    # once for HP and once more at the switch to FT (other trainable parameters and modes), never per step. The
    # `eager` backend makes dynamo trace and count exactly as with inductor, without compiling kernels.
    import torch._dynamo
    from conftest import make_config, tiny_timm
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback

    from headprep_hf import HeadPrepTrainer

    class Graphs(TrainerCallback):
        def __init__(self):
            self.per_step = []

        def on_step_end(self, args, state, control, **kwargs):
            self.per_step.append(counters["stats"]["unique_graphs"])

    torch._dynamo.reset()
    counters.clear()
    graphs = Graphs()
    args = make_config(
        tmp_path,
        hp_epochs=2,
        num_train_epochs=2,
        torch_compile=True,
        torch_compile_backend="eager",
        eval_strategy="epoch",
    )
    model = attach_input_normalization(tiny_timm(), (0.3, 0.4, 0.5), (0.2, 0.25, 0.3))
    trainer = HeadPrepTrainer(
        model=model,
        args=args,
        train_dataset=_Uint8Images(48),
        eval_dataset=_Uint8Images(16, seed=1),
        callbacks=[graphs],
    )
    trainer.train()
    steps_per_epoch = 3
    hp, ft = graphs.per_step[: 2 * steps_per_epoch], graphs.per_step[2 * steps_per_epoch :]
    assert len(ft) == 2 * steps_per_epoch and hp[0] >= 1
    assert len(set(hp)) == 1 and len(set(ft)) == 1  # nothing traced again within a stage
    assert ft[0] - hp[0] <= 1  # the switch to FT: at most one more graph
    assert counters["stats"]["calls_captured"] > 0 and trainer.dynamics["energy"] is not None
    torch._dynamo.reset()


def test_a_seed_draws_the_same_head_whatever_the_weights_layout():
    """torch's init functions fill memory in order: without care, a channels_last head re-drawn from a seed (a sweep's
    replicate seeds, `reinit_modules`) would get other values than the contiguous one."""
    from headprep_hf.data import to_channels_last
    from headprep_hf.heads import reinitialize_module

    plain, converted = _a1_like_model(), to_channels_last(_a1_like_model())
    for model in (plain, converted):
        torch.manual_seed(3)
        reinitialize_module(model.layer4)
    assert all(torch.equal(a, b) for a, b in zip(plain.layer4.parameters(), converted.layer4.parameters()))
    assert _channels_last(converted.layer4[0].conv1.weight)  # and the layout is kept


@pytest.mark.parametrize("contiguous_state", [True, False])
def test_resumed_optimizer_state_takes_the_weights_layout(tmp_path, contiguous_state):
    """A checkpoint written with contiguous weights, resumed into channels_last ones (an earlier version, or
    `--channels_last` switched): fused AdamW on the CPU walks memory in order and would pair the wrong elements."""
    import copy

    from conftest import make_config, tiny_timm

    from headprep_hf import HeadPrepTrainer
    from headprep_hf.data import to_channels_last

    def optimizer_of(model, optim):
        args = make_config(tmp_path, hp_epochs=0, optim=optim, learning_rate=0.1)
        return HeadPrepTrainer(model=model, args=args).create_optimizer()

    def step(model, optimizer, seed):  # the same gradients on every copy: Adam's steps are then comparable
        g = torch.Generator().manual_seed(seed)
        for param in model.parameters():
            param.grad = torch.empty_like(param).copy_(torch.randn(param.shape, generator=g))
        optimizer.step()

    model = to_channels_last(tiny_timm())
    state = optimizer_of(model, "adamw_torch_fused")  # the state a run wrote: Adam's moments after two updates
    step(model, state, 0)
    step(model, state, 1)
    saved = copy.deepcopy(state.state_dict())
    if contiguous_state:  # as a checkpoint of contiguous weights holds it
        for entry in saved["state"].values():
            entry.update({k: v.contiguous() for k, v in entry.items() if v.dim() == 4})
    fused_model, reference_model = copy.deepcopy(model), copy.deepcopy(model)
    fused, reference = optimizer_of(fused_model, "adamw_torch_fused"), optimizer_of(reference_model, "adamw_torch")
    fused.load_state_dict(copy.deepcopy(saved))  # (a loaded optimizer may keep the given tensors and step them)
    reference.load_state_dict(copy.deepcopy(saved))
    reference.param_groups[0]["fused"] = reference.param_groups[1]["fused"] = None  # for-loop: right in any layout
    for param in fused_model.parameters():
        assert all(v.stride() == param.stride() for v in fused.state[param].values() if v.shape == param.shape)
    step(fused_model, fused, 2)
    step(reference_model, reference, 2)
    for a, b in zip(fused_model.parameters(), reference_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def _two_blocks(size=(40, 80)):
    """A non-square image (80 wide, 40 high) whose left quarter is white and right quarter green: a warp and a
    short-side resize + center crop give visibly different pictures, and PIL's and torchvision's resizes agree on it
    to float rounding (on noise they differ by one 8-bit level)."""
    pixels = np.zeros((*size, 3), dtype=np.uint8)
    pixels[:, : size[1] // 4] = 255
    pixels[:, -size[1] // 4 :, 1] = 255
    return Image.fromarray(pixels)


_PROCESSORS = {  # transformers' own preprocessing: size {height, width} warps; ConvNext warps from 384 px on
    "vit": ("ViTImageProcessor", dict(size={"height": 32, "width": 32}), "squash"),
    "deit": (
        "DeiTImageProcessor",
        dict(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32}),
        "squash",
    ),
    # Non-square warps: timm's input_size (3, h, w), one crop share for both sides
    "vit_wide": ("ViTImageProcessor", dict(size={"height": 32, "width": 48}), "squash"),
    "deit_wide": (
        "DeiTImageProcessor",
        dict(size={"height": 36, "width": 54}, crop_size={"height": 32, "width": 48}),
        "squash",
    ),
    "convnext384": ("ConvNextImageProcessor", dict(size={"shortest_edge": 384}, crop_pct=0.875), "squash"),
    "convnext224": ("ConvNextImageProcessor", dict(size={"shortest_edge": 224}, crop_pct=0.875), "center"),
}


def _processor(tmp_path, kind):
    """The processor as the recipe gets it: `AutoImageProcessor` on a local folder (transformers 5: torchvision)."""
    import transformers
    from transformers import AutoImageProcessor

    class_name, kwargs, _ = _PROCESSORS[kind]
    getattr(transformers, class_name)(**kwargs).save_pretrained(tmp_path)
    return AutoImageProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind", list(_PROCESSORS))
def test_eval_transform_reproduces_warping_and_cropping_processors_on_a_non_square_image(tmp_path, kind):
    from headprep_hf.data.images import image_processor_for_data_config

    processor = _processor(tmp_path, kind)
    config = resolve_image_data_config(image_processor_data_config(processor))
    assert config["crop_mode"] == _PROCESSORS[kind][2]
    image = _two_blocks()
    ours = build_image_transforms(config, is_training=False, normalize=True)(image)
    theirs = processor(image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5
    # Read back unchanged: the processor saved with the model is the source's own.
    assert image_processor_for_data_config(processor, config) is processor


@pytest.mark.parametrize(
    "kind, image_size",
    [("vit", 48), ("deit", 40), ("convnext384", 416), ("convnext224", 40), ("vit_wide", 40), ("deit_wide", 40)],
)
def test_processor_set_to_a_new_size_keeps_its_resize_mode_and_size_keys(tmp_path, kind, image_size):
    from transformers import AutoImageProcessor

    from headprep_hf.data.images import image_processor_for_data_config

    processor = _processor(tmp_path / "source", kind)
    config = resolve_image_data_config(image_processor_data_config(processor), image_size=image_size)
    updated = image_processor_for_data_config(processor, config)
    assert set(k for k, v in dict(updated.size).items() if v) == set(k for k, v in dict(processor.size).items() if v)
    updated.save_pretrained(tmp_path / "saved")
    loaded = AutoImageProcessor.from_pretrained(tmp_path / "saved")
    image = _two_blocks()
    ours = build_image_transforms(config, is_training=False, normalize=True)(image)
    theirs = loaded(image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, image_size, image_size) and (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize(
    "family, flags",
    [("DeiT", dict(image_size=128)), ("DeiT", dict(image_size=288)), ("Beit", dict(crop_pct=0.9)),
     ("CLIP", dict(crop_pct=0.95))],
)  # fmt: skip
def test_a_processor_is_saved_where_it_prepares_the_runs_images(tmp_path, family, flags):
    # The crop shares were compared as numbers: DeiT at 128 px resizes to floor(128 / 0.875) = 146, which a processor
    # reads back as 128 / 146 = 0.8767, so none was saved ("cannot express") though it prepares the same images.
    import transformers
    from transformers import AutoImageProcessor

    from headprep_hf.data.images import _smooth_test_image, image_processor_for_data_config

    processor = getattr(transformers, f"{family}ImageProcessor")()
    config = resolve_image_data_config(image_processor_data_config(processor), **flags)
    updated = image_processor_for_data_config(processor, config)
    assert updated is not None
    updated.save_pretrained(tmp_path / "saved")
    loaded = AutoImageProcessor.from_pretrained(tmp_path / "saved")
    image = _smooth_test_image()
    ours = build_image_transforms(config, is_training=False, normalize=True)(image)
    theirs = loaded(image, return_tensors="pt")["pixel_values"][0]
    # (CLIP's crop is one pixel off where the leftover is odd: transformers floors half of it, torchvision rounds;
    # on this slowly varying image that is 0.015 on average, a wrong resize 0.15)
    assert ours.shape == theirs.shape and (ours - theirs).abs().mean() < 0.02


def test_a_processor_class_that_ignores_a_field_is_not_saved_as_if_it_used_it():
    """SegformerImageProcessor has `do_center_crop` and never crops: a run with --crop_pct saved it with a crop, read
    back as the run's config, while it gave 35 px inputs where the run used 32. The processor is run now."""
    from transformers import SegformerImageProcessor, ViTImageProcessor

    from headprep_hf.data.images import image_processor_for_data_config

    for cls, saved in ((SegformerImageProcessor, False), (ViTImageProcessor, True)):
        processor = cls(size={"height": 32, "width": 32})
        config = resolve_image_data_config(image_processor_data_config(processor), crop_pct=0.9)
        assert (image_processor_for_data_config(processor, config) is not None) is saved, cls.__name__


def test_a_non_square_warp_is_read_as_timms_non_square_input_size_or_named(tmp_path):
    """A processor warping to height != width was read by its height only: a 32x48 ViT input came out 32x32."""
    import transformers

    from headprep_hf.data.images import image_processor_for_data_config

    wide = image_processor_data_config(_processor(tmp_path / "vit", "vit_wide"))
    assert wide["input_size"] == (3, 32, 48) and wide["crop_pct"] == 1.0 and wide["crop_mode"] == "squash"
    deit = image_processor_data_config(_processor(tmp_path / "deit", "deit_wide"))
    assert deit["input_size"] == (3, 32, 48) and deit["crop_pct"] == pytest.approx(32 / 36)
    # Crops of two different shares cannot be one timm crop_pct: the square reading stays, and says so.
    odd = transformers.DeiTImageProcessor(size={"height": 36, "width": 54}, crop_size={"height": 32, "width": 32})
    with pytest.warns(UserWarning, match="warps to 36x54 and crops 32x32.*--image_size"):
        config = image_processor_data_config(odd)
    assert config["input_size"] == (3, 32, 32)
    # A shortest-edge processor cannot describe a non-square run: nothing is saved rather than a wrong processor.
    square = _processor(tmp_path / "convnext", "convnext224")
    assert image_processor_for_data_config(square, {**image_processor_data_config(square), **wide}) is None


def test_a_processor_cannot_take_the_other_resize_mode():
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    from headprep_hf.data.images import image_processor_for_data_config, same_data_config

    vit = ViTImageProcessor(size={"height": 32, "width": 32})
    squash = resolve_image_data_config(image_processor_data_config(vit))
    center = dict(squash, crop_mode="center")
    assert not same_data_config(squash, center) and same_data_config(center, {**center, "crop_mode": None})
    assert image_processor_for_data_config(vit, center) is None  # ViT warps; it cannot resize the short side
    # ConvNext below 384 px crops; from 384 px on it warps without a crop, so neither size takes the other's mode.
    convnext = ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)
    at_384 = resolve_image_data_config(image_processor_data_config(convnext), image_size=384)
    assert image_processor_for_data_config(convnext, at_384) is None
    convnext384 = ConvNextImageProcessor(size={"shortest_edge": 384}, crop_pct=0.875)
    at_224 = resolve_image_data_config(image_processor_data_config(convnext384), image_size=224)
    assert image_processor_for_data_config(convnext384, at_224) is None


def test_a_timm_vit_trains_from_pixel_values_with_column_removal_on(tmp_path):
    # timm's ViTs take `forward(x, attn_mask=None, is_causal=False)`: the trainer called them by position only when the
    # forward had one parameter, so Trainer's column removal (on by default) dropped `pixel_values` and the first
    # batch failed with "missing 1 required positional argument: 'x'".
    from headprep_hf import HeadPrepConfig, HeadPrepTrainer

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=16, patch_size=8, depth=1
    )

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return {
                "pixel_values": torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)),
                "labels": i % 3,
            }

    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    blocks = {k: v.clone() for k, v in model.blocks.state_dict().items()}
    args = HeadPrepConfig(output_dir=str(tmp_path), hp_epochs=1, num_train_epochs=1, per_device_train_batch_size=4,
                          use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)  # fmt: skip
    assert args.remove_unused_columns
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=Items())
    trainer.probe_head()
    assert any(not torch.equal(head[k], v) for k, v in model.head.state_dict().items())
    assert all(torch.equal(blocks[k], v) for k, v in model.blocks.state_dict().items())
    trainer.finetune()
    assert any(not torch.equal(blocks[k], v) for k, v in model.blocks.state_dict().items())
    assert trainer.dynamics["energy"] > 0

    # Decided per dataset, from its keys: an iterable set's first item, a set given to evaluate() only.
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(Items()[i] for i in range(12))

    plain = HeadPrepConfig(output_dir=str(tmp_path / "plain"), hp_epochs=0, max_steps=2, per_device_train_batch_size=4,
                           use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)  # fmt: skip
    HeadPrepTrainer(model=model, args=plain, train_dataset=Stream()).train()
    assert "eval_loss" in HeadPrepTrainer(model=model, args=plain).evaluate(
        eval_dataset=[Items()[i] for i in range(4)]
    )


def test_energy_on_eval_transform_measures_the_training_images_without_augmentation(tmp_path):
    """The issue: train-set measurements that should not see augmentation use the eval transform "if the user asks";
    only the Python `energy_dataset=` could ask. `--energy_on_eval_transform` measures the start-of-FT energy on the
    training images through the eval transform, equal to a plain-torch computation on them."""
    import torch.nn.functional as F
    from conftest import make_config

    from headprep_hf import HeadPrepTrainer
    from headprep_hf.tasks.image_classification import ImageClassificationArguments, load_image_classification

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / split / label / f"{i}.png"
                )
    source = tmp_path / "source"
    timm.models.save_for_hf(timm.create_model("test_resnet", num_classes=5), str(source))
    args = ImageClassificationArguments(
        model_name_or_path=str(source), train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"),
        image_size=16, energy_on_eval_transform=True,
    )  # fmt: skip
    inputs = load_image_classification(args, seed=0)
    assert inputs.energy_dataset is inputs.train_eval_dataset
    trainer = HeadPrepTrainer(
        model=inputs.model, args=make_config(tmp_path, hp_epochs=1, track_dynamics=True),
        train_dataset=inputs.train_dataset, energy_dataset=inputs.energy_dataset,
    )  # fmt: skip
    trainer.probe_head()
    model = inputs.model.eval()
    with torch.no_grad():
        energies = []
        for i in range(len(inputs.train_eval_dataset)):
            item = inputs.train_eval_dataset[i]
            p = torch.softmax(model(item["pixel_values"][None]).float(), -1)[0]
            energies.append(float((F.one_hot(torch.tensor(item["labels"]), 2) - p).norm()))
    assert trainer.dynamics["energy"] == pytest.approx(float(np.mean(energies)), rel=1e-5)
    assert trainer.dynamics["energy_source"] == "backbone pass"


def test_a_processor_that_gives_no_pixel_values_is_refused():
    """ImageGPT's processor gives `input_ids` (colour clusters): it was taken as "could not run on a test image",
    with a warning only, and the run went on to feed the model pixel values."""
    from transformers import ImageGPTImageProcessor

    from headprep_hf.data.images import check_processor_reproduced

    processor = ImageGPTImageProcessor(clusters=np.random.default_rng(0).random((16, 3)).tolist(), size=8)
    config = resolve_image_data_config(image_processor_data_config(processor))
    with pytest.raises(ValueError, match=r"\(ImageGPTImageProcessor\) gives \['input_ids'\], not pixel_values"):
        check_processor_reproduced(processor, config)
