"""Mechanics the teacher–student methods share (`train_teacher_student.py`): the parts a step
works with and its position in the run, the length of the first phase, the EMA update and its
decay sized to the run, the ramp-up, the dual teacher's pick, freezing encoder stages, cleaning
pseudo-labels to their largest component, and feeding a loaded teacher the normalisation it was
trained with.
"""
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from utils import distributed
from utils.errors import InputError
from utils.losses import IGNORE_INDEX, SupervisedLoss
from utils.postprocess import keep_largest_component
from utils.priors import teacher_labels


@dataclass
class TeacherStudentParts:
    """What a teacher–student step works with, built once per run."""
    student: nn.Module
    teacher: nn.Module | None           # pseudo_label: the fixed teacher; else the EMA (OwnStatistics)
    static_teacher: nn.Module | None    # bcp: the student, copied every `static_every` steps
    loss_sup: SupervisedLoss            # ground truth (partial labels)
    loss_stream: Callable               # complete pseudo-labels (losses.build_stream_loss)
    train_forward: Callable             # distributed.data_parallel(student): runs f(student) in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    scheduler: object = None            # stepped by the loop (poly: per step; plateau: per evaluation)
    pseudo_area_bounds: torch.Tensor | None = None  # pseudo_area_filter: class area bounds (C,)
    pretrain_epochs: int = 0            # epochs of the first phase (bcp, pseudo_label pretrain_finetune)


@dataclass(frozen=True)
class Position:
    """Where a step is: `epoch` (from 0), `iteration` (steps before this one), `per_epoch` steps
    an epoch, `total` steps in the run."""
    epoch: int
    iteration: int
    per_epoch: int
    total: int


def pretrain_epoch_count(cfg):
    """Epochs of the first phase (BCP's labeled copy-paste, or the pseudo-labels of
    `pretrain_finetune`): `pretrain_share` of the run's epochs, rounded."""
    return round(cfg.pretrain_share * cfg.epochs)


def rampup(cfg, at, start_epoch=0):
    """exp(−5(1−t)²) with t = epochs done at `at` (a `Position`) since `start_epoch` /
    `cfg.rampup_epochs` (Laine & Aila 2017); 1 with `rampup_epochs` 0."""
    if cfg.rampup_epochs <= 0:
        return 1.0
    return sigmoid_rampup((at.iteration / at.per_epoch - start_epoch) / cfg.rampup_epochs)


def ema_alpha(cfg, at):
    """`cfg.ema_alpha`, or (0) the decay sized to the run's `at.total` steps (`run_length_alpha`)."""
    return cfg.ema_alpha or run_length_alpha(at.total)


def ema_update(teacher, student, alpha, step):
    """teacher ← a·teacher + (1−a)·student for the parameters, with a = min(1 − 1/(step+1),
    alpha) (Tarvainen & Valpola 2017: the warm start lets the teacher follow the student closely
    at first). The buffers (BatchNorm running statistics) are the teacher's own, tracked by
    `OwnStatistics` as in the authors' code; rank 0's under torchrun, so the teacher is the same
    in every process. Copying the student's statistics into averaged weights broke the teacher:
    on the phantom (100 steps) it fell to 0.07 test Dice against its student's 0.19, and came
    back to 0.18 once its statistics were recomputed for its weights; averaging them like the
    weights did not help (docs/experiments.md, Teacher-student diagnosis at 100 steps)."""
    distributed.sync_buffers(teacher)
    a = min(1 - 1 / (step + 1), alpha)
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(a).add_(s.detach(), alpha=1 - a)


class OwnStatistics(nn.Module):
    """An EMA teacher whose target forwards normalise with the batch's statistics and update its
    own BatchNorm running statistics, which then match its averaged weights; the teacher stays
    in eval mode otherwise (validation, dropout)."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher
        self.norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def forward(self, images):
        for norm in self.norms:
            norm.train()
        try:
            return self.teacher(images)
        finally:
            for norm in self.norms:
                norm.eval()


def run_length_alpha(total_steps, horizon_share=0.2, most=0.99):
    """EMA decay sized to a run of `total_steps`: the teacher averages over about the last
    `horizon_share` of the run (1/(1−a) steps), a = 1 − 1/(horizon_share·total), at most `most`
    (Tarvainen & Valpola's 0.99). 100 steps → 0.95 (measured on the phantom: teacher Dice 0.14,
    vs 0.07 at 0.99), 400 → 0.9875, ≥ 500 → 0.99. Never below 0: a very short run follows the
    student."""
    return min(most, max(0.0, 1 - 1 / (horizon_share * total_steps)))


def sigmoid_rampup(t):
    """exp(−5(1−t)²) for t in [0, 1] (Laine & Aila 2017), 1 after the ramp."""
    t = min(max(t, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def freeze_encoder_stages(model, count):
    """Freeze the first `count` encoder stages for fine-tuning: AttUNet's encoder blocks,
    SegFormer's stages (patch embedding, transformer blocks, norm), a DINOv2 ViT's embeddings and
    first `count` blocks. Only the weights freeze: BatchNorm running statistics still follow the
    data. Pass only the parameters that still require gradients to the optimiser."""
    encoder = model.encoder
    if hasattr(encoder, "layer_of"):  # a plain ViT has one stage per block (networks/dinov2.py)
        if not 0 <= count <= encoder.depth:
            raise InputError(f"freeze_encoder_stages: {count} is not between 0 and {encoder.depth} "
                             "(the transformer blocks of this network)")
        for name, parameter in encoder.named_parameters():
            if count and encoder.layer_of(name) <= count:
                parameter.requires_grad_(False)
        return
    stages = getattr(encoder, "stages", encoder)
    if not 0 <= count <= len(stages):
        raise InputError(f"freeze_encoder_stages: {count} is not between 0 and {len(stages)} "
                         "(the encoder stages of this network)")
    for stage in stages[:count]:
        stage.requires_grad_(False)


@torch.no_grad()
def dual_teacher_pseudo_labels(dynamic, static, images, largest_component=True, background_scale=1.0):
    """BCP's dual teacher (Hsu & Hua 2024): per pixel the argmax of the more confident of the
    `dynamic` (EMA) and `static` teachers (ties: the dynamic one), each with its background
    probability shifted by `background_scale` (`utils.priors.teacher_labels`), then, with
    `largest_component`, each class's largest component (not in instance mode: its interior
    class holds every structure, so this would keep one structure). images [B, C, H, W] ->
    (pseudo int64 [B, H, W], IGNORE_INDEX off the largest components; confidence [B, H, W];
    from_static bool [B, H, W])."""
    conf_dynamic, label_dynamic = teacher_labels(dynamic(images), background_scale)
    conf_static, label_static = teacher_labels(static(images), background_scale)
    from_static = conf_static > conf_dynamic
    labels = torch.where(from_static, label_static, label_dynamic)
    if largest_component:
        labels = largest_component_labels(labels)
    return labels, torch.maximum(conf_dynamic, conf_static), from_static


def largest_component_labels(labels):
    """int [B, H, W] -> the same with each class (> 0) cut to its largest 8-connected component
    per slice (BCP's cleaning of pseudo-labels). The cut pixels become IGNORE_INDEX rather than
    background: CT classes such as bowel have several true components, and the teacher did
    not see background there."""
    array = labels.cpu().numpy()
    classes = np.unique(array)
    kept = keep_largest_component(array, classes[classes > 0])
    return torch.from_numpy(np.where(kept != array, IGNORE_INDEX, array)).to(labels.device)


class Renormalized(nn.Module):
    """A loaded teacher trained with other intensity statistics (`its`) fed our batches (`ours`):
    x·s_ours/s_its + (m_ours − m_its)/s_its restores the normalisation it was trained with."""

    def __init__(self, model, ours, its):
        super().__init__()
        self.model, self.scale = model, ours["std"] / its["std"]
        self.shift = (ours["mean"] - its["mean"]) / its["std"]

    def forward(self, images):
        return self.model(images * self.scale + self.shift)
