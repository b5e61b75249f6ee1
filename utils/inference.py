"""Batched prediction of whole slices at the file's resolution, with optional test-time
augmentation. One function serves validation during training, `test.py` and the teachers
that label unlabeled images, so they all preprocess identically.
"""
import numpy as np
import torch
import torch.nn.functional as F

from dataloaders.datasets import normalize, resize

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
            side = [int(round(s * scale / 32)) * 32 for s in size]
            x = F.interpolate(x, size=side, mode="bilinear", align_corners=False)
        logits = model(_shift(x, dy, dx))
        logits = _shift(logits, -dy, -dx)
        if scale != 1.0:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        probabilities = logits.float().softmax(1)
        total = total + (probabilities.flip(-1) if flip else probabilities)
    return total / len(views)


@torch.no_grad()
def predict_slices(model, images, img_size, norm, device, batch_size=16, tta="none",
                   with_confidence=False, progress=None):
    """Predict class maps for `images (N,H,W) uint8` at their own resolution.

    Returns `labels (N,H,W) uint8` and, with `with_confidence`, `confidence (N,H,W) float32`
    (the max softmax probability). The model is put in eval mode and restored afterwards.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    was_training = model.training
    model.eval()
    views = _tta_views(tta)
    count, height, width = images.shape
    labels = np.empty((count, height, width), np.uint8)
    confidence = np.empty((count, height, width), np.float32) if with_confidence else None
    starts = range(0, count, batch_size)
    for start in (progress(starts) if progress else starts):
        raw = torch.from_numpy(np.array(images[start:start + batch_size]))[:, None]
        batch = normalize(resize(raw, img_size), norm).to(device)
        probabilities = predict_probabilities(model, batch, views)
        probabilities = F.interpolate(probabilities, size=(height, width), mode="bilinear",
                                      align_corners=False)
        best, label = probabilities.max(1)
        labels[start:start + len(raw)] = label.cpu().numpy()
        if with_confidence:
            confidence[start:start + len(raw)] = best.cpu().numpy()
    model.train(was_training)
    return (labels, confidence) if with_confidence else labels
