"""Tests for utils/losses.py: hand-computed values, slow loop references, ignore masks, partial labels;
and for the labeled-set priors (utils/priors.py) that the area and zero-pixel terms take."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from conftest import training_config
from utils.config import CONFIG_DIR
from utils.errors import InputError
from utils.losses import (
    IGNORE_INDEX, LOSS_NAMES, SupervisedLoss, TvMFDiceLoss, area_constraint_loss, build_loss,
    build_stream_loss, cross_entropy, dice_loss, exclusion_loss, marginal_cross_entropy,
    marginal_dice_loss, mse_consistency, unannotated_class_weights, zero_pixel_loss)
from utils.priors import (class_area_bounds, class_area_statistics, drop_oversized_pseudo_labels,
                          labeled_annotation_frequency, labeled_area_bounds, teacher_labels)
from utils.runtime import check_choices

B, C, H, W = 2, 4, 5, 6


def random_batch(seed=0, dtype=torch.float64):
    """Random logits/target/ignore/annotated; class 2 is absent and unannotated on image 0, class 3 on image 1."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, H, W, generator=generator, dtype=torch.float64).to(dtype)
    target = torch.randint(0, C, (B, H, W), generator=generator)
    ignore = torch.rand(B, H, W, generator=generator) < 0.3
    annotated = torch.rand(B, C, generator=generator) < 0.5
    for image, absent_class in ((0, 2), (1, 3)):
        target[image][target[image] == absent_class] = 0
        annotated[image, absent_class] = False
    return logits, target, ignore, annotated


def tvmf_with_kappa(kappa, partial_labels=False):
    loss = TvMFDiceLoss(len(kappa), partial_labels=partial_labels)
    loss.kappa.copy_(torch.as_tensor(kappa, dtype=torch.float32))
    return loss


# ----------------------------------------------------------------- slow references (loops, probabilities)
def slow_probs(logits):
    exp = logits.exp()
    return exp / exp.sum(1, keepdim=True)


def slow_cosines(probs, target, valid):
    """cos per class between the batch-wide probability map and one-hot target, by an explicit loop."""
    cosines = []
    for c in range(probs.shape[1]):
        p = probs[:, c][valid]
        t = (target[valid] == c).to(p.dtype)
        denominator = p.norm() * t.norm()
        cosines.append(float((p * t).sum() / denominator) if denominator > 0 else 0.0)
    return cosines


def slow_annotated(target, annotated, valid):
    result = annotated.clone()
    for b in range(target.shape[0]):
        for label in target[b][valid[b]].unique().tolist():
            result[b, label] = True
        result[b, 0] = True
    return result


def slow_merged(probs, annotated):
    merged = probs.clone()
    for b in range(probs.shape[0]):
        for c in range(1, probs.shape[1]):
            if not annotated[b, c]:
                merged[b, 0] += probs[b, c]
                merged[b, c] = 0
    return merged


# ----------------------------------------------------------------- closed-form values
def test_perfect_prediction_gives_zero():
    target = torch.tensor([[[0, 1], [2, 3]], [[3, 2], [1, 0]]])
    logits = 60.0 * torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).double()
    for value in (dice_loss(logits, target), dice_loss(logits, target, include_background=True, squared=True),
                  cross_entropy(logits, target), marginal_cross_entropy(logits, target),
                  marginal_dice_loss(logits, target), tvmf_with_kappa([0.0] * 4)(logits, target),
                  tvmf_with_kappa([32.0] * 4)(logits, target), exclusion_loss(logits, target),
                  mse_consistency(logits.softmax(1), logits.softmax(1))):
        assert float(value) == pytest.approx(0.0, abs=1e-6)


def test_uniform_prediction_hand_values():
    # 1 image of 4 pixels, 2 classes, uniform probabilities 1/2; target has 1 background, 3 class-1 pixels.
    logits = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    target = torch.tensor([[[0, 1, 1, 1]]])
    # class 1: Σpt = 3/2, Σp = 2, Σt = 3 -> Dice 3/5; Σp² = 1 -> squared Dice 3/4.
    assert float(dice_loss(logits, target, smooth=0)) == pytest.approx(0.4)
    assert float(dice_loss(logits, target, squared=True, smooth=0)) == pytest.approx(0.25)
    # background: Σpt = 1/2, Σp = 2, Σt = 1 -> Dice 1/3; mean of losses 2/5 and 2/3.
    assert float(dice_loss(logits, target, include_background=True, smooth=0)) == pytest.approx((0.4 + 2 / 3) / 2)
    assert float(cross_entropy(logits, target)) == pytest.approx(math.log(2))
    # t-vMF: normalised uniform map = 1/2 per pixel, one-hot = 1/sqrt(n): cos_0 = 1/2, cos_1 = sqrt(3)/2.
    cos0, cos1 = 0.5, math.sqrt(3) / 2
    assert float(tvmf_with_kappa([0.0, 0.0])(logits, target)) == pytest.approx(((1 - cos0) ** 2 + (1 - cos1) ** 2) / 2)
    # κ = (16, 8): φ_0 = 1.5/9 − 1 = −5/6, φ_1 = (1 + cos1)/(1 + 8(1 − cos1)) − 1.
    phi1 = (1 + cos1) / (1 + 8 * (1 - cos1)) - 1
    expected = ((1 + 5 / 6) ** 2 + (1 - phi1) ** 2) / 2
    assert float(tvmf_with_kappa([16.0, 8.0])(logits, target)) == pytest.approx(expected, rel=1e-6)


def test_mse_consistency_hand_value_and_mask():
    p = torch.tensor([[[[0.2, 0.6]], [[0.8, 0.4]]]])  # [1,2,1,2]
    q = torch.tensor([[[[0.5, 0.6]], [[0.5, 0.4]]]])
    assert float(mse_consistency(p, q)) == pytest.approx((0.09 + 0 + 0.09 + 0) / 4)
    assert float(mse_consistency(p, q, torch.tensor([[[True, False]]]))) == pytest.approx(0.09)
    assert float(mse_consistency(p, q, torch.tensor([[[False, True]]]))) == 0.0
    empty = mse_consistency(p.requires_grad_(), q, torch.zeros(1, 1, 2, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and torch.all(p.grad == 0)


# 2 pixels, 3 classes: pixel A labelled 0 with probabilities (.2, .5, .3), pixel B labelled 1 with (.1, .7, .2);
# class 2 is not annotated on the image.
PARTIAL_PROBS = torch.tensor([[0.2, 0.1], [0.5, 0.7], [0.3, 0.2]], dtype=torch.float64)
PARTIAL_LOGITS = PARTIAL_PROBS.log()[None, :, None, :]
PARTIAL_TARGET = torch.tensor([[[0, 1]]])
PARTIAL_ANNOTATED = torch.tensor([[True, True, False]])


def test_marginal_losses_hand_values():
    logits, target, annotated = PARTIAL_LOGITS, PARTIAL_TARGET, PARTIAL_ANNOTATED
    # pixel A may be background or class 2: likelihood .2 + .3.
    assert float(marginal_cross_entropy(logits, target, annotated)) == pytest.approx(
        -(math.log(0.5) + math.log(0.7)) / 2)
    assert float(cross_entropy(logits, target)) == pytest.approx(-(math.log(0.2) + math.log(0.7)) / 2)
    # class 1 only (class 2 unannotated): p = (.5, .7), t = (0, 1) -> Dice 1.4 / 2.2.
    assert float(marginal_dice_loss(logits, target, annotated, smooth=0)) == pytest.approx(1 - 1.4 / 2.2)
    # merged background (.5, .3) vs (1, 0) -> Dice 1 / 1.8.
    assert float(marginal_dice_loss(logits, target, annotated, include_background=True, smooth=0)) == \
        pytest.approx(((1 - 1.4 / 2.2) + (1 - 1 / 1.8)) / 2)
    # class 2 inside the annotated foreground {B}: 2·.2 / (.5 + 1).
    assert float(exclusion_loss(logits, target, annotated, smooth=0)) == pytest.approx(0.4 / 1.5)
    # without `annotated`, the present classes (0, 1) are the annotated ones: same as above here.
    assert float(marginal_cross_entropy(logits, target)) == pytest.approx(-(math.log(0.5) + math.log(0.7)) / 2)


# ----------------------------------------------------------------- agreement with slow loop references
@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("squared", [False, True])
def test_dice_matches_loop_reference(include_background, squared):
    logits, target, ignore, _ = random_batch(1)
    probs, valid = slow_probs(logits), ~ignore
    losses = []
    for c in range(0 if include_background else 1, C):
        p, t = probs[:, c][valid], (target[valid] == c).double()
        power = 2 if squared else 1
        losses.append(1 - (2 * (p * t).sum() + 1e-5) / ((p ** power).sum() + (t ** power).sum() + 1e-5))
    expected = float(sum(losses) / len(losses))
    value = dice_loss(logits, target, ignore, include_background=include_background, squared=squared)
    assert float(value) == pytest.approx(expected, rel=1e-10)


def test_tvmf_matches_loop_reference_and_kappa_zero_is_squared_cosine():
    logits, target, ignore, _ = random_batch(2)
    cosines = slow_cosines(slow_probs(logits), target, ~ignore)
    assert float(tvmf_with_kappa([0.0] * C)(logits, target, ignore)) == \
        pytest.approx(sum((1 - cos) ** 2 for cos in cosines) / C, rel=1e-6)
    kappa = [0.5, 3.0, 10.0, 32.0]
    phis = [(1 + cos) / (1 + k * (1 - cos)) - 1 for cos, k in zip(cosines, kappa)]
    assert float(tvmf_with_kappa(kappa)(logits, target, ignore)) == \
        pytest.approx(sum((1 - phi) ** 2 for phi in phis) / C, rel=1e-6)


def test_marginal_losses_match_loop_references():
    logits, target, ignore, annotated = random_batch(3)
    probs, valid = slow_probs(logits), ~ignore
    effective = slow_annotated(target, annotated, valid)
    merged = slow_merged(probs, effective)
    nll = [-math.log(float(merged[b, target[b, i, j], i, j]))
           for b in range(B) for i in range(H) for j in range(W) if valid[b, i, j]]
    assert float(marginal_cross_entropy(logits, target, annotated, ignore)) == pytest.approx(sum(nll) / len(nll))

    pair_losses, exclusion_pairs = [], []
    for b in range(B):
        foreground = ((target[b] > 0) & valid[b]).double()
        for c in range(1, C):
            p = merged[b, c][valid[b]]
            t = (target[b][valid[b]] == c).double()
            if effective[b, c]:
                pair_losses.append(1 - (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5))
            elif foreground.sum() > 0:
                q = probs[b, c] * valid[b]
                exclusion_pairs.append((2 * (q * foreground).sum() + 1e-5) / (q.sum() + foreground.sum() + 1e-5))
    assert float(marginal_dice_loss(logits, target, annotated, ignore)) == \
        pytest.approx(float(sum(pair_losses) / len(pair_losses)), rel=1e-10)
    assert exclusion_pairs, "the fixture should have unannotated classes"
    assert float(exclusion_loss(logits, target, annotated, ignore)) == \
        pytest.approx(float(sum(exclusion_pairs) / len(exclusion_pairs)), rel=1e-10)

    cosines = slow_cosines(merged, target, valid)
    assert float(tvmf_with_kappa([0.0] * C, partial_labels=True)(logits, target, ignore, annotated)) == \
        pytest.approx(sum((1 - cos) ** 2 for cos in cosines) / C, rel=1e-6)


# ----------------------------------------------------------------- t-vMF behaviour
@pytest.mark.parametrize("kappa", [0.0, 1.0, 10.0, 32.0])
def test_tvmf_decreases_as_cosine_grows(kappa):
    target = torch.tensor([[[0, 1, 1, 0], [1, 1, 0, 0]]])
    one_hot = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).double()
    loss = tvmf_with_kappa([kappa, kappa])
    cosines, values = [], []
    for sharpness in torch.linspace(-2, 6, 12):
        logits = sharpness * one_hot
        cosines.append(sum(slow_cosines(slow_probs(logits), target, torch.ones_like(target, dtype=torch.bool))))
        values.append(float(loss(logits, target)))
    assert all(a < b for a, b in zip(cosines, cosines[1:]))
    assert all(a > b for a, b in zip(values, values[1:]))


def test_update_kappa_follows_formula_keeps_nan_and_is_saved():
    logits, target, ignore, _ = random_batch(4)
    cosines = slow_cosines(slow_probs(logits), target, ~ignore)
    loss = TvMFDiceLoss(C, lam=32.0)
    assert torch.all(loss.kappa == 0)

    def expected(kappa):
        return sum((1 - ((1 + cos) / (1 + k * (1 - cos)) - 1)) ** 2 for cos, k in zip(cosines, kappa)) / C

    loss.update_kappa([0.9, 0.5, 0.25, 0.0])
    assert loss.kappa.tolist() == pytest.approx([28.8, 16.0, 8.0, 0.0])
    assert float(loss(logits, target, ignore)) == pytest.approx(expected([28.8, 16.0, 8.0, 0.0]), rel=1e-5)
    loss.update_kappa([math.nan, 0.75, math.nan, 0.5])  # NaN: class unseen in validation, κ kept
    assert loss.kappa.tolist() == pytest.approx([28.8, 24.0, 8.0, 16.0])
    loss.update_kappa(torch.tensor([0.5, math.nan, 1.0]))  # C − 1 values: classes 1..C−1, background kept
    assert loss.kappa.tolist() == pytest.approx([28.8, 16.0, 8.0, 32.0])
    assert float(loss(logits, target, ignore)) == pytest.approx(expected([28.8, 16.0, 8.0, 32.0]), rel=1e-5)
    with pytest.raises(ValueError):
        loss.update_kappa([0.5, 0.5])

    resumed = TvMFDiceLoss(C)
    resumed.load_state_dict(loss.state_dict())
    assert torch.equal(resumed.kappa, loss.kappa)
    composite = build_loss(training_config(loss="tvmf_dice", num_classes=C))
    composite.update_kappa([0.5] * C)
    assert torch.equal(composite.state_dict()["tvmf.kappa"], torch.full((C,), 16.0))
    build_loss(training_config(loss="dice_ce", num_classes=C)).update_kappa([0.5] * C)  # no-op, no error


# ----------------------------------------------------------------- ignore masks
def all_losses_with_ignore():
    """name -> callable(logits, target, ignore) for every loss that takes an ignore mask."""
    annotated = torch.tensor([[True, True, False, True], [True, False, True, False]])
    return {
        "dice": lambda x, y, m: dice_loss(x, y, m),
        "dice_squared_bg": lambda x, y, m: dice_loss(x, y, m, include_background=True, squared=True),
        "ce": cross_entropy,
        "tvmf": lambda x, y, m: tvmf_with_kappa([1.0, 5.0, 20.0, 32.0])(x, y, m),
        "tvmf_partial": lambda x, y, m: tvmf_with_kappa([1.0, 5.0, 20.0, 32.0], True)(x, y, m, annotated),
        "marginal_ce": lambda x, y, m: marginal_cross_entropy(x, y, annotated, m),
        "marginal_ce_derived": lambda x, y, m: marginal_cross_entropy(x, y, None, m),
        "marginal_dice": lambda x, y, m: marginal_dice_loss(x, y, annotated, m, include_background=True),
        "exclusion": lambda x, y, m: exclusion_loss(x, y, annotated, m),
        "composite": lambda x, y, m: build_loss(training_config(
            loss="dice_ce", partial_labels=True, exclusion_weight=0.5, num_classes=C))(
            x, y, m, annotated, certain_background=torch.ones_like(y, dtype=torch.bool)),
        "stream_dice_ce": lambda x, y, m: build_stream_loss("dice_ce", training_config())(x, y, m),
        "mse": lambda x, y, m: mse_consistency(x.softmax(1), y.new_zeros(x.shape).double(), ~m),
    }


@pytest.mark.parametrize("name", list(all_losses_with_ignore()))
def test_ignored_pixels_change_nothing_and_get_no_gradient(name):
    loss_fn = all_losses_with_ignore()[name]
    logits, target, ignore, _ = random_batch(5)
    logits.requires_grad_()
    value = loss_fn(logits, target, ignore)
    value.backward()
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[ignore] == 0)
    assert torch.any(logits.grad != 0)

    changed_logits = torch.where(ignore.unsqueeze(1), 10 * torch.randn_like(logits), logits.detach())
    changed_target = torch.where(ignore, (target + 1) % C, target)
    assert float(loss_fn(changed_logits, changed_target, ignore)) == pytest.approx(value.item(), rel=1e-12)
    # the 255 ignore index is equivalent to the mask
    if name != "mse":
        assert float(loss_fn(logits.detach(), torch.where(ignore, IGNORE_INDEX, target), None)) == \
            pytest.approx(value.item(), rel=1e-12)


# ----------------------------------------------------------------- partial labels
def test_marginal_ce_equals_plain_ce_when_all_annotated_and_is_never_larger():
    for seed in range(5):
        logits, target, ignore, annotated = random_batch(10 + seed)
        everything = torch.ones(B, C, dtype=torch.bool)
        plain = float(cross_entropy(logits, target, ignore))
        assert float(marginal_cross_entropy(logits, target, everything, ignore)) == pytest.approx(plain, rel=1e-12)
        assert float(marginal_cross_entropy(logits, target, annotated, ignore)) <= plain + 1e-12


def test_marginal_dice_equals_plain_dice_for_one_fully_annotated_image():
    logits, target, ignore, _ = random_batch(6)
    target[0, 0, :C] = torch.arange(C)  # every class present
    everything = torch.ones(1, C, dtype=torch.bool)
    for options in ({}, {"include_background": True, "squared": True}):
        assert float(marginal_dice_loss(logits[:1], target[:1], everything, ignore[:1], **options)) == \
            pytest.approx(float(dice_loss(logits[:1], target[:1], ignore[:1], **options)), rel=1e-12)


def test_marginal_losses_never_push_an_unannotated_class_down_at_a_background_pixel():
    logits, target, _, _ = random_batch(7)
    annotated = torch.tensor([[True, True, False, True], [True, True, True, False]])
    unannotated_class = torch.tensor([2, 3])  # absent from the targets (see random_batch)
    background = target == 0
    at_background = background.unsqueeze(1) & torch.nn.functional.one_hot(unannotated_class, C).bool()[:, :, None, None]
    marginal = {
        "ce": lambda x: marginal_cross_entropy(x, target, annotated),
        "dice": lambda x: marginal_dice_loss(x, target, annotated),
        "dice_bg": lambda x: marginal_dice_loss(x, target, annotated, include_background=True, squared=True),
        "tvmf": lambda x: tvmf_with_kappa([2.0, 4.0, 8.0, 16.0], True)(x, target, None, annotated),
    }
    # background and an unannotated class swapped at a 0-pixel: same merged probability, same loss.
    swapped = logits.clone()
    for b, k in enumerate(unannotated_class.tolist()):
        where = background[b]
        swapped[b, 0][where], swapped[b, k][where] = logits[b, k][where], logits[b, 0][where]
    for name, loss_fn in marginal.items():
        assert float(loss_fn(swapped)) == pytest.approx(float(loss_fn(logits)), rel=1e-12), name
    # gradient descent never lowers the unannotated logit there (plain CE does).
    for name in ("ce", "dice", "dice_bg"):
        x = logits.clone().requires_grad_()
        marginal[name](x).backward()
        assert torch.all(x.grad[at_background] <= 1e-15), name
    x = logits.clone().requires_grad_()
    cross_entropy(x, target).backward()
    assert torch.all(x.grad[at_background] > 0)


def test_certain_background_ce_acts_only_on_those_pixels():
    logits, target, ignore, annotated = random_batch(8)
    certain = torch.zeros(B, H, W, dtype=torch.bool)
    certain[:, 0, :] = True  # top row: air
    loss = build_loss(training_config(loss="marginal_dice", background_ce_weight=0.7))

    def gradient(**kwargs):
        x = logits.clone().requires_grad_()
        value = loss(x, target, ignore, annotated, **kwargs)
        value.backward()
        return value.item(), x.grad

    without, grad_without = gradient()
    with_background, grad_with = gradient(certain_background=certain)
    used = certain & ~ignore
    minus_log_p0 = -(logits[:, 0] - logits.exp().sum(1).log())
    assert with_background - without == pytest.approx(0.7 * float(minus_log_p0[used].mean()), rel=1e-10)
    extra = (grad_with - grad_without).permute(0, 2, 3, 1)
    assert torch.all(extra[~used] == 0) and torch.all(extra[used].abs().sum(-1) > 0)


def test_zero_ce_acts_on_every_zero_pixel_and_only_with_marginal_losses():
    logits, target, ignore, annotated = random_batch(9)
    used = (target == 0) & ~ignore
    minus_log_p0 = -(logits[:, 0] - logits.exp().sum(1).log())
    plain = build_loss(training_config(loss="marginal_dice", zero_ce_weight=0.0))
    weighted = build_loss(training_config(loss="marginal_dice", zero_ce_weight=0.2, annotation_rate=1.0))
    difference = (weighted(logits, target, ignore, annotated)
                  - plain(logits, target, ignore, annotated)).item()
    assert used.any() and difference == pytest.approx(0.2 * float(minus_log_p0[used].mean()), rel=1e-10)
    full_labels = training_config(loss="dice", zero_ce_weight=0.2, partial_labels=False)
    assert "zero_ce" not in build_loss(full_labels).terms(logits, target, ignore, annotated)


def test_zero_pixel_loss_by_hand():
    # one 0-pixel with probabilities (1/4, 1/4, 1/2); class 1 annotated (the other pixel), class 2 not
    logits = torch.tensor([0.0, 0.0, math.log(2.0)]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    target = torch.tensor([[[0, 1]]])
    annotated = torch.tensor([[True, True, False]])
    # likelihood of the 0: p_0 + (1 - r)·p_2 (class 1 is annotated, so it cannot hide under a 0)
    for rate, likelihood in ((0.0, 0.75), (0.5, 0.5), (1.0, 0.25)):
        value = zero_pixel_loss(logits, target, annotated, annotation_rate=rate)
        assert value.item() == pytest.approx(-math.log(likelihood), rel=1e-6)
    # the labelled pixel and ignored 0-pixels contribute nothing
    ignore = torch.tensor([[[True, False]]])
    assert zero_pixel_loss(logits, target, annotated, ignore, annotation_rate=0.5).item() == 0.0


def test_zero_pixel_loss_stops_pushing_a_confident_unannotated_class_unless_rate_is_one():
    logits = torch.tensor([0.0, 0.0, 12.0]).view(1, 3, 1, 1)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    annotated = torch.tensor([[True, True, False]])

    def gradient(rate):
        x = logits.clone().requires_grad_()
        zero_pixel_loss(x, target, annotated, annotation_rate=rate).backward()
        return x.grad.flatten()

    # d/dz_k −log(p_0 + w·p_2) = p_k·(1 − w_k/q) with w = (1, 0, 1 − r): hand values at p_2 ≈ 1
    p = torch.softmax(logits.flatten().double(), 0)
    for rate in (0.5, 1.0):
        weights = torch.tensor([1.0, 0.0, 1.0 - rate], dtype=torch.float64)
        q = (p * weights).sum()
        assert torch.allclose(gradient(rate).double(), p * (1 - weights / q), atol=1e-6)
    assert gradient(0.5).abs().max() < 1e-4 and gradient(1.0)[2] > 0.99
    with pytest.raises(InputError, match="annotation_rate"):
        zero_pixel_loss(logits, target, annotated, annotation_rate=1.5)


# ----------------------------------------------------------------- degenerate inputs
def every_loss_value(logits, target, ignore):
    """Every loss on logits (not on probability maps, so MSE is left out)."""
    annotated = torch.ones(logits.shape[0], logits.shape[1], dtype=torch.bool)
    return [fn(logits, target, ignore) for name, fn in all_losses_with_ignore().items() if name != "mse"] + [
        marginal_cross_entropy(logits, target, annotated, ignore),
        TvMFDiceLoss(logits.shape[1])(logits, target, ignore)]


def test_no_nan_with_empty_classes_or_all_ignored():
    logits, target, _, _ = random_batch(9)
    nothing, everything = torch.zeros(B, H, W, dtype=torch.bool), torch.ones(B, H, W, dtype=torch.bool)
    for case_target, case_ignore in ((torch.zeros_like(target), nothing), (target, everything),
                                     (torch.full_like(target, IGNORE_INDEX), nothing)):
        x = logits.clone().requires_grad_()
        values = every_loss_value(x, case_target, case_ignore)
        sum(values).backward()
        assert all(torch.isfinite(v) for v in values) and torch.all(torch.isfinite(x.grad))
    everything_ignored = torch.ones(B, H, W, dtype=torch.bool)
    for fn in (cross_entropy, lambda x, y, m: marginal_cross_entropy(x, y, None, m), dice_loss,
               lambda x, y, m: marginal_dice_loss(x, y, None, m), lambda x, y, m: exclusion_loss(x, y, None, m)):
        x = logits.clone().requires_grad_()
        value = fn(x, target, everything_ignored)
        assert value.item() == pytest.approx(0.0, abs=1e-12) and value.requires_grad
        value.backward()
        assert torch.all(x.grad == 0)


def test_float16_inputs_are_upcast():
    logits, target, ignore, _ = random_batch(11, dtype=torch.float16)
    logits = 8 * logits  # large enough that float16 exp/log would lose precision
    half_values = every_loss_value(logits, target, ignore)
    float_values = every_loss_value(logits.float(), target, ignore)
    for half, full in zip(half_values, float_values):
        assert half.dtype == torch.float32
        assert torch.isfinite(half) and float(half) == pytest.approx(float(full), rel=1e-6, abs=1e-7)
    p, q = logits.softmax(1), logits.flip(0).softmax(1)
    assert mse_consistency(p, q, ~ignore).dtype == torch.float32
    assert float(mse_consistency(p, q, ~ignore)) == pytest.approx(float(mse_consistency(p.float(), q.float(), ~ignore)))


# ----------------------------------------------------------------- build_loss / build_stream_loss
@pytest.mark.parametrize("name,partial,expected_terms", [
    ("dice", False, {"dice"}), ("dice", True, {"marginal_dice"}),
    ("ce", False, {"ce"}), ("ce", True, {"marginal_ce"}),
    ("dice_ce", False, {"dice", "ce"}), ("dice_ce", True, {"marginal_dice", "marginal_ce"}),
    ("tvmf_dice", False, {"tvmf_dice"}), ("tvmf_dice", True, {"marginal_tvmf_dice"}),
    ("marginal_ce", False, {"marginal_ce"}), ("marginal_dice", False, {"marginal_dice"}),
    ("marginal_dice_ce", False, {"marginal_dice", "marginal_ce"}),
])
def test_build_loss_maps_every_name(name, partial, expected_terms):
    assert name in LOSS_NAMES
    loss = build_loss(training_config(loss=name, partial_labels=partial, num_classes=C, zero_ce_weight=0.0))
    assert isinstance(loss, SupervisedLoss) and isinstance(loss, torch.nn.Module)
    logits, target, ignore, annotated = random_batch(12)
    terms = loss.terms(logits, target, ignore, annotated)
    assert set(terms) == expected_terms
    reference = {
        "dice": dice_loss(logits, target, ignore), "ce": cross_entropy(logits, target, ignore),
        "marginal_dice": marginal_dice_loss(logits, target, annotated, ignore),
        "marginal_ce": marginal_cross_entropy(logits, target, annotated, ignore),
        "tvmf_dice": TvMFDiceLoss(C)(logits, target, ignore),
        "marginal_tvmf_dice": TvMFDiceLoss(C, partial_labels=True)(logits, target, ignore, annotated)}
    assert float(loss(logits, target, ignore, annotated)) == \
        pytest.approx(sum(float(reference[term]) for term in expected_terms), rel=1e-12)


def test_composite_is_the_sum_of_its_parts():
    logits, target, ignore, annotated = random_batch(13)
    certain = torch.zeros(B, H, W, dtype=torch.bool)
    certain[:, -1, :] = True
    cfg = training_config(loss="dice_ce", partial_labels=True, num_classes=C, dice_squared=True,
                          dice_include_background=True, dice_smooth=1e-3, exclusion_weight=0.5,
                          background_ce_weight=0.3, zero_ce_weight=0.2, annotation_rate=0.5)
    options = {"include_background": True, "squared": True, "smooth": 1e-3}
    expected = (marginal_dice_loss(logits, target, annotated, ignore, **options)
                + marginal_cross_entropy(logits, target, annotated, ignore)
                + 0.5 * exclusion_loss(logits, target, annotated, ignore, smooth=1e-3)
                + 0.3 * cross_entropy(logits, torch.zeros_like(target), ignore | ~certain)
                + 0.2 * zero_pixel_loss(logits, target, annotated, ignore, annotation_rate=0.5))
    value = build_loss(cfg)(logits, target, ignore, annotated, certain_background=certain)
    assert float(value) == pytest.approx(float(expected), rel=1e-12)


def test_build_loss_defaults_and_errors():
    # the default training config: loss dice_ce, partial_labels true (marginal)
    defaults = yaml.safe_load((CONFIG_DIR / "default.yaml").read_text())
    loss = build_loss(training_config())
    opts = loss.options
    assert (opts.name, opts.marginal) == (defaults["loss"], defaults["partial_labels"])
    assert opts.background_ce_weight == defaults["background_ce_weight"]
    assert (opts.zero_ce_weight, opts.annotation_rate) == (defaults["zero_ce_weight"], defaults["annotation_rate"])
    assert build_loss(training_config(loss="tvmf_dice")).tvmf.kappa.numel() == defaults["num_classes"]
    with pytest.raises(InputError, match="loss: unknown loss 'focal'"):  # checked with the config, once
        check_choices(training_config(loss="focal"))
    with pytest.raises(InputError, match="annotation_rate"):
        build_loss(training_config(annotation_rate=-0.1))
    with pytest.raises(InputError, match="num_classes"):
        build_loss(training_config(loss="tvmf_dice", num_classes=None))
    # a key missing from the config is a bug, not a silent default
    partial = SimpleNamespace(**{k: v for k, v in training_config().items() if k != "zero_ce_presence"})
    with pytest.raises(AttributeError, match="zero_ce_presence"):
        build_loss(partial)
    with pytest.raises(AttributeError, match="dice_include_background"):
        build_stream_loss("dice", SimpleNamespace(loss="dice"))


def test_stream_losses():
    logits, target, ignore, _ = random_batch(14)
    cfg = training_config(dice_squared=True)
    assert float(build_stream_loss("dice", cfg)(logits, target, ignore)) == \
        pytest.approx(float(dice_loss(logits, target, ignore, squared=True)), rel=1e-12)
    assert float(build_stream_loss("ce", training_config())(logits, target, ignore)) == \
        pytest.approx(float(cross_entropy(logits, target, ignore)), rel=1e-12)
    assert float(build_stream_loss("dice_ce", training_config())(logits, target, ignore)) == \
        pytest.approx(float(dice_loss(logits, target, ignore) + cross_entropy(logits, target, ignore)), rel=1e-12)
    with pytest.raises(InputError, match="stream loss"):
        build_stream_loss("tvmf_dice", training_config())


# ----------------------------------------------------------------- area priors and the area constraint
# Three 4×4 label maps (16 pixels), classes 0..3:
#   mask 0: class 1 on 4 pixels (0.25), class 2 on 2 (0.125); class 2 annotated
#   mask 1: class 1 on 8 pixels (0.5); class 2 not annotated
#   mask 2: empty, class 3 annotated but absent
AREA_MASKS = np.zeros((3, 4, 4), np.uint8)
AREA_MASKS[0, 0, :] = 1
AREA_MASKS[0, 1, :2] = 2
AREA_MASKS[1, :2, :] = 1
AREA_ANNOTATED = np.array([[True, True, True, False], [True, True, False, False],
                           [True, False, False, True]])


def test_area_statistics_of_a_hand_made_label_set():
    stats = class_area_statistics(AREA_MASKS, AREA_ANNOTATED, 4)
    assert stats["annotation_rate"] == pytest.approx([1, 2 / 3, 1 / 3, 1 / 3])
    assert stats["areas"][1].tolist() == [0.25, 0.5] and stats["areas"][2].tolist() == [0.125]
    assert stats["areas"][3].size == 0  # annotated but absent: says nothing about its size
    assert stats["max_area"][1:] == pytest.approx([0.5, 0.125, 0])
    # without the annotation list the classes present are the annotated ones
    assert class_area_statistics(AREA_MASKS, None, 4)["annotation_rate"] == pytest.approx([1, 2 / 3, 1 / 3, 0])


def test_area_bounds_are_a_quantile_times_a_margin():
    assert class_area_bounds(AREA_MASKS, AREA_ANNOTATED, 4, quantile=1.0, margin=1.5).tolist() == \
        [1.0, 0.75, 0.1875, 0.0]
    # median of (0.25, 0.5) = 0.375; a margin can never push a bound past the whole slice
    assert class_area_bounds(AREA_MASKS, AREA_ANNOTATED, 4, quantile=0.5, margin=1.0).tolist() == \
        [1.0, 0.375, 0.125, 0.0]
    assert class_area_bounds(AREA_MASKS, AREA_ANNOTATED, 4, quantile=1.0, margin=4.0)[1] == 1.0
    settings = {"num_classes": 4, "area_weight": 0.0, "area_quantile": 1.0, "area_margin": 1.5}
    assert labeled_area_bounds(training_config(**settings), AREA_MASKS, AREA_ANNOTATED) is None
    cfg = training_config("semi_supervised", **settings, pseudo_area_filter=False)
    assert labeled_area_bounds(cfg, AREA_MASKS, AREA_ANNOTATED) is None
    cfg = training_config("semi_supervised", **settings, pseudo_area_filter=True)
    assert labeled_area_bounds(cfg, AREA_MASKS, AREA_ANNOTATED).tolist() == [1.0, 0.75, 0.1875, 0.0]


def test_presence_aware_weights_by_hand():
    # r = 0.6; annotated on 60 %, 30 %, 0 %, 90 % of the labeled slices: presence f / r capped at 1
    # = 1, 0.5, 0, 1 -> w = 0.4 / (1 - 0.6 * presence) = 1, 0.4 / 0.7, 0.4, 1
    frequency = [1.0, 0.6, 0.3, 0.0, 0.9]
    assert unannotated_class_weights(0.6, frequency).tolist() == pytest.approx([1, 1, 0.4 / 0.7, 0.4, 1])
    assert unannotated_class_weights(0.0, frequency).tolist() == [1, 1, 1, 1, 1]  # the marginal
    assert unannotated_class_weights(1.0, frequency).tolist() == [1, 0, 0, 0, 0]  # plain CE
    with pytest.raises(InputError, match="annotation_rate"):
        unannotated_class_weights(1.2, frequency)
    # one 0-pixel with probabilities (1/4, 1/4, 1/2), class 2 not annotated: p_0 + w_2·p_2
    logits = torch.tensor([0.0, 0.0, math.log(2.0)]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    target, annotated = torch.tensor([[[0, 1]]]), torch.tensor([[True, True, False]])
    value = zero_pixel_loss(logits, target, annotated, annotation_rate=0.6,
                            class_weights=torch.tensor([1.0, 0.4, 0.8]))
    assert value.item() == pytest.approx(-math.log(0.25 + 0.8 * 0.5), rel=1e-6)


def test_presence_aware_zero_pixel_term_in_the_supervised_loss():
    settings = {"loss": "marginal_dice", "num_classes": 4, "zero_ce_weight": 0.5, "annotation_rate": 0.6}
    cfg = training_config(**settings, zero_ce_presence=False)
    assert labeled_annotation_frequency(cfg, AREA_MASKS, AREA_ANNOTATED) is None
    cfg = training_config(**settings, zero_ce_presence=True)
    frequency = labeled_annotation_frequency(cfg, AREA_MASKS, AREA_ANNOTATED)
    assert frequency == pytest.approx([1, 2 / 3, 1 / 3, 1 / 3])
    with pytest.raises(ValueError, match="annotation_frequency"):
        build_loss(cfg)
    loss = build_loss(cfg, annotation_frequency=frequency)
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, 5, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 5, 5), generator=generator)
    target[1][target[1] == 2] = 0
    annotated = torch.tensor([[True, True, True, True], [True, True, False, False]])
    # independently: w = 0.4 / (1 - 0.6 * min(1, f / 0.6)) = 1, 0.4 / (1 - 1/3), 0.4 / (1 - 1/3)
    weights = np.array([1.0, 1.0, 0.6, 0.6])
    p = torch.softmax(logits, 1).numpy()
    logs = []
    for b in range(2):
        for y in range(5):
            for x in range(5):
                if target[b, y, x] == 0:
                    free = [k for k in range(1, 4) if not annotated[b, k] and not (target[b] == k).any()]
                    logs.append(-math.log(p[b, 0, y, x] + sum(weights[k] * p[b, k, y, x] for k in free)))
    term = loss.terms(logits, target, annotated=annotated)["zero_ce"]
    assert term.item() == pytest.approx(0.5 * np.mean(logs), rel=1e-6)  # the weights are float32


def area_loss_loop(logits, bounds, ignore=None):
    """Reference: per image and class, the soft area from explicit per-pixel softmax."""
    batch, classes, height, width = logits.shape
    total = 0.0
    for b in range(batch):
        for c in range(classes):
            area = 0.0
            for y in range(height):
                for x in range(width):
                    if ignore is not None and ignore[b, y, x]:
                        continue
                    exps = [math.exp(logits[b, k, y, x].item()) for k in range(classes)]
                    area += exps[c] / sum(exps)
            total += max(0.0, area / (height * width) - bounds[c].item()) ** 2
    return total / batch


def test_area_constraint_by_hand_and_against_a_loop():
    # uniform logits: every class takes 1/4 of each slice; only class 1 (bound 0.1) exceeds, by 0.15
    bounds = torch.tensor([1.0, 0.1, 0.25, 0.3])
    uniform = torch.zeros(2, 4, 3, 4, dtype=torch.float64)
    assert area_constraint_loss(uniform, bounds).item() == pytest.approx(0.15 ** 2)
    half_ignored = torch.zeros(2, 3, 4, dtype=torch.bool)
    half_ignored[:, :, :2] = True  # area 1/8 of the slice: excess 0.025
    assert area_constraint_loss(uniform, bounds, half_ignored).item() == pytest.approx(0.025 ** 2)
    logits, _, ignore, _ = random_batch(3)
    loose = torch.tensor([1.0, 0.2, 0.05, 0.3])
    assert area_constraint_loss(logits, loose, ignore).item() == pytest.approx(area_loss_loop(logits, loose, ignore))
    # within every bound: no loss and no gradient
    logits.requires_grad_(True)
    area_constraint_loss(logits, torch.ones(C)).backward()
    assert area_constraint_loss(logits, torch.ones(C)).item() == 0 and not logits.grad.any()
    with pytest.raises(ValueError, match="bounds must be"):
        area_constraint_loss(logits, torch.ones(C + 1))


def test_area_term_in_the_supervised_and_stream_losses():
    logits, target, ignore, annotated = random_batch(4)
    bounds = torch.tensor([1.0, 0.2, 0.05, 0.3])
    cfg = training_config(loss="dice", partial_labels=True, area_weight=3.0)
    loss = build_loss(cfg, bounds)
    terms = loss.terms(logits, target, ignore, annotated)
    assert terms["area"].item() == pytest.approx(3.0 * area_loss_loop(logits, bounds, ignore))
    assert torch.equal(loss.state_dict()["area_bounds"], bounds)  # the checkpoint keeps the bounds
    assert "area" not in build_loss(training_config(loss="dice")).terms(logits, target, ignore, annotated)
    assert "area_bounds" not in build_loss(training_config(loss="dice")).state_dict()
    with pytest.raises(ValueError, match="area_bounds"):
        build_loss(cfg)
    stream = build_stream_loss("ce", cfg, bounds)(logits, target, ignore)
    assert stream.item() == pytest.approx(cross_entropy(logits, target, ignore).item()
                                          + 3.0 * area_loss_loop(logits, bounds))


def test_teacher_labels_shift_the_background_prior_and_renormalise():
    # pixel 0: background and class 1 tie (logits 0, 0, -1); pixel 1: confident background
    # (p = 0.98, 0.01, 0.01)
    e = math.exp(-1)
    logits = torch.tensor([[0.0, math.log(0.98)], [0.0, math.log(0.01)], [-1.0, math.log(0.01)]])
    logits = logits.view(1, 3, 1, 2).requires_grad_()
    confidence, labels = teacher_labels(logits)
    assert labels.tolist() == [[[0, 0]]]
    assert confidence.flatten().tolist() == pytest.approx([1 / (2 + e), 0.98])
    # p0 halved and renormalised: (0.5, 1, e) / (1.5 + e) and (0.49, 0.01, 0.01) / 0.51
    confidence, labels = teacher_labels(logits, 0.5)
    assert labels.tolist() == [[[1, 0]]]
    assert confidence.flatten().tolist() == pytest.approx([1 / (1.5 + e), 0.49 / 0.51])
    assert confidence.dtype == torch.float32 and not confidence.requires_grad
    # 0: background never chosen; the organs' own distribution is left
    confidence, labels = teacher_labels(logits, 0.0)
    assert labels.tolist() == [[[1, 1]]]
    assert confidence.flatten().tolist() == pytest.approx([1 / (1 + e), 0.5])
    # above 1 the tie goes to background with (2, 1, e) / (3 + e)
    confidence, labels = teacher_labels(logits, 2.0)
    assert labels.tolist() == [[[0, 0]]] and confidence[0, 0, 0].item() == pytest.approx(2 / (3 + e))


def test_oversized_pseudo_labels_are_ignored():
    # image 0: class 1 on 3 of 8 pixels (0.375 > bound 0.25) → ignored; class 2 on 1/8 ≤ 0.5 → kept
    # image 1: class 1 on 2 of 8 pixels (0.25, not above the bound) → kept
    labels = torch.tensor([[[1, 1, 1, 0], [0, 2, IGNORE_INDEX, 0]],
                           [[1, 1, 0, 0], [0, 0, 0, 0]]])
    before = labels.clone()
    cleaned = drop_oversized_pseudo_labels(labels, torch.tensor([1.0, 0.25, 0.5]))
    X = IGNORE_INDEX
    assert cleaned.tolist() == [[[X, X, X, 0], [0, 2, X, 0]], [[1, 1, 0, 0], [0, 0, 0, 0]]]
    assert torch.equal(labels, before)
    # background above its bound is ignored too: bound 0.5 for class 0, image 1 has 6/8 zeros
    strict = drop_oversized_pseudo_labels(labels, torch.tensor([0.5, 1.0, 1.0]))
    assert strict[1].tolist() == [[1, 1, X, X], [X, X, X, X]] and strict[0].tolist() == labels[0].tolist()
