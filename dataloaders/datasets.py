"""Torch datasets over the challenge arrays, with torchvision.transforms.v2 augmentation (SPEC §3).

Every view is built the same way: the uint8 slice is resized to `img_size`, geometrically
augmented together with its mask (weak view), then — for strong views only — perturbed in
intensity, and finally normalised with the training set's mean and std. Geometry is drawn once
per sample, so the weak and strong views of an unlabeled slice are pixel-aligned (what
UniMatch's pseudo-labels and Mean Teacher's consistency need).
"""
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from scipy import ndimage
from torchvision.transforms import v2

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


def geometric_augmentation(cfg):
    """Weak view: random rotation, scale and shift (no flip unless `aug_flip`)."""
    steps = [v2.RandomAffine(degrees=cfg.aug_rotate, translate=(cfg.aug_translate,) * 2,
                             scale=tuple(cfg.aug_scale),
                             interpolation=v2.InterpolationMode.BILINEAR, fill=0)]
    if cfg.aug_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


class RandomGamma:
    """x -> x ** gamma with gamma log-uniform in `gamma_range`, on a [0, 1] float image."""

    def __init__(self, gamma_range=(0.7, 1.5), p=0.5):
        self.log_range, self.p = np.log(gamma_range), p

    def __call__(self, image):
        if torch.rand(()) >= self.p:
            return image
        low, high = self.log_range
        gamma = float(torch.empty(()).uniform_(low, high).exp())
        return image.clamp(0, 1) ** gamma


def intensity_augmentation():
    """Strong-view intensity perturbation of a [0, 1] float image [1,H,W]: jitter, gamma, blur, noise."""
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3)], p=0.8),
        RandomGamma(),
        v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.5),
        v2.RandomApply([v2.GaussianNoise(sigma=0.03, clip=True)], p=0.5),
    ])


class LabeledSlices(Dataset):
    """Labeled slices. Yields dicts:
    `image` float32 [1,S,S] (normalised), `mask` int64 [S,S] in 0..C-1, `annotated` bool [C],
    `certain_background` bool [S,S] (air outside the body, surely class 0), `index` int.
    `augment=None` gives the plain resized slice (evaluation).
    """

    def __init__(self, data, indices, img_size, norm, augment=None, air_threshold=10):
        self.data, self.indices = data, np.asarray(indices)
        self.img_size, self.norm, self.augment = img_size, norm, augment
        self.air_threshold = air_threshold

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, item):
        index = int(self.indices[item])
        raw = np.array(self.data.train_images[index])  # a writable copy of the memory map
        image = tv_tensors.Image(resize(torch.from_numpy(raw)[None], self.img_size))
        mask = torch.from_numpy(np.asarray(self.data.train_masks[index], dtype=np.int64))
        mask = tv_tensors.Mask(v2.functional.resize(mask[None], [self.img_size] * 2,
                                                    interpolation=v2.InterpolationMode.NEAREST_EXACT)[0])
        air = tv_tensors.Mask(torch.from_numpy(
            outside_air_mask(image[0].numpy(), threshold=self.air_threshold)))
        if self.augment is not None:
            image, mask, air = self.augment(image, mask, air)
        return {"image": normalize(image.as_subclass(torch.Tensor), self.norm),
                "mask": mask.as_subclass(torch.Tensor),
                "annotated": torch.from_numpy(np.asarray(self.data.annotated[index])),
                "certain_background": air.as_subclass(torch.Tensor), "index": index}


class UnlabeledSlices(Dataset):
    """Unlabeled slices: one weak view and two independently perturbed strong views of the same
    geometry. Yields `image_w`, `image_s1`, `image_s2` float32 [1,S,S] and `index` (an index into
    `images`). `images` is any `(N,H,W) uint8` array (training and/or test slices).
    """

    def __init__(self, images, indices, img_size, norm, geometry, intensity):
        self.images, self.indices = images, np.asarray(indices)
        self.img_size, self.norm = img_size, norm
        self.geometry, self.intensity = geometry, intensity

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, item):
        index = int(self.indices[item])
        raw = torch.from_numpy(np.array(self.images[index]))[None]
        weak = self.geometry(tv_tensors.Image(resize(raw, self.img_size)))
        weak = weak.as_subclass(torch.Tensor).float() / 255.0
        return {"image_w": normalize(weak, self.norm),
                "image_s1": normalize(self.intensity(weak), self.norm),
                "image_s2": normalize(self.intensity(weak), self.norm), "index": index}
