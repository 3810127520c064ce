"""Tests for headprep_hf.data: the offline MNIST toy task and the image-folder loader."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from headprep_hf.data import (
    DigitImageDataset,
    build_image_transforms,
    build_pretrain_dataset,
    build_toy_downstream,
    load_image_classification_dataset,
    load_mnist5k,
    resolve_image_data_config,
)


@pytest.fixture(scope="module")
def downstream():
    return build_toy_downstream(seed=0)


def test_load_mnist5k_shapes_and_dtypes():
    images, labels = load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.array_equal(np.bincount(labels), np.full(10, 500))
    assert images.max() == 255 and images.min() == 0


def test_load_mnist5k_returns_independent_copies():
    images, _ = load_mnist5k()
    images[:] = 0
    assert load_mnist5k()[0].max() == 255


def test_pretrain_dataset_splits_and_items():
    splits = build_pretrain_dataset(seed=0)
    assert set(splits) == {"train", "validation"}
    assert (len(splits["train"]), len(splits["validation"])) == (4500, 500)
    assert np.array_equal(np.bincount(splits["validation"].labels), np.full(10, 50))
    item = splits["train"][0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert isinstance(item["labels"], int)
    # Normalized with mean/std 0.5: background is -1 and the three channels are identical.
    assert item["pixel_values"].min() == -1.0 and item["pixel_values"].max() <= 1.0
    assert torch.equal(item["pixel_values"][0], item["pixel_values"][2])


def test_downstream_labels_and_sizes(downstream):
    assert set(downstream) == {"train", "validation", "test"}
    sizes = {name: len(ds) for name, ds in downstream.items()}
    assert sizes == {"train": 900, "validation": 300, "test": 300}
    for ds in downstream.values():
        assert set(np.unique(ds.labels)) == {0, 1, 2}
        assert len(ds.labels) == len(ds) and ds.labels.dtype == np.int64
        # Stratified: equal class counts in every split.
        assert len(set(np.bincount(ds.labels))) == 1
        assert ds[0]["pixel_values"].shape == (3, 32, 32)


def test_downstream_relabels_in_given_class_order():
    # A zero distortion leaves the original pixels, so each image can be traced back to its digit.
    splits = build_toy_downstream(seed=0, classes=(7, 3), rotation_range=(0.0, 0.0), zoom_range=(1.0, 1.0))
    images, labels = load_mnist5k()
    digit_of = {image.tobytes(): int(label) for image, label in zip(images, labels)}
    assert sum(len(ds) for ds in splits.values()) == 1000
    for ds in splits.values():
        assert set(np.unique(ds.labels)) == {0, 1}
        digits = [digit_of[image.tobytes()] for image in ds.images]
        assert np.array_equal(np.where(ds.labels == 0, 7, 3), digits)


def test_downstream_is_deterministic_for_a_seed(downstream):
    again = build_toy_downstream(seed=0)
    for name in ("train", "validation", "test"):
        assert np.array_equal(downstream[name].images, again[name].images)
        assert np.array_equal(downstream[name].labels, again[name].labels)
    other = build_toy_downstream(seed=1)
    assert not np.array_equal(downstream["test"].images, other["test"].images)


def test_downstream_distortion_is_baked_in(downstream):
    images, labels = load_mnist5k()
    originals = images[np.isin(labels, (0, 1, 2))]
    distorted = np.concatenate([downstream[name].images for name in ("train", "validation", "test")])
    # No distorted image equals any original one (with 45-60 degree rotations none can survive).
    original_keys = {image.tobytes() for image in originals}
    assert not any(image.tobytes() in original_keys for image in distorted)


def test_eval_splits_are_deterministic_and_train_augmentation_changes_pixels(downstream):
    val = downstream["validation"]
    assert torch.equal(val[3]["pixel_values"], val[3]["pixel_values"])
    train = downstream["train"]
    assert train.augment
    torch.manual_seed(0)
    first = train[3]["pixel_values"]
    second = train[3]["pixel_values"]
    assert not torch.equal(first, second)
    # Same global seed, same augmentation: seeded runs are reproducible.
    torch.manual_seed(0)
    assert torch.equal(train[3]["pixel_values"], first)


def test_digit_dataset_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        DigitImageDataset(np.zeros((2, 28, 28), dtype=np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        DigitImageDataset(np.zeros((2, 28, 28), dtype=np.uint8), np.zeros(3))


def test_toy_downstream_rejects_bad_classes():
    with pytest.raises(ValueError, match="classes"):
        build_toy_downstream(classes=(1, 1))
    with pytest.raises(ValueError, match="classes"):
        build_toy_downstream(classes=(3, 10))


# --- image folders -------------------------------------------------------------------------------


def _write_image_folder(root, classes=("cat", "dog"), per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


_CONFIG16 = resolve_image_data_config({}, image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _load(tmp_path, **overrides):
    args = dict(
        dataset_name=None,
        train_dir=str(tmp_path / "train"),
        validation_dir=None,
        train_transform=build_image_transforms(_CONFIG16, is_training=True),
        eval_transform=build_image_transforms(_CONFIG16, is_training=False),
        validation_split=0.25,
        seed=0,
        cache_dir=str(tmp_path / "hf_cache"),
    )
    args.update(overrides)
    return load_image_classification_dataset(**args)


def test_image_folder_splits_off_stratified_validation(tmp_path):
    _write_image_folder(tmp_path / "train")
    splits, class_names = _load(tmp_path)
    assert class_names == ["cat", "dog"]
    assert (len(splits["train"]), len(splits["validation"])) == (6, 2)
    assert sorted(splits["validation"].labels.tolist()) == [0, 1]
    for ds in splits.values():
        assert ds.labels.dtype == np.int64
        item = ds[0]
        assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.uint8
        assert item["labels"] == ds.labels[0]
    again, _ = _load(tmp_path)
    assert np.array_equal(again["validation"].labels, splits["validation"].labels)


def test_linked_class_folders_and_pattern_characters_in_a_path_are_read_as_any_folder(tmp_path):
    """`datasets` does not follow a folder linked in (torchvision's ImageFolder and timm do): a validation set whose
    "dog" folder is a symbolic link was read without dogs, silently. A path holding `[` matched nothing."""
    from headprep_hf.data.images import _data_files

    _write_image_folder(tmp_path / "set[1]" / "train")
    _write_image_folder(tmp_path / "elsewhere", classes=("dog",), per_class=2, seed=1)
    _write_image_folder(tmp_path / "data" / "val", classes=("cat",), per_class=2, seed=2)
    # a file name holding pattern characters, and two it would match as a pattern (read once each, all three)
    for name in ("img1.png", "img2.png", "img[12].png"):
        Image.fromarray(np.full((20, 24, 3), len(name), np.uint8)).save(tmp_path / "data" / "val" / "cat" / name)
    os.symlink(tmp_path / "elsewhere" / "dog", tmp_path / "data" / "val" / "dog")
    os.symlink(tmp_path / "data" / "val", tmp_path / "data" / "val" / "cat" / "loop")  # (read once)
    splits, class_names = _load(
        tmp_path, train_dir=str(tmp_path / "set[1]" / "train"), validation_dir=str(tmp_path / "data" / "val")
    )
    assert class_names == ["cat", "dog"] and np.bincount(splits["validation"].labels).tolist() == [5, 2]
    assert len(splits["train"]) == 8
    # Both at once cannot be read by imagefolder (an escaped entry is matched without following links): named
    os.symlink(tmp_path / "elsewhere" / "dog", tmp_path / "set[1]" / "train" / "dog2")
    with pytest.raises(ValueError, match=r"set\[1\]/train' holds linked folders and its path a pattern character"):
        _load(tmp_path, train_dir=str(tmp_path / "set[1]" / "train"), validation_dir=str(tmp_path / "data" / "val"))
    # An ordinary folder keeps datasets' own pattern (and its cache)
    _write_image_folder(tmp_path / "plain")
    assert _data_files(str(tmp_path / "plain")) == os.path.join(str(tmp_path / "plain"), "**")


def test_image_folder_with_validation_dir_and_eval_determinism(tmp_path):
    _write_image_folder(tmp_path / "train")
    _write_image_folder(tmp_path / "val", per_class=2, seed=1)
    splits, class_names = _load(tmp_path, validation_dir=str(tmp_path / "val"))
    assert class_names == ["cat", "dog"]
    assert (len(splits["train"]), len(splits["validation"])) == (8, 4)
    assert np.bincount(splits["validation"].labels).tolist() == [2, 2]
    val = splits["validation"]
    assert torch.equal(val[1]["pixel_values"], val[1]["pixel_values"])
    torch.manual_seed(0)
    draws = [splits["train"][0]["pixel_values"] for _ in range(3)]
    assert not all(torch.equal(draws[0], d) for d in draws[1:])


def test_image_folder_errors_name_the_fix(tmp_path):
    _write_image_folder(tmp_path / "train")
    with pytest.raises(ValueError, match="exactly one"):
        _load(tmp_path, train_dir=None)
    with pytest.raises(ValueError, match="exactly one"):
        _load(tmp_path, dataset_name="cifar10")
    with pytest.raises(ValueError, match="validation_dir='.*missing' is not a folder"):
        _load(tmp_path, validation_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"label_column='nope'.*\['image', 'label'\]"):
        _load(tmp_path, label_column="nope")
    with pytest.raises(ValueError, match=r"image_column='pic'.*\['image', 'label'\]"):
        _load(tmp_path, image_column="pic")
    with pytest.raises(ValueError, match="validation_split"):
        _load(tmp_path, validation_split=0.0)
    with pytest.raises(ValueError, match="test_dir only applies with train_dir"):
        _load(tmp_path, train_dir=None, dataset_name="cifar10", test_dir=str(tmp_path / "train"))
    with pytest.raises(ValueError, match="max_train_samples=0 must be a positive"):
        _load(tmp_path, max_train_samples=0)


def test_image_folder_test_dir_and_sample_limits(tmp_path):
    _write_image_folder(tmp_path / "train", per_class=6)
    _write_image_folder(tmp_path / "val", per_class=3, seed=1)
    _write_image_folder(tmp_path / "test", per_class=2, seed=2)
    splits, _ = _load(
        tmp_path,
        validation_dir=str(tmp_path / "val"),
        test_dir=str(tmp_path / "test"),
        max_train_samples=5,
        max_eval_samples=3,
    )
    assert [len(splits[k]) for k in ("train", "train_eval", "validation", "test")] == [5, 5, 3, 3]
    # train_eval: the same samples as train, read through the eval transform (deterministic, no augmentation).
    assert np.array_equal(splits["train_eval"].labels, splits["train"].labels)
    assert torch.equal(splits["train_eval"][0]["pixel_values"], splits["train_eval"][0]["pixel_values"])


def test_plain_label_columns_get_one_encoding_across_splits():
    import datasets

    from headprep_hf.data.images import _encode_labels

    raw = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"species": ["owl", "cat", "owl", "dog"]}),
        validation=datasets.Dataset.from_dict({"species": ["dog", "cat"]}),
    )
    encoded, class_names = _encode_labels(raw, "species")
    assert class_names == ["cat", "dog", "owl"]
    assert encoded["train"]["species"] == [2, 0, 2, 1] and encoded["validation"]["species"] == [1, 0]
    assert isinstance(encoded["validation"].features["species"], datasets.ClassLabel)


def test_sample_limits_draw_every_class_of_a_class_sorted_folder_as_the_hf_example(tmp_path):
    import datasets

    classes = ("ant", "bee", "cat", "dog")
    _write_image_folder(tmp_path / "train", classes=classes, per_class=10)
    _write_image_folder(tmp_path / "val", classes=classes, per_class=10, seed=1)
    limits = dict(validation_dir=str(tmp_path / "val"), max_train_samples=12, max_eval_samples=12)
    splits, class_names = _load(tmp_path, **limits)
    assert class_names == list(classes)
    for name in ("train", "validation"):
        assert len(splits[name]) == 12 and set(splits[name].labels.tolist()) == {0, 1, 2, 3}
    # The subset of HF's run_image_classification.py: shuffle(seed=seed).select(range(max_train_samples)).
    raw = datasets.load_dataset(
        "imagefolder", data_files={"train": str(tmp_path / "train" / "**")}, cache_dir=str(tmp_path / "hf_cache")
    )
    assert splits["train"].labels.tolist() == raw["train"].shuffle(seed=0).select(range(12))["label"]
    again, _ = _load(tmp_path, **limits)
    assert np.array_equal(again["train"].labels, splits["train"].labels)
    assert all(
        torch.equal(again["validation"][i]["pixel_values"], splits["validation"][i]["pixel_values"]) for i in range(12)
    )


def test_split_folders_at_different_depths_name_the_layout_to_fix(tmp_path):
    _write_image_folder(tmp_path / "train")
    _write_image_folder(tmp_path / "extra" / "val", seed=1)
    # datasets' imagefolder then infers no labels at all; "pass label_column=... (one of [])" is no way out.
    with pytest.raises(ValueError, match=r"<dir>/<class>/<file>.*same depth") as error:
        _load(tmp_path, validation_dir=str(tmp_path / "extra" / "val"))
    assert str(tmp_path / "extra" / "val") in str(error.value) and "train_dir" in str(error.value)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "a.png")
    with pytest.raises(ValueError, match=r"gave no class labels: every image must sit at <dir>/<class>/<file>"):
        _load(tmp_path, train_dir=str(flat))


def test_16_bit_images_keep_their_top_8_bits(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir(parents=True)
    Image.fromarray(ramp).save(tmp_path / "train" / "a" / "grey16.png")
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "train" / "b" / "grey8.png")
    assert Image.open(tmp_path / "train" / "a" / "grey16.png").mode == "I;16"
    config = resolve_image_data_config({}, image_size=16, crop_pct=1.0)
    tf = build_image_transforms(config, is_training=False)
    splits, _ = _load(tmp_path, train_transform=tf, eval_transform=tf, validation_split=0.5)
    items = [ds[0] for ds in (splits["train"], splits["validation"])]
    sixteen, eight = sorted(items, key=lambda item: item["labels"])
    # As the same picture saved in 8 bits (Pillow's convert("RGB") would clip every value above 255 to 255).
    assert torch.equal(sixteen["pixel_values"], eight["pixel_values"])
    assert sixteen["pixel_values"][0, 0].tolist() == (ramp[0] >> 8).tolist()


def test_images_without_a_fixed_range_are_refused_naming_the_file(tmp_path):
    from headprep_hf.data.images import to_rgb

    with pytest.raises(ValueError, match="image mode 'F'.*convert the image files to 8-bit"):
        to_rgb(Image.fromarray(np.zeros((4, 4), np.float32)))
    _write_image_folder(tmp_path / "train", per_class=2)
    Image.fromarray(np.full((20, 24), 70000, np.int32), mode="I").save(tmp_path / "train" / "dog" / "wide.tif")
    splits, _ = _load(tmp_path, validation_split=0.5)
    messages = []
    for name in ("train", "validation"):
        for i in range(len(splits[name])):
            try:
                splits[name][i]
            except ValueError as error:
                messages.append(str(error))
    assert len(messages) == 1 and "wide.tif" in messages[0] and "image mode 'I'" in messages[0]


def test_a_truncated_image_names_split_index_file_and_fix_also_from_a_worker(tmp_path):
    _write_image_folder(tmp_path / "train", per_class=2)
    _write_image_folder(tmp_path / "val", per_class=2, seed=1)
    for path in (tmp_path / "val" / "dog").iterdir():
        path.unlink()
    for k in range(2):  # JPEGs: Pillow opens a truncated one and fails while decoding it
        Image.fromarray(np.full((20, 24, 3), 100 * k, np.uint8)).save(tmp_path / "val" / "dog" / f"{k}.jpg")
    bad = tmp_path / "val" / "dog" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    splits, _ = _load(tmp_path, validation_dir=str(tmp_path / "val"))
    validation = splits["validation"]
    index = 3  # imagefolder orders the files: cat/0, cat/1, dog/0, dog/1
    assert validation.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"validation\[3\] \(.*1\.jpg\).*truncated.*remove it .* or re-save it"):
        validation[index]
    loader = torch.utils.data.DataLoader(validation, batch_size=4, num_workers=1)
    with pytest.raises(ValueError, match=r"validation\[3\] \(.*1\.jpg\)"):
        next(iter(loader))


def test_a_class_folder_only_a_test_or_validation_folder_has_is_named(tmp_path):
    # imagefolder takes the class names of every split's folders together: `test/ant` (or a typo such as `val/Dog`)
    # silently became a head output without a training image, and every such test image an error.
    _write_image_folder(tmp_path / "train", classes=("cat", "dog", "zebra"))
    _write_image_folder(tmp_path / "test", classes=("ant", "dog"), per_class=2)
    with pytest.raises(ValueError, match=r"test_dir='.*test' has class folder\(s\) \['ant'\] that train_dir=.*"
                       r"\(its classes: \['cat', 'dog', 'zebra'\]\)"):  # fmt: skip
        _load(tmp_path, test_dir=str(tmp_path / "test"))
    _write_image_folder(tmp_path / "val", classes=("Dog",), per_class=2)
    with pytest.raises(ValueError, match=r"validation_dir='.*val' has class folder\(s\) \['Dog'\]"):
        _load(tmp_path, validation_dir=str(tmp_path / "val"))


def test_a_dataset_test_split_without_labels_is_left_out_with_a_warning(tmp_path):
    # Hub test splits whose labels are withheld hold -1 (imagenet-1k's): the run crashed with torch's IndexError when
    # it evaluated them, after training, with the validation results unwritten.
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})

    def split(labels):
        images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in labels]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    folder = tmp_path / "hub_like"
    folder.mkdir()
    split([0, 1] * 4).to_parquet(str(folder / "train.parquet"))
    split([0, 1]).to_parquet(str(folder / "validation.parquet"))
    split([-1, -1, -1]).to_parquet(str(folder / "test.parquet"))
    with pytest.warns(UserWarning, match="test split of '.*hub_like' has no labels"):
        splits, _ = _load(tmp_path, train_dir=None, dataset_name=str(folder))
    assert "test" not in splits and len(splits["validation"]) == 2


def _saved_splits(tmp_path, **splits):
    """A `save_to_disk` DatasetDict of 20x24 photos-like images; each split `(labels, ClassLabel names or None)`:
    None saves the split without a label column."""
    import datasets

    rng = np.random.default_rng(0)
    parts = {}
    for name, (labels, names) in splits.items():
        images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in labels]
        if names is None:
            parts[name] = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
        else:
            features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
            parts[name] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    folder = tmp_path / "saved"
    datasets.DatasetDict(parts).save_to_disk(str(folder))
    return folder


def test_splits_with_their_own_class_label_are_scored_by_class_name(tmp_path):
    """Splits saved apart may number their classes apart: a validation set without "bird" calls cat 0 and dog 1.
    Its ids were read as train's (bird, cat): the model was scored against the wrong classes without a word."""
    folder = _saved_splits(
        tmp_path, train=([0, 1, 2] * 3, ["bird", "cat", "dog"]), validation=([0, 0, 1, 1], ["cat", "dog"])
    )
    splits, names = _load(tmp_path, train_dir=None, dataset_name=str(folder))
    assert names == ["bird", "cat", "dog"]
    assert [names[label] for label in splits["validation"].labels] == ["cat", "cat", "dog", "dog"]
    folder = _saved_splits(tmp_path, train=([0, 1] * 3, ["cat", "dog"]), validation=([0, 1], ["cat", "fox"]))
    with pytest.raises(ValueError, match=r"'validation' split has class\(es\) \['fox'\].*\['cat', 'dog'\]"):
        _load(tmp_path, train_dir=None, dataset_name=str(folder))


def test_a_split_without_a_label_column_is_named(tmp_path):
    """A test split saved without labels is left out with a warning (as one whose labels are withheld); a
    validation split without them is refused, naming it. Both failed with "Column 'label' doesn't exist"."""
    train = ([0, 1] * 4, ["cat", "dog"])
    folder = _saved_splits(tmp_path, train=train, validation=([0, 1], ["cat", "dog"]), test=([0, 0, 0], None))
    with pytest.warns(UserWarning, match="test split of '.*saved' has no 'label' column: it is not evaluated"):
        splits, _ = _load(tmp_path, train_dir=None, dataset_name=str(folder))
    assert "test" not in splits and len(splits["validation"]) == 2
    folder = _saved_splits(tmp_path, train=train, validation=([0, 0], None))
    with pytest.raises(ValueError, match="'validation' split of '.*saved' has no 'label' column.*tau"):
        _load(tmp_path, train_dir=None, dataset_name=str(folder))


def test_integer_label_values_take_their_classes_from_the_training_split(tmp_path):
    # A label column of plain integers (a `Value`, not a ClassLabel) was encoded over every split: a withheld test
    # split's -1 became class '-1', every label moved up by one, and the unlabelled test split was evaluated.
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})

    def split(labels):
        images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in labels]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    folder = tmp_path / "values"
    folder.mkdir()
    split([0, 1, 2] * 2).to_parquet(str(folder / "train.parquet"))
    split([2, 0]).to_parquet(str(folder / "validation.parquet"))
    split([-1, -1]).to_parquet(str(folder / "test.parquet"))
    with pytest.warns(UserWarning, match="test split of '.*values' has no labels"):
        splits, class_names = _load(tmp_path, train_dir=None, dataset_name=str(folder))
    assert class_names == ["0", "1", "2"] and "test" not in splits
    assert splits["train"].labels.tolist() == [0, 1, 2] * 2 and splits["validation"].labels.tolist() == [2, 0]
    signs = tmp_path / "signs"  # -1 among other values is a class (-1/+1 labels), not a withheld label
    signs.mkdir()
    split([-1, 1] * 3).to_parquet(str(signs / "train.parquet"))
    split([-1, -1]).to_parquet(str(signs / "validation.parquet"))  # (all -1, and -1 a trained class: labelled)
    splits, class_names = _load(tmp_path, train_dir=None, dataset_name=str(signs), cache_dir=str(tmp_path / "c3"))
    assert class_names == ["-1", "1"] and splits["validation"].labels.tolist() == [0, 0]
    split([7, 0]).to_parquet(str(folder / "validation.parquet"))  # a class no training image has
    with pytest.raises(
        ValueError, match=r"the 'validation' split has label value\(s\) \[7\].*without a training image"
    ):
        _load(tmp_path, train_dir=None, dataset_name=str(folder), cache_dir=str(tmp_path / "hf_cache2"))


def test_an_empty_class_folder_and_a_single_class_are_named(tmp_path):
    # An empty class folder was silently no class (the head one output short of the folders); a single class folder
    # was refused with a message blaming the folder layout (<dir>/<class>/<file>), which it followed.
    _write_image_folder(tmp_path / "train")
    (tmp_path / "train" / "fox").mkdir()
    (tmp_path / "train" / "fox" / "notes.txt").write_text("to do")
    with pytest.raises(ValueError, match=r"train_dir='.*train' has class folder\(s\) \['fox'\] without an image"):
        _load(tmp_path)
    (tmp_path / "train" / "fox" / "notes.txt").unlink()
    (tmp_path / "train" / "fox").rmdir()
    (tmp_path / "train" / "__MACOSX" / "cat").mkdir(parents=True)  # (not data to `datasets`, nor to the check)
    (tmp_path / "train" / "__MACOSX" / "cat" / "._0.png").write_bytes(b"x")
    assert _load(tmp_path, cache_dir=str(tmp_path / "c4"))[1] == ["cat", "dog"]
    _write_image_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(ValueError, match=r"train_dir='.*one' has one class folder \('cat'\).*at least two"):
        _load(tmp_path, train_dir=str(tmp_path / "one"))


def test_a_hub_dataset_this_machine_cannot_reach_is_refused_in_words(monkeypatch, tmp_path):
    # datasets printed a 10-frame traceback ending in "Couldn't reach 'cifar10' on the Hub"; the flag is named now,
    # with the offline ways. A save_to_disk folder loads (load_dataset refuses one).
    import datasets
    import huggingface_hub

    from headprep_hf.data.images import load_hf_dataset

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"dataset_name='someone/not-here' is not a local folder, and not a dataset .*"
                       r"save_to_disk folder\. Set HF_HUB_OFFLINE=1"):  # fmt: skip
        load_hf_dataset("someone/not-here", None, str(tmp_path / "cache"))
    datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(tmp_path / "saved"))
    assert load_hf_dataset(str(tmp_path / "saved"), None, None)["train"]["x"] == [1, 2]


def test_a_dataset_without_a_label_column_lists_its_columns_and_the_flag():
    # "pass label_column=... (one of [])": an empty list, no column named, Python syntax for a command-line user.
    import datasets

    from headprep_hf.data.images import _find_label_column

    images_only = datasets.Features({"image": datasets.Image()})
    with pytest.raises(ValueError, match=r"the columns: \['image'\]\); the dataset has no column besides the images"):
        _find_label_column(images_only, None, "image")
    with_text = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    with pytest.raises(ValueError, match=r"label_column=\.\.\. \(--label_column; one of \['caption'\]\)"):
        _find_label_column(with_text, None, "image")
