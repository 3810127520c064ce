"""Real segmentation data paths: local PASCAL VOC (torchvision VOCSegmentation), `datasets` sets, stardist's nuclei
image; the joint image/mask transform; per-sample errors; the paper preset."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_timm
from PIL import Image

from headprep_hf.data import (
    SegmentationTransform,
    load_hf_segmentation,
    load_nuclei_segmentation,
    load_voc_segmentation,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _pair(rng: np.random.Generator, h: int, w: int, cls: int) -> tuple[Image.Image, Image.Image]:
    """An RGB image whose red channel is bright where the mask has class `cls` (a rectangle), with a 255 border."""
    mask = np.zeros((h, w), dtype=np.uint8)
    r0, c0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    mask[r0 : r0 + h // 2, c0 : c0 + w // 3] = cls
    image = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    image[mask == cls, 0] = 250
    mask[r0, c0 : c0 + w // 3] = 255  # VOC marks object borders 255
    return Image.fromarray(image), palette_png(mask)


def palette_png(mask: np.ndarray) -> Image.Image:
    """A palette ("P") image of class ids, as VOC ships them (256 distinct colours, so no index is merged on save)."""
    image = Image.fromarray(mask, mode="P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    return image


def make_voc(root: Path, n_train: int = 10, n_val: int = 4, seed: int = 0) -> Path:
    """The on-disk layout of the extracted VOCtrainval tar (JPEG images, palette PNG masks, split lists)."""
    rng = np.random.default_rng(seed)
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    names = {"train": [f"2007_{i:06d}" for i in range(n_train)], "val": [f"2008_{i:06d}" for i in range(n_val)]}
    for split, ids in names.items():
        for k, name in enumerate(ids):
            image, mask = _pair(rng, 30 + 2 * k, 44 - k, 1 + k % 20)
            image.save(base / "JPEGImages" / f"{name}.jpg", quality=95)
            mask.save(base / "SegmentationClass" / f"{name}.png")
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc_loader_splits_shapes_and_joint_resize(tmp_path):
    root = make_voc(tmp_path / "voc")
    splits = load_voc_segmentation(str(root), crop_size=32, validation_split=0.2, seed=0)
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [8, 2, 4]
    for dataset in splits.values():
        item = dataset[0]
        assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
        assert item["labels"].shape == (32, 32) and item["labels"].dtype == torch.int64
        assert set(item["labels"].unique().tolist()) <= {0, *range(1, 21), 255}
    # Eval: the long side becomes 32 and the padding is ignored; palette indices (not colours) are the classes.
    test_item = splits["test"][0]  # val image 0: 30x44 -> 22x32, padded with 10 ignored rows
    assert (test_item["labels"][22:] == 255).all() and (test_item["labels"][:22] != 255).any()
    assert 1 in test_item["labels"].unique().tolist()
    # The image and the mask moved together: bright red exactly where the object class is (interior pixels).
    red = test_item["pixel_values"][0][:22] > 1.5
    obj = test_item["labels"][:22] == 1
    assert (red == obj).float().mean() > 0.95


def test_train_transform_is_joint_and_seeded():
    rng = np.random.default_rng(1)
    image, mask = _pair(rng, 48, 64, 3)
    transform = SegmentationTransform(40, mean=(0.0,) * 3, std=(1.0,) * 3, train=True, scale_range=(0.8, 1.6))
    agreements = []
    for seed in range(8):
        torch.manual_seed(seed)
        x, y = transform(image, mask)
        assert x.shape == (3, 40, 40) and y.shape == (40, 40)
        valid = y != 255
        agreements.append(((x[0] > 0.6) == (y == 3))[valid].float().mean().item())
    assert min(agreements) > 0.95  # a flip or crop applied to only one of them would break this
    torch.manual_seed(3)
    first = transform(image, mask)
    torch.manual_seed(3)
    again = transform(image, mask)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("train", [True, False])
def test_uint8_transform_normalised_on_the_model_matches_the_float_pipeline(train):
    from headprep_hf.data import attach_input_normalization

    rng = np.random.default_rng(2)
    image, mask = _pair(rng, 37, 53, 3)  # odd sizes: resize, pad and (train) crop all happen
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    as_float = SegmentationTransform(40, mean, std, train=train, scale_range=(0.5, 1.5))
    as_uint8 = SegmentationTransform(40, mean, std, train=train, scale_range=(0.5, 1.5), normalize=False)
    for seed in range(4):
        torch.manual_seed(seed)
        x_float, y_float = as_float(image, mask)
        torch.manual_seed(seed)
        x_uint8, y_uint8 = as_uint8(image, mask)
        assert x_uint8.dtype == torch.uint8 and torch.equal(y_uint8, y_float)  # the same geometry, the same mask
        model = attach_input_normalization(torch.nn.Identity(), mean, std, input_name=None)
        normalised = model(x_uint8.unsqueeze(0))[0]  # what the backbone receives
        # uint8 rounding of the resized pixels (and of the mean colour of the padding): < 1/255 before normalising
        assert (normalised - x_float).abs().max() <= 1.0 / 255 / min(std)
    with pytest.raises(ValueError, match="uint8 loading takes 8-bit images"):
        as_uint8(torch.rand(3, 20, 20), mask)


def test_voc_bad_samples_name_the_index(tmp_path):
    from conftest import make_config

    from headprep_hf import HeadPrepTrainer
    from headprep_hf.models import TimmDeepLabV3

    with pytest.raises(FileNotFoundError, match="voc_root=.*VOCdevkit/VOC2012/JPEGImages"):
        load_voc_segmentation(str(tmp_path / "nowhere"))
    root = make_voc(tmp_path / "voc")
    base = root / "VOCdevkit" / "VOC2012"
    names = (base / "ImageSets/Segmentation/train.txt").read_text().split()
    splits = load_voc_segmentation(str(root), crop_size=32, validation_split=0.2, seed=0)
    model = TimmDeepLabV3("test_resnet", 21)
    args = make_config(tmp_path, ignore_index=255, per_device_train_batch_size=4)

    # A label the 21-class head does not have, in the 4th training image (after the seeded hold-out).
    target = names[int(np.sort(np.random.default_rng(0).permutation(10)[2:])[3])]
    mask = np.array(Image.open(base / "SegmentationClass" / f"{target}.png"))
    mask[2, 2] = 40
    palette_png(mask).save(base / "SegmentationClass" / f"{target}.png")
    with pytest.raises(ValueError, match=r"train_dataset\[3\] has mask label 40, outside the 21 classes"):
        HeadPrepTrainer(model=model, args=args, train_dataset=splits["train"]).probe_head()

    palette_png(mask[:-3]).save(base / "SegmentationClass" / f"{target}.png")
    with pytest.raises(
        ValueError, match=r"train_dataset\[3\] \(.*\.jpg, .*\.png\): the mask is \d+x\d+ but the image is"
    ):
        HeadPrepTrainer(model=model, args=args, train_dataset=splits["train"]).probe_head()
    with pytest.raises(ValueError, match=rf"train\[3\] \(.*{target}\.jpg, .*{target}\.png\): the mask is"):
        splits["train"][
            3
        ]  # (the files named: VOC's validation is a shuffled hold-out, an index alone is hard to trace)
    (base / "JPEGImages" / f"{target}.jpg").unlink()
    with pytest.raises(ValueError, match=rf"train\[3\]: .*{target}\.jpg: the file does not exist\. Restore the file"):
        splits["train"][3]


def test_hf_segmentation_from_disk_and_from_parquet(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    pairs = [_pair(rng, 24, 28, 1 + i % 2) for i in range(12)]
    masks = [Image.fromarray(np.array(p[1])) for p in pairs]  # mode "L": the palette indices as grey values
    data = datasets.Dataset.from_dict({"image": [p[0] for p in pairs], "annotation": masks, "id": list(range(12))})
    data = data.cast_column("image", datasets.Image()).cast_column("annotation", datasets.Image())
    data.save_to_disk(str(tmp_path / "disk"))  # a Dataset: no validation split -> seeded hold-out
    splits = load_hf_segmentation(str(tmp_path / "disk"), crop_size=16, validation_split=0.25)
    assert [len(splits["train"]), len(splits["validation"])] == [9, 3] and "test" not in splits
    item = splits["validation"][0]
    assert item["pixel_values"].shape == (3, 16, 16) and set(item["labels"].unique().tolist()) <= {0, 1, 2, 255}

    folder = tmp_path / "parquet"
    folder.mkdir()
    data.select(range(8)).to_parquet(str(folder / "train.parquet"))
    data.select(range(8, 12)).to_parquet(str(folder / "validation.parquet"))
    splits = load_hf_segmentation(str(folder), crop_size=16, reduce_labels=True)
    assert [len(splits["train"]), len(splits["validation"])] == [8, 4]
    raw = np.array(pairs[8][1])
    _, reduced = splits["validation"]._raw(0)
    assert (reduced[raw == 0] == 255).all() and (reduced[raw == 255] == 255).all()
    assert (reduced[(raw > 0) & (raw < 255)] == raw[(raw > 0) & (raw < 255)] - 1).all()
    with pytest.raises(ValueError, match="mask_column='segm' is not a column"):
        load_hf_segmentation(str(folder), mask_column="segm")


def test_an_image_level_label_column_is_not_taken_for_the_masks(tmp_path):
    # `label` comes first among the mask column names. A set with a `ClassLabel` of one class per image (a scene
    # category) beside its `annotation` masks had its `label` taken as the masks: every sample then failed the check.
    import datasets

    rng = np.random.default_rng(0)
    pairs = [_pair(rng, 24, 28, 1 + i % 2) for i in range(8)]
    columns = {"image": [p[0] for p in pairs], "annotation": [Image.fromarray(np.array(p[1])) for p in pairs]}
    features = datasets.Features(
        {"image": datasets.Image(), "annotation": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
    )
    data = datasets.Dataset.from_dict({**columns, "label": [i % 2 for i in range(8)]}, features=features)
    data.save_to_disk(str(tmp_path / "disk"))
    splits = load_hf_segmentation(str(tmp_path / "disk"), crop_size=16, validation_split=0.25)
    splits["train"].check_samples(3)
    _, mask = splits["validation"]._raw(0)
    assert mask.shape == (24, 28)
    # Only per-image classes: named as such.
    only = datasets.Dataset.from_dict(
        {"image": columns["image"], "label": [i % 2 for i in range(8)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
    )
    only.save_to_disk(str(tmp_path / "only"))
    with pytest.raises(ValueError, match=r"found no mask column .* \(label: one class per image, not a mask\)"):
        load_hf_segmentation(str(tmp_path / "only"), crop_size=16)


def test_nuclei_image_from_stardist():
    pytest.importorskip("stardist", reason="optional data: pip install stardist")
    splits = load_nuclei_segmentation(tile_size=64)
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [48, 8, 8]
    masks = torch.stack([splits["test"][i]["labels"] for i in range(8)])
    assert set(masks.unique().tolist()) == {0, 1}
    assert 0.05 < (masks == 1).float().mean() < 0.6  # nuclei cover part of the field of view
    image = splits["test"][0]["pixel_values"]
    assert image.shape == (3, 64, 64) and torch.equal(image[0], image[1])


def test_the_nuclei_task_takes_a_given_crop_size_as_its_tile_size(tmp_path):
    # --crop_size was capped at 64 without a word: --crop_size 128 still gave 48 tiles of 64 px.
    pytest.importorskip("stardist", reason="optional data: pip install stardist")
    from safetensors.torch import save_file

    from headprep_hf.tasks.segmentation import SegmentationArguments, load_segmentation

    save_file(tiny_timm().state_dict(), str(tmp_path / "w.safetensors"))
    common = dict(model_name_or_path=str(tmp_path / "w.safetensors"), model_arch="test_resnet", nuclei=True)
    default = load_segmentation(SegmentationArguments(**common), seed=0)
    assert len(default.train_dataset) == 48 and default.train_dataset[0]["pixel_values"].shape[-1] == 64
    given = load_segmentation(SegmentationArguments(**common, crop_size=128), seed=0)
    assert len(given.train_dataset) == 8 and given.train_dataset[0]["pixel_values"].shape[-1] == 128
    with pytest.raises(ValueError, match="--crop_size 200 with --nuclei: .* at most 170"):
        load_segmentation(SegmentationArguments(**common, crop_size=200), seed=0)


def test_paper_preset_parses(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(RECIPES))
    import semantic_segmentation as recipe

    from headprep_hf.cli import parse_with_config

    argv = ["--config", str(RECIPES / "configs" / "deeplabv3_voc_paper.yaml"), "--voc_root", str(tmp_path)]
    script_args, args = parse_with_config(recipe.make_parser(), [*argv, "--output_dir", str(tmp_path / "o")])
    assert script_args.voc_root == str(tmp_path) and script_args.model_name_or_path == "timm/resnet50.tv_in1k"
    assert (args.hp_learning_rate, args.per_device_train_batch_size, args.optim.value) == (0.3, 16, "sgd")
    assert args.optim_args == "momentum=0.9" and args.weight_decay == 0.0 and args.hp_lr_scheduler_type == "constant"
    with pytest.raises(SystemExit) as exit_info:  # (argparse's one-line error for what the dataclass refuses)
        parse_with_config(recipe.make_parser(), [*argv, "--nuclei", "true", "--output_dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "at most one data source" in capsys.readouterr().err


def test_recipe_names_a_wrong_voc_root_before_loading_the_model(tmp_path):
    """A wrong --voc_root fails before the backbone loads (or, with no model given, before the source model
    pretrains for minutes): here the model path does not exist either, and the error is the data's."""
    import sys

    sys.path.insert(0, str(RECIPES))
    import semantic_segmentation as recipe

    from headprep_hf.cli import parse_with_config

    argv = ["--voc_root", str(tmp_path / "nowhere"), "--model_name_or_path", str(tmp_path / "no_model")]
    argv += ["--use_cpu", "true", "--report_to", "none", "--output_dir", str(tmp_path / "run")]
    with pytest.raises(FileNotFoundError, match="voc_root=.*nowhere.*does not hold PASCAL VOC 2012"):
        recipe.main(*parse_with_config(recipe.make_parser(), argv))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_recipe_on_local_voc_with_a_local_backbone(tmp_path, capsys):
    import sys

    import timm

    sys.path.insert(0, str(RECIPES))
    import semantic_segmentation as recipe

    from headprep_hf.cli import parse_with_config

    torch.manual_seed(0)
    backbone = tmp_path / "backbone"
    timm.models.save_for_hf(timm.create_model("test_resnet", num_classes=5), str(backbone))
    root = make_voc(tmp_path / "voc", n_train=12, n_val=4)
    argv = ["--voc_root", str(root), "--model_name_or_path", str(backbone), "--crop_size", "32"]
    argv += ["--hp_epochs", "1", "--num_train_epochs", "1", "--use_cpu", "true", "--report_to", "none"]
    argv += ["--output_dir", str(tmp_path / "run"), "--disable_tqdm", "true", "--save_strategy", "no"]
    argv += ["--per_device_train_batch_size", "4", "--drift_probe_samples", "8"]
    metrics = recipe.main(*parse_with_config(recipe.make_parser(), argv))
    assert 0.0 <= metrics["test_mean_iou"] <= 1.0 and metrics["energy"] > 0 and metrics["drift_sq_dist"] > 0
    assert "test mIoU" in capsys.readouterr().out


def test_16_bit_images_keep_their_top_8_bits_on_both_paths():
    from headprep_hf.data.segmentation import SegmentationDataset

    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    mask = np.zeros((32, 32), np.uint8)
    eight = Image.fromarray((ramp >> 8).astype(np.uint8))
    for normalize in (False, True):
        transform = SegmentationTransform(32, train=False, normalize=normalize)
        dataset = SegmentationDataset(lambda i: (Image.fromarray(ramp), mask), 1, transform, "train")
        assert Image.fromarray(ramp).mode == "I;16"
        # As the same picture in 8 bits (Pillow's convert("RGB") would clip every value above 255 to 255).
        assert torch.equal(dataset[0]["pixel_values"], transform(eight, mask)[0])
    # A uint16 array on the float path uses its full range, as torchvision's to_dtype(scale=True) does.
    from torchvision.transforms.v2 import functional as TF

    transform = SegmentationTransform(32, mean=(0.0,) * 3, std=(1.0,) * 3, train=False)
    expected = TF.to_dtype(torch.from_numpy(ramp.astype(np.int32)).to(torch.uint16)[None], torch.float32, scale=True)
    assert torch.allclose(transform(ramp, mask)[0][0], expected[0], atol=1e-6)
    with pytest.raises(ValueError, match="dtype int32 has no fixed intensity range"):
        transform(ramp.astype(np.int32), mask)
    dataset = SegmentationDataset(lambda i: (Image.fromarray(ramp.astype(np.int32), "I"), mask), 2, transform, "test")
    with pytest.raises(ValueError, match=r"test\[1\]: image mode 'I'.*convert the image files to 8-bit"):
        dataset[1]


def test_reduce_labels_on_a_mask_value_beyond_its_map_names_the_sample(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    pairs = [_pair(rng, 24, 28, 1) for _ in range(4)]
    masks = [np.array(p[1]).astype(np.int32) for p in pairs]
    masks[3][0, 0] = 300  # an id a 256-entry reduce_labels map cannot take (a 16-bit mask)
    data = datasets.Dataset.from_dict(
        {"image": [p[0] for p in pairs], "annotation": [Image.fromarray(m, "I") for m in masks]}
    )
    data = data.cast_column("image", datasets.Image()).cast_column("annotation", datasets.Image())
    data.save_to_disk(str(tmp_path / "disk"))
    splits = load_hf_segmentation(str(tmp_path / "disk"), crop_size=16, reduce_labels=True, validation_split=0.25)
    train = splits["train"]
    bad = next(i for i in range(len(train)) if (np.asarray(train.load_pair(i)[1]) == 300).any())
    with pytest.raises(ValueError, match=rf"train\[{bad}\] has mask value 300, outside the label map.*Fix the masks"):
        train[bad]
    with pytest.raises(ValueError, match=rf"train_dataset\[{bad}\] has mask value 300"):
        train.check_samples(150, name="train_dataset")


def test_a_truncated_voc_image_names_the_sample_and_file_also_from_a_worker(tmp_path):
    root = make_voc(tmp_path / "voc", n_train=4, n_val=2)
    base = root / "VOCdevkit" / "VOC2012"
    bad = base / "JPEGImages" / "2008_000001.jpg"  # the second of VOC's val: test[1] here
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    splits = load_voc_segmentation(str(root), crop_size=16, validation_split=0.25, normalize=False)
    with pytest.raises(ValueError, match=r"test\[1\]: .*2008_000001\.jpg.*truncated.*remove it .* or re-save it"):
        splits["test"][1]
    loader = torch.utils.data.DataLoader(splits["test"], batch_size=2, num_workers=1)
    with pytest.raises(ValueError, match=r"test\[1\]: .*2008_000001\.jpg"):
        next(iter(loader))


def test_a_transformers_model_folder_is_refused_as_a_segmentation_backbone(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    from headprep_hf.tasks.segmentation import SegmentationArguments, load_segmentation

    folder = tmp_path / "hf_resnet"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(
        folder
    )
    args = SegmentationArguments(model_name_or_path=str(folder))
    with pytest.raises(
        ValueError, match=r"hf_resnet' is a transformers model folder.*needs a timm backbone.*--model_arch"
    ):
        load_segmentation(args, seed=0)


@pytest.mark.parametrize("size", [320, 128, 900])
def test_resized_masks_stay_aligned_with_their_images(size):
    """The image is resampled at pixel centres (bilinear, antialiased); the mask must be too. torch's legacy "nearest"
    samples each output pixel's top-left source pixel, which moved every mask about half an output pixel down and
    right of its image (+0.49 px at 500 -> 320). Measured as the centroid of one object in both, over 20 objects."""
    from headprep_hf.data.segmentation import SegmentationTransform

    h, w, shifts = 375, 500, []
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = np.zeros((h, w), np.int64)
        top, left = rng.integers(0, h - 80), rng.integers(0, w - 80)
        mask[top : top + 60 + rng.integers(0, 7), left : left + 60 + rng.integers(0, 7)] = 1
        image = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, -1)
        x, y = SegmentationTransform(size, train=False, normalize=False)(image, mask)
        new_h, new_w = round(h * size / w), size
        picture, labels = x[0, :new_h, :new_w].double(), (y[:new_h, :new_w] == 1).double()
        for axis in (0, 1):
            index = torch.arange(picture.shape[axis], dtype=torch.float64)
            index = index[:, None] if axis == 0 else index[None, :]
            shifts.append(float((labels * index).sum() / labels.sum() - (picture * index).sum() / picture.sum()))
    assert abs(np.mean(shifts)) < 0.1, np.mean(shifts)


def test_uint8_tensor_images_are_scaled_on_the_float_path():
    """A `load_pair` that returns uint8 tensors: the float pipeline reads them in [0, 1], as the uint8 pipeline does
    (before, 0..255 went through the normalisation unscaled)."""
    from headprep_hf.data.segmentation import SegmentationTransform

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 24, 32), dtype=np.uint8)
    mask = rng.integers(0, 3, (24, 32))
    from_tensor, _ = SegmentationTransform(16, train=False, normalize=True)(torch.from_numpy(pixels), mask)
    from_array, _ = SegmentationTransform(16, train=False, normalize=True)(pixels.transpose(1, 2, 0), mask)
    assert torch.allclose(from_tensor, from_array, atol=1e-6)
    with pytest.raises(ValueError, match="int32 has no fixed intensity range"):
        SegmentationTransform(16, train=False, normalize=True)(torch.from_numpy(pixels.astype(np.int32)), mask)


def test_the_sweep_fingerprint_tells_two_mask_sets_of_one_length_apart():
    # A segmentation set has no label array: the sweep described it by its length only, so a sweep folder continued
    # with corrected masks (same number of pairs) reused the results computed on the old ones.
    from headprep_hf.data.segmentation import SegmentationDataset
    from headprep_hf.sweep import describe_data

    image = Image.fromarray(np.zeros((12, 16, 3), dtype=np.uint8))
    masks = [np.zeros((12, 16), dtype=np.uint8), np.ones((12, 16), dtype=np.uint8)]
    corrected = [masks[0], np.full((12, 16), 2, dtype=np.uint8)]

    def dataset(pairs):
        return SegmentationDataset(lambda i: (image, Image.fromarray(pairs[i])), 2, SegmentationTransform(8), "train")

    before, again, after = (describe_data(train=dataset(p))["train"] for p in (masks, list(masks), corrected))
    assert before == again and before["labels"] is not None
    assert after["labels"] != before["labels"] and after["length"] == before["length"] == 2


def test_the_mask_digest_of_voc_and_datasets_sets_reads_the_masks_alone(tmp_path):
    # The digest read each pair, decoding every image of every split once per sweep start (about 17 s on VOC); the
    # VOC and `datasets` loaders now give the masks alone, with the same values as the pairs (reduce_labels applied).
    import datasets

    from headprep_hf.data.segmentation import SegmentationDataset

    def by_pairs(dataset):
        return SegmentationDataset(dataset.load_pair, len(dataset), dataset.transform, label_map=dataset.label_map)

    voc = load_voc_segmentation(str(make_voc(tmp_path / "voc")), crop_size=16, validation_split=0.2)
    rng = np.random.default_rng(0)
    pairs = [_pair(rng, 24, 28, 1 + i % 2) for i in range(8)]
    data = datasets.Dataset.from_dict({"image": [p[0] for p in pairs], "annotation": [p[1] for p in pairs]})
    data.cast_column("image", datasets.Image()).cast_column("annotation", datasets.Image()).save_to_disk(
        str(tmp_path / "disk")
    )
    hf = load_hf_segmentation(str(tmp_path / "disk"), crop_size=16, reduce_labels=True, validation_split=0.25)
    for dataset in (*voc.values(), *hf.values()):
        assert dataset.load_mask is not None
        assert dataset.label_digest() == by_pairs(dataset).label_digest()
    for image in (tmp_path / "voc").rglob("*.jpg"):
        image.write_bytes(b"not a JPEG")  # a digest that decoded images would fail now
    assert all(isinstance(d.label_digest(), str) for d in voc.values())


def _upside_down_jpeg(pair: tuple[Image.Image, Image.Image], path: Path) -> None:
    """The image stored upside down with EXIF orientation 3 (shown upright), as phone cameras save; its mask kept."""
    exif = Image.Exif()
    exif[0x0112] = 3
    pair[0].transpose(Image.Transpose.ROTATE_180).save(path, exif=exif, quality=95)


def test_an_image_with_an_exif_orientation_is_refused_on_both_paths(tmp_path):
    # `datasets` turned such a JPEG upright when it decoded it and left its PNG mask as stored: every pixel of the
    # pair misaligned, without an error (the VOC loader read the stored pixels). Which grid the mask was drawn on the
    # files do not say: both loaders now refuse the pair, naming the file and the fix.
    import datasets

    rng = np.random.default_rng(0)
    pairs = [_pair(rng, 24, 24, 1) for _ in range(4)]
    folder = tmp_path / "files"
    folder.mkdir()
    for i, pair in enumerate(pairs):
        if i == 1:
            _upside_down_jpeg(pair, folder / f"{i}.jpg")
        else:
            pair[0].save(folder / f"{i}.jpg", quality=95)
        Image.fromarray(np.array(pair[1])).save(folder / f"{i}.png")
    data = datasets.Dataset.from_dict(
        {
            "image": [str(folder / f"{i}.jpg") for i in range(4)],
            "annotation": [str(folder / f"{i}.png") for i in range(4)],
        }
    )
    data = data.cast_column("image", datasets.Image()).cast_column("annotation", datasets.Image())
    data.save_to_disk(str(tmp_path / "disk"))
    splits = load_hf_segmentation(str(tmp_path / "disk"), crop_size=16, validation_split=0.5, seed=0)
    found = []
    for name in ("train", "validation"):
        for i in range(len(splits[name])):
            try:
                splits[name]._raw(i)
            except ValueError as error:
                found.append(str(error))
    assert len(found) == 1 and "1.jpg has an EXIF orientation tag (3" in found[0] and "exif_transpose" in found[0]

    root = make_voc(tmp_path / "voc", n_train=4, n_val=2)
    base = root / "VOCdevkit" / "VOC2012"
    image = Image.open(base / "JPEGImages" / "2008_000000.jpg")
    _upside_down_jpeg((image, None), base / "JPEGImages" / "2008_000000.jpg")
    voc = load_voc_segmentation(str(root), crop_size=16, validation_split=0.25)
    with pytest.raises(ValueError, match=r"test\[0\]: .*2008_000000\.jpg has an EXIF orientation tag \(3"):
        voc["test"][0]


def test_both_loaders_describe_their_files_for_the_sweep_fingerprint(tmp_path):
    # (names and sizes: a VOC copy with other pictures of the same names is other data; the same files elsewhere not)
    import shutil

    root = make_voc(tmp_path / "voc", n_train=4, n_val=2)
    first = load_voc_segmentation(str(root), crop_size=16, validation_split=0.25)["train"].content_digest()
    shutil.copytree(root, tmp_path / "elsewhere" / "voc")
    moved = load_voc_segmentation(str(tmp_path / "elsewhere" / "voc"), crop_size=16, validation_split=0.25)
    assert first is not None and moved["train"].content_digest() == first
    image = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000001.jpg"
    Image.open(image).save(image, quality=40)  # the same picture, re-encoded
    assert load_voc_segmentation(str(root), crop_size=16, validation_split=0.25)["train"].content_digest() != first


def test_a_mode_the_datasets_feature_declares_is_applied_to_the_stored_pixels(tmp_path):
    # (the loader reads the files' stored pixels; `Image(mode="L")` converted them when `datasets` decoded them)
    import datasets

    rng = np.random.default_rng(0)
    pairs = [_pair(rng, 20, 20, 3) for _ in range(4)]  # palette masks
    data = datasets.Dataset.from_dict({"image": [p[0] for p in pairs], "annotation": [p[1] for p in pairs]})
    data = data.cast_column("image", datasets.Image()).cast_column("annotation", datasets.Image(mode="L"))
    data.save_to_disk(str(tmp_path / "disk"))
    splits = load_hf_segmentation(str(tmp_path / "disk"), crop_size=16, validation_split=0.5, seed=0)
    expected = datasets.load_from_disk(str(tmp_path / "disk"))
    for i in range(len(splits["train"])):
        _, mask = splits["train"].load_pair(i)
        assert mask.mode == "L"
    raw_masks = {np.array(expected[i]["annotation"]).tobytes() for i in range(4)}
    assert all(np.array(splits["train"].load_pair(i)[1]).tobytes() in raw_masks for i in range(len(splits["train"])))


def test_a_trainer_ignoring_another_value_than_the_masks_is_named_before_training(tmp_path):
    """The transform pads masks with 255; a trainer at its default ignore_index=-100 on masks that hold no 255 of
    their own passed the check and failed at its first batch with "Target 255 is out of bounds"."""
    from conftest import make_config

    from headprep_hf import HeadPrepTrainer
    from headprep_hf.models import TimmDeepLabV3

    root = make_voc(tmp_path / "voc")
    splits = load_voc_segmentation(str(root), crop_size=32, validation_split=0.2, seed=0)
    trainer = HeadPrepTrainer(
        model=TimmDeepLabV3("test_resnet", 21), args=make_config(tmp_path), train_dataset=splits["train"]
    )
    with pytest.raises(
        ValueError, match=r"marks pixels to ignore .* with 255, and the trainer ignores -100.*--ignore_index 255"
    ):
        trainer.train()
    assert trainer.state.global_step == 0
