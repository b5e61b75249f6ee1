"""Attention U-Net.

Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018,
https://arxiv.org/abs/1804.03999.

A U-Net whose five encoder levels have widths base·[1, 2, 4, 8, 16]; before each skip connection
is concatenated in the decoder, an additive attention gate multiplies it by a per-pixel weight in
[0, 1] computed from the skip and the decoder feature at the same level. As in the widely used 2D
re-implementation (the one with ~34.9M parameters at base 64), the gating signal is the upsampled
decoder feature, so gate and skip share a resolution and the gate needs no strided convolution.
Convolutions followed by BatchNorm carry no bias (BatchNorm's shift replaces it).
"""
import torch
import torch.nn as nn

from networks.sizing import crop_to, pad_to_multiple


def conv_bn_relu(in_channels: int, out_channels: int) -> list:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class DoubleConv(nn.Sequential):
    """Two (3×3 conv, BatchNorm, ReLU): [B, in, H, W] -> [B, out, H, W]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(*conv_bn_relu(in_channels, out_channels),
                         *conv_bn_relu(out_channels, out_channels))


class AttentionGate(nn.Module):
    """Additive attention: skip · σ(ψ(ReLU(W_g·gate + W_x·skip))), one weight per pixel.

    gate [B, channels, H, W] (decoder), skip [B, channels, H, W] (encoder) -> [B, channels, H, W].
    """

    def __init__(self, channels: int, inner_channels: int):
        super().__init__()
        self.project_gate = nn.Sequential(nn.Conv2d(channels, inner_channels, 1, bias=False),
                                          nn.BatchNorm2d(inner_channels))
        self.project_skip = nn.Sequential(nn.Conv2d(channels, inner_channels, 1, bias=False),
                                          nn.BatchNorm2d(inner_channels))
        self.attention = nn.Sequential(nn.ReLU(inplace=True),
                                       nn.Conv2d(inner_channels, 1, 1, bias=False),
                                       nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        weights = self.attention(self.project_gate(gate) + self.project_skip(skip))
        return skip * weights


class DecoderLevel(nn.Module):
    """Upsample ×2 + conv, gate the skip, concatenate, DoubleConv (+ optional channel dropout).

    deeper [B, 2c, h, w], skip [B, c, 2h, 2w] -> [B, c, 2h, 2w].
    """

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                      *conv_bn_relu(2 * channels, channels))
        self.gate = AttentionGate(channels, max(channels // 2, 1))
        self.fuse = DoubleConv(2 * channels, channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, deeper: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        upsampled = self.upsample(deeper)
        fused = self.fuse(torch.cat([self.gate(upsampled, skip), upsampled], dim=1))
        return self.dropout(fused)


class AttUNet(nn.Module):
    """Attention U-Net for 2D slices.

    in_channels: image channels; num_classes: output channels (logits); base: width of the first
    level (64 is the paper's size, 16/32 are CPU-friendly); dropout: Dropout2d probability after
    each decoder level (0 disables it).
    """

    size_multiple = 16  # four 2× poolings

    def __init__(self, in_channels: int = 1, num_classes: int = 55, base: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, int) or base < 1:
            raise ValueError(f"base must be a positive integer, got {base!r}")
        widths = [base * factor for factor in (1, 2, 4, 8, 16)]
        self.encoder = nn.ModuleList([DoubleConv(in_channels, widths[0])])
        for in_width, out_width in zip(widths[:-1], widths[1:]):
            self.encoder.append(nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_width, out_width)))
        # decoder[i] brings level i+1 up to level i; run from the deepest level upwards
        self.decoder = nn.ModuleList([DecoderLevel(width, dropout) for width in widths[:-1]])
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def encode(self, images: torch.Tensor) -> list:
        """images [B, in_channels, H, W] -> five maps [B, base·2^i, H'/2^i, W'/2^i], i = 0..4.

        H', W' are H, W padded up to a multiple of 16 (see networks/sizing.py).
        """
        features = [pad_to_multiple(images, self.size_multiple)]
        for level in self.encoder:
            features.append(level(features[-1]))
        return features[1:]

    def decode(self, features: list, out_size) -> torch.Tensor:
        """The five maps from `encode` -> logits [B, num_classes, H, W], out_size = (H, W)."""
        decoded = features[-1]
        for level, skip in zip(reversed(self.decoder), reversed(features[:-1])):
            decoded = level(decoded, skip)
        return crop_to(self.classifier(decoded), out_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, in_channels, H, W] (any H, W) -> logits [B, num_classes, H, W]."""
        return self.decode(self.encode(images), images.shape[-2:])
