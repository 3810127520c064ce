"""Bad inputs end in errors that name the dataset, sample, file or key, and the fix."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import TinyImages, bn_head_model, make_config, tiny_timm
from transformers import Trainer, TrainingArguments

from headprep_hf import HeadPrepTrainer, load_prepared_head


def _trainer(tmp_path, train, **overrides):
    return HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, **overrides), train_dataset=train)


def test_empty_training_set_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 samples\)"):
        _trainer(tmp_path, torch.utils.data.Subset(TinyImages(8), [])).train()


def test_sample_of_another_shape_is_named_by_index(tmp_path):
    class OneOdd(TinyImages):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            if i == 5:
                item["pixel_values"] = torch.zeros(3, 20, 20)
            return item

    with pytest.raises(ValueError, match=r"train_dataset\[5\] has 'pixel_values' of shape \(3, 20, 20\) but "):
        _trainer(tmp_path, OneOdd(48), hp_epochs=1).train()


class _PlainTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["pixel_values"])
        loss = torch.nn.functional.cross_entropy(logits, inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss


def test_a_last_batch_of_one_sample_at_a_batchnorm_layer_names_the_remainder_and_the_fix(tmp_path):
    # 9 samples in batches of 4: the last batch holds one, and the head's BatchNorm1d cannot train on it.
    def run(cls, args):
        cls(model=bn_head_model(), args=args, train_dataset=TinyImages(9)).train()

    settings = dict(hp_epochs=0, per_device_train_batch_size=4, track_dynamics=False, remove_unused_columns=False)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):  # what Trainer says
        run(_PlainTrainer, TrainingArguments(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to="none",
                                             per_device_train_batch_size=4, remove_unused_columns=False))  # fmt: skip
    with pytest.raises(ValueError, match=r"9 training samples leave 1 for the last batch of 4.*dataloader_drop_last"):
        run(HeadPrepTrainer, make_config(tmp_path, **settings))
    run(HeadPrepTrainer, make_config(tmp_path / "fixed", **settings, dataloader_drop_last=True))  # the fix works


def test_evaluation_under_drop_last_reports_the_samples_it_leaves_out(tmp_path, caplog):
    # Trainer applies dataloader_drop_last to evaluation too: 9 validation samples in batches of 4 are scored on 8.
    # The evaluation stays Trainer's (same samples); the trainer says how many are left out, once per set.
    class Counting(TinyImages):
        def __getitem__(self, i):
            seen.add(i)
            return super().__getitem__(i)

    seen: set[int] = set()
    args = make_config(tmp_path, hp_epochs=0, track_dynamics=False, dataloader_drop_last=True,
                       per_device_eval_batch_size=4)  # fmt: skip
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, eval_dataset=Counting(9))
    with caplog.at_level("WARNING", logger="headprep_hf"):
        trainer.evaluate()
        trainer.evaluate()
    assert len(seen) == 8  # as Trainer does
    warnings = [r.getMessage() for r in caplog.records if "not evaluated" in r.getMessage()]
    assert len(warnings) == 1 and "the last 1 of the 9 samples of eval_dataset" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="headprep_hf"):
        trainer.evaluate(TinyImages(8))  # divisible: nothing left out, nothing said
    assert not [r for r in caplog.records if "not evaluated" in r.getMessage()]


def test_a_bad_test_label_stops_the_recipe_before_training(tmp_path):
    # The recipes evaluate their test split after training: its labels are checked before the first step, as the
    # training and validation sets are (it failed with torch's IndexError after the whole run, results unwritten).
    from headprep_hf.tasks.base import TaskInputs, train_and_evaluate

    test = TinyImages(10, seed=2)
    test.labels[7] = 5
    inputs = TaskInputs(model=tiny_timm(), train_dataset=TinyImages(16), eval_dataset=TinyImages(8, seed=1),
                        test_dataset=test)  # fmt: skip
    args = make_config(tmp_path, hp_epochs=1, num_train_epochs=1, dataloader_num_workers=0)
    with pytest.raises(ValueError, match=r"test_dataset\[7\] has label 5, outside the 3 classes"):
        train_and_evaluate(inputs, args)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing trained or written


def test_a_recipe_run_without_measurements_or_test_split_finishes_its_summary(tmp_path, capsys):
    # energy and hp_train_accuracy are None without measurements: the final log and the one-line summary skip them
    # (both failed on formatting None, after the whole run).
    from headprep_hf.tasks.base import TaskInputs, summary_text, train_and_evaluate

    inputs = TaskInputs(model=tiny_timm(), train_dataset=TinyImages(16), eval_dataset=TinyImages(8, seed=1))
    args = make_config(tmp_path, hp_epochs=1, num_train_epochs=1, track_dynamics=False, dataloader_num_workers=0)
    _, metrics = train_and_evaluate(inputs, args)
    assert metrics["energy"] is None and "test_loss" not in metrics
    assert json.loads((tmp_path / "out" / "final_results.json").read_text())["energy"] is None
    entries = [("validation loss", "validation_loss"), ("test loss", "test_loss"), ("energy", "energy")]
    assert summary_text(args, metrics, entries) == f"tau=1  validation loss {metrics['validation_loss']:.4f}"


def test_probe_larger_than_the_training_set_warns_with_both_numbers(tmp_path):
    with pytest.warns(UserWarning, match=r"drift_probe_samples=100 is larger than the training set \(48 samples\)"):
        _trainer(tmp_path, TinyImages(48), hp_epochs=1, drift_probe_samples=100).train()


@pytest.fixture
def prepared_head(tmp_path):
    trainer = _trainer(tmp_path, TinyImages(48), hp_epochs=1)
    trainer.probe_head()
    return trainer.save_prepared_head(str(tmp_path / "head"))


def test_prepared_head_weights_that_are_a_pickle_are_named_and_not_loaded(tmp_path, prepared_head):
    weights = f"{prepared_head}/head.safetensors"
    with open(weights, "wb") as f:
        pickle.dump({"fc.weight": torch.zeros(3, 96)}, f)
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file"):
        load_prepared_head(tiny_timm(), prepared_head)


@pytest.mark.parametrize("key", ["feature_dim", "backbone"])
def test_prepared_head_config_with_a_missing_key_names_file_and_key(tmp_path, prepared_head, key):
    path = f"{prepared_head}/headprep_head.json"
    config = json.loads(open(path).read())
    del config[key]
    open(path, "w").write(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{path} lacks {key}"):
        load_prepared_head(tiny_timm(), prepared_head)


@pytest.mark.parametrize("with_array", [True, False])
def test_problem_type_is_inferred_from_every_label_not_the_first(with_array):
    """A multi-target regression whose first row is 0/1 was taken for multi-label classification, and its label check
    then refused a 0.5 label for "binary tasks". Labels held as an array are now all looked at; read item by item
    (the label check's own scan), the check names the fix."""
    import numpy as np

    from headprep_hf.labels import check_task_labels, infer_problem_type

    class Rows(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = np.asarray(rows, dtype=np.float32)
            if with_array:
                self.labels = self.rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return {"x": torch.zeros(2), "labels": torch.from_numpy(self.rows[i])}

    nan = float("nan")
    assert infer_problem_type(Rows([[0, 1], [1, nan], [0, 0]])) == "multi_label_classification"
    assert infer_problem_type(Rows([[0.5, 1], [0, 1]])) == "regression"
    assert infer_problem_type(Rows([[1.5], [2.0]])) == "regression"
    regression = Rows([[0, 1], [0.5, 2.5]])
    if with_array:
        assert infer_problem_type(regression) == "regression"
    else:
        assert infer_problem_type(regression) == "multi_label_classification"
        with pytest.raises(ValueError, match=r'train_dataset\[1\] has label 0.5 .*problem_type="regression"'):
            check_task_labels(regression, 2, "train_dataset", "multi_label_classification")


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification"])
def test_label_checks_leave_the_training_rngs_alone(tmp_path, problem_type):
    """The label checks read every sample of a dataset without a label array; an augmenting `__getitem__` then drew
    from torch's, Python's and NumPy's RNGs, so checking the labels changed the training run."""
    import random

    import numpy as np

    from headprep_hf.labels import check_trainer_datasets

    multi = problem_type == "multi_label_classification"

    class Augmenting(torch.utils.data.Dataset):
        def __len__(self):
            return 24

        def __getitem__(self, i):
            x = torch.randn(3, 16, 16) + random.random() + float(np.random.rand())
            label = torch.tensor([float(i % 2), 1.0, 0.0]) if multi else i % 3
            return {"pixel_values": x, "labels": label}

    args = make_config(tmp_path, hp_epochs=1, problem_type=problem_type)
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=Augmenting())
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    check_trainer_datasets(trainer)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1] and np.array_equal(np.random.get_state()[1], states[2])


def test_a_voc_border_label_with_the_default_ignore_index_names_ignore_index_255():
    # Masks with PASCAL VOC's 255 border under ignore_index=-100 were told to build a head of 256 classes.
    from headprep_hf.labels import check_labels

    class Masks(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            mask = torch.zeros(4, 4, dtype=torch.long)
            mask[0, 0] = 255 if i == 2 else 1
            return {"labels": mask}

    with pytest.raises(ValueError, match=r"train\[2\] has label 255.*set ignore_index=255 \(--ignore_index 255\)"):
        check_labels(Masks(), 4, "train")
    check_labels(Masks(), 4, "train", ignore_index=255)
    with pytest.raises(ValueError, match=r"num_classes >= 256"):  # (a class id of per-sample labels: the old advice)
        check_labels(TinyImagesWith255(), 3, "train")


class TinyImagesWith255(TinyImages):
    def __init__(self):
        super().__init__(8)
        self.labels[3] = 255
