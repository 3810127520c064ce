"""Segmentation (DeepLabV3, the whole ASPP head as task head): stages, per-pixel energy, cached HP, bad input."""

import math

import numpy as np
import pytest
import torch
from conftest import clone_state, make_config
from torch.utils.data import Dataset

from headprep_hf import HeadPrepTrainer, find_split
from headprep_hf.models import TimmDeepLabV3, build_torchvision_deeplabv3

IGNORE = 255
NUM_CLASSES = 3


class TinySegmentation(Dataset):
    """Random 3x32x32 images; the mask is the class of a bright square (background 0) with an ignored border."""

    def __init__(self, n: int = 12, seed: int = 0, mask_size: int = 32):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.masks = torch.zeros(n, mask_size, mask_size, dtype=torch.long)
        for i in range(n):
            c = 1 + i % (NUM_CLASSES - 1)
            r0, c0 = (int(v) for v in torch.randint(0, 16, (2,), generator=g))
            self.x[i, c, r0 : r0 + 12, c0 : c0 + 12] += 2.0
            self.masks[i, r0 : r0 + 12, c0 : c0 + 12] = c
            self.masks[i, :1, :] = IGNORE
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.masks[i]}


def tiny_deeplab(seed: int = 0) -> TimmDeepLabV3:
    torch.manual_seed(seed)
    return TimmDeepLabV3("test_resnet", NUM_CLASSES)


def _config(tmp_path, **overrides):
    values = dict(
        ignore_index=IGNORE, per_device_train_batch_size=4, per_device_eval_batch_size=4, drift_probe_samples=6
    )
    values.update(overrides)
    return make_config(tmp_path, **values)


def test_split_is_the_whole_segmentation_head():
    split = find_split(tiny_deeplab())
    assert split.head_names == ["classifier"] and split.num_classes == NUM_CLASSES
    torchvision_model = build_torchvision_deeplabv3(num_classes=21)
    assert find_split(torchvision_model).head_names == ["classifier"]
    with pytest.raises(ValueError, match="aux_loss=False"):
        from torchvision.models.segmentation import deeplabv3_resnet50

        find_split(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True))


def test_hp_freezes_the_resnet_and_ft_moves_it(tmp_path):
    train = TinySegmentation()
    trainer = HeadPrepTrainer(model=tiny_deeplab(), args=_config(tmp_path), train_dataset=train)
    model, split = trainer.model, trainer.split
    backbone0 = clone_state(split.backbone_state(model))
    head0 = clone_state(dict(split.head_parameters(model)))
    assert any("running_var" in k for k in backbone0)
    trainer.probe_head()
    after = split.backbone_state(model)
    assert all(torch.equal(backbone0[k], after[k]) for k in backbone0)
    assert any(not torch.equal(head0[k], v) for k, v in split.head_parameters(model))
    trainer.finetune()
    after = split.backbone_state(model)
    assert any(not torch.equal(backbone0[k], after[k]) for k in backbone0 if k.endswith("weight"))
    assert trainer.dynamics["drift"][-1]["sq_dist"] > 0


def test_energy_is_the_mean_over_valid_pixels(tmp_path):
    train = TinySegmentation(10)
    trainer = HeadPrepTrainer(model=tiny_deeplab(), args=_config(tmp_path, hp_epochs=1), train_dataset=train)
    trainer.probe_head()
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(train.x)["out"]
    probs = logits.softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, NUM_CLASSES)
    labels = train.masks.reshape(-1)
    valid = labels != IGNORE
    one_hot = torch.nn.functional.one_hot(labels[valid], NUM_CLASSES).float()
    energy = (one_hot - probs[valid]).norm(dim=1).mean().item()
    accuracy = (probs[valid].argmax(dim=1) == labels[valid]).double().mean().item()
    assert trainer.dynamics["energy"] == pytest.approx(energy, rel=1e-5)
    assert trainer.dynamics["hp_train_accuracy"] == pytest.approx(accuracy, rel=1e-6)
    # the drift features are the backbone output map averaged over space
    assert trainer.measurements.z0.shape == (6, model.backbone.feature_info.channels()[-1])


def test_cached_hp_equals_uncached_for_the_dense_head(tmp_path):
    train = TinySegmentation()
    heads = []
    for cached in (False, True):
        args = _config(tmp_path / str(cached), hp_epochs=2, hp_cache_features=cached, track_dynamics=False)
        model = tiny_deeplab()
        for module in model.modules():  # dropout draws from the RNG, which the two paths use differently
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        trainer = HeadPrepTrainer(model=model, args=args, train_dataset=train)
        trainer.probe_head()
        heads.append(trainer.hp_state_dict())
    for key in heads[0]:
        torch.testing.assert_close(heads[1][key], heads[0][key], rtol=1e-5, atol=1e-6)


def test_bad_masks_name_the_sample(tmp_path):
    bad_label = TinySegmentation()
    bad_label.masks[5, 10, 10] = 7
    with pytest.raises(ValueError, match=r"train_dataset\[5\] has label 7"):
        HeadPrepTrainer(model=tiny_deeplab(), args=_config(tmp_path), train_dataset=bad_label).probe_head()

    class Mismatched(TinySegmentation):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "labels": item["labels"][:16, :16]} if i == 3 else item

    with pytest.raises(
        ValueError, match=r"train_dataset\[3\]: the mask 'labels' is 16x16 but 'pixel_values' is 32x32"
    ):
        HeadPrepTrainer(model=tiny_deeplab(), args=_config(tmp_path), train_dataset=Mismatched()).probe_head()


def test_segmentation_metrics_against_a_hand_count():
    from transformers import EvalPrediction

    from headprep_hf.metrics import segmentation_metrics

    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]]).numpy()
    preds = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 1]]]).numpy()
    metrics = segmentation_metrics(3, ignore_index=255)(EvalPrediction(predictions=preds, label_ids=labels))
    # class 0: tp 1, union {0,1,5} = 3 -> 1/3; class 1: tp 2, union {1,2,3} = 3 -> 2/3; class 2: tp 1, union 2 -> 1/2
    assert metrics["iou_0"] == pytest.approx(1 / 3) and metrics["iou_1"] == pytest.approx(2 / 3)
    assert metrics["mean_iou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(4 / 6)  # ignored pixels (predicted 0 and 1) do not count
    # no labelled pixel at all: 0/0 is NaN (it was 0.0, which a sweep ranked as a real, worst score)
    unlabelled = np.full_like(labels, 255)
    metrics = segmentation_metrics(3, ignore_index=255)(EvalPrediction(predictions=preds, label_ids=unlabelled))
    assert math.isnan(metrics["mean_iou"]) and math.isnan(metrics["pixel_accuracy"])


def test_batched_segmentation_metrics_equal_the_whole_sets_through_the_trainer(tmp_path):
    # batch_eval_metrics=True (the recipe's default): Trainer hands one batch at a time and the pixel counts are
    # added up, so no evaluation holds every mask of the set. The metrics must be the whole-set call's, also with a
    # last batch of another size (10 masks in batches of 4), and a second evaluation must start from zero.
    from headprep_hf.metrics import argmax_logits, segmentation_metrics

    def evaluate(trainer):
        metrics = trainer.evaluate()
        return {k: v for k, v in metrics.items() if not k.endswith(("runtime", "per_second", "preparation_time"))}

    results = []
    for batched in (False, True):
        trainer = HeadPrepTrainer(
            model=tiny_deeplab(), args=_config(tmp_path / str(batched), batch_eval_metrics=batched),
            eval_dataset=TinySegmentation(10, seed=3), compute_metrics=segmentation_metrics(NUM_CLASSES, IGNORE),
            preprocess_logits_for_metrics=argmax_logits,
        )  # fmt: skip
        results += [evaluate(trainer), evaluate(trainer)]
    assert "eval_mean_iou" in results[0] and "eval_iou_2" in results[0]
    assert results[1] == results[0] and results[2] == results[0] and results[3] == results[0]


def test_batched_segmentation_metrics_add_up_reset_and_name_labels_outside_the_head():
    from transformers import EvalPrediction

    from headprep_hf.metrics import segmentation_metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(7, 5, 6))
    labels[rng.random(labels.shape) < 0.2] = 255
    labels[5:, 3:] = -100  # (Trainer's padding of masks of another height)
    logits = rng.normal(size=(7, 3, 5, 6)).astype(np.float32)
    compute = segmentation_metrics(3, ignore_index=255)
    whole = compute(EvalPrediction(predictions=logits, label_ids=labels))
    for chunks in ([slice(0, 3), slice(3, 7)], [slice(0, 1), slice(1, 2), slice(2, 7)]):
        for i, chunk in enumerate(chunks):  # (torch tensors, as Trainer gives them in this mode)
            last = i == len(chunks) - 1
            out = compute(EvalPrediction(torch.from_numpy(logits[chunk]), torch.from_numpy(labels[chunk])), last)
            assert out == (whole if last else {})
    # An evaluation that raised part-way leaves its counts; reset() clears them.
    compute(EvalPrediction(logits[:3], labels[:3]), compute_result=False)
    assert compute(EvalPrediction(logits, labels), compute_result=True) != whole
    compute(EvalPrediction(logits[:3], labels[:3]), compute_result=False)
    compute.reset()
    assert compute(EvalPrediction(logits, labels), compute_result=True) == whole
    # A label at or above the head's classes (not ignore_index) is named, batched or not (np.bincount's reshape
    # failed on it before).
    labels[0, 0, :2] = 7
    with pytest.raises(ValueError, match=r"2 labelled pixels of the 7 evaluated masks have a class id at or above "):
        compute(EvalPrediction(logits, labels))
    with pytest.raises(ValueError, match=r"2 labelled pixels of the 7 evaluated masks .* num_classes=3 and are not"):
        compute(EvalPrediction(torch.from_numpy(logits), torch.from_numpy(labels)), True)


def test_derived_digit_masks():
    from headprep_hf.data import build_digit_segmentation

    splits = build_digit_segmentation(seed=0, classes=(3, 7), canvas_size=36)
    train = splits["train"]
    item = train[0]
    assert item["pixel_values"].shape == (3, 36, 36) and item["labels"].shape == (36, 36)
    values = set(item["labels"].unique().tolist())
    assert values <= {0, 1, 2, 255} and 0 in values and 255 in values
    expected_class = 1 + (3, 7).index(int(train.digits[0]))
    assert expected_class in values and (3 - expected_class) not in values  # one digit per canvas
    stroke = item["pixel_values"][0] >= 0.0  # intensity >= 0.5 after (x - 0.5) / 0.5
    assert torch.equal(item["labels"] == expected_class, stroke)
    again = build_digit_segmentation(seed=0, classes=(3, 7), canvas_size=36)["train"][0]
    assert torch.equal(again["labels"], item["labels"])


@pytest.mark.slow
def test_segmentation_recipe_and_sweep_task(tmp_path, capsys, shared_cache):
    from conftest import run_recipe_and_sweep

    tiny = ["--source_epochs", "1", "--cache_dir", str(shared_cache), "--use_cpu", "true"]
    tiny += ["--num_train_epochs", "1", "--toy_classes", "0", "1", "--canvas_size", "32"]  # 2 digits on 32 px: quick
    metrics, sweep = run_recipe_and_sweep("semantic_segmentation", "segmentation", tiny, tmp_path, probe_samples=32)
    assert 0.0 <= metrics["validation_mean_iou"] <= 1.0 and metrics["energy"] > 0 and metrics["drift_sq_dist"] > 0
    assert "validation mIoU" in capsys.readouterr().out
    assert sweep["selection_metric"] == "mean_iou" and sweep["complete"] and sweep["task"]["name"] == "segmentation"


def test_aspp_rates_follow_the_output_stride():
    """DeepLabV3's ASPP rates are (12, 24, 36) at output stride 8 and (6, 12, 18) at 16: torchvision's default kept the
    former at 16, where on a 320 px crop's 20x20 map the two widest branches were 1x1 convolutions. Other strides are
    refused."""
    from torch import nn

    for stride, rates in ((8, (12, 24, 36)), (16, (6, 12, 18))):
        model = TimmDeepLabV3("test_resnet", 3, output_stride=stride)
        dilations = [
            m.dilation[0] for m in model.classifier.modules() if isinstance(m, nn.Conv2d) and m.dilation[0] > 1
        ]
        assert tuple(dilations) == rates
    with pytest.raises(ValueError, match="output_stride must be 8 .* or 16, got 32"):
        TimmDeepLabV3("test_resnet", 3, output_stride=32)
