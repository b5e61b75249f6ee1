"""Challenge metrics (utils/metrics.py) against hand-computed values and slow reference definitions."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from dataloaders.label_csv import write_label_csv
from utils import metrics
from utils.metrics import dice_table, format_dice_table, per_class_dice, rand_index

# Two 3×3 images, classes 0..4. Per image and class (|G|, |P|, |G∩P|) → Dice:
#   image 0: class 1 (2, 1, 1) → 2/3; class 2 (2, 3, 2) → 4/5; class 3 absent in both → NaN
#   image 1: class 1 (1, 0, 0) → 0;   class 2 (0, 0, 0) → NaN; class 3 (0, 2, 0) → 0
# class 4 never appears → NaN. Per class: 1 → (2/3 + 0)/2 = 1/3, 2 → 4/5, 3 → 0.
# Score = (1/3 + 4/5 + 0) / 3 = 17/45.
TRUTH = np.array([[[1, 1, 0], [0, 2, 2], [0, 0, 0]],
                  [[1, 0, 0], [0, 0, 0], [0, 0, 0]]])
PRED = np.array([[[1, 0, 0], [0, 2, 2], [2, 0, 0]],
                 [[0, 0, 0], [0, 3, 3], [0, 0, 0]]])


def test_per_class_dice_by_hand():
    score, per_class = per_class_dice(TRUTH, PRED, num_classes=5)
    assert per_class.dtype == np.float64 and per_class.shape == (5,)
    assert np.isnan(per_class[0]) and np.isnan(per_class[4])
    np.testing.assert_allclose(per_class[1:4], [1 / 3, 4 / 5, 0.0], rtol=0, atol=1e-15)
    assert score == pytest.approx(17 / 45, abs=1e-15)


def test_dice_nan_rules():
    truth = np.zeros((2, 4, 4), np.uint8)
    pred = np.zeros((2, 4, 4), np.uint8)
    truth[0, :2] = 1
    pred[0, :2] = 1  # class 1 perfect on image 0, absent from image 1 (NaN there, ignored)
    truth[1, 3] = 2  # class 2 only in the truth: Dice 0, counted
    score, per_class = per_class_dice(truth, pred, num_classes=4)  # class 3 nowhere: ignored
    np.testing.assert_array_equal(per_class[1:3], [1.0, 0.0])
    assert np.isnan(per_class[3])
    assert score == 0.5
    empty_score, _ = per_class_dice(np.zeros((1, 2, 2), int), np.zeros((1, 2, 2), int), num_classes=3)
    assert np.isnan(empty_score)


def test_dice_matches_a_per_image_per_class_loop():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 6, size=(7, 9, 9))
    pred = np.where(rng.random((7, 9, 9)) < 0.6, truth, rng.integers(0, 6, size=(7, 9, 9)))
    truth[2] = 0
    expected = []
    for label in range(1, 6):
        scores = [2 * np.sum((t == label) & (p == label)) / (np.sum(t == label) + np.sum(p == label))
                  for t, p in zip(truth, pred) if np.any(t == label) or np.any(p == label)]
        expected.append(np.mean(scores))
    score, per_class = per_class_dice(truth, pred, num_classes=6)
    np.testing.assert_allclose(per_class[1:], expected, rtol=0, atol=1e-14)
    assert score == pytest.approx(np.mean(expected), abs=1e-14)


def test_dice_table_and_its_text():
    table = dice_table(TRUTH, PRED, num_classes=5)
    np.testing.assert_array_equal(table["images_present"], [2, 2, 1, 0, 0])  # class 0 is in both truths
    np.testing.assert_array_equal(table["pixels"], [18 - 5, 3, 2, 0, 0])
    text = format_dice_table(table, class_names={1: "liver", 2: "spleen", 3: "kidney_r"})
    lines = text.splitlines()
    assert len(lines) == 1 + 3  # header + classes 1, 2, 3 (3 appears in the prediction only)
    assert lines[1].split() == ["1", "liver", "0.3333", "2", "3"]
    assert lines[2].split() == ["2", "spleen", "0.8000", "1", "2"]
    assert lines[3].split() == ["3", "kidney_r", "0.0000", "0", "0"]
    as_list = format_dice_table(table, class_names=["background", "liver", "spleen", "kidney_r"]).splitlines()
    assert as_list == lines
    with_text_keys = format_dice_table(table, class_names={"1": "liver", "2": "spleen", "3": "kidney_r"})
    assert with_text_keys.splitlines() == lines


def test_dice_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        per_class_dice(TRUTH, PRED, num_classes=3)


def reference_adjusted_rand(truth, pred):
    """Hubert & Arabie from explicit pixel pairs (exact fractions), over truth != 0 pixels."""
    keep = truth.ravel() != 0
    truth, pred = truth.ravel()[keep], pred.ravel()[keep]
    together_both = together_truth = together_pred = pairs = 0
    for i, j in itertools.combinations(range(truth.size), 2):
        same_truth, same_pred = truth[i] == truth[j], pred[i] == pred[j]
        together_both += same_truth and same_pred
        together_truth += same_truth
        together_pred += same_pred
        pairs += 1
    expected = Fraction(together_truth * together_pred, pairs) if pairs else Fraction(0)
    maximum = Fraction(together_truth + together_pred, 2)
    if maximum == expected:  # degenerate: identical trivial partitions (the documented convention)
        return 1.0
    return float((together_both - expected) / (maximum - expected))


def reference_rand_index(truth, pred):
    scores = [reference_adjusted_rand(t, p) for t, p in zip(truth, pred) if np.any(t != 0)]
    return float(np.mean(scores)) if scores else float("nan")


@pytest.mark.parametrize("seed", range(6))
def test_rand_index_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, size=(5, 4, 5)).astype(np.uint8)
    pred = rng.integers(0, 5, size=(5, 4, 5)).astype(np.uint8)
    pred[1] = truth[1] * 7 % 11  # a relabelled copy: ARI 1 on that image
    truth[3] = 0  # no structure: skipped
    assert rand_index(truth, pred) == pytest.approx(reference_rand_index(truth, pred), abs=1e-12)
    np.testing.assert_allclose(metrics.adjusted_rand_per_image(truth, pred)[[0, 1, 2, 4]],
                               [reference_adjusted_rand(t, p) for t, p in zip(truth[[0, 1, 2, 4]], pred[[0, 1, 2, 4]])],
                               rtol=0, atol=1e-12)


def blocky_labels(rng, count, rows, cols, width):
    """(count, rows, cols) labels constant over runs of `width` pixels along each row."""
    return rng.integers(0, 4, size=(count, rows, cols // width)).repeat(width, axis=2).astype(np.uint8)


def test_rand_index_on_piecewise_constant_maps_matches_pair_counting():
    """Long runs of equal pixels: the tables are counted per run, not per pixel."""
    rng = np.random.default_rng(11)
    truth = blocky_labels(rng, 3, 8, 16, width=4)
    pred = np.roll(blocky_labels(rng, 3, 8, 16, width=8), 2, axis=2)
    assert rand_index(truth, pred) == pytest.approx(reference_rand_index(truth, pred), abs=1e-12)


@pytest.mark.parametrize("run_length", [1, 3, 16])
def test_code_counts_equal_a_per_pixel_count(run_length):
    rng = np.random.default_rng(run_length)
    codes = np.repeat(rng.integers(0, 40, size=600), run_length).astype(np.uint16)
    expected = np.array([np.count_nonzero(codes == value) for value in range(50)])
    np.testing.assert_array_equal(metrics._code_counts(codes, 50), expected)


def test_rand_index_with_arbitrary_int_ids():
    """Wide-ranging and negative ids (the compacting path) give the same as small ids."""
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 4, size=(4, 5, 4)).astype(np.int32)
    pred = rng.integers(0, 4, size=(4, 5, 4)).astype(np.int32)
    id_map = np.array([0, 70_000, -5, 1_000_000_007 % 2**31], np.int64)
    wide_truth, wide_pred = id_map[truth], id_map[pred] - 3
    expected = reference_rand_index(truth, pred)
    assert rand_index(wide_truth, wide_pred) == pytest.approx(expected, abs=1e-12)
    assert rand_index(truth, pred) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("truth, pred, expected", [
    ([[1, 1, 2, 2]], [[0, 0, 1, 2]], 4 / 7),  # scikit-learn's documented example: 0.57
    ([[1, 1, 1, 1]], [[0, 1, 2, 3]], 0.0),  # one structure split into singletons
    ([[3, 3, 3, 3]], [[5, 5, 5, 5]], 1.0),  # one structure, one prediction: max index = expected index
    ([[1, 2, 3, 4]], [[9, 8, 7, 6]], 1.0),  # all singletons in both
    ([[0, 0, 4, 0]], [[1, 2, 3, 1]], 1.0),  # a single foreground pixel
    ([[1, 1, 2, 2]], [[7, 7, 3, 3]], 1.0),  # identical partitions, other ids
    ([[0, 5, 5, 6, 6, 0]], [[1, 2, 2, 3, 3, 4]], 1.0),  # background pixels do not count
])
def test_rand_index_degenerate_and_known_cases(truth, pred, expected):
    truth, pred = np.array(truth)[:, None, :], np.array(pred)[:, None, :]
    assert rand_index(truth, pred) == pytest.approx(expected, abs=1e-12)
    assert reference_rand_index(truth, pred) == pytest.approx(expected, abs=1e-12)


def test_rand_index_skips_images_without_structures():
    truth = np.array([[[1, 1, 2, 2]], [[0, 0, 0, 0]]])
    pred = np.array([[[0, 0, 1, 2]], [[3, 4, 5, 6]]])
    assert rand_index(truth, pred) == pytest.approx(4 / 7, abs=1e-12)
    assert np.isnan(metrics.adjusted_rand_per_image(truth, pred)[1])
    assert np.isnan(rand_index(np.zeros((2, 3, 3), int), np.ones((2, 3, 3), int)))


def write_pair(tmp_path, pred_order=None):
    names = ["0.png", "1.png"]
    truth = np.zeros((2, 3, 3), np.uint8)
    truth[:, :, :] = TRUTH
    pred = PRED.astype(np.uint8)
    write_label_csv(tmp_path / "truth.csv", truth, names)
    order = pred_order or [0, 1]
    write_label_csv(tmp_path / "pred.csv", pred[order], [names[i] for i in order])
    return tmp_path / "truth.csv", tmp_path / "pred.csv"


def test_cli_prints_the_scores(tmp_path, capsys):
    truth_path, pred_path = write_pair(tmp_path, pred_order=[1, 0])  # columns matched by name
    metrics.main(["--truth", str(truth_path), "--pred", str(pred_path), "--num_classes", "5"])
    out = capsys.readouterr().out
    assert f"per-class Dice: {17 / 45:.4f}" in out
    expected_rand = reference_rand_index(TRUTH, PRED)
    assert f"Rand index (adjusted, truth != 0): {expected_rand:.4f}" in out
    assert "spleen" not in out and "0.8000" in out


def test_cli_names_missing_columns(tmp_path, capsys):
    truth_path, _ = write_pair(tmp_path)
    write_label_csv(tmp_path / "partial.csv", PRED[:1].astype(np.uint8), ["0.png"])
    with pytest.raises(SystemExit) as exit_info:
        metrics.run_cli(metrics.main, ["--truth", str(truth_path), "--pred", str(tmp_path / "partial.csv")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "partial.csv" in err and "1.png" in err and "\n" not in err


def test_cli_rejects_labels_beyond_num_classes(tmp_path, capsys):
    truth_path, pred_path = write_pair(tmp_path)
    with pytest.raises(SystemExit):
        metrics.run_cli(metrics.main, ["--truth", str(truth_path), "--pred", str(pred_path), "--num_classes", "3"])
    assert "--num_classes 0" in capsys.readouterr().err


# ==== partial labels: only annotated classes are scored ====
def test_restrict_to_annotated_by_hand():
    prediction = np.array([[0, 1, 2], [3, 2, 1], [2, 2, 0]], np.uint8)
    predictions = np.stack([prediction, prediction])
    annotated = np.array([[False, True, False, True],     # slice 0: classes 1 and 3
                          [True, False, True, False]])    # slice 1: class 2
    restricted = metrics.restrict_to_annotated(predictions, annotated)
    expected = np.array([[[0, 1, 0], [3, 0, 1], [0, 0, 0]],
                         [[0, 0, 2], [0, 2, 0], [2, 2, 0]]], np.uint8)
    assert restricted.dtype == np.uint8
    np.testing.assert_array_equal(restricted, expected)
    assert not annotated[0, 0]                             # the caller's array is left alone
    np.testing.assert_array_equal(predictions[0], prediction)


def test_score_predictions_with_annotated_classes_by_hand():
    truth = np.array([[[1, 1, 0], [0, 2, 2], [0, 0, 0]]])
    predictions = np.array([[[1, 0, 3], [0, 2, 2], [3, 1, 0]]])
    annotated = np.array([[False, True, True, False]])    # class 3 is not annotated here
    # Scored prediction: the two 3s become 0 → [[1,0,0],[0,2,2],[0,1,0]].
    # Dice: class 1 |G| 2, |P| 2, |G∩P| 1 → 1/2; class 2 → 1; class 3 empty in both → NaN.
    # Rand index on truth != 0: truth {1,1,2,2} vs prediction {1,0,2,2}: Σ C(n_ij) = 1,
    # Σ C(a_i) = 2, Σ C(b_j) = 1, C(4) = 6 → (1 − 2/6) / (3/2 − 2/6) = 4/7.
    scores = metrics.score_predictions(truth, predictions, 4, annotated)
    np.testing.assert_allclose(scores["per_class_dice"], [np.nan, 0.5, 1.0, np.nan])
    assert scores["dice"] == pytest.approx(0.75) and scores["rand"] == pytest.approx(4 / 7)
    # the foreground fractions are of the raw prediction: 6 of 9 pixels, truth 4 of 9
    assert scores["fg_pred"] == pytest.approx(6 / 9) and scores["fg_true"] == pytest.approx(4 / 9)
    # without the annotation the two 3s are false positives: class 3 Dice 0 → (1/2 + 1 + 0) / 3
    unrestricted = metrics.score_predictions(truth, predictions, 4)
    assert unrestricted["dice"] == pytest.approx(0.5)
    assert unrestricted["per_class_dice"][3] == 0.0


# ---------------------------------------------------------------- predicted vs true area per class
# Two 2×5 images (10 pixels each), classes 0..3, counted by hand:
#   class 1: true 2 (image 0), predicted 7 (image 0) → ratio 7/2 = 3.5 > 3 → sink
#   class 2: true 4 (image 1), predicted 0            → ratio 0, 0 < 0.1·4 → missing
#   class 3: neither true nor predicted               → NaN, not judged
AREA_TRUTH = np.array([[[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]],
                       [[2, 2, 2, 2, 0], [0, 0, 0, 0, 0]]])
AREA_PRED = np.array([[[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]],
                      [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]])


def test_class_area_report_flags_a_sink_and_a_missing_class():
    report = metrics.class_area_report(AREA_TRUTH, AREA_PRED, 4)
    assert report["predicted"].tolist() == [13, 7, 0, 0]
    assert report["true"].tolist() == [14, 2, 4, 0]
    assert np.isnan(report["ratio"][0]) and np.isnan(report["ratio"][3])
    assert report["ratio"][1] == pytest.approx(3.5) and report["ratio"][2] == 0
    assert report["sink"].tolist() == [False, True, False, False]
    assert report["missing"].tolist() == [False, False, True, False]
    assert metrics.area_summary(report) == {"worst_area_ratio": 3.5, "sink_classes": 1,
                                            "missing_classes": 1}
    text = metrics.format_area_report(report, {1: "liver", 2: "spleen"})
    rows = {line.split()[1]: line for line in text.splitlines()[1:-1]}
    assert set(rows) == {"liver", "spleen"}
    assert rows["liver"].endswith("SINK") and rows["spleen"].endswith("MISSING")
    assert "sinks (predicted > 3x true area): liver" in text.splitlines()[-1]
    assert text.splitlines()[-1].endswith("missing (< 0.1 of true area predicted): spleen")
    assert metrics.format_area_flags(report) == ("sinks (predicted > 3x true area): 1; "
                                                 "missing (< 0.1 of true area predicted): 2")


def test_class_area_report_judges_a_class_only_where_it_was_annotated():
    # class 1 annotated only on image 1 (neither true nor predicted there): no longer judged;
    # class 2 annotated on both images: still missing.
    annotated = np.array([[True, False, True, False], [True, True, True, False]])
    report = metrics.class_area_report(AREA_TRUTH, AREA_PRED, 4, annotated)
    assert report["predicted"][1:].tolist() == [0, 0, 0] and report["true"][1:].tolist() == [0, 4, 0]
    assert report["judged_pixels"][1:].tolist() == [10, 20, 0]
    assert np.isnan(report["ratio"][1]) and not report["sink"].any()
    assert report["missing"].tolist() == [False, False, True, False]
    nothing_judged = metrics.area_summary(metrics.class_area_report(AREA_TRUTH, AREA_PRED, 4,
                                                                    np.zeros((2, 4), bool)))
    assert math.isnan(nothing_judged.pop("worst_area_ratio"))
    assert nothing_judged == {"sink_classes": 0, "missing_classes": 0}


def test_class_area_ratio_has_a_floor_for_tiny_true_areas():
    # class 3 never true; the floor is min_area_fraction × judged pixels = 0.1 × 20 = 2 pixels
    truth = np.zeros((2, 2, 5), int)
    one_pixel, seven_pixels = truth.copy(), truth.copy()
    one_pixel[0, 0, 0] = 3
    seven_pixels.reshape(-1)[:7] = 3
    few = metrics.class_area_report(truth, one_pixel, 4, min_area_fraction=0.1)
    many = metrics.class_area_report(truth, seven_pixels, 4, min_area_fraction=0.1)
    assert few["ratio"][3] == pytest.approx(1 / 2) and not few["sink"][3]
    assert many["ratio"][3] == pytest.approx(7 / 2) and many["sink"][3]
    assert not few["missing"].any() and not many["missing"].any()


def test_class_area_report_rejects_bad_input():
    with pytest.raises(ValueError, match="labels must be in"):
        metrics.class_area_report(AREA_TRUTH, AREA_PRED, 2)
    with pytest.raises(ValueError, match="annotated must be"):
        metrics.class_area_report(AREA_TRUTH, AREA_PRED, 4, np.ones((2, 3), bool))
