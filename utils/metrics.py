"""The challenge metrics, computed exactly as the challenges score (README, Metrics).

- Per-class Dice (ENS Challenge Data #165): for each image i and class c in 1..C-1,
  Dice = 2|P∩G| / (|P|+|G|), NaN when both are empty; mean over images ignoring NaN (per class),
  then mean over classes ignoring NaN.
- Adjusted Rand index (#150; Hubert & Arabie, "Comparing partitions", J. Classification 1985):
  per image, between truth and prediction restricted to the pixels where truth != 0, then the mean
  over images.

Both come from each image's contingency table — one `bincount` of the (truth, pred) pair codes per
image, with the images spread over threads (bincount releases the GIL) — never from per-class
masks or pair loops. Label maps are piecewise constant, so the table counts runs of equal
consecutive codes rather than pixels (`_code_counts`). Run as a script to score a submission CSV:

    python -m utils.metrics --truth data/phantom/y_test.csv --pred runs/latest/submission.csv
"""
import argparse
import concurrent.futures
import os

import numpy as np

from dataloaders.label_csv import read_label_csv
from utils.errors import InputError, run_cli

_WORKERS = max(1, min(4, os.cpu_count() or 1))
_MAX_TABLE_CELLS = 1 << 20  # larger label ranges (or negative ids) are compacted per image first
# Counting runs pays off while runs average at least this many pixels (measured at 512²: at 8
# pixels per run it is ~1.5x faster than counting pixels, at 2 pixels per run several times slower)
_MIN_MEAN_RUN = 4


# ---------------------------------------------------------------- Dice


def per_class_dice(truth, pred, num_classes):
    """Challenge #165 score. truth, pred: `(N, H, W)` integers in [0, num_classes).

    Returns `(score, per_class)`: score = mean over classes 1..C-1 of the per-class Dice (NaN if no
    class appears anywhere); per_class `(num_classes,) float64`, NaN at index 0 and for classes
    absent from both truth and prediction on every image.
    """
    per_class = dice_table(truth, pred, num_classes)["dice"]
    return _mean_ignoring_nan(per_class[1:]), per_class


def dice_table(truth, pred, num_classes):
    """Per-class Dice table. truth, pred: `(N, H, W)` integers in [0, num_classes).

    Returns a dict of `(num_classes,)` arrays: `dice` (float64, as in `per_class_dice`),
    `images_present` (int64, images whose truth contains the class) and `pixels` (int64, truth
    pixels of the class over all images). Index 0 (background) is reported with dice NaN.
    """
    truth, pred = _as_image_rows(truth, pred)
    _check_class_range(truth, pred, num_classes)
    both, in_truth, in_pred = (np.stack(column) for column in zip(*_map_tables(
        truth, pred, num_classes, num_classes,
        lambda table: (np.diagonal(table), table.sum(axis=1), table.sum(axis=0)))))  # each (N, C)
    size_sum = in_truth + in_pred
    scored = size_sum > 0  # both empty → NaN → not counted
    dice_sum = np.where(scored, 2 * both / np.maximum(size_sum, 1), 0).sum(axis=0)
    dice_images = scored.sum(axis=0)
    images_present = (in_truth > 0).sum(axis=0)
    pixels = in_truth.sum(axis=0)
    dice = np.full(num_classes, np.nan)
    has_score = dice_images > 0
    dice[has_score] = dice_sum[has_score] / dice_images[has_score]
    dice[0] = np.nan
    return {"dice": dice, "images_present": images_present, "pixels": pixels}


def format_dice_table(table, class_names=None):
    """The table as text: one row per class that appears in truth or prediction, 4 decimals.

    class_names: optional {class id: name} (int or str keys) or a list indexed by class id.
    """
    names = _class_name_lookup(class_names)
    lines = [f"{'class':>5}  {'name':<20} {'dice':>7} {'images':>7} {'pixels':>12}"]
    for label in np.flatnonzero(~np.isnan(table["dice"])):
        name = names.get(int(label), "")
        lines.append(f"{label:>5}  {name[:20]:<20} {table['dice'][label]:>7.4f} "
                     f"{table['images_present'][label]:>7d} {table['pixels'][label]:>12d}")
    return "\n".join(lines)


def _check_class_range(truth, pred, num_classes):
    for name, labels in (("truth", truth), ("pred", pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")


def _class_name_lookup(class_names):
    """{class id: name} from a dict (int or str keys), a list indexed by class id, or None."""
    if isinstance(class_names, dict):
        return {int(label): str(name) for label, name in class_names.items()}
    return dict(enumerate(map(str, class_names or [])))


def _mean_ignoring_nan(values):
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


# ---------------------------------------------------------------- adjusted Rand index


def rand_index(truth, pred):
    """Challenge #150 score: mean over images of the adjusted Rand index on truth != 0 pixels.

    truth, pred: `(N, H, W)` integer structure ids (any values; only the partition matters).
    Per image, with n_ij the contingency table between truth structures i (truth != 0) and
    predicted labels j, a_i / b_j its row / column sums, n the number of truth != 0 pixels and
    C(x) = x(x-1)/2:

        ARI = (Σ C(n_ij) − Σ C(a_i) Σ C(b_j) / C(n)) / (½[Σ C(a_i) + Σ C(b_j)] − Σ C(a_i) Σ C(b_j) / C(n))

    evaluated in exact integer arithmetic. Where the denominator is 0 (max index = expected
    index), both partitions are the same trivial one — a single structure labelled by a single
    prediction, every pixel its own structure in both, or a single pixel — and the ARI is 1.0
    (scikit-learn's convention). Images whose truth is all 0 are skipped; NaN if all are.
    """
    scores = adjusted_rand_per_image(truth, pred)
    return _mean_ignoring_nan(scores)


def adjusted_rand_per_image(truth, pred):
    """`(N,) float64` adjusted Rand index of each image as in `rand_index`, NaN where truth is all 0."""
    truth, pred = _as_image_rows(truth, pred)
    if truth.shape[1] == 0:
        return np.full(truth.shape[0], np.nan)
    truth_labels, pred_labels = int(truth.max()) + 1, int(pred.max()) + 1
    if min(truth.min(), pred.min()) >= 0 and truth_labels * pred_labels <= _MAX_TABLE_CELLS:
        sums = _map_tables(truth, pred, truth_labels, pred_labels, lambda table: _pair_sums(table[1:]))
    else:
        sums = [_pair_sums_compacted(truth_row, pred_row) for truth_row, pred_row in zip(truth, pred)]
    scores = np.full(truth.shape[0], np.nan)
    for image, (index, a, b, foreground) in enumerate(sums):
        if foreground == 0:
            continue
        # Python ints: C(n)·Σ C(a_i)·Σ C(b_j) exceeds int64 at 512² pixels
        total = foreground * (foreground - 1) // 2
        numerator = 2 * (index * total - a * b)
        denominator = (a + b) * total - 2 * a * b
        scores[image] = 1.0 if denominator == 0 else numerator / denominator
    return scores


def _pair_sums(table):
    """(Σ C(n_ij), Σ C(a_i), Σ C(b_j), n) as Python ints from a `(truth ids, pred ids)` count table."""
    cells = table.reshape(-1).astype(np.int64, copy=False)
    rows, columns = table.sum(axis=1), table.sum(axis=0)
    count = int(rows.sum())  # every table sums to n, and Σ C(x) = (Σ x² − Σ x) / 2
    return tuple((int(np.dot(x, x)) - count) // 2 for x in (cells, rows, columns)) + (count,)


def _pair_sums_compacted(truth_row, pred_row):
    """`_pair_sums` for one image with arbitrary (wide-ranging or negative) ids: relabel, then count."""
    foreground = truth_row != 0
    _, truth_ids = np.unique(truth_row[foreground], return_inverse=True)
    pred_values, pred_ids = np.unique(pred_row[foreground], return_inverse=True)
    _, cells = np.unique(truth_ids.astype(np.int64) * max(len(pred_values), 1) + pred_ids, return_counts=True)
    count = int(foreground.sum())
    return tuple((int(np.dot(x, x)) - count) // 2
                 for x in (cells, np.bincount(truth_ids), np.bincount(pred_ids))) + (count,)


# ---------------------------------------------------------------- shared contingency


def _as_image_rows(truth, pred):
    """`(N, H, W)` (or `(N, ...)`) integer arrays → two `(N, pixels)` views; checks they match."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape or truth.ndim < 2 or truth.shape[0] == 0:
        raise ValueError(f"truth and pred must have the same (N, H, W) shape with N > 0, "
                         f"got {truth.shape} and {pred.shape}")
    for name, labels in (("truth", truth), ("pred", pred)):
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
            raise ValueError(f"{name} must hold integer labels, got dtype {labels.dtype}")
    return truth.reshape(truth.shape[0], -1), pred.reshape(pred.shape[0], -1)


def _code_counts(codes, cells):
    """`np.bincount(codes, minlength=cells)` through runs: one weighted count per run of equal
    consecutive codes. A row-major label map has a few runs per row where the pixel count has
    hundreds, so far fewer table cells are touched; maps with short runs are counted per pixel.
    """
    starts = np.flatnonzero(codes[1:] != codes[:-1]) + 1
    if len(starts) + 1 > codes.size // _MIN_MEAN_RUN:
        return np.bincount(codes, minlength=cells)
    starts = np.concatenate(([0], starts))
    lengths = np.diff(starts, append=codes.size)
    # float64 weights hold integer counts exactly (a table cell counts at most the image's pixels)
    return np.bincount(codes[starts], weights=lengths, minlength=cells).astype(np.int64)


def _map_tables(truth, pred, truth_labels, pred_labels, reduce):
    """`[reduce(table_i)]` over images, table_i the `(truth_labels, pred_labels)` int64 pixel counts.

    truth, pred: `(N, pixels)` ints in [0, truth_labels) and [0, pred_labels).
    """
    cells = truth_labels * pred_labels
    code_type = np.uint16 if cells <= 1 << 16 else np.int64  # narrow codes: less memory traffic

    def reduce_image(image):
        code = truth[image].astype(code_type)
        code *= code_type(pred_labels)
        np.add(code, pred[image], out=code, casting="unsafe")  # values fit: checked by the caller
        return reduce(_code_counts(code, cells).reshape(truth_labels, pred_labels))

    with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
        return list(pool.map(reduce_image, range(truth.shape[0])))


# ---------------------------------------------------------------- command line


def restrict_to_annotated(predictions, annotated):
    """Set predicted pixels of classes not annotated on their slice to 0.

    Validation slices come from partially annotated images: there a correctly found but
    unannotated organ would count as a false positive, so it is removed before scoring.
    `predictions (N,H,W)` ints, `annotated (N,C)` bool.
    """
    allowed = annotated.copy()
    allowed[:, 0] = True
    keep = allowed[np.arange(len(predictions))[:, None, None], predictions]
    return np.where(keep, predictions, 0).astype(predictions.dtype)


def score_predictions(truth, predictions, num_classes, annotated=None):
    """The challenge metrics (README, Metrics) of `predictions` vs `truth`, both `(N,H,W)`.

    With `annotated (N,C)` (partial labels) only annotated classes are scored. Returns plain
    floats `dice`, `rand`, the foreground fractions `fg_pred`/`fg_true` (a check that the
    model still predicts background) and `per_class_dice (C,)`.
    """
    scored = predictions if annotated is None else restrict_to_annotated(predictions, annotated)
    dice, per_class = per_class_dice(truth, scored, num_classes)
    return {"dice": float(dice), "rand": float(rand_index(truth, scored)),
            "fg_pred": float((predictions > 0).mean()), "fg_true": float((truth > 0).mean()),
            "per_class_dice": per_class}



# ---------------------------------------------------------------- predicted vs true area per class

SINK_RATIO = 3.0              # predicted on more than this many times its true area = a sink
MISSING_FRACTION = 0.1        # present, but predicted on less than this share of its true area
MIN_AREA_FRACTION = 1e-4      # area floor of the ratio, as a share of the judged pixels


def class_area_report(truth, predictions, num_classes, annotated=None, sink_ratio=SINK_RATIO,
                      missing_fraction=MISSING_FRACTION, min_area_fraction=MIN_AREA_FRACTION):
    """Per class, predicted vs true pixel counts and the two failures of partial labels.

    truth, predictions: `(N, H, W)` ints in [0, num_classes); annotated: optional `(N, C)` bool.
    With `annotated` (partially labelled slices) class c is judged only on the slices where it
    was annotated: elsewhere its truth is unknown (an unannotated organ reads 0), so neither its
    true nor its predicted pixels there say anything. Returns a dict of `(C,)` arrays:
    - `predicted`, `true` (int64): pixel counts of the class over its judged slices;
    - `judged_pixels` (int64): pixels of those slices;
    - `ratio` (float64): predicted / max(true, floor), floor = `min_area_fraction` × judged
      pixels, so a class with a tiny or empty true area gets a finite ratio that only grows
      large when the class is predicted on a visible share of the slices; NaN when the class
      is neither true nor predicted (and for background);
    - `sink` (bool): ratio > `sink_ratio` — the class swallows tissue that is not its own;
    - `missing` (bool): true > 0 but predicted < `missing_fraction` × true — the class is
      (almost) never predicted;
    plus the two thresholds `sink_ratio` and `missing_fraction` (floats). Background (index 0) is never flagged.
    """
    truth, predictions = _as_image_rows(truth, predictions)
    _check_class_range(truth, predictions, num_classes)
    judged = np.ones((truth.shape[0], num_classes), bool) if annotated is None else np.asarray(annotated, bool)
    if judged.shape != (truth.shape[0], num_classes):
        raise ValueError(f"annotated must be (N, C) = {(truth.shape[0], num_classes)}, got {judged.shape}")
    true_counts = np.stack([np.bincount(row, minlength=num_classes)[:num_classes] for row in truth])
    pred_counts = np.stack([np.bincount(row, minlength=num_classes)[:num_classes] for row in predictions])
    true = np.where(judged, true_counts, 0).sum(axis=0)
    predicted = np.where(judged, pred_counts, 0).sum(axis=0)
    judged_pixels = judged.sum(axis=0) * truth.shape[1]
    floor = np.maximum(min_area_fraction * judged_pixels, 1.0)
    ratio = np.where((true > 0) | (predicted > 0), predicted / np.maximum(true, floor), np.nan)
    ratio[0] = np.nan
    with np.errstate(invalid="ignore"):
        sink = ratio > sink_ratio
    missing = (true > 0) & (predicted < missing_fraction * true)
    missing[0] = False
    return {"predicted": predicted, "true": true, "judged_pixels": judged_pixels, "ratio": ratio,
            "sink": sink, "missing": missing, "sink_ratio": sink_ratio,
            "missing_fraction": missing_fraction}


WORST_AREA_RATIO = "worst_area_ratio"                     # the names of `area_summary`'s scalars
FLAGGED_CLASS_COUNTS = ("sink_classes", "missing_classes")


def area_summary(report):
    """The log's scalars of a `class_area_report`: `worst_area_ratio` (largest ratio, NaN when
    no class is judged), `sink_classes` and `missing_classes` (counts of flagged classes)."""
    ratios = report["ratio"][~np.isnan(report["ratio"])]
    sinks, missing = FLAGGED_CLASS_COUNTS
    return {WORST_AREA_RATIO: float(ratios.max()) if ratios.size else float("nan"),
            sinks: int(report["sink"].sum()), missing: int(report["missing"].sum())}


def format_area_report(report, class_names=None):
    """The report as text: one row per judged class (true or predicted), flags spelled out,
    then the `format_area_flags` line."""
    names = _class_name_lookup(class_names)
    lines = [f"{'class':>5}  {'name':<20} {'predicted':>10} {'true':>10} {'ratio':>8}  flag"]
    for label in np.flatnonzero(~np.isnan(report["ratio"])):
        flag = "SINK" if report["sink"][label] else "MISSING" if report["missing"][label] else ""
        lines.append(f"{label:>5}  {names.get(int(label), '')[:20]:<20} {report['predicted'][label]:>10d} "
                     f"{report['true'][label]:>10d} {report['ratio'][label]:>8.2f}  {flag}".rstrip())
    lines.append(format_area_flags(report, class_names))
    return "\n".join(lines)


def format_area_flags(report, class_names=None):
    """One line naming the sink and missing classes of a `class_area_report` (or 'none')."""
    names = _class_name_lookup(class_names)
    sinks, missing = ([names.get(int(c)) or str(c) for c in np.flatnonzero(report[flag])]
                      for flag in ("sink", "missing"))
    return (f"sinks (predicted > {report['sink_ratio']:g}x true area): {', '.join(sinks) or 'none'}; "
            f"missing (< {report['missing_fraction']:g} of true area predicted): {', '.join(missing) or 'none'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Score a label CSV against a ground-truth label CSV "
                                                 "(per-class Dice, #165, and adjusted Rand index, #150).")
    parser.add_argument("--truth", required=True, help="ground-truth label CSV (e.g. y_test.csv)")
    parser.add_argument("--pred", required=True, help="predicted label CSV (a submission)")
    parser.add_argument("--num_classes", type=int, default=55,
                        help="classes for the Dice (0 = skip the Dice, e.g. for #150 instance ids)")
    args = parser.parse_args(argv)
    truth, truth_names, _ = read_label_csv(args.truth)
    pred, pred_names, _ = read_label_csv(args.pred)
    column_of = {name: column for column, name in enumerate(pred_names)}
    missing = [name for name in truth_names if name not in column_of]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"{args.pred}: no column for {len(missing)} image(s) of {args.truth}: {shown}")
    if pred.shape[1:] != truth.shape[1:]:
        raise InputError(f"{args.pred}: images are {pred.shape[1]}x{pred.shape[2]}, "
                         f"{args.truth} has {truth.shape[1]}x{truth.shape[2]}")
    pred = pred[[column_of[name] for name in truth_names]]

    print(f"images: {truth.shape[0]} ({truth.shape[1]}x{truth.shape[2]})")
    if args.num_classes > 0:
        for path, labels in ((args.truth, truth), (args.pred, pred)):
            if labels.max() >= args.num_classes:
                raise InputError(f"{path}: label {labels.max()} >= --num_classes {args.num_classes} "
                                 "(instance ids? pass --num_classes 0 to report only the Rand index)")
        table = dice_table(truth, pred, args.num_classes)
        print(f"per-class Dice: {_mean_ignoring_nan(table['dice'][1:]):.4f}")
    print(f"Rand index (adjusted, truth != 0): {rand_index(truth, pred):.4f}")
    if args.num_classes > 0:
        print(format_dice_table(table))


if __name__ == "__main__":
    run_cli(main)
