"""UniMatch: weak-to-strong consistency with two strong views and feature perturbation.

Yang, Qi, Feng, Zhang & Shi, "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic
Segmentation", CVPR 2023.

    python train_unimatch.py --labeled_ratio 0.8 --gpu 0   # a supervised warm start first
    python train_unimatch.py --num_labeled 8 --init_ckpt runs/sup/best.pth
    python train_unimatch.py --warm_start false            # from scratch
    python train_unimatch.py --resume runs/latest/last.pth
    torchrun --nproc_per_node 4 train_unimatch.py --labeled_ratio 0.8   # README: Several GPUs

Naming: `img_x`/`mask_x` labeled; `img_u_w` weak view of an unlabeled slice, `img_u_s1`/`img_u_s2`
its two strong views (same geometry, independent intensity perturbations, each CutMixed with a
partner slice `*_mix`: a slice of a second unlabeled batch with `mix_source: loader`, the default,
as the authors, or the next slice of the same batch with `batch`); `conf_u_w` confidence of the
prediction on `img_u_w`.
Per step: the prediction on the weak view, its background probability scaled by
`pseudo_background_scale` and renormalised (README, Methods), taken as a hard pseudo-label where
confident (≥ τ), supervises the two strong views and a feature-perturbed decoding of the weak view.
"""
import torch

import train_supervised
from dataloaders.datasets import strong_views
from networks import forward_with_feature_perturbation
from utils.errors import run_cli
from utils.losses import build_loss, build_stream_loss
from utils.mixing import paste, random_boxes
from utils.priors import drop_oversized_pseudo_labels, teacher_labels
from utils.builders import (build_network, epoch_loader, iterations_per_epoch, labeled_priors,
                            load_data, load_init_weights, semi_supervised_sets, supervised_targets)
from utils.distributed import data_parallel
from utils.engine import TrainingRun, run_directory
from utils.optim import autocast, build_optimisation, optimizer_step
from utils.runtime import pick_device, seed_epoch, seed_everything, setup


def batch_partners(tensor):
    """`tensor [B, ...]` reordered so that row i holds sample (i + 1) mod B: each sample's CutMix
    partner with `mix_source: batch` (itself when B = 1)."""
    return tensor.roll(-1, dims=0)


def unimatch_step(model, batch_x, batch_u, batch_mix, loss_sup, loss_stream, cfg, warmup=False,
                  area_bounds=None):
    """One UniMatch step; returns (total loss, dict of logged scalars). No optimiser work here.
    `batch_mix`: the CutMix partners with `cfg.mix_source` loader (unused, may be None, with
    batch). `area_bounds (C,)`: with `pseudo_area_filter`, the per-slice area bound of each class."""
    img_x, mask_x = batch_x["image"], batch_x["mask"]

    def supervised(logits_x):
        return loss_sup(logits_x, mask_x, annotated=batch_x["annotated"],
                        certain_background=batch_x["certain_background"])

    if warmup:  # supervised-only epochs before the unlabeled streams switch on
        loss_x = supervised(model(img_x))
        return loss_x, {"loss": loss_x, "loss_x": loss_x}

    img_u_w, img_u_s1, img_u_s2 = batch_u["image_w"], batch_u["image_s1"], batch_u["image_s2"]
    mix_within_batch = cfg.mix_source == "batch"
    if mix_within_batch:  # CutMix within the batch (French et al. 2020): no extra forward
        img_mix_s1, img_mix_s2 = batch_partners(img_u_s1), batch_partners(img_u_s2)
    else:
        # Pseudo-labels for the pasted boxes: the model in eval mode (BatchNorm running
        # statistics, no dropout), no gradient — they are targets, not predictions to train.
        with torch.no_grad():
            model.eval()
            conf_u_w_mix, mask_u_w_mix = teacher_labels(model(batch_mix["image_w"]),
                                                        cfg.pseudo_background_scale)
            model.train()
        img_mix_s1, img_mix_s2 = batch_mix["image_s1"], batch_mix["image_s2"]
    batch, _, height, width = img_u_w.shape
    box1, box2 = (random_boxes(batch, height, width, cfg.cutmix_p, tuple(cfg.cutmix_area),
                               tuple(cfg.cutmix_aspect), img_u_w.device) for _ in range(2))
    img_u_s1 = paste(img_u_s1, img_mix_s1, box1)
    img_u_s2 = paste(img_u_s2, img_mix_s2, box2)

    # One forward of [x, u_w] that also decodes channel-dropout copies of u_w's features (FP),
    # then one forward of both strong views.
    num_x = len(img_x)
    logits, logits_u_w_fp = forward_with_feature_perturbation(
        model, torch.cat([img_x, img_u_w]), num_perturbed=batch, p=cfg.fp_dropout)
    logits_x, logits_u_w = logits[:num_x], logits[num_x:]
    logits_u_s1, logits_u_s2 = model(torch.cat([img_u_s1, img_u_s2])).chunk(2)

    conf_u_w, mask_u_w = teacher_labels(logits_u_w, cfg.pseudo_background_scale)
    if cfg.pseudo_area_filter:  # a class painted far beyond its plausible area is not taught
        mask_u_w = drop_oversized_pseudo_labels(mask_u_w, area_bounds)
        if not mix_within_batch:
            mask_u_w_mix = drop_oversized_pseudo_labels(mask_u_w_mix, area_bounds)
    if cfg.image_filter > 0:  # drop whole slices with too few confident pixels
        keep = (conf_u_w >= cfg.conf_thresh).float().mean((1, 2)) >= cfg.image_filter
        conf_u_w = conf_u_w * keep.view(-1, 1, 1)
    if mix_within_batch:  # the partners' own pseudo-labels, filtered as theirs
        conf_u_w_mix, mask_u_w_mix = batch_partners(conf_u_w), batch_partners(mask_u_w)
    mask_u_s1, conf_u_s1 = paste(mask_u_w, mask_u_w_mix, box1), paste(conf_u_w, conf_u_w_mix, box1)
    mask_u_s2, conf_u_s2 = paste(mask_u_w, mask_u_w_mix, box2), paste(conf_u_w, conf_u_w_mix, box2)

    loss_x = supervised(logits_x)
    loss_s1 = loss_stream(logits_u_s1, mask_u_s1, conf_u_s1 < cfg.conf_thresh)
    loss_s2 = loss_stream(logits_u_s2, mask_u_s2, conf_u_s2 < cfg.conf_thresh)
    loss_fp = loss_stream(logits_u_w_fp, mask_u_w, conf_u_w < cfg.conf_thresh)
    loss = (loss_x + cfg.mu_img / 2 * (loss_s1 + loss_s2) + cfg.lambda_fp * loss_fp) / 2
    return loss, {"loss": loss, "loss_x": loss_x, "loss_s": (loss_s1 + loss_s2) / 2,
                  "loss_fp": loss_fp, "conf_ratio": (conf_u_w >= cfg.conf_thresh).float().mean()}


def main(argv=None):
    # ==== config, device, data ====
    # checked (edge_guided refused) and frozen; `out_dir` fixed now: the warm start goes in it
    cfg = setup("unimatch", argv, __doc__,
                derive=lambda cfg: {"out_dir": str(run_directory(cfg, "unimatch"))})
    start = train_supervised.warm_start(cfg)  # <run>/warm_start/, or None
    seed_everything(cfg.seed, cfg.deterministic)
    device = pick_device(cfg.gpu)
    data, split, norm = load_data(cfg)
    labeled_set, unlabeled_set, batch_size_u = semi_supervised_sets(cfg, data, split, norm)
    iterations = iterations_per_epoch(cfg, len(unlabeled_set), batch_size_u)

    # ==== model, losses, optimiser ====
    model, model_name, model_kwargs = build_network(cfg, data, device)  # + init_ckpt
    if start is not None:
        load_init_weights(model, start, model_name, model_kwargs)
    train_forward = data_parallel(model, device)  # under torchrun: DDP, gradients averaged
    area_bounds, annotation_frequency = labeled_priors(cfg, data, split, device)
    loss_sup = build_loss(cfg, area_bounds, annotation_frequency).to(device)
    loss_stream = build_stream_loss(cfg.stream_loss, cfg)
    optimizer, scheduler, scaler = build_optimisation(cfg, model, cfg.epochs * iterations, device)
    run = TrainingRun(cfg, "unimatch", model_name, model_kwargs,
                      {"model": model, "loss": loss_sup, "optimizer": optimizer,
                       "scheduler": scheduler, "scaler": scaler}, data, split, norm, device)

    # ==== loop: an epoch is `iterations` steps, by default one pass over the unlabeled pool ====
    for epoch in range(run.start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, epoch)  # exact resume: an epoch depends only on (seed, epoch)
        model.train()
        mix_loaders = ([epoch_loader(unlabeled_set, cfg, epoch, iterations, batch_size_u, stream=2)]
                       if cfg.mix_source == "loader" else [])  # batch: the partners are in batch_u
        loaders = zip(epoch_loader(labeled_set, cfg, epoch, iterations, cfg.batch_size, stream=0),
                      epoch_loader(unlabeled_set, cfg, epoch, iterations, batch_size_u, stream=1),
                      *mix_loaders)
        for batch_x, batch_u, *batch_mix in run.steps(loaders, iterations, epoch):
            batch_x = supervised_targets(batch_x, cfg)  # instance mode: 3-class targets of the ids
            batch_u = strong_views(batch_u)  # s1, s2 built on the device from the batch's draws
            batch_mix = strong_views(batch_mix[0]) if batch_mix else None
            with autocast(device, cfg):
                loss, logs = train_forward(unimatch_step, batch_x, batch_u, batch_mix, loss_sup,
                                           loss_stream, cfg, warmup=epoch < cfg.warmup_epochs,
                                           area_bounds=area_bounds)
            optimizer_step(loss, optimizer, scaler, cfg)
            if cfg.scheduler == "poly":
                scheduler.step()
            run.record(logs)
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
