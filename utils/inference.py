"""Batched prediction of whole slices at the file's resolution, with optional test-time
augmentation, by one network or the mean softmax of several (an ensemble). One function
(`predict_ensemble`, of which `predict_slices` is the one-network case) serves validation
during training, `test.py` (single checkpoints, ensembles, out-of-fold scores) and the
teachers that label unlabeled images, so they all preprocess identically — and, in instance
mode (README, "#150 instance mode"), extract structures identically: the mean background /
interior / boundary probabilities at the file's resolution go through
`utils.instances.structures_from_probabilities`.
"""
import itertools
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dataloaders.challenge import LABEL_MODES
from dataloaders.datasets import normalize, resize
from utils.instances import structures_from_probabilities

TTA_MODES = ("none", "shift", "flip", "shift_flip")


def _tta_views(mode):
    """[(dy, dx, scale, flip)] views averaged by `mode` (shifts in pixels of the network input)."""
    views = [(0, 0, 1.0, False)]
    if "shift" in mode:
        views += [(dy, dx, 1.0, False) for dy, dx in ((-4, 0), (4, 0), (0, -4), (0, 4))]
        views += [(0, 0, scale, False) for scale in (0.9, 1.1)]
    if "flip" in mode:
        views += [(dy, dx, scale, True) for dy, dx, scale, _ in views]
    return views


def _shift(x, dy, dx):
    """Translate `x [B,C,H,W]` by (dy, dx) pixels with zero fill (no wrap-around)."""
    if dy == 0 and dx == 0:
        return x
    height, width = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top:top + height, left:left + width]


@torch.no_grad()
def predict_probabilities(model, batch, views):
    """Mean softmax `[B,C,h,w]` of `model` over the TTA `views` of the normalised `batch`."""
    size = batch.shape[-2:]
    total = 0
    for dy, dx, scale, flip in views:
        x = batch.flip(-1) if flip else batch
        if scale != 1.0:
            side = [int(round(s * scale)) for s in size]  # the networks pad to their stride
            x = F.interpolate(x, size=side, mode="bilinear", align_corners=False)
        logits = model(_shift(x, dy, dx))
        logits = _shift(logits, -dy, -dx)
        if scale != 1.0:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        probabilities = logits.float().softmax(1)
        total = total + (probabilities.flip(-1) if flip else probabilities)
    return total / len(views)


@dataclass
class Member:
    """One network of an ensemble with its own preprocessing: `img_size`, the side of its input,
    and `norm`, the intensity normalisation it was trained with."""
    model: torch.nn.Module
    img_size: int
    norm: dict


@dataclass
class Prediction:
    """`labels (N,H,W) uint8` (classes, or structure ids in instance mode); `confidence (N,H,W)
    float32` (max mean probability) and `member_labels (M,N,H,W) uint8` (each member's own
    labels) when asked for, else None."""
    labels: np.ndarray
    confidence: np.ndarray | None = None
    member_labels: np.ndarray | None = None


@contextmanager
def _evaluating_on(model, device):
    """`model` in eval mode on `device`, then back where it was (device and mode)."""
    state = next(itertools.chain(model.parameters(), model.buffers()), None)
    home = state.device if state is not None else torch.device(device)  # stateless: anywhere
    was_training = model.training
    model.to(device).eval()
    try:
        yield model
    finally:
        model.to(home).train(was_training)


def labels_from_probabilities(probabilities, label_mode, background_scale=1.0):
    """`[B,C,H,W]` probabilities -> `(B,H,W)` uint8 NumPy labels: the argmax class in class mode,
    the structure ids of the seeded watershed in instance mode (C = 3).

    `background_scale` (class mode): the background probability is multiplied by it before the
    argmax, a shift of the background prior at decision time (Saerens et al., Neural Computation
    2002; Menon et al., ICLR 2021): below 1 a pixel is called background only when background is
    that much more likely than its most likely organ (README, Evaluation and submission)."""
    if label_mode == "instance":
        return structures_from_probabilities(probabilities).astype(np.uint8)  # ids <= 255
    # the same argmax (first maximum) over contiguous class values: ~1.6x faster than along dim 1;
    # that one copy also takes the background scale, leaving the caller's probabilities alone
    values = probabilities.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)
    if background_scale != 1:
        values[..., 0] *= background_scale
    return values.argmax(-1).cpu().numpy().astype(np.uint8)


def shift_background(probabilities, background_scale):
    """`[B,C,H,W]` probabilities with the background's (channel 0) multiplied by
    `background_scale` and each pixel renormalised to sum to 1: the distribution whose argmax
    `labels_from_probabilities` takes, and whose maximum is that label's confidence. A new tensor
    (the input itself when the scale is 1)."""
    if background_scale == 1:
        return probabilities
    weights = torch.ones(probabilities.shape[1], dtype=probabilities.dtype, device=probabilities.device)
    weights[0] = background_scale
    shifted = probabilities * weights.view(1, -1, 1, 1)
    return shifted / shifted.sum(1, keepdim=True).clamp_min(torch.finfo(shifted.dtype).tiny)


@torch.no_grad()
def predict_ensemble(members, images, device, batch_size=16, tta="none", with_confidence=False,
                     each_member=False, progress=None, label_mode="class", background_scale=1.0):
    """Predict label maps for `images (N,H,W) uint8` at their own resolution from the mean over
    `members` of their softmax (each with its own preprocessing and the `tta` views), resized to
    the file's resolution: its argmax (class mode) or its structures (instance mode: the 3-class
    probabilities are averaged first, then one watershed), with `background_scale` as in
    `labels_from_probabilities` (and the confidence the maximum of `shift_background`'s
    distribution, the one the class labels come from). Returns a `Prediction`.

    Memory stays that of one network and one batch: for each batch of images the members run
    one after another, each moved to `device` only while it predicts (so the members can wait
    on the host), and its probabilities are added to the batch's running sum. Averaging over
    the whole set member by member would need the set's probabilities at once instead —
    500 slices x 55 classes x 256 x 256 in float32 is 7 GB.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    views = _tta_views(tta)
    count, height, width = images.shape
    result = Prediction(labels=np.empty((count, height, width), np.uint8))
    if with_confidence:
        result.confidence = np.empty((count, height, width), np.float32)
    if each_member:
        result.member_labels = np.empty((len(members), count, height, width), np.uint8)
    starts = range(0, count, batch_size)
    for start in (progress(starts) if progress else starts):
        raw = torch.from_numpy(np.array(images[start:start + batch_size]))[:, None]
        rows = slice(start, start + len(raw))
        total = None
        for index, member in enumerate(members):
            batch = normalize(resize(raw, member.img_size), member.norm).to(device)
            with _evaluating_on(member.model, device) as model:
                probabilities = predict_probabilities(model, batch, views)
            probabilities = F.interpolate(probabilities, size=(height, width), mode="bilinear",
                                          align_corners=False)
            if each_member:
                result.member_labels[index, rows] = labels_from_probabilities(
                    probabilities, label_mode, background_scale)
            total = probabilities if total is None else total.add_(probabilities)
        total.div_(len(members))
        result.labels[rows] = labels_from_probabilities(total, label_mode, background_scale)
        if with_confidence:  # instance mode: the watershed ignores the scale, and so does this
            scale = background_scale if label_mode == "class" else 1
            result.confidence[rows] = shift_background(total, scale).max(1).values.cpu().numpy()
    return result


def predict_slices(model, images, img_size, norm, device, batch_size=16, tta="none",
                   with_confidence=False, progress=None, label_mode="class", background_scale=1.0):
    """Predict label maps (classes, or structure ids in instance mode) for `images (N,H,W) uint8`
    at their own resolution with one network.

    Returns `labels (N,H,W) uint8` and, with `with_confidence`, `confidence (N,H,W) float32`
    (the max softmax probability, after `background_scale` as in `predict_ensemble`). The model's
    mode and device are restored afterwards.
    """
    result = predict_ensemble([Member(model, img_size, norm)], images, device, batch_size, tta,
                              with_confidence, progress=progress, label_mode=label_mode,
                              background_scale=background_scale)
    return (result.labels, result.confidence) if with_confidence else result.labels
