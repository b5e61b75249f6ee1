"""Test-time augmentation (utils/inference.py): shifted and rescaled views are moved back onto the
slice before averaging, flipped views are flipped back, and a model that only looks at each
pixel's own value predicts the same with and without augmentation; class labels are the first
maximum of each pixel, after the background probability is scaled by `background_scale`."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from utils.inference import (Member, labels_from_probabilities, predict_ensemble, predict_probabilities,
                             predict_slices, shift_background)

NORM = {"mean": 0.0, "std": 1.0}  # uint8 0 / 255 → network input 0 / 1


def softmax(*logits):
    exps = [math.exp(value) for value in logits]
    return np.array(exps) / sum(exps)


class PerPixel(nn.Module):
    """Logits (0, 2·v, 2·(1 − v)) from each pixel's value v alone, plus `position_bias` on the
    last class over the left half of its input: without the bias a shift of the input shifts
    the output by the same amount, and linear interpolation of v interpolates the logits."""

    def __init__(self, position_bias=0.0):
        super().__init__()
        self.position_bias = position_bias

    def forward(self, x):
        value = x[:, :1]
        left = torch.zeros_like(value)
        left[..., : x.shape[-1] // 2] = self.position_bias
        return torch.cat([torch.zeros_like(value), 2 * value, 2 * (1 - value) + left], 1)


def block_image(size=256, block=(96, 160)):
    """`(1, size, size) uint8`: 0 with a 255 square block[0]:block[1] in both directions."""
    image = np.zeros((1, size, size), np.uint8)
    image[0, block[0]:block[1], block[0]:block[1]] = 255
    return image


# Away from the image border every view of a per-pixel model gives its own probabilities, whose
# largest is P (value 1: class 1 at logit 2; value 0: class 2 at logit 2). Within 4 pixels of
# the border a shifted view has no output (the shift's zero fill): its logits are 0 there, a
# uniform 1/3, mixed into the mean.
P = math.exp(2) / (math.exp(2) + 2)


@pytest.mark.parametrize("mode, views", [("shift", 7), ("shift_flip", 14)])
def test_a_per_pixel_model_predicts_the_same_with_shifted_and_scaled_views(mode, views):
    # 256 px: the scale views really resample (to 230 and 282 px)
    image = block_image()
    plain, plain_confidence = predict_slices(PerPixel(), image, 256, NORM, "cpu",
                                             with_confidence=True)
    labels, confidence = predict_slices(PerPixel(), image, 256, NORM, "cpu", tta=mode,
                                        with_confidence=True)
    expected_labels = np.where(image > 0, 1, 2)
    np.testing.assert_array_equal(plain, expected_labels)
    np.testing.assert_allclose(plain_confidence, P, rtol=1e-6)
    # the border's uniform share never changes the argmax, nor does blur at the block's edges
    np.testing.assert_array_equal(labels, expected_labels)

    # Exact P everywhere but the 4-pixel border and where the resampled scale views blur the
    # block's edges (2 pixels each side). Pixels 3 to 8 away from an edge are still checked: a
    # view moved back wrongly would put the other class's output there.
    exact = np.zeros((256, 256), bool)
    exact[4:-4, 4:-4] = True
    near_edge = np.zeros((256, 256), bool)
    near_edge[94:162, 94:162] = True
    near_edge[98:158, 98:158] = False
    np.testing.assert_allclose(confidence[0][exact & ~near_edge], P, rtol=1e-5)
    assert confidence[0, 96, 128] < P - 1e-3       # the scale views did resample the slice

    # Border: one shifted view in 7 (plus its flipped twin) has no output on each side's 4-pixel
    # band, two in 7 at the corners.
    fills_per_side = views // 7
    side = ((views - fills_per_side) * P + fills_per_side / 3) / views
    corner = ((views - 2 * fills_per_side) * P + 2 * fills_per_side / 3) / views
    for row, col in [(0, 50), (3, 50), (252, 50), (255, 50), (50, 0), (50, 3), (50, 252),
                     (50, 255)]:
        assert confidence[0, row, col] == pytest.approx(side, rel=1e-5), (row, col)
    for row, col in [(4, 50), (251, 50), (50, 4), (50, 251)]:
        assert confidence[0, row, col] == pytest.approx(P, rel=1e-5), (row, col)
    for row, col in [(0, 0), (0, 255), (255, 0), (255, 255), (3, 3)]:
        assert confidence[0, row, col] == pytest.approx(corner, rel=1e-5), (row, col)


def test_flipped_views_are_flipped_back():
    # Bright on the left quarter; the model adds +1 to class 2 on the left half of what it sees.
    # The flipped view sees the bright quarter on its right and puts its bias on the slice's
    # right half once flipped back, so the mean is, by region (logits of class 0, 1, 2):
    #   bright, left quarter:    ½[softmax(0, 2, 1) + softmax(0, 2, 0)]
    #   dark, either half:       ½[softmax(0, 0, 3) + softmax(0, 0, 2)]
    image = np.zeros((1, 64, 64), np.uint8)
    image[0, :, :16] = 255
    bright = (softmax(0, 2, 1) + softmax(0, 2, 0)) / 2
    dark = (softmax(0, 0, 3) + softmax(0, 0, 2)) / 2
    model = PerPixel(position_bias=1.0)
    batch = torch.from_numpy(image[:, None]).float() / 255
    mean = predict_probabilities(model, batch, [(0, 0, 1.0, False), (0, 0, 1.0, True)])[0]
    for cols, expected in ((slice(0, 16), bright), (slice(16, 32), dark), (slice(32, 64), dark)):
        np.testing.assert_allclose(mean[:, :, cols].permute(1, 2, 0).numpy(),
                                   np.broadcast_to(expected, (64, mean[:, :, cols].shape[-1], 3)),
                                   rtol=1e-5)

    # tta="flip" is exactly these two views; without it the bias stays on the left half
    labels, confidence = predict_slices(model, image, 64, NORM, "cpu", tta="flip",
                                        with_confidence=True)
    np.testing.assert_array_equal(labels[0, :, :16], bright.argmax())   # class 1
    np.testing.assert_array_equal(labels[0, :, 16:], dark.argmax())     # class 2
    np.testing.assert_allclose(confidence[0, :, :16], bright.max(), rtol=1e-5)
    np.testing.assert_allclose(confidence[0, :, 16:], dark.max(), rtol=1e-5)
    _, plain = predict_slices(model, image, 64, NORM, "cpu", with_confidence=True)
    np.testing.assert_allclose(plain[0, :, 16:32], softmax(0, 0, 3).max(), rtol=1e-5)
    np.testing.assert_allclose(plain[0, :, 32:], softmax(0, 0, 2).max(), rtol=1e-5)


def test_prediction_restores_the_training_mode_and_rejects_unknown_modes():
    model = PerPixel().train()
    predict_slices(model, block_image(64, (16, 48)), 64, NORM, "cpu", tta="shift_flip")
    assert model.training
    with pytest.raises(ValueError, match="tta must be one of"):
        predict_slices(model, block_image(64, (16, 48)), 64, NORM, "cpu", tta="spin")


def test_class_labels_are_the_first_maximum_of_each_pixel():
    rng = np.random.default_rng(0)
    probabilities = rng.random((3, 5, 7, 6)).astype(np.float32)
    probabilities[0, 2, 1, 1] = probabilities[0, 4, 1, 1] = 2.0  # a tie: the lower class wins
    probabilities[1, :, 2, 3] = 0.5  # all equal: class 0
    labels = labels_from_probabilities(torch.from_numpy(probabilities), "class")
    assert labels.dtype == np.uint8 and labels.shape == (3, 7, 6)
    expected = np.array([[[max(range(5), key=lambda c: (probabilities[b, c, y, x], -c))
                           for x in range(6)] for y in range(7)] for b in range(3)])
    np.testing.assert_array_equal(labels, expected)
    assert labels[0, 1, 1] == 2 and labels[1, 2, 3] == 0


def test_background_scale_multiplies_the_background_probability_before_the_argmax():
    # one pixel per row: (background, organ 1, organ 2)
    pixels = torch.tensor([[0.50, 0.30, 0.20],    # × 0.5 = 0.25 < 0.30: organ 1
                           [0.70, 0.20, 0.10],    # × 0.5 = 0.35 > 0.20: still background
                           [0.40, 0.25, 0.35],    # × 0.5 = 0.20 < 0.35: organ 2
                           [0.35, 0.45, 0.20],    # organ 1; × 2 = 0.70 > 0.45: background
                           [0.10, 0.60, 0.30],    # organ 1 at every scale here
                           [0.98, 0.01, 0.01]])   # background down to a scale of 1/98
    probabilities = pixels.T.reshape(1, 3, 2, 3)
    untouched = probabilities.clone()
    expected = {1.0: [0, 0, 0, 1, 1, 0], 0.5: [1, 0, 2, 1, 1, 0], 2.0: [0, 0, 0, 0, 1, 0],
                0.0: [1, 1, 2, 1, 1, 1]}                  # 0: background is never chosen
    for scale, labels in expected.items():
        assert labels_from_probabilities(probabilities, "class", scale).ravel().tolist() == labels
    torch.testing.assert_close(probabilities, untouched)  # the caller's probabilities unchanged


class ConstantProbabilities(nn.Module):
    """Log-probabilities (0.5, 0.3, 0.2) at every pixel, whatever the input."""

    def forward(self, x):
        logits = torch.tensor([0.5, 0.3, 0.2]).log().view(1, 3, 1, 1)
        return logits.expand(len(x), 3, *x.shape[-2:])


def test_an_ensemble_scales_the_background_of_its_mean_and_of_each_member():
    members = [Member(ConstantProbabilities(), 8, NORM)] * 2
    images = np.zeros((2, 8, 8), np.uint8)
    plain = predict_ensemble(members, images, "cpu", each_member=True)
    scaled = predict_ensemble(members, images, "cpu", with_confidence=True, each_member=True,
                              background_scale=0.5)  # 0.25 < 0.3: organ 1 everywhere
    assert (plain.labels == 0).all() and (plain.member_labels == 0).all()
    assert (scaled.labels == 1).all() and (scaled.member_labels == 1).all()
    # the confidence of the label given: (0.25, 0.3, 0.2) / 0.75 -> 0.4
    np.testing.assert_allclose(scaled.confidence, 0.4, rtol=1e-6)
    plain = predict_ensemble(members, images, "cpu", with_confidence=True)
    np.testing.assert_allclose(plain.confidence, 0.5, rtol=1e-6)


def test_shift_background_renormalises_and_survives_a_certain_background():
    probabilities = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)
    torch.testing.assert_close(shift_background(probabilities, 0.5)[0, :, 0, 0],
                               torch.tensor([0.25, 0.3, 0.2]) / 0.75)
    assert shift_background(probabilities, 1.0) is probabilities
    zero = shift_background(probabilities, 0.0)
    torch.testing.assert_close(zero[0, :, 0, 0], torch.tensor([0.0, 0.6, 0.4]))
    assert torch.isfinite(zero).all() and zero[0, :, 0, 1].tolist() == [0.0, 0.0, 0.0]
