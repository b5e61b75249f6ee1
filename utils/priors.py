"""Partial-label priors: what the labeled training set tells about each class before training,
and the pseudo-label hygiene that uses it (README, Losses and partial labels).

- `class_area_statistics`: per class, the share of slices it is annotated on and its area
  fraction on each slice where it is present;
- `class_area_bounds`: from those, the largest plausible area of a class on one slice (the bound
  of `losses.area_constraint_loss` and of the pseudo-label filter);
- `labeled_area_bounds`, `labeled_annotation_frequency`: the same, read the way a config asks
  for them (None when no option needs them);
- `teacher_probabilities`, `teacher_labels`: a teacher's softmax, confidence and argmax, with the
  background prior shifted by a run's `pseudo_background_scale`;
- `drop_oversized_pseudo_labels`, `confident_pseudo_labels`: a teacher's labels made fit to
  teach — unsure pixels and classes beyond their bound ignored.
"""
import math

import numpy as np
import torch

from utils.losses import IGNORE_INDEX


# ---------------------------------------------------------------- labeled-set statistics (Kervadec et al. 2019)
def class_area_statistics(masks, annotated, num_classes):
    """Per-class area statistics of a labeled set, the prior of the area constraint.

    masks `(N, H, W)` ints (partial labels), annotated `(N, C)` bool (classes annotated on each
    slice; a class present in a mask counts as annotated). Only slices where a class is
    present tell its area (elsewhere an unannotated organ reads 0, and an annotated but absent
    class says nothing about its size when present). Returns a dict of NumPy arrays:
    `annotation_rate (C,)` (share of the slices on which the class is annotated), `areas` (list
    of C arrays: the class's area fraction of each slice where it is present) and
    `max_area (C,)` (0 for a class never seen). Background (0) is included.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3 or len(masks) == 0:
        raise ValueError(f"masks must be (N, H, W) with N > 0, got {masks.shape}")
    counts = np.stack([np.bincount(m.ravel(), minlength=num_classes)[:num_classes] for m in masks])
    fractions = counts / float(masks.shape[1] * masks.shape[2])
    present = counts > 0
    annotated = present if annotated is None else np.asarray(annotated, bool) | present
    areas = [fractions[present[:, c], c] for c in range(num_classes)]
    return {"annotation_rate": annotated.mean(axis=0), "areas": areas,
            "max_area": np.array([a.max() if a.size else 0.0 for a in areas])}


def class_area_bounds(masks, annotated, num_classes, quantile=0.95, margin=1.5):
    """Per-class upper bound of the predicted area on one slice, as a fraction of the slice.

    From `class_area_statistics`: the `quantile` of the class's annotated areas times `margin`
    (augmentation rescales areas by up to 1.2² = 1.44), capped at 1. A class never annotated in
    the labeled set gets bound 0: nothing in the labels supports predicting it anywhere.
    Background gets 1 (no bound). Returns a float32 tensor `(C,)`.
    """
    stats = class_area_statistics(masks, annotated, num_classes)
    bounds = np.array([np.quantile(a, quantile) * margin if a.size else 0.0 for a in stats["areas"]])
    bounds[0] = 1.0
    return torch.from_numpy(np.minimum(bounds, 1.0)).float()


# ---------------------------------------------------------------- the same, as a config asks for them
def labeled_area_bounds(cfg, masks, annotated, device="cpu"):
    """`class_area_bounds` of the labeled training masks `(N,H,W)` / annotated `(N,C)` with the
    config's `area_quantile` (0.95) and `area_margin` (1.5), on `device`; None when neither the
    area constraint (`area_weight`) nor the pseudo-label filter (`pseudo_area_filter`) is on."""
    if float(cfg.area_weight) <= 0 and not cfg.get("pseudo_area_filter"):
        return None
    return class_area_bounds(masks, annotated, cfg.num_classes, float(cfg.area_quantile),
                             float(cfg.area_margin)).to(device)


def labeled_annotation_frequency(cfg, masks, annotated):
    """The share of the labeled training masks `(N,H,W)` / annotated `(N,C)` on which each class
    is annotated (`class_area_statistics`), for the presence-aware zero-pixel term
    (`losses.unannotated_class_weights`); None when `zero_ce_presence` is off."""
    if not cfg.zero_ce_presence:
        return None
    return class_area_statistics(masks, annotated, cfg.num_classes)["annotation_rate"]


# ---------------------------------------------------------------- pseudo-label hygiene
def teacher_probabilities(logits, background_scale=1.0):
    """A teacher's `logits [B,C,H,W]` -> its softmax `[B,C,H,W]` (float32, no gradient) with the
    background probability multiplied by `background_scale` and renormalised (as
    `utils.inference.shift_background` does to probabilities; here log s is added to the
    background logit): the prior shift of `test.py --background_scale` (Saerens et al., Neural
    Computation 2002) applied to what a teacher teaches. A model trained on partial labels calls
    too much background; below 1 its pseudo-labels stop passing that tilt on to the student.
    1 = the plain softmax."""
    logits = logits.detach().float()
    if background_scale != 1:
        background = (logits[:, :1] + math.log(background_scale) if background_scale > 0
                      else torch.full_like(logits[:, :1], -math.inf))
        logits = torch.cat([background, logits[:, 1:]], 1)
    return logits.softmax(1)


def teacher_labels(logits, background_scale=1.0):
    """(confidence `[B,H,W]`, labels `[B,H,W]` int64): the maximum and argmax of
    `teacher_probabilities`."""
    return teacher_probabilities(logits, background_scale).max(1)


def drop_oversized_pseudo_labels(labels, bounds, ignore_index=IGNORE_INDEX):
    """Pseudo-label hygiene: a class that covers more of a slice than `bounds` allows is not
    taught there — its pixels become `ignore_index`.

    labels `[B,H,W]` ints (pseudo-labels; `ignore_index` pixels stay ignored), bounds `(C,)`
    area fractions (`class_area_bounds`). The area of class c on slice b is its share of the
    H·W pixels. Returns a new tensor; the input is not modified.
    """
    num_classes = bounds.shape[0]
    flat = labels.flatten(1).long()
    valid = flat != ignore_index
    counts = torch.zeros(flat.shape[0], num_classes + 1, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, torch.where(valid, flat, num_classes), torch.ones_like(flat))
    area = counts[:, :num_classes].to(torch.float64) / flat.shape[1]
    oversized = area > bounds.to(device=labels.device, dtype=torch.float64)  # [B, C]
    oversized_pixel = torch.gather(
        torch.cat([oversized, oversized.new_zeros(flat.shape[0], 1)], 1), 1,
        torch.where(valid, flat, num_classes))
    return torch.where(oversized_pixel.view_as(labels), torch.full_like(labels, ignore_index), labels)


def confident_pseudo_labels(confidence, labels, conf_thresh, area_bounds=None,
                            ignore_index=IGNORE_INDEX):
    """A teacher's argmax `labels [B,H,W]` made into pseudo-labels: `ignore_index` where its
    `confidence [B,H,W]` is under `conf_thresh` (an unsure teacher's argmax is mostly background
    where it misses an organ), and with `area_bounds (C,)` a class covering more of a slice than
    its bound ignored there (`drop_oversized_pseudo_labels`). Returns a new tensor."""
    labels = labels.masked_fill(confidence < conf_thresh, ignore_index)
    if area_bounds is not None:
        labels = drop_oversized_pseudo_labels(labels, area_bounds, ignore_index)
    return labels
