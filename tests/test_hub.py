"""Prepared heads: save after HP, attach to a fresh backbone, and the mismatch checks."""

import json

import pytest
import timm
import torch
from conftest import make_config, tiny_timm

from headprep_hf import BackboneMismatchWarning, HeadPrepTrainer, load_prepared_head
from headprep_hf.hub import HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME


def _probed(tmp_path, train_set, **overrides):
    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, **overrides), train_dataset=train_set)
    trainer.probe_head()
    folder = trainer.save_prepared_head(str(tmp_path / "head"))
    return trainer, folder


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("head_type", ["linear", "mlp"])
def test_round_trip_gives_identical_logits(tmp_path, train_set, head_type):
    trainer, folder = _probed(tmp_path, train_set, head_type=head_type)
    x = torch.stack([train_set[i]["pixel_values"] for i in range(8)])
    expected = _logits(trainer.model, x)

    fresh = tiny_timm()  # same pretrained backbone, a new random head
    assert not torch.equal(_logits(fresh, x), expected)
    config = load_prepared_head(fresh, folder)
    assert torch.equal(_logits(fresh, x), expected)
    assert config["tau"] == 2 and config["head_type"] == head_type and config["num_labels"] == 3
    assert config["energy"] == trainer.dynamics["energy"] and config["feature_dim"] == fresh.num_features
    on_disk = json.loads((tmp_path / "head" / HEAD_CONFIG_NAME).read_text())
    assert on_disk == config
    assert (tmp_path / "head" / HEAD_WEIGHTS_NAME).stat().st_size < 200_000  # a head, not a backbone


def test_finetune_starts_from_a_loaded_head(tmp_path, train_set):
    trainer, folder = _probed(tmp_path, train_set)
    model = tiny_timm()
    load_prepared_head(model, folder)
    ft = HeadPrepTrainer(model=model, args=make_config(tmp_path / "ft", hp_epochs=0), train_dataset=train_set)
    ft.finetune()
    # FT measured the energy of the loaded head: the one the probing run measured
    assert ft.dynamics["energy"] == pytest.approx(trainer.dynamics["energy"], rel=1e-6)


def test_mismatches(tmp_path, train_set):
    _, folder = _probed(tmp_path, train_set)
    with pytest.raises(ValueError, match="3 labels but the model.s head has 5"):
        load_prepared_head(tiny_timm(num_classes=5), folder)
    other_arch = timm.create_model("resnet10t", num_classes=3)
    with pytest.raises(ValueError, match="features"):
        load_prepared_head(other_arch, folder)
    other_weights = tiny_timm(seed=1)  # same architecture, other backbone weights
    with pytest.warns(BackboneMismatchWarning):
        load_prepared_head(other_weights, folder)
    with pytest.raises(ValueError, match="other backbone weights"):
        load_prepared_head(tiny_timm(seed=1), folder, strict=True)
    with pytest.raises(FileNotFoundError, match="not a prepared head"):
        load_prepared_head(tiny_timm(), tmp_path)
