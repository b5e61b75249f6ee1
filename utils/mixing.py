"""Box masks for copy-paste mixing: CutMix boxes (UniMatch) and centred boxes (BCP).

Masks are built on the device with tensor ops only, so a training step never waits for the host.
"""
import math

import torch


def random_boxes(batch, height, width, p=0.5, area=(0.02, 0.4), aspect=(0.3, 1 / 0.3),
                 device="cpu", generator=None):
    """CutMix boxes (Yun et al. 2019, as UniMatch draws them): bool `[batch, height, width]`.

    Each sample gets, with probability `p`, one box whose area is a uniform fraction in `area`
    of the image and whose aspect ratio (width/height) is log-uniform in `aspect`, at a uniform
    position fully inside the image; the other samples get an empty mask.
    """
    def uniform(low, high):
        return torch.rand(batch, device=device, generator=generator) * (high - low) + low

    box_area = uniform(*area) * height * width
    ratio = uniform(math.log(aspect[0]), math.log(aspect[1])).exp()
    box_w = (box_area * ratio).sqrt().round().clamp(1, width)
    box_h = (box_area / ratio).sqrt().round().clamp(1, height)
    left = (uniform(0, 1) * (width - box_w + 1)).floor()
    top = (uniform(0, 1) * (height - box_h + 1)).floor()
    apply = uniform(0, 1) < p
    xs = torch.arange(width, device=device).view(1, 1, width)
    ys = torch.arange(height, device=device).view(1, height, 1)
    inside_x = (xs >= left.view(-1, 1, 1)) & (xs < (left + box_w).view(-1, 1, 1))
    inside_y = (ys >= top.view(-1, 1, 1)) & (ys < (top + box_h).view(-1, 1, 1))
    return inside_x & inside_y & apply.view(-1, 1, 1)


def paste(target, source, boxes):
    """`target` with `source` pasted inside `boxes [B,H,W]`; images `[B,C,H,W]` or maps `[B,H,W]`."""
    mask = boxes if target.dim() == boxes.dim() else boxes.unsqueeze(1)
    return torch.where(mask, source, target)
