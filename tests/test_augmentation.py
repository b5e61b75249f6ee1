"""The augmentation of the datasets: known affines by hand, and the same draws through the
torchvision.transforms.v2 functions they replaced give the same pixels up to interpolation."""
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from dataloaders.datasets import (AffineDraw, GeometricAugmentation, IntensityAugmentation, LabeledSlices,
                                  UnlabeledSlices, normalize, outside_air_mask, resize, resize_mask, warp)
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


@pytest.mark.parametrize("seed", range(6))
def test_same_intensity_draw_as_torchvision_functions(seed):
    image = warp(phantom()[0], AffineDraw(7.0, (3, -2), 1.1).matrix(128))
    draw = IntensityAugmentation().draw(np.random.default_rng(seed), image.shape)
    expected = torch.from_numpy(image)[None].float() / 255
    jitter = [lambda x: v2.functional.adjust_brightness(x, draw.brightness),
              lambda x: v2.functional.adjust_contrast(x, draw.contrast)]
    if draw.brightness is not None:
        for step in (jitter if draw.brightness_first else jitter[::-1]):
            expected = step(expected)
    if draw.gamma is not None:
        expected = expected.clamp(0, 1) ** draw.gamma
    if draw.blur_sigma is not None:
        expected = v2.functional.gaussian_blur(expected, [5, 5], [draw.blur_sigma, draw.blur_sigma])
    if draw.noise is not None:
        expected = (expected + torch.from_numpy(draw.noise)).clamp(0, 1)
    np.testing.assert_allclose(IntensityAugmentation.apply(image, draw), expected[0].numpy(), atol=2e-6)


def test_intensity_draws_follow_their_probabilities_and_noise_is_gaussian():
    rng = np.random.default_rng(1)
    draws = [IntensityAugmentation().draw(rng, (64, 64)) for _ in range(600)]
    assert 0.75 < np.mean([d.brightness is not None for d in draws]) < 0.85
    for field in ("gamma", "blur_sigma", "noise"):
        assert 0.44 < np.mean([getattr(d, field) is not None for d in draws]) < 0.56
    gammas = np.array([d.gamma for d in draws if d.gamma is not None])
    assert 0.7 <= gammas.min() and gammas.max() <= 1.5
    noise = np.concatenate([d.noise.ravel() for d in draws if d.noise is not None])
    assert abs(noise.mean()) < 2e-4 and noise.std() == pytest.approx(0.03, rel=0.01)
    assert np.mean(np.abs(noise) < 0.03) == pytest.approx(0.6827, abs=0.003)   # within 1 sigma
    assert np.mean(np.abs(noise) < 0.06) == pytest.approx(0.9545, abs=0.002)   # within 2 sigma


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
    """weak = the warp of the geometry draw; s1, s2 = the next two intensity draws of the same
    generator; all three normalised as `normalize` does (bit for bit)."""
    data, norm = slices(), {"mean": 0.2345678, "std": 0.3141592}
    geometry = GeometricAugmentation(20.0, (0.8, 1.2), 0.1, False)
    sample = UnlabeledSlices(data.train_images, [2, 1], 128, norm, geometry, IntensityAugmentation())[(1, 7)]
    rng = np.random.default_rng(7)
    weak = warp(data.train_images[1], geometry.draw(rng, 128).matrix(128))
    assert torch.equal(sample["image_w"], normalize(torch.from_numpy(weak)[None], norm))
    for key in ("image_s1", "image_s2"):
        strong = IntensityAugmentation.apply(weak, IntensityAugmentation().draw(rng, weak.shape))
        assert torch.equal(sample[key], normalize(torch.from_numpy(strong)[None], norm))
