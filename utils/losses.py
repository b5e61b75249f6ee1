# Naming across the repo (UniMatch's grammar): img_x / mask_x = labeled image and its mask;
# img_u_w = weakly augmented unlabeled image; img_u_s1 / img_u_s2 = its two strong views;
# conf_u_w = confidence (max softmax probability) of the prediction on img_u_w.
"""Segmentation losses shared by every training script (README, Losses and partial labels): the
plain and partial-label losses, the area constraint, the zero-pixel loss, the edge loss, and the
whole supervised loss (`SupervisedLoss`, built from the config by `build_loss`) and stream loss
(`build_stream_loss`). What the labeled set tells before training (area bounds, annotation
frequencies) and pseudo-label hygiene are in utils/priors.py.

Conventions for every loss here:
- `logits`  float `[B, C, H, W]` (float16/bfloat16 are upcast: every loss is computed in float32, or
  float64 for float64 input; no matmul-type ops are used, so autocast cannot lower the precision);
- `target`  integer `[B, H, W]`, values in 0..C-1 (0 = background, or "not annotated" with partial
  labels); the value `IGNORE_INDEX` (255, UniMatch's pseudo-label convention) also marks ignored pixels;
- `ignore`  optional bool `[B, H, W]`, True = the pixel is excluded (contributes nothing, gets no gradient);
- `annotated` optional bool `[B, C]`: which classes were annotated on each image. Column 0 (background)
  is ignored. A class that occurs in an image's target counts as annotated even if the flag says not;
  when `annotated` is None the classes present in each target are the annotated ones.
Every loss returns a scalar tensor connected to the graph, never NaN. When no pixel is usable the
CE, Dice, marginal, exclusion and MSE losses give 0; t-vMF gives its constant for empty classes.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import InputError

IGNORE_INDEX = 255
_EPS = 1e-12


# ---------------------------------------------------------------- shared plumbing
def _as_float(tensor):
    """Half-precision inputs are upcast so sums over 65k pixels and log/exp stay accurate."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _prepare(logits, target, ignore):
    """Check shapes; return (logits float, safe target long [B,H,W], valid bool [B,H,W]).

    Ignored pixels get target 0 in `safe target` so one-hot/gather never see 255; they carry
    weight 0 everywhere through `valid`.
    """
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits [B,C,H,W] and target [B,H,W] expected, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    target = target.long()
    valid = target != IGNORE_INDEX
    if ignore is not None:
        if ignore.shape != target.shape:
            raise ValueError(f"ignore must be {tuple(target.shape)}, got {tuple(ignore.shape)}")
        valid = valid & ~ignore.bool()
    return _as_float(logits), torch.where(valid, target, 0), valid


def _one_hot(target, num_classes, dtype):
    """[B,H,W] int -> [B,C,H,W] float one-hot."""
    return F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(dtype)


def _masked_mean(values, valid):
    """Mean of `values` [B,H,W] over `valid` pixels; 0 (still in the graph) when none are valid."""
    return torch.where(valid, values, 0).sum() / valid.sum().clamp(min=1)


def _soft_dice(pred, truth, dims, squared, smooth):
    """Soft Dice coefficient (2·Σpt + s) / (Σp + Σt + s), summed over `dims`; values in [0, 1].

    `pred`, `truth`: same shape, already multiplied by the validity weight. With `squared` the
    denominator sums p² and t² (Milletari et al. 2016). The clamp only matters for smooth = 0 on an
    empty class, where it turns 0/0 into Dice 0 instead of NaN.
    """
    intersection = (pred * truth).sum(dims)
    if squared:
        denominator = (pred * pred).sum(dims) + (truth * truth).sum(dims)
    else:
        denominator = pred.sum(dims) + truth.sum(dims)
    return (2 * intersection + smooth) / (denominator + smooth).clamp(min=_EPS)


def _effective_annotated(target, annotated, num_classes, valid):
    """bool [B,C]: annotated classes per image, with background and every class present in the
    (valid part of the) target forced True."""
    batch = target.shape[0]
    labels = torch.where(valid, target, 0).flatten(1)
    present = torch.zeros(batch, num_classes, dtype=torch.bool, device=target.device)
    present.scatter_(1, labels, True)
    if annotated is not None:
        if annotated.shape != (batch, num_classes):
            raise ValueError(f"annotated must be [B,C] = {(batch, num_classes)}, got {tuple(annotated.shape)}")
        present |= annotated.to(device=target.device, dtype=torch.bool)
    present[:, 0] = True
    return present


def _merge_unannotated(probs, annotated):
    """Marginalise probabilities over the classes not annotated on each image.

    probs [B,C,H,W] in [0,1]; annotated bool [B,C] with column 0 True. Channel 0 becomes
    p_0 + Σ_{k unannotated} p_k (a 0-labelled pixel may be any of these, Shi et al. 2021); the
    unannotated channels become 0 on that image. Channels still sum to 1 per pixel.
    """
    unannotated = (~annotated).to(probs.dtype)[:, :, None, None]
    merged_background = probs[:, :1] + (probs * unannotated).sum(1, keepdim=True)
    kept = probs[:, 1:] * annotated[:, 1:].to(probs.dtype)[:, :, None, None]
    return torch.cat([merged_background, kept], dim=1)


# ---------------------------------------------------------------- plain losses
def dice_loss(logits, target, ignore=None, include_background=False, squared=False, smooth=1e-5):
    """Soft Dice loss: Dice per class over the whole batch, 1 − Dice averaged over classes.

    logits [B,C,H,W], target int [B,H,W], ignore bool [B,H,W] (True = excluded from both sums).
    `include_background` keeps class 0 in the mean; `squared` uses Σp² + Σt² denominators;
    `smooth` is added to numerator and denominator, so a class absent from the batch scores
    loss 0 only if it is also predicted nowhere. Returns a scalar in [0, 1].
    """
    logits, target, valid = _prepare(logits, target, ignore)
    weight = valid.unsqueeze(1).to(logits.dtype)
    probs = logits.softmax(1) * weight
    truth = _one_hot(target, logits.shape[1], logits.dtype) * weight
    dice = _soft_dice(probs, truth, (0, 2, 3), squared, smooth)
    return 1 - (dice if include_background else dice[1:]).mean()


def cross_entropy(logits, target, ignore=None):
    """Pixel-wise cross-entropy, mean over valid pixels.

    logits [B,C,H,W], target int [B,H,W] (255 = ignored), ignore bool [B,H,W] (True = excluded).
    Returns a scalar ≥ 0; exactly 0 (connected to the graph) when no pixel is valid.
    """
    logits, target, valid = _prepare(logits, target, ignore)
    nll = -logits.log_softmax(1).gather(1, target.unsqueeze(1)).squeeze(1)
    return _masked_mean(nll, valid)


def mse_consistency(p, q, mask=None):
    """Mean squared difference between two probability maps (student vs teacher).

    p, q [B,C,H,W] with values in [0,1]; mask bool [B,H,W], True = pixel INCLUDED (note: the
    opposite of `ignore`). Mean over included pixels and channels; 0 when the mask is empty.
    Gradient flows into both maps — detach the teacher's map before calling.
    """
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    squared_error = (_as_float(p) - _as_float(q)).pow(2).mean(1)
    if mask is None:
        return squared_error.mean()
    return _masked_mean(squared_error, mask.bool())


class TvMFDiceLoss(nn.Module):
    """Adaptive t-vMF Dice loss (Kato & Hotta, "Adaptive t-vMF dice loss: An effective expansion of
    dice loss for medical image segmentation", Computers in Biology and Medicine, 2023).

    Per class c: cos_c = cosine between the softmax map and the one-hot target, each L2-normalised
    over the whole batch (B·H·W values, as the authors' code does);
    φ_c = (1 + cos_c) / (1 + κ_c (1 − cos_c)) − 1 and the loss is mean_c (1 − φ_c)² over all classes,
    background included (as the authors' code). κ = 0 gives (1 − cos)²; larger κ makes the loss
    sharper around cos = 1. Range: [0, 4]. A class absent from the batch's target has cos = 0 and
    contributes a constant without gradient (as in the authors' code).

    κ is a per-class buffer (saved in `state_dict`, so a resumed run keeps it), 0 at the start, set by
    `update_kappa` after each validation to λ · (validation Dice of that class).

    With `partial_labels`, probabilities are first marginalised over each image's unannotated classes
    (`_merge_unannotated`): channel 0 holds background + unannotated mass, and a class contributes to
    its cosine only from images on which it was annotated.
    """

    def __init__(self, num_classes, lam=32.0, partial_labels=False):
        super().__init__()
        self.num_classes = num_classes
        self.lam = lam
        self.partial_labels = partial_labels
        self.register_buffer("kappa", torch.zeros(num_classes))

    @torch.no_grad()
    def update_kappa(self, dice_per_class):
        """Set κ_c = λ · Dice_c.

        dice_per_class: sequence/array/tensor of validation Dice in [0,1], either of length C
        (index = class id) or C − 1 (classes 1..C−1, as the challenge metric reports; background
        then keeps its κ). A NaN Dice (class never seen in validation) keeps that class's previous κ.
        """
        dice = torch.as_tensor(dice_per_class, dtype=self.kappa.dtype).flatten().to(self.kappa.device)
        if dice.numel() == self.num_classes - 1:
            dice = torch.cat([dice.new_full((1,), math.nan), dice])
        if dice.numel() != self.num_classes:
            raise ValueError(f"dice_per_class needs {self.num_classes} or {self.num_classes - 1} values, "
                             f"got {dice.numel()}")
        self.kappa.copy_(torch.where(dice.isnan(), self.kappa, self.lam * dice))

    def forward(self, logits, target, ignore=None, annotated=None):
        """logits [B,C,H,W], target int [B,H,W], ignore bool [B,H,W], annotated bool [B,C]
        (used only with `partial_labels`). Returns a scalar in [0, 4]."""
        logits, target, valid = _prepare(logits, target, ignore)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"TvMFDiceLoss built for {self.num_classes} classes, logits have {logits.shape[1]}")
        probs = logits.softmax(1)
        if self.partial_labels:
            probs = _merge_unannotated(probs, _effective_annotated(target, annotated, self.num_classes, valid))
        weight = valid.unsqueeze(1).to(logits.dtype)
        probs = probs * weight
        truth = _one_hot(target, self.num_classes, logits.dtype) * weight
        dims = (0, 2, 3)
        # Norms from clamped squared sums: no 0/0 and no infinite sqrt gradient on an empty class.
        norms = ((probs * probs).sum(dims).clamp(min=_EPS ** 2).sqrt()
                 * (truth * truth).sum(dims).clamp(min=_EPS ** 2).sqrt())
        cosine = (probs * truth).sum(dims) / norms
        kappa = self.kappa.to(cosine)
        phi = (1 + cosine) / (1 + kappa * (1 - cosine)) - 1
        return ((1 - phi) ** 2).mean()


# ---------------------------------------------------------------- partial-label losses
def marginal_cross_entropy(logits, target, annotated=None, ignore=None):
    """Marginal cross-entropy (Shi et al., "Marginal loss and exclusion loss for partially supervised
    multi-organ segmentation", Medical Image Analysis 2021).

    A pixel labelled c ≥ 1 has likelihood p_c; a pixel labelled 0 on image b may be background or any
    class not annotated on b, so its likelihood is p_0 + Σ_{k unannotated on b} p_k (a logsumexp of
    log-probabilities). Mean of −log likelihood over valid pixels. Equals `cross_entropy` when every
    class is annotated and is never larger. logits [B,C,H,W], target int [B,H,W], annotated bool
    [B,C], ignore bool [B,H,W]. Returns a scalar ≥ 0 (0 when no pixel is valid).
    """
    logits, target, valid = _prepare(logits, target, ignore)
    annotated = _effective_annotated(target, annotated, logits.shape[1], valid)
    log_probs = logits.log_softmax(1)
    annotated_foreground = annotated.clone()
    annotated_foreground[:, 0] = False
    merged_background = torch.logsumexp(
        log_probs.masked_fill(annotated_foreground[:, :, None, None], -math.inf), dim=1)
    labelled = log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    log_likelihood = torch.where(target == 0, merged_background, labelled)
    return _masked_mean(-log_likelihood, valid)


def marginal_dice_loss(logits, target, annotated=None, ignore=None, include_background=False,
                       squared=False, smooth=1e-5):
    """Marginal Dice loss (Shi et al., Medical Image Analysis 2021).

    Probabilities are marginalised per image (channel 0 = background + unannotated classes), Dice is
    computed per (image, class) over H·W, and 1 − Dice is averaged only over annotated (image, class)
    pairs — plus the merged background channel of every image when `include_background`.
    Same inputs and options as `dice_loss` plus annotated bool [B,C]. Returns a scalar in [0, 1]
    (0 when there is no pair to score).
    """
    logits, target, valid = _prepare(logits, target, ignore)
    num_classes = logits.shape[1]
    annotated = _effective_annotated(target, annotated, num_classes, valid)
    weight = valid.unsqueeze(1).to(logits.dtype)
    probs = _merge_unannotated(logits.softmax(1), annotated) * weight
    truth = _one_hot(target, num_classes, logits.dtype) * weight
    dice = _soft_dice(probs, truth, (2, 3), squared, smooth)
    scored_pairs = annotated.clone()
    scored_pairs[:, 0] = include_background
    return torch.where(scored_pairs, 1 - dice, 0).sum() / scored_pairs.sum().clamp(min=1)


def exclusion_loss(logits, target, annotated=None, ignore=None, smooth=1e-5):
    """Exclusion loss (Shi et al., Medical Image Analysis 2021): organs do not overlap, so a class not
    annotated on an image must have no probability inside that image's annotated structures.

    For each image b with some annotated foreground F_b = {target > 0} and each class k unannotated
    on b: soft Dice overlap 2·Σ p_k·F_b / (Σ p_k + |F_b|), averaged over those (image, class) pairs.
    Inputs as `marginal_cross_entropy`. Returns a scalar in [0, 1), 0 when there is no such pair.
    """
    logits, target, valid = _prepare(logits, target, ignore)
    annotated = _effective_annotated(target, annotated, logits.shape[1], valid)
    weight = valid.unsqueeze(1).to(logits.dtype)
    foreground = ((target > 0) & valid).unsqueeze(1).to(logits.dtype)
    overlap = _soft_dice(logits.softmax(1) * weight, foreground.expand_as(logits), (2, 3), False, smooth)
    # Images without annotated foreground are skipped: there smoothing alone would read as overlap.
    scored_pairs = ~annotated & (foreground.flatten(1).sum(1) > 0)[:, None]
    return torch.where(scored_pairs, overlap, 0).sum() / scored_pairs.sum().clamp(min=1)


# ---------------------------------------------------------------- area constraint (Kervadec et al. 2019)
def area_constraint_loss(logits, bounds, ignore=None):
    """Area constraint (Kervadec et al., "Constrained-CNN losses for weakly supervised
    segmentation", Medical Image Analysis 2019), upper bounds only.

    Soft area a_bc = Σ_valid softmax_c / (H·W), the fraction of slice b that class c takes;
    penalty = mean over images of Σ_c max(0, a_bc − u_c)², u = `bounds (C,)` fractions. It only
    acts on a class predicted on more of a slice than its annotations ever show, whatever the
    labels of the pixels, so it also reaches the unannotated tissue that marginal losses let
    any unannotated class absorb. logits [B,C,H,W], ignore bool [B,H,W] (True = excluded).
    Returns a scalar ≥ 0.
    """
    logits = _as_float(logits)
    if bounds.shape != (logits.shape[1],):
        raise ValueError(f"bounds must be (C,) = ({logits.shape[1]},), got {tuple(bounds.shape)}")
    probs = logits.softmax(1)
    if ignore is not None:
        probs = probs * (~ignore.bool()).unsqueeze(1).to(probs.dtype)
    area = probs.sum((2, 3)) / (logits.shape[2] * logits.shape[3])
    excess = (area - bounds.to(area)).clamp(min=0)
    return (excess * excess).sum(1).mean()


# ---------------------------------------------------------------- the zero-pixel loss (the annotation model)
def _check_annotation_rate(rate):
    if not 0.0 <= rate <= 1.0:
        raise InputError(f"annotation_rate: must be in [0, 1], got {rate}")


def unannotated_class_weights(annotation_rate, annotation_frequency):
    """Weight w_k of an unannotated class k against background (weight 1) in the likelihood of a
    0-pixel, `zero_pixel_loss`. Returns a float32 tensor `(C,)` with w_0 = 1.

    A 0-pixel of class k means k was left unannotated on its slice: probability 1 − r. A 0-pixel
    of background also means k was left unannotated, which costs 1 − r too when k is present
    elsewhere on the slice and nothing when it is absent. The plain term takes k as absent
    (w_k = 1 − r, the strongest push toward background). With `annotation_frequency (C,)`, the
    share f_k of the labeled slices on which k is annotated, the presence of k is estimated as
    π_k = min(1, f_k / r), and w_k = (1 − r) / (1 − r·π_k): 1 − r for a class that is rarely
    present (no free destination for unannotated tissue), toward 1 (no preference) for a class
    on almost every slice, whose unannotated pixels are then not pushed to background
    (README, Losses and partial labels). r = 1 gives 0 for every class (plain CE).
    """
    _check_annotation_rate(annotation_rate)
    frequency = np.asarray(annotation_frequency, dtype=np.float64)
    if annotation_rate == 0:
        weights = np.ones_like(frequency)
    elif annotation_rate == 1:
        weights = np.zeros_like(frequency)
    else:
        presence = np.minimum(1.0, frequency / annotation_rate)
        weights = (1.0 - annotation_rate) / (1.0 - annotation_rate * presence)
    weights[0] = 1.0
    return torch.from_numpy(weights).float()


def zero_pixel_loss(logits, target, annotated=None, ignore=None, annotation_rate=1.0,
                    class_weights=None):
    """Cross-entropy of the label 0 under a model of how partial masks are made: each structure
    present on a slice is annotated with probability r = `annotation_rate`, independently.

    A 0-pixel is then background (probability 1 of being labelled 0) or a class not annotated on
    its slice (probability 1 − r), never an annotated class, so its likelihood is
    p_0 + (1 − r)·Σ_{k unannotated} p_k. Mean of −log likelihood over valid 0-pixels only.
    r = 0 is the marginal CE of those pixels (no preference between background and an unannotated
    class); r = 1 is plain CE toward background. In between, an organ predicted on unannotated
    tissue costs at most −log(1 − r) and loses its gradient once confident, while background
    always scores higher — the push against "sink" classes without crushing a class that is truly
    present but unannotated (README, Losses and partial labels). `class_weights (C,)` (a tensor,
    e.g. `unannotated_class_weights` of the labeled set's annotation frequencies) replaces 1 − r
    by a weight per class. Shapes as `marginal_cross_entropy`; returns a scalar ≥ 0 (0 when no
    valid 0-pixel).
    """
    _check_annotation_rate(annotation_rate)
    logits, target, valid = _prepare(logits, target, ignore)
    annotated = _effective_annotated(target, annotated, logits.shape[1], valid)
    if class_weights is None:  # log(1 - r) in float64 (log 0 = -inf: plain CE), as one value for all
        log_weights = torch.full((logits.shape[1],), math.log1p(-annotation_rate) if annotation_rate < 1
                                 else -math.inf, dtype=logits.dtype, device=logits.device)
    else:
        log_weights = class_weights.to(logits.dtype).log()
    log_weights = log_weights.expand(annotated.shape).masked_fill(annotated, -math.inf)
    log_weights[:, 0] = 0.0
    log_likelihood = torch.logsumexp(logits.log_softmax(1) + log_weights[:, :, None, None], dim=1)
    return _masked_mean(-log_likelihood, valid & (target == 0))


def instance_zero_pixel_loss(logits, target, ignore=None, annotation_rate=1.0):
    """The zero-pixel term of instance mode (#150: background / interior / boundary targets).

    A structure id says nothing about the other structures of its slice, so no structure class is
    ever complete there: every 0-pixel is background or, with probability 1 − r, part of an
    unsegmented structure, whatever else the slice shows. That is `zero_pixel_loss` with only the
    background annotated, on the pixels `target` marks 0 (certain background) or IGNORE_INDEX (the
    uncertain 0-pixels of `utils.builders.supervised_targets`), except those in `ignore`. Off
    unless `zero_ce_weight` is given (`utils.runtime.zero_pixel_weight`): on real CT it brought the
    predicted foreground near the truth but lowered the Rand index, which reads only the true
    structures' pixels (docs/experiments.md, "Instance mode on real CT"). Returns a scalar ≥ 0.
    """
    zero = (target == 0) | (target == IGNORE_INDEX)
    if ignore is not None:
        zero = zero & ~ignore.bool()
    return zero_pixel_loss(logits, torch.zeros_like(target), ignore=~zero,
                           annotation_rate=annotation_rate)


# ---------------------------------------------------------------- the edge loss (networks/edge.py)
def edge_targets(mask: torch.Tensor, known: torch.Tensor = None):
    """Boundary map of a label map and where it can be trusted.

    mask: int [B, H, W], IGNORE_INDEX (255) = unknown. A pixel is an edge (1.0) when its 3×3
    neighbourhood holds another label. valid: bool [B, H, W], False within one pixel of an
    ignored pixel; with `known` (bool [B, H, W], partial labels: where a 0 surely is background)
    also False on 0-pixels that are neither known nor next to a labelled organ — there the
    boundary of an unannotated organ may pass unseen. Returns (edges float [B, H, W], valid).
    """
    labels = mask.float().unsqueeze(1)
    highest = F.max_pool2d(labels, 3, stride=1, padding=1)
    lowest = -F.max_pool2d(-labels, 3, stride=1, padding=1)
    edges = (highest != lowest).squeeze(1).float()

    def near(region):
        return F.max_pool2d(region.float().unsqueeze(1), 3, stride=1, padding=1).squeeze(1) > 0

    valid = ~near(mask == IGNORE_INDEX)
    if known is not None:
        valid &= known.bool() | near((mask > 0) & (mask != IGNORE_INDEX))
    return edges, valid


def edge_loss(edge_logits: torch.Tensor, mask: torch.Tensor, known: torch.Tensor = None):
    """Class-balanced binary cross-entropy between `edge_logits [B, 1, H, W]` and the boundaries
    of `mask [B, H, W]` (see `edge_targets` for `known`). Edges are a few percent of the pixels,
    so each side is weighted by the other's share (Xie & Tu, HED, 2015). Weighted mean over the
    valid pixels: a scalar ≥ 0, 0 when no pixel is valid or the valid ones hold no edge."""
    edges, valid = edge_targets(mask, known)
    logits = edge_logits.float().squeeze(1)
    weights = valid.float()
    positive_share = (edges * weights).sum() / weights.sum().clamp(min=1)
    weights = weights * torch.where(edges > 0, 1 - positive_share, positive_share)
    losses = F.binary_cross_entropy_with_logits(logits, edges, reduction="none")
    return (losses * weights).sum() / weights.sum().clamp(min=1e-12)



# ---------------------------------------------------------------- the supervised loss, built from the config
LOSS_NAMES = ("dice", "tvmf_dice", "ce", "dice_ce", "marginal_ce", "marginal_dice", "marginal_dice_ce")
STREAM_LOSS_NAMES = ("dice", "ce", "dice_ce")


@dataclass(frozen=True)
class LossOptions:
    """What a `SupervisedLoss` computes: the config keys of the same names (`from_config`), except
    `name`, the base of the config's `loss` (dice | ce | dice_ce | tvmf_dice), and `marginal`,
    the partial-label versions (a `marginal_*` loss, or `partial_labels`)."""
    name: str
    marginal: bool
    partial_labels: bool            # edge term: a 0-pixel is sure background only where certain
    instance: bool                  # label_mode instance: the zero-pixel term of `instance_zero_pixel_loss`
    dice_include_background: bool   # dice_loss's options (`dice_options`)
    dice_squared: bool
    dice_smooth: float
    tvmf_lambda: float
    exclusion_weight: float
    background_ce_weight: float
    zero_ce_weight: float
    annotation_rate: float
    area_weight: float
    edge_weight: float

    @classmethod
    def from_config(cls, cfg):
        """The options a checked config asks for (`loss` one of LOSS_NAMES:
        utils.runtime.check_config)."""
        floats = {key: float(getattr(cfg, key)) for key in (
            "dice_smooth", "tvmf_lambda", "exclusion_weight", "background_ce_weight", "zero_ce_weight",
            "annotation_rate", "area_weight", "edge_weight")}
        return cls(name=cfg.loss.removeprefix("marginal_"),
                   marginal=cfg.loss.startswith("marginal_") or bool(cfg.partial_labels),
                   partial_labels=bool(cfg.partial_labels), instance=cfg.label_mode == "instance",
                   dice_include_background=bool(cfg.dice_include_background),
                   dice_squared=bool(cfg.dice_squared), **floats)

    @property
    def dice_options(self):
        """`dice_loss`'s keyword options."""
        return {"include_background": self.dice_include_background, "squared": self.dice_squared,
                "smooth": self.dice_smooth}


class SupervisedLoss(nn.Module):
    """The whole supervised loss of a training script: its named terms (`terms`), summed (`forward`).

    Terms by `options.name` (a `LossOptions`): dice → dice; ce → ce; dice_ce → dice + ce;
    tvmf_dice → tvmf_dice; with `marginal` the partial-label versions, plus `exclusion_weight` ×
    exclusion when that weight is > 0.
    With `area_weight` > 0 and `area_bounds (C,)` (`priors.class_area_bounds` of the labeled set),
    `area_weight` × `area_constraint_loss` is added: no class may take more of a slice than its
    annotations ever show (README, Losses and partial labels).
    With `annotation_frequency (C,)` (`priors.labeled_annotation_frequency`) the zero-pixel term
    weighs each unannotated class by its presence on the labeled slices (`unannotated_class_weights`).
    With partial labels, marginal losses alone never force the model to choose background (README:
    it put an organ on every pixel), so whenever `certain_background` pixels are given and
    `background_ce_weight` > 0, `background_ce_weight` × plain CE toward class 0 on those pixels only
    is added, whatever the loss name.
    With `edge_logits` (an edge-guided network's boundary branch), `edge_term` is added as "edge".

    Built by `build_loss`.
    """

    def __init__(self, options, num_classes=None, area_bounds=None, annotation_frequency=None):
        super().__init__()
        self.options = options
        # a buffer, so checkpoints keep the bounds the run trained with; None (not saved) when off
        self.register_buffer("area_bounds", area_bounds if options.area_weight > 0 else None)
        # w_k of the zero-pixel term per class (a buffer, on the loss's device), or None: 1 − r for all
        self.register_buffer("zero_class_weights", None if annotation_frequency is None else
                             unannotated_class_weights(options.annotation_rate, annotation_frequency))
        self.tvmf = (TvMFDiceLoss(num_classes, options.tvmf_lambda, partial_labels=options.marginal)
                     if options.name == "tvmf_dice" else None)

    def update_kappa(self, dice_per_class):
        """Forward validation Dice to the t-vMF κ (see `TvMFDiceLoss.update_kappa`); no-op otherwise."""
        if self.tvmf is not None:
            self.tvmf.update_kappa(dice_per_class)

    def edge_term(self, edge_logits, target, certain_background=None):
        """`edge_weight` × `edge_loss` of `edge_logits [B', 1, H, W]` on its first B slices against
        the boundaries of `target [B, H, W]`; with `partial_labels`, a 0-pixel is trusted as
        background only where `certain_background [B, H, W]` (`edge_targets`). A zero scalar when
        `edge_logits` is None (a network without an edge branch)."""
        if edge_logits is None:
            return torch.zeros((), device=target.device)
        known = certain_background if self.options.partial_labels else None
        return self.options.edge_weight * edge_loss(edge_logits[:len(target)], target, known)

    def terms(self, logits, target, ignore=None, annotated=None, certain_background=None,
              edge_logits=None):
        """dict term name -> weighted scalar; their sum is `forward`. Shapes as `forward`."""
        options, terms = self.options, {}
        if self.tvmf is not None:
            name = "marginal_tvmf_dice" if options.marginal else "tvmf_dice"
            terms[name] = self.tvmf(logits, target, ignore, annotated)
        if options.name in ("dice", "dice_ce"):
            if options.marginal:
                terms["marginal_dice"] = marginal_dice_loss(logits, target, annotated, ignore, **options.dice_options)
            else:
                terms["dice"] = dice_loss(logits, target, ignore, **options.dice_options)
        if options.name in ("ce", "dice_ce"):
            if options.marginal:
                terms["marginal_ce"] = marginal_cross_entropy(logits, target, annotated, ignore)
            else:
                terms["ce"] = cross_entropy(logits, target, ignore)
        if options.marginal and options.exclusion_weight > 0:
            terms["exclusion"] = options.exclusion_weight * exclusion_loss(logits, target, annotated, ignore,
                                                                           options.dice_smooth)
        if certain_background is not None and options.background_ce_weight > 0:
            excluded = ~certain_background.bool() if ignore is None else ignore.bool() | ~certain_background.bool()
            background = torch.zeros_like(target).masked_fill(target == IGNORE_INDEX, IGNORE_INDEX)
            terms["background_ce"] = options.background_ce_weight * cross_entropy(logits, background, excluded)
        if options.marginal and options.zero_ce_weight > 0:
            # the marginal losses never prefer background inside the body: the annotation model does
            terms["zero_ce"] = options.zero_ce_weight * (
                instance_zero_pixel_loss(logits, target, ignore, options.annotation_rate) if options.instance
                else zero_pixel_loss(logits, target, annotated, ignore, options.annotation_rate,
                                     self.zero_class_weights))
        if self.area_bounds is not None:
            terms["area"] = options.area_weight * area_constraint_loss(logits, self.area_bounds, ignore)
        if edge_logits is not None:
            terms["edge"] = self.edge_term(edge_logits, target, certain_background)
        return terms

    def forward(self, logits, target, ignore=None, annotated=None, certain_background=None, edge_logits=None):
        """logits [B,C,H,W]; target int [B,H,W]; ignore bool [B,H,W] (True = excluded; not from
        the edge term, whose unknowns are the IGNORE_INDEX pixels of `target`); annotated bool
        [B,C] (partial labels; None = classes present in the target); certain_background bool
        [B,H,W] (pixels surely background, e.g. air outside the body); edge_logits [B,1,H,W] or
        None. Returns a scalar ≥ 0."""
        return sum(self.terms(logits, target, ignore, annotated, certain_background, edge_logits).values())


def _dice_options(cfg):
    return {"include_background": bool(cfg.dice_include_background),
            "squared": bool(cfg.dice_squared), "smooth": float(cfg.dice_smooth)}


def build_loss(cfg, area_bounds=None, annotation_frequency=None):
    """The `SupervisedLoss` a config asks for (`LossOptions.from_config`); `cfg` is any object
    with the training keys as attributes (a resolved `Config`; every key below must be there).

    Keys: loss (one of LOSS_NAMES), num_classes, partial_labels (True turns dice/ce/dice_ce into
    their marginal versions and marginalises tvmf_dice over unannotated classes), dice_squared,
    dice_include_background, dice_smooth, tvmf_lambda, exclusion_weight, background_ce_weight,
    zero_ce_weight and annotation_rate (with marginal losses, that weight × `zero_pixel_loss` on
    every 0-pixel; label_mode instance: `instance_zero_pixel_loss`), zero_ce_presence (that term
    per class, which needs `annotation_frequency (C,)` from `priors.labeled_annotation_frequency`),
    area_weight (the area constraint, which needs `area_bounds (C,)` from
    `priors.labeled_area_bounds`), edge_weight (the edge term).
    """
    options = LossOptions.from_config(cfg)
    num_classes = cfg.num_classes
    _check_annotation_rate(options.annotation_rate)  # refused before training, not at its first step
    if options.area_weight > 0 and area_bounds is None:
        raise ValueError("area_weight > 0 needs area_bounds (see labeled_area_bounds)")
    presence = cfg.zero_ce_presence
    if presence and annotation_frequency is None:
        raise ValueError("zero_ce_presence needs annotation_frequency (see labeled_annotation_frequency)")
    if options.name == "tvmf_dice" and num_classes is None:
        raise InputError("num_classes: required by loss tvmf_dice")
    return SupervisedLoss(options, num_classes, area_bounds, annotation_frequency if presence else None)


def build_stream_loss(name, cfg, area_bounds=None):
    """Loss of an unlabeled stream (UniMatch s1/s2/FP, teacher pseudo-labels) against pseudo-labels.

    name in STREAM_LOSS_NAMES ('dice', 'ce', 'dice_ce'; another raises InputError); the Dice
    options (`dice_include_background`, `dice_squared`, `dice_smooth`) come from `cfg` as in
    `build_loss`. Returns a callable (logits [B,C,H,W], pseudo-labels int [B,H,W], ignore bool
    [B,H,W], True = not confident) -> scalar. Pseudo-labels are complete labels, so no
    marginalisation here. With `area_bounds (C,)` and `cfg.area_weight` > 0 the
    area constraint is added on the stream's predictions too (all pixels: it needs no label).
    """
    if name not in STREAM_LOSS_NAMES:
        raise InputError(f"loss: unknown stream loss '{name}' (choose from {', '.join(STREAM_LOSS_NAMES)})")
    dice_options = _dice_options(cfg)
    area_weight = float(cfg.area_weight)

    def stream_loss(logits, target, ignore=None):
        total = 0
        if area_bounds is not None and area_weight > 0:
            total = total + area_weight * area_constraint_loss(logits, area_bounds)
        if name in ("dice", "dice_ce"):
            total = total + dice_loss(logits, target, ignore, **dice_options)
        if name in ("ce", "dice_ce"):
            total = total + cross_entropy(logits, target, ignore)
        return total

    return stream_loss

