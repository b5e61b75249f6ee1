"""Figures: colours, overlays, curves and example grids are written as valid PNGs, atomically."""
import math

import cv2
import numpy as np
import pytest

from utils.plots import (class_colors, colorize, curve_panels, overlay, plot_curves, plot_examples,
                         save_overlays)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path, min_bytes=2000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) >= min_bytes
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None and image.std() > 0  # decodes and is not blank
    return image


def test_class_colors_distinct_fixed_background_black():
    for num_classes in (2, 55, 256):
        colors = class_colors(num_classes)
        assert colors.shape == (num_classes, 3) and colors.dtype == np.uint8
        assert (colors[0] == 0).all()
        assert len(np.unique(colors, axis=0)) == num_classes
    # A class keeps its colour whatever the number of classes.
    np.testing.assert_array_equal(class_colors(55), class_colors(256)[:55])


def test_class_colors_follow_the_golden_ratio_rule_by_hand():
    # id 1: hue 0.618 (sector 3 of 6, f = 0.7082), saturation 0.65, brightness 1.0:
    #   RGB = (1 − 0.65, 1 − 0.65·f, 1) · 255 = (89.25, 137.6, 255)
    # id 5: hue 5·0.618 mod 1 = 0.0902 (sector 0, f = 0.5410), saturation 0.8, brightness 0.8:
    #   RGB = (0.8, 0.8·(1 − 0.8·(1 − f)), 0.8·(1 − 0.8)) · 255 = (204, 129.1, 40.8)
    # id 2: hue 0.236 (sector 1, f = 0.4164), saturation 0.8, brightness 1.0:
    #   RGB = (1 − 0.8·f, 1, 1 − 0.8) · 255 = (170.1, 255, 51) — far from id 1's blue
    colors = class_colors(6)
    np.testing.assert_array_equal(colors[1], [89, 138, 255])
    np.testing.assert_array_equal(colors[2], [170, 255, 51])
    np.testing.assert_array_equal(colors[5], [204, 129, 41])


def test_colorize_and_overlay_by_hand():
    colors = class_colors(4)
    mask = np.array([[0, 1], [2, 3]])
    np.testing.assert_array_equal(colorize(mask, 4)[1, 0], colors[2])
    with pytest.raises(ValueError):
        colorize(mask, 3)
    image = np.array([[10, 100], [200, 255]], np.uint8)
    blended = overlay(image, mask, 4, alpha=0.25)
    assert blended.shape == (2, 2, 3) and blended.dtype == np.uint8
    np.testing.assert_array_equal(blended[0, 0], [10, 10, 10])  # mask 0: the image, unchanged
    for (row, col) in [(0, 1), (1, 0), (1, 1)]:
        grey, color = int(image[row, col]), colors[mask[row, col]].astype(float)
        np.testing.assert_array_equal(blended[row, col], np.round(0.75 * grey + 0.25 * color))


def test_overlay_keeps_background_for_uint8_and_float_images():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32)).astype(np.uint8)
    image[0, 0], image[0, 1] = 0, 255  # full range, so min-max scaling of floats is the identity
    mask = np.zeros((32, 32), np.int64)
    mask[8:20, 8:20] = 3
    for version in (image, image.astype(np.float32) / 255.0):
        result = overlay(version, mask, 5)
        background = mask == 0
        np.testing.assert_array_equal(result[background], np.repeat(image[background, None], 3, 1))
        assert (result[~background] != image[~background, None]).any()


def test_plot_curves_with_missing_keys_and_nan(tmp_path):
    records = [
        {"epoch": 0, "iteration": 40, "lr": 1e-3, "loss": 1.2, "loss_sup": 0.9},
        {"epoch": 1, "iteration": 80, "lr": 5e-4, "loss": math.nan, "loss_sup": 0.7,
         "loss_s1": 0.3, "val_dice": 0.2, "val_rand": None, "seconds": 12.0},
        {"epoch": 2, "iteration": 120, "loss": 0.6, "val_dice": 0.35, "val_rand": 0.3},
        {"iteration": 160, "lr": float("nan"), "val_dice": "n/a"},
    ]
    path = tmp_path / "curves.png"
    plot_curves(records, path)
    assert_valid_png(path, min_bytes=10000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]
    # Nothing to draw at all still gives a figure.
    plot_curves([], tmp_path / "empty.png")
    assert_valid_png(tmp_path / "empty.png")


def test_area_report_gets_panels_of_its_own_away_from_the_scores(tmp_path):
    keys = ["epoch", "lr", "loss_x", "loss", "val_dice", "val_rand", "val_worst_area_ratio",
            "val_sink_classes", "val_missing_classes", "seconds"]
    panels = {title: (panel_keys, log_scale, reference)
              for title, panel_keys, log_scale, reference in curve_panels(keys)}
    assert panels["training losses"][0] == ["loss", "loss_x"]
    assert panels["validation scores"][0] == ["val_dice", "val_rand"]  # 0..1 only
    assert panels["worst class: predicted / true area"] == (["val_worst_area_ratio"], True,
                                                           ("SINK above 3x", 3.0))
    assert panels["flagged classes (count)"][0] == ["val_sink_classes", "val_missing_classes"]
    # instance mode has no area report: the three panels of a row
    assert [title for title, *_ in curve_panels(["epoch", "loss", "val_rand", "lr"])] == [
        "training losses", "validation scores", "learning rate"]
    records = [{"epoch": e, "loss": 1.0 / e, "val_dice": 0.1 * e, "val_worst_area_ratio": 50.0 / e,
                "val_sink_classes": 3 - e, "val_missing_classes": 1} for e in (1, 2, 3)]
    plot_curves(records, tmp_path / "curves.png")
    assert_valid_png(tmp_path / "curves.png", min_bytes=10000)


def test_failed_save_leaves_no_temporary_file(tmp_path):
    with pytest.raises(ValueError):  # matplotlib has no '.nosuchformat' writer
        plot_curves([{"epoch": 0, "loss": 1.0}], tmp_path / "curves.nosuchformat")
    assert list(tmp_path.iterdir()) == []


def test_plot_examples_grid(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.random((3, 40, 40)).astype(np.float32)
    truths = np.zeros((3, 40, 40), np.int64)
    truths[:, 10:25, 10:25] = 2
    preds = np.roll(truths, 5, axis=2)
    path = tmp_path / "val_examples.png"
    plot_examples(images, truths, preds, path, num_classes=5, titles=["a", "b", "c"])
    grid = assert_valid_png(path, min_bytes=10000)
    plot_examples(images[:1], truths[:1], preds[:1], tmp_path / "one.png", num_classes=5)
    row = assert_valid_png(tmp_path / "one.png")
    assert grid.shape[1] == row.shape[1] and grid.shape[0] > 2 * row.shape[0]  # one row a slice
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "val_examples.png"]


def test_save_overlays_one_png_per_slice(tmp_path):
    images = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (2, 64, 1))
    preds = np.zeros((2, 64, 64), np.int64)
    preds[:, 20:40, 20:40] = 1
    out_dir = tmp_path / "png"
    paths = save_overlays(out_dir, ["500.png", "501.png"], images, preds, num_classes=3)
    assert sorted(p.name for p in out_dir.iterdir()) == ["500.png", "501.png"]
    strip = assert_valid_png(out_dir / "500.png", min_bytes=1000)
    assert strip.shape == (64, 2 * 64 + 4, 3)
    assert [str(out_dir / "500.png"), str(out_dir / "501.png")] == paths
    # The prediction panel is the overlay, in OpenCV's BGR order (captions live in the top rows).
    expected = overlay(images[0], preds[0], 3)[..., ::-1]
    np.testing.assert_array_equal(strip[20:, 68:], expected[20:])
    with_truth = save_overlays(out_dir, ["7"], images[:1], preds[:1], 3, truths=preds[:1] * 2)
    assert cv2.imread(with_truth[0]).shape == (64, 3 * 64 + 8, 3)
