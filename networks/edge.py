"""Edge guidance for any network with `encode`/`decode`: a boundary branch on the shallow encoder
features, fused back into them before decoding.

After the Edge-Guided Module of Hsu & Hua, "Strategic Advancements in Semi-supervised Medical
Segmentation with Emphasis on Local Accuracy and Label Precision" (their extension of BCP, Bai et
al. CVPR 2023): boundaries are where small-data segmenters are least precise, so a branch predicts
them from high-resolution features and its output re-weights those features for the decoder.

Here the branch reads the two shallowest feature maps (AttUNet: strides 1 and 2; SegFormer: 4 and
8), predicts a one-channel edge map, and replaces the shallowest map by
`f0 + fuse([f0 · σ(edge), edge_features])`; the wrapped network's own decoder does the rest (for
AttUNet, f0 is the finest skip connection; for SegFormer, the stride-4 input of the MLP decoder).
The loss that supervises the branch is `utils.losses.edge_loss`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.sizing import crop_to

PROBE_SIZE = 64  # side of the dummy input that reveals the feature widths (a multiple of 32)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class EdgeGuided(nn.Module):
    """`model` with an edge branch. model: has encode(images) -> list of maps (shallowest first)
    and decode(features, size) -> logits; in_channels: its input channels (for the probe that
    reads the feature widths). Same interface as the wrapped network, plus `decode_with_edges`.
    """

    def __init__(self, model: nn.Module, in_channels: int = 1):
        super().__init__()
        self.model = model
        was_training = model.training
        model.eval()  # the probe must not touch BatchNorm statistics
        with torch.no_grad():
            probe = model.encode(torch.zeros(1, in_channels, PROBE_SIZE, PROBE_SIZE))
        model.train(was_training)
        shallow, deeper = probe[0].shape[1], probe[1].shape[1]
        self.stride = PROBE_SIZE // probe[0].shape[-1]
        self.edge_features = nn.Sequential(*conv_bn_relu(shallow + deeper, shallow, 3),
                                           *conv_bn_relu(shallow, shallow, 3))
        self.edge_head = nn.Conv2d(shallow, 1, 1)
        self.fuse = nn.Sequential(*conv_bn_relu(2 * shallow, shallow, 1))

    @property
    def encoder(self):
        """The wrapped network's encoder (for freezing stages)."""
        return self.model.encoder

    def encode(self, images: torch.Tensor) -> list:
        """images [B, in_channels, H, W] -> the wrapped network's feature maps."""
        return self.model.encode(images)

    def decode_with_edges(self, features: list, out_size):
        """Features from `encode` -> (logits [B, num_classes, H, W], edge logits [B, 1, H, W]);
        out_size = (H, W). σ(edge logits) is the probability that a pixel lies on a boundary."""
        shallow = features[0]
        deeper = F.interpolate(features[1], size=shallow.shape[-2:], mode="bilinear",
                               align_corners=False)
        edge_features = self.edge_features(torch.cat([shallow, deeper], 1))
        edge_logits = self.edge_head(edge_features)
        guided = shallow + self.fuse(torch.cat([shallow * edge_logits.sigmoid(), edge_features], 1))
        logits = self.model.decode([guided, *features[1:]], out_size)
        if self.stride > 1:
            edge_logits = F.interpolate(edge_logits, scale_factor=self.stride, mode="bilinear",
                                        align_corners=False)
        return logits, crop_to(edge_logits, out_size)

    def decode(self, features: list, out_size) -> torch.Tensor:
        """Features from `encode` -> logits [B, num_classes, H, W]."""
        return self.decode_with_edges(features, out_size)[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, in_channels, H, W] -> logits [B, num_classes, H, W]."""
        return self.decode(self.encode(images), images.shape[-2:])


def forward_with_edges(model: nn.Module, images: torch.Tensor):
    """(logits [B, C, H, W], edge logits [B, 1, H, W]) of an EdgeGuided network; (logits, None)
    for any other network, so a training step can call it whatever the network option."""
    if isinstance(model, EdgeGuided):
        return model.decode_with_edges(model.encode(images), images.shape[-2:])
    return model(images), None
