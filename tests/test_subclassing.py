"""Subclassing HeadPrepTrainer: the README's "Subclassing" examples, run exactly as written, and the errors that name
the fix for the usual mistakes (outputs as a bare tensor, a timm model called by keyword, tuple datasets).

The README code blocks are read from README.md and executed here, so the README and what is tested cannot drift apart.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyImages, make_config, tiny_timm

from headprep_hf import HeadPrepTrainer
from headprep_hf.metrics import accuracy_metrics

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_section_code(title: str) -> list[str]:
    """The ```python blocks of the README section `### {title}` (up to the next heading of level 2 or 3)."""
    text = README.read_text()
    start = text.index(f"\n### {title}\n")
    end = re.compile(r"\n#{2,3} ").search(text, start + 1).start()
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """Execute the Subclassing section's code blocks in order, in one namespace, in a fresh folder."""
    blocks = readme_section_code("Subclassing")
    assert len(blocks) == 4, "the test expects the README's 4 Subclassing blocks; update both together"
    namespace = {"train": TinyImages(32, seed=0), "val": TinyImages(20, seed=1)}
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("readme"))
    try:
        torch.manual_seed(0)
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def _batch(images: TinyImages, n: int = 8) -> dict:
    return {"pixel_values": images.x[:n], "labels": torch.as_tensor(images.labels[:n])}


def _focal(logits, labels, gamma=2.0):
    p = logits.softmax(-1)[torch.arange(len(labels)), labels]
    return (-((1 - p) ** gamma) * p.log()).mean()


def _penalty(logits, labels, beta=0.1):
    p = logits.softmax(-1)
    return F.cross_entropy(logits, labels) + beta * (p * p.log()).sum(-1).mean()


def _logits(model, images):
    # transformers models take pixel_values= and return an output with .logits; timm models take the tensor
    return model(pixel_values=images).logits if hasattr(model, "config") else model(images)


@pytest.mark.slow  # (the README's five short runs, about 20 s in all on 2 cores)
@pytest.mark.parametrize(
    "name, formula",
    [("focal", _focal), ("penalty", _penalty), ("focal_vit", _focal), ("penalty_vit", _penalty)],
)
def test_readme_subclasses_train_with_their_loss_on_timm_and_transformers(readme_run, name, formula):
    trainer = readme_run[name]
    val = readme_run["val"]
    # Both stages ran (HP: 2 updates of 16, FT: 2) and the measurements were taken.
    assert trainer.state.global_step == 4
    assert trainer.dynamics["energy"] > 0 and trainer.dynamics["drift"]
    # The loss is the subclass's, computed here independently from the model's logits ...
    model = trainer.model.eval()
    batch = _batch(val)
    with torch.no_grad():
        expected = formula(_logits(model, batch["pixel_values"]), batch["labels"])
        assert trainer.compute_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    # ... in training steps too: overriding loss_from_logits selects the trainer's loss in both stages, also for the
    # transformers model, which would otherwise compute its own.
    if name.startswith("focal"):
        assert trainer.uses_trainer_loss(True, "hp") and trainer.uses_trainer_loss(True, "ft")
    # ... and predictions come out one per sample, with the accuracy compute_metrics gave.
    output = trainer.predict(val)
    assert output.predictions.shape == (len(val), 3)
    accuracy = (output.predictions.argmax(-1) == val.labels).mean()
    assert output.metrics["test_accuracy"] == pytest.approx(accuracy)


@pytest.mark.slow
def test_readme_tuple_dataset_trains_through_the_collator(readme_run):
    trainer = readme_run["from_pairs"]
    assert trainer.state.global_step == 4  # 32 pairs, batch 16: 2 HP + 2 FT updates
    assert trainer.dynamics["energy"] > 0 and trainer.dynamics["drift"]


# ---------------------------------------------------------------------------------------------- named mistakes
class BareTensorOutputs(HeadPrepTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["pixel_values"])
        loss = F.cross_entropy(logits, inputs["labels"])
        return (loss, logits) if return_outputs else loss


class CallsTimmByKeyword(HeadPrepTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(pixel_values=inputs["pixel_values"])
        loss = F.cross_entropy(logits, inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss


def test_outputs_returned_as_a_bare_tensor_are_named_with_the_fix(tmp_path, eval_set):
    # Trainer would slice the tensor as (loss, *predictions) and drop the first row of every batch's logits.
    args = make_config(tmp_path, hp_epochs=0)
    trainer = BareTensorOutputs(model=tiny_timm(), args=args, compute_metrics=accuracy_metrics())
    assert trainer.compute_loss(trainer.model, _batch(eval_set)) > 0  # loss alone: fine
    with pytest.raises(TypeError, match=r"BareTensorOutputs\.compute_loss.*bare tensor.*\{\"logits\": logits\}"):
        trainer.evaluate(eval_set)


def test_compute_loss_must_return_a_pair_when_outputs_are_asked_for(tmp_path, eval_set):
    class LossOnly(HeadPrepTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return F.cross_entropy(model(inputs["pixel_values"]), inputs["labels"])

    trainer = LossOnly(model=tiny_timm(), args=make_config(tmp_path, hp_epochs=0))
    with pytest.raises(TypeError, match=r"must return a pair \(loss, outputs\), got Tensor"):
        trainer.evaluate(eval_set)


def test_a_timm_model_called_by_keyword_names_model_caller(tmp_path, train_set):
    trainer = CallsTimmByKeyword(model=tiny_timm(), args=make_config(tmp_path), train_dataset=train_set)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'pixel_values'.*self\.model_caller"):
        trainer.train()


def test_a_checked_compute_loss_returns_what_the_override_returns(tmp_path, eval_set):
    """The check wraps the override without changing its results: evaluation equals the same loss computed here."""

    class Fine(HeadPrepTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = self.model_caller(model, inputs)
            loss = F.cross_entropy(logits, inputs["labels"]) * 2.0
            return (loss, {"logits": logits}) if return_outputs else loss

    model = tiny_timm()
    trainer = Fine(model=model, args=make_config(tmp_path, hp_epochs=0, per_device_eval_batch_size=16))
    metrics = trainer.evaluate(eval_set)
    with torch.no_grad():
        expected = 2.0 * F.cross_entropy(model.eval()(eval_set.x), torch.as_tensor(eval_set.labels))
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- tuple datasets
class Pairs(torch.utils.data.Dataset):
    """(image, label) tuples, as torchvision datasets give them."""

    def __init__(self, images: TinyImages):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        item = self.images[i]
        return item["pixel_values"], item["labels"]


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return ViTForImageClassification(config)


@pytest.mark.parametrize("which", ["train_dataset", "eval_dataset", "drift_dataset"])
@pytest.mark.parametrize("make_model", [tiny_timm, _tiny_vit], ids=["timm", "transformers"])
def test_tuple_datasets_are_refused_before_training_with_the_format_and_fix(tmp_path, which, make_model):
    datasets = {"train_dataset": TinyImages(32), "eval_dataset": TinyImages(16, seed=1)}
    datasets[which] = Pairs(TinyImages(32))
    trainer = HeadPrepTrainer(model=make_model(), args=make_config(tmp_path), **datasets)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError) as error:
        trainer.train()
    message = str(error.value)
    assert message.startswith(f"{which}[0] is a tuple (Tensor, int)")
    assert "{'pixel_values': <model input>, 'labels': <target>}" in message and "data_collator=" in message
    assert trainer.state.global_step == 0 and not list((tmp_path / "out").rglob("*"))  # nothing ran or was written
    assert torch.equal(torch.get_rng_state(), rng)  # reading the sample left the RNG as it was


def test_tuple_refusal_names_the_models_input_name(tmp_path):
    class Named(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3)

        def forward(self, images, mask=None):
            return self.fc(self.body(images))

    trainer = HeadPrepTrainer(model=Named(), args=make_config(tmp_path), train_dataset=Pairs(TinyImages(16)))
    with pytest.raises(ValueError, match=r"\{'images': <model input>, 'labels': <target>\}"):
        trainer.train()


def test_collator_built_from_the_refusal_message_trains_the_tuple_dataset(tmp_path):
    """The fix the error gives, taken literally from its text, trains; with a collator nothing is refused."""
    trainer = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path), train_dataset=Pairs(TinyImages(32)))
    with pytest.raises(ValueError) as error:
        trainer.train()
    expression = str(error.value).split("data_collator=", 1)[1].rstrip(".")
    collator = eval(expression, {"torch": torch})
    fixed = HeadPrepTrainer(
        model=tiny_timm(),
        args=make_config(tmp_path / "fixed", hp_epochs=1),
        data_collator=collator,
        train_dataset=Pairs(TinyImages(32)),
        eval_dataset=Pairs(TinyImages(16, seed=1)),
    )
    fixed.train()
    assert fixed.state.global_step == 4 and fixed.dynamics["drift"]  # 32 samples, batch 16: 2 HP + 2 FT
    assert fixed.evaluate()["eval_loss"] > 0
    # It builds exactly the batches the default collator builds from dict items (so training is the same).
    from transformers import default_data_collator

    pairs, dicts = Pairs(TinyImages(32)), TinyImages(32)
    ours, reference = collator([pairs[i] for i in range(5)]), default_data_collator([dicts[i] for i in range(5)])
    assert ours.keys() == reference.keys()
    for key in ours:
        assert torch.equal(ours[key], reference[key]) and ours[key].dtype == reference[key].dtype


def test_cached_head_probing_says_that_it_does_not_call_an_overridden_compute_loss(tmp_path, train_set, caplog):
    class Custom(HeadPrepTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = make_config(tmp_path, hp_epochs=1, hp_cache_features=True, max_steps=1)
    with caplog.at_level("WARNING", logger="headprep_hf.losses"):
        Custom(model=tiny_timm(), args=args, train_dataset=train_set).train()
    assert "Custom.compute_loss is not called in HP (it is in FT). Override loss_from_logits" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="headprep_hf.losses"):  # the toolkit's own loss: nothing to say
        HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train_set).warn_if_cached_hp_bypasses_the_loss()
    assert "not called in HP" not in caplog.text
