"""DINOv2: a plain ViT encoder (patch size 14) read at four depths by a DPT decoder.

Encoder: Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024,
https://arxiv.org/abs/2304.07193, optionally with the register tokens of Darcet et al., "Vision
Transformers Need Registers", ICLR 2024, https://arxiv.org/abs/2309.16588.
Decoder: Ranftl et al., "Vision Transformers for Dense Prediction", ICCV 2021,
https://arxiv.org/abs/2103.13413, in the form Depth Anything (Yang et al. 2024,
https://arxiv.org/abs/2401.10891) and UniMatch V2 (Yang et al., "UniMatch V2: Pushing the Limit of
Semi-Supervised Semantic Segmentation", TPAMI 2025, https://arxiv.org/abs/2410.10777) use it.

Encoder: a 14×14/14 convolution cuts the image into patch tokens; a [CLS] token is prepended and
learned position embeddings are added (the [CLS] token has its own; the patch grid of the
pretraining resolution, 518² = 37×37 patches, is resampled bicubically to the input's grid). The
register tokens (0 or 4) get no position embedding and sit between [CLS] and the patches. Then
pre-norm blocks: x + LayerScale(attention(LN(x))), x + LayerScale(MLP(LN(x))), the MLP being
Linear(D, 4D), exact GELU, Linear(4D, D); LayerScale multiplies each channel by a learned factor
(Touvron et al. 2021, https://arxiv.org/abs/2103.17239). Stochastic depth, if enabled, grows
linearly from 0 to `drop_path_rate` over the blocks, as in networks/segformer.py. The encoder
returns the outputs of four blocks, each through the final LayerNorm, without the [CLS] and
register tokens, as maps [B, D, H/14, W/14] (the intermediate layers of Depth Anything).

Decoder (readout "ignore": the [CLS] token is dropped): each map is reassembled — a 1×1
convolution to C_i channels and a resize ×4, ×2, ×1, ×½ — and brought to the head width F by a
3×3 convolution; four fusion blocks then go from the deepest map to the shallowest, each adding
its map (refined by a residual convolution unit) to the path from below, refining the sum, and
upsampling it bilinearly to the next map's size (×2 after the shallowest, i.e. stride 14/8), then
a 1×1 convolution. A 3×3 convolution, ReLU, dropout and a 1×1 classifier give the logits, which
are upsampled to the input resolution.

Differences from the published code, on purpose: the position grid is resampled to the exact
target size without antialiasing, one rule for every variant (as transformers' Dinov2Model does),
where the official code resamples the models without registers by the scale factor (n + 0.1) / 37
and those with registers with antialiasing (as do transformers' Dinov2WithRegistersModel and
timm) — the same at 37×37 (a 512² slice padded to 518²), slightly different elsewhere; the mask
token, which DINOv2's masked-image objective puts in
place of masked patches during pretraining and which segmentation never uses, is a buffer rather
than a parameter, so that it loads from the published files but no optimizer or
DistributedDataParallel sees a parameter without a gradient; the deepest fusion block has no unit
for a skip input it never receives.

Parameter names inside the encoder are this repository's own; networks/pretrained.py maps the
official and the Hugging Face checkpoint names onto them.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.segformer import drop_path, map_to_tokens, tokens_to_map
from networks.sizing import crop_to, pad_to_multiple


@dataclass(frozen=True)
class DINOv2Variant:
    """Sizes of one encoder (the DINOv2 ViTs) and of its DPT head (UniMatch V2's widths)."""
    name: str
    width: int
    depth: int
    heads: int
    feature_layers: tuple   # the blocks whose outputs the head reads (0-based)
    reassemble_widths: tuple
    head_width: int
    mlp_ratio: int = 4


VARIANTS = {
    "s": DINOv2Variant("S", width=384, depth=12, heads=6, feature_layers=(2, 5, 8, 11),
                       reassemble_widths=(48, 96, 192, 384), head_width=64),
    "b": DINOv2Variant("B", width=768, depth=12, heads=12, feature_layers=(2, 5, 8, 11),
                       reassemble_widths=(96, 192, 384, 768), head_width=128),
    "l": DINOv2Variant("L", width=1024, depth=24, heads=16, feature_layers=(4, 11, 17, 23),
                       reassemble_widths=(256, 512, 1024, 1024), head_width=256),
}

PATCH_SIZE = 14
PRETRAINING_GRID = 37  # 518 / 14: the patch grid the published position embeddings belong to
LAYER_NORM_EPS = 1e-6
LAYER_SCALE_INIT = 1e-5


def resize_position_grid(positions: torch.Tensor, grid) -> torch.Tensor:
    """Patch position embeddings [1, n·n, D] of a square n×n grid -> [1, h·w, D], grid = (h, w).

    Bicubic (cubic convolution, a = -0.75), align_corners False; computed in float32 because
    resampling in half precision visibly shifts the embeddings; the identity when the grid is n×n.
    """
    side = math.isqrt(positions.shape[1])
    if (side, side) == tuple(grid):
        return positions
    square = tokens_to_map(positions, side, side).float()
    resized = F.interpolate(square, size=tuple(grid), mode="bicubic", align_corners=False)
    return map_to_tokens(resized).to(positions.dtype)


class LayerScale(nn.Module):
    """Multiply each channel by a learned factor (initialised small: each branch starts ~0)."""

    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), LAYER_SCALE_INIT))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * self.gamma


class SelfAttention(nn.Module):
    """Multi-head self-attention, tokens [B, N, D] -> [B, N, D]; queries, keys and values come
    from one fused projection (`qkv`, in that order)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, channels = tokens.shape
        queries, keys, values = (self.qkv(tokens).unflatten(-1, (3, self.heads, -1))
                                 .permute(2, 0, 3, 1, 4))
        attended = F.scaled_dot_product_attention(queries, keys, values)  # scale 1/sqrt(head dim)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, channels))


class MLP(nn.Module):
    """Linear -> GELU (exact, erf) -> linear."""

    def __init__(self, width: int, hidden_width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden_width)
        self.fc2 = nn.Linear(hidden_width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(tokens)))


class ViTBlock(nn.Module):
    """Pre-norm block: x + LayerScale(attn(norm1(x))), then x + LayerScale(mlp(norm2(x))), both
    residual branches with stochastic depth."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = SelfAttention(width, heads)
        self.attn_scale = LayerScale(width)
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = MLP(width, mlp_ratio * width)
        self.mlp_scale = LayerScale(width)
        self.drop_path_rate = drop_path_rate

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + drop_path(self.attn_scale(self.attn(self.norm1(tokens))),
                                    self.drop_path_rate, self.training)
        return tokens + drop_path(self.mlp_scale(self.mlp(self.norm2(tokens))),
                                  self.drop_path_rate, self.training)


class DINOv2ViT(nn.Module):
    """DINOv2 encoder: images [B, in_channels, H, W], H and W multiples of 14 -> the outputs of
    the blocks `sizes.feature_layers`, normalised, as maps [B, width, H/14, W/14]."""

    def __init__(self, sizes: DINOv2Variant, in_channels: int, registers: int,
                 drop_path_rate: float):
        super().__init__()
        self.feature_layers = sizes.feature_layers
        self.registers = registers
        self.patch_embed = nn.Conv2d(in_channels, sizes.width, PATCH_SIZE, stride=PATCH_SIZE)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, sizes.width))
        self.register_tokens = (nn.Parameter(torch.zeros(1, registers, sizes.width))
                                if registers else None)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + PRETRAINING_GRID ** 2, sizes.width))
        self.register_buffer("mask_token", torch.zeros(1, sizes.width))  # unused: see module doc
        rates = [drop_path_rate * block / max(sizes.depth - 1, 1) for block in range(sizes.depth)]
        self.blocks = nn.ModuleList([ViTBlock(sizes.width, sizes.heads, sizes.mlp_ratio, rate)
                                     for rate in rates])
        self.norm = nn.LayerNorm(sizes.width, eps=LAYER_NORM_EPS)
        self._init_weights()

    @property
    def depth(self) -> int:
        """The number of transformer blocks."""
        return len(self.blocks)

    def layer_of(self, parameter_name: str) -> int:
        """Depth of an encoder parameter (a name from this module's named_parameters()) for
        layer-wise learning-rate decay (utils/optim.py): 0 for the embeddings, i + 1 for block i,
        depth + 1 for the final norm."""
        parts = parameter_name.split(".")
        if parts[0] == "blocks":
            return int(parts[1]) + 1
        return self.depth + 1 if parts[0] == "norm" else 0

    def _init_weights(self):
        """The official initialisation: truncated normal (std 0.02) for the linear layers and
        the position embeddings, zero biases, [CLS] and registers ~N(0, 1e-6); the stem keeps
        PyTorch's default."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def embed(self, images: torch.Tensor) -> tuple:
        """images -> (tokens [B, 1 + registers + h·w, D], the patch grid (h, w))."""
        patches = self.patch_embed(images)
        grid = patches.shape[-2:]
        positions = torch.cat([self.pos_embed[:, :1],
                               resize_position_grid(self.pos_embed[:, 1:], grid)], dim=1)
        tokens = torch.cat([self.cls_token.expand(len(images), -1, -1), map_to_tokens(patches)],
                           dim=1) + positions
        if self.register_tokens is not None:
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(len(images), -1, -1),
                                tokens[:, 1:]], dim=1)
        return tokens, grid

    def forward(self, images: torch.Tensor) -> list:
        tokens, (height, width) = self.embed(images)
        features = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index in self.feature_layers:
                # LayerNorm acts per token: normalising the patch tokens alone is the same
                patches = self.norm(tokens[:, 1 + self.registers:])
                features.append(tokens_to_map(patches, height, width))
        return features


class ResidualConvUnit(nn.Module):
    """x + conv3×3(ReLU(conv3×3(ReLU(x))))."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return feature_map + self.conv2(F.relu(self.conv1(F.relu(feature_map))))


class FusionBlock(nn.Module):
    """(path from the deeper level + unit(this level's map)) -> unit -> bilinear resize -> 1×1
    conv. At the deepest level there is no path yet: the map itself is the path."""

    def __init__(self, width: int, deepest: bool):
        super().__init__()
        self.skip_unit = None if deepest else ResidualConvUnit(width)
        self.unit = ResidualConvUnit(width)
        self.project = nn.Conv2d(width, width, 1)

    def forward(self, feature_map: torch.Tensor, path, size) -> torch.Tensor:
        path = feature_map if path is None else path + self.skip_unit(feature_map)
        path = F.interpolate(self.unit(path), size=size, mode="bilinear", align_corners=True)
        return self.project(path)


class DPTHead(nn.Module):
    """DPT decoder: four maps [B, in_width, h, w] -> logits [B, num_classes, 8h, 8w]."""

    def __init__(self, in_width: int, reassemble_widths: tuple, head_width: int,
                 num_classes: int, dropout: float):
        super().__init__()
        self.project = nn.ModuleList([nn.Conv2d(in_width, width, 1)
                                      for width in reassemble_widths])
        first, second, _, fourth = reassemble_widths
        # ×4, ×2, ×1, ×½: a pyramid at strides 3.5, 7, 14 and 28, like a CNN backbone's
        self.resize = nn.ModuleList([nn.ConvTranspose2d(first, first, 4, stride=4),
                                     nn.ConvTranspose2d(second, second, 2, stride=2),
                                     nn.Identity(),
                                     nn.Conv2d(fourth, fourth, 3, stride=2, padding=1)])
        self.to_head_width = nn.ModuleList([nn.Conv2d(width, head_width, 3, padding=1, bias=False)
                                            for width in reassemble_widths])
        self.fusions = nn.ModuleList([FusionBlock(head_width, deepest=index == 0)
                                      for index in range(len(reassemble_widths))])
        self.output_conv = nn.Conv2d(head_width, head_width, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_width, num_classes, 1)

    def forward(self, features: list) -> torch.Tensor:
        maps = [to_head(resize(project(feature))) for project, resize, to_head, feature
                in zip(self.project, self.resize, self.to_head_width, features)]
        # each fusion upsamples to the next shallower map's size (odd grids: the ×½ map rounds
        # up), the last one ×2
        sizes = [feature_map.shape[-2:] for feature_map in maps[-2::-1]]
        sizes.append(tuple(2 * side for side in maps[0].shape[-2:]))
        path = None
        for fusion, feature_map, size in zip(self.fusions, maps[::-1], sizes):
            path = fusion(feature_map, path, size)
        return self.classifier(self.dropout(F.relu(self.output_conv(path))))


class DINOv2DPT(nn.Module):
    """DINOv2 ViT-S/14, -B/14 or -L/14 with a DPT head.

    variant: "s", "b", "l" (or a DINOv2Variant, for custom sizes); in_channels: image channels;
    num_classes: logit channels; registers: register tokens (0, or 4 for the `_reg4` weights);
    drop_path_rate: final stochastic-depth rate of the encoder; dropout: Dropout2d probability
    before the classifier.
    """

    size_multiple = PATCH_SIZE

    def __init__(self, variant="s", in_channels: int = 1, num_classes: int = 55,
                 registers: int = 0, drop_path_rate: float = 0.0, dropout: float = 0.1):
        super().__init__()
        if isinstance(variant, str) and variant not in VARIANTS:
            raise ValueError(f"unknown DINOv2 variant {variant!r}; valid: {sorted(VARIANTS)}")
        if not isinstance(registers, int) or registers < 0:
            raise ValueError(f"registers must be a non-negative integer, got {registers!r}")
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        self.sizes = VARIANTS[variant] if isinstance(variant, str) else variant
        self.variant = self.sizes.name.lower()
        self.encoder = DINOv2ViT(self.sizes, in_channels, registers, drop_path_rate)
        self.decoder = DPTHead(self.sizes.width, self.sizes.reassemble_widths,
                               self.sizes.head_width, num_classes, dropout)

    def encode(self, images: torch.Tensor) -> list:
        """images [B, in_channels, H, W] -> four maps [B, width, H'/14, W'/14], with H', W' =
        H, W padded up to a multiple of 14 (networks/sizing.py)."""
        return self.encoder(pad_to_multiple(images, self.size_multiple))

    def decode(self, features: list, out_size) -> torch.Tensor:
        """The four maps from `encode` -> logits [B, num_classes, H, W], out_size = (H, W)."""
        logits = self.decoder(features)
        padded_size = [PATCH_SIZE * side for side in features[0].shape[-2:]]
        # ×14/8 is no whole factor; align_corners as in UniMatch V2
        logits = F.interpolate(logits, size=padded_size, mode="bilinear", align_corners=True)
        return crop_to(logits, out_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, in_channels, H, W] (any H, W) -> logits [B, num_classes, H, W]."""
        return self.decode(self.encode(images), images.shape[-2:])
