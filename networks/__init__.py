"""Segmentation networks and the registry the scripts build them from.

    model = build_model("segformer_b0", in_channels=1, num_classes=55, pretrained="mit_b0.pth")
    logits = model(images)                       # [B, 1, H, W] -> [B, 55, H, W], any H, W
    features = model.encode(images)              # list of feature maps
    logits = model.decode(features, images.shape[-2:])

Every network pads its input to a multiple of its total stride and crops the logits back
(networks/sizing.py), so any input size works.
"""
import inspect
from functools import partial

from networks.attunet import AttUNet
from networks.dinov2 import DINOv2DPT
from networks.edge import EdgeGuided
from networks.perturb import forward_with_feature_perturbation
from networks.pretrained import load_pretrained_encoder
from networks.segformer import SegFormer
from utils.errors import InputError

MODELS = {
    "attunet": AttUNet,
    "segformer_b0": partial(SegFormer, variant="b0"),
    "segformer_b1": partial(SegFormer, variant="b1"),
    "segformer_b2": partial(SegFormer, variant="b2"),
    "segformer_b3": partial(SegFormer, variant="b3"),
    "segformer_b4": partial(SegFormer, variant="b4"),
    "segformer_b5": partial(SegFormer, variant="b5"),
    "dinov2_s": partial(DINOv2DPT, variant="s"),
    "dinov2_b": partial(DINOv2DPT, variant="b"),
    "dinov2_l": partial(DINOv2DPT, variant="l"),
}


def model_options(name: str) -> dict:
    """The keyword options a model accepts besides in_channels/num_classes, with defaults."""
    constructor = MODELS[name]
    fixed = set(getattr(constructor, "keywords", {})) | {"in_channels", "num_classes"}
    signature = inspect.signature(getattr(constructor, "func", constructor))
    return {option: parameter.default for option, parameter in signature.parameters.items()
            if option not in fixed}


def build_model(name: str, in_channels: int = 1, num_classes: int = 55, pretrained=None,
                edge_guided: bool = False, **kwargs):
    """Build a registered network on the CPU (move it with .to(device)).

    name: one of MODELS; kwargs: the model's options (attunet: base, dropout; segformer_*:
    drop_path_rate, dropout; dinov2_*: registers, drop_path_rate, dropout); pretrained: path of
    an encoder checkpoint, MiT weights for segformer_* and DINOv2 weights for dinov2_* (see
    networks/pretrained.py); edge_guided: wrap the network with an edge branch (networks/edge.py).
    Unknown names or options raise InputError.
    """
    if name not in MODELS:
        raise InputError(f"model: unknown model {name!r}; valid models: {', '.join(MODELS)}")
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise InputError(f"model {name}: unknown option(s) {', '.join(unknown)}; "
                         f"valid options: {', '.join(options)}")
    try:
        model = MODELS[name](in_channels=in_channels, num_classes=num_classes, **kwargs)
    except (ValueError, TypeError, RuntimeError) as error:
        raise InputError(f"model {name}: invalid option value ({error})") from None
    if pretrained:
        load_pretrained_encoder(model, pretrained)
    if edge_guided:
        model = EdgeGuided(model, in_channels)
    return model


__all__ = ["MODELS", "AttUNet", "DINOv2DPT", "SegFormer", "build_model", "model_options",
           "forward_with_feature_perturbation", "load_pretrained_encoder"]
