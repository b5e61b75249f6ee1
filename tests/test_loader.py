"""The challenge loader (README "Using the challenge data") on small fixtures written like the
real files."""
import json
import os
import shutil
import zipfile

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from conftest import write_challenge_folder
from dataloaders import load_challenge, make_split
from dataloaders.datasets import LabeledSlices, UnlabeledSlices, geometric_augmentation, \
    intensity_augmentation, normalization_stats, strong_views
from utils.config import load_config
from utils.errors import InputError


def make_arrays(n=12, size=8, labeled=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(labeled):  # image i carries class (i % 3) + 1 in a square at (i, i)
        masks[i, i % size:i % size + 3, 1:4] = i % 3 + 1
    return images, masks


@pytest.fixture
def folder(tmp_path):
    images, masks = make_arrays()
    write_challenge_folder(tmp_path, images, masks)
    return tmp_path, images, masks


def test_loads_arrays_in_numeric_order(folder):
    root, images, masks = folder
    data = load_challenge(root)
    assert data.train_names == [f"{i}.png" for i in range(12)]   # 10.png after 9.png
    assert data.train_images.dtype == np.uint8 and data.train_images.shape == (12, 8, 8)
    np.testing.assert_array_equal(data.train_images, images)
    np.testing.assert_array_equal(data.train_masks, masks)
    assert data.num_classes == 55 and data.test_images is None and data.test_masks is None
    assert data.labeled_indices.tolist() == [0, 1, 2, 3, 4]
    # no annotated_labels.json: the ids present are the annotated ones
    assert data.annotated.shape == (12, 55)
    assert [np.flatnonzero(row).tolist() for row in data.annotated[:4]] == [[1], [2], [3], [1]]
    assert not data.annotated[5:].any()


def test_masks_follow_the_csv_column_order(tmp_path):
    images, masks = make_arrays()
    order = [f"{i}.png" for i in (3, 0, 11, 1, 2, 4, 5, 6, 7, 8, 9, 10)]
    write_challenge_folder(tmp_path, images[[3, 0, 11, 1, 2, 4, 5, 6, 7, 8, 9, 10]],
                           masks[[3, 0, 11, 1, 2, 4, 5, 6, 7, 8, 9, 10]], names=order)
    data = load_challenge(tmp_path)
    assert data.train_names == order
    for name, image, mask in zip(data.train_names, data.train_images, data.train_masks):
        i = int(name.split(".")[0])
        np.testing.assert_array_equal(image, images[i])
        np.testing.assert_array_equal(mask, masks[i])


def test_zips_and_shipped_label_name(tmp_path):
    images, masks = make_arrays()
    staging = tmp_path / "staging"
    write_challenge_folder(staging, images, masks, label_name="label_Hnl61pT.csv")
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(staging / "label_Hnl61pT.csv", root)
    with zipfile.ZipFile(root / "train-images.zip", "w") as archive:
        for i in range(12):
            archive.write(staging / "train-images" / f"{i}.png", f"train-images/{i}.png")
        archive.writestr("__MACOSX/._0.png", b"junk")
    with zipfile.ZipFile(root / "test-images.zip", "w") as archive:
        for i in range(3):
            archive.writestr(f"{20 + i}.png", cv2.imencode(".png", images[i])[1].tobytes())
    data = load_challenge(root)
    np.testing.assert_array_equal(data.train_images, images)
    np.testing.assert_array_equal(data.train_masks, masks)
    assert data.test_names == ["20.png", "21.png", "22.png"]
    np.testing.assert_array_equal(data.test_images, images[:3])


def test_annotated_json_and_classes_yaml(folder):
    root, _, _ = folder
    lists = [[1, 2], [2], [3, 4], [1], [2], [], [], [], [], [], [], []]
    (root / "annotated_labels.json").write_text(json.dumps(lists))
    (root / "classes.yaml").write_text("1: liver\n2: spleen\n3: aorta\n4: kidney\n")
    data = load_challenge(root)
    assert data.num_classes == 5
    assert data.class_names[2] == "spleen"
    assert [np.flatnonzero(r).tolist() for r in data.annotated[:5]] == [[1, 2], [2], [3, 4], [1], [2]]


def test_image_cache_is_reused_and_rebuilt(folder):
    root, images, _ = folder
    load_challenge(root)
    caches = list(root.glob(".train-images.*.cache.npy"))
    assert len(caches) == 1
    data = load_challenge(root)
    assert isinstance(data.train_images, np.memmap)            # memory-mapped on reuse
    changed = images[5].copy()
    changed[0, 0] ^= 0xFF
    cv2.imwrite(str(root / "train-images" / "5.png"), changed)
    os.utime(root / "train-images" / "5.png", ns=(1, 10**9))
    data = load_challenge(root)
    np.testing.assert_array_equal(data.train_images[5], changed)
    assert len(list(root.glob(".train-images.*.cache.npy"))) == 1


@pytest.mark.parametrize("breakage, message", [
    ("no_folder", "data folder not found"),
    ("no_images", "no train-images/ folder"),
    ("empty_images", "no PNG images"),
    ("not_png", "not a PNG image"),
    ("unreadable", "unreadable PNG"),
    ("mixed_sizes", "all images must have one size"),
    ("no_labels", "no training labels"),
    ("wrong_rows", "pixel rows but the training images are 8x8"),
    ("missing_column", "columns do not match the training images"),
    ("label_too_big", "label 60 is not below num_classes 55"),
    ("bad_json", "annotated_labels.json: expected a list of 12 lists"),
])
def test_data_errors_name_the_file(tmp_path, breakage, message):
    images, masks = make_arrays()
    root = tmp_path / "data"
    if breakage != "no_folder":
        write_challenge_folder(root, images, masks)
    if breakage == "no_images":
        shutil.rmtree(root / "train-images")
    elif breakage == "empty_images":
        for path in (root / "train-images").iterdir():
            path.unlink()
    elif breakage == "not_png":
        (root / "train-images" / "notes.txt").write_text("hello")
    elif breakage == "unreadable":
        (root / "train-images" / "3.png").write_bytes(b"not really a png")
    elif breakage == "mixed_sizes":
        cv2.imwrite(str(root / "train-images" / "7.png"), np.zeros((9, 8), np.uint8))
    elif breakage == "no_labels":
        (root / "y_train.csv").unlink()
    elif breakage == "wrong_rows":
        write_challenge_folder(root, images, np.zeros((12, 4, 4), np.uint8))
    elif breakage == "missing_column":
        cv2.imwrite(str(root / "train-images" / "12.png"), images[0])
    elif breakage == "label_too_big":
        masks[2, 0, 0] = 60
        write_challenge_folder(root, images, masks)
    elif breakage == "bad_json":
        (root / "annotated_labels.json").write_text("[[1], [2]]")
    with pytest.raises(InputError, match=message) as error:
        load_challenge(root)
    assert "\n" not in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_split_ratio_seed_and_num_labeled(tiny_phantom):
    data = load_challenge(tiny_phantom)
    labeled = data.labeled_indices
    assert len(labeled) == 12
    split = make_split(data, 0.75, split_seed=1)
    assert len(split.train) == 9 and len(split.val) == 3
    assert set(split.train) | set(split.val) == set(labeled) and not set(split.train) & set(split.val)
    assert set(split.unlabeled) == set(data.unlabeled_indices)
    again = make_split(data, 0.75, split_seed=1)
    assert split.train.tolist() == again.train.tolist()
    assert make_split(data, 0.75, split_seed=2).train.tolist() != split.train.tolist()
    few = make_split(data, 0.75, num_labeled=4, split_seed=1)
    assert few.val.tolist() == split.val.tolist()              # same validation for every K
    assert len(few.train) == 4 and set(few.train) < set(split.train)
    assert set(few.unlabeled) == set(split.unlabeled) | (set(split.train) - set(few.train))


def test_labeled_ratio_one_trains_on_every_labeled_image(tiny_phantom):
    data = load_challenge(tiny_phantom)
    split = make_split(data, 1, split_seed=1)
    assert split.train.tolist() == sorted(data.labeled_indices.tolist()) and len(split.val) == 0
    few = make_split(data, 1, num_labeled=5, split_seed=1)
    assert len(few.train) == 5 and len(few.val) == 0 and len(few.unlabeled) == 12 + 7


@pytest.mark.parametrize("ratio, num_labeled, message", [
    (1.5, 0, "labeled_ratio: 1.5 is not in \\(0, 1\\]"),
    (0.0, 0, "labeled_ratio: 0.0 is not in \\(0, 1\\]"),
    (0.75, 50, "num_labeled: 50 is not between 1 and 9"),
])
def test_bad_split_arguments(tiny_phantom, ratio, num_labeled, message):
    with pytest.raises(InputError, match=message):
        make_split(load_challenge(tiny_phantom), ratio, num_labeled)


def test_no_labeled_images_is_an_error(tmp_path):
    images, _ = make_arrays()
    write_challenge_folder(tmp_path, images, np.zeros((12, 8, 8), np.uint8))
    with pytest.raises(InputError, match="no labeled images"):
        make_split(load_challenge(tmp_path), 0.8)


def test_datasets_yield_the_documented_tensors(tiny_phantom):
    cfg = load_config("supervised", ["--set", "aug_rotate=20"])
    data = load_challenge(tiny_phantom)
    split = make_split(data, 0.75)
    norm = normalization_stats(data.train_images[split.train])
    labeled = LabeledSlices(data, split.train, 64, norm, augment=geometric_augmentation(cfg))
    sample = labeled[0]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (1, 64, 64)
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (64, 64)
    assert sample["annotated"].dtype == torch.bool and sample["annotated"].shape == (data.num_classes,)
    assert set(sample["mask"].unique().tolist()) <= set(np.flatnonzero(data.annotated[split.train[0]])) | {0}
    assert sample["certain_background"].dtype == torch.bool
    assert not (sample["certain_background"] & (sample["mask"] > 0)).any()
    plain = LabeledSlices(data, split.train, 64, norm)[0]         # no augmentation: resize only
    raw = cv2.resize(np.asarray(data.train_masks[split.train[0]]), (64, 64),
                     interpolation=cv2.INTER_NEAREST_EXACT)
    assert (plain["mask"].numpy() == raw).mean() > 0.97
    unlabeled = UnlabeledSlices(data.train_images, split.unlabeled, 64, norm,
                                geometric_augmentation(cfg), intensity_augmentation())
    sample = unlabeled[0]
    assert sample["image_w"].dtype == torch.float32 and sample["image_w"].shape == (1, 64, 64)
    assert sample["image_w_uint8"].dtype == torch.uint8 and sample["image_w_uint8"].shape == (1, 64, 64)
    assert sample["strong_draws"].dtype == torch.float64 and sample["strong_draws"].shape == (2, 9)
    views = strong_views(default_collate([sample, unlabeled[1]]))
    assert all(views[k].dtype == torch.float32 and views[k].shape == (2, 1, 64, 64)
               for k in ("image_w", "image_s1", "image_s2"))
    assert not torch.equal(views["image_s1"], views["image_s2"])  # independent strong views
