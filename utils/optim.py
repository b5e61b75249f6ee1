"""Optimisation shared by the training scripts: AdamW, the learning-rate schedule, mixed precision
and the backward/clip/step of one iteration. Which schedule steps when is the script's decision:
`poly` after every optimiser step, `plateau` on the validation score after each evaluation.
"""
from contextlib import nullcontext

import torch

# the values of `scheduler` and `amp_dtype` (checked with the config: utils.runtime.check_config)
SCHEDULERS = ("plateau", "poly")
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def build_optimizer(cfg, parameters):
    return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg, optimizer, total_iterations):
    """ReduceLROnPlateau on the validation score (stepped per evaluation) or poly (per step)."""
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    return torch.optim.lr_scheduler.LambdaLR(  # poly
        optimizer, lambda step: max(0.0, 1 - step / total_iterations) ** cfg.poly_power)


def build_optimisation(cfg, parameters, total_iterations, device):
    """(AdamW, its schedule, the AMP GradScaler) for the trainable `parameters`."""
    optimizer = build_optimizer(cfg, parameters)
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
