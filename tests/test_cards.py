"""Self-describing outputs and Hub-valid cards: a finetuned timm folder loads back with timm alone (classes, data
config, weights), prepared heads name their classes, and the finetuned model's card metadata parses with
huggingface_hub's own parser into the model-index it should hold."""

import json

import numpy as np
import pytest
import timm
import torch
from conftest import make_config, tiny_timm
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image
from timm.data import resolve_model_data_config
from transformers import TrainerCallback

from headprep_hf import HeadPrepTrainer, load_prepared_head
from headprep_hf.data.images import resolve_image_data_config
from headprep_hf.export import model_label_names, set_data_config, set_label_names, write_timm_config
from headprep_hf.heads import replace_head_with_mlp
from headprep_hf.hub import HEAD_CONFIG_NAME
from headprep_hf.models import load_timm_model

NAMES = ["cat", "dog", "fox"]
DATA_CONFIG = dict(
    input_size=(3, 24, 24), interpolation="bicubic", mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3), crop_pct=0.8
)


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _data_config_of(model) -> dict:
    got = resolve_model_data_config(model)
    return {k: tuple(got[k]) if k in ("input_size", "mean", "std") else got[k] for k in DATA_CONFIG}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A timm model trained through HP + FT with named classes and a data config, saved by the trainer."""
    from conftest import TinyImages

    tmp = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    model = tiny_timm()
    set_label_names(model, NAMES)
    set_data_config(model, resolve_image_data_config(model, 24, 0.8, "bicubic", (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)))
    args = make_config(tmp, hp_epochs=1, num_train_epochs=1)
    trainer = HeadPrepTrainer(
        model=model, args=args, train_dataset=TinyImages(32), eval_dataset=TinyImages(16, seed=1)
    )
    trainer.train()
    trainer.save_model()
    return trainer, tmp / "out"


def test_finetuned_timm_folder_round_trips_through_timm_and_our_loader(finetuned):
    trainer, folder = finetuned
    trained = trainer.accelerator.unwrap_model(trainer.model).cpu()
    x = torch.randn(4, 3, 24, 24)
    expected = _logits(trained, x)

    saved = json.loads((folder / "config.json").read_text())
    assert saved["architecture"] == "test_resnet" and saved["num_classes"] == 3 and saved["label_names"] == NAMES
    assert not (folder / "pytorch_model.bin").exists()  # weights once, as safetensors (the Trainer's file)

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)  # timm alone, nothing else given
    assert loaded.num_classes == 3 and list(loaded.pretrained_cfg["label_names"]) == NAMES
    assert _data_config_of(loaded) == DATA_CONFIG
    trained_state, loaded_state = trained.state_dict(), loaded.state_dict()
    assert trained_state.keys() == loaded_state.keys()
    assert all(torch.equal(trained_state[k], loaded_state[k]) for k in trained_state)
    assert torch.equal(_logits(loaded, x), expected)

    # The recipes' loader (no --model_arch) and the data config they resolve from the folder.
    ours = load_timm_model(str(folder), num_classes=3)
    assert torch.equal(_logits(ours, x), expected) and model_label_names(ours) == NAMES
    headless = load_timm_model(str(folder), num_classes=0)  # what the image recipe reads the data config from
    resolved = resolve_image_data_config(headless)
    assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in resolved.items() if k in DATA_CONFIG} == (
        DATA_CONFIG
    )
    # A new head of another size drops the old names (they named the old classifier).
    assert model_label_names(load_timm_model(str(folder), num_classes=5)) is None


def test_an_mlp_head_gets_no_timm_config(tmp_path, caplog):
    model = tiny_timm()
    replace_head_with_mlp(model, HeadPrepTrainer(model=model, args=make_config(tmp_path)).split, 8, 2)
    assert write_timm_config(model, tmp_path) is None
    assert not (tmp_path / "config.json").exists() and "MLP head" in caplog.text


def _class_folders(root, classes=("cat", "dog"), n=4):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (28, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_prepared_head_records_class_folder_names(tmp_path):
    from headprep_hf.tasks.image_classification import ImageClassificationArguments, load_image_classification

    source = tmp_path / "source"
    timm.models.save_for_hf(tiny_timm(), str(source), safe_serialization=True)
    _class_folders(tmp_path)
    task_args = ImageClassificationArguments(
        model_name_or_path=str(source),
        train_dir=str(tmp_path / "train"),
        validation_dir=str(tmp_path / "val"),
        image_size=32,
    )
    inputs = load_image_classification(task_args, seed=0)
    args = make_config(tmp_path, hp_epochs=1, per_device_train_batch_size=4, drift_probe_samples=8)
    trainer = HeadPrepTrainer(model=inputs.model, args=args, train_dataset=inputs.train_dataset)
    trainer.probe_head()
    head = tmp_path / "out" / "prepared_head"
    assert json.loads((head / HEAD_CONFIG_NAME).read_text())["id2label"] == {"0": "cat", "1": "dog"}

    fresh = load_timm_model(str(source), num_classes=2)
    config = load_prepared_head(fresh, head, strict=True)
    assert config["id2label"] == {"0": "cat", "1": "dog"} and model_label_names(fresh) == ["cat", "dog"]
    swapped = load_timm_model(str(source), num_classes=2)
    set_label_names(swapped, ["dog", "cat"])  # the same classes in another label order: rows would be swapped
    with pytest.raises(ValueError, match="label i must mean the same class"):
        load_prepared_head(swapped, head)


METRICS = {
    "validation_accuracy": 0.8125,
    "validation_loss": 0.51,
    "validation_runtime": 1.2,
    "validation_samples_per_second": 99.0,
    "validation_steps_per_second": 3.0,
    "test_accuracy": 0.75,
    "test_runtime": 1.1,
    "epoch": 1.0,
    "energy": 0.4,
}


def _front_matter(card_path) -> dict:
    return ModelCard(card_path.read_text()).data.to_dict()  # huggingface_hub's own parser of the YAML header


def test_card_metadata_and_model_index(finetuned):
    trainer, folder = finetuned
    trainer.create_model_card(
        model_name="tiny-pets",
        metrics=METRICS,
        tasks="image-classification",
        dataset_tags="imagefolder",
        dataset="local image folder pets",
    )
    text = (folder / "README.md").read_text()
    data = _front_matter(folder / "README.md")
    assert data["pipeline_tag"] == "image-classification" and data["library_name"] == "timm"
    assert data["license"] == "apache-2.0"  # the base model's pretrained_cfg license, none given
    assert data["base_model"] == "timm/test_resnet.r160_in1k"  # from the model's pretrained_cfg, none given
    assert "datasets" not in data  # a local folder is no Hub dataset
    assert {"headprep_hf", "image-classification"} <= set(data["tags"])
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "tiny-pets"
    got = {(r.dataset_split, r.metric_type): r for r in results}
    assert set(got) == {("validation", "accuracy"), ("test", "accuracy")}  # no loss, no runtime
    assert got["validation", "accuracy"].metric_value == 0.8125 and got["test", "accuracy"].metric_value == 0.75
    for result in results:
        assert result.task_type == "image-classification" and result.dataset_type == "imagefolder"
        assert result.dataset_name == "local image folder pets"
    assert "runtime" not in text and "per_second" not in text and "| epoch |" not in text
    assert "| validation_accuracy | 0.8125 |" in text and "| validation_loss | 0.51 |" in text
    assert "Classes: cat, dog, fox." in text


def test_card_of_a_hub_dataset_lists_it(finetuned):
    trainer, folder = finetuned
    trainer.create_model_card(
        metrics={"test_accuracy": 0.5}, dataset_tags="cifar10", dataset="CIFAR-10", license="mit", tags="extra"
    )
    data = _front_matter(folder / "README.md")
    assert data["datasets"] == ["cifar10"] and data["license"] == "mit" and "extra" in data["tags"]
    assert data["pipeline_tag"] == "image-classification"  # a timm classifier, no tasks given
    _, (result,) = model_index_to_eval_results(data["model-index"])
    assert (result.dataset_type, result.dataset_name, result.metric_type) == ("cifar10", "CIFAR-10", "accuracy")


def test_tau_of_a_loaded_prepared_head_is_carried_into_the_finetuned_card(tmp_path, train_set):
    prober = HeadPrepTrainer(
        model=tiny_timm(), args=make_config(tmp_path / "hp", hp_epochs=2), train_dataset=train_set
    )
    prober.probe_head()
    head = prober.save_prepared_head(str(tmp_path / "head"))
    model = tiny_timm()
    load_prepared_head(model, head)
    trainer = HeadPrepTrainer(model=model, args=make_config(tmp_path, hp_epochs=0), train_dataset=train_set)
    trainer.finetune()
    trainer.create_model_card()
    card = ModelCard((tmp_path / "out" / "README.md").read_text())
    assert card.data.to_dict()["headprep_tau"] == 2
    assert "tau = 2 epochs" in card.text and "| HP | epochs (tau) | 2 |" in card.text
    assert f"loaded as a prepared head from `{head}`" in card.text


def test_probe_head_then_finetune_on_one_trainer_carries_its_tau_into_the_card(tmp_path, train_set):
    """README's "one stage at a time": `probe_head()` then `finetune()` on one trainer is HP for tau epochs (the
    card said tau = 0: the finetune() call alone does no HP)."""
    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, hp_epochs=2), train_dataset=train_set)
    trainer.probe_head()
    trainer.finetune()
    trainer.create_model_card()
    card = ModelCard((tmp_path / "out" / "README.md").read_text())
    assert card.data.to_dict()["headprep_tau"] == 2 and "| HP | epochs (tau) | 2 |" in card.text


def test_weights_from_a_file_or_a_random_init_name_no_hub_base_model(tmp_path):
    from safetensors.torch import save_file

    from headprep_hf.cards import base_model_id
    from headprep_hf.hub import prepared_head_config

    source = tiny_timm()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    from_file = load_timm_model(str(tmp_path / "w.safetensors"), 3, arch="test_resnet")
    random_init = load_timm_model("test_resnet", 3, pretrained=False)
    # timm keeps the architecture's default Hub weights in both configs, though neither loaded them.
    assert from_file.pretrained_cfg["file"] == str(tmp_path / "w.safetensors")
    assert base_model_id(source) == "timm/test_resnet.r160_in1k"  # built directly: timm's config cannot tell
    assert base_model_id(from_file) is None and base_model_id(random_init) is None
    assert random_init.default_cfg["hf_hub_id"] is None
    trainer = HeadPrepTrainer(model=from_file, args=make_config(tmp_path, hp_epochs=1), train_dataset=None)
    assert prepared_head_config(trainer)["backbone"]["id"] == "test_resnet"
    trainer.save_model(str(tmp_path / "out"))
    trainer.create_model_card(model_name="from-file", metrics={"validation_accuracy": 0.5})
    assert "base_model" not in _front_matter(tmp_path / "out" / "README.md")


def test_a_segmentation_backbone_from_a_file_names_no_hub_base_model(tmp_path):
    # TimmDeepLabV3 built its backbone with the architecture's default config: the segmentation recipe's card named
    # `timm/test_resnet.r160_in1k` as the base model of a backbone whose weights came from a local file.
    from safetensors.torch import save_file

    from headprep_hf.cards import base_model_id
    from headprep_hf.tasks.segmentation import SegmentationArguments, load_segmentation

    save_file(tiny_timm().state_dict(), str(tmp_path / "w.safetensors"))
    args = SegmentationArguments(model_name_or_path=str(tmp_path / "w.safetensors"), model_arch="test_resnet")
    model = load_segmentation(args, seed=0).model
    assert base_model_id(model) is None
    assert model.backbone.pretrained_cfg["file"] == str(tmp_path / "w.safetensors")


def test_toy_task_with_a_model_of_other_normalisation_says_so(tmp_path):
    """The offline toy digits are normalised with mean = std = 0.5 (the shipped source model's); a timm model
    pretrained with ImageNet's normalisation gets one warning naming both, a model of the toy's own none."""
    import warnings

    from headprep_hf.tasks.image_classification import (
        ImageClassificationArguments,
        _warn_if_toy_normalisation_differs,
        load_image_classification,
    )

    imagenet = tiny_timm()
    imagenet.pretrained_cfg = {**imagenet.pretrained_cfg, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    timm.models.save_for_hf(imagenet, str(tmp_path / "imagenet"), safe_serialization=True)
    with pytest.warns(UserWarning, match=r"mean = std = 0.5.*mean \(0.485, 0.456, 0.406\).*--train_dir"):
        load_image_classification(
            ImageClassificationArguments(model_name_or_path=str(tmp_path / "imagenet"), toy_classes=[0, 1]), 0
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _warn_if_toy_normalisation_differs(tiny_timm())  # (the test models' config: mean = std = 0.5)


def test_a_transformers_model_with_an_mlp_head_is_not_advertised_as_transformers_loadable(tmp_path, caplog):
    """`save_pretrained`'s config.json describes the architecture's linear classifier: `from_pretrained` would load
    the folder with a random one in place of the MLP head. The save warns, and the card's library is headprep_hf."""
    from conftest import TinyImages
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    config.num_labels = 3
    model = ViTForImageClassification(config)
    args = make_config(tmp_path, hp_epochs=1, max_steps=2, head_type="mlp")
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=TinyImages(16))
    trainer.train()
    with caplog.at_level("WARNING"):
        trainer.save_model()
    assert "from_pretrained" in caplog.text and "random" in caplog.text
    trainer.create_model_card()
    assert ModelCard((tmp_path / "out" / "README.md").read_text()).data.library_name == "headprep_hf"


def test_card_reports_the_label_smoothing_factor_both_stages_used(tmp_path):
    # label_smoothing_factor smooths both stages (the trainer's fallback, recorded as 0.2 in headprep_dynamics.json
    # and headprep_head.json), but the card said eps_HP = eps_FT = 0.
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    config.num_labels = 3
    vit = ViTForImageClassification(config)  # (label_smoothing_factor needs a model with a config: transformers')
    trainer = HeadPrepTrainer(model=vit, args=make_config(tmp_path, label_smoothing_factor=0.2))
    trainer.create_model_card()
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| HP | label smoothing (eps_HP) | 0.2 |" in text and "| FT | label smoothing (eps_FT) | 0.2 |" in text
    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, hp_label_smoothing=0.1))
    trainer.create_model_card()
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| HP | label smoothing (eps_HP) | 0.1 |" in text and "| FT | label smoothing (eps_FT) | 0.0 |" in text


@pytest.mark.parametrize("where", ["existing folder", "absolute path", "relative path"])
def test_a_local_dataset_path_is_named_by_its_folder_not_as_a_hub_dataset(finetuned, tmp_path, where):
    # `--dataset_name /data/my_seg_set` became the card's `datasets:` entry and the model-index dataset type.
    trainer, folder = finetuned
    (tmp_path / "my_seg_set").mkdir()
    path = {
        "existing folder": str(tmp_path / "my_seg_set"),
        "absolute path": "/data/elsewhere/my_seg_set/",
        "relative path": "./data/my_seg_set",
    }[where]
    trainer.create_model_card(
        metrics={"validation_accuracy": 0.5}, tasks="image-segmentation", dataset_tags=path, dataset=path
    )
    data = _front_matter(folder / "README.md")
    assert "datasets" not in data
    _, (result,) = model_index_to_eval_results(data["model-index"])
    assert (result.dataset_type, result.dataset_name) == ("my_seg_set", "my_seg_set")
    assert path not in (folder / "README.md").read_text()
    # a Hub id, with or without an owner, stays one
    trainer.create_model_card(metrics={"validation_accuracy": 0.5}, dataset_tags="scene_parse_150")
    assert _front_matter(folder / "README.md")["datasets"] == ["scene_parse_150"]
    trainer.create_model_card(metrics={"validation_accuracy": 0.5}, dataset_tags="owner/segments")
    assert _front_matter(folder / "README.md")["datasets"] == ["owner/segments"]


def test_drift_measurements_are_not_listed_as_results(finetuned):
    # train_and_evaluate's metrics hold every drift statistic; drift_dot and drift_sq_norm showed up in "Results".
    trainer, folder = finetuned
    drift = {"drift_sq_dist": 1.5, "drift_dot": 2.5, "drift_sq_norm": 3.5, "drift_cos": 0.5, "energy": 0.25}
    trainer.create_model_card(metrics={"validation_accuracy": 0.75, **drift})
    text = (folder / "README.md").read_text()
    results = text[text.index("## Results") :]
    assert "| validation_accuracy | 0.75 |" in results
    assert not any(f"| {name} |" in results for name in drift)


class _StopAt(TrainerCallback):
    """Ctrl-C (KeyboardInterrupt) before update `step` + 1."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_the_card_of_an_interrupted_run_says_so(tmp_path, train_set):
    # It read as a finished run ("FT epochs 2", the last evaluation, before FT, as the model's result).
    args = make_config(tmp_path, eval_strategy="epoch")
    trainer = HeadPrepTrainer(
        model=tiny_timm(), args=args, train_dataset=train_set, eval_dataset=train_set, callbacks=[_StopAt(8)]
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    planned = trainer.state.max_steps
    trainer.create_model_card(model_name="stopped")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"**Incomplete run.** This run was interrupted at update 8 of {planned}" in card
    finished = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path / "whole"), train_dataset=train_set)
    finished.train()
    finished.create_model_card(model_name="whole")
    assert "Incomplete run" not in (tmp_path / "whole" / "out" / "README.md").read_text()
