"""Post-processing, outside-air mask and the watershed baseline, against hand-built maps."""
from math import comb

import numpy as np

from dataloaders.datasets import outside_air_mask
from utils.postprocess import (keep_largest_component, postprocess,
                               remove_small_components, watershed_baseline)


def parse_map(text):
    """Rows of digits -> (H, W) int64 class map (readable hand-built fixtures)."""
    return np.array([[int(c) for c in row] for row in text.split()], np.int64)


SMALL_BLOBS = parse_map("""
    1110000000
    0000022200
    0000000000
    1100010000
    1110001000
    0000000100
    0000000010
    0000000001
    3300000000
    3000000000
""")
# class 1: a 3-pixel bar (top left) and a 5-pixel blob (left); a 5-pixel diagonal chain (right).
# class 2: a 3-pixel bar touching nothing. class 3: a 3-pixel L.
# 8-connectivity: the diagonal chain is one 5-pixel component, kept at min_size 4.
SMALL_BLOBS_CLEANED = parse_map("""
    0000000000
    0000000000
    0000000000
    1100010000
    1110001000
    0000000100
    0000000010
    0000000001
    0000000000
    0000000000
""")


def test_remove_small_components_by_hand():
    cleaned = remove_small_components(SMALL_BLOBS, min_size=4)
    np.testing.assert_array_equal(cleaned, SMALL_BLOBS_CLEANED)
    assert cleaned.dtype == SMALL_BLOBS.dtype
    # At min_size 6 the 5-pixel components go too; the input is never modified.
    assert not remove_small_components(SMALL_BLOBS, min_size=6).any()
    assert (SMALL_BLOBS == 2).sum() == 3
    np.testing.assert_array_equal(remove_small_components(SMALL_BLOBS, 0), SMALL_BLOBS)


def test_components_are_per_class_and_per_slice():
    # Two 3-pixel bars of different classes touching each other: two components, both removed.
    touching = parse_map("""
        0000
        1112
        0022
        0000
    """)
    assert not remove_small_components(touching, min_size=4).any()
    # The same 2-pixel blob in two consecutive slices must not join across slices.
    stack = np.zeros((2, 4, 4), np.uint8)
    stack[:, 1, 1:3] = 5
    assert not remove_small_components(stack, min_size=3).any()
    np.testing.assert_array_equal(remove_small_components(stack, min_size=2), stack)


def test_stack_equals_slice_by_slice():
    stack = np.stack([SMALL_BLOBS, SMALL_BLOBS.T, np.zeros_like(SMALL_BLOBS)])
    expected = np.stack([SMALL_BLOBS_CLEANED, SMALL_BLOBS_CLEANED.T, np.zeros_like(SMALL_BLOBS)])
    np.testing.assert_array_equal(remove_small_components(stack, 4), expected)


LARGEST = parse_map("""
    1100022000
    1100022000
    1100000000
    0000000000
    0001100220
    0001100000
    0000000000
    1000000000
    1000000000
    0000000000
""")
# class 1: components of 6, 4 and 2 pixels; class 2: components of 4 and 2 pixels.


def test_keep_largest_component_by_hand():
    kept = keep_largest_component(LARGEST, classes=[1])
    expected = LARGEST.copy()
    expected[4:6, 3:5] = 0
    expected[7:9, 0] = 0
    np.testing.assert_array_equal(kept, expected)
    assert (kept == 2).sum() == 6  # class 2 untouched
    both = keep_largest_component(LARGEST, classes=[1, 2])
    expected[4, 7:9] = 0
    np.testing.assert_array_equal(both, expected)
    # Absent classes are a no-op.
    np.testing.assert_array_equal(keep_largest_component(LARGEST, classes=[7]), LARGEST)


def test_keep_largest_component_per_slice_and_ties():
    small_first = np.zeros((6, 6), np.int32)
    small_first[0, 0] = 1          # 1 pixel
    small_first[3:5, 3:5] = 1      # 4 pixels
    # Slice 0: a 6-pixel bar and a 4-pixel square. Slice 1: a 1-pixel dot (over slice 0's bar,
    # so joining slices would merge them) and a 4-pixel square, smaller than slice 0's bar.
    stack = np.stack([LARGEST[:6, :6].astype(np.int32), small_first])
    kept = keep_largest_component(stack, classes=[1])
    assert (kept[0] == 1).sum() == 6 and kept[0, :3, :2].all()
    assert (kept[1] == 1).sum() == 4 and kept[1, 3:5, 3:5].all()
    tie = np.zeros((5, 5), np.uint8)
    tie[0, 0:2] = 3
    tie[4, 3:5] = 3
    kept_tie = keep_largest_component(tie, classes=[3])
    assert kept_tie[0, 0:2].all() and not kept_tie[4].any()


def test_postprocess_combines_both():
    result = postprocess(LARGEST, min_size=3, single_instance=[1])
    expected = np.zeros_like(LARGEST)
    expected[0:3, 0:2] = 1
    expected[0:2, 5:7] = 2
    np.testing.assert_array_equal(result, expected)


def test_outside_air_mask_by_hand():
    image = parse_map("""
        00000000
        05555550
        05005550
        05005500
        05555550
        05505550
        05550550
        00000000
    """).astype(np.uint8) * 40
    # The 2x2 hole is enclosed: not outside air. The channel in row 3 reaches the border: air.
    # (6, 4) opens onto the bottom border row: air. (5, 3) touches (6, 4) only by a corner: not
    # air under 4-connectivity.
    expected = image == 0
    expected[2:4, 2:4] = False
    expected[5, 3] = False
    mask = outside_air_mask(image, threshold=10)
    np.testing.assert_array_equal(mask, expected)
    # The threshold is strict: grey level 200 is not dark at threshold 200, is at 201.
    assert not outside_air_mask(image, threshold=200)[image == 200].any()
    assert outside_air_mask(image, threshold=201).all()
    stacked = outside_air_mask(np.stack([image, np.full_like(image, 200)]))
    np.testing.assert_array_equal(stacked[0], expected)
    assert not stacked[1].any()


def adjusted_rand_index(truth, pred):
    """Hubert & Arabie ARI from the contingency table, on pixels where truth > 0 (README,
    Metrics)."""
    keep = truth > 0
    pairs = {}
    for a, b in zip(truth[keep].tolist(), pred[keep].tolist()):
        pairs[a, b] = pairs.get((a, b), 0) + 1
    rows, cols = {}, {}
    for (a, b), count in pairs.items():
        rows[a] = rows.get(a, 0) + count
        cols[b] = cols.get(b, 0) + count
    index = sum(comb(n, 2) for n in pairs.values())
    row_sum = sum(comb(n, 2) for n in rows.values())
    col_sum = sum(comb(n, 2) for n in cols.values())
    expected = row_sum * col_sum / comb(int(keep.sum()), 2)
    return (index - expected) / ((row_sum + col_sum) / 2 - expected)


def synthetic_slice(seed):
    """A dark body ellipse with three bright flat disks on black air, light noise (96 x 96)."""
    size = 96
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - 48) / 38) ** 2 + ((xx - 48) / 44) ** 2 < 1
    truth = np.where(body, 4, 0)
    image = np.where(body, 70.0, 0.0)
    for structure, (cy, cx) in enumerate([(34, 28), (34, 68), (64, 48)], start=1):
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < 10 ** 2
        truth[disk] = structure
        image[disk] = 200
    noise = np.random.default_rng(seed).normal(0, 3, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), truth, body


def test_watershed_baseline_separates_flat_disks():
    slices = [synthetic_slice(seed) for seed in (0, 1)]
    images = np.stack([image for image, _, _ in slices])
    labels = watershed_baseline(images)
    assert labels.shape == images.shape and labels.dtype == np.int32
    for label, (_, truth, body) in zip(labels, slices):
        assert adjusted_rand_index(truth, label) > 0.9
        # Air well away from the body edge is 0; the body is covered by structures.
        yy, xx = np.mgrid[:96, :96]
        far_air = ((yy - 48) / 42) ** 2 + ((xx - 48) / 48) ** 2 > 1
        assert (label[far_air] == 0).all()
        assert (label[body] > 0).mean() > 0.99
    single = watershed_baseline(images[0])
    np.testing.assert_array_equal(single, labels[0])


def test_adjusted_rand_index_helper_by_hand():
    # Identical partitions up to renaming -> 1; the known 6-element example of Hubert & Arabie
    # style: truth {a,a,a,b,b,b}, pred {x,x,y,y,z,z}: index 2, rows 6, cols 3, expected 18/15.
    truth = np.array([1, 1, 1, 2, 2, 2])
    assert adjusted_rand_index(truth, truth * 7) == 1.0
    expected = (2 - 18 / 15) / ((6 + 3) / 2 - 18 / 15)
    assert abs(adjusted_rand_index(truth, np.array([5, 5, 6, 6, 8, 8])) - expected) < 1e-12
