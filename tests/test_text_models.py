"""Text models (transformers BERT, RoBERTa, DistilBERT, GPT-2) with tokenizer collators: variable padded lengths,
per-token heads and labels, `BatchEncoding` batches.

Each case compares with plain `transformers.Trainer` on the same model and data, or with the value computed in plain
torch from the model's own outputs. Tiny models built from configs (no network); a few seconds each.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from headprep_hf import HeadPrepConfig, HeadPrepTrainer, cross_entropy_energy, smoothed_cross_entropy
from headprep_hf.split import find_split

tokenizers = pytest.importorskip("tokenizers")


def tokenizer(pad_id: int = 0) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over t0..t99, built in memory: only its padding is used (the data are token ids)."""
    vocab = {f"t{i}": i for i in range(100)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=f"t{pad_id}", unk_token="t1")


class Rows(torch.utils.data.Dataset):
    """Token-id sequences of lengths 3..11 (so padded lengths differ between batches) with a class per sequence
    (`token_labels=False`) or per token (the first token's label -100, as for a [CLS] token)."""

    def __init__(self, n=24, num_labels=3, token_labels=False, seed=0, label_kind="int"):
        rng = np.random.RandomState(seed)
        self.rows = []
        for _ in range(n):
            length = int(rng.randint(3, 12))
            row = {"input_ids": [int(t) for t in rng.randint(2, 100, size=length)], "attention_mask": [1] * length}
            if token_labels:
                labels = [int(v) for v in rng.randint(num_labels, size=length)]
                labels[0] = -100
                row["labels"] = labels
            elif label_kind == "multi":
                row["labels"] = [float(v) for v in rng.randint(0, 2, size=num_labels)]
            else:
                row["labels"] = int(rng.randint(num_labels))
            self.rows.append(row)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return dict(self.rows[i])


# The size of every tiny text model here (seconds per test on a CPU).
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def bert(cls=BertForSequenceClassification, num_labels=3, problem_type=None):
    torch.manual_seed(0)
    config = BertConfig(**TINY, max_position_embeddings=64, num_labels=num_labels, problem_type=problem_type)
    return cls(config)


def roberta():
    torch.manual_seed(0)
    config = RobertaConfig(**TINY, max_position_embeddings=70, pad_token_id=1, num_labels=3)
    return RobertaForSequenceClassification(config)


def distilbert():
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, num_labels=3
    )
    return DistilBertForSequenceClassification(config)


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, num_labels=3, pad_token_id=0)
    config.bos_token_id = config.eos_token_id = None  # (GPT-2's defaults are outside this tiny vocabulary)
    return GPT2ForSequenceClassification(config)


def arguments(tmp_path, name="out", **overrides) -> dict:
    return {
        "output_dir": str(tmp_path / name),
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "num_train_epochs": 1,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "seed": 0,
        **overrides,
    }


def _run_both(tmp_path, make_model, train_set, collator, **overrides):
    """Plain Trainer and HeadPrepTrainer (hp_epochs=0, measurements on) on the same model and data."""
    results = {}
    for name, trainer_cls, args_cls in (
        ("trainer", Trainer, TrainingArguments),
        ("headprep", HeadPrepTrainer, lambda **kw: HeadPrepConfig(hp_epochs=0, **kw)),
    ):
        trainer = trainer_cls(
            model=make_model(),
            args=args_cls(**arguments(tmp_path, name, **overrides)),
            train_dataset=train_set,
            data_collator=collator,
        )
        trainer.train()
        losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
        results[name] = (losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer)
    return results


def _assert_same_training(results):
    (losses, weights, _), (hp_losses, hp_weights, _) = results["trainer"], results["headprep"]
    assert losses and hp_losses == losses
    assert all(torch.equal(weights[k], hp_weights[k]) for k in weights)


def _one(collator, item):
    """One sample as its own batch (no padding at all): what the model computes for it alone."""
    return collator([item])


# ---------------------------------------------------------------------------------------------- 1, 2: drift features


def test_token_classification_with_a_padding_collator_trains_as_trainer(tmp_path):
    # Batches of the measurement passes (16) and of training (4) are padded to different lengths: the drift features
    # must not depend on the padded length (they were the flattened (T*H) head inputs, which could not be stacked).
    collator = DataCollatorForTokenClassification(tokenizer())
    results = _run_both(tmp_path, lambda: bert(BertForTokenClassification), Rows(token_labels=True), collator)
    _assert_same_training(results)
    dynamics = results["headprep"][2].dynamics
    assert dynamics["num_probe_samples"] == 24 and dynamics["drift"]


def test_sequence_features_are_the_mean_over_valid_tokens(tmp_path):
    # z of a per-token head: per sample, the mean of the head's inputs over the tokens the attention mask keeps,
    # the same whatever padding the sample got in its batch.
    data = Rows(token_labels=True)
    collator = DataCollatorForTokenClassification(tokenizer())
    trainer = HeadPrepTrainer(
        model=bert(BertForTokenClassification),
        args=HeadPrepConfig(hp_epochs=0, measure_batch_size=5, **arguments(tmp_path)),
        train_dataset=data,
        data_collator=collator,
    )
    trainer.measure_start()
    model = trainer.model.eval()
    with torch.no_grad():
        expected = torch.stack(
            [
                model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[0].mean(0)
                for b in (_one(collator, data[i]) for i in range(len(data)))
            ]
        )
    torch.testing.assert_close(trainer.measurements.z0, expected, rtol=1e-5, atol=1e-6)


def test_roberta_drift_feature_is_the_first_token_vector_its_head_uses(tmp_path):
    # RobertaClassificationHead gets the whole sequence and classifies its first (<s>) token: that vector is z,
    # not the sequence (padding included). Training batches of one sample: measurement batches mix lengths.
    data, collator = Rows(), DataCollatorWithPadding(tokenizer(pad_id=1))
    results = _run_both(tmp_path, roberta, data, collator, per_device_train_batch_size=1, max_steps=6)
    _assert_same_training(results)

    trainer = HeadPrepTrainer(
        model=roberta(),
        args=HeadPrepConfig(hp_epochs=0, **arguments(tmp_path)),
        train_dataset=data,
        data_collator=collator,
    )
    trainer.measure_start()
    model = trainer.model.eval()
    with torch.no_grad():
        expected = torch.cat(
            [
                model.roberta(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[:, 0]
                for b in (_one(collator, data[i]) for i in range(len(data)))
            ]
        )
    torch.testing.assert_close(trainer.measurements.z0, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- 3: per-token energy


def _token_energy_by_hand(model, data, collator):
    """Energy, accuracy and p0 over every labelled token (the mean over valid positions, as for dense labels),
    softmax over the classes (last axis), each sample alone (no padding)."""
    energy, correct, p_true = [], [], []
    model.eval()
    with torch.no_grad():
        for i in range(len(data)):
            batch = _one(collator, data[i])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
            labels = batch["labels"][0]
            valid = labels != -100
            p = logits[valid].softmax(-1)
            one_hot = F.one_hot(labels[valid], logits.shape[-1]).float()
            energy += (one_hot - p).norm(dim=-1).tolist()
            correct += (p.argmax(-1) == labels[valid]).float().tolist()
            p_true += p.gather(1, labels[valid][:, None]).squeeze(1).tolist()
    return float(np.mean(energy)), float(np.mean(correct)), float(np.mean(p_true))


def test_token_energy_uses_the_class_axis_even_when_length_equals_classes(tmp_path):
    # Padded to 16 tokens with 16 classes: (B, T, C) logits look like dense (B, C, L) ones; the softmax was taken
    # over the tokens. A confident head makes the two readings differ clearly.
    data = Rows(num_labels=16, token_labels=True)
    collator = DataCollatorForTokenClassification(tokenizer(), padding="max_length", max_length=16)
    trainer = HeadPrepTrainer(
        model=bert(BertForTokenClassification, num_labels=16),
        args=HeadPrepConfig(hp_epochs=0, **arguments(tmp_path)),
        train_dataset=data,
        data_collator=collator,
    )
    with torch.no_grad():
        trainer.model.classifier.weight.mul_(30.0)
    summary = trainer.measure_start()
    energy, accuracy, p0 = _token_energy_by_hand(trainer.model, data, DataCollatorForTokenClassification(tokenizer()))
    assert summary["energy"] == pytest.approx(energy, abs=1e-6)
    assert summary["hp_train_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert summary["p0_mean"] == pytest.approx(p0, abs=1e-6)


def test_token_loss_and_energy_functions_read_the_class_axis_last():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 4, generator=g) * 5  # T == C: the shape alone does not tell the axes apart
    labels = torch.tensor([[0, 3, -100, 1], [2, -100, -100, 0]])
    flat, flat_labels = logits.reshape(-1, 4), labels.reshape(-1)
    for smoothing in (0.0, 0.1):
        expected = F.cross_entropy(flat, flat_labels, ignore_index=-100, label_smoothing=smoothing)
        torch.testing.assert_close(smoothed_cross_entropy(logits, labels, smoothing), expected)
    stats = cross_entropy_energy(logits, labels)
    valid = flat_labels != -100
    p = flat[valid].softmax(-1)
    per_token = (F.one_hot(flat_labels[valid], 4).float() - p).norm(dim=-1)
    owner = torch.arange(2).repeat_interleave(4)[valid]
    for i in range(2):
        assert stats["energy"][i].item() == pytest.approx(per_token[owner == i].mean().item(), abs=1e-6)
    assert stats["count"].tolist() == [3.0, 2.0]


def test_declared_problem_type_trains_token_classification_as_trainer(tmp_path):
    # problem_type set: the trainer's own loss on (B, T, C) logits and the label check of per-token labels of
    # different lengths (both failed); the loss is the model's own (cross-entropy over the labelled tokens).
    collator = DataCollatorForTokenClassification(tokenizer())
    data = Rows(token_labels=True)
    results = {}
    for name, trainer_cls, args in (
        ("trainer", Trainer, TrainingArguments(**arguments(tmp_path, "trainer"))),
        (
            "headprep",
            HeadPrepTrainer,
            HeadPrepConfig(hp_epochs=0, problem_type="single_label_classification", **arguments(tmp_path)),
        ),
    ):
        trainer = trainer_cls(
            model=bert(BertForTokenClassification), args=args, train_dataset=data, data_collator=collator
        )
        trainer.train()
        results[name] = ([r["loss"] for r in trainer.state.log_history if "loss" in r], trainer.model.state_dict())
    (losses, weights), (hp_losses, hp_weights) = results["trainer"], results["headprep"]
    assert hp_losses == pytest.approx(losses, rel=1e-6)
    assert all(torch.allclose(weights[k], hp_weights[k], atol=1e-6) for k in weights)


def test_per_token_labels_of_different_lengths_are_checked():
    datasets = pytest.importorskip("datasets")
    from headprep_hf.labels import check_labels, check_task_labels

    rows = Rows(token_labels=True).rows
    column = datasets.Dataset.from_list(rows)
    check_labels(column, 3, "train_dataset")  # ragged, every label in range: accepted
    check_labels(Rows(token_labels=True), 3, "train_dataset")  # read item by item
    bad = [dict(r) for r in rows]
    bad[5]["labels"] = [*bad[5]["labels"][:-1], 7]
    with pytest.raises(ValueError, match=r"train_dataset\[5\] has label 7, outside the 3 classes"):
        check_labels(datasets.Dataset.from_list(bad), 3, "train_dataset")
    # Per-token labels cannot be multi-task labels: refused with the problem type that fits.
    floats = datasets.Dataset.from_dict({"labels": [[0.0, 1.0], [1.0], [0.0, 0.0, 1.0]]})
    with pytest.raises(ValueError, match=r"different lengths .*'single_label_classification'"):
        check_task_labels(floats, 2, "train_dataset", "multi_label_classification")


# ---------------------------------------------------------------------------------------------- 4: energy after HP


def test_token_energy_from_the_last_hp_epoch_matches_plain_torch(tmp_path):
    data = Rows(token_labels=True)
    collator = DataCollatorForTokenClassification(tokenizer())
    trainer = HeadPrepTrainer(
        model=bert(BertForTokenClassification),
        args=HeadPrepConfig(hp_epochs=1, hp_learning_rate=3e-2, **arguments(tmp_path)),
        train_dataset=data,
        data_collator=collator,
    )
    trainer.probe_head()
    dynamics = trainer.dynamics
    assert dynamics["energy_source"] == "last HP epoch's head inputs"
    energy, accuracy, p0 = _token_energy_by_hand(trainer.model, data, collator)
    assert dynamics["energy"] == pytest.approx(energy, abs=1e-6)
    assert dynamics["hp_train_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert dynamics["p0_mean"] == pytest.approx(p0, abs=1e-6)


def test_head_that_the_model_pools_after_falls_back_to_the_model_pass(tmp_path):
    # GPT-2's `score` runs on every token and the model keeps each sequence's last one after it: the head alone does
    # not give the model's logits, so the energy comes from the pass over the model. Dynamic padding: the drift
    # features are the mean over each sequence's tokens (`score`'s inputs). `score` is found without head_modules (it
    # had to be named).
    data, collator = Rows(), DataCollatorWithPadding(tokenizer())
    trainer = HeadPrepTrainer(
        model=gpt2(),
        args=HeadPrepConfig(hp_epochs=1, hp_learning_rate=3e-2, **arguments(tmp_path, per_device_train_batch_size=1)),
        train_dataset=data,
        data_collator=collator,
    )
    assert trainer.split.head_names == ["score"]
    trainer.probe_head()
    dynamics, model = trainer.dynamics, trainer.model.eval()
    assert dynamics["energy_source"] == "backbone pass"
    energy, correct, features = [], [], []
    with torch.no_grad():
        for i in range(len(data)):
            batch = _one(collator, data[i])
            out = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
            )
            p = out.logits[0].softmax(-1)
            label = int(batch["labels"][0])
            energy.append((F.one_hot(torch.tensor(label), 3).float() - p).norm().item())
            correct.append(float(p.argmax().item() == label))
            features.append(out.hidden_states[-1][0].mean(0))
    assert dynamics["energy"] == pytest.approx(float(np.mean(energy)), abs=1e-6)
    assert dynamics["hp_train_accuracy"] == pytest.approx(float(np.mean(correct)), abs=1e-6)
    torch.testing.assert_close(trainer.measurements.z0, torch.stack(features), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- 5: BatchEncoding


def _first_update(tmp_path, name, batch_size, accumulation, data, collator):
    model = bert(num_labels=3, problem_type="multi_label_classification")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # one batch of 4 and two of 2 see the same computation
    before = model.classifier.weight.detach().clone()
    args = HeadPrepConfig(
        hp_epochs=0,
        track_dynamics=False,
        problem_type="multi_label_classification",
        max_steps=1,
        optim="sgd",
        **arguments(
            tmp_path,
            name,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            learning_rate=1.0,
        ),
    )
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    return trainer.model.classifier.weight.detach() - before


def test_batch_encoding_micro_batches_average_over_every_item_of_the_step(tmp_path):
    # DataCollatorWithPadding returns a BatchEncoding (a UserDict): the count of present labels over the step's
    # micro-batches must still be made, or the update is a mean of micro-batch means. Samples have 3 or 1 present
    # labels, so the two differ.
    data = Rows(n=8, label_kind="multi")
    for i, row in enumerate(data.rows):
        if i % 2:
            row["labels"] = [row["labels"][0], float("nan"), float("nan")]
    collator = DataCollatorWithPadding(tokenizer())
    whole = _first_update(tmp_path, "whole", 4, 1, data, collator)
    accumulated = _first_update(tmp_path, "accumulated", 2, 2, data, collator)
    assert whole.abs().max() > 1e-3
    torch.testing.assert_close(accumulated, whole, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- 6: pre_classifier


def _probe_head_changes(tmp_path, model, train_set, collator=None):
    """HP (one epoch) of `model`: the trainer, and the state_dict keys HP changed."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = HeadPrepTrainer(
        model=model,
        args=HeadPrepConfig(hp_epochs=1, hp_learning_rate=1e-2, **arguments(tmp_path)),
        train_dataset=train_set,
        data_collator=collator,
    )
    trainer.probe_head()
    return trainer, {k for k, v in trainer.model.state_dict().items() if not torch.equal(before[k], v)}


def test_distilbert_pre_classifier_is_part_of_the_head_and_trains_in_hp(tmp_path):
    assert find_split(bert()).head_names == ["classifier"]  # detection of other models unchanged
    assert find_split(roberta()).head_names == ["classifier"]
    model = distilbert()
    assert find_split(model).head_names == ["pre_classifier", "classifier"]
    trainer, changed = _probe_head_changes(tmp_path, model, Rows(), DataCollatorWithPadding(tokenizer()))
    assert changed == {k for k in model.state_dict() if k.startswith(("pre_classifier.", "classifier."))}
    # z is pre_classifier's input, the first token's vector
    with torch.no_grad():
        batch = DataCollatorWithPadding(tokenizer())([Rows()[0]])
        hidden = (
            trainer.model.eval()
            .distilbert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            .last_hidden_state
        )
    torch.testing.assert_close(trainer.measurements.z0[0], hidden[0, 0], rtol=1e-5, atol=1e-6)


def test_cached_hp_of_sequences_padded_per_batch_names_the_fix(tmp_path):
    # Cached HP keeps the raw head inputs as one tensor: sequences padded per batch cannot be, and the error says so
    # (it was torch.cat's size mismatch); padded to one length they are cached and HP runs.
    data = Rows(token_labels=True)
    for collator, works in (
        (DataCollatorForTokenClassification(tokenizer()), False),
        (DataCollatorForTokenClassification(tokenizer(), padding="max_length", max_length=16), True),
    ):
        trainer = HeadPrepTrainer(
            model=bert(BertForTokenClassification),
            args=HeadPrepConfig(hp_epochs=1, hp_cache_features=True, **arguments(tmp_path)),
            train_dataset=data,
            data_collator=collator,
        )
        if works:
            trainer.probe_head()
            assert trainer.dynamics["energy"] is not None
        else:
            with pytest.raises(ValueError, match=r"differ in shape between batches.*padding='max_length'"):
                trainer.probe_head()


def test_a_checkpoint_whose_head_was_found_otherwise_names_the_cause(tmp_path, monkeypatch):
    # An HP checkpoint of DistilBERT written by the previous version (head: classifier alone) failed to resume with
    # torch's "loaded state dict contains a parameter group that doesn't match the size of optimizer's group".
    from transformers import TrainerCallback

    import headprep_hf.split as split

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    settings = dict(hp_epochs=1, hp_learning_rate=1e-2, save_strategy="steps", save_steps=2, track_dynamics=False)
    with monkeypatch.context() as old_version:
        old_version.setattr(split, "_PRE_CLASSIFIER", "no_such_module")  # the previous version's head detection
        HeadPrepTrainer(model=distilbert(), args=HeadPrepConfig(**arguments(tmp_path, **settings)),
                        train_dataset=Rows(), data_collator=DataCollatorWithPadding(tokenizer()),
                        callbacks=[Stop()]).train()  # fmt: skip
    resumed = HeadPrepTrainer(model=distilbert(), args=HeadPrepConfig(**arguments(tmp_path, **settings)),
                              train_dataset=Rows(), data_collator=DataCollatorWithPadding(tokenizer()))  # fmt: skip
    with pytest.raises(ValueError, match=r"checkpoint-2's optimizer state does not fit.*'pre_classifier', "
                       r"'classifier'.*pre_classifier joined the head"):  # fmt: skip
        resumed.train(resume_from_checkpoint=True)


def test_the_head_exchange_of_sequences_padded_per_batch(tmp_path):
    # The exchange kept every backbone's head inputs of a whole set as one tensor: sequences padded to each batch's
    # longest could not be stacked ("head inputs differ in shape"), so a text sweep with sweep_exchange=True failed
    # after all its jobs had run (RoBERTa's head takes the sequence itself). Each batch is now consumed as it comes.
    # Every cell is checked against the model itself: the finetuned backbone of row i with the finetuned head of
    # column j, evaluated in eval mode.
    import json

    from safetensors.torch import load_file

    from headprep_hf import SweepConfig, TauSweep
    from headprep_hf.metrics import accuracy_metrics

    collator = DataCollatorWithPadding(tokenizer())
    train, val = Rows(24), Rows(12, seed=1)
    config = SweepConfig(
        **arguments(tmp_path, "sweep", per_device_eval_batch_size=5),
        sweep_taus=[0, 1],
        sweep_exchange=True,
        sweep_report=False,
        sweep_progress=False,
        measure_batch_size=5,  # (padded lengths differ between these batches of Rows' 3..11-token sequences)
    )
    sweep = TauSweep(roberta(), config, train, val, data_collator=collator, compute_metrics=accuracy_metrics())
    result = sweep.run()
    exchange = json.loads((tmp_path / "sweep" / "exchange.json").read_text())
    states = [load_file(str(tmp_path / "sweep" / r["output_dir"] / "model.safetensors")) for r in result["results"]]
    head = [k for k in states[0] if k.startswith("classifier.")]
    for name, dataset, matrix in (("train", train, "train_accuracy"), ("validation", val, "validation_accuracy")):
        for i, backbone in enumerate(states):
            for j, tuned in enumerate(states):
                model = roberta()
                model.load_state_dict({**backbone, **{k: tuned[k] for k in head}})
                model.eval()
                correct = 0
                with torch.no_grad():
                    for start in range(0, len(dataset), 5):
                        batch = collator([dataset[k] for k in range(start, min(start + 5, len(dataset)))])
                        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                        correct += int((logits.argmax(-1) == batch["labels"]).sum())
                assert exchange[matrix][i][j] == pytest.approx(correct / len(dataset), abs=1e-6), (name, i, j)
    assert [exchange["validation_accuracy"][i][i] for i in range(2)] == pytest.approx(
        [r["validation"]["accuracy"] for r in result["results"]], abs=1e-6
    )


def test_a_sweep_over_datasets_datasets_tells_their_labels_apart(tmp_path, caplog):
    # A `datasets.Dataset` (the usual form of text data) exposes no `.labels` array, so the sweep fingerprint described
    # it by its length only: a rerun into the same folder with other data of the same length reused the finished jobs
    # of the first data, mixing two sweeps. Its label columns are now hashed from the Arrow table (no transform runs).
    import logging

    datasets = pytest.importorskip("datasets")
    from headprep_hf import SweepConfig, TauSweep
    from headprep_hf.sweep import describe_data

    def hf(rows):
        return datasets.Dataset.from_list([rows[i] for i in range(len(rows))])

    train, val, other_val = hf(Rows(16)), hf(Rows(8, seed=1)), hf(Rows(8, seed=2))
    assert describe_data(v=val) == describe_data(v=hf(Rows(8, seed=1)))
    assert describe_data(v=val) != describe_data(v=other_val)  # same length, other labels
    assert describe_data(v=val) != describe_data(v=val.select([1, 0, *range(2, 8)]))  # the order is the data's too

    def broken(batch):
        raise AssertionError("the fingerprint ran the dataset's transform")

    assert describe_data(v=val.with_transform(broken)) == describe_data(v=val)
    # token tags as a list of ClassLabel per row (`ner_tags`), under any column name
    tags = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                              "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B"]))})  # fmt: skip
    ner = [datasets.Dataset.from_dict({"tokens": [["a", "b"]] * 2, "ner_tags": t}, features=tags)
           for t in ([[0, 1], [1, 1]], [[0, 1], [0, 1]])]  # fmt: skip
    assert describe_data(v=ner[0])["v"]["labels"] is not None
    assert describe_data(v=ner[0]) != describe_data(v=ner[1])

    def run(eval_dataset):
        config = SweepConfig(**arguments(tmp_path, "sweep"), sweep_taus=[0], sweep_report=False, sweep_progress=False,
                             sweep_metric="loss")  # fmt: skip
        collator = DataCollatorWithPadding(tokenizer())
        return TauSweep(bert(), config, train, eval_dataset, data_collator=collator).run()

    run(val)
    with pytest.raises(ValueError, match="belongs to another sweep"):
        run(other_val)
    # data with no labels to hash (labels only inside the items) keep the old description; continuing such a sweep
    # says that only the length tells the data apart
    config = SweepConfig(**arguments(tmp_path, "plain"), sweep_taus=[0], sweep_report=False, sweep_progress=False,
                             sweep_metric="loss")  # fmt: skip
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="headprep_hf"):
            TauSweep(
                bert(), config, Rows(16), Rows(8, seed=1), data_collator=DataCollatorWithPadding(tokenizer())
            ).run()
    assert any("length only" in r.getMessage() and "validation" in r.getMessage() for r in caplog.records)


def test_a_sweep_exchange_over_a_head_the_model_computes_more_after_is_refused_before_any_job(tmp_path):
    # GPT-2's `score` (now found as the head) runs on every token and the model keeps each sequence's last one
    # after it: the exchange, which applies the head alone, failed with a shape error after every job had run.
    from headprep_hf import SweepConfig, TauSweep

    config = SweepConfig(**arguments(tmp_path, "sweep"), sweep_taus=[0], sweep_exchange=True, sweep_report=False,
                         sweep_progress=False, sweep_metric="loss")  # fmt: skip
    sweep = TauSweep(gpt2(), config, Rows(12), Rows(6, seed=1), data_collator=DataCollatorWithPadding(tokenizer()))
    with pytest.raises(ValueError, match="sweep_exchange=True: the head module 'score'.*sweep_exchange=False"):
        sweep.run()
    assert not (tmp_path / "sweep").exists()  # no job ran, nothing was written


def test_the_exchange_refuses_a_head_tied_to_the_backbone():
    # Heads are swapped into the model in place during the backbone's pass: a head weight sharing its storage with a
    # backbone weight would change the backbone for the batches after.
    from headprep_hf.exchange import _HeadSwap

    net = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    net[1].weight = net[0].weight
    with pytest.raises(ValueError, match="tied to the backbone's"):
        _HeadSwap(net, {0: {"1.weight": torch.zeros(5, 4)}, 1: {"1.weight": torch.ones(5, 4)}})
    untied = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    swap = _HeadSwap(untied, {0: {"1.weight": torch.zeros(5, 4)}, 1: {"1.weight": torch.ones(5, 4)}})
    embedding = untied[0].weight.detach().clone()
    swap.load(1)
    assert torch.equal(untied[1].weight, torch.ones(5, 4)) and torch.equal(untied[0].weight, embedding)


class Seq2SeqRows(torch.utils.data.Dataset):
    """Input ids and target ids (the last two sometimes -100), fixed lengths: a copy task for encoder-decoders and
    causal LMs (`causal=True`: the labels are the input ids themselves, as `DataCollatorForLanguageModeling` gives)."""

    def __init__(self, n=16, causal=False, seed=0):
        rng = np.random.RandomState(seed)
        ids = rng.randint(3, 50, size=(n, 8))
        labels = ids.copy() if causal else ids[:, :6].copy()
        labels[:, -2:][rng.rand(n, 2) < 0.5] = -100
        self.rows = [
            {
                "input_ids": torch.tensor(i),
                "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": torch.tensor(y),
            }
            for i, y in zip(ids, labels)
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=50, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def gpt2_lm():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    config.bos_token_id = config.eos_token_id = None
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("make_model", [t5, gpt2_lm], ids=["t5", "gpt2-lm"])
def test_language_models_train_as_trainer_and_are_not_measured(tmp_path, make_model, caplog):
    # With the default track_dynamics=True, T5 failed before its first update (the energy pass called it without
    # labels, so its decoder had no inputs) and GPT-2's energy paired each position's logits with that position's
    # label, which a causal LM predicts one position later (a random model scored 0.65 "accuracy"). Language models
    # now train as with Trainer, with a warning that the measurements are off.
    data = Seq2SeqRows(causal=make_model is gpt2_lm)
    with caplog.at_level("WARNING", logger="headprep_hf.trainer"):
        results = _run_both(tmp_path, make_model, data, None)
    _assert_same_training(results)
    ours = results["headprep"][2]
    assert "is a generation model" in caplog.text and "HP accuracy and drift are not measured" in caplog.text
    assert "energy" not in ours.dynamics and not ours.track_dynamics


def test_a_generation_models_trainer_keeps_the_callers_arguments(tmp_path):
    # Turning the measurements off made trainer.args a copy: a later change to the caller's arguments (more epochs)
    # did not reach the run, as it does with Trainer. Turned off on the arguments instead, a classifier's trainer
    # given the same arguments afterwards measured nothing. The trainer decides now, for its own model.
    args = HeadPrepConfig(hp_epochs=0, **arguments(tmp_path))
    trainer = HeadPrepTrainer(model=gpt2_lm(), args=args, train_dataset=Seq2SeqRows(causal=True))
    assert trainer.args is args and args.track_dynamics and not trainer.track_dynamics
    args.num_train_epochs = 2
    trainer.train()
    assert trainer.state.epoch == 2 and "energy" not in trainer.dynamics
    classifier = HeadPrepTrainer(
        model=bert(), args=args, train_dataset=Rows(), data_collator=DataCollatorWithPadding(tokenizer())
    )
    classifier.train()
    assert classifier.track_dynamics and classifier.dynamics["energy"] > 0


class SoftRows(Rows):
    """Soft multi-label targets (0.1 / 0.9), as label smoothing or a teacher gives them."""

    def __init__(self):
        super().__init__(n=8, label_kind="multi")
        for row in self.rows:
            row["labels"] = [0.1 + 0.8 * v for v in row["labels"]]


def test_soft_targets_of_a_declared_multi_label_model_train_as_with_trainer(tmp_path):
    # The config declares multi_label_classification (any BERT saved after training does) and the model computes its
    # own BCE: the label check, run because the problem type was declared, refused "label 0.1 ... binary tasks take
    # 0, 1 or NaN", where Trainer trains.
    results = _run_both(
        tmp_path,
        lambda: bert(problem_type="multi_label_classification"),
        SoftRows(),
        DataCollatorWithPadding(tokenizer()),
    )
    _assert_same_training(results)


class Waves(torch.utils.data.Dataset):
    def __init__(self, n=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 400, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_values": self.x[i], "labels": self.y[i]}


def wav2vec2(cls_name="Wav2Vec2ForSequenceClassification"):
    import transformers

    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
        classifier_proj_size=8, num_labels=3, xvector_output_dim=8, tdnn_dim=(8, 8), tdnn_kernel=(3, 1),
        tdnn_dilation=(1, 1),
    )  # fmt: skip
    return getattr(transformers, cls_name)(config)


def test_speech_classifiers_projector_is_part_of_the_head_and_trains_in_hp(tmp_path):
    # Wav2Vec2ForSequenceClassification (and HuBERT, WavLM, Whisper's audio classifier) project the frames with a
    # `projector` that is new with the `classifier` on a base checkpoint. It stayed frozen at its random weights in HP
    # (HP trained a linear layer on a random projection); now HP trains both.
    assert find_split(wav2vec2("Wav2Vec2ForXVector")).head_names == ["classifier"]  # its projector feeds the TDNN
    model = wav2vec2()
    assert find_split(model).head_names == ["projector", "classifier"]
    trainer, changed = _probe_head_changes(tmp_path, model, Waves())
    assert changed == {k for k in model.state_dict() if k.startswith(("projector.", "classifier."))}
    assert trainer.dynamics["energy"] > 0


def test_head_probing_a_head_tied_to_the_embeddings_names_the_tie(tmp_path):
    # GPT-2's lm_head shares its weight with the input embeddings (listed under transformer.wte): HP of
    # head_modules=["lm_head"] had nothing to train and failed in backward ("element 0 of tensors does not require
    # grad"). Refused when the trainer is built, naming the tie; untied, HP trains the head alone.
    args = HeadPrepConfig(hp_epochs=1, head_modules=["lm_head"], **arguments(tmp_path))
    with pytest.raises(ValueError, match="tied to backbone parameters.*tie_word_embeddings=False"):
        HeadPrepTrainer(model=gpt2_lm(), args=args, train_dataset=Seq2SeqRows(causal=True))
    model = gpt2_lm()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=Seq2SeqRows(causal=True))
    trainer.probe_head()
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"lm_head.weight"}


class _HeadListedFirst(torch.nn.Module):
    """A classifier whose weight is the embedding's, registered before it: PyTorch lists the shared weight under
    `classifier.weight`, so it looked like the head's own and HP trained the embedding with it."""

    def __init__(self):
        super().__init__()
        self.classifier = torch.nn.Linear(4, 100, bias=False)
        self.embed = torch.nn.Embedding(100, 4)
        self.embed.weight = self.classifier.weight
        self.mix = torch.nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.classifier(self.mix(self.embed(input_ids)).mean(1))[:, :3]}


def test_a_tied_weight_listed_under_the_heads_name_is_refused_too(tmp_path):
    # The first check looked at which parameters PyTorch lists under the head's names; a weight shared with the
    # backbone and met first under the head's name passed, and HP then moved the backbone (the embedding) too.
    model = _HeadListedFirst()
    assert [n for n, _ in model.named_parameters()][0] == "classifier.weight"
    args = HeadPrepConfig(hp_epochs=1, head_modules=["classifier"], **arguments(tmp_path))
    with pytest.raises(ValueError, match=r"tied to backbone parameters \(classifier.weight and embed.weight;"):
        HeadPrepTrainer(
            model=model, args=args, train_dataset=Rows(), data_collator=DataCollatorWithPadding(tokenizer())
        )
    # hp_epochs=0 (FT only) trains the model as it is, as Trainer does
    HeadPrepTrainer(model=model, args=HeadPrepConfig(hp_epochs=0, head_modules=["classifier"], **arguments(tmp_path)))


class _TiedTo(torch.nn.Module):
    """`tied`'s weight is the embedding's (registered first: listed under `tied`'s name), beside a head
    `classifier`."""

    def __init__(self, tied_is_head: bool):
        super().__init__()
        self.tied = torch.nn.Linear(4, 100, bias=False)
        self.embed = torch.nn.Embedding(100, 4)
        self.embed.weight = self.tied.weight
        self.mix = torch.nn.Linear(4, 4)
        self.classifier = torch.nn.Linear(100, 3)
        self.tied_is_head = tied_is_head

    def forward(self, input_ids, attention_mask=None):
        h = self.mix(self.embed(input_ids)).mean(1)
        return {"logits": self.tied(h)[:, :3] if self.tied_is_head else self.classifier(self.tied(h))}


def test_a_reinitialised_module_tied_to_the_backbone_is_refused_with_an_mlp_head_too(tmp_path):
    # With head_type="mlp" the tie check was skipped as a whole: the MLP replaces the head, but a re-initialised
    # module keeps its weight, and HP moved the frozen embedding it shares (by 0.999 in the review's run).
    for head_type in ("linear", "mlp"):
        args = HeadPrepConfig(hp_epochs=1, head_modules=["classifier"], reinit_modules=["tied"], head_type=head_type,
                              **arguments(tmp_path))  # fmt: skip
        with pytest.raises(ValueError, match=r"tied to backbone parameters \(tied.weight and embed.weight;"):
            HeadPrepTrainer(model=_TiedTo(tied_is_head=False), args=args)


class _TiedHeadLayer(torch.nn.Module):
    """A two-layer head whose FIRST layer is tied to the embedding (an MLP head replaces only the last)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 4)
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 100, bias=False), torch.nn.ReLU(), torch.nn.Linear(100, 3))
        self.head[0].weight = self.embed.weight

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.head(self.embed(input_ids).mean(1))}


def test_a_tied_head_layer_that_an_mlp_head_keeps_is_refused(tmp_path):
    # head_type="mlp" replaces the head's last linear layer only; the check looked at the re-initialised modules
    # alone, and HP moved the frozen embedding through the first layer (by 0.0397 in the review's run).
    args = HeadPrepConfig(hp_epochs=1, head_modules=["head"], head_type="mlp", **arguments(tmp_path))
    with pytest.raises(ValueError, match=r"tied to backbone parameters \(head.0.weight and embed.weight;"):
        HeadPrepTrainer(model=_TiedHeadLayer(), args=args)


@pytest.mark.parametrize("hp_epochs", [0, 1])
def test_a_frozen_module_to_reinitialise_is_refused(tmp_path, hp_epochs):
    # Re-drawn, then kept frozen by the stages (they keep the user's requires_grad=False, PEFT's outside its
    # adapters): random layers that never train.
    model = _TiedTo(tied_is_head=False)
    model.mix.requires_grad_(False)
    args = HeadPrepConfig(
        hp_epochs=hp_epochs, head_modules=["classifier"], reinit_modules=["mix"], **arguments(tmp_path)
    )
    with pytest.raises(
        ValueError, match=r"reinit_modules would re-draw parameters that do not train \(mix.weight, mix.bias:"
    ):
        HeadPrepTrainer(model=model, args=args)


def test_modules_without_parameters_may_be_reinitialised(tmp_path):
    # The frozen-module refusal took a module without parameters (a BatchNorm without affine weights, whose running
    # statistics re-initialising resets) for a frozen one.
    model = _TiedTo(tied_is_head=False)
    model.norm = torch.nn.BatchNorm1d(4, affine=False)
    args = HeadPrepConfig(hp_epochs=1, head_modules=["classifier"], reinit_modules=["norm"], **arguments(tmp_path))
    HeadPrepTrainer(model=model, args=args)


def test_a_lora_layers_frozen_base_is_not_reinitialised(tmp_path):
    # reinit_modules=["mix"] with LoRA on mix: its adapter factors train, so "any parameter trains" let it through,
    # and the frozen base_layer was re-drawn at random for good.
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_TiedTo(tied_is_head=False), peft.LoraConfig(r=2, target_modules=["mix"]))
    args = HeadPrepConfig(hp_epochs=1, head_modules=["classifier"], reinit_modules=["mix"], **arguments(tmp_path))
    with pytest.raises(
        ValueError, match=r"re-draw parameters that do not train \(base_model.model.mix.base_layer.weight"
    ):
        HeadPrepTrainer(model=model, args=args)


@pytest.mark.parametrize("call", ["probe_head", "finetune"])
def test_a_single_stage_call_checks_the_labels_of_its_own_stage(tmp_path, call):
    # A model with its own BCE and soft targets: probe_head() was refused because ft_label_smoothing (a setting of the
    # stage it does not run) makes the trainer's loss check for 0/1 targets; finetune() the same way for HP's.
    other = {"ft_label_smoothing": 0.1} if call == "probe_head" else {"hp_label_smoothing": 0.1}
    args = HeadPrepConfig(hp_epochs=1, track_dynamics=False, **other, **arguments(tmp_path))
    model, collator = bert(problem_type="multi_label_classification"), DataCollatorWithPadding(tokenizer())
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=SoftRows(), data_collator=collator)
    getattr(trainer, call)()
    assert trainer.state.global_step > 0


def test_a_peft_copy_of_a_tied_head_trains_alone_in_hp(tmp_path):
    # PEFT's modules_to_save trains an untied copy of the head; the frozen original stays tied to the embedding and
    # HP leaves it alone. The tie check counted the frozen original and refused the run.
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(
        _TiedTo(tied_is_head=True), peft.LoraConfig(r=2, target_modules=["mix"], modules_to_save=["tied"])
    )
    embedding = model.base_model.model.embed.weight.detach().clone()
    args = HeadPrepConfig(hp_epochs=1, head_modules=["tied"], track_dynamics=False, **arguments(tmp_path))
    trainer = HeadPrepTrainer(
        model=model, args=args, train_dataset=Rows(), data_collator=DataCollatorWithPadding(tokenizer())
    )
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.probe_head()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"base_model.model.tied.modules_to_save.default.weight"}
    assert torch.equal(model.base_model.model.embed.weight, embedding)


def test_a_head_without_parameters_is_named(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Identity())
    args = HeadPrepConfig(hp_epochs=1, head_modules=["1"], **arguments(tmp_path))
    with pytest.raises(ValueError, match=r"trains \['1'\], which hold no parameters"):
        HeadPrepTrainer(model=model, args=args)


class Questions(torch.utils.data.Dataset):
    """Multiple choice: 3 choices of 6 tokens per question."""

    def __init__(self, n=8):
        rng = np.random.RandomState(0)
        self.rows = [
            {"input_ids": torch.as_tensor(rng.randint(2, 100, size=(3, 6))), "labels": int(rng.randint(3))}
            for _ in range(n)
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_a_multiple_choice_probe_counts_questions_and_the_rows_it_averages(tmp_path):
    # The head of BertForMultipleChoice sees one pooled vector per choice: num_probe_samples said 6 for a probe of
    # 2 questions. It counts samples now; num_probe_rows counts the rows the drift averages over.
    from transformers import BertForMultipleChoice

    torch.manual_seed(0)
    model = BertForMultipleChoice(BertConfig(**TINY, max_position_embeddings=64))
    args = HeadPrepConfig(hp_epochs=1, drift_probe_samples=2, **arguments(tmp_path))
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=Questions())
    trainer.train()
    dynamics = trainer.dynamics
    assert dynamics["num_probe_samples"] == 2 and dynamics["num_probe_rows"] == 6 and dynamics["drift"]
    assert dynamics["num_energy_samples"] == 8


def test_seq2seq_trainer_combined_with_headprep_generates_as_seq2seq_trainer(tmp_path):
    # README "Subclassing": HeadPrepConfig + Seq2SeqTrainingArguments, HeadPrepTrainer + Seq2SeqTrainer.
    from dataclasses import dataclass

    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    @dataclass
    class Config(HeadPrepConfig, Seq2SeqTrainingArguments):
        pass

    class Seq2SeqHeadPrepTrainer(HeadPrepTrainer, Seq2SeqTrainer):
        pass

    data = Seq2SeqRows()
    common = dict(predict_with_generate=True, generation_max_length=6)
    results = []
    for trainer_cls, args in (
        (Seq2SeqTrainer, Seq2SeqTrainingArguments(**arguments(tmp_path, "plain", **common))),
        (Seq2SeqHeadPrepTrainer, Config(hp_epochs=0, **arguments(tmp_path, "ours", **common))),
    ):
        trainer = trainer_cls(model=t5(), args=args, train_dataset=data, eval_dataset=data)
        trainer.train()
        results.append((trainer, trainer.predict(data, max_length=6)))
    (plain, plain_out), (ours, ours_out) = results
    for (name, a), b in zip(plain.model.state_dict().items(), ours.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert np.array_equal(plain_out.predictions, ours_out.predictions)
    assert plain_out.metrics["test_loss"] == ours_out.metrics["test_loss"]


def test_classifiers_of_encoder_decoder_families_are_measured(tmp_path):
    # The language-model rule first read `config.is_encoder_decoder`, which BART's and T5's sequence classifiers and
    # WhisperForAudioClassification share with their generation models: their measurements were turned off although
    # their logits are per-sample class scores. Only generation models (`can_generate()`) are language models.
    import transformers

    from headprep_hf.split import language_model_kind

    torch.manual_seed(0)
    whisper = transformers.WhisperForAudioClassification(
        transformers.WhisperConfig(
            num_mel_bins=8, d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
            decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, max_source_positions=8,
            classifier_proj_size=8, num_labels=3, vocab_size=50,
        )
    )  # fmt: skip
    assert whisper.config.is_encoder_decoder and language_model_kind(whisper) is None
    assert language_model_kind(t5()) == "encoder-decoder" and language_model_kind(gpt2_lm()) == "causal"
    assert language_model_kind(gpt2()) is None  # GPT2ForSequenceClassification

    class Mels(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"input_features": torch.randn(8, 16, generator=g), "labels": i % 3}

    trainer, changed = _probe_head_changes(tmp_path, whisper, Mels())
    assert trainer.args.track_dynamics and trainer.dynamics["energy"] > 0
    assert changed == {k for k in whisper.state_dict() if k.startswith(("projector.", "classifier."))}


def test_cached_head_probing_of_a_two_module_head_names_the_ways_out(tmp_path):
    # The speech classifiers' head is [projector, classifier], with the mean over frames between them: "wrap them into
    # one module" (the only advice before) cannot work there. The error names uncached HP and head_modules.
    args = HeadPrepConfig(hp_epochs=1, hp_cache_features=True, **arguments(tmp_path))
    trainer = HeadPrepTrainer(model=wav2vec2(), args=args, train_dataset=Waves())
    with pytest.raises(
        ValueError, match=r"head_modules=\['classifier'\].*hp_cache_features=False.*sweep_exchange=False"
    ):
        trainer.probe_head()
    args = HeadPrepConfig(hp_epochs=1, hp_cache_features=True, head_modules=["classifier"], **arguments(tmp_path, "b"))
    HeadPrepTrainer(model=wav2vec2(), args=args, train_dataset=Waves()).probe_head()  # the named way out runs
