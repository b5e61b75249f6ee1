"""The augmentation of the datasets: known affines and intensity changes by hand, and the same
draws through the torchvision.transforms.v2 functions (or OpenCV, scipy) give the same pixels up
to interpolation."""
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import default_collate
from torchvision.transforms import v2

from dataloaders.datasets import (STRONG_DRAW_FIELDS, AffineDraw, GeometricAugmentation, IntensityAugmentation,
                                  LabeledSlices, UnlabeledSlices, normalize, outside_air_mask, resize, resize_mask,
                                  strong_views, warp)
from dataloaders.phantom import render_slice

PATTERN = np.arange(1, 26, dtype=np.uint8).reshape(5, 5) * 9  # every pixel different


def test_a_90_degree_rotation_turns_the_array_clockwise():
    matrix = AffineDraw(angle=90.0, translate=(0, 0), scale=1.0).matrix(5)
    # by hand: the top row (left to right) becomes the right column (top to bottom)
    expected = np.array([[PATTERN[4 - col, row] for col in range(5)] for row in range(5)])
    np.testing.assert_array_equal(warp(PATTERN, matrix), expected)
    np.testing.assert_array_equal(warp(PATTERN, matrix, nearest=True), expected)


def test_an_integer_shift_moves_pixels_and_fills_zero():
    matrix = AffineDraw(angle=0.0, translate=(2, -1), scale=1.0).matrix(5)
    expected = np.zeros_like(PATTERN)
    expected[0:4, 2:5] = PATTERN[1:5, 0:3]  # x + 2, y - 1
    np.testing.assert_array_equal(warp(PATTERN, matrix), expected)
    np.testing.assert_array_equal(warp(PATTERN, matrix, nearest=True), expected)


def test_flip_mirrors_left_and_right():
    matrix = AffineDraw(angle=0.0, translate=(0, 0), scale=1.0, flip=True).matrix(5)
    np.testing.assert_array_equal(warp(PATTERN, matrix), PATTERN[:, ::-1])


@pytest.mark.parametrize("angle, translate, scale", [(17.3, (4, -6), 0.87), (-20.0, (0, 3), 1.2)])
def test_the_matrix_is_opencvs_rotation_about_the_centre_plus_the_shift(angle, translate, scale):
    # cv2 turns counter-clockwise on screen for a positive angle, torchvision's convention clockwise
    expected = cv2.getRotationMatrix2D((63.5, 63.5), -angle, scale)
    expected[:, 2] += translate
    np.testing.assert_allclose(AffineDraw(angle, translate, scale).matrix(128), expected, rtol=0, atol=1e-12)


def test_draws_stay_in_the_configured_ranges():
    geometry = GeometricAugmentation(rotate=20.0, scale=(0.8, 1.2), translate=0.1, flip=False)
    rng = np.random.default_rng(0)
    draws = [geometry.draw(rng, 64) for _ in range(400)]
    angles = np.array([d.angle for d in draws])
    scales = np.array([d.scale for d in draws])
    shifts = np.array([d.translate for d in draws])
    assert -20 <= angles.min() < -18 and 18 < angles.max() <= 20
    assert 0.8 <= scales.min() < 0.82 and 1.18 < scales.max() <= 1.2
    assert np.abs(shifts).max() == 6 and np.all(shifts == np.round(shifts))  # 0.1·64 = 6.4 → ±6 px
    assert not any(d.flip for d in draws)
    flips = [GeometricAugmentation(0, (1, 1), 0, True).draw(rng, 64).flip for _ in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


def phantom(size=128, index=0):
    image, mask = render_slice(0, index, size)
    return image, mask


@pytest.mark.parametrize("seed", range(4))
def test_same_geometric_draw_as_torchvision_affine(seed):
    image, mask = phantom()
    draw = GeometricAugmentation(20.0, (0.8, 1.2), 0.1, False).draw(np.random.default_rng(seed), 128)
    ours_image, ours_mask = warp(image, draw.matrix(128)), warp(mask, draw.matrix(128), nearest=True)
    arguments = dict(angle=draw.angle, translate=list(draw.translate), scale=draw.scale, shear=[0.0, 0.0])
    theirs_image = v2.functional.affine(torch.from_numpy(image)[None], **arguments,
                                        interpolation=v2.InterpolationMode.BILINEAR, fill=0)[0].numpy()
    theirs_mask = v2.functional.affine(torch.from_numpy(mask)[None], **arguments,
                                       interpolation=v2.InterpolationMode.NEAREST, fill=0)[0].numpy()
    # away from the edge of the warped field of view (where torchvision blends the fill twice)
    inside = warp(np.full_like(image, 255), draw.matrix(128), nearest=True) > 0
    inside[1:-1, 1:-1] &= inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    difference = np.abs(ours_image.astype(int) - theirs_image)[inside]
    assert difference.max() <= 2 and difference.mean() < 0.5
    assert (ours_mask == theirs_mask)[inside].mean() > 0.99


# ==== strong views: draws in the worker, applied to the batch ====
IDENTITY = dict(brightness=1.0, contrast=1.0, brightness_first=1.0, gamma=1.0, blur_sigma=0.0,
                noise_std=0.0, noise_seed=0.0, norm_mean=0.0, norm_std=1.0)


def draw_row(**changes):
    """One view's row of STRONG_DRAW_FIELDS: the identity except `changes`."""
    values = {**IDENTITY, **changes}
    return [values[name] for name in STRONG_DRAW_FIELDS]


def strong_batch(images, rows):
    """uint8 `(B, S, S)` images and two rows per image -> strong_views' input batch."""
    images = torch.as_tensor(np.asarray(images))
    return {"image_w_uint8": images[:, None],
            "strong_draws": torch.tensor(rows, dtype=torch.float64).view(len(images), 2, -1)}


def test_contrast_blends_toward_the_image_mean_by_hand():
    image = np.zeros((1, 4, 4), np.uint8)
    image[0, :, 2:] = 255                                   # mean 0.5
    views = strong_views(strong_batch(image, [draw_row(contrast=0.5), draw_row(contrast=1.2)]))
    # 0.5·x + 0.5·0.5: 0 -> 0.25, 1 -> 0.75; 1.2·x - 0.2·0.5 clipped: 0 -> 0, 1 -> 1
    np.testing.assert_allclose(views["image_s1"][0, 0, 0].numpy(), [0.25, 0.25, 0.75, 0.75], atol=1e-7)
    np.testing.assert_allclose(views["image_s2"][0, 0, 0].numpy(), [0, 0, 1, 1], atol=1e-7)


def test_brightness_first_changes_the_mean_contrast_sees_by_hand():
    image = np.full((1, 4, 4), 255, np.uint8)
    image[0, 0] = 0                                         # one row of 0: mean 0.75
    rows = [draw_row(brightness=1.2, contrast=0.5, brightness_first=1.0),
            draw_row(brightness=1.2, contrast=0.5, brightness_first=0.0)]
    views = strong_views(strong_batch(image, rows))
    # brightness first: 0 -> 0, 1 -> 1.2 clipped to 1, mean still 0.75; contrast: 0.375, 0.875
    np.testing.assert_allclose(views["image_s1"][0, 0, :, 0].numpy(), [0.375, 0.875, 0.875, 0.875], atol=1e-7)
    # contrast first (mean 0.75): 0 -> 0.375, 1 -> 0.875; then ×1.2 clipped: 0.45, 1
    np.testing.assert_allclose(views["image_s2"][0, 0, :, 0].numpy(), [0.45, 1.0, 1.0, 1.0], atol=1e-6)


def test_the_batch_matches_per_image_torchvision_and_opencv():
    """Random draws on three phantom slices: each view against its own per-image computation
    with torchvision's jitter functions, a power, OpenCV's 5×5 Gaussian blur (reflect-101)."""
    images = np.stack([warp(phantom(64, index)[0], AffineDraw(9.0 * index, (index, -1), 1.1).matrix(64))
                       for index in range(3)])
    rng = np.random.default_rng(5)
    rows = [IntensityAugmentation(noise_sigma=0.0).draw(rng, {"mean": 0.2, "std": 0.5}) for _ in range(6)]
    rows[0][:6] = [1.3, 0.7, 1.0, 1.4, 1.2, 0.0]            # every operation on, brightness first
    rows[1][:6] = [0.8, 1.25, 0.0, 0.75, 0.6, 0.0]          # every operation on, contrast first
    views = strong_views(strong_batch(images, rows))
    for position, row in enumerate(rows):
        draw = dict(zip(STRONG_DRAW_FIELDS, row))
        expected = torch.from_numpy(images[position // 2])[None].float() / 255
        jitter = [lambda x: v2.functional.adjust_brightness(x, draw["brightness"]),
                  lambda x: v2.functional.adjust_contrast(x, draw["contrast"])]
        for step in (jitter if draw["brightness_first"] else jitter[::-1]):
            expected = step(expected)
        expected = expected ** draw["gamma"]
        if draw["blur_sigma"] > 0:
            expected = torch.from_numpy(cv2.GaussianBlur(expected[0].numpy(), (5, 5), draw["blur_sigma"],
                                                         borderType=cv2.BORDER_REFLECT_101))[None]
        ours = views[f"image_s{position % 2 + 1}"][position // 2]
        np.testing.assert_allclose(ours.numpy(), ((expected - 0.2) / 0.5).numpy(), atol=2e-6)


def test_blur_matches_scipy_gaussian_filter_truncated_to_5x5():
    image = (np.random.default_rng(0).random((1, 16, 16)) * 255).astype(np.uint8)
    views = strong_views(strong_batch(image, [draw_row(blur_sigma=0.8), draw_row(blur_sigma=1.5)]))
    for key, sigma in (("image_s1", 0.8), ("image_s2", 1.5)):
        # scipy's "mirror" is reflect-101; truncate · sigma = 2 pixels: the 5-tap kernel
        expected = ndimage.gaussian_filter(image[0] / np.float64(255), sigma, mode="mirror", truncate=2 / sigma)
        np.testing.assert_allclose(views[key][0, 0].numpy(), expected, atol=1e-6)


def test_operations_that_are_off_leave_the_weak_view_bit_for_bit():
    data, norm = slices(size=64), {"mean": 0.2345678, "std": 0.3141592}
    sample = UnlabeledSlices(data.train_images, [0], 64, norm, GeometricAugmentation(20.0, (0.8, 1.2), 0.1, False),
                             IntensityAugmentation(jitter=0.0, gamma_range=(1, 1), blur_sigma=(0, 0),
                                                   noise_sigma=0.0))[(0, 3)]
    views = strong_views(default_collate([sample]))
    assert torch.equal(views["image_s1"], views["image_w"]) and torch.equal(views["image_s2"], views["image_w"])


def test_noise_is_gaussian_and_follows_the_view_seed_whatever_the_batch():
    grey = np.full((4, 64, 64), 128, np.uint8)               # far from the clip at 0 and 1
    drawn = np.random.default_rng(0).integers(2 ** 53, size=8)   # noise seed per view, as a worker draws it
    rows = [draw_row(noise_std=0.03, noise_seed=float(seed)) for seed in drawn]
    views = strong_views(strong_batch(grey, rows))
    noise = torch.stack([views["image_s1"], views["image_s2"]], 1).flatten(0, 1).view(8, -1) - 128 / 255
    assert abs(noise.mean()) < 1e-3 and noise.std().item() == pytest.approx(0.03, rel=0.02)
    assert (noise.abs() < 0.03).float().mean().item() == pytest.approx(0.6827, abs=0.01)   # within 1 sigma
    assert (noise.abs() < 0.06).float().mean().item() == pytest.approx(0.9545, abs=0.005)  # within 2 sigma
    assert abs(np.corrcoef(noise[:2].numpy())[0, 1]) < 0.05                                # independent views
    # the third view (first of the second image) alone, in a batch of one, as a second view
    alone = strong_views(strong_batch(grey[:1], [draw_row(), rows[2]]))
    assert torch.equal(alone["image_s2"][0], views["image_s1"][1])


def test_strong_views_stay_float32_under_autocast():
    image = np.random.default_rng(1).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    batch = strong_batch(image, [draw_row(gamma=1.3, blur_sigma=0.7, noise_std=0.03, noise_seed=5.0)] * 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = strong_views(batch)
    plain = strong_views(batch)
    assert under["image_s1"].dtype == torch.float32 and torch.equal(under["image_s1"], plain["image_s1"])


def test_intensity_draws_follow_their_probabilities_and_ranges():
    rng = np.random.default_rng(1)
    draws = np.array([IntensityAugmentation().draw(rng, {"mean": 0.1, "std": 0.2}) for _ in range(2000)])
    field = {name: draws[:, column] for column, name in enumerate(STRONG_DRAW_FIELDS)}
    jittered = field["brightness"] != 1
    assert 0.77 < jittered.mean() < 0.83 and np.array_equal(jittered, field["contrast"] != 1)
    for name in ("brightness", "contrast"):
        assert 0.7 <= field[name].min() < 0.71 and 1.29 < field[name].max() <= 1.3
    assert 0.45 < field["brightness_first"][jittered].mean() < 0.55
    gammas = field["gamma"][field["gamma"] != 1]
    assert 0.46 < len(gammas) / 2000 < 0.54 and 0.7 <= gammas.min() and gammas.max() <= 1.5
    # log-uniform: P(gamma < 1) = log(1 / 0.7) / log(1.5 / 0.7) = 0.468
    assert np.mean(gammas < 1) == pytest.approx(0.468, abs=0.04)
    sigmas = field["blur_sigma"][field["blur_sigma"] > 0]
    assert 0.46 < len(sigmas) / 2000 < 0.54 and 0.1 <= sigmas.min() and sigmas.max() <= 1.5
    assert set(field["noise_std"]) == {0.0, 0.03} and 0.46 < np.mean(field["noise_std"] > 0) < 0.54
    noise_seed = field["noise_seed"]
    assert np.all(noise_seed == np.floor(noise_seed)) and len(set(noise_seed)) == 2000 and noise_seed.max() < 2 ** 53
    assert set(field["norm_mean"]) == {0.1} and set(field["norm_std"]) == {0.2}


def slices(size=128, count=3):
    images, masks = zip(*(phantom(size, index) for index in range(count)))
    return SimpleNamespace(train_images=np.stack(images), train_masks=np.stack(masks),
                           annotated=np.ones((count, 15), bool))


def test_evaluation_view_is_the_shared_resize_and_normalize():
    data, norm = slices(), {"mean": 0.2, "std": 0.3}
    sample = LabeledSlices(data, [2, 0], 64, norm)[1]
    raw = torch.from_numpy(data.train_images[0])[None]
    assert torch.equal(sample["image"], normalize(resize(raw, 64), norm))
    np.testing.assert_array_equal(sample["mask"].numpy(), resize_mask(data.train_masks[0], 64))
    np.testing.assert_array_equal(sample["certain_background"].numpy(),
                                  outside_air_mask(resize(raw, 64)[0].numpy()))
    assert sample["mask"].dtype == torch.int64 and sample["certain_background"].dtype == torch.bool


def test_a_sample_seed_fixes_the_augmented_sample():
    data = slices()
    dataset = LabeledSlices(data, [0, 1, 2], 128, {"mean": 0.0, "std": 1.0},
                            augment=GeometricAugmentation(20.0, (0.8, 1.2), 0.1, False))
    first, again, other = dataset[(1, 42)], dataset[(1, 42)], dataset[(1, 43)]
    for key in ("image", "mask", "certain_background"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["image"], other["image"])
    # the image and both masks moved together: the mask's structures sit on the warped image
    draw = GeometricAugmentation(20.0, (0.8, 1.2), 0.1, False).draw(np.random.default_rng(42), 128)
    np.testing.assert_array_equal(first["mask"].numpy(), warp(data.train_masks[1], draw.matrix(128), nearest=True))
    air = outside_air_mask(data.train_images[1]).astype(np.uint8)
    np.testing.assert_array_equal(first["certain_background"].numpy(), warp(air, draw.matrix(128), nearest=True) > 0)


def test_unlabeled_views_follow_the_sample_seed_in_draw_order():
    """weak = the warp of the geometry draw, normalised as `normalize` does (bit for bit); the
    strong views' draws = the next two intensity draws of the same generator."""
    data, norm = slices(), {"mean": 0.2345678, "std": 0.3141592}
    geometry = GeometricAugmentation(20.0, (0.8, 1.2), 0.1, False)
    sample = UnlabeledSlices(data.train_images, [2, 1], 128, norm, geometry, IntensityAugmentation())[(1, 7)]
    rng = np.random.default_rng(7)
    weak = warp(data.train_images[1], geometry.draw(rng, 128).matrix(128))
    assert torch.equal(sample["image_w"], normalize(torch.from_numpy(weak)[None], norm))
    assert torch.equal(sample["image_w_uint8"], torch.from_numpy(weak)[None])
    expected = [IntensityAugmentation().draw(rng, norm) for _ in range(2)]
    assert torch.equal(sample["strong_draws"], torch.tensor(expected, dtype=torch.float64))
