"""Torch datasets over the challenge arrays, with their augmentation (README, Configuration: Augmentation).

Every view is built the same way: the uint8 slice is resized to `img_size` (the `resize` inference
uses), geometrically augmented together with its masks by one affine matrix (`cv2.warpAffine`:
bilinear for the image, nearest for masks, fill 0) — the weak view — then, for strong views only,
perturbed in intensity, and finally normalised with the training set's mean and std. Geometry is
drawn once per sample, so the weak and strong views of an unlabeled slice are pixel-aligned (what
UniMatch's pseudo-labels and Mean Teacher's consistency need).

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
from scipy import ndimage
from scipy.special import ndtri
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


def normalize_in_place(array, norm):
    """`normalize` of a float32 numpy array in [0, 1], in place and bit-identical to it (both
    subtract and divide in float32); returns the array."""
    np.subtract(array, np.float32(norm["mean"]), out=array)
    np.divide(array, np.float32(norm["std"]), out=array)
    return array


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
# Standard-normal quantiles at the centres of 2^16 equal-probability bins: indexing this table with
# uniform 16-bit integers samples N(0, 1) several times faster than `standard_normal` (tails are
# cut at |z| = 4.4, i.e. 1 pixel in 90,000 lands on the last bin instead of beyond it).
_NORMAL_QUANTILES = ndtri((np.arange(1 << 16) + 0.5) / (1 << 16)).astype(np.float32)


@dataclass(frozen=True)
class IntensityDraw:
    """One strong view's perturbation of a [0, 1] image, applied in this order: brightness and
    contrast factors (None = no jitter; `brightness_first` = their order), gamma (None = off),
    Gaussian blur sigma (None = off), an additive noise field `(H, W) float32` (None = off)."""
    brightness: float | None
    contrast: float | None
    brightness_first: bool
    gamma: float | None
    blur_sigma: float | None
    noise: np.ndarray | None


class IntensityAugmentation:
    """Strong-view intensity perturbation (torchvision's ColorJitter/GaussianBlur/GaussianNoise
    semantics): brightness and contrast jitter ±`jitter` in random order with p = 0.8, gamma
    log-uniform in `gamma_range` with p = 0.5, Gaussian blur (5×5, sigma in `blur_sigma`) with
    p = 0.5, Gaussian noise of std `noise_sigma` with p = 0.5; the result is clipped to [0, 1]."""

    def __init__(self, jitter=0.3, gamma_range=(0.7, 1.5), blur_sigma=(0.1, 1.5), noise_sigma=0.03):
        self.jitter, self.log_gamma = jitter, np.log(gamma_range)
        self.blur_sigma, self.noise_sigma = blur_sigma, noise_sigma
        self.noise_table = _NORMAL_QUANTILES * np.float32(noise_sigma)  # N(0, noise_sigma²) quantiles

    def draw(self, rng, shape):
        """An `IntensityDraw` for an image of `shape` from the numpy Generator `rng`."""
        brightness = contrast = None
        brightness_first = True
        if rng.random() < 0.8:
            brightness, contrast = rng.uniform(1 - self.jitter, 1 + self.jitter, size=2)
            brightness_first = bool(rng.random() < 0.5)
        gamma = float(np.exp(rng.uniform(*self.log_gamma))) if rng.random() < 0.5 else None
        blur_sigma = rng.uniform(*self.blur_sigma) if rng.random() < 0.5 else None
        noise = None
        if rng.random() < 0.5:
            count = int(np.prod(shape))
            bins = rng.bit_generator.random_raw(-(-count // 4)).view(np.uint16)[:count]  # 4 per draw
            noise = self.noise_table.take(bins.astype(np.intp)).reshape(shape)  # 2x faster with intp
        return IntensityDraw(brightness, contrast, brightness_first, gamma, blur_sigma, noise)

    @staticmethod
    def apply(image, draw):
        """uint8 `(H, W)` image -> float32 `(H, W)` in [0, 1] perturbed by `draw`.

        Jitter and gamma act on each grey level alone, so they are one 256-entry lookup table
        (contrast blends toward the mean of the image as it is at that point, taken from the
        histogram); blur and noise then act on the float image.
        """
        levels = np.arange(256, dtype=np.float32) / np.float32(255)
        histogram = None

        def clip_unit(values):  # np.clip's Python wrapper costs more than these 256 values
            return np.minimum(np.maximum(values, 0, out=values), 1, out=values)

        def brightness(values):
            return clip_unit(values * np.float32(draw.brightness))

        def contrast(values):
            nonlocal histogram
            if histogram is None:
                histogram = cv2.calcHist([image], [0], None, [256], [0, 256]).ravel().astype(np.float64)
            mean = np.float32(histogram @ values / histogram.sum())
            return clip_unit(np.float32(draw.contrast) * values + np.float32(1 - draw.contrast) * mean)

        if draw.brightness is not None:
            for step in ((brightness, contrast) if draw.brightness_first else (contrast, brightness)):
                levels = step(levels)
        if draw.gamma is not None:
            levels = levels ** np.float32(draw.gamma)
        result = cv2.LUT(image, levels)
        if draw.blur_sigma is not None:
            result = cv2.GaussianBlur(result, (5, 5), draw.blur_sigma, borderType=cv2.BORDER_REFLECT_101)
        if draw.noise is not None:
            np.add(result, draw.noise, out=result)
            np.clip(result, 0, 1, out=result)
        return result

    def __call__(self, image, rng):
        """uint8 `(H, W)` -> float32 `(H, W)` in [0, 1], perturbed by a draw from `rng`."""
        return self.apply(image, self.draw(rng, image.shape))


def intensity_augmentation():
    """Strong-view intensity perturbation: jitter, gamma, blur, noise (README, Configuration)."""
    return IntensityAugmentation()


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
    """Unlabeled slices: one weak view and two independently perturbed strong views of the same
    geometry. Yields `image_w`, `image_s1`, `image_s2` float32 [1,S,S] and `index` (an index into
    `images`). `images` is any `(N,H,W) uint8` array (training and/or test slices); `geometry` a
    `GeometricAugmentation`, `intensity` a callable (uint8 `(S,S)` image, Generator) -> float32
    `(S,S)` in [0, 1] such as `IntensityAugmentation`.
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

        def strong():
            return torch.from_numpy(normalize_in_place(self.intensity(weak, rng), self.norm))[None]
        return {"image_w": torch.from_numpy(cv2.LUT(weak, self.normalize_table))[None],
                "image_s1": strong(), "image_s2": strong(), "index": index}


class ConcatSlices(ConcatDataset):
    """torch's ConcatDataset for items that may be `(position, sample_seed)` pairs: the seed
    goes, unchanged, to the dataset that holds the position."""

    def __getitem__(self, item):
        position, seed = item if isinstance(item, tuple) else (item, None)
        part = bisect.bisect_right(self.cumulative_sizes, position)
        inner = position - (self.cumulative_sizes[part - 1] if part else 0)
        return self.datasets[part][inner if seed is None else (inner, seed)]
