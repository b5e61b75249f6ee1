"""Torch datasets over the challenge arrays, with their augmentation (README, Configuration: Augmentation).

Every view is built the same way: the uint8 slice is resized to `img_size` (the `resize` inference
uses), geometrically augmented together with its masks by one affine matrix (`cv2.warpAffine`:
bilinear for the image, nearest for masks, fill 0) — the weak view — and normalised with the
training set's mean and std. Strong views are the weak view perturbed in intensity: the worker
only draws their parameters, and `strong_views` builds them for a whole batch on its device.
Geometry is drawn once per sample, so the weak and strong views of an unlabeled slice are
pixel-aligned (what UniMatch's pseudo-labels and Mean Teacher's consistency need).

Randomness: a training item is `(index, sample_seed)`, as `dataloaders.sampling` lays them out,
and every random draw of that sample comes from `np.random.default_rng(sample_seed)` — the same
sample in any DataLoader worker, process or rank. A plain int index gives the sample without
augmentation when the dataset has none (evaluation); with augmentation, a plain int draws the
sample's seed from torch's global generator (direct indexing, e.g. to look at a few views).
"""
import bisect
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import ConcatDataset, Dataset
from torchvision.transforms import v2

# One thread for OpenCV in every process that builds these views: they are small per-sample
# operations (the parallelism is DataLoader workers), and OpenCV's thread pool does not survive
# the fork into a DataLoader worker — a worker whose process had used it hangs in its next call.
cv2.setNumThreads(1)

# 4-connectivity within each slice of a (N, H, W) stack: a corner contact is not enough to join a
# dark pocket inside the body to the air around it, which keeps "certain background" conservative.
_FOUR_CONNECTED = np.zeros((3, 3, 3), bool)
_FOUR_CONNECTED[1] = ndimage.generate_binary_structure(2, 1)


def outside_air_mask(image, threshold=10):
    """Pixels darker than `threshold` that are 4-connected to the image border.

    image: (H, W) or (N, H, W) grayscale (uint8, 0-255 for the challenge PNGs). Returns a bool
    array of the same shape: the air around the body. Dark pockets enclosed by the body (bowel gas,
    lungs) are not included.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (N, H, W) array, got shape {image.shape}")
    stack = image.reshape((-1,) + image.shape[-2:])
    labels, _ = ndimage.label(stack < threshold, structure=_FOUR_CONNECTED)
    border_labels = np.concatenate([labels[:, 0, :], labels[:, -1, :],
                                    labels[:, :, 0], labels[:, :, -1]], axis=1)
    touches_border = np.zeros(labels.max() + 1, bool)
    touches_border[border_labels] = True
    touches_border[0] = False
    return touches_border[labels].reshape(image.shape)


def normalization_stats(images):
    """Mean and std of `images (N,H,W) uint8` scaled to [0, 1]; stored in every checkpoint."""
    sample = np.asarray(images[:: max(1, len(images) // 200)], dtype=np.float64) / 255.0
    return {"mean": float(sample.mean()), "std": float(sample.std()) or 1.0}


def resize(images, img_size):
    """uint8 `[..., H, W]` tensor -> `[..., img_size, img_size]` (bilinear, antialiased).

    The one resize used for training views and inference, so both see the same pixels.
    """
    return v2.functional.resize(images, [img_size, img_size], antialias=True)


def normalize(images, norm):
    """uint8 or [0,1] float tensor -> float32 standardised with `norm = {mean, std}`."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    return (images - norm["mean"]) / norm["std"]


def resize_mask(mask, img_size):
    """`(H, W)` integer mask -> `(img_size, img_size)` numpy array of the same dtype (nearest)."""
    mask = torch.from_numpy(np.array(mask))[None]
    return v2.functional.resize(mask, [img_size, img_size],
                                interpolation=v2.InterpolationMode.NEAREST_EXACT)[0].numpy()


def _resized_image(raw, img_size):
    """`(H, W)` uint8 slice -> `(img_size, img_size)` uint8 numpy array through `resize` (which
    returns a slice already at that size unchanged: then no copy and no torch call)."""
    if raw.shape == (img_size, img_size):
        return np.ascontiguousarray(raw)
    return resize(torch.from_numpy(np.array(raw))[None], img_size)[0].numpy()


def _normalize_table(norm):
    """float32 `(256,)`: `normalize` of every uint8 value, for `cv2.LUT` (bit-identical to it)."""
    return normalize(torch.arange(256, dtype=torch.uint8), norm).numpy()


# ==== geometric augmentation ====
@dataclass(frozen=True)
class AffineDraw:
    """One sample's geometry in torchvision's `affine` convention: rotation by `angle` degrees
    (clockwise on screen) and zoom by `scale` about the view's centre, then an integer shift
    `translate = (x, y)` in pixels, then a left-right `flip`."""
    angle: float
    translate: tuple
    scale: float
    flip: bool = False

    def matrix(self, size):
        """`(2, 3)` float64 forward map of pixel coordinates (x, y) of a size×size view, pixel
        centres at integers (what `cv2.warpAffine` takes)."""
        # scalar math: a per-sample matrix, where numpy's per-call overhead is most of the cost
        center = (size - 1) / 2
        radians = math.radians(self.angle)
        cos, sin = self.scale * math.cos(radians), self.scale * math.sin(radians)
        shift_x, shift_y = self.translate
        matrix = np.array([[cos, -sin, center + shift_x - (cos * center - sin * center)],
                           [sin, cos, center + shift_y - (sin * center + cos * center)]])
        if self.flip:  # x -> size - 1 - x after the affine
            matrix[0] = -matrix[0]
            matrix[0, 2] += size - 1
        return matrix


def warp(array, matrix, nearest=False):
    """`(S, S)` uint8 array through the forward `matrix` (bilinear, or nearest for masks), fill 0."""
    size = array.shape[::-1]
    return cv2.warpAffine(array, matrix, size, flags=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


class GeometricAugmentation:
    """Weak view: rotation uniform in ±`rotate` degrees, scale uniform in `scale`, shift uniform
    in ±`translate`·side rounded to whole pixels, and a left-right flip with p = 0.5 if `flip`
    (torchvision's RandomAffine + RandomHorizontalFlip ranges)."""

    def __init__(self, rotate, scale, translate, flip):
        self.rotate, self.scale, self.translate, self.flip = rotate, tuple(scale), translate, flip

    def draw(self, rng, size):
        """An `AffineDraw` for a size×size view from the numpy Generator `rng`."""
        angle = rng.uniform(-self.rotate, self.rotate)
        max_shift = self.translate * size
        shift = tuple(int(round(value)) for value in rng.uniform(-max_shift, max_shift, size=2))
        scale = rng.uniform(*self.scale)
        return AffineDraw(angle, shift, scale, bool(self.flip and rng.random() < 0.5))


def geometric_augmentation(cfg):
    """Weak view: random rotation, scale and shift (no flip unless `aug_flip`)."""
    return GeometricAugmentation(cfg.aug_rotate, cfg.aug_scale, cfg.aug_translate, cfg.aug_flip)


# ==== intensity augmentation ====
# A strong view's draw: one float64 row per view, its columns named here. An operation that is off
# holds its identity value (factor 1, sigma 0, std 0), so every view goes through the same tensor
# ops. `noise_seed` is an integer below 2^53 (exact in float64); `norm_mean`/`norm_std` are the
# training set's normalisation, carried with the draw so that the batch alone defines its views.
STRONG_DRAW_FIELDS = ("brightness", "contrast", "brightness_first", "gamma", "blur_sigma",
                      "noise_std", "noise_seed", "norm_mean", "norm_std")
_FIELD = {name: column for column, name in enumerate(STRONG_DRAW_FIELDS)}


class IntensityAugmentation:
    """Strong-view intensity perturbation (torchvision's ColorJitter/GaussianBlur/GaussianNoise
    semantics): brightness and contrast jitter ±`jitter` in random order with p = 0.8, gamma
    log-uniform in `gamma_range` with p = 0.5, Gaussian blur (5×5, sigma in `blur_sigma`) with
    p = 0.5, Gaussian noise of std `noise_sigma` with p = 0.5; the result is clipped to [0, 1] and
    normalised. The worker only draws (`draw`); `strong_views` applies the draws to a batch."""

    def __init__(self, jitter=0.3, gamma_range=(0.7, 1.5), blur_sigma=(0.1, 1.5), noise_sigma=0.03):
        self.jitter, self.log_gamma = jitter, tuple(math.log(g) for g in gamma_range)
        self.blur_sigma, self.noise_sigma = tuple(blur_sigma), noise_sigma

    def draw(self, rng, norm):
        """One view's row of `STRONG_DRAW_FIELDS` (a list of floats) from the numpy Generator `rng`."""
        # one Generator call for all of a view's uniforms (scalar calls cost more than the math)
        (jitter_p, brightness, contrast, order_p, gamma_p, gamma, blur_p, sigma, noise_p,
         seed) = rng.random(10).tolist()
        jitter = jitter_p < 0.8
        low = 1 - self.jitter
        brightness = low + 2 * self.jitter * brightness if jitter else 1.0
        contrast = low + 2 * self.jitter * contrast if jitter else 1.0
        brightness_first = float(not jitter or order_p < 0.5)
        log_low, log_high = self.log_gamma
        gamma = math.exp(log_low + (log_high - log_low) * gamma) if gamma_p < 0.5 else 1.0
        sigma_low, sigma_high = self.blur_sigma
        blur_sigma = sigma_low + (sigma_high - sigma_low) * sigma if blur_p < 0.5 else 0.0
        noise_std = self.noise_sigma if noise_p < 0.5 else 0.0
        return [brightness, contrast, brightness_first, gamma, blur_sigma, noise_std,
                float(math.floor(seed * 2 ** 53)), norm["mean"], norm["std"]]


def intensity_augmentation():
    """Strong-view intensity perturbation: jitter, gamma, blur, noise (README, Configuration)."""
    return IntensityAugmentation()


# Every view's noise is a window of this one field of N(0, 1) values, generated once per device
# from a fixed seed (the same numbers on every device and rank), starting at an offset set by the
# view's seed: exactly Gaussian and independent within a view, and two views share values only
# when their windows overlap (at 256², one pair of views in 128). Slicing a window costs a copy,
# where drawing fresh normals costs ~30x more on a CPU core.
NOISE_FIELD_SIZE = 1 << 24
_NOISE_FIELD_SEED = 20230615
_noise_fields = {}


def noise_field(device):
    """The `(NOISE_FIELD_SIZE,)` float32 N(0, 1) field on `device` (built on first use)."""
    key = str(device)
    if key not in _noise_fields:
        generator = torch.Generator().manual_seed(_NOISE_FIELD_SEED)
        _noise_fields[key] = torch.randn(NOISE_FIELD_SIZE, generator=generator).to(device)
    return _noise_fields[key]


def gaussian_kernels(sigma):
    """`sigma (V,)` -> `(V, 1, 5, 5)` float32 normalised Gaussian kernels (cv2's and torchvision's
    5-tap weights exp(-t²/2σ²), t = -2..2, as an outer product). sigma 0 gives the identity
    kernel exactly: its off-centre weights underflow to 0. Weights under 1e-20 (the outer taps of
    a small sigma) are set to 0: they change no pixel by more than that, and denormal weights
    made the convolution several times slower on a CPU."""
    taps = torch.arange(-2, 3, dtype=torch.float32, device=sigma.device)
    weights = torch.exp(-taps ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    weights = weights / weights.sum(1, keepdim=True)
    kernels = weights[:, :, None] * weights[:, None, :]
    return torch.where(kernels < 1e-20, 0, kernels)[:, None]


def strong_views(batch):
    """A batch of unlabeled views -> the same dict plus its two strong views `image_s1`,
    `image_s2` `[B, 1, S, S]` float32, built on the batch's device in a few batched tensor ops.

    Reads `image_w_uint8 [B, 1, S, S]` uint8 (the weak views) and `strong_draws [B, 2, F]` float64
    (rows of `STRONG_DRAW_FIELDS`, one per strong view), as `UnlabeledSlices` yields them. Per
    view, in `IntensityAugmentation`'s order: brightness and contrast (contrast blends toward
    the mean of the image as it is at that point), gamma — all three act on each grey level
    alone, so they are one 256-entry table per view —, the 5×5 Gaussian blur (reflect-101 border,
    cv2's default), the noise, clip to [0, 1], normalise. No host sync; float32 under autocast too.
    """
    weak, draws = batch["image_w_uint8"], batch["strong_draws"]
    num, _, height, width = weak.shape
    pixels = height * width
    with torch.autocast(weak.device.type, enabled=False):
        field = {name: draws[..., column, None].float() for name, column in _FIELD.items()}  # [B, 2, 1]
        # contrast's mean: of the image (contrast first) or of the brightened image (brightness
        # first), both in one pass: factor 1 then each view's brightness
        brightness = field["brightness"]
        factors = torch.cat([torch.ones_like(brightness[:, :1]), brightness], 1) / 255
        means = (weak.view(num, 1, pixels) * factors).clamp_(0, 1).mean(2, keepdim=True)
        image_mean, brightened_mean = means[:, :1], means[:, 1:]

        def blend(values, mean):  # contrast toward `mean`
            return (field["contrast"] * values + (1 - field["contrast"]) * mean).clamp(0, 1)
        levels = torch.arange(256, dtype=torch.float32, device=weak.device) / 255
        brightness_first = blend((levels * brightness).clamp(0, 1), brightened_mean)
        contrast_first = (blend(levels, image_mean) * brightness).clamp(0, 1)
        table = torch.where(field["brightness_first"] > 0, brightness_first, contrast_first)
        gamma = field["gamma"]
        table = torch.where(gamma != 1, table ** gamma, table)  # gamma 1 = off: exactly unchanged

        # the table looked up on the reflect-101-padded pixels (one uint8 image to pad per sample,
        # not two float views), then one grouped convolution with a kernel per view
        padded = F.pad(weak, (2, 2, 2, 2), mode="reflect").view(num, 1, -1).long()
        views = table.gather(2, padded.expand(num, 2, -1)).view(1, 2 * num, height + 4, width + 4)
        views = F.conv2d(views, gaussian_kernels(field["blur_sigma"].view(-1)), groups=2 * num)

        offsets = draws[..., _FIELD["noise_seed"]].long() % (NOISE_FIELD_SIZE - pixels + 1)
        noise = noise_field(weak.device).unfold(0, pixels, 1).index_select(0, offsets.view(-1))
        views = views.view(num, 2, pixels).addcmul_(noise.view(num, 2, pixels), field["noise_std"])
        views = views.clamp_(0, 1).sub_(field["norm_mean"]).div_(field["norm_std"])
        views = views.view(num, 2, height, width)
    return {**batch, "image_s1": views[:, :1], "image_s2": views[:, 1:]}


# ==== datasets ====
def sample_item(item, augmented):
    """A dataset item -> (position, numpy Generator or None). `item` is `(position, sample_seed)`
    or a plain int (see the module docstring)."""
    if isinstance(item, tuple):
        position, seed = item
        return int(position), np.random.default_rng(seed)
    if not augmented:
        return int(item), None
    return int(item), np.random.default_rng(int(torch.randint(2 ** 63 - 1, ())))


class LabeledSlices(Dataset):
    """Labeled slices. Yields dicts:
    `image` float32 [1,S,S] (normalised), `mask` int64 [S,S] in 0..C-1, `annotated` bool [C],
    `certain_background` bool [S,S] (air outside the body, surely class 0), `index` int.
    `augment=None` gives the plain resized slice (evaluation). The outside-air mask of every
    slice is computed once, here, and warped with its slice.
    """

    def __init__(self, data, indices, img_size, norm, augment=None, air_threshold=10):
        self.data, self.indices = data, np.asarray(indices)
        self.img_size, self.norm, self.augment = img_size, norm, augment
        self.air_threshold = air_threshold
        self.normalize_table = _normalize_table(norm)
        # bit-packed along rows: 1/8 of the memory, a few µs to unpack
        self.air_bits = np.empty((len(self.indices), img_size, (img_size + 7) // 8), np.uint8)
        for position in range(len(self.indices)):
            air = outside_air_mask(self._image(position), air_threshold)
            self.air_bits[position] = np.packbits(air, axis=-1)

    def __len__(self):
        return len(self.indices)

    def _image(self, position):
        return _resized_image(self.data.train_images[self.indices[position]], self.img_size)

    def __getitem__(self, item):
        position, rng = sample_item(item, self.augment is not None)
        index = int(self.indices[position])
        image = self._image(position)
        mask = resize_mask(self.data.train_masks[index], self.img_size)
        air = np.unpackbits(self.air_bits[position], axis=-1, count=self.img_size)
        if self.augment is not None:
            matrix = self.augment.draw(rng, self.img_size).matrix(self.img_size)
            image, mask, air = warp(image, matrix), warp(mask, matrix, nearest=True), warp(air, matrix, nearest=True)
        return {"image": torch.from_numpy(cv2.LUT(image, self.normalize_table))[None],
                "mask": torch.from_numpy(mask.astype(np.int64)),
                "annotated": torch.from_numpy(np.asarray(self.data.annotated[index])),
                "certain_background": torch.from_numpy(air.view(bool)), "index": index}


class UnlabeledSlices(Dataset):
    """Unlabeled slices: one weak view and the draws of two independent strong views of the same
    geometry. Yields `image_w` float32 [1,S,S] (normalised), `image_w_uint8` uint8 [1,S,S] (its
    pixels), `strong_draws` float64 [2, len(STRONG_DRAW_FIELDS)] and `index` (an index into
    `images`); `strong_views` turns a batch of them into `image_s1`, `image_s2` on the device.
    `images` is any `(N,H,W) uint8` array (training and/or test slices); `geometry` a
    `GeometricAugmentation`, `intensity` an `IntensityAugmentation`.
    """

    def __init__(self, images, indices, img_size, norm, geometry, intensity):
        self.images, self.indices = images, np.asarray(indices)
        self.img_size, self.norm = img_size, norm
        self.geometry, self.intensity = geometry, intensity
        self.normalize_table = _normalize_table(norm)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, item):
        position, rng = sample_item(item, augmented=True)
        index = int(self.indices[position])
        weak = _resized_image(self.images[index], self.img_size)
        weak = warp(weak, self.geometry.draw(rng, self.img_size).matrix(self.img_size))
        draws = [self.intensity.draw(rng, self.norm) for _ in range(2)]
        return {"image_w": torch.from_numpy(cv2.LUT(weak, self.normalize_table))[None],
                "image_w_uint8": torch.from_numpy(weak)[None],
                "strong_draws": torch.tensor(draws, dtype=torch.float64), "index": index}


class ConcatSlices(ConcatDataset):
    """torch's ConcatDataset for items that may be `(position, sample_seed)` pairs: the seed
    goes, unchanged, to the dataset that holds the position."""

    def __getitem__(self, item):
        position, seed = item if isinstance(item, tuple) else (item, None)
        part = bisect.bisect_right(self.cumulative_sizes, position)
        inner = position - (self.cumulative_sizes[part - 1] if part else 0)
        return self.datasets[part][inner if seed is None else (inner, seed)]
