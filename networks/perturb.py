"""UniMatch's feature perturbation (FP) stream, built from any network's `encode`/`decode`.

Yang et al., "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic Segmentation",
CVPR 2023, https://arxiv.org/abs/2208.09910.

The weakly augmented unlabeled images are encoded once; a copy of their features with channel
dropout (Dropout2d, p = 0.5) is decoded together with the clean features, and its prediction is
trained against the pseudo-labels of the clean one. Decoding both in one batch, as UniMatch does,
costs one encoder pass and lets BatchNorm in the decoder see clean and perturbed features together.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def forward_with_feature_perturbation(model: nn.Module, images: torch.Tensor, num_perturbed: int,
                                      p: float = 0.5):
    """Clean logits for all images and perturbed logits for the last `num_perturbed` of them.

    model: has encode(images) -> list of [B, C_i, h_i, w_i] and decode(features, size) -> logits.
    images [B, C_in, H, W]; typically torch.cat([img_x, img_u_w]) with num_perturbed = len(img_u_w).
    Channel dropout is applied whatever the model's train/eval mode (it is the perturbation, not a
    regulariser). Returns logits [B, num_classes, H, W] and logits_fp [num_perturbed, num_classes,
    H, W], both from one decode call.
    """
    batch = images.shape[0]
    if not 0 <= num_perturbed <= batch:
        raise ValueError(f"num_perturbed must be in [0, {batch}], got {num_perturbed}")
    features = model.encode(images)
    combined = [torch.cat([feature, F.dropout2d(feature[batch - num_perturbed:], p, training=True)])
                for feature in features]
    logits = model.decode(combined, images.shape[-2:])
    return logits[:batch], logits[batch:]
