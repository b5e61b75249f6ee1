"""SegFormer: a Mix Transformer (MiT) encoder and the all-MLP decoder.

Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers",
NeurIPS 2021, https://arxiv.org/abs/2105.15203.

Encoder: four stages at strides 4, 8, 16, 32. Each starts with an overlapping patch embedding
(a strided convolution, 7×7/4 for the first stage and 3×3/2 after, then LayerNorm) and stacks
pre-norm transformer blocks: efficient self-attention whose keys and values come from the tokens
downsampled by a strided convolution (reduction ratios 8, 4, 2, 1), and a Mix-FFN (linear, 3×3
depthwise convolution, GELU, linear) that replaces positional encodings. Both residual branches
use stochastic depth, increasing linearly from 0 to `drop_path_rate` over all blocks. Each stage
ends with a LayerNorm. Decoder: each stage is projected to a common width, upsampled to stride 4,
concatenated, fused by a 1×1 convolution with BatchNorm and ReLU, and classified; the logits are
upsampled ×4 to the input resolution.

Parameter names inside the encoder are this repository's own; networks/pretrained.py maps the
official NVlabs and the Hugging Face checkpoint names onto them.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.sizing import crop_to, pad_to_multiple


@dataclass(frozen=True)
class MiTVariant:
    """Sizes of one SegFormer variant, per stage unless noted (Table 6 of the paper)."""
    widths: tuple
    depths: tuple
    heads: tuple
    decoder_width: int
    reduction_ratios: tuple = (8, 4, 2, 1)
    mlp_ratio: int = 4


VARIANTS = {
    "b0": MiTVariant(widths=(32, 64, 160, 256), depths=(2, 2, 2, 2), heads=(1, 2, 5, 8),
                     decoder_width=256),
    "b1": MiTVariant(widths=(64, 128, 320, 512), depths=(2, 2, 2, 2), heads=(1, 2, 5, 8),
                     decoder_width=256),
    "b2": MiTVariant(widths=(64, 128, 320, 512), depths=(3, 4, 6, 3), heads=(1, 2, 5, 8),
                     decoder_width=768),
    "b3": MiTVariant(widths=(64, 128, 320, 512), depths=(3, 4, 18, 3), heads=(1, 2, 5, 8),
                     decoder_width=768),
    "b4": MiTVariant(widths=(64, 128, 320, 512), depths=(3, 8, 27, 3), heads=(1, 2, 5, 8),
                     decoder_width=768),
    "b5": MiTVariant(widths=(64, 128, 320, 512), depths=(3, 6, 40, 3), heads=(1, 2, 5, 8),
                     decoder_width=768),
}

LAYER_NORM_EPS = 1e-6  # the MiT blocks and stage norms; the patch-embedding norm keeps 1e-5


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H·W, C] -> [B, C, H, W] (a view: the result is channels_last in memory)."""
    return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)


def map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H·W, C]."""
    return feature_map.flatten(2).transpose(1, 2)


def drop_path(residual: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability `rate`."""
    if rate == 0.0 or not training:
        return residual
    keep = residual.new_empty((residual.shape[0],) + (1,) * (residual.dim() - 1))
    keep.bernoulli_(1.0 - rate)
    return residual * keep / (1.0 - rate)


class OverlapPatchEmbedding(nn.Module):
    """Strided convolution with overlapping windows + LayerNorm.

    [B, in, H, W] -> tokens [B, ceil(H/stride)·ceil(W/stride), width] and the new (H, W).
    """

    def __init__(self, in_channels: int, width: int, kernel_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(width)

    def forward(self, images: torch.Tensor):
        feature_map = self.proj(images)
        return self.norm(map_to_tokens(feature_map)), feature_map.shape[-2:]


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from tokens downsampled `reduction`× per side.

    tokens [B, H·W, C] -> [B, H·W, C]. Keys and values share one projection (`kv`, keys first).
    """

    def __init__(self, width: int, heads: int, reduction: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.reduce = None
        if reduction > 1:
            self.reduce = nn.Conv2d(width, width, kernel_size=reduction, stride=reduction)
            self.reduce_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, length, channels = tokens.shape
        queries = self.q(tokens).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        context = tokens
        if self.reduce is not None:
            reduced = self.reduce(tokens_to_map(tokens, height, width))
            context = self.reduce_norm(map_to_tokens(reduced))
        keys, values = self.kv(context).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(queries, keys, values)  # scale 1/sqrt(head dim)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, channels))


class MixFFN(nn.Module):
    """Linear -> 3×3 depthwise conv -> GELU -> linear; tokens [B, H·W, C] -> [B, H·W, C].

    The depthwise convolution leaks position information from the zero padding, which is why
    MiT needs no positional encoding and works at any resolution.
    """

    def __init__(self, width: int, hidden_width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden_width)
        self.dwconv = nn.Conv2d(hidden_width, hidden_width, 3, padding=1, groups=hidden_width)
        self.fc2 = nn.Linear(hidden_width, width)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        hidden = self.dwconv(tokens_to_map(self.fc1(tokens), height, width))
        return self.fc2(F.gelu(map_to_tokens(hidden)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + ffn(norm2(x)), both with stochastic depth."""

    def __init__(self, width: int, heads: int, reduction: int, mlp_ratio: int,
                 drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = EfficientSelfAttention(width, heads, reduction)
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = MixFFN(width, mlp_ratio * width)
        self.drop_path_rate = drop_path_rate

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        tokens = tokens + drop_path(self.attn(self.norm1(tokens), height, width),
                                    self.drop_path_rate, self.training)
        return tokens + drop_path(self.mlp(self.norm2(tokens), height, width),
                                  self.drop_path_rate, self.training)


class MiTStage(nn.Module):
    """Patch embedding, `depth` blocks, LayerNorm: [B, in, H, W] -> [B, width, H/s, W/s]."""

    def __init__(self, in_channels: int, width: int, depth: int, heads: int, reduction: int,
                 mlp_ratio: int, kernel_size: int, stride: int, drop_path_rates: list):
        super().__init__()
        self.patch_embed = OverlapPatchEmbedding(in_channels, width, kernel_size, stride)
        self.blocks = nn.ModuleList([TransformerBlock(width, heads, reduction, mlp_ratio, rate)
                                     for rate in drop_path_rates])
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        tokens, (height, width) = self.patch_embed(feature_map)
        for block in self.blocks:
            tokens = block(tokens, height, width)
        return tokens_to_map(self.norm(tokens), height, width)


class MixTransformer(nn.Module):
    """MiT encoder: [B, in_channels, H, W] -> four maps [B, widths[i], H/4·2^-i, W/4·2^-i]."""

    def __init__(self, variant: MiTVariant, in_channels: int, drop_path_rate: float):
        super().__init__()
        total_depth = sum(variant.depths)
        rates = [drop_path_rate * block / max(total_depth - 1, 1) for block in range(total_depth)]
        stage_inputs = (in_channels,) + variant.widths[:-1]
        self.stages = nn.ModuleList()
        for index, depth in enumerate(variant.depths):
            first_block = sum(variant.depths[:index])
            self.stages.append(MiTStage(
                stage_inputs[index], variant.widths[index], depth, variant.heads[index],
                variant.reduction_ratios[index], variant.mlp_ratio,
                kernel_size=7 if index == 0 else 3, stride=4 if index == 0 else 2,
                drop_path_rates=rates[first_block:first_block + depth]))

    def forward(self, images: torch.Tensor) -> list:
        features = [images]
        for stage in self.stages:
            features.append(stage(features[-1]))
        return features[1:]


class AllMLPDecoder(nn.Module):
    """Project each stage to `width`, upsample to stride 4, concatenate, fuse, classify.

    The per-stage "MLPs" are 1×1 convolutions (the same linear maps, applied to [B, C, H, W]).
    features: four maps from MixTransformer -> logits [B, num_classes, H/4, W/4].
    """

    def __init__(self, in_widths: tuple, width: int, num_classes: int, dropout: float):
        super().__init__()
        self.project = nn.ModuleList([nn.Conv2d(in_width, width, 1) for in_width in in_widths])
        self.fuse = nn.Sequential(nn.Conv2d(len(in_widths) * width, width, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list) -> torch.Tensor:
        size = features[0].shape[-2:]
        projected = [F.interpolate(project(feature), size=size, mode="bilinear",
                                   align_corners=False)
                     for project, feature in zip(self.project, features)]
        # the paper's order: deepest stage first
        fused = self.fuse(torch.cat(projected[::-1], dim=1))
        return self.classifier(self.dropout(fused))


class SegFormer(nn.Module):
    """SegFormer-B0…B5.

    variant: "b0" … "b5"; in_channels: image channels; num_classes: logit channels;
    drop_path_rate: final stochastic-depth rate of the encoder (paper: 0.1);
    dropout: Dropout2d probability before the classifier (paper: 0.1).
    """

    size_multiple = 32  # the stride of the last stage

    def __init__(self, variant: str = "b0", in_channels: int = 1, num_classes: int = 55,
                 drop_path_rate: float = 0.1, dropout: float = 0.1):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown SegFormer variant {variant!r}; valid: {sorted(VARIANTS)}")
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        self.variant = variant
        sizes = VARIANTS[variant]
        self.encoder = MixTransformer(sizes, in_channels, drop_path_rate)
        self.decoder = AllMLPDecoder(sizes.widths, sizes.decoder_width, num_classes, dropout)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        """The official initialisation: truncated normal (std 0.02) for linear layers, He-normal
        (fan-out) for convolutions, zero biases, unit LayerNorm."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, std=(2.0 / (fan_out // module.groups)) ** 0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def encode(self, images: torch.Tensor) -> list:
        """images [B, in_channels, H, W] -> the four stage outputs after their LayerNorm,
        [B, C_i, H'/4, W'/4] … [B, C_4, H'/32, W'/32], with H', W' = H, W padded up to a
        multiple of 32 (networks/sizing.py)."""
        return self.encoder(pad_to_multiple(images, self.size_multiple))

    def decode(self, features: list, out_size) -> torch.Tensor:
        """The four maps from `encode` -> logits [B, num_classes, H, W], out_size = (H, W)."""
        logits = self.decoder(features)
        logits = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
        return crop_to(logits, out_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, in_channels, H, W] (any H, W) -> logits [B, num_classes, H, W]."""
        return self.decode(self.encode(images), images.shape[-2:])
