"""Instance mode (challenge #150): structure-id masks in, structures out (README, "#150 instance mode").

A #150 mask holds per-image structure ids (1..255, 0 = nothing or an unsegmented structure) that
mean nothing across images, so a network cannot learn them as classes. It learns three classes
instead, `dataloaders.challenge.INSTANCE_TARGET_CLASSES`: background, structure interior and
structure boundary — the "three-class" formulation of nucleus segmentation (Caicedo et al.,
Cytometry A 2019) — and the structures are recovered from its probabilities by a seeded
watershed: confident interiors are the seeds, foreground is flooded from them, and two touching
structures stay apart because a boundary runs between them.

- `instance_targets`: structure-id masks `[B, H, W]` -> 3-class targets (+ the pixels to ignore
  with partial labels), in torch, in the training step, on the device;
- `structures_from_probabilities`: 3-class probabilities -> structure ids, in NumPy/scikit-image,
  at the file's resolution (validation, test.py, submissions).
"""
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage import segmentation

from dataloaders.challenge import INSTANCE_TARGET_CLASSES

BACKGROUND, INTERIOR, BOUNDARY = INSTANCE_TARGET_CLASSES  # the class ids 0, 1, 2

_EIGHT_CONNECTED = np.ones((3, 3), bool)
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


# ---------------------------------------------------------------- targets (training)


def instance_targets(mask, boundary_width=1, certain_background=None):
    """Background / interior / boundary targets of structure-id masks.

    mask: integer tensor `[B, H, W]` (or `[H, W]`) of structure ids, 0 = no structure. Ids are
        arbitrary (only equality between neighbours matters; 255 is an id like any other, not
        the losses' ignore index). Pass the mask at the network's resolution, after resizing
        and augmentation with nearest-neighbour interpolation (what `LabeledSlices` yields): the
        boundary then has `boundary_width` pixels where the network predicts, whatever the
        file's size (a boundary drawn at 512x512 would mostly vanish in a nearest resize to
        128x128).
    boundary_width: a structure pixel is BOUNDARY when a pixel of another id (another structure
        or 0) lies within this city-block distance (1: one of its 4 neighbours); its other pixels
        are INTERIOR. Two touching structures are thus separated by a band of 2·boundary_width
        pixels, and every labelled pixel keeps its structure (boundaries are inner ones), so the
        structure is interior + boundary. The 4-neighbourhood rather than the 3x3 square: a
        corner contact does not make a boundary, so fewer narrow necks of a structure turn all
        boundary and split its interior (measured on the instance phantom: perfect maps score
        a Rand index of 0.980 instead of 0.956 at 256x256, docs/experiments.md, "Instance mode:
        upper bounds and boundary width").
    certain_background: optional bool tensor like `mask`, the pixels that are surely background
        (air outside the body, `dataloaders.datasets.outside_air_mask`). Give it with partial
        labels: a 0-pixel elsewhere may be background or part of an unsegmented structure, so
        every one of the three classes is possible there; its marginal likelihood (Shi et al.
        2021, `utils/losses.py`) is then p_background + p_interior + p_boundary = 1, which is
        exactly excluding it from the loss — so it is returned in `ignore`.

    Returns `(target, ignore)`: target int64 like `mask` with values 0/1/2; ignore bool like
    `mask` (uncertain 0-pixels), or None when `certain_background` is None (full labels: every
    0 is background). Both feed the existing losses as `loss(logits, target, ignore=ignore)`.
    """
    if mask.dim() not in (2, 3):
        raise ValueError(f"mask must be [B, H, W] or [H, W], got shape {tuple(mask.shape)}")
    if boundary_width < 1:
        raise ValueError(f"boundary_width must be at least 1, got {boundary_width}")
    ids = (mask if mask.dim() == 3 else mask[None]).float()[:, None]  # exact: ids < 2**24
    highest, minus_lowest = ids, -ids
    for _ in range(boundary_width):  # w steps of the 4-neighbourhood: the city-block ball
        highest, minus_lowest = _cross_max(highest), _cross_max(minus_lowest)
    structure = mask != 0
    mixed = (highest != -minus_lowest).view(mask.shape)  # another id within reach
    target = torch.where(mixed, BOUNDARY, INTERIOR).masked_fill(~structure, BACKGROUND).long()
    if certain_background is None:
        return target, None
    if certain_background.shape != mask.shape:
        raise ValueError(f"certain_background must have the mask's shape {tuple(mask.shape)}, "
                         f"got {tuple(certain_background.shape)}")
    return target, ~structure & ~certain_background.bool()


def _cross_max(x):
    """Max of each pixel of `x [B, 1, H, W]` and its 4 neighbours (outside the image: ignored)."""
    return torch.maximum(F.max_pool2d(x, (3, 1), stride=1, padding=(1, 0)),
                         F.max_pool2d(x, (1, 3), stride=1, padding=(0, 1)))


# ---------------------------------------------------------------- structures (inference)


def structures_from_probabilities(probabilities, seed_threshold=0.5, min_seed_size=8,
                                  min_size=16, max_structures=255):
    """Structure ids from background / interior / boundary probabilities, by seeded watershed.

    probabilities: `[N, 3, H, W]` or `[3, H, W]` (NumPy or torch, any device), softmax over
        `INSTANCE_TARGET_CLASSES`, at the resolution the structures are wanted (the file's:
        upsample the network's output first, bilinearly).
    seed_threshold: interior probability from which a pixel may seed a structure.
    min_seed_size: seeds (8-connected components of confident interior) with fewer pixels are
        dropped, so their pixels are flooded from a neighbouring seed (merged into it).
    min_size: foreground blobs that no seed reaches (structures too thin to have an interior)
        become structures of their own if they have at least this many pixels, else background.
    max_structures: at most this many structures per image (255 fits a uint8 submission); the
        smallest beyond it become background.

    Foreground = pixels where background is not the most likely of background vs the rest
    (p_background < 0.5). The watershed floods the boundary probability from the seeds over
    the foreground, so neighbouring structures meet on the ridge of their shared boundary.
    Sizes are in pixels at the given resolution.

    Returns int32 `(N, H, W)` (or `(H, W)`): 0 = background, 1..K = structures, numbered per
    image by first appearance in raster order (ids mean nothing across images). Each image is
    processed on its own, so its structures do not depend on the rest of the batch.
    """
    if isinstance(probabilities, torch.Tensor):
        probabilities = probabilities.detach().float().cpu().numpy()
    probabilities = np.asarray(probabilities, dtype=np.float32)
    single = probabilities.ndim == 3
    stack = probabilities[None] if single else probabilities
    if stack.ndim != 4 or stack.shape[1] != len(INSTANCE_TARGET_CLASSES):
        raise ValueError(f"probabilities must be [N, 3, H, W] or [3, H, W], got shape "
                         f"{probabilities.shape}")
    labels = np.stack([
        _number_by_size_limit(_regions(image, seed_threshold, min_seed_size, min_size),
                              max_structures) for image in stack])
    return labels[0] if single else labels


def _regions(probabilities, seed_threshold, min_seed_size, min_size):
    """Region labels (H, W) of one image's `[3, H, W]` probabilities (see the caller)."""
    foreground = probabilities[BACKGROUND] < 0.5
    seeds, _ = ndimage.label(foreground & (probabilities[INTERIOR] >= seed_threshold),
                             structure=_EIGHT_CONNECTED)
    seeds[np.bincount(seeds.ravel())[seeds] < min_seed_size] = 0
    regions = segmentation.watershed(probabilities[BOUNDARY], seeds, mask=foreground,
                                     connectivity=_FOUR_CONNECTED)
    orphans, _ = ndimage.label(foreground & (regions == 0), structure=_EIGHT_CONNECTED)
    orphans[np.bincount(orphans.ravel())[orphans] < min_size] = 0
    return np.where(orphans > 0, orphans + regions.max(), regions)


def _number_by_size_limit(regions, max_structures):
    """(H, W) region labels -> int32 ids 1..K in raster order of first appearance, keeping only
    the `max_structures` largest regions (ties: the first to appear)."""
    flat = regions.ravel()
    values, first, counts = np.unique(flat, return_index=True, return_counts=True)
    counts, first, values = counts[values > 0], first[values > 0], values[values > 0]
    kept = np.sort(np.lexsort((first, -counts))[:max_structures])  # largest, then earliest
    order = kept[np.argsort(first[kept])]  # raster order of first appearance
    lookup = np.zeros(int(regions.max()) + 1, np.int32)
    lookup[values[order]] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lookup[regions]
