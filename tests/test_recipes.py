"""End-to-end runs of recipes/image_classification.py (in-process, and through `accelerate launch`)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "image_classification.py"
sys.path.insert(0, str(ROOT / "recipes"))

import image_classification  # noqa: E402

TINY = [
    "--hp_epochs",
    "1",
    "--num_train_epochs",
    "1",
    "--source_epochs",
    "1",
    "--use_cpu",
    "true",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--save_strategy",
    "no",
    "--drift_probe_samples",
    "32",
]


def _run_in_process(argv):
    with patch.object(sys, "argv", ["image_classification.py", *argv]):
        return image_classification.main(
            *image_classification.parse_args(image_classification.make_parser(), sys.argv[1:])
        )


@pytest.mark.slow
def test_default_recipe_in_process(tmp_path, capsys):
    out = tmp_path / "run"
    metrics = _run_in_process([*TINY, "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")])
    assert 0.0 <= metrics["validation_accuracy"] <= 1.0 and "test_accuracy" in metrics
    assert metrics["energy"] > 0 and metrics["drift_sq_dist"] > 0
    assert "validation_" not in metrics  # (evaluate()'s "epoch" is not a metric: it became an unnamed one)
    assert "validation accuracy" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "headprep_dynamics.json").is_file()
    assert json.loads((out / "final_results.json").read_text())["energy"] == metrics["energy"]
    # the source model was cached in the timm folder format and is reused as a local checkpoint
    (source,) = (tmp_path / "cache").glob("mnist5k-*")
    assert (source / "model.safetensors").is_file()


@pytest.mark.slow
def test_recipe_with_config_file_local_model_and_imagefolder(tmp_path):
    # A local image folder (2 classes) and the cached source folder as --model_name_or_path.
    from headprep_hf.models import pretrain_source_model

    source = pretrain_source_model(cache_dir=tmp_path / "cache", epochs=1, max_samples=200, progress=False)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    config = tmp_path / "settings.yaml"
    config.write_text(f"hp_epochs: 2\nper_device_train_batch_size: 4\noutput_dir: {tmp_path / 'run'}\n")
    metrics = _run_in_process(
        [
            *TINY,
            "--config",
            str(config),
            "--hp_epochs",
            "1",
            "--model_name_or_path",
            str(source),
            "--train_dir",
            str(tmp_path / "train"),
            "--validation_dir",
            str(tmp_path / "val"),
        ]
    )
    assert "validation_accuracy" in metrics and metrics["energy"] > 0
    dynamics = json.loads((tmp_path / "run" / "headprep_dynamics.json").read_text())
    assert dynamics["hp_epochs"] == 1  # the command line overrides the config file
    assert dynamics["num_energy_samples"] == 24


def _image_folders(root, classes=("cat", "dog"), sizes=(("train", 12), ("val", 4), ("test", 4)), side=40):
    rng = np.random.default_rng(0)
    for split, n in sizes:
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (side, side + 8, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


@pytest.mark.slow
def test_recipe_runs_a_transformers_image_model_folder(tmp_path):
    # A transformers image classifier saved with its image processor (other classes than the task's).
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor

    folder = tmp_path / "convnext"
    config = ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5, image_size=32
    )
    ConvNextForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(folder)
    _image_folders(tmp_path)
    out = tmp_path / "run"
    metrics = _run_in_process(
        [
            *TINY,
            "--model_name_or_path",
            str(folder),
            "--train_dir",
            str(tmp_path / "train"),
            "--validation_dir",
            str(tmp_path / "val"),
            "--test_dir",
            str(tmp_path / "test"),
            "--max_train_samples",
            "16",
            "--per_device_train_batch_size",
            "8",
            "--output_dir",
            str(out),
        ]
    )
    assert "test_accuracy" in metrics and metrics["energy"] > 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["id2label"] == {"0": "cat", "1": "dog"}
    assert (out / "preprocessor_config.json").is_file()  # the image processor travels with the model
    assert json.loads((out / "headprep_dynamics.json").read_text())["num_energy_samples"] == 16


@pytest.mark.slow
def test_recipe_runs_a_transformers_timm_wrapper_folder(tmp_path):
    """What `AutoModelForImageClassification` gives for a `timm/...` id, saved with `save_pretrained`: its config.json
    holds both `model_type` and timm's `architecture`, so it went down the timm path and failed inside timm; its
    processor (in config.json) has no size or mean fields, so it read as 224 px, mean 0.5."""
    from transformers import AutoImageProcessor, TimmWrapperConfig, TimmWrapperForImageClassification

    folder = tmp_path / "wrapped"
    pretrained_cfg = {"input_size": [3, 40, 40], "interpolation": "bicubic", "crop_pct": 0.95, "crop_mode": "center",
                      "mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3], "num_classes": 5}  # fmt: skip
    TimmWrapperForImageClassification(
        TimmWrapperConfig(architecture="test_resnet", num_labels=5, pretrained_cfg=pretrained_cfg)
    ).save_pretrained(folder)
    _image_folders(tmp_path)
    out = tmp_path / "run"
    folders = ["--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val")]
    metrics = _run_in_process(
        [*TINY, "--model_name_or_path", str(folder), *folders, "--image_size", "32", "--output_dir", str(out)]
    )
    assert "validation_accuracy" in metrics and metrics["energy"] > 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "timm_wrapper" and saved["label_names"] == ["cat", "dog"]  # (its id2label)
    # the saved model's processor describes this run's inputs: 32 px, the model's bicubic, crop and mean/std
    data_config = AutoImageProcessor.from_pretrained(out).data_config
    assert data_config["input_size"] == (3, 32, 32) and data_config["interpolation"] == "bicubic"
    assert data_config["crop_pct"] == 0.95 and tuple(data_config["mean"]) == (0.4, 0.45, 0.5)


def test_a_transformers_folder_without_its_image_processor_is_refused_by_name(tmp_path):
    # Without preprocessor_config.json the recipe took timm's ImageNet defaults (224 px, ImageNet mean/std) for a model
    # of any size and normalisation, without a word.
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from headprep_hf.tasks.image_classification import ImageClassificationArguments, load_image_classification

    folder = tmp_path / "convnext"
    config = ConvNextConfig(num_channels=3, hidden_sizes=[8], depths=[1], num_stages=1, num_labels=2, image_size=32)
    ConvNextForImageClassification(config).save_pretrained(folder)
    _image_folders(tmp_path)
    args = ImageClassificationArguments(
        model_name_or_path=str(folder), train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val")
    )
    with pytest.raises(ValueError, match=r"without an image processor \(preprocessor_config.json\).*save_pretrained"):
        load_image_classification(args, seed=0)


def test_a_grey_model_gets_grey_images_and_a_size_the_model_refuses_names_the_flag(tmp_path):
    # A timm model of one input channel (data config (1, H, W)) got 3-channel batches and failed at its first forward;
    # an --image_size a ViT was not built for failed at the first HP batch in timm's words, not naming the flag.
    import timm
    import torch

    from headprep_hf.tasks.image_classification import ImageClassificationArguments, load_image_classification

    _image_folders(tmp_path)
    grey = timm.create_model("resnet10t", pretrained=False, num_classes=5, in_chans=1)
    grey.pretrained_cfg = {**grey.pretrained_cfg, "input_size": (1, 32, 32), "mean": (0.5,), "std": (0.25,)}
    timm.models.save_for_hf(grey, str(tmp_path / "grey"), model_args=dict(in_chans=1))
    folders = dict(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"))
    inputs = load_image_classification(
        ImageClassificationArguments(model_name_or_path=str(tmp_path / "grey"), **folders), seed=0
    )
    for dataset in (inputs.train_dataset, inputs.eval_dataset):
        assert dataset[0]["pixel_values"].shape == (1, 32, 32) and dataset[0]["pixel_values"].dtype == torch.uint8
    inputs.model.eval()
    batch = torch.stack([inputs.eval_dataset[i]["pixel_values"] for i in range(2)])
    assert inputs.model(batch).shape == (2, 2)

    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=16, patch_size=8, depth=1
    )
    vit.pretrained_cfg = {**vit.pretrained_cfg, "input_size": (3, 16, 16)}
    timm.models.save_for_hf(vit, str(tmp_path / "vit"), model_args=dict(img_size=16, patch_size=8, depth=1))
    args = ImageClassificationArguments(model_name_or_path=str(tmp_path / "vit"), image_size=24, **folders)
    with pytest.raises(ValueError, match=r"--image_size 24 gives 24x24 inputs, which the model does not take: .*16"):
        load_image_classification(args, seed=0)
    args.image_size = None
    assert load_image_classification(args, seed=0).train_dataset[0]["pixel_values"].shape == (3, 16, 16)

    # The probe runs a model saved in bf16 under autocast, as training does (it was refused, blaming the size), and
    # leaves every module's mode as it found it.
    from headprep_hf.data.device_inputs import attach_input_normalization
    from headprep_hf.tasks.image_classification import _check_input_size

    model = timm.create_model("resnet10t", pretrained=False, num_classes=2).to(torch.bfloat16)
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    attach_input_normalization(model, config["mean"], config["std"])
    model.layer1.eval()
    _check_input_size(model, config, None)
    assert model.training and not model.layer1.training and model.layer2.training


def test_the_command_line_shows_the_data_config_and_transforms(tmp_path, capsys, monkeypatch):
    # README: "The data config and both transforms are logged". They were logged at INFO, which Python drops unless
    # the program configures logging, and a recipe run printed neither.
    import logging

    import timm

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a program that configured no logging (pytest did)

    from headprep_hf.cli import run_command

    _image_folders(tmp_path)
    timm.models.save_for_hf(timm.create_model("resnet10t", pretrained=False, num_classes=5), str(tmp_path / "model"))
    argv = [*TINY, "--model_name_or_path", str(tmp_path / "model"), "--train_dir", str(tmp_path / "train"),
            "--validation_dir", str(tmp_path / "val"), "--image_size", "32", "--max_train_samples", "100",
            "--output_dir", str(tmp_path / "run")]  # fmt: skip
    try:
        with patch.object(sys, "argv", ["image_classification.py", *argv]):
            with pytest.warns(UserWarning, match="max_train_samples=100 is more than the 24 samples of the training"):
                parsed = image_classification.parse_args(image_classification.make_parser(), argv)
                run_command(image_classification.main, *parsed)
    finally:  # (--disable_tqdm true on the command line turns the libraries' bars off, process-wide)
        import datasets
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()
        huggingface_hub.utils.enable_progress_bars()
    err = capsys.readouterr().err
    assert "INFO headprep_hf.tasks.image_classification: data config {'input_size': (3, 32, 32)" in err
    assert "train transform" in err and "RandomResizedCrop" in err and "eval transform" in err


def test_config_file_with_unknown_setting_is_rejected(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"hp_epoch": 3}))
    with pytest.raises(SystemExit):
        image_classification.parse_args(image_classification.make_parser(), ["--config", str(config)])


def test_recipe_help_exits_zero():
    result = subprocess.run([sys.executable, str(RECIPE), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--model_name_or_path" in result.stdout and "--hp_label_smoothing" in result.stdout


@pytest.mark.slow
def test_accelerate_launch(tmp_path, shared_cache):
    env = dict(os.environ, OMP_NUM_THREADS="1", HEADPREP_CACHE=str(shared_cache))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--cpu",
        str(RECIPE),
        *TINY,
        "--output_dir",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tau=1  validation accuracy" in result.stdout
