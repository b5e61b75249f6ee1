"""Optimisation shared by the training scripts: AdamW with its parameter groups (a lower encoder
learning rate, layer-wise decay), the learning-rate schedule, mixed precision and the
backward/clip/step of one iteration. Which schedule steps when is the script's decision: `poly`
after every optimiser step, `plateau` on the validation score after each evaluation.
"""
from contextlib import nullcontext

import torch

# the values of `scheduler` and `amp_dtype` (checked with the config: utils.runtime.check_config)
SCHEDULERS = ("plateau", "poly")
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def learning_rate_scales(cfg, model):
    """{parameter: factor of `lr`} for the trainable parameters of `model`.

    Everything outside `model.encoder` (the decoder, the classifier, an edge branch) trains at
    `lr`. The encoder trains at `lr × encoder_lr_scale`: a pretrained encoder moved at the decoder's
    pace forgets what it brought (UniMatch V2, Yang et al. 2025, trains its DINOv2 encoder 40×
    slower than its head). With `layer_decay` < 1, encoder layer l of L (0: the embeddings, L + 1:
    the final norm; the network's `encoder.layer_of`) gets a further `layer_decay^(L + 1 − l)`:
    the layers nearest the input, the most generic, change least (layer-wise learning-rate decay,
    Clark et al. 2020, as in BEiT and DINOv2 fine-tuning). Both are 1 by default: one learning rate.
    """
    encoder = model.encoder
    scales = {}
    for name, parameter in encoder.named_parameters():
        scale = cfg.encoder_lr_scale
        if cfg.layer_decay != 1:
            scale *= cfg.layer_decay ** (encoder.depth + 1 - encoder.layer_of(name))
        scales[parameter] = scale
    return {parameter: scales.get(parameter, 1.0) for parameter in model.parameters()
            if parameter.requires_grad}


def build_optimizer(cfg, model):
    """AdamW over the trainable parameters of `model`, one parameter group per learning rate
    (`learning_rate_scales`), the group at `lr` first (the one the logs report)."""
    groups = {}
    for parameter, scale in learning_rate_scales(cfg, model).items():
        groups.setdefault(scale, []).append(parameter)
    ordered = sorted(groups.items(), key=lambda item: -item[0])
    return torch.optim.AdamW([{"params": parameters, "lr": cfg.lr * scale}
                              for scale, parameters in ordered],
                             lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg, optimizer, total_iterations):
    """ReduceLROnPlateau on the validation score (stepped per evaluation) or poly (per step)."""
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    return torch.optim.lr_scheduler.LambdaLR(  # poly
        optimizer, lambda step: max(0.0, 1 - step / total_iterations) ** cfg.poly_power)


def build_optimisation(cfg, model, total_iterations, device):
    """(AdamW, its schedule, the AMP GradScaler) for the trainable parameters of `model`."""
    optimizer = build_optimizer(cfg, model)
    return optimizer, build_scheduler(cfg, optimizer, total_iterations), make_scaler(device, cfg)


def autocast(device, cfg):
    """Autocast to `amp_dtype` on CUDA when `amp`; a no-op on the CPU, where it is far slower."""
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=AMP_DTYPES[cfg.amp_dtype])
    return nullcontext()


def make_scaler(device, cfg):
    """The loss scaler of float16 autocast on CUDA; disabled otherwise: bfloat16 has float32's
    exponent range, so its gradients do not underflow and need no scaling."""
    enabled = device.type == "cuda" and cfg.amp and cfg.amp_dtype == "float16"
    return torch.amp.GradScaler("cuda", enabled=enabled)


def optimizer_step(loss, optimizer, scaler, cfg):
    """Zero the gradients, backward (scaled under AMP), optional clipping to `grad_clip`, step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
