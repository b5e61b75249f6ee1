"""The input-size rule shared by every network: pad up to a multiple of the total stride, crop back.

AttUNet downsamples by 16, SegFormer by 32, the DINOv2 ViTs cut 14×14 patches. Instead of
rejecting sizes such as 250, `encode` pads the image at the bottom and right up to the next
multiple and `decode` crops the logits back, so logits always come out at the input resolution and the pixel
grid stays aligned with the strided features (no fractional resize). Padding replicates the border
pixels: the border of a CT slice is air, so this continues it, whereas zero padding would paint a
mid-grey band once intensities are normalised, and reflection fails when the pad exceeds the image.
"""
import torch
import torch.nn.functional as F


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H', W'], H' and W' the next multiples of `multiple` (bottom/right)."""
    height, width = images.shape[-2:]
    pad_height, pad_width = -height % multiple, -width % multiple
    if pad_height == 0 and pad_width == 0:
        return images
    return F.pad(images, (0, pad_width, 0, pad_height), mode="replicate")


def crop_to(logits: torch.Tensor, out_size) -> torch.Tensor:
    """[B, C, H', W'] -> [B, C, H, W]: undo `pad_to_multiple`; out_size = (H, W) of the input."""
    height, width = int(out_size[0]), int(out_size[1])
    if height > logits.shape[-2] or width > logits.shape[-1]:
        raise ValueError(f"out_size {(height, width)} is larger than the decoded "
                         f"{tuple(logits.shape[-2:])}: pass the size of the encoded images")
    if (height, width) == tuple(logits.shape[-2:]):
        return logits
    return logits[..., :height, :width]
