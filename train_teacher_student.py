r"""Teacher–student training: pseudo-labelling, Mean Teacher and BCP.

    python train_teacher_student.py --mode pseudo_label --num_labeled 8   # teacher, labels, student
    python train_teacher_student.py --mode pseudo_label --teacher_ckpt runs/sup/best.pth \
        --schedule pretrain_finetune
    python train_teacher_student.py --mode mean_teacher --init_ckpt runs/sup/best.pth \
        --freeze_encoder_stages 2
    python train_teacher_student.py --mode bcp --edge_guided true
    python train_teacher_student.py --resume runs/latest/last.pth --mode bcp
    torchrun --nproc_per_node 4 train_teacher_student.py --mode bcp   # README: Several GPUs

- pseudo_label — teacher–student with confidence filtering (after Baldeon et al. 2023): a
  teacher trained on the labeled split (train_supervised.py, in <run>/teacher/, or
  `--teacher_ckpt`) labels every unlabeled slice; the `pseudo_share` of them it is surest of
  (mean confidence over its predicted foreground) are kept, pixels under `conf_thresh` ignored,
  and saved in <run>/pseudo_labels/. Each step trains a whole labeled batch with the supervised
  loss and as many pseudo-labelled slices on top, as complete labels with `stream_loss` (Dice +
  CE: a 0-pixel is background); an epoch is a pass over the labeled slices, as in
  train_supervised.py. The student starts from the teacher's weights
  (`init_student_from_teacher`), so the teacher's training is not thrown away.
- mean_teacher — Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017: the
  teacher is an EMA of the student. Both modes add w·MSE between the student's probabilities on
  the strong view and the teacher's on the weak view of the same unlabeled slices (w ramped up).
- bcp — Bai et al., "Bidirectional Copy-Paste for Semi-Supervised Medical Image Segmentation",
  CVPR 2023, with the dual teacher and edge guidance of Hsu & Hua (2024): labeled slices pasted
  into each other (pre-training), then a labeled box pasted into an unlabeled slice and an unlabeled
  box into a labeled one, pseudo-labels from the more confident of an EMA and a static teacher
  (pixels under `conf_thresh` ignored).
The EMA decay (`ema_alpha` 0) is sized to the run: the teacher averages its last fifth.

Naming: `img_x`/`mask_x` labeled; `img_u_w`/`img_u_s1` weak/strong view of an unlabeled slice (same
geometry); `conf_u_w` a teacher's confidence. Partial labels in BCP: each region of a mixed
slice is scored with the labels of the slice it came from — ground truth with that slice's
`annotated` classes and certain background (the marginal loss), or complete pseudo-labels at
`u_weight` — so an organ left unannotated on one slice is never read as background inside
another's region.
Checkpoints: pseudo_label keeps the student; mean_teacher and bcp also the EMA `teacher`, which is
validated and which test.py uses unless `--weights student`.
"""
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

import train_supervised
from dataloaders.datasets import LabeledSlices, strong_views
from networks.edge import forward_with_edges
from utils.builders import (build_network, epoch_loader, iterations_per_epoch, labeled_priors,
                            load_data, load_init_weights, semi_supervised_sets, supervised_targets)
from utils import distributed
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.config import CONFIG_DIR, Config, read_yaml_chain
from utils.engine import TrainingRun, colour_count, run_directory
from utils.distributed import data_parallel
from utils.errors import InputError, run_cli
from utils.inference import TTA_MODES, predict_slices
from utils.losses import (IGNORE_INDEX, build_loss, build_stream_loss, confident_pseudo_labels,
                          drop_oversized_pseudo_labels, edge_term, mse_consistency)
from utils.mixing import paste, random_boxes
from utils.optim import autocast, build_optimisation, optimizer_step
from utils.plots import save_overlays
from utils.runtime import pick_device, seed_epoch, seed_everything, setup
from utils.teachers import (OwnStatistics, Renormalized, ema_update, freeze_encoder_stages,
                            largest_component_labels, run_length_alpha, sigmoid_rampup)

MODES = ("pseudo_label", "mean_teacher", "bcp")
LABELED_KEYS = ("image", "mask", "annotated", "certain_background")
SCHEDULES = ("joint", "pretrain_finetune")
CONSISTENCIES = ("mse", "hard")


# ==== the losses of the modes ====
def supervised(loss_sup, logits, source, ignore=None):
    """The supervised loss of `logits` against a labeled batch dict (partial labels aware)."""
    return loss_sup(logits, source["mask"], ignore=ignore, annotated=source["annotated"],
                    certain_background=source["certain_background"])


def labeled_and_pseudo(loss_sup, loss_stream, logits, batch_x):
    """The loss of a batch that may mix ground truth and pseudo-labels (`pseudo_labelled` [B]):
    ground-truth slices through the supervised, partial-label loss; pseudo-labelled ones, which
    are complete (255 where the teacher was unsure), through `loss_stream` (plain Dice + CE), so
    their 0-pixels teach background. Through the marginal Dice alone a 0-pixel says "background
    or unannotated" and a class absent from the slice gets no gradient: the teacher's sinks
    stayed sinks (docs/experiments.md, Teacher-student diagnosis at 100 steps)."""
    pseudo = batch_x.get("pseudo_labelled")
    if pseudo is None:
        return supervised(loss_sup, logits, batch_x)
    pseudo_pixels = pseudo.view(-1, 1, 1).expand_as(batch_x["mask"])
    labeled = {"mask": batch_x["mask"], "annotated": batch_x["annotated"] & ~pseudo[:, None],
               "certain_background": batch_x["certain_background"] & ~pseudo_pixels}
    return (supervised(loss_sup, logits, labeled, ignore=pseudo_pixels)
            + loss_stream(logits, batch_x["mask"], ~pseudo_pixels))


def edge_logs(loss_edge, cfg):
    return {"loss_edge": loss_edge} if cfg.edge_guided else {}


def consistency_loss(student, teacher, batch_x, batch_u, loss_sup, loss_stream, cfg, weight,
                     area_bounds=None):
    """pseudo_label and mean_teacher: `labeled_and_pseudo` on the labeled (+ pseudo-labelled) batch and
    `weight`· a consistency between the student on the strong view and the teacher on the weak
    view of the same unlabeled slices: `consistency: mse`, the squared difference of their
    softmax, summed over classes and averaged over pixels; `hard`, `loss_stream` against the
    teacher's argmax where its confidence is at least `conf_thresh` (with `area_bounds`,
    pseudo_area_filter, a class beyond its plausible area ignored). Returns (loss, logs)."""
    batch_u = strong_views(batch_u)  # the strong views, built on the device from the batch's draws
    with torch.no_grad():  # the teacher (kept in eval mode) gives targets, not predictions to train
        prob_u_w = teacher(batch_u["image_w"]).float().softmax(1)
    logits_x, edge_logits = forward_with_edges(student, batch_x["image"])
    # the strong views in a forward of their own, as UniMatch's: in one batch with the labeled
    # slices their perturbed intensities set the BatchNorm statistics the labeled slices were
    # normalised with, and the student fell 0.16 Dice behind supervised training even without
    # the consistency (docs/experiments.md, Mean Teacher: strong views in a forward of their own)
    logits_u_s = student(batch_u["image_s1"])
    loss_x = labeled_and_pseudo(loss_sup, loss_stream, logits_x, batch_x)
    conf_u_w, pseudo_u = prob_u_w.max(1)
    if cfg.consistency == "hard":  # the teacher's confident argmax, trained as UniMatch's streams
        pseudo_u = confident_pseudo_labels(conf_u_w, pseudo_u, cfg.conf_thresh, area_bounds)
        loss_u = loss_stream(logits_u_s, pseudo_u)
    else:  # summed over classes: the mean over 15-55 classes gave a gradient 27x weaker than
        # the supervised one (phantom, 100-step model), so the consistency barely acted
        loss_u = mse_consistency(logits_u_s.float().softmax(1), prob_u_w) * prob_u_w.shape[1]
    loss_edge = edge_term(edge_logits, batch_x["mask"], batch_x["certain_background"], cfg)
    loss = loss_x + weight * loss_u + loss_edge
    return loss, {"loss": loss, "loss_x": loss_x, "loss_u": loss_u, "consistency_weight": weight,
                  "conf_teacher": conf_u_w.mean(), **edge_logs(loss_edge, cfg)}


def bcp_loss(student, teachers, batch_x, batch_u, loss_sup, loss_stream, cfg, ratio, u_weight,
             area_bounds=None):
    """One BCP step; `teachers` = (dynamic EMA, static), or None in the pre-training phase.

    One box of side `ratio`·side per slice (uniform position, as the authors' code) marks the
    pasted region. Pre-training: each labeled slice around the box of the next one in the batch.
    Self-training: each unlabeled slice u around the box of the labeled slice x at its position,
    and x around the same box of u. Both directions use the whole batches, so every ground-truth
    pixel is trained once per step, as in supervised training (the authors pair halves of the
    batches, which trains half of them: docs/experiments.md, BCP: whole batches and pre-training
    share). Ground truth at weight 1, pseudo-labels at `u_weight` (the config's, ramped in after
    pre-training by the caller), pixels where the chosen teacher's confidence is under
    `conf_thresh` ignored. With `plain_weight` > 0 the labeled slices themselves are also
    trained, unmixed, at that weight: the authors train ground truth only inside mixes, and at a
    few hundred steps BCP trailed supervised training by far (docs/experiments.md, BCP
    plain-slices term).
    """
    logs = {}
    if teachers is None:
        partners = {key: batch_x[key].roll(-1, 0) for key in LABELED_KEYS}
        pairs = [(batch_x, partners)]
    else:
        img_u_w = batch_u["image_w"]
        pseudo, conf_u_w, from_static = dual_teacher_pseudo_labels(
            *teachers, img_u_w, largest_component=cfg.label_mode == "class")
        pseudo = confident_pseudo_labels(conf_u_w, pseudo, cfg.conf_thresh, area_bounds)
        # the rest is complete: each of their 0-pixels is (believed) background
        unlabeled = {"image": img_u_w, "mask": pseudo, "certain_background": pseudo != IGNORE_INDEX}
        pairs = [(unlabeled, batch_x), (batch_x, unlabeled)]
        logs = {"conf_teacher": conf_u_w.mean(), "static_share": from_static.float().mean(),
                "pseudo_ignored": (pseudo == IGNORE_INDEX).float().mean()}
    num_x, (height, width) = len(batch_x["image"]), batch_x["image"].shape[-2:]
    box = random_boxes(num_x, height, width, 1.0, (ratio * ratio,) * 2, (width / height,) * 2,
                       batch_x["image"].device)
    mixes = [paste(outer["image"], inner["image"], box) for outer, inner in pairs]
    # `plain_weight`: the labeled slices themselves too, first in the same forward
    plain = [batch_x["image"]] if cfg.plain_weight else []
    num_plain = num_x if plain else 0
    logits, edge_logits = forward_with_edges(student, torch.cat(plain + mixes))
    loss_plain = supervised(loss_sup, logits[:num_plain], batch_x) if num_plain else 0
    logits, edge_logits = logits[num_plain:], None if edge_logits is None else edge_logits[num_plain:]
    loss_x = loss_u = 0
    for logits_mix, (outer, inner) in zip(logits.chunk(len(pairs)), pairs):
        for source, ignore in ((outer, box), (inner, ~box)):
            if "annotated" in source:
                loss_x = loss_x + supervised(loss_sup, logits_mix, source, ignore)
            else:
                loss_u = loss_u + loss_stream(logits_mix, source["mask"], ignore)
    mixed = {key: torch.cat([paste(outer[key], inner[key], box) for outer, inner in pairs])
             for key in ("mask", "certain_background")}
    loss_edge = edge_term(edge_logits, mixed["mask"], mixed["certain_background"], cfg)
    loss = loss_x + cfg.plain_weight * loss_plain + u_weight * loss_u + loss_edge
    plain_logs = {"loss_plain": loss_plain} if num_plain else {}
    return loss, {"loss": loss, "loss_x": loss_x, "loss_u": loss_u, "mask_ratio": ratio, **logs,
                  **plain_logs, **edge_logs(loss_edge, cfg)}


# ==== the training steps: each mode's whole step, schedule and teacher updates included ====
# `m` holds the run's parts (student, teacher, static_teacher, loss_sup, loss_stream, optimizer,
# scaler, device, and train_forward: the student's loss computation, through DDP under torchrun);
# `it` the position: epoch, iteration (steps before this one), per_epoch, total.
def rampup(cfg, it, start_epoch=0):
    """exp(−5(1−t)²) with t = epochs done since `start_epoch` / `rampup_epochs` (Laine & Aila
    2017); 1 with `rampup_epochs` 0."""
    if cfg.rampup_epochs <= 0:
        return 1.0
    return sigmoid_rampup((it.iteration / it.per_epoch - start_epoch) / cfg.rampup_epochs)


def ramped_consistency_weight(cfg, it):
    return cfg.w_consistency * rampup(cfg, it)


def ema_alpha(cfg, it):
    """`ema_alpha`, or (0) the decay sized to the run's length (see `run_length_alpha`)."""
    return cfg.ema_alpha or run_length_alpha(it.total)


def pseudo_label_step(m, batch_x, batch_u, it, cfg):
    """Supervised loss on labeled + pseudo-labelled slices, ramped MSE to the fixed teacher."""
    with autocast(m.device, cfg):
        loss, logs = m.train_forward(consistency_loss, m.teacher, batch_x, batch_u, m.loss_sup,
                                     m.loss_stream, cfg, ramped_consistency_weight(cfg, it),
                                     m.pseudo_area_bounds)
    optimizer_step(loss, m.optimizer, m.scaler, cfg)
    return logs


def mean_teacher_step(m, batch_x, batch_u, it, cfg):
    """Supervised loss, ramped MSE to the EMA teacher, then the teacher follows the student."""
    with autocast(m.device, cfg):
        loss, logs = m.train_forward(consistency_loss, m.teacher, batch_x, batch_u, m.loss_sup,
                                     m.loss_stream, cfg, ramped_consistency_weight(cfg, it),
                                     m.pseudo_area_bounds)
    optimizer_step(loss, m.optimizer, m.scaler, cfg)
    ema_update(m.teacher, m.student, ema_alpha(cfg, it), it.iteration)
    return logs


def bcp_step(m, batch_x, batch_u, it, cfg):
    """Labeled copy-paste for the first `m.pretrain_epochs` (`pretrain_share` of the run), then
    bidirectional copy-paste with the dual teacher: the static teacher takes the student's
    weights every `static_every` steps of self-training, the box side follows
    `mask_ratio_schedule`, the EMA teacher follows the student from the start (it is the
    validated model)."""
    self_training = it.epoch >= m.pretrain_epochs
    self_training_steps = it.iteration - m.pretrain_epochs * it.per_epoch
    if self_training and self_training_steps % cfg.static_every == 0:
        m.static_teacher.load_state_dict(m.student.state_dict())
        distributed.sync_buffers(m.static_teacher)  # per-process BatchNorm (CPU): rank 0's statistics
    start, end = cfg.mask_ratio_schedule
    ratio = start + (end - start) * it.iteration / max(it.total - 1, 1)
    with autocast(m.device, cfg):
        # the pseudo-labelled regions ramp in like the consistency: a teacher fresh from a short
        # pre-training labels most organs as confident background (docs/experiments.md,
        # Teacher-student diagnosis at 100 steps)
        u_weight = cfg.u_weight * rampup(cfg, it, m.pretrain_epochs)
        loss, logs = m.train_forward(bcp_loss, (m.teacher, m.static_teacher) if self_training
                                     else None, batch_x, batch_u, m.loss_sup, m.loss_stream,
                                     cfg, ratio, u_weight, m.pseudo_area_bounds)
    optimizer_step(loss, m.optimizer, m.scaler, cfg)
    if not self_training:  # no target forward yet: without this pass the EMA teacher's own
        with torch.no_grad(), autocast(m.device, cfg):  # BatchNorm statistics stayed at their initial
            m.teacher(batch_x["image"])  # values all along pre-training: it predicted organs everywhere
    ema_update(m.teacher, m.student, ema_alpha(cfg, it), it.iteration)  # (rank 0's statistics kept)
    return logs


TRAIN_STEPS = {"pseudo_label": pseudo_label_step, "mean_teacher": mean_teacher_step,
               "bcp": bcp_step}


@torch.no_grad()
def dual_teacher_pseudo_labels(dynamic, static, images, largest_component=True):
    """Per pixel the argmax of the more confident teacher (ties: the dynamic one), then, with
    `largest_component`, each class's largest component (not in instance mode: its interior
    class holds every structure, so this would keep one structure). images [B, C, H, W] ->
    (pseudo int64 [B, H, W], IGNORE_INDEX off the largest components; confidence [B, H, W];
    from_static bool [B, H, W])."""
    conf_dynamic, label_dynamic = dynamic(images).float().softmax(1).max(1)
    conf_static, label_static = static(images).float().softmax(1).max(1)
    from_static = conf_static > conf_dynamic
    labels = torch.where(from_static, label_static, label_dynamic)
    if largest_component:
        labels = largest_component_labels(labels)
    return labels, torch.maximum(conf_dynamic, conf_static), from_static


# ==== pseudo_label: teacher and pseudo-label set ====
def score_pseudo_labels(labels, confidence, conf_thresh):
    """Score teacher predictions, slice by slice (so that processes can share the pool).

    labels (M, H, W) uint8 and confidence (M, H, W) float (max softmax). Score of a slice: mean
    confidence over its predicted foreground (labels > 0); 0 with no foreground (nothing to learn).
    Returns (scores (M,); masks (M, H, W) uint8, IGNORE_INDEX where confidence < conf_thresh).
    """
    foreground = labels > 0
    counts = foreground.sum((1, 2))
    scores = np.where(counts > 0, (confidence * foreground).sum((1, 2)) / np.maximum(counts, 1), 0)
    masks = np.where(confidence < conf_thresh, IGNORE_INDEX, labels).astype(np.uint8)
    return scores, masks


def pseudo_label_count(cfg, pool_size):
    """Unlabeled slices to keep: `n_pseudo`, or (0) the best `pseudo_share` of the pool; at least
    one, at most the pool."""
    wanted = cfg.n_pseudo or round(cfg.pseudo_share * pool_size)
    return min(max(wanted, 1), pool_size)


class SourceTagged(Dataset):
    """`dataset`'s items with `pseudo_labelled` = `flag` added, so that a batch of the joint set
    says which of its slices carry (complete) pseudo-labels (`labeled_and_pseudo`)."""

    def __init__(self, dataset, flag):
        self.dataset, self.flag = dataset, torch.tensor(flag)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        return {**self.dataset[item], "pseudo_labelled": self.flag}


def concatenated(batches):
    """Batch dicts with the same keys -> one batch dict, their tensors concatenated in order."""
    return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}


def prepare_teacher(cfg, device):
    """The pseudo_label teacher: `teacher_ckpt`, or else a train_supervised.py run with this run's
    shared keys (data, split, model, loss …) in <run>/teacher/, reused on --resume.
    Returns (teacher in eval mode, checkpoint path, weights name, the checkpoint's data facts)."""
    path = Path(cfg.teacher_ckpt or Path(cfg.out_dir) / "teacher" / "best.pth")
    if not cfg.teacher_ckpt and not (cfg.resume and path.is_file()):
        supervised_keys = read_yaml_chain(CONFIG_DIR / "supervised.yaml")[0]
        teacher_cfg = Config({key: cfg[key] for key in supervised_keys})
        teacher_cfg.update(epochs=cfg.teacher_epochs or cfg.epochs, out_dir=str(path.parent),
                           resume="")
        print(f"==== teacher: train_supervised.py on the labeled split, in {path.parent}/ ====")
        train_supervised.train(teacher_cfg)
    state = load_checkpoint(path, map_location=device)
    weights = "teacher" if state.get("teacher") is not None else "model"
    teacher = model_from_checkpoint(state, weights, path).to(device).eval().requires_grad_(False)
    if state["data"]["num_classes"] != cfg.num_classes:
        raise InputError(f"{path}: the teacher predicts {state['data']['num_classes']} classes, "
                         f"this run has {cfg.num_classes}")
    teacher_mode = state["config"].get("label_mode", "class")
    if teacher_mode != cfg.label_mode:
        raise InputError(f"{path}: the teacher was trained in label_mode {teacher_mode}, this "
                         f"run has {cfg.label_mode}")
    print(f"Teacher: {path} ({weights} weights)")
    return teacher, path, weights, state["data"]


def pseudo_label_set(teacher, facts, data, pool_images, pool_indices, n_keep, cfg, out_dir, device,
                     area_bounds=None):
    """Label the unlabeled pool, keep the best `n_keep` slices and save them in
    `out_dir`: masks.npy (n, H, W) uint8 (255 = ignored), scores.json, one overlay PNG per kept
    slice; with `area_bounds (C,)` (pseudo_area_filter) a class covering more of a slice than
    its bound is ignored there. Returns (arrays for LabeledSlices, logs: mean kept score,
    count, ignored-pixel share). In instance mode the masks are the teacher's structure ids (the
    watershed of validation and test.py; its seeds are the confident interiors), read like
    labeled masks, so nothing is ignored (255 is an id there) and `conf_thresh` does not apply.
    Under torchrun each process labels its share of the pool and all of them gather the rest;
    rank 0 writes the files."""
    images = np.asarray(pool_images[pool_indices])
    share = np.array_split(np.arange(len(images)), distributed.world_size())[distributed.rank()]
    labels, confidence = predict_slices(
        teacher, images[share], facts["img_size"], facts["normalize"], device,
        cfg.eval_batch_size, cfg.tta, with_confidence=True, progress=lambda it: tqdm(
            it, "pseudo-labels", leave=False, disable=None if distributed.is_main() else True),
        label_mode=cfg.label_mode)
    conf_thresh = cfg.conf_thresh if cfg.label_mode == "class" else 0  # 0: no pixel under it
    shares = distributed.all_gather_object(score_pseudo_labels(labels, confidence, conf_thresh))
    scores, masks = (np.concatenate(parts) for parts in zip(*shares))
    order = np.argsort(-scores, kind="stable")  # best first, ties by index
    masks = masks[order[:n_keep]]
    if area_bounds is not None:
        masks = drop_oversized_pseudo_labels(torch.from_numpy(masks), area_bounds.cpu()).numpy()
    ignored = masks == IGNORE_INDEX if cfg.label_mode == "class" else np.zeros(masks.shape, bool)
    names = list(data.train_names) + [f"test_{name}" for name in data.test_names]
    kept_names = [names[pool_indices[i]] for i in order[:n_keep]]
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        np.save(out_dir / "masks.npy", masks)
        ranking = [{"rank": rank, "name": names[pool_indices[i]], "score": float(scores[i]),
                    "kept": rank < n_keep} for rank, i in enumerate(order)]
        (out_dir / "scores.json").write_text(json.dumps(
            {"conf_thresh": cfg.conf_thresh, "kept": n_keep, "slices": ranking}, indent=1))
        shown = np.where(ignored, 0, masks)
        save_overlays(out_dir / "png", kept_names, images[order[:n_keep]], shown,
                      colour_count(data, shown))
    logs = {"conf_pseudo": float(scores[order[:n_keep]].mean()), "pseudo_kept": n_keep,
            "pseudo_ignored": float(ignored.mean())}
    print(f"Pseudo-labels: kept {n_keep} of {len(images)} unlabeled slices, scores "
          f"{scores[order[n_keep - 1]]:.3f}–{scores[order[0]]:.3f} (mean "
          f"{logs['conf_pseudo']:.3f}); {logs['pseudo_ignored']:.1%} of their pixels under "
          f"conf_thresh ignored; in {out_dir}/")
    arrays = SimpleNamespace(train_images=images[order[:n_keep]], train_masks=masks,
                             annotated=np.ones((n_keep, data.num_classes), bool))  # complete
    return arrays, logs


def continue_teacher_optimizer(optimizer, path, weights):
    """A student that starts from a teacher's weights also takes the AdamW moments (and step
    counts) its teacher ended with, the learning rate and the other settings staying this run's:
    a fresh AdamW's first steps at the full rate knocked row P's validation Dice from 0.25 to
    0.06 (docs/experiments.md, Teacher-student diagnosis at 100 steps). Only for the checkpoint's own student weights
    ("model") and the same trainable parameters; returns whether the moments were taken."""
    saved = load_checkpoint(path).get("optimizer") if weights == "model" else None
    current = optimizer.state_dict()
    if saved is None or [len(g["params"]) for g in saved["param_groups"]] != [
            len(g["params"]) for g in current["param_groups"]]:
        return False
    groups = [{**group, "params": old["params"]}
              for group, old in zip(current["param_groups"], saved["param_groups"])]
    optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})
    return True


# ==== options ====
def pretrain_epoch_count(cfg):
    """Epochs of the first phase (BCP's labeled copy-paste, or the pseudo-labels of
    `pretrain_finetune`): `pretrain_share` of the run's epochs, rounded."""
    return round(cfg.pretrain_share * cfg.epochs)


def check_options(cfg):
    if cfg.mode not in MODES:
        raise InputError(f"mode: unknown '{cfg.mode}' (choose {', '.join(MODES)})")
    if cfg.schedule not in SCHEDULES:
        raise InputError(f"schedule: unknown '{cfg.schedule}' (choose {', '.join(SCHEDULES)})")
    if cfg.consistency not in CONSISTENCIES:
        raise InputError(f"consistency: unknown '{cfg.consistency}' (choose {', '.join(CONSISTENCIES)})")
    if cfg.tta not in TTA_MODES:
        raise InputError(f"tta: unknown '{cfg.tta}' (choose {', '.join(TTA_MODES)})")
    two_phases = cfg.mode == "bcp" or (cfg.mode == "pseudo_label"
                                       and cfg.schedule == "pretrain_finetune")
    if not 0 <= cfg.pretrain_share < 1:
        raise InputError(f"pretrain_share: {cfg.pretrain_share} is not a share in [0, 1)")
    if two_phases and pretrain_epoch_count(cfg) >= cfg.epochs:
        raise InputError(f"pretrain_share: {cfg.pretrain_share} of {cfg.epochs} epochs leaves no "
                         "epoch for the second phase")
    if not 0 < cfg.pseudo_share <= 1:
        raise InputError(f"pseudo_share: {cfg.pseudo_share} is not a share in (0, 1]")
    if cfg.n_pseudo < 0:
        raise InputError(f"n_pseudo: {cfg.n_pseudo} is negative")
    if not 0 <= cfg.ema_alpha < 1:
        raise InputError(f"ema_alpha: {cfg.ema_alpha} is not a decay in [0, 1) (0 = sized to the run)")
    if cfg.mode == "bcp":
        if cfg.batch_size_unlabeled not in (0, cfg.batch_size):
            raise InputError(f"batch_size_unlabeled: BCP pairs each unlabeled slice with a labeled "
                             f"one, so it must be 0 or batch_size ({cfg.batch_size}), not "
                             f"{cfg.batch_size_unlabeled}")
        if len(cfg.mask_ratio_schedule) != 2 or not all(0 < r < 1 for r in cfg.mask_ratio_schedule):
            raise InputError(f"mask_ratio_schedule: {cfg.mask_ratio_schedule} is not [start, end] "
                             "with both between 0 and 1")
        if cfg.static_every < 1:
            raise InputError(f"static_every: {cfg.static_every} is not a positive iteration count")


def main(argv=None):
    # ==== config, device, data ====
    cfg = setup("teacher_student", argv, __doc__)
    check_options(cfg)
    device = pick_device(cfg.gpu)
    data, split, norm = load_data(cfg)
    labeled_set, unlabeled_set, batch_size_u = semi_supervised_sets(cfg, data, split, norm)
    pool_images, pool_indices = unlabeled_set.images, unlabeled_set.indices
    # The teacher and the pseudo-labels live inside the run directory, so fix it now.
    cfg.out_dir = str(run_directory(cfg, cfg.mode))

    # ==== pseudo_label: teacher, pseudo-labels, and the training set of each phase ====
    phase_streams, iterations = ((labeled_set,),) * 2, None  # the labeled batches of each phase
    teacher = teacher_path = teacher_weights = None
    pseudo_logs = {}
    area_bounds, annotation_frequency = labeled_priors(cfg, data, split, device)
    pseudo_area_bounds = area_bounds if cfg.pseudo_area_filter else None
    if cfg.mode == "pseudo_label":
        teacher, teacher_path, teacher_weights, facts = prepare_teacher(cfg, device)
        n_keep = pseudo_label_count(cfg, len(pool_indices))
        arrays, pseudo_logs = pseudo_label_set(
            teacher, facts, data, pool_images, pool_indices, n_keep, cfg,
            Path(cfg.out_dir) / "pseudo_labels", device, pseudo_area_bounds)
        pseudo_set = LabeledSlices(arrays, np.arange(n_keep), cfg.img_size, norm,
                                   augment=labeled_set.augment, air_threshold=cfg.air_threshold)
        pseudo_set, tagged_labeled = SourceTagged(pseudo_set, True), SourceTagged(labeled_set, False)
        # joint: a whole labeled batch and as many pseudo-labelled slices on top, so the student
        # trains on as much ground truth per step as supervised training (docs/experiments.md,
        # pseudo_label: a whole labeled batch every step)
        phase_streams = (((tagged_labeled, pseudo_set),) * 2 if cfg.schedule == "joint"
                         else ((pseudo_set,), (tagged_labeled,)))
        iterations = iterations_per_epoch(cfg, len(labeled_set), cfg.batch_size)  # as supervised
        if facts["normalize"] != norm:
            teacher = Renormalized(teacher, norm, facts["normalize"])
    iterations = iterations or iterations_per_epoch(cfg, len(unlabeled_set), batch_size_u)
    seed_everything(cfg.seed, cfg.deterministic)

    # ==== student, teachers, losses, optimiser ====
    student, model_name, model_kwargs = build_network(cfg, data, device)  # + init_ckpt
    if cfg.init_student_from_teacher and teacher_path and not cfg.resume:
        load_init_weights(student, teacher_path, model_name, model_kwargs, teacher_weights)
    freeze_encoder_stages(student, cfg.freeze_encoder_stages)
    modules, static_teacher = {"model": student}, None
    if cfg.mode != "pseudo_label":
        teacher = modules["teacher"] = copy.deepcopy(student).eval().requires_grad_(False)
    if cfg.mode == "bcp":
        static_teacher = modules["static_teacher"] = copy.deepcopy(teacher)
    loss_sup = build_loss(cfg, area_bounds, annotation_frequency).to(device)
    loss_stream = build_stream_loss(cfg.stream_loss, cfg)
    total_iterations = cfg.epochs * iterations
    optimizer, scheduler, scaler = build_optimisation(
        cfg, [p for p in student.parameters() if p.requires_grad], total_iterations, device)
    if cfg.init_student_from_teacher and teacher_path and not cfg.resume:
        continue_teacher_optimizer(optimizer, teacher_path, teacher_weights)
    run = TrainingRun(cfg, cfg.mode, model_name, model_kwargs,
                      {**modules, "loss": loss_sup, "optimizer": optimizer, "scheduler": scheduler,
                       "scaler": scaler}, data, split, norm, device,
                      validate_weights="model" if cfg.mode == "pseudo_label" else "teacher")

    if cfg.mode != "pseudo_label":  # the EMA teacher tracks its own BatchNorm statistics
        teacher = OwnStatistics(teacher)
    parts = SimpleNamespace(student=student, teacher=teacher, static_teacher=static_teacher,
                            loss_sup=loss_sup, loss_stream=loss_stream, optimizer=optimizer,
                            scaler=scaler, device=device, pseudo_area_bounds=pseudo_area_bounds,
                            train_forward=data_parallel(student, device),  # after freezing
                            pretrain_epochs=pretrain_epoch_count(cfg))
    train_step = TRAIN_STEPS[cfg.mode]

    # ==== loop: an epoch is `iterations` steps ====
    for epoch in range(run.start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, epoch)  # exact resume: an epoch depends only on (seed, epoch)
        student.train()
        streams = phase_streams[int(epoch >= parts.pretrain_epochs)]
        loaders = zip(epoch_loader(unlabeled_set, cfg, epoch, iterations, batch_size_u, stream=1),
                      *(epoch_loader(dataset, cfg, epoch, iterations, cfg.batch_size, stream=stream)
                        for dataset, stream in zip(streams, (0, 2))))
        for batch_u, *batches_x in run.steps(loaders, iterations, epoch):
            # instance mode: 3-class targets of the ids
            batch_x = supervised_targets(concatenated(batches_x), cfg)
            position = SimpleNamespace(epoch=epoch, iteration=run.iteration,
                                       per_epoch=iterations, total=total_iterations)
            logs = train_step(parts, batch_x, batch_u, position, cfg)
            if cfg.scheduler == "poly":
                scheduler.step()
            run.record({**logs, **pseudo_logs})
        scores = run.validate(epoch)
        if scores is not None:
            loss_sup.update_kappa(scores["per_class_dice"])  # t-vMF Dice: κ from validation Dice
            if cfg.scheduler == "plateau":
                scheduler.step(scores[f"val_{cfg.select_metric}"])
            run.checkpoint(epoch, scores)
        if run.stopped:
            break
    run.finish()


if __name__ == "__main__":
    run_cli(main)
