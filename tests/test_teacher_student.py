"""train_teacher_student.py: EMA, ramp-up, aligned views, pseudo-label ranking, BCP mixing, the
dual teacher, largest components, the edge branch, and a smoke run of each mode."""
import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import default_collate
from conftest import IntensityClassifier, Recorder, training_config

import test as test_script
import train_teacher_student as ts
from dataloaders.datasets import (STRONG_DRAW_FIELDS, UnlabeledSlices, geometric_augmentation,
                                  intensity_augmentation, strong_views)
from networks import build_model
from networks.edge import EdgeGuided, forward_with_edges
from utils.distributed import data_parallel
from utils.losses import build_stream_loss, edge_loss, edge_targets
from utils.optim import make_scaler
from utils.errors import InputError
from utils.teachers import (OwnStatistics, Position, TeacherStudentParts, dual_teacher_pseudo_labels,
                            ema_alpha, ema_update, freeze_encoder_stages, largest_component_labels,
                            rampup, run_length_alpha, sigmoid_rampup)

IGNORE = 255


# ==== EMA and ramp-up ====
@pytest.mark.parametrize("step, decay", [(0, 0.0), (9, 0.9), (1000, 0.99)])
def test_ema_update_follows_the_formula(step, decay):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = copy.deepcopy(student)                # BatchNorm statistics: mean 0, variance 1
    student(torch.randn(8, 3))                      # move the student's running statistics
    for parameter in teacher.parameters():
        parameter.data.normal_()
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, alpha=0.99, step=step)
    for old, new, current in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(new, decay * old + (1 - decay) * current, atol=1e-7)
    bn_teacher = teacher[1]                         # its own statistics, untouched
    assert torch.equal(bn_teacher.running_mean, torch.zeros(2))
    assert torch.equal(bn_teacher.running_var, torch.ones(2))


def test_the_ema_teacher_tracks_its_own_batchnorm_statistics():
    teacher = nn.Sequential(nn.BatchNorm1d(1)).eval()
    batch = torch.tensor([[1.0], [3.0]])            # mean 2, unbiased variance 2
    out = OwnStatistics(teacher)(batch)
    assert torch.allclose(out.flatten(), torch.tensor([-1.0, 1.0]), atol=1e-4)   # batch statistics
    # momentum 0.1 from mean 0, variance 1: 0.1·2 and 0.9·1 + 0.1·2
    assert math.isclose(teacher[0].running_mean.item(), 0.2, rel_tol=1e-6)
    assert math.isclose(teacher[0].running_var.item(), 1.1, rel_tol=1e-6)
    assert not teacher.training and not teacher[0].training                    # still evaluating


def test_sigmoid_rampup_values():
    assert math.isclose(sigmoid_rampup(0.0), 0.006737947, rel_tol=1e-6)   # exp(-5)
    assert math.isclose(sigmoid_rampup(0.5), 0.286504797, rel_tol=1e-6)   # exp(-1.25)
    assert sigmoid_rampup(1.0) == 1.0 and sigmoid_rampup(3.0) == 1.0


@pytest.mark.parametrize("total_steps, alpha", [
    (100, 0.95),        # averages the last 20 steps: 1 - 1/20
    (400, 0.9875),      # the last 80: 1 - 1/80
    (500, 0.99), (20000, 0.99),     # capped at Tarvainen & Valpola's 0.99
    (4, 0.0),           # 1 - 1/0.8 < 0: the teacher is the student
])
def test_run_length_alpha_averages_the_last_fifth_of_the_run(total_steps, alpha):
    assert math.isclose(run_length_alpha(total_steps), alpha, abs_tol=1e-12)


def test_ema_alpha_zero_means_sized_to_the_run():
    position = Position(epoch=0, iteration=0, per_epoch=100, total=400)
    assert math.isclose(ema_alpha(SimpleNamespace(ema_alpha=0.0), position), 0.9875)
    assert ema_alpha(SimpleNamespace(ema_alpha=0.9), position) == 0.9


# ==== data: the mean teacher's two views ====
def bright_centroid(view):
    """(row, col) centroid of the pixels above the middle of the view's intensity range."""
    view = view[0].numpy()
    rows, cols = np.nonzero(view > (view.min() + view.max()) / 2)
    return rows.mean(), cols.mean()


def test_weak_and_strong_views_share_geometry():
    torch.manual_seed(0)
    image = np.zeros((1, 64, 64), np.uint8)
    image[0, 10:18, 36:44] = 255                    # an off-centre bright square
    cfg = SimpleNamespace(aug_rotate=20.0, aug_translate=0.1, aug_scale=[0.8, 1.2], aug_flip=False)
    views = UnlabeledSlices(image, [0], 64, {"mean": 0.1, "std": 0.2}, geometric_augmentation(cfg),
                            intensity_augmentation())
    weak_centroids = []
    for _ in range(6):
        sample = strong_views(default_collate([views[0]]))
        weak = bright_centroid(sample["image_w"][0])
        for strong in (sample["image_s1"][0], sample["image_s2"][0]):
            assert np.allclose(bright_centroid(strong), weak, atol=0.75)
        weak_centroids.append(weak)
    assert np.ptp(np.array(weak_centroids), axis=0).max() > 2    # the geometry itself is random


# ==== pseudo_label: ranking and confidence filtering ====
def test_pseudo_label_scores_and_unconfident_pixels_ignored():
    labels = np.zeros((5, 2, 2), np.uint8)
    confidence = np.full((5, 2, 2), 0.3, np.float32)    # background confidence: not in the score
    labels[0], confidence[0] = 1, 0.9                              # score 0.9
    labels[1, 0], confidence[1, 0] = 2, [0.99, 0.97]               # score 0.98
    labels[3], confidence[3] = 1, [[0.5, 0.6], [0.7, 0.8]]         # score 0.65
    labels[4, 1, 1], confidence[4, 1, 1] = 3, 0.95                 # score 0.95; slice 2: none, 0
    scores, masks = ts.score_pseudo_labels(labels, confidence, conf_thresh=0.8)
    assert np.allclose(scores, [0.9, 0.98, 0.0, 0.65, 0.95])
    expected = np.array([[[1, 1], [1, 1]],
                         [[2, 2], [IGNORE, IGNORE]],
                         [[IGNORE, IGNORE], [IGNORE, IGNORE]],
                         [[IGNORE, IGNORE], [IGNORE, 1]],
                         [[IGNORE, IGNORE], [IGNORE, 3]]], np.uint8)
    assert masks.dtype == np.uint8 and np.array_equal(masks, expected)


@pytest.mark.parametrize("n_pseudo, share, pool, expected", [
    (0, 0.5, 360, 180),     # half the pool
    (0, 0.5, 25, 12),       # round(12.5) = 12 (half to even)
    (0, 0.01, 10, 1),       # round(0.1) = 0, but at least one slice
    (8, 0.5, 360, 8),       # an explicit count wins
    (500, 0.5, 360, 360),   # never more than the pool
])
def test_pseudo_label_count(n_pseudo, share, pool, expected):
    cfg = SimpleNamespace(n_pseudo=n_pseudo, pseudo_share=share)
    assert ts.pseudo_label_count(cfg, pool) == expected


def test_concatenated_joins_the_labeled_and_pseudo_labelled_batches_in_order():
    labeled = {"mask": torch.zeros(2, 3, 3), "pseudo_labelled": torch.tensor([False, False])}
    pseudo = {"mask": torch.ones(1, 3, 3), "pseudo_labelled": torch.tensor([True])}
    joint = ts.concatenated([labeled, pseudo])
    assert joint["pseudo_labelled"].tolist() == [False, False, True]
    assert joint["mask"].sum((1, 2)).tolist() == [0, 0, 9]


def test_the_student_continues_its_teachers_adamw_moments(tmp_path):
    from utils.checkpoint import FORMAT
    teacher = nn.Linear(2, 1, bias=False)
    teacher_optimizer = torch.optim.AdamW(teacher.parameters(), lr=0.1)
    teacher.weight.grad = torch.tensor([[2.0, -4.0]])
    teacher_optimizer.step()
    torch.save({"format": FORMAT, "optimizer": teacher_optimizer.state_dict()}, tmp_path / "t.pth")
    student = nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.002)
    assert ts.continue_teacher_optimizer(optimizer, tmp_path / "t.pth", "model")
    (state,) = optimizer.state.values()
    # one step: m = (1 − 0.9)·g, v = (1 − 0.999)·g², step 1; this run's rate stays
    assert torch.allclose(state["exp_avg"], torch.tensor([[0.2, -0.4]]))
    assert torch.allclose(state["exp_avg_sq"], torch.tensor([[0.004, 0.016]]))
    assert state["step"] == 1 and optimizer.param_groups[0]["lr"] == 0.002
    fresh = torch.optim.AdamW(student.parameters(), lr=0.002)      # an EMA teacher's weights
    assert not ts.continue_teacher_optimizer(fresh, tmp_path / "t.pth", "teacher") and not fresh.state
    other = torch.optim.AdamW([nn.Parameter(torch.zeros(1)), *student.parameters()])
    assert not ts.continue_teacher_optimizer(other, tmp_path / "t.pth", "model")  # other parameters


def test_a_loaded_teacher_sees_its_own_normalisation():
    raw = torch.rand(2, 1, 4, 4)
    ours, its = {"mean": 0.2, "std": 0.5}, {"mean": 0.3, "std": 0.25}
    renormalized = ts.Renormalized(nn.Identity(), ours, its)
    assert torch.allclose(renormalized((raw - 0.2) / 0.5), (raw - 0.3) / 0.25, atol=1e-6)


# ==== BCP ====
def bcp_batches(n=4, size=16):
    batch_x = {"image": torch.ones(n, 1, size, size),
               "mask": torch.arange(10, 10 + n).view(n, 1, 1).expand(n, size, size).clone(),
               "annotated": torch.eye(n, 5, dtype=torch.bool),
               "certain_background": torch.zeros(n, size, size, dtype=torch.bool)}
    return batch_x, {"image_w": torch.zeros(n, 1, size, size)}


def bcp_cfg(**changes):
    return SimpleNamespace(**{"u_weight": 0.5, "edge_weight": 1.0, "edge_guided": False,
                              "partial_labels": True, "conf_thresh": 0.5, "label_mode": "class",
                              "plain_weight": 0.0, "consistency": "mse", "pseudo_background_scale": 1.0,
                              **changes})


class NoUpdate:
    """Optimiser and loss scaler in one that change nothing: these tests read a step's loss."""

    def zero_grad(self, set_to_none=True):
        pass

    def scale(self, loss):
        return self

    def backward(self):
        pass

    def step(self, optimizer):
        pass

    def update(self):
        pass


def step_parts(student, loss_sup, loss_stream, teacher=None, static_teacher=None, area_bounds=None):
    """The parts of a step around test doubles: the student's forwards through `data_parallel` as
    in training, no optimiser update, a first phase of one epoch."""
    return TeacherStudentParts(student=student, teacher=teacher, static_teacher=static_teacher,
                               loss_sup=loss_sup, loss_stream=loss_stream,
                               train_forward=data_parallel(student, torch.device("cpu")),
                               optimizer=NoUpdate(), scaler=NoUpdate(), device=torch.device("cpu"),
                               pseudo_area_bounds=area_bounds, pretrain_epochs=1)


def bcp_losses(student, teachers, batch_x, batch_u, loss_sup, loss_stream, cfg, ratio, u_weight,
               area_bounds=None):
    """(loss, logs) of one `ts.bcp_step` at box side `ratio` and pseudo-label weight `u_weight`:
    self-training with `teachers` = (EMA, static), pre-training with None (the teacher's
    BatchNorm pass then goes through an identity)."""
    cfg = SimpleNamespace(**{**vars(cfg), "mask_ratio_schedule": [ratio, ratio], "u_weight": u_weight,
                             "rampup_epochs": 0, "static_every": 10 ** 6, "ema_alpha": 0.99, "grad_clip": 0})
    dynamic, static = teachers or (nn.Identity(), None)
    at = Position(epoch=1, iteration=6, per_epoch=5, total=10) if teachers else Position(0, 0, 5, 10)
    logs = ts.bcp_step(step_parts(student, loss_sup, loss_stream, dynamic, static, area_bounds),
                       batch_x, batch_u, at, cfg)
    return logs["loss"], logs


def test_bcp_self_training_puts_each_target_in_its_region_with_its_weight():
    torch.manual_seed(0)
    student, loss_sup, loss_stream = IntensityClassifier(), Recorder(), Recorder()
    batch_x, batch_u = bcp_batches()
    teachers = (IntensityClassifier().eval(), IntensityClassifier().eval())
    loss, logs = bcp_losses(student, teachers, batch_x, batch_u, loss_sup, loss_stream,
                             bcp_cfg(), ratio=0.5, u_weight=0.5)
    mixed = student.inputs[0][:, 0]
    assert len(mixed) == 8                 # every labeled and unlabeled slice, both directions
    box = mixed[:4] == 1.0                 # labeled patches inside the unlabeled slices
    assert torch.equal(box, mixed[4:] == 0.0)           # the same box in the other direction
    assert box.sum((1, 2)).tolist() == [64] * 4         # side 0.5 · 16 = 8
    rows, cols = box[0].any(1).nonzero().flatten(), box[0].any(0).nonzero().flatten()
    assert len(rows) == len(cols) == 8 and rows.diff().eq(1).all() and cols.diff().eq(1).all()
    (gt_in_u, gt_around_u), (pseudo_around_x, pseudo_in_x) = loss_sup.calls, loss_stream.calls
    # each labeled slice's ground truth inside the box once and around it once: every pixel once
    assert torch.equal(gt_in_u["target"], batch_x["mask"]) and torch.equal(gt_in_u["ignore"], ~box)
    assert torch.equal(gt_around_u["target"], batch_x["mask"]) and torch.equal(gt_around_u["ignore"], box)
    assert torch.equal(gt_in_u["annotated"], batch_x["annotated"])
    assert torch.equal(gt_around_u["annotated"], batch_x["annotated"])
    # pseudo-labels (class 2 for the value-0 unlabeled slices) in the other regions
    assert (pseudo_around_x["target"] == 2).all() and torch.equal(pseudo_around_x["ignore"], box)
    assert (pseudo_in_x["target"] == 2).all() and torch.equal(pseudo_in_x["ignore"], ~box)
    assert math.isclose(loss.item(), (1 + 2) + 0.5 * (1 + 2))
    assert math.isclose(logs["conf_teacher"].item(), 1 / (1 + 2 * math.exp(-12)), rel_tol=1e-6)


def test_bcp_plain_weight_also_trains_the_labeled_slices_unmixed():
    torch.manual_seed(0)
    student, loss_sup, loss_stream = IntensityClassifier(), Recorder(), Recorder()
    batch_x, batch_u = bcp_batches()
    batch_x["image"] = torch.full((4, 1, 16, 16), 0.25)
    teachers = (IntensityClassifier().eval(), IntensityClassifier().eval())
    loss, logs = bcp_losses(student, teachers, batch_x, batch_u, loss_sup, loss_stream,
                             bcp_cfg(plain_weight=0.5), ratio=0.5, u_weight=0.5)
    inputs = student.inputs[0][:, 0]
    assert len(inputs) == 12 and (inputs[:4] == 0.25).all()          # plain slices, then the mixes
    plain, in_u, around_u = loss_sup.calls
    assert torch.equal(plain["target"], batch_x["mask"]) and plain["ignore"] is None
    assert torch.equal(plain["annotated"], batch_x["annotated"])
    box = inputs[4:8] == 0.25                                        # labeled boxes in unlabeled slices
    assert torch.equal(in_u["ignore"], ~box) and torch.equal(around_u["ignore"], box)
    # Recorder losses 1, 2, 3 (supervised calls) and 1, 2 (pseudo-label calls)
    assert math.isclose(loss.item(), 0.5 * 1 + (2 + 3) + 0.5 * (1 + 2))
    assert logs["loss_plain"] == 1


@pytest.mark.parametrize("share, epochs, expected", [(0.5, 10, 5), (0.5, 100, 50), (0.3, 10, 3),
                                                    (0.0, 10, 0), (0.26, 20, 5)])
def test_the_first_phase_is_a_share_of_the_epochs(share, epochs, expected):
    assert ts.pretrain_epoch_count(SimpleNamespace(pretrain_share=share, epochs=epochs)) == expected


def test_rampup_starts_at_its_epoch_and_follows_the_sigmoid_shape():
    cfg = SimpleNamespace(rampup_epochs=2.0)

    def at(iteration, start_epoch=0):
        return rampup(cfg, Position(epoch=iteration // 10, iteration=iteration, per_epoch=10, total=100), start_epoch)

    # t = (iteration/10 − start) / 2; value exp(−5(1−t)²), 0 ≤ t ≤ 1
    assert at(0) == pytest.approx(math.exp(-5)) and at(10) == pytest.approx(math.exp(-5 * 0.25))
    assert at(20) == 1.0 and at(35) == 1.0
    assert at(30, start_epoch=3) == pytest.approx(math.exp(-5)) and at(10, start_epoch=3) == pytest.approx(math.exp(-5))
    assert at(40, start_epoch=3) == pytest.approx(math.exp(-5 * 0.25))
    assert rampup(SimpleNamespace(rampup_epochs=0), Position(0, 0, 10, 100)) == 1.0


def test_bcp_pretraining_mixes_each_labeled_slice_with_the_next_ones_box():
    torch.manual_seed(1)
    student, loss_sup, loss_stream = IntensityClassifier(), Recorder(), Recorder()
    batch_x, batch_u = bcp_batches()
    batch_x["image"] = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(4, 1, 1, 1).expand(4, 1, 16, 16).clone()
    loss, _ = bcp_losses(student, None, batch_x, batch_u, loss_sup, loss_stream, bcp_cfg(), 0.75, 0.5)
    mixed = student.inputs[0][:, 0]
    partner = torch.tensor([1, 2, 3, 0])                 # slice i takes the box of slice i + 1
    box = mixed == batch_x["image"][partner, 0]
    assert torch.equal(~box, mixed == batch_x["image"][:, 0])
    assert box.sum((1, 2)).tolist() == [144] * 4 and not loss_stream.calls   # side 12 of 16
    outer, inner = loss_sup.calls
    assert torch.equal(outer["target"], batch_x["mask"]) and torch.equal(outer["ignore"], box)
    assert torch.equal(inner["target"], batch_x["mask"][partner]) and torch.equal(inner["ignore"], ~box)
    assert torch.equal(inner["annotated"], batch_x["annotated"][partner])
    assert torch.equal(inner["certain_background"], batch_x["certain_background"][partner])
    assert loss.item() == 1 + 2


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits


class LogitsByImage(nn.Module):
    """Logits (log 3·v, 0) per pixel of value v: v = 1 gives the softmax (0.75, 0.25), v = 0 a
    50/50 tie. Records each forward's batch."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, images):
        self.batches.append(images)
        return torch.cat([math.log(3.0) * images, torch.zeros_like(images)], 1)


def consistency_losses(student, teacher, batch_x, batch_u, loss_sup, loss_stream, cfg, weight,
                       area_bounds=None):
    """(loss, logs) of one `ts.pseudo_label_step` (mean_teacher's loss too) with the consistency
    at `weight`."""
    cfg = SimpleNamespace(**{**vars(cfg), "w_consistency": weight, "rampup_epochs": 0, "grad_clip": 0})
    logs = ts.pseudo_label_step(step_parts(student, loss_sup, loss_stream, teacher, area_bounds=area_bounds),
                                batch_x, batch_u, Position(0, 0, 5, 10), cfg)
    return logs["loss"], logs


def identical_views(value):
    """Two unlabeled 4×4 slices of grey level `value` whose strong views equal the weak view."""
    identity = dict(brightness=1, contrast=1, brightness_first=1, gamma=1, blur_sigma=0,
                    noise_std=0, noise_seed=0, norm_mean=0, norm_std=1)
    draw = torch.tensor([identity[name] for name in STRONG_DRAW_FIELDS], dtype=torch.float64)
    return {"image_w": torch.zeros(2, 1, 4, 4), "strong_draws": draw.expand(2, 2, -1),
            "image_w_uint8": torch.full((2, 1, 4, 4), value, dtype=torch.uint8)}


def test_consistency_sums_the_squared_difference_over_classes_in_separate_forwards():
    teacher = FixedLogits(torch.zeros(2, 2, 4, 4))         # teacher: (0.5, 0.5)
    batch_x = {"image": torch.zeros(1, 1, 2, 2), "mask": torch.zeros(1, 2, 2, dtype=torch.long),
               "annotated": torch.ones(1, 2, dtype=torch.bool),
               "certain_background": torch.zeros(1, 2, 2, dtype=torch.bool)}
    batch_u = identical_views(255)
    student = LogitsByImage()
    loss, logs = consistency_losses(student, teacher, batch_x, batch_u,
                                     Recorder(), Recorder(), bcp_cfg(), weight=2.0)
    # the labeled batch and the strong views in forwards of their own (own BatchNorm statistics)
    assert [len(batch) for batch in student.batches] == [1, 2]
    assert torch.equal(student.batches[1], torch.ones(2, 1, 4, 4))   # 255 / 255
    # student on the strong views (0.75, 0.25), teacher (0.5, 0.5): per pixel 0.25² + 0.25² =
    # 0.125 (the mean over the two classes would be 0.0625)
    assert math.isclose(logs["loss_u"].item(), 0.125, rel_tol=1e-6)
    assert math.isclose(loss.item(), 1 + 2.0 * 0.125, rel_tol=1e-6)


@pytest.mark.parametrize("bounds, expected_rows", [(None, [1, 1, IGNORE, IGNORE]),
                                                    (torch.tensor([1.0, 0.25]), [IGNORE] * 4)])
def test_hard_consistency_trains_the_teachers_confident_argmax(bounds, expected_rows):
    teacher_logits = torch.zeros(2, 2, 4, 4)
    teacher_logits[:, 1, :2] = math.log(9.0)     # rows 0-1: class 1 at 0.9, confident
    teacher_logits[:, 1, 2:] = math.log(1.5)     # rows 2-3: class 1 at 0.6, under 0.8
    batch_x = {"image": torch.zeros(1, 1, 2, 2), "mask": torch.zeros(1, 2, 2, dtype=torch.long),
               "annotated": torch.ones(1, 2, dtype=torch.bool),
               "certain_background": torch.zeros(1, 2, 2, dtype=torch.bool)}
    loss_stream = Recorder([0.7])
    loss, logs = consistency_losses(LogitsByImage(), FixedLogits(teacher_logits), batch_x, identical_views(0),
                                     Recorder(), loss_stream, bcp_cfg(consistency="hard", conf_thresh=0.8),
                                     weight=2.0, area_bounds=bounds)
    # with bounds: class 1 covers 8 of 16 pixels, beyond its bound 0.25, so it is not taught
    target = loss_stream.calls[0]["target"]
    assert torch.equal(target, torch.tensor(expected_rows).view(1, 4, 1).expand(2, 4, 4))
    assert math.isclose(loss.item(), 1 + 2.0 * 0.7, rel_tol=1e-6)
    assert math.isclose(logs["conf_teacher"].item(), (0.9 + 0.6) / 2, rel_tol=1e-6)


def test_the_pseudo_background_scale_shifts_the_teachers_soft_and_hard_targets():
    """Teacher (0.5, 0.5) on every pixel; at pseudo_background_scale 0.5 it teaches (1/3, 2/3)."""
    batch_x = {"image": torch.zeros(1, 1, 2, 2), "mask": torch.zeros(1, 2, 2, dtype=torch.long),
               "annotated": torch.ones(1, 2, dtype=torch.bool),
               "certain_background": torch.zeros(1, 2, 2, dtype=torch.bool)}
    teacher = FixedLogits(torch.zeros(2, 2, 4, 4))
    _, logs = consistency_losses(LogitsByImage(), teacher, batch_x, identical_views(255), Recorder(),
                                 Recorder(), bcp_cfg(pseudo_background_scale=0.5), weight=1.0)
    # student (0.75, 0.25) against (1/3, 2/3): 2 · (5/12)², summed over the classes
    assert math.isclose(logs["loss_u"].item(), 2 * (5 / 12) ** 2, rel_tol=1e-6)
    assert math.isclose(logs["conf_teacher"].item(), 2 / 3, rel_tol=1e-6)
    loss_stream = Recorder()
    for scale, label in ((1.0, IGNORE), (0.5, 1)):  # τ 0.6: a tie is unsure, 2/3 is not
        consistency_losses(LogitsByImage(), teacher, batch_x, identical_views(0), Recorder(), loss_stream,
                           bcp_cfg(consistency="hard", conf_thresh=0.6, pseudo_background_scale=scale), 1.0)
        assert (loss_stream.calls[-1]["target"] == label).all()


def test_pseudo_labelled_slices_are_complete_labels_and_ground_truth_stays_partial():
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 1] = 10.0                     # labeled slice: would change the CE if it counted
    logits[1, 2] = math.log(2.0)            # pseudo-labelled slice: p = (1/4, 1/4, 1/2)
    batch_x = {"mask": torch.tensor([[[1, 0], [0, 0]], [[0, 0], [2, IGNORE]]]),
               "annotated": torch.tensor([[True, True, False], [True, True, True]]),
               "certain_background": torch.ones(2, 2, 2, dtype=torch.bool),
               "pseudo_labelled": torch.tensor([False, True])}
    loss_sup = Recorder()
    loss = ts.labeled_and_pseudo(loss_sup, build_stream_loss("ce", training_config()), logits, batch_x)
    # CE over the pseudo-labelled slice only: two 0-pixels (background) at -log(1/4), one
    # class-2 pixel at -log(1/2), the unsure pixel ignored: (2·log 4 + log 2) / 3 = 5/3·log 2
    assert math.isclose(loss.item(), 1 + 5 / 3 * math.log(2), rel_tol=1e-6)
    (call,) = loss_sup.calls                # the ground truth: row 0 only, its annotation kept
    assert call["ignore"][:, 0, 0].tolist() == [False, True] and call["ignore"].all((1, 2)).tolist() == [False, True]
    assert call["annotated"].tolist() == [[True, True, False], [False, False, False]]
    assert call["certain_background"].all((1, 2)).tolist() == [True, False]
    assert not call["certain_background"][1].any()


def test_a_batch_without_pseudo_labels_is_all_ground_truth():
    batch_x = {"mask": torch.zeros(1, 2, 2, dtype=torch.long),
               "annotated": torch.ones(1, 3, dtype=torch.bool),
               "certain_background": torch.zeros(1, 2, 2, dtype=torch.bool)}
    loss_sup, loss_stream = Recorder(), Recorder()
    ts.labeled_and_pseudo(loss_sup, loss_stream, torch.zeros(1, 3, 2, 2), batch_x)
    assert len(loss_sup.calls) == 1 and loss_sup.calls[0]["ignore"] is None and not loss_stream.calls


def test_bcp_pretraining_keeps_the_ema_teachers_batchnorm_statistics_on_the_data():
    student = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2))
    nn.init.constant_(student[0].weight, 1.0)   # the conv passes the image through
    teacher = copy.deepcopy(student).eval()
    cfg = SimpleNamespace(**vars(bcp_cfg()), static_every=10, rampup_epochs=1.0,
                          mask_ratio_schedule=[0.5, 0.5], ema_alpha=0.99, amp=False, grad_clip=0)
    parts = TeacherStudentParts(
        student=student, teacher=ts.OwnStatistics(teacher), static_teacher=None,
        loss_sup=lambda logits, *args, **kwargs: logits.mean(), loss_stream=None,
        train_forward=data_parallel(student, torch.device("cpu")),
        optimizer=torch.optim.SGD(student.parameters(), lr=0.0),
        scaler=make_scaler(torch.device("cpu"), SimpleNamespace(amp=False)), device=torch.device("cpu"),
        pretrain_epochs=1)
    batch_x, batch_u = bcp_batches()
    batch_x["image"] = torch.full_like(batch_x["image"], 3.0)
    ts.bcp_step(parts, batch_x, batch_u, Position(epoch=0, iteration=0, per_epoch=5, total=10), cfg)
    # one target pass at BatchNorm momentum 0.1 over a constant image of 3: mean 0 -> 0.3, var 1 -> 0.9
    assert torch.allclose(teacher[1].running_mean, torch.tensor([0.3, 0.3]))
    assert torch.allclose(teacher[1].running_var, torch.tensor([0.9, 0.9]))
    assert not teacher[1].training                # and it is left in eval mode


def test_bcp_ignores_pseudo_labels_where_the_teachers_are_unsure():
    torch.manual_seed(0)
    logits = torch.zeros(4, 3, 16, 16)          # right half: all logits 0, confidence 1/3
    logits[:, 2, :, :8] = 12.0                  # left half: class 2, confidence 1/(1+2e^-12)
    student, loss_sup, loss_stream = IntensityClassifier(), Recorder(), Recorder()
    batch_x, batch_u = bcp_batches()
    _, logs = bcp_losses(student, (FixedLogits(logits), FixedLogits(logits)), batch_x, batch_u,
                          loss_sup, loss_stream, bcp_cfg(conf_thresh=0.5), ratio=0.5, u_weight=0.5)
    for call in loss_stream.calls:
        assert (call["target"][..., :8] == 2).all() and (call["target"][..., 8:] == IGNORE).all()
    assert math.isclose(logs["pseudo_ignored"].item(), 0.5)
    loss_stream.calls.clear()                   # threshold 1/3 or less: nothing is ignored
    bcp_losses(student, (FixedLogits(logits), FixedLogits(logits)), batch_x, batch_u,
                loss_sup, loss_stream, bcp_cfg(conf_thresh=0.3), ratio=0.5, u_weight=0.5)
    assert all((call["target"] != IGNORE).all() for call in loss_stream.calls)


def test_bcp_area_filter_ignores_a_class_beyond_its_bound():
    torch.manual_seed(0)
    logits = torch.zeros(4, 3, 16, 16)
    logits[:, 2, :, :8] = 12.0                  # class 2 on the left half (area 0.5), sure
    logits[:, 0, :, 8:] = 12.0                  # background on the right half, sure
    student, loss_sup, loss_stream = IntensityClassifier(), Recorder(), Recorder()
    batch_x, batch_u = bcp_batches()
    teachers = (FixedLogits(logits), FixedLogits(logits))
    bcp_losses(student, teachers, batch_x, batch_u, loss_sup, loss_stream,
                bcp_cfg(conf_thresh=0.5), ratio=0.5, u_weight=0.5, area_bounds=torch.tensor([1.0, 1.0, 0.4]))
    for call in loss_stream.calls:              # 0.5 > 0.4: class 2 is not taught
        assert (call["target"][..., :8] == IGNORE).all() and (call["target"][..., 8:] == 0).all()
    loss_stream.calls.clear()
    bcp_losses(student, teachers, batch_x, batch_u, loss_sup, loss_stream,
                bcp_cfg(conf_thresh=0.5), ratio=0.5, u_weight=0.5, area_bounds=torch.tensor([1.0, 1.0, 0.6]))
    assert all((call["target"][..., :8] == 2).all() for call in loss_stream.calls)


def test_dual_teacher_takes_each_pixel_from_the_more_confident_teacher():
    strength = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    zeros = torch.zeros(1, 1, 2, 6)
    dynamic = torch.cat([zeros, strength.expand(1, 1, 2, 6), zeros], 1)           # class 1, rising
    static = torch.cat([zeros, zeros, strength.flip(0).expand(1, 1, 2, 6)], 1)    # class 2, falling
    static[..., 2] = dynamic[..., 2]                           # column 2: a tie (identical output)
    pseudo, confidence, from_static = dual_teacher_pseudo_labels(
        FixedLogits(dynamic), FixedLogits(static), torch.zeros(1, 1, 2, 6))
    # both teachers' confidence is e^s / (e^s + 2): the larger logit s wins; a tie goes to dynamic
    assert from_static[0, 0].tolist() == [True, True, False, False, False, False]
    assert torch.equal(pseudo[0], torch.tensor([2, 2, 1, 1, 1, 1]).expand(2, 6))
    best = torch.tensor([5.0, 4.0, 2.0, 3.0, 4.0, 5.0])
    assert torch.allclose(confidence[0, 0], best.exp() / (best.exp() + 2))


def test_dual_teacher_shifts_each_teachers_background_before_comparing():
    """Dynamic teacher (0.6, 0.4, 0), static (0.45, 0.1, 0.45): at scale 1 the dynamic one's
    background (0.6) wins; at 0.5 they teach (0.3, 0.4, 0) / 0.7 and (0.225, 0.1, 0.45) / 0.775,
    and the static teacher's class 2 (0.581) beats the dynamic one's class 1 (0.571)."""
    def constant(probabilities):
        return FixedLogits(torch.tensor(probabilities).clamp_min(1e-12).log().view(1, 3, 1, 1).expand(1, 3, 2, 2))
    dynamic, static = constant([0.6, 0.4, 0.0]), constant([0.45, 0.1, 0.45])
    images = torch.zeros(1, 1, 2, 2)
    pseudo, confidence, from_static = dual_teacher_pseudo_labels(dynamic, static, images, False)
    assert (pseudo == 0).all() and not from_static.any()
    assert torch.allclose(confidence, torch.tensor(0.6))
    pseudo, confidence, from_static = dual_teacher_pseudo_labels(dynamic, static, images, False, 0.5)
    assert (pseudo == 2).all() and from_static.all()
    assert torch.allclose(confidence, torch.tensor(0.45 / 0.775))


def test_pseudo_label_set_takes_labels_and_confidence_after_the_background_scale(tmp_path):
    """A teacher at (0.6, 0.4, 0) everywhere, τ 0.55: with the plain softmax every pixel is
    confident background; at scale 0.5 class 1 at 0.4 / 0.7 = 0.571, still above τ."""
    teacher = FixedLogits(torch.tensor([0.6, 0.4, 1e-12]).log().view(1, 3, 1, 1).expand(2, 3, 8, 8))
    data = SimpleNamespace(train_names=["a", "b"], test_names=[], num_classes=3, label_mode="class")
    facts = {"img_size": 8, "normalize": {"mean": 0.0, "std": 1.0}}
    for scale, label, score in ((1.0, 0, 0.0), (0.5, 1, 0.4 / 0.7)):
        cfg = SimpleNamespace(eval_batch_size=2, tta="none", label_mode="class", conf_thresh=0.55,
                              pseudo_background_scale=scale)
        arrays, logs = ts.pseudo_label_set(teacher, facts, data, np.zeros((2, 8, 8), np.uint8),
                                           np.arange(2), 2, cfg, tmp_path / str(scale), "cpu")
        assert (arrays.train_masks == label).all() and logs["pseudo_ignored"] == 0
        assert logs["conf_pseudo"] == pytest.approx(score, rel=1e-5)  # mean confidence on foreground


def test_largest_component_per_class_and_slice():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, :3, :3] = 1                                 # class 1: 9 pixels, kept
    labels[0, 6, 6:8] = 1                                 # class 1: 2 pixels, cut
    labels[0, 4, 4] = labels[0, 5, 5] = 2                 # class 2: diagonal = one component
    labels[1, 7, 7] = 1                                   # slice 1: its only class-1 component
    pruned = largest_component_labels(labels)
    expected = labels.clone()
    expected[0, 6, 6:8] = IGNORE
    assert torch.equal(pruned, expected)


# ==== the edge branch and frozen stages ====
@pytest.mark.parametrize("name, options", [("attunet", {"base": 4}), ("segformer_b0", {})])
def test_edge_guided_network(name, options):
    torch.manual_seed(0)
    model = EdgeGuided(build_model(name, num_classes=5, **options), in_channels=1).eval()
    images = torch.randn(2, 1, 40, 56)
    logits, edge_logits = forward_with_edges(model, images)
    assert logits.shape == (2, 5, 40, 56) and edge_logits.shape == (2, 1, 40, 56)
    assert torch.equal(model(images), logits)
    assert torch.equal(model.decode(model.encode(images), (40, 56)), logits)
    assert forward_with_edges(model.model, images)[1] is None
    assert all(p.requires_grad for p in model.parameters())
    freeze_encoder_stages(model, 2)
    stages = getattr(model.model.encoder, "stages", model.model.encoder)
    assert not any(p.requires_grad for stage in stages[:2] for p in stage.parameters())
    assert all(p.requires_grad for stage in stages[2:] for p in stage.parameters())
    assert all(p.requires_grad for p in model.edge_head.parameters())


def test_edge_targets_against_a_pixel_loop():
    mask = torch.zeros(1, 7, 7, dtype=torch.long)
    mask[0, 2:5, 1:4] = 3
    mask[0, 0, 6] = IGNORE
    known = torch.zeros(1, 7, 7, dtype=torch.bool)
    known[0, 6, :] = True
    edges, valid = edge_targets(mask, known)
    for r in range(7):
        for c in range(7):
            window = mask[0, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
            assert edges[0, r, c] == float(window.unique().numel() > 1)
            near_ignored = (window == IGNORE).any()
            near_organ = ((window > 0) & (window != IGNORE)).any()
            assert valid[0, r, c] == (not near_ignored and (bool(known[0, r, c]) or near_organ))
    logits = torch.randn(1, 1, 7, 7, requires_grad=True)
    edge_loss(logits, mask, known).backward()
    assert (logits.grad[0, 0][~valid[0]] == 0).all() and (logits.grad[0, 0][valid[0]] != 0).all()


# ==== a smoke run of each mode, read back by test.py ====
@pytest.mark.parametrize("flags, message", [
    (["--mode", "co_training"], "mode: unknown 'co_training'"),
    (["--mode", "bcp", "--batch_size_unlabeled", "3", "--pretrain_share", "0.5"],
     "batch_size_unlabeled: BCP pairs"),
    (["--mode", "bcp", "--pretrain_share", "1"], "pretrain_share: 1 is not a share"),
    (["--mode", "bcp", "--pretrain_share", "0.9"], "pretrain_share: 0.9 of 2 epochs leaves no epoch"),
    (["--mode", "mean_teacher", "--freeze_encoder_stages", "6"], "freeze_encoder_stages: 6"),
    (["--mode", "pseudo_label", "--pseudo_share", "0"], "pseudo_share: 0 is not a share"),
    (["--mode", "pseudo_label", "--n_pseudo", "-1"], "n_pseudo: -1 is negative"),
    (["--mode", "mean_teacher", "--ema_alpha", "1.0"], "ema_alpha: 1.0 is not a decay"),
    (["--mode", "mean_teacher", "--consistency", "kl"], "consistency: unknown 'kl'"),
])
def test_bad_options_are_one_line_errors(flags, message, workdir, tiny_phantom):
    with pytest.raises(InputError, match=message):
        ts.main(["--config", "configs/tiny.yaml", "--data", str(tiny_phantom), *flags])


@pytest.mark.parametrize("mode, flags, logged", [
    ("mean_teacher", ["--epochs", "1"], {"consistency_weight", "conf_teacher"}),
    ("mean_teacher", ["--epochs", "1", "--consistency", "hard"], {"loss_u", "conf_teacher"}),
    ("pseudo_label", ["--epochs", "1", "--teacher_epochs", "1", "--zero_ce_presence", "true"],
     {"conf_pseudo", "loss_u"}),
    ("bcp", ["--iters_per_epoch", "1", "--pretrain_share", "0.5", "--edge_guided", "true"],
     {"mask_ratio", "static_share", "loss_edge"}),
])
def test_smoke_run_writes_a_checkpoint_test_py_reads(mode, flags, logged, workdir, tiny_phantom,
                                                     capsys):
    ts.main(["--config", "configs/tiny.yaml", "--data", str(tiny_phantom), "--out_dir", "run",
             "--mode", mode, *flags])
    records = [json.loads(line) for line in (workdir / "run" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["iteration"] == 2 and logged <= set(records[-1])
    assert (workdir / "run" / "config.yaml").read_text().startswith(f"# method: {mode}\n")  # utils.runs
    state = torch.load(workdir / "run" / "best.pth", weights_only=True)
    assert (state.get("teacher") is not None) == (mode != "pseudo_label")
    assert (workdir / "run" / "warm_start" / "best.pth").is_file() == (mode != "pseudo_label")
    assert state["model_kwargs"].get("edge_guided", False) == ("--edge_guided" in flags)
    for run in ("run", "run/teacher") if "--zero_ce_presence" in flags else ():
        # the student's and its teacher's loss weigh each class, between 1 - r (absent) and 1
        saved = torch.load(workdir / run / "best.pth", weights_only=True)
        weights, absent = saved["loss"]["zero_class_weights"], 1 - saved["config"]["annotation_rate"]
        assert weights[0] == 1 and ((weights >= absent - 1e-6) & (weights <= 1)).all() and weights.unique().numel() > 1
    if mode == "pseudo_label":
        scores = json.loads((workdir / "run" / "pseudo_labels" / "scores.json").read_text())
        kept = np.load(workdir / "run" / "pseudo_labels" / "masks.npy")
        assert len(kept) == scores["kept"] == sum(s["kept"] for s in scores["slices"])
    capsys.readouterr()
    test_script.main(["--ckpt", str(workdir / "run" / "best.pth"), "--gpu", "-1"])
    out = capsys.readouterr().out
    assert "student weights" in out and "per-class Dice" in out  # eval_weights: student


@pytest.mark.parametrize("mode", ["mean_teacher", "bcp"])
def test_student_and_teachers_start_from_the_warm_start(mode, workdir, tiny_phantom, monkeypatch):
    built = []
    real_build_parts = ts.build_parts

    def recording_build_parts(*args, **kwargs):
        parts, run = real_build_parts(*args, **kwargs)
        built.append({name: {k: v.clone() for k, v in module.state_dict().items()}
                      for name, module in run.modules.items() if "teacher" in name or name == "model"})
        return parts, run

    monkeypatch.setattr(ts, "build_parts", recording_build_parts)
    common = ["--config", "configs/tiny.yaml", "--data", str(tiny_phantom), "--mode", mode]
    ts.main(common + ["--out_dir", "run", "--iters_per_epoch", "1", "--warm_start_epochs", "2"])
    start = torch.load(workdir / "run" / "warm_start" / "best.pth", weights_only=True)
    assert start["method"] == "supervised" and start["config"]["epochs"] == 2
    names = {"mean_teacher": {"model", "teacher"}, "bcp": {"model", "teacher", "static_teacher"}}
    assert set(built[0]) == names[mode]
    for weights in built[0].values():
        for key, value in start["model"].items():
            assert torch.equal(weights[key], value), key

    ts.main(common + ["--out_dir", "scratch", "--iters_per_epoch", "1", "--warm_start", "false"])
    assert not (workdir / "scratch" / "warm_start").exists()
    assert not all(torch.equal(built[1]["model"][key], value) for key, value in start["model"].items())


@pytest.mark.parametrize("eval_weights", ["student", "teacher"])
def test_eval_weights_is_the_network_validated_and_tested(eval_weights, workdir, tiny_phantom, capsys):
    """The validation score in the log is the score of the `eval_weights` network (test.py on the
    validation split with the same settings), which test.py then uses by default; the other
    network scores differently, so a swap would show."""
    ts.main(["--config", "configs/tiny.yaml", "--data", str(tiny_phantom), "--out_dir", "run",
             "--mode", "mean_teacher", "--epochs", "1", "--iters_per_epoch", "4",
             "--eval_weights", eval_weights])
    logged = json.loads((workdir / "run" / "log.jsonl").read_text().splitlines()[-1])["val_dice"]
    scored = {}
    for weights in ("", "student", "teacher"):
        capsys.readouterr()
        choice = ["--weights", weights] if weights else []
        test_script.main(["--ckpt", "run/best.pth", "--gpu", "-1", "--tta", "none", "--no-postprocess",
                          "--background_scale", "1", "--out", f"{weights or 'default'}/submission.csv", *choice])
        scored[weights] = json.loads((workdir / (weights or "default") / "scores.json").read_text())["val"]["dice"]
        assert f"{weights or eval_weights} weights" in capsys.readouterr().out
    other = {"student": "teacher", "teacher": "student"}[eval_weights]
    assert scored[eval_weights] == pytest.approx(logged, abs=1e-6) and scored[""] == scored[eval_weights]
    assert abs(scored[other] - logged) > 1e-4


def test_checkpoints_without_eval_weights_are_scored_by_their_teacher():
    from utils.checkpoint import evaluated_weights
    assert evaluated_weights({}, has_teacher=True) == "teacher"  # written before eval_weights
    assert evaluated_weights({"eval_weights": "student"}, has_teacher=True) == "model"
    assert evaluated_weights({"eval_weights": "teacher"}, has_teacher=True) == "teacher"
    assert evaluated_weights({"eval_weights": "teacher"}, has_teacher=False) == "model"
