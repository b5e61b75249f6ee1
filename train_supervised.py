"""Supervised baseline: AttUNet or SegFormer trained on the labeled slices only.

    python train_supervised.py                                  # phantom preset if data/ is empty
    python train_supervised.py --data data --labeled_ratio 0.8 --gpu 0 --loss tvmf_dice
    python train_supervised.py --resume runs/latest/last.pth     # continue an interrupted run
    torchrun --nproc_per_node 4 train_supervised.py             # 4 GPUs (README: Several GPUs)

Naming: `img_x`/`mask_x` are a labeled batch and its masks. Loss `dice_ce` by default: with the
soft Dice alone a class whose probability collapses early never comes back (its gradient through
the softmax vanishes), and on real CT whole organs went unpredicted (docs/experiments.md, Real CT);
`tvmf_dice` sharpens per class as validation Dice grows (κ updated after each evaluation); with
`partial_labels: true` the marginal variants treat 0-pixels as "background or an organ not
annotated on this image" (utils/losses.py).
"""
from pathlib import Path

from dataloaders.datasets import LabeledSlices, geometric_augmentation
from networks.edge import forward_with_edges
from utils.builders import (build_network, epoch_loader, iterations_per_epoch, labeled_priors,
                            load_data, supervised_targets)
from utils.config import Config, script_defaults
from utils.distributed import data_parallel
from utils.engine import TrainingRun
from utils.errors import run_cli
from utils.losses import build_loss
from utils.optim import autocast, build_optimisation, optimizer_step
from utils.runtime import pick_device, seed_epoch, seed_everything, setup


def train(cfg):
    """Train with the resolved config `cfg`; returns the run directory (best.pth is in it).
    `train_teacher_student.py` calls this for its pseudo_label teacher."""
    seed_everything(cfg.seed, cfg.deterministic)
    device = pick_device(cfg.gpu)
    data, split, norm = load_data(cfg)
    train_set = LabeledSlices(data, split.train, cfg.img_size, norm,
                              augment=geometric_augmentation(cfg), air_threshold=cfg.air_threshold)
    iterations = iterations_per_epoch(cfg, len(train_set), cfg.batch_size)

    # ==== model, loss, optimiser ====
    model, model_name, model_kwargs = build_network(cfg, data, device)
    train_forward = data_parallel(model, device)  # under torchrun: DDP, gradients averaged
    area_bounds, annotation_frequency = labeled_priors(cfg, data, split, device)
    loss_fn = build_loss(cfg, area_bounds, annotation_frequency).to(device)
    optimizer, scheduler, scaler = build_optimisation(cfg, model, cfg.epochs * iterations, device)
    run = TrainingRun(cfg, "supervised", model_name, model_kwargs,
                      {"model": model, "loss": loss_fn, "optimizer": optimizer,
                       "scheduler": scheduler, "scaler": scaler}, data, split, norm, device)

    # ==== the training step: the only method-specific part ====
    def train_step(model, batch):
        logits, edge_logits = forward_with_edges(model, batch["image"])  # no edges: None
        terms = loss_fn.terms(logits, batch["mask"], annotated=batch["annotated"],
                              certain_background=batch["certain_background"], edge_logits=edge_logits)
        loss = sum(terms.values())
        return loss, {"loss": loss, **({"loss_edge": terms["edge"]} if "edge" in terms else {})}

    # ==== loop: train an epoch, validate, checkpoint ====
    for epoch in range(run.start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, epoch)  # exact resume: an epoch depends only on (seed, epoch)
        model.train()
        loader = epoch_loader(train_set, cfg, epoch, iterations, cfg.batch_size)
        for batch in run.steps(loader, iterations, epoch):
            batch = supervised_targets(batch, cfg)  # instance mode: 3-class targets of the ids
            with autocast(device, cfg):
                loss, logs = train_forward(train_step, batch)
            optimizer_step(loss, optimizer, scaler, cfg)
            if cfg.scheduler == "poly":
                scheduler.step()
            run.record(logs)
        scores = run.validate(epoch)
        if scores is not None:
            loss_fn.update_kappa(scores["per_class_dice"])  # t-vMF Dice: κ from validation Dice
            if cfg.scheduler == "plateau":
                scheduler.step(scores[f"val_{cfg.select_metric}"])
            run.checkpoint(epoch, scores)
        if run.stopped:
            break
    run.finish()
    return run.dir


def train_first(cfg, out_dir, epochs, role):
    """A supervised run that another method starts from (the pseudo_label teacher, the warm start
    of UniMatch, Mean Teacher and BCP): trained here in `out_dir` for `epochs` with the keys `cfg`
    shares with this script (data, split, network, loss, budget …), or reused when `cfg` resumes
    and its best.pth is there. Returns that best.pth."""
    path = Path(out_dir) / "best.pth"
    if not (cfg.resume and path.is_file()):
        own_cfg = Config({key: cfg[key] for key in script_defaults("supervised")}, epochs=epochs,
                         out_dir=str(out_dir), resume="", _first_of=role).freeze()
        print(f"==== {role}: train_supervised.py on the labeled split, in {out_dir}/ ====")
        train(own_cfg)
    return path


def warm_start(cfg):
    """Where a semi-supervised run starts (`warm_start`): the best.pth of a supervised run trained
    first in <run>/warm_start/ for `warm_start_epochs` (0 = `epochs`), or None — from scratch,
    from `init_ckpt`, or resuming (the weights are in the checkpoint)."""
    if not cfg.warm_start or cfg.init_ckpt or cfg.resume:
        return None
    return train_first(cfg, Path(cfg.out_dir) / "warm_start", cfg.warm_start_epochs or cfg.epochs,
                       "warm start")


def main(argv=None):
    train(setup("supervised", argv, __doc__))


if __name__ == "__main__":
    run_cli(main)
