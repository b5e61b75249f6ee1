r"""Teacher–student training: pseudo-labelling, Mean Teacher and BCP.

    python train_teacher_student.py --mode pseudo_label --num_labeled 8   # teacher, labels, student
    python train_teacher_student.py --mode pseudo_label --teacher_ckpt runs/sup/best.pth \
        --schedule pretrain_finetune
    python train_teacher_student.py --mode mean_teacher --init_ckpt runs/sup/best.pth \
        --freeze_encoder_stages 2
    python train_teacher_student.py --mode bcp --edge_guided true
    python train_teacher_student.py --resume runs/latest/last.pth --epochs 60   # continue, longer
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
The EMA decay `ema_alpha` is 0.95 (the teacher averages about the last 20 steps); 0 sizes it to the
run, so that the teacher averages its last fifth.

Naming: `img_x`/`mask_x` labeled; `img_u_w`/`img_u_s1` weak/strong view of an unlabeled slice (same
geometry); `conf_u_w` a teacher's confidence. Partial labels in BCP: each region of a mixed
slice is scored with the labels of the slice it came from — ground truth with that slice's
`annotated` classes and certain background (the marginal loss), or complete pseudo-labels at
`u_weight` — so an organ left unannotated on one slice is never read as background inside
another's region.
mean_teacher and bcp start from a supervised run trained first in <run>/warm_start/
(`warm_start`; the teachers are copies of the student), as UniMatch does.
Checkpoints: pseudo_label keeps the student; mean_teacher and bcp also the EMA `teacher`.
`eval_weights` says which of the two validation scores (picking best.pth) and test.py uses: the
student by default, since at short budgets the EMA trails a student that still improves.
"""
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset
from tqdm import tqdm

import train_supervised
from dataloaders.datasets import LabeledSlices, strong_views
from networks.edge import forward_with_edges
from utils.builders import (build_network, epoch_loader, iterations_per_epoch, labeled_priors,
                            load_data, load_init_weights, semi_supervised_sets, supervised_targets)
from utils import distributed
from utils.checkpoint import evaluated_weights, load_checkpoint, model_from_checkpoint
from utils.engine import TrainingRun, colour_count, run_directory
from utils.distributed import data_parallel
from utils.errors import InputError, run_cli
from utils.inference import predict_slices
from utils.losses import IGNORE_INDEX, build_loss, build_stream_loss, mse_consistency
from utils.mixing import paste, random_boxes
from utils.optim import autocast, build_optimisation, optimizer_step
from utils.plots import save_overlays
from utils.priors import confident_pseudo_labels, drop_oversized_pseudo_labels, teacher_probabilities
from utils.runtime import pick_device, seed_epoch, seed_everything, setup
from utils.teachers import (OwnStatistics, Position, Renormalized, TeacherStudentParts,
                            dual_teacher_pseudo_labels, ema_alpha, ema_update, freeze_encoder_stages,
                            pretrain_epoch_count, rampup)

LABELED_KEYS = ("image", "mask", "annotated", "certain_background")


# ==== the ground-truth losses of a step ====
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


# ==== the training steps: each mode's whole step, schedule and teacher updates included ====
# `parts` (utils.teachers.TeacherStudentParts): the networks, losses and optimiser; `at`
# (utils.teachers.Position): the step's place in the run. The forwards of the student run in the
# step's nested `losses(student)`, handed to `parts.train_forward` (DDP under torchrun).
def pseudo_label_step(parts: TeacherStudentParts, batch_x, batch_u, at: Position, cfg):
    """pseudo_label (and mean_teacher's loss, with the EMA teacher): `labeled_and_pseudo` on the
    labeled (+ pseudo-labelled) batch, plus `w_consistency` (ramped up) × a consistency between
    the student on the strong view and the teacher on the weak view of the same unlabeled
    slices: `consistency: mse`, the squared difference of their softmax, summed over classes and
    averaged over pixels; `hard`, `loss_stream` against the teacher's argmax where its
    confidence is at least `conf_thresh` (with pseudo_area_filter, a class beyond its plausible
    area ignored). Returns the step's logs."""
    weight = cfg.w_consistency * rampup(cfg, at)

    def losses(student):
        strong = strong_views(batch_u)  # the strong views, built on the device from the batch's draws
        with torch.no_grad():  # the teacher (kept in eval mode) gives targets, not predictions to train
            prob_u_w = teacher_probabilities(parts.teacher(strong["image_w"]), cfg.pseudo_background_scale)
        logits_x, edge_logits = forward_with_edges(student, batch_x["image"])
        # the strong views in a forward of their own, as UniMatch's: in one batch with the labeled
        # slices their perturbed intensities set the BatchNorm statistics the labeled slices were
        # normalised with, and the student fell 0.16 Dice behind supervised training even without
        # the consistency (docs/experiments.md, Mean Teacher: strong views in a forward of their own)
        logits_u_s = student(strong["image_s1"])
        loss_x = labeled_and_pseudo(parts.loss_sup, parts.loss_stream, logits_x, batch_x)
        conf_u_w, pseudo_u = prob_u_w.max(1)
        if cfg.consistency == "hard":  # the teacher's confident argmax, trained as UniMatch's streams
            pseudo_u = confident_pseudo_labels(conf_u_w, pseudo_u, cfg.conf_thresh, parts.pseudo_area_bounds)
            loss_u = parts.loss_stream(logits_u_s, pseudo_u)
        else:  # summed over classes: the mean over 15-55 classes gave a gradient 27x weaker than
            # the supervised one (phantom, 100-step model), so the consistency barely acted; at
            # w_consistency 1 the sum outweighed the labels on real CT, hence its default 0.1
            loss_u = mse_consistency(logits_u_s.float().softmax(1), prob_u_w) * prob_u_w.shape[1]
        edge = ({"loss_edge": parts.loss_sup.edge_term(edge_logits, batch_x["mask"], batch_x["certain_background"])}
                if cfg.edge_guided else {})
        loss = loss_x + weight * loss_u + sum(edge.values())
        return loss, {"loss": loss, "loss_x": loss_x, "loss_u": loss_u, "consistency_weight": weight,
                      "conf_teacher": conf_u_w.mean(), **edge}

    with autocast(parts.device, cfg):
        loss, logs = parts.train_forward(losses)
    optimizer_step(loss, parts.optimizer, parts.scaler, cfg)
    return logs


def mean_teacher_step(parts: TeacherStudentParts, batch_x, batch_u, at: Position, cfg):
    """Mean Teacher: `pseudo_label_step`'s loss and update against the EMA teacher, which then
    follows the student (`ema_update`)."""
    logs = pseudo_label_step(parts, batch_x, batch_u, at, cfg)
    ema_update(parts.teacher, parts.student, ema_alpha(cfg, at), at.iteration)
    return logs


def bcp_step(parts: TeacherStudentParts, batch_x, batch_u, at: Position, cfg):
    """BCP: labeled copy-paste for the first `parts.pretrain_epochs`, then bidirectional
    copy-paste with the dual teacher's pseudo-labels (EMA, and static: the student's copy every
    `static_every` steps) at `u_weight`; the EMA teacher, validated, follows the student from the
    start. One box a slice (side `ratio`·side, uniform position, as the authors' code), whole
    batches both ways: every ground-truth pixel once a step (the authors pair halves:
    docs/experiments.md, BCP: whole batches and pre-training share); `plain_weight`: unmixed too."""
    self_training = at.epoch >= parts.pretrain_epochs
    if self_training and (at.iteration - parts.pretrain_epochs * at.per_epoch) % cfg.static_every == 0:
        parts.static_teacher.load_state_dict(parts.student.state_dict())
        distributed.sync_buffers(parts.static_teacher)  # per-process BatchNorm (CPU): rank 0's statistics
    start, end = cfg.mask_ratio_schedule
    ratio = start + (end - start) * at.iteration / max(at.total - 1, 1)
    # pseudo-labels ramp in: a teacher fresh from a short pre-training labels most organs as
    # confident background (docs/experiments.md, Teacher-student diagnosis at 100 steps)
    u_weight = cfg.u_weight * rampup(cfg, at, parts.pretrain_epochs)

    def losses(student):
        logs, num_x, (height, width) = {}, len(batch_x["image"]), batch_x["image"].shape[-2:]
        if not self_training:  # (outer, inner) pairs: each labeled slice around the next one's box
            pairs = [(batch_x, {key: batch_x[key].roll(-1, 0) for key in LABELED_KEYS})]
        else:
            pseudo, conf_u_w, from_static = dual_teacher_pseudo_labels(
                parts.teacher, parts.static_teacher, batch_u["image_w"],
                largest_component=cfg.label_mode == "class", background_scale=cfg.pseudo_background_scale)
            pseudo = confident_pseudo_labels(conf_u_w, pseudo, cfg.conf_thresh, parts.pseudo_area_bounds)
            # complete labels: each of their 0-pixels is (believed) background
            unlabeled = {"image": batch_u["image_w"], "mask": pseudo, "certain_background": pseudo != IGNORE_INDEX}
            pairs = [(unlabeled, batch_x), (batch_x, unlabeled)]  # u around x's box, x around u's
            logs = {"conf_teacher": conf_u_w.mean(), "static_share": from_static.float().mean(),
                    "pseudo_ignored": (pseudo == IGNORE_INDEX).float().mean()}
        box = random_boxes(num_x, height, width, 1.0, (ratio * ratio,) * 2, (width / height,) * 2,
                           batch_x["image"].device)

        def mixed(key):  # the pairs' `key` maps: inner pasted into outer in the box
            return [paste(outer[key], inner[key], box) for outer, inner in pairs]
        plain = [batch_x["image"]] if cfg.plain_weight else []  # the labeled slices themselves first, unmixed
        num_plain = num_x if plain else 0
        logits, edge_logits = forward_with_edges(student, torch.cat(plain + mixed("image")))
        loss_plain = supervised(parts.loss_sup, logits[:num_plain], batch_x) if num_plain else 0
        logits, edge_logits = logits[num_plain:], None if edge_logits is None else edge_logits[num_plain:]
        loss_x = loss_u = 0
        for logits_mix, (outer, inner) in zip(logits.chunk(len(pairs)), pairs):
            for source, ignore in ((outer, box), (inner, ~box)):
                if "annotated" in source:
                    loss_x = loss_x + supervised(parts.loss_sup, logits_mix, source, ignore)
                else:
                    loss_u = loss_u + parts.loss_stream(logits_mix, source["mask"], ignore)
        edge = ({"loss_edge": parts.loss_sup.edge_term(edge_logits, torch.cat(mixed("mask")),
                                                        torch.cat(mixed("certain_background")))}
                if cfg.edge_guided else {})
        loss = loss_x + cfg.plain_weight * loss_plain + u_weight * loss_u + sum(edge.values())
        return loss, {"loss": loss, "loss_x": loss_x, "loss_u": loss_u, "mask_ratio": ratio, **logs,
                      **({"loss_plain": loss_plain} if num_plain else {}), **edge}

    with autocast(parts.device, cfg):
        loss, logs = parts.train_forward(losses)
    optimizer_step(loss, parts.optimizer, parts.scaler, cfg)
    if not self_training:  # no target forward yet: without this pass the EMA teacher's own
        with torch.no_grad(), autocast(parts.device, cfg):  # BatchNorm statistics stayed at their initial
            parts.teacher(batch_x["image"])  # values all along pre-training: it predicted organs everywhere
    ema_update(parts.teacher, parts.student, ema_alpha(cfg, at), at.iteration)  # (rank 0's statistics kept)
    return logs


STEPS = {"pseudo_label": pseudo_label_step, "mean_teacher": mean_teacher_step, "bcp": bcp_step}


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
    path = Path(cfg.teacher_ckpt) if cfg.teacher_ckpt else train_supervised.train_first(
        cfg, Path(cfg.out_dir) / "teacher", cfg.teacher_epochs or cfg.epochs, "teacher")
    state = load_checkpoint(path, map_location=device)
    weights = evaluated_weights(state["config"], state.get("teacher") is not None)
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
        label_mode=cfg.label_mode, background_scale=cfg.pseudo_background_scale)
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


# ==== the run's sets and parts ====
@dataclass
class FixedTeacher:
    """pseudo_label's teacher: the network (eval mode, fed this run's normalisation), its
    checkpoint and which of its weights ("model" or "teacher")."""
    model: nn.Module
    path: Path
    weights: str


@dataclass
class TrainingSets:
    """What the steps draw: an unlabeled batch and a batch of each labeled set of the phase
    (`phases`: before and after `pretrain_epoch_count`), `iterations` steps an epoch."""
    unlabeled: Dataset
    batch_size_u: int
    phases: tuple                       # (the first phase's labeled sets, the second phase's)
    iterations: int
    teacher: FixedTeacher | None = None                 # pseudo_label
    pseudo_logs: dict = field(default_factory=dict)     # pseudo_label: logged with every step

    def loaders(self, cfg, epoch, second_phase):
        """The epoch's steps: (unlabeled batch, labeled batch of each set of the phase)."""
        labeled_sets = self.phases[int(second_phase)]
        return zip(epoch_loader(self.unlabeled, cfg, epoch, self.iterations, self.batch_size_u, stream=1),
                   *(epoch_loader(dataset, cfg, epoch, self.iterations, cfg.batch_size, stream=stream)
                     for dataset, stream in zip(labeled_sets, (0, 2))))


def training_sets(cfg, data, norm, device, labeled_set, unlabeled_set, batch_size_u, pseudo_area_bounds):
    """The sets the steps draw from. mean_teacher, bcp: the labeled set in both phases, an epoch
    a pass over the unlabeled slices. pseudo_label: the teacher (`prepare_teacher`) labels the
    unlabeled pool (`pseudo_label_set`), an epoch is a pass over the labeled slices as in
    train_supervised.py; `joint`: a whole labeled batch and as many pseudo-labelled slices on top
    every step, so the student trains on as much ground truth per step as supervised training
    (docs/experiments.md, pseudo_label: a whole labeled batch every step); `pretrain_finetune`:
    the pseudo-labelled set, then the labeled one."""
    if cfg.mode != "pseudo_label":
        return TrainingSets(unlabeled_set, batch_size_u, ((labeled_set,),) * 2,
                            iterations_per_epoch(cfg, len(unlabeled_set), batch_size_u))
    model, path, weights, facts = prepare_teacher(cfg, device)
    pool_images, pool_indices = unlabeled_set.images, unlabeled_set.indices
    n_keep = pseudo_label_count(cfg, len(pool_indices))
    arrays, pseudo_logs = pseudo_label_set(model, facts, data, pool_images, pool_indices, n_keep, cfg,
                                           Path(cfg.out_dir) / "pseudo_labels", device, pseudo_area_bounds)
    pseudo_set = LabeledSlices(arrays, np.arange(n_keep), cfg.img_size, norm,
                               augment=labeled_set.augment, air_threshold=cfg.air_threshold)
    pseudo_set, tagged_labeled = SourceTagged(pseudo_set, True), SourceTagged(labeled_set, False)
    phases = (((tagged_labeled, pseudo_set),) * 2 if cfg.schedule == "joint"
              else ((pseudo_set,), (tagged_labeled,)))
    if facts["normalize"] != norm:
        model = Renormalized(model, norm, facts["normalize"])
    return TrainingSets(unlabeled_set, batch_size_u, phases,
                        iterations_per_epoch(cfg, len(labeled_set), cfg.batch_size),  # as supervised
                        FixedTeacher(model, path, weights), pseudo_logs)


def build_parts(cfg, data, split, norm, device, sets, start, area_bounds, annotation_frequency,
                pseudo_area_bounds):
    """The student (+ `init_ckpt`, the warm start `start`, or pseudo_label's teacher weights and
    AdamW moments), the mode's teachers (copies of the student), losses and optimiser, and the
    `TrainingRun` that saves and validates them."""
    student, model_name, model_kwargs = build_network(cfg, data, device)  # + init_ckpt
    from_teacher = cfg.init_student_from_teacher and sets.teacher is not None and not cfg.resume
    if from_teacher:
        load_init_weights(student, sets.teacher.path, model_name, model_kwargs, sets.teacher.weights)
    elif start is not None:
        load_init_weights(student, start, model_name, model_kwargs)
    freeze_encoder_stages(student, cfg.freeze_encoder_stages)
    modules, static_teacher = {"model": student}, None
    teacher = None if sets.teacher is None else sets.teacher.model
    if cfg.mode != "pseudo_label":
        teacher = modules["teacher"] = copy.deepcopy(student).eval().requires_grad_(False)
    if cfg.mode == "bcp":
        static_teacher = modules["static_teacher"] = copy.deepcopy(teacher)
    loss_sup = build_loss(cfg, area_bounds, annotation_frequency).to(device)
    optimizer, scheduler, scaler = build_optimisation(cfg, student, cfg.epochs * sets.iterations, device)
    if from_teacher:
        continue_teacher_optimizer(optimizer, sets.teacher.path, sets.teacher.weights)
    run = TrainingRun(cfg, cfg.mode, model_name, model_kwargs,
                      {**modules, "loss": loss_sup, "optimizer": optimizer, "scheduler": scheduler,
                       "scaler": scaler}, data, split, norm, device,
                      validate_weights=evaluated_weights(cfg, "teacher" in modules))
    if cfg.mode != "pseudo_label":  # the EMA teacher tracks its own BatchNorm statistics
        teacher = OwnStatistics(teacher)
    parts = TeacherStudentParts(
        student=student, teacher=teacher, static_teacher=static_teacher, loss_sup=loss_sup,
        loss_stream=build_stream_loss(cfg.stream_loss, cfg),
        train_forward=data_parallel(student, device),  # after freezing and resuming
        optimizer=optimizer, scaler=scaler, device=device, scheduler=scheduler,
        pseudo_area_bounds=pseudo_area_bounds, pretrain_epochs=pretrain_epoch_count(cfg))
    return parts, run


def main(argv=None):
    # checked and frozen; `out_dir` fixed now: the teacher and the pseudo-labels go in it
    cfg = setup("teacher_student", argv, __doc__,
                derive=lambda cfg: {"out_dir": str(run_directory(cfg, cfg.mode))})
    device = pick_device(cfg.gpu)
    data, split, norm = load_data(cfg)
    labeled_set, unlabeled_set, batch_size_u = semi_supervised_sets(cfg, data, split, norm)
    area_bounds, annotation_frequency = labeled_priors(cfg, data, split, device)
    pseudo_area_bounds = area_bounds if cfg.pseudo_area_filter else None
    sets = training_sets(cfg, data, norm, device, labeled_set, unlabeled_set, batch_size_u, pseudo_area_bounds)
    # mean_teacher, bcp: <run>/warm_start/ (pseudo_label's student starts from its teacher instead)
    start = train_supervised.warm_start(cfg) if cfg.mode != "pseudo_label" else None
    seed_everything(cfg.seed, cfg.deterministic)
    parts, run = build_parts(cfg, data, split, norm, device, sets, start, area_bounds,
                             annotation_frequency, pseudo_area_bounds)
    train_step = STEPS[cfg.mode]

    # ==== loop: an epoch is `sets.iterations` steps ====
    for epoch in range(run.start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, epoch)  # exact resume: an epoch depends only on (seed, epoch)
        parts.student.train()
        loaders = sets.loaders(cfg, epoch, second_phase=epoch >= parts.pretrain_epochs)
        for batch_u, *batches_x in run.steps(loaders, sets.iterations, epoch):
            batch_x = supervised_targets(concatenated(batches_x), cfg)  # instance mode: 3-class targets
            at = Position(epoch, run.iteration, sets.iterations, cfg.epochs * sets.iterations)
            logs = train_step(parts, batch_x, batch_u, at, cfg)
            if cfg.scheduler == "poly":
                parts.scheduler.step()
            run.record({**logs, **sets.pseudo_logs})
        scores = run.validate(epoch)
        if scores is not None:
            parts.loss_sup.update_kappa(scores["per_class_dice"])  # t-vMF Dice: κ from validation Dice
            if cfg.scheduler == "plateau":
                parts.scheduler.step(scores[f"val_{cfg.select_metric}"])
            run.checkpoint(epoch, scores)
        if run.stopped:
            break
    best_epoch = run.best_epoch()
    if cfg.mode == "bcp" and 0 < best_epoch <= parts.pretrain_epochs:  # README, Methods (bcp)
        print(f"note: best.pth holds epoch {best_epoch}, of the labeled copy-paste phase (epochs "
              f"1-{parts.pretrain_epochs}): no epoch with pseudo-labels validated higher; last.pth "
              "holds the final weights")
    run.finish()


if __name__ == "__main__":
    run_cli(main)
