"""The built-in CT phantom (dataloaders/phantom.py, README "The built-in phantom"): layout,
determinism, partial labels, anatomy that a wrong geometry would break, ensure_phantom and the
CLI."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from dataloaders import phantom
from dataloaders.label_csv import read_label_csv
from utils.errors import InputError, run_cli

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_train=12, labeled_fraction=0.5, n_test=4, size=128, seed=5, p_annotated=0.6)
(LIVER, SPLEEN, KIDNEY_RIGHT, KIDNEY_LEFT, AORTA, VERTEBRA, LESION) = (1, 2, 3, 4, 5, 7, 13)


def folder_bytes(root):
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    return phantom.generate_phantom(tmp_path_factory.mktemp("phantom") / "data", **SMALL)


@pytest.fixture(scope="module")
def slices():
    """40 full slices at 128x128 (images and label maps) for the anatomy statistics."""
    rendered = [phantom.render_slice(11, i, 128) for i in range(40)]
    return np.stack([r[0] for r in rendered]), np.stack([r[1] for r in rendered])


# ==== layout ====
def test_layout_matches_the_challenge(small_phantom):
    root = small_phantom
    n_train, n_test, size = SMALL["n_train"], SMALL["n_test"], SMALL["size"]
    train = sorted(p.name for p in (root / "train-images").iterdir())
    test = sorted(p.name for p in (root / "test-images").iterdir())
    assert train == sorted(f"{i}.png" for i in range(n_train))
    assert test == sorted(f"{i}.png" for i in range(n_train, n_train + n_test))  # continues
    for path in [root / "train-images" / "0.png", root / "test-images" / f"{n_train}.png"]:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.shape == (size, size)  # 8-bit grayscale
    masks, names, _ = read_label_csv(root / "y_train.csv")
    assert masks.shape == (n_train, size, size) and names == [f"{i}.png" for i in range(n_train)]
    test_masks, test_names, _ = read_label_csv(root / "y_test.csv")
    assert test_masks.shape == (n_test, size, size) and test_names == test
    annotated = json.loads((root / "annotated_labels.json").read_text())
    assert isinstance(annotated, list) and len(annotated) == n_train
    classes = yaml.safe_load((root / "classes.yaml").read_text())
    assert classes[1] == "liver" and classes[13] == "liver_lesion" and max(classes) == 14
    assert (root / phantom.COMPLETE_MARKER).is_file()


def test_labeled_images_are_the_first_round_fraction(small_phantom):
    masks, _, _ = read_label_csv(small_phantom / "y_train.csv")
    annotated = json.loads((small_phantom / "annotated_labels.json").read_text())
    n_labeled = 6  # round(0.5 * 12)
    assert all(masks[i].any() and annotated[i] for i in range(n_labeled))
    assert not masks[n_labeled:].any()  # unlabeled columns are all zero
    assert all(ids == [] for ids in annotated[n_labeled:])


# ==== determinism ====
def test_same_seed_same_bytes_other_seed_other_images(small_phantom, tmp_path):
    again = phantom.generate_phantom(tmp_path / "again", **SMALL)
    assert folder_bytes(again) == folder_bytes(small_phantom)
    other = phantom.generate_phantom(tmp_path / "other", **{**SMALL, "seed": 6})
    assert ((other / "train-images" / "0.png").read_bytes()
            != (small_phantom / "train-images" / "0.png").read_bytes())


def test_output_does_not_depend_on_chunking_or_workers():
    indices = list(range(36))  # more than one chunk of 32
    serial = list(phantom.render_all(2, indices, 128, workers=1))
    pooled = list(phantom.render_all(2, indices, 128, workers=2))
    alone = phantom.render_slice(2, 35, 128)
    assert [s[0] for s in pooled] == indices
    for (_, image_a, labels_a), (_, image_b, labels_b) in zip(serial, pooled):
        assert np.array_equal(image_a, image_b) and np.array_equal(labels_a, labels_b)
    assert np.array_equal(serial[-1][1], alone[0]) and np.array_equal(serial[-1][2], alone[1])


# ==== labels ====
def test_partial_labels_keep_only_annotated_structures(small_phantom):
    masks, _, _ = read_label_csv(small_phantom / "y_train.csv")
    annotated = json.loads((small_phantom / "annotated_labels.json").read_text())
    for index in range(6):
        _, full = phantom.render_slice(SMALL["seed"], index, SMALL["size"])
        kept = annotated[index]
        assert kept and set(kept) <= set(np.unique(full)) - {0}
        expected = np.where(np.isin(full, kept), full, 0)  # annotated ids kept, others zeroed
        assert np.array_equal(masks[index], expected)


def test_test_labels_are_full_and_richer_than_partial_train_labels(small_phantom):
    test_masks, names, _ = read_label_csv(small_phantom / "y_test.csv")
    for mask, name in zip(test_masks, names):
        _, full = phantom.render_slice(SMALL["seed"], int(name[:-4]), SMALL["size"])
        assert np.array_equal(mask, full)
    train_masks, _, _ = read_label_csv(small_phantom / "y_train.csv")
    structures = [len(np.unique(m)) - 1 for m in train_masks[:6]]
    assert np.mean([len(np.unique(m)) - 1 for m in test_masks]) > np.mean(structures)


def test_annotation_probability_limits():
    labels = np.array([[0, 1, 1], [5, 7, 7], [9, 9, 0]], np.uint8)
    mask, kept = phantom.partial_labels(0, 0, labels, 1.0)
    assert kept == [1, 5, 7, 9] and np.array_equal(mask, labels)
    for index in range(5):  # p = 0 still keeps exactly one structure
        mask, kept = phantom.partial_labels(0, index, labels, 0.0)
        assert len(kept) == 1 and set(np.unique(mask)) == {0, kept[0]}
    assert phantom.partial_labels(0, 0, np.zeros((3, 3), np.uint8), 0.5)[1] == []


def test_slice_level_profile_is_an_ellipsoid_cross_section():
    start, peak, end = phantom.PROFILES["spleen"]
    assert phantom.level_profile(peak, "spleen") == pytest.approx(1.0)
    assert phantom.level_profile(start, "spleen") == pytest.approx(0.0, abs=1e-9)
    assert phantom.level_profile(end + 0.1, "spleen") == 0.0
    halfway = (start + peak) / 2  # t = -1/2 -> sqrt(1 - 1/4)
    assert phantom.level_profile(halfway, "spleen") == pytest.approx(np.sqrt(0.75))


# ==== anatomy ====
def centroid(mask):
    rows, cols = np.nonzero(mask)
    return cols.mean(), rows.mean()


def test_organs_sit_on_the_correct_side(slices):
    _, labels = slices
    half = labels.shape[-1] / 2
    checked = {LIVER: 0, SPLEEN: 0, KIDNEY_RIGHT: 0, KIDNEY_LEFT: 0}
    for label_map in labels:
        for organ, image_left in ((LIVER, True), (SPLEEN, False), (KIDNEY_RIGHT, True),
                                  (KIDNEY_LEFT, False)):
            if (label_map == organ).sum() >= 30:
                x, _ = centroid(label_map == organ)
                assert (x < half) == image_left, (organ, x)  # patient right = image left
                checked[organ] += 1
        ax, ay = centroid(label_map == AORTA)
        vx, vy = centroid(label_map == VERTEBRA)
        assert ax > vx and ay < vy  # aorta left (image right) and anterior of the spine
    assert min(checked.values()) >= 5  # each side check ran on several slices


def test_intensities_follow_the_tissues(slices):
    images, labels = slices
    aorta_minus_liver, lesion_minus_liver = [], []
    for image, label_map in zip(images, labels):
        liver = image[label_map == LIVER]
        if liver.size >= 50:
            aorta_minus_liver.append(image[label_map == AORTA].mean() - liver.mean())
            if (label_map == LESION).sum() >= 5:
                lesion_minus_liver.append(image[label_map == LESION].mean() - liver.mean())
    assert len(aorta_minus_liver) >= 10 and min(aorta_minus_liver) > 15  # enhanced aorta
    assert len(lesion_minus_liver) >= 3 and max(lesion_minus_liver) < -10  # hypodense tumour


def test_unlabeled_tissue_is_organ_like_and_leaves_the_labels_alone():
    """`unlabeled_tissue` paints soft tissue of organ intensity (35-130 HU, gray 124-185 in the
    W400/L40 window) outside the label set: more of the label-0 body pixels fall in the organ
    range on every slice, while the label maps stay exactly those of the plain phantom."""
    low, high = ((hu + 160) * 255 / 400 for hu in (35, 130))
    gains = []
    for index in range(12):
        plain, labels = phantom.render_slice(3, index, 128)
        tissue, tissue_labels = phantom.render_slice(3, index, 128, unlabeled_tissue=1.0)
        np.testing.assert_array_equal(tissue_labels, labels)
        body_background = (labels == 0) & (plain > 20)
        shares = [((image >= low) & (image <= high))[body_background].mean()
                  for image in (plain, tissue)]
        gains.append(shares[1] - shares[0])
    assert min(gains) > 0 and np.mean(gains) > 0.05


def test_lesions_lie_inside_the_liver(slices):
    _, labels = slices
    neighbours, lesions = [], 0
    for label_map in labels:
        lesion = label_map == LESION
        if not lesion.any():
            continue
        lesions += 1
        rows, cols = np.nonzero(label_map == LIVER)
        lr, lc = np.nonzero(lesion)
        assert rows.min() - 2 <= lr.min() and lr.max() <= rows.max() + 2
        assert cols.min() - 2 <= lc.min() and lc.max() <= cols.max() + 2
        ring = cv2.dilate(lesion.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~lesion
        neighbours.append(label_map[ring])
    neighbours = np.concatenate(neighbours)
    assert lesions >= 3 and (neighbours == LIVER).mean() > 0.6  # mostly surrounded by liver


def test_lesions_are_clipped_to_the_liver():
    canvas = phantom.Canvas(128, np.random.default_rng(0))
    liver = np.zeros((128, 128), bool)
    liver[40:70, 30:60] = True  # a square liver: half of it is within a lesion radius of an edge
    canvas.label[liver] = LIVER
    for _ in range(30):
        phantom.draw_liver_lesions(canvas, ((slice(0, 128), slice(0, 128)), liver),
                                   {"liver": np.float32(100.0)})
    lesion = canvas.label == LESION
    assert lesion.sum() > 50 and not (lesion & ~liver).any()
    assert np.all(canvas.hu[lesion] < 100.0)  # hypodense


def test_body_is_brighter_than_air_and_lies_on_a_couch(slices):
    images, labels = slices
    size = images.shape[-1]
    for image, label_map in zip(images, labels):
        corners = np.concatenate([image[:8, :8].ravel(), image[:8, -8:].ravel()])
        assert corners.mean() < 3
        body = cv2.GaussianBlur(image, (5, 5), 0) > 15
        _, components, stats, _ = cv2.connectedComponentsWithStats(body.astype(np.uint8))
        largest = 1 + np.argmax(stats[1:, cv2.CC_STAT_AREA])
        assert stats[largest, cv2.CC_STAT_AREA] > 0.25 * size * size  # the body
        assert image[components == largest].mean() > 40
        body_rows = np.nonzero((components == largest).any(axis=1))[0]
        assert label_map[: body_rows.min()].max() == 0  # structures are inside the body
        # the lowest bright thing is the couch: below every structure, and a wide band
        # (the curved table spans ~90 % of the width; a body's bottom rows would span far less)
        lowest = np.nonzero((image > 60).any(axis=1))[0].max()
        assert lowest > np.nonzero(label_map.any(axis=1))[0].max() + 2
        assert (image[lowest - 7: lowest + 1] > 60).any(axis=0).mean() > 0.7


# ==== ensure_phantom and the CLI ====
def test_ensure_phantom_generates_once_and_redoes_an_unfinished_folder(tmp_path, capsys):
    settings = dict(n_train=3, n_test=2, size=128, labeled_fraction=0.5)
    root = phantom.ensure_phantom(tmp_path / "ph", **settings)
    assert "Generated" in capsys.readouterr().out
    stamp = (root / "y_train.csv").stat().st_mtime_ns
    phantom.ensure_phantom(root, **settings)
    assert capsys.readouterr().out == "" and (root / "y_train.csv").stat().st_mtime_ns == stamp
    (root / phantom.COMPLETE_MARKER).unlink()  # as if interrupted before the end
    (root / "test-images" / "3.png").unlink()
    phantom.ensure_phantom(root, **settings)
    assert "Generated" in capsys.readouterr().out
    assert (root / "test-images" / "3.png").is_file() and (root / phantom.COMPLETE_MARKER).is_file()
    phantom.ensure_phantom(root, **{**settings, "n_train": 2})  # other settings: regenerate
    assert "Generated" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "train-images").iterdir()) == ["0.png", "1.png"]


def test_refuses_to_overwrite_a_folder_that_is_not_a_phantom(tmp_path):
    (tmp_path / "y_train.csv").write_text("real data\n")
    with pytest.raises(InputError, match="not a phantom folder"):
        phantom.generate_phantom(tmp_path, n_train=2, n_test=1, size=128)
    assert (tmp_path / "y_train.csv").read_text() == "real data\n"


@pytest.mark.parametrize("flags", [["--size", "300"], ["--labeled_fraction", "1.5"],
                                   ["--p_annotated", "-0.1"], ["--n_train", "0"],
                                   ["--n_test", "-3"], ["--unlabeled_tissue", "1.5"]])
def test_bad_cli_arguments_exit_2_with_one_line(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(phantom.main, ["--out", str(tmp_path / "x")] + flags)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --") and error.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "dataloaders.phantom", "--out", str(out),
                             "--n_train", "3", "--n_test", "1", "--size", "128"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert str(out) in last and "python train_supervised.py --data" in last
    assert (out / "test-images" / "3.png").is_file()
