"""Tests for headprep_hf.models: the cached MNIST source model and load_timm_model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from headprep_hf.models import default_cache_dir, load_timm_model, pretrain_source_model, source_model_dir
from headprep_hf.models import source as source_module

TINY = dict(arch="test_resnet", epochs=1, batch_size=32, max_samples=64, progress=False)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    """One real (tiny) pretraining run shared by the tests that only read its output."""
    return pretrain_source_model(tmp_path_factory.mktemp("cache"), **TINY)


def _fake_train(settings, device, progress):
    torch.manual_seed(123)
    return timm.create_model(settings["arch"], num_classes=10).eval(), 0.5


def _same_except_classifier(state: dict, saved: dict, classifier: str = "fc.") -> bool:
    backbone = [key for key in saved if not key.startswith(classifier)]
    return bool(backbone) and all(torch.equal(state[key], saved[key]) for key in backbone)


# --- pretrain_source_model -----------------------------------------------------------------------


def test_pretrain_writes_complete_folder(tiny_source):
    assert tiny_source.name == "mnist5k-test_resnet-s0-n64-e1-b32"
    assert {p.name for p in tiny_source.iterdir()} == {
        "config.json",
        "model.safetensors",
        "pretrain_info.json",
        "headprep_cache_manifest.json",
    }
    info = json.loads((tiny_source / "pretrain_info.json").read_text())
    assert 0.0 <= info["validation_accuracy"] <= 1.0
    assert info["arch"] == "test_resnet" and info["epochs"] == 1 and info["max_samples"] == 64
    config = json.loads((tiny_source / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    # No temporary folders survive a successful run.
    assert [p.name for p in tiny_source.parent.iterdir()] == [tiny_source.name]


def test_pretrain_reuses_cache_without_training(tiny_source, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_source.iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model should have been reused")

    monkeypatch.setattr(source_module, "_train", no_training)
    again = pretrain_source_model(tiny_source.parent, **TINY)
    assert again == tiny_source
    assert {p.name: p.stat().st_mtime_ns for p in tiny_source.iterdir()} == before


def test_pretrain_force_replaces_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(source_module, "_train", _fake_train)
    folder = pretrain_source_model(tmp_path, **TINY)
    (folder / "marker").write_text("old copy")
    assert pretrain_source_model(tmp_path, **TINY, force=True) == folder
    assert not (folder / "marker").exists() and (folder / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_pretrain_failure_leaves_no_partial_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(source_module, "_train", _fake_train)

    def crash_midway(model, folder, info):
        (folder / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(source_module, "_save", crash_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        pretrain_source_model(tmp_path, **TINY)
    assert list(tmp_path.iterdir()) == []
    assert not source_model_dir(tmp_path, "test_resnet", 0, 64).exists()


def _flip_a_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    ["flipped", "truncated", "weights_deleted", "config_deleted", "manifest_deleted", "empty_folder"],
)
def test_a_damaged_or_incomplete_cache_entry_is_pretrained_again(tmp_path, monkeypatch, caplog, damage):
    monkeypatch.setattr(source_module, "_train", _fake_train)
    folder = pretrain_source_model(tmp_path, **TINY)
    reference = {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items()}  # (not the mmap)
    weights = folder / "model.safetensors"
    if damage == "flipped":  # (one bit in the middle of the tensors: safetensors loads it without a word)
        _flip_a_byte(weights, weights.stat().st_size // 2)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "weights_deleted":
        weights.unlink()
    elif damage == "config_deleted":
        (folder / "config.json").unlink()
    elif damage == "manifest_deleted":  # (an entry of an earlier version: nothing to check it against)
        (folder / "headprep_cache_manifest.json").unlink()
    else:
        for file in folder.iterdir():
            file.unlink()
    with caplog.at_level("WARNING", logger="headprep_hf.models.source"):
        assert pretrain_source_model(tmp_path, **TINY) == folder
    assert "is not reused" in caplog.text and str(folder) in caplog.text
    loaded = load_file(str(folder / "model.safetensors"))
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert source_module.cache_entry_problem(folder) is None
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # (the damaged copy is gone, no temporary left)


def test_other_pretraining_settings_get_their_own_entry(tmp_path, monkeypatch):
    trained = []

    def fake_train(settings, device, progress):
        trained.append(settings["epochs"])
        return _fake_train(settings, device, progress)

    monkeypatch.setattr(source_module, "_train", fake_train)
    one = pretrain_source_model(tmp_path, **{**TINY, "epochs": 1})
    two = pretrain_source_model(tmp_path, **{**TINY, "epochs": 2})
    assert one != two and trained == [1, 2]
    assert json.loads((two / "pretrain_info.json").read_text())["epochs"] == 2
    assert pretrain_source_model(tmp_path, **{**TINY, "epochs": 1}) == one and trained == [1, 2]  # (both reused)
    assert source_model_dir(tmp_path).name == "mnist5k-test_resnet-s0"  # (the defaults: the name they always had)


def test_an_entry_recorded_with_other_settings_is_pretrained_again(tmp_path, monkeypatch, caplog):
    # An earlier version named entries by architecture, seed and max_samples only: a 1-epoch model sat under the
    # name a 2-epoch run now asks for, and was reused with a warning that suggested force=True, which no CLI has.
    monkeypatch.setattr(source_module, "_train", _fake_train)
    asked = {**TINY, "epochs": 2}
    folder = source_model_dir(tmp_path, "test_resnet", 0, 64, epochs=2, batch_size=32)
    built = pretrain_source_model(tmp_path, **TINY)
    os.replace(built, folder)
    with caplog.at_level("WARNING", logger="headprep_hf.models.source"):
        assert pretrain_source_model(tmp_path, **asked) == folder
    assert "other settings" in caplog.text
    assert json.loads((folder / "pretrain_info.json").read_text())["epochs"] == 2


def test_pretrained_folder_loads_with_new_head(tiny_source):
    saved = load_file(str(tiny_source / "model.safetensors"))
    model = load_timm_model(str(tiny_source), num_classes=3)
    assert model.fc.weight.shape == (3, saved["fc.weight"].shape[1])
    assert _same_except_classifier(model.state_dict(), saved)
    data_config = timm.data.resolve_data_config(model=model)
    # Configs read back from config.json hold lists, not tuples.
    assert tuple(data_config["input_size"]) == (3, 32, 32) and tuple(data_config["mean"]) == (0.5, 0.5, 0.5)
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADPREP_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert source_model_dir(seed=2).parent == tmp_path / "c"
    monkeypatch.delenv("HEADPREP_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "headprep_hf"


# --- load_timm_model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A 10-class test_resnet saved as a safetensors file, a torch file and a save_for_hf folder."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "w.safetensors"))
    torch.save(state, root / "w.pth")
    timm.models.save_for_hf(model, str(root / "folder"), safe_serialization=True)
    return root, state


@pytest.mark.parametrize("filename", ["w.safetensors", "w.pth", "folder"])
def test_load_local_weights_replaces_classifier(weights, filename):
    root, saved = weights
    model = load_timm_model(str(root / filename), num_classes=3, arch="test_resnet")
    state = model.state_dict()
    assert set(state) == set(saved)
    assert _same_except_classifier(state, saved)
    assert state["fc.weight"].shape == (3, 96) and state["fc.bias"].shape == (3,)


@pytest.mark.parametrize("filename", ["w.safetensors", "w.pth"])
def test_load_file_with_same_num_classes_keeps_classifier(weights, filename):
    # timm compares num_classes with the registry cfg (1000), not the file; the loader must correct that.
    root, saved = weights
    model = load_timm_model(str(root / filename), num_classes=10, arch="test_resnet")
    assert torch.equal(model.state_dict()["fc.weight"], saved["fc.weight"])


def test_load_headless_checkpoint(tmp_path, weights):
    _, saved = weights
    headless = {k: v for k, v in saved.items() if not k.startswith("fc.")}
    save_file(headless, str(tmp_path / "backbone.safetensors"))
    model = load_timm_model(str(tmp_path / "backbone.safetensors"), num_classes=10, arch="test_resnet")
    assert _same_except_classifier(model.state_dict(), saved) and model.fc.out_features == 10


def test_hub_id_routes_to_hf_hub(monkeypatch):
    calls = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: calls.append((name, kw)) or "model")
    assert load_timm_model("timm/resnet50.a1_in1k", num_classes=3) == "model"
    assert calls == [("hf-hub:timm/resnet50.a1_in1k", dict(pretrained=True, num_classes=3))]


def test_random_init_needs_explicit_pretrained_false():
    with pytest.raises(ValueError, match="pretrained=False"):
        load_timm_model("test_resnet", num_classes=3)
    with pytest.raises(ValueError, match="timm/resnet18.a1_in1k"):
        load_timm_model("resnet18.a1_in1k", num_classes=3)
    model = load_timm_model("test_resnet", num_classes=4, pretrained=False)
    assert model.fc.out_features == 4


def test_load_errors_name_the_argument_and_fix(weights, tmp_path):
    root, _ = weights
    with pytest.raises(ValueError, match="is a weights file.*--model_arch"):
        load_timm_model(str(root / "w.safetensors"), num_classes=3)
    with pytest.raises(ValueError, match="model_arch='not_a_net'"):
        load_timm_model(str(root / "w.pth"), num_classes=3, arch="not_a_net")
    with pytest.raises(ValueError, match="model_arch='resnet18' contradicts"):
        load_timm_model(str(root / "folder"), num_classes=3, arch="resnet18")
    with pytest.raises(FileNotFoundError, match="model_name_or_path='./missing'"):
        load_timm_model("./missing", num_classes=3)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_timm_model("missing.safetensors", num_classes=3, arch="test_resnet")
    with pytest.raises(ValueError, match="neither"):
        load_timm_model("no_such_model_xyz", num_classes=3)
    for name in ("a.safetensors", "b.pth"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="without config.json and with 2 weight files"):
        load_timm_model(str(tmp_path), num_classes=3, arch="test_resnet")
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "config.json").write_text('{"num_classes": 3}')  # neither timm's `architecture` nor a `model_type`
    with pytest.raises(ValueError, match="names no timm architecture and no transformers model_type"):
        load_timm_model(str(neither), num_classes=3)


def test_a_misspelt_architecture_gets_the_close_ones_named():
    from headprep_hf.models.loading import load_timm_model

    with pytest.raises(ValueError, match=r"nor a timm architecture name \(a close timm architecture: resnet50, "):
        load_timm_model("resnet_50", 3)
    with pytest.raises(ValueError, match=r"nor a timm architecture name$"):  # (nothing close: nothing named)
        load_timm_model("zzzqqq", 3)


def test_an_entry_moved_away_while_it_is_checked_is_a_problem_not_an_error(tmp_path, monkeypatch):
    # Another process moved the entry aside while this one hashed it: FileNotFoundError threw a finished pretraining
    # away (the check after it) or left the other DDP ranks waiting.
    from headprep_hf import files

    monkeypatch.setattr(source_module, "_train", _fake_train)
    folder = pretrain_source_model(tmp_path, **TINY)
    real = files.file_sha256

    def moved_meanwhile(path):
        if str(path).endswith("config.json"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path)

    monkeypatch.setattr(files, "file_sha256", moved_meanwhile)
    problem = files.cache_entry_problem(folder)
    assert problem is not None and problem.startswith(str(folder / "config.json")) and "could not be read" in problem
