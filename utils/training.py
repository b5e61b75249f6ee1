"""The mechanics every training script shares: config + data set-up, device, seeding, loaders,
optimiser and schedule, metering, evaluation, and the run directory with its checkpoints, log,
plots, resume, early stopping and NaN guard (`TrainingRun`). The method itself — the training
step — stays in each `train_*.py`.

Exact resume: every epoch re-seeds all RNGs from (seed, epoch) and its loaders draw from a
generator seeded the same way, so a run resumed from `last.pth` after epoch e repeats epoch
e+1 exactly as the uninterrupted run did.
"""
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from dataloaders.challenge import has_challenge_files, load_challenge, make_split, split_summary
from dataloaders.datasets import (LabeledSlices, UnlabeledSlices, geometric_augmentation,
                                  intensity_augmentation, normalization_stats)
from dataloaders.phantom import COMPLETE_MARKER, ensure_phantom
from utils.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from networks import build_model
from utils.config import CONFIG_DIR, config_to_yaml, load_config
from utils.errors import InputError
from utils.files import atomic_path
from utils.inference import predict_slices
from utils.metrics import score_predictions
from utils.plots import plot_curves, plot_examples

PHANTOM_DIR = Path("data/phantom")


# ==== config, device, seeds ====
def phantom_preset(script, cfg):
    """`configs/phantom_<script>.yaml` (or `phantom.yaml`) when the data folder is a phantom or
    `data/` holds no challenge data; None otherwise."""
    data = Path(cfg.data)
    if has_challenge_files(data) and not (data / COMPLETE_MARKER).is_file():
        return None
    if not has_challenge_files(data) and data != Path("data"):
        return None
    specific = CONFIG_DIR / f"phantom_{script}.yaml"
    return specific if specific.is_file() else CONFIG_DIR / "phantom.yaml"


def setup(script, argv, description):
    """Resolve the config (phantom preset included), print it once, return it.

    With no challenge files in `data/`, the phantom is generated into `data/phantom` (once).
    """
    cfg = load_config(script, argv, description, preset=lambda c: phantom_preset(script, c))
    if not has_challenge_files(cfg.data):
        if Path(cfg.data) != Path("data"):
            raise InputError(f"{cfg.data}: no train-images/ folder or train-images.zip")
        print(f"No challenge files in '{cfg.data}/': using the built-in CT phantom in "
              f"{PHANTOM_DIR}/ with the phantom preset (configs/phantom.yaml).")
        ensure_phantom(PHANTOM_DIR)
        cfg.data = str(PHANTOM_DIR)
    elif "_preset" in cfg:
        print(f"'{cfg.data}' is a phantom folder: the phantom preset (configs/phantom.yaml) applies.")
    print("Config:\n  " + config_to_yaml(cfg).rstrip().replace("\n", "\n  "))
    return cfg


def pick_device(gpu):
    """`gpu` = CUDA index, -1 = CPU. A missing CUDA device warns once and falls back to the CPU."""
    if gpu is None or gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print(f"warning: --gpu {gpu} asked for, but CUDA is not available; running on the CPU")
        return torch.device("cpu")
    if gpu >= torch.cuda.device_count():
        print(f"warning: --gpu {gpu} does not exist ({torch.cuda.device_count()} CUDA "
              "device(s)); running on the CPU")
        return torch.device("cpu")
    return torch.device("cuda", gpu)


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def epoch_seed(seed, epoch, stream=0):
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def seed_worker(worker_id):
    """DataLoader workers: derive NumPy/random seeds from torch's per-worker seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


# ==== data ====
def load_data(cfg):
    """Data folder -> (ChallengeData, Split, normalisation). Prints the split once."""
    data = load_challenge(cfg.data, num_classes=cfg.num_classes)
    cfg.num_classes = data.num_classes
    split = make_split(data, cfg.labeled_ratio, cfg.num_labeled, cfg.split_seed,
                       folds=cfg.get("folds", 0), fold=cfg.get("fold", 0))
    norm = normalization_stats(np.asarray(data.train_images)[split.train])
    print(f"Data: {data.root} — {len(data.train_names)} training images "
          f"{data.image_size[1]}x{data.image_size[0]}, {data.num_classes} classes; "
          f"{split_summary(split)}; {len(data.test_names)} test images")
    return data, split, norm


def model_config(cfg, data):
    """(name, kwargs) for `build_model`: the family's `model_kwargs` plus channels and classes."""
    family = "segformer" if cfg.model.startswith("segformer") else cfg.model
    extra = cfg.model_kwargs.get(family, {})
    if cfg.edge_guided:  # only when on, so plain checkpoints keep their kwargs
        extra = {**extra, "edge_guided": True}
    return cfg.model, {"in_channels": cfg.in_channels, "num_classes": data.num_classes, **extra}


def build_network(cfg, data, device):
    """(model on `device`, name, kwargs): the configured network, with `pretrained` encoder
    weights, `init_ckpt` weights (unless resuming) and `channels_last` applied."""
    model_name, model_kwargs = model_config(cfg, data)
    model = build_model(model_name, pretrained=cfg.pretrained or None, **model_kwargs)
    if cfg.get("init_ckpt") and not cfg.resume:
        load_init_weights(model, cfg.init_ckpt, model_name, model_kwargs)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, model_name, model_kwargs


def data_facts(cfg, data, split, norm):
    """What a checkpoint records about the data (SPEC §8)."""
    return {"num_classes": data.num_classes, "class_names": data.class_names,
            "img_size": cfg.img_size, "in_channels": cfg.in_channels,
            "image_size": list(data.image_size), "normalize": norm, "root": str(data.root),
            "split_seed": cfg.split_seed, "labeled_ratio": cfg.labeled_ratio,
            "folds": split.folds, "fold": split.fold,
            "num_labeled": cfg.num_labeled, "partial_labels": cfg.partial_labels,
            "train_indices": split.train.tolist(), "val_indices": split.val.tolist()}


def unlabeled_pool(cfg, data, split):
    """(images (M,H,W) uint8, indices) of the unlabeled pool: the empty-mask training images,
    plus the test images when `use_test_as_unlabeled`."""
    if not (cfg.use_test_as_unlabeled and data.test_images is not None):
        return data.train_images, split.unlabeled
    images = np.concatenate([np.asarray(data.train_images), np.asarray(data.test_images)])
    test = np.arange(len(data.train_images), len(images))
    return images, np.concatenate([split.unlabeled, test])


def semi_supervised_sets(cfg, data, split, norm):
    """(labeled set, unlabeled set, unlabeled batch size) of a semi-supervised script.

    Labeled slices get the weak (geometric) augmentation; unlabeled ones, from `unlabeled_pool`,
    a weak view and two strong views of the same geometry.
    """
    geometry = geometric_augmentation(cfg)
    labeled_set = LabeledSlices(data, split.train, cfg.img_size, norm, augment=geometry,
                                air_threshold=cfg.air_threshold)
    pool_images, pool_indices = unlabeled_pool(cfg, data, split)
    if len(pool_indices) == 0:
        raise InputError(f"{data.root}: no unlabeled slices for a semi-supervised method")
    unlabeled_set = UnlabeledSlices(pool_images, pool_indices, cfg.img_size, norm, geometry,
                                    intensity_augmentation())
    return labeled_set, unlabeled_set, cfg.batch_size_unlabeled or cfg.batch_size


def load_init_weights(model, path, model_name, model_kwargs, weights="model"):
    """Copy the weights of checkpoint `path` (e.g. a train_supervised.py best.pth) into `model`."""
    state = load_checkpoint(path)
    if (state["model_name"], state["model_kwargs"]) != (model_name, model_kwargs):
        raise InputError(f"{path}: checkpoint is a {state['model_name']} {state['model_kwargs']}, "
                         f"this run builds a {model_name} {model_kwargs}")
    model.load_state_dict(model_from_checkpoint(state, weights, path).state_dict())
    print(f"Initialised the {weights} weights from {path} (epoch {state['epoch'] + 1}, "
          f"best {state['config']['select_metric']} {state['best_score']:.4f})")


class CyclingSampler(Sampler):
    """`num_samples` indices from back-to-back random permutations of range(size)."""

    def __init__(self, size, num_samples, generator):
        self.size, self.num_samples, self.generator = size, num_samples, generator

    def __iter__(self):
        drawn = 0
        while drawn < self.num_samples:
            order = torch.randperm(self.size, generator=self.generator).tolist()
            take = order[:self.num_samples - drawn]
            drawn += len(take)
            yield from take

    def __len__(self):
        return self.num_samples


def epoch_loader(dataset, cfg, epoch, num_batches, batch_size, stream=0):
    """A loader giving exactly `num_batches` full batches, reshuffled per pass, seeded by
    (seed, epoch, stream) so an epoch is reproducible on its own (exact resume)."""
    generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, stream))
    sampler = CyclingSampler(len(dataset), num_batches * batch_size, generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.num_workers, worker_init_fn=seed_worker,
                      generator=generator, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False)


def iterations_per_epoch(cfg, driving_size, batch_size):
    """`iters_per_epoch`, or one pass over the driving dataset when it is 0."""
    return cfg.iters_per_epoch or max(1, driving_size // batch_size)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


# ==== optimisation ====
def build_optimizer(cfg, parameters):
    return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg, optimizer, total_iterations):
    """ReduceLROnPlateau on the validation score (stepped per evaluation) or poly (per step)."""
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    if cfg.scheduler == "poly":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1 - step / total_iterations) ** cfg.poly_power)
    raise InputError(f"scheduler: unknown '{cfg.scheduler}' (choose plateau or poly)")


def build_optimisation(cfg, parameters, total_iterations, device):
    """(AdamW, its schedule, the AMP GradScaler) for the trainable `parameters`."""
    optimizer = build_optimizer(cfg, parameters)
    return optimizer, build_scheduler(cfg, optimizer, total_iterations), make_scaler(device, cfg)


def autocast(device, cfg):
    """float16 autocast on CUDA when `amp`; a no-op on the CPU, where it is far slower."""
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def make_scaler(device, cfg):
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp)


def optimizer_step(loss, optimizer, scaler, cfg, scheduler=None):
    """Backward, optional gradient clipping, step; poly schedulers advance per step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step()


class Meters:
    """Running means of named scalars, kept on the device so the step never waits for the host."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def update(self, values):
        for name, value in values.items():
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            self.sums[name] = self.sums.get(name, 0) + value
        self.count += 1

    def means(self):
        return {name: float(total) / max(self.count, 1) for name, total in self.sums.items()}


def ema_update(teacher, student, alpha, step):
    """teacher ← a·teacher + (1−a)·student with a = min(1 − 1/(step+1), alpha) (Tarvainen &
    Valpola 2017: the warm start lets the teacher follow the student closely at first)."""
    a = min(1 - 1 / (step + 1), alpha)
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(a).add_(s.detach(), alpha=1 - a)
        for t, s in zip(teacher.buffers(), student.buffers()):
            t.copy_(s)


def sigmoid_rampup(t):
    """exp(−5(1−t)²) for t in [0, 1] (Laine & Aila 2017), 1 after the ramp."""
    t = min(max(t, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


# ==== evaluation ====
def evaluate(model, data, indices, cfg, norm, device):
    """Predict and score the training-set slices `indices` (the validation split).

    Returns `val_*` floats, `per_class_dice (C,)` and `predictions (N,H,W) uint8`.
    """
    images = np.asarray(data.train_images[indices])
    truth = np.asarray(data.train_masks[indices])
    predictions = predict_slices(model, images, cfg.img_size, norm, device, cfg.eval_batch_size)
    scores = score_predictions(truth, predictions, data.num_classes,
                               data.annotated[indices] if cfg.partial_labels else None)
    per_class = scores.pop("per_class_dice")
    return {**{f"val_{k}": v for k, v in scores.items()}, "per_class_dice": per_class,
            "predictions": predictions}


# ==== the run directory ====
def run_directory(cfg, method):
    """`out_dir` if given, else the folder of the checkpoint being resumed, else
    `runs/<method>-<timestamp>`."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    if cfg.resume:
        return Path(cfg.resume).resolve().parent
    return Path("runs") / f"{method}-{datetime.now():%Y%m%d-%H%M%S}"


class TrainingRun:
    """Run directory, checkpoints, log, plots, resume, epochs, validation, early stopping and
    the NaN guard — everything around a training step. A script's loop reads:

        for epoch in run.epochs():
            for batch in run.steps(loader, iterations):      # progress bar, device, NaN guard
                loss, logs = train_step(batch)               # the method
                optimizer_step(loss, optimizer, scaler, cfg, scheduler)
                run.record(logs)
            run.validate(epoch)                               # score, log, checkpoint, plots

    `modules` maps names to objects with `state_dict()`/`load_state_dict()` (model, teacher,
    optimizer, scheduler, scaler, loss with its κ …); all go into every checkpoint and come back
    on `--resume`. `modules["model"]` is the network validated here and tested by `test.py`
    (unless the checkpoint has a `teacher`, which `test.py` prefers).
    """

    def __init__(self, cfg, method, model_name, model_kwargs, modules, data, split, norm, device,
                 validate_weights="model"):
        self.cfg, self.method, self.modules, self.device = cfg, method, modules, device
        self.model_name, self.model_kwargs = model_name, model_kwargs
        self.data, self.split, self.norm = data, split, norm
        self.validate_weights = validate_weights
        self.facts = data_facts(cfg, data, split, norm)
        self.history, self.best_score, self.bad_evaluations = [], -math.inf, 0
        self.start_epoch, self.iteration, self.started = 0, 0, time.time()
        self.stopped, self.meters, self.epoch = False, Meters(), 0
        if cfg.resume:
            self._restore(Path(cfg.resume))
        self.dir = run_directory(cfg, method)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._point_latest()
        (self.dir / "config.yaml").write_text(config_to_yaml(cfg))
        self.log_path = self.dir / "log.jsonl"
        self.log_path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        print(f"Run directory: {self.dir}")

    def _point_latest(self):
        latest = Path("runs") / "latest"
        latest.parent.mkdir(exist_ok=True)
        target = os.path.relpath(self.dir.resolve(), latest.parent.resolve())
        try:
            with atomic_path(latest) as temporary:
                os.symlink(target, temporary, target_is_directory=True)
        except OSError as error:
            print(f"warning: could not point runs/latest at {self.dir} ({error})")

    def _restore(self, path):
        state = load_checkpoint(path, map_location=self.device)
        if state["model_name"] != self.model_name or state["model_kwargs"] != self.model_kwargs:
            raise InputError(f"{path}: checkpoint is a {state['model_name']} "
                             f"{state['model_kwargs']}, this run builds a {self.model_name} "
                             f"{self.model_kwargs}")
        for name, module in self.modules.items():
            if name not in state:
                raise InputError(f"{path}: no '{name}' state to resume from")
            if state[name]:  # a disabled GradScaler saves {}
                module.load_state_dict(state[name])
        self.start_epoch, self.iteration = state["epoch"] + 1, state["iteration"]
        self.best_score, self.bad_evaluations = state["best_score"], state["bad_evaluations"]
        self.history = list(state["history"])
        print(f"Resumed from {path}: epoch {state['epoch'] + 1} done, best "
              f"{self.cfg.select_metric} {self.best_score:.4f}")

    def epochs(self):
        """The epochs still to run. Each re-seeds every RNG from (seed, epoch) — what makes
        `--resume` repeat an epoch exactly — and sets the model to train mode."""
        for epoch in range(self.start_epoch, self.cfg.epochs):
            if self.stopped:
                return
            self.epoch, self.meters = epoch, Meters()
            seed_everything(epoch_seed(self.cfg.seed, epoch, stream=1000))
            self.modules["model"].train()
            yield epoch

    def steps(self, batches, total):
        """Iterate `batches` (a batch dict or a tuple of them) on the device, with a progress bar
        showing the running losses and a NaN check every `print_every` steps."""
        bar = tqdm(batches, total=total, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                   leave=False, dynamic_ncols=True, disable=None)
        for step, batch in enumerate(bar):
            if isinstance(batch, dict):
                yield to_device(batch, self.device)
            else:
                yield tuple(to_device(part, self.device) for part in batch)
            self.iteration += 1
            if (step + 1) % self.cfg.print_every == 0:
                bar.set_postfix({k: f"{v:.4f}" for k, v in self.check_finite().items()
                                 if k.startswith("loss")})

    def record(self, logs):
        """Add one step's scalars (device tensors are fine: no host sync here)."""
        self.meters.update(logs)

    def check_finite(self):
        """Stop the run (exit 1) if a running loss is NaN/inf; checkpoints stay as they were."""
        means = self.meters.means()
        bad = [name for name, value in means.items() if not math.isfinite(value)]
        if bad:
            print(f"error: {', '.join(bad)} became {means[bad[0]]} in epoch {self.epoch + 1}; "
                  f"stopping. The last good checkpoint is {self.dir / 'last.pth'}",
                  file=sys.stderr)
            sys.exit(1)
        return means

    def validate(self, epoch):
        """Every `eval_every` epochs (and at the last): score the validation split, update κ,
        log one line, step the plateau schedule, save last/best, redraw the plots, and decide
        early stopping."""
        cfg = self.cfg
        if (epoch + 1) % cfg.eval_every and epoch + 1 < cfg.epochs:
            return
        losses = self.check_finite()
        model = self.modules[self.validate_weights]
        scores = evaluate(model, self.data, self.split.val, cfg, self.norm, self.device)
        if "loss" in self.modules:
            self.modules["loss"].update_kappa(torch.as_tensor(scores["per_class_dice"]))
        optimizer, scheduler = self.modules["optimizer"], self.modules.get("scheduler")
        score = scores[f"val_{cfg.select_metric}"]
        record = {"epoch": epoch + 1, "iteration": self.iteration,
                  "lr": optimizer.param_groups[0]["lr"], **losses,
                  **{k: v for k, v in scores.items() if isinstance(v, float)},
                  "seconds": round(time.time() - self.started, 1)}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(score)
        improved = score > self.best_score
        if improved:
            self.best_score, self.bad_evaluations = score, 0
        else:
            self.bad_evaluations += 1
        self.history.append(record)
        with open(self.log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
        self.save(epoch, improved)
        plot_curves(self.history, self.dir / "curves.png")
        count = min(cfg.num_examples, len(self.split.val))
        shown = self.split.val[:count]
        plot_examples(np.asarray(self.data.train_images[shown]),
                      np.asarray(self.data.train_masks[shown]), scores["predictions"][:count],
                      self.dir / "val_examples.png", self.data.num_classes)
        values = " ".join(f"{k} {v:.4f}" for k, v in record.items()
                          if k.startswith(("loss", "val_", "conf")))
        print(f"epoch {epoch + 1}/{cfg.epochs} {values} lr {record['lr']:.2e}"
              f"{' *best*' if improved else ''}")
        if cfg.early_stop_patience and self.bad_evaluations >= cfg.early_stop_patience:
            print(f"Early stop: no improvement in {cfg.early_stop_patience} evaluations.")
            self.stopped = True

    def save(self, epoch, is_best):
        state = {"model_name": self.model_name, "model_kwargs": self.model_kwargs,
                 "method": self.method, "epoch": epoch, "iteration": self.iteration,
                 "best_score": self.best_score, "bad_evaluations": self.bad_evaluations,
                 "history": self.history, "rng": {"torch": torch.get_rng_state()},
                 "config": {k: v for k, v in self.cfg.items() if not k.startswith("_")},
                 "data": self.facts}
        state.update({name: module.state_dict() for name, module in self.modules.items()})
        save_checkpoint(state, self.dir / "last.pth")
        if is_best:
            save_checkpoint(state, self.dir / "best.pth")

    def finish(self):
        """The closing summary line: where the outputs are and what to run next."""
        best = self.dir / "best.pth"
        print(f"Done in {time.time() - self.started:.0f} s: best {self.cfg.select_metric} "
              f"{self.best_score:.4f}; checkpoints, log and plots in {self.dir}/. "
              f"Next: python test.py --ckpt {best}")


def freeze_encoder_stages(model, count):
    """Freeze the first `count` encoder stages for fine-tuning: AttUNet's encoder blocks,
    SegFormer's stages (patch embedding, transformer blocks, norm). Only the weights freeze:
    BatchNorm running statistics still follow the data. Pass only the parameters that still
    require gradients to the optimiser."""
    stages = getattr(model.encoder, "stages", model.encoder)
    if not 0 <= count <= len(stages):
        raise InputError(f"freeze_encoder_stages: {count} is not between 0 and {len(stages)} "
                         "(the encoder stages of this network)")
    for stage in stages[:count]:
        stage.requires_grad_(False)
