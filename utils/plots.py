"""Figures of a run: training curves, example predictions, per-slice overlay PNGs.

Headless: the Agg backend is selected before pyplot is imported, so plots work on a server with no
display. Every file is written to a temporary name in the target folder and renamed, so a crash
mid-write never leaves a truncated `curves.png` behind.
"""
import math
import os

import cv2
import matplotlib
import matplotlib.colors as mcolors
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

from utils.files import atomic_path  # noqa: E402
from utils.metrics import FLAGGED_CLASS_COUNTS, SINK_RATIO, WORST_AREA_RATIO  # noqa: E402

_GOLDEN_RATIO_CONJUGATE = 0.6180339887498949


def class_colors(num_classes):
    """Fixed colour per class id: (num_classes, 3) uint8 RGB, class 0 black.

    Hues follow the golden-ratio sequence (neighbouring ids get far-apart hues) with saturation and
    brightness cycling over a few levels; all colours are saturated so they stand out on grey CT.
    Distinct for up to 1024 classes. Deterministic.
    """
    class_ids = np.arange(1, num_classes)
    hue = (class_ids * _GOLDEN_RATIO_CONJUGATE) % 1.0
    saturation = np.array([0.95, 0.65, 0.8])[class_ids % 3]
    value = np.array([1.0, 0.8, 0.9, 0.7])[(class_ids // 3) % 4]
    rgb = mcolors.hsv_to_rgb(np.stack([hue, saturation, value], axis=1))
    colors = np.zeros((num_classes, 3), np.uint8)
    colors[1:] = np.round(rgb * 255).astype(np.uint8)
    return colors


def colorize(mask, num_classes):
    """(H, W) integer class map with values in [0, num_classes) -> (H, W, 3) uint8 RGB."""
    mask = np.asarray(mask)
    if mask.size and (mask.min() < 0 or mask.max() >= num_classes):
        raise ValueError(f"mask values {mask.min()}..{mask.max()} outside [0, {num_classes})")
    return class_colors(num_classes)[mask]


def _to_gray_uint8(image):
    """(H, W) uint8 unchanged; other dtypes are min-max scaled to 0..255 (constant or NaN -> 0)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float64)
    finite = np.isfinite(image)
    if not finite.any():
        return np.zeros(image.shape, np.uint8)
    low, high = image[finite].min(), image[finite].max()
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.round((np.where(finite, image, low) - low) * scale).astype(np.uint8)


def overlay(image, mask, num_classes, alpha=0.5):
    """Blend class colours over a grey image: (H, W, 3) uint8 RGB.

    image: (H, W) uint8 (used as is) or float (min-max scaled to 0..255). mask: (H, W) integer
    class map. Where mask == 0 the output is the grey image; elsewhere
    round((1 - alpha) * grey + alpha * colour).
    """
    gray = np.repeat(_to_gray_uint8(image)[..., None], 3, axis=2)
    mask = np.asarray(mask)
    blended = np.round((1 - alpha) * gray + alpha * colorize(mask, num_classes)).astype(np.uint8)
    return np.where((mask > 0)[..., None], blended, gray)


def _save_figure(figure, path):
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=100)
    finally:
        plt.close(figure)


def _as_float(value):
    """A record's value as a float, NaN when missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _plot_series(axis, records, keys, x_values, title, log_scale=False, reference=None):
    """One line per key over x_values, skipping non-finite points; 'no data' if nothing to draw.
    `reference` (label, y): a dashed horizontal line, e.g. a threshold."""
    drawn = False
    for key in keys:
        y_values = np.array([_as_float(record.get(key)) for record in records])
        finite = np.isfinite(x_values) & np.isfinite(y_values)
        if log_scale:
            finite &= y_values > 0
        if finite.any():
            axis.plot(x_values[finite], y_values[finite], marker=".", label=key)
            drawn = True
    if drawn:
        if reference is not None:
            axis.axhline(reference[1], color="gray", linestyle="--", linewidth=1, label=reference[0])
        axis.legend(fontsize="small")
        if log_scale:
            axis.set_yscale("log")
    else:
        axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
    axis.set_title(title)
    axis.grid(alpha=0.3)


# The validation line's per-class area report (`area_summary`'s scalars with the prefix val_; README,
# Sink classes: how to see them): a ratio that reaches 100x and class counts would flatten the 0..1
# scores if they shared their panel.
AREA_RATIO_KEY = f"val_{WORST_AREA_RATIO}"
FLAGGED_CLASS_KEYS = tuple(f"val_{name}" for name in FLAGGED_CLASS_COUNTS)


def curve_panels(keys):
    """The panels of `plot_curves` for the record keys `keys`: a list of (title, keys, log scale,
    reference line or None). Losses ('loss' first, then its terms alphabetically), the validation
    scores, the learning rate; and, when the records carry the area report, the worst class's
    predicted / true area (log scale, the SINK threshold dashed) and the counts of flagged
    classes."""
    keys = sorted(set(keys))
    loss_keys = sorted((key for key in keys if key.startswith("loss")), key=lambda key: (key != "loss", key))
    area_keys = {AREA_RATIO_KEY, *FLAGGED_CLASS_KEYS}
    score_keys = [key for key in keys if key.startswith("val_") and key not in area_keys]
    panels = [("training losses", loss_keys, False, None),
              ("validation scores", score_keys, False, None),
              ("learning rate", ["lr"], True, None)]
    if area_keys.intersection(keys):
        panels += [("worst class: predicted / true area", [AREA_RATIO_KEY], True,
                    (f"SINK above {SINK_RATIO:g}x", SINK_RATIO)),
                   ("flagged classes (count)", [key for key in FLAGGED_CLASS_KEYS if key in keys], False, None)]
    return panels


def plot_curves(records, path):
    """The panels of `curve_panels` against epoch (three in a row, the area report in a second
    row when present); saves `path`.

    records: list of dicts, one per evaluation as in log.jsonl. Missing keys and NaN values are
    skipped. The x axis is 'epoch', else 'iteration', else the record's position.
    """
    keys = {key for record in records for key in record}
    x_key = next((key for key in ("epoch", "iteration") if key in keys), None)
    if x_key is None:
        x_values = np.arange(len(records), dtype=np.float64)
    else:
        x_values = np.array([_as_float(record.get(x_key)) for record in records])
    panels = curve_panels(keys)
    rows = math.ceil(len(panels) / 3)
    figure, axes = plt.subplots(rows, 3, figsize=(15, 4 * rows), squeeze=False)
    for axis, (title, panel_keys, log_scale, reference) in zip(axes.flat, panels):
        _plot_series(axis, records, panel_keys, x_values, title, log_scale, reference)
        axis.set_xlabel(x_key or "evaluation")
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.tight_layout()
    _save_figure(figure, path)


def plot_examples(images, truths, preds, path, num_classes, titles=None):
    """Grid with one row per slice: image | ground-truth overlay | prediction overlay.

    images: (N, H, W) uint8 or float; truths, preds: (N, H, W) integer class maps in
    [0, num_classes); titles: optional N strings shown above each row's image. Saves `path`.
    """
    images, truths, preds = np.asarray(images), np.asarray(truths), np.asarray(preds)
    figure, axes = plt.subplots(len(images), 3, figsize=(9, 3 * len(images)), squeeze=False)
    column_names = ("image", "ground truth", "prediction")
    for row, (image, truth, pred) in enumerate(zip(images, truths, preds)):
        panels = (_to_gray_uint8(image), overlay(image, truth, num_classes),
                  overlay(image, pred, num_classes))
        for column, (axis, panel) in enumerate(zip(axes[row], panels)):
            axis.imshow(panel, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axis.set_axis_off()
            heading = [titles[row]] if titles is not None and column == 0 else []
            if row == 0:
                heading.append(column_names[column])
            axis.set_title("\n".join(heading), fontsize="small")
    figure.tight_layout()
    _save_figure(figure, path)


def _labelled_panel(panel_rgb, text):
    """Write a small caption in the top-left corner of a (H, W, 3) uint8 RGB panel (a copy)."""
    panel = panel_rgb.copy()
    scale = max(panel.shape[0] / 512, 0.3)
    cv2.putText(panel, text, (4, int(14 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale,
                (255, 255, 0), 1, cv2.LINE_AA)
    return panel


def _write_png(path, rgb):
    """Save a (H, W, 3) uint8 RGB array as a PNG with OpenCV (which wants BGR), atomically."""
    bgr = np.ascontiguousarray(rgb[..., ::-1])

    with atomic_path(path) as temporary:
        if not cv2.imwrite(temporary, bgr):
            raise OSError(f"{path}: could not write the PNG")


def save_overlays(out_dir, names, images, preds, num_classes, truths=None):
    """One PNG per slice, `out_dir/<name without extension>.png`: image | prediction (| truth).

    names: N file names (e.g. '500.png'); images: (N, H, W) uint8 or float; preds, truths:
    (N, H, W) integer class maps in [0, num_classes). Returns the list of written paths.
    """
    paths = []
    for index, name in enumerate(names):
        image = images[index]
        gray = np.repeat(_to_gray_uint8(image)[..., None], 3, axis=2)
        strip = _labelled_panel(gray, "image")
        captioned = [(preds[index], "prediction")]
        if truths is not None:
            captioned.append((truths[index], "truth"))
        separator = np.full((gray.shape[0], 4, 3), 255, np.uint8)
        for mask, caption in captioned:
            panel = _labelled_panel(overlay(image, mask, num_classes), caption)
            strip = np.concatenate([strip, separator, panel], axis=1)
        path = os.path.join(out_dir, os.path.splitext(os.path.basename(str(name)))[0] + ".png")
        _write_png(path, strip)
        paths.append(path)
    return paths
