"""The engine every training script drives: run directory, resume, progress and metering,
validation, checkpoints, log, plots and early stopping. The method (the training step) and every
decision that changes training (schedules, κ of the t-vMF loss, re-seeding) stay in the scripts:

    for epoch in range(run.start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, epoch)                      # exact resume: (seed, epoch) fixes it
        model.train()
        for batch in run.steps(loader, iterations, epoch):   # progress bar, device, NaN guard
            with autocast(device, cfg):
                loss, logs = train_step(batch)            # the method
            optimizer_step(loss, optimizer, scaler, cfg)
            if cfg.scheduler == "poly":
                scheduler.step()
            run.record(logs)
        scores = run.validate(epoch)                      # None between evaluations
        if scores is not None:
            loss_fn.update_kappa(scores["per_class_dice"])
            if cfg.scheduler == "plateau":
                scheduler.step(scores[f"val_{cfg.select_metric}"])
            run.checkpoint(epoch, scores)                 # log line, last/best, plots, early stop
        if run.stopped:
            break
    run.finish()

Under torchrun (utils/distributed.py) rank 0 alone writes the run directory, `runs/latest`, the
config, the log, checkpoints and plots, and shows the progress bar; it validates, and the scores
go to every rank so that κ, the plateau schedule, best and early stopping are decided alike
everywhere. The logged losses are means over the ranks.
"""
import json
import math
import os
import platform
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils import distributed
from utils.checkpoint import load_checkpoint, require_network, save_checkpoint
from utils.config import RUN_KEYS, config_to_yaml, yaml_text
from utils.errors import InputError, TrainingDiverged
from utils.files import atomic_path
from utils.inference import predict_slices
from utils.metrics import (area_summary, class_area_report, format_area_flags, rand_index,
                           score_predictions)
from utils.plots import plot_curves, plot_examples


def processor_name():
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def execution_summary(device):
    """Where a run computes, the `ran_on` of its log lines: torch, the device (the CPU's model and
    thread count, or the GPU's name) and the processes. A seed's numbers repeat only where this
    is the same: thread count and processor change the float round-off of the kernels (README,
    Same seed, same numbers)."""
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        threads = torch.get_num_threads()
        where = f"cpu ({processor_name()}, {threads} thread{'s' if threads != 1 else ''})"
    processes = distributed.world_size()
    return f"torch {torch.__version__}, {where}, {processes} process{'es' if processes != 1 else ''}"


def to_device(batch, device):
    """A batch dict with its tensors moved to `device` (asynchronously from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


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


def data_facts(cfg, data, split, norm):
    """What a checkpoint records about the data (`test.py` rebuilds the split from them)."""
    return {"num_classes": data.num_classes, "class_names": data.class_names,
            "img_size": cfg.img_size, "in_channels": cfg.in_channels,
            "image_size": list(data.image_size), "normalize": norm, "root": str(data.root),
            "label_mode": data.label_mode,
            "split_seed": cfg.split_seed, "labeled_ratio": cfg.labeled_ratio,
            "num_labeled": cfg.num_labeled, "partial_labels": cfg.partial_labels,
            "folds": split.folds, "fold": split.fold,
            "train_indices": split.train.tolist(), "val_indices": split.val.tolist()}


def score_labels(truth, predictions, data, annotated=None):
    """The challenge scores of `predictions (N,H,W)` against `truth` in the data's label mode.

    Class mode: `score_predictions` (only the `annotated (N,C)` classes with partial labels).
    Instance mode, structure ids: the Rand index and the foreground shares; `per_class_dice` is
    None (ids are not classes), and partial truths need no restriction (the Rand index reads
    only the pixels where the truth is non-zero)."""
    if data.label_mode == "instance":
        return {"rand": float(rand_index(truth, predictions)),
                "fg_pred": float((predictions > 0).mean()), "fg_true": float((truth > 0).mean()),
                "per_class_dice": None}
    return score_predictions(truth, predictions, data.num_classes, annotated)


def colour_count(data, *label_maps):
    """How many colours draw these label maps (None = absent): the classes, or in instance mode
    the largest structure id + 1 (the ids of a prediction and of its truth are unrelated)."""
    if data.label_mode == "instance":
        return int(max(np.max(labels, initial=0) for labels in label_maps
                       if labels is not None)) + 1
    return data.num_classes


def evaluate(model, data, indices, cfg, norm, device):
    """Predict and score the training-set slices `indices` (the validation split).

    Returns `val_*` floats (the challenge scores, and in class mode `val_worst_area_ratio`,
    `val_sink_classes`, `val_missing_classes` of the per-class area report), `per_class_dice
    (C,)` (None in instance mode), `areas` (the `class_area_report`; None in instance mode) and
    `predictions (N,H,W) uint8` (classes, or structure ids in instance mode).
    """
    images = np.asarray(data.train_images[indices])
    truth = np.asarray(data.train_masks[indices])
    predictions = predict_slices(model, images, cfg.img_size, norm, device, cfg.eval_batch_size,
                                 label_mode=data.label_mode)
    annotated = data.annotated[indices] if cfg.partial_labels else None
    scores, areas = score_labels(truth, predictions, data, annotated), None
    if data.label_mode == "class":  # structure ids have no class areas
        areas = class_area_report(truth, predictions, data.num_classes, annotated)
        scores.update({k: float(v) for k, v in area_summary(areas).items()})
    per_class = scores.pop("per_class_dice")
    return {**{f"val_{k}": v for k, v in scores.items()}, "per_class_dice": per_class,
            "areas": areas, "predictions": predictions}


# ==== the run directory ====
def run_directory(cfg, method):
    """`out_dir` if given, else the folder of the checkpoint being resumed, else
    `runs/<method>-<timestamp>` (rank 0's clock: the same folder for every process)."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    if cfg.resume:
        return Path(cfg.resume).resolve().parent
    return Path(distributed.broadcast_object(f"runs/{method}-{datetime.now():%Y%m%d-%H%M%S}"))


class TrainingRun:
    """Everything around a training step (the loop it serves is in this module's docstring).

    `modules` maps names to objects with `state_dict()`/`load_state_dict()` (model, teacher,
    optimizer, scheduler, scaler, loss with its κ …); all go into every checkpoint and come back
    on `--resume`. `modules[validate_weights]` is the network validated here, and the one
    `test.py` scores (`utils.checkpoint.evaluated_weights`).
    """

    def __init__(self, cfg, method, model_name, model_kwargs, modules, data, split, norm, device,
                 validate_weights="model"):
        self.cfg, self.method, self.modules, self.device = cfg, method, modules, device
        self.model_name, self.model_kwargs = model_name, model_kwargs
        self.data, self.split, self.norm = data, split, norm
        self.validate_weights = validate_weights
        self.validated = len(split.val) > 0  # labeled_ratio 1: no validation split, best = last
        self.facts = data_facts(cfg, data, split, norm)
        self.history, self.best_score, self.bad_evaluations = [], -math.inf, 0
        self.start_epoch, self.iteration, self.started = 0, 0, time.time()
        self.stopped, self.meters, self.epoch, self._pending = False, Meters(), 0, None
        # time in steps; last plot redraw (the first comes after plot_every_seconds, or at the end:
        # a one-point curve is not worth a second of a short run)
        self.step_seconds, self.plotted_at = 0.0, self.started
        self.ran_on = execution_summary(device)
        if cfg.resume:
            self._restore(Path(cfg.resume))
        self.dir = run_directory(cfg, method)
        self.log_path = self.dir / "log.jsonl"
        if distributed.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            if not cfg.get("_first_of"):  # a warm start or teacher: latest waits for the run itself
                self._point_latest()
            (self.dir / "config.yaml").write_text(f"# method: {method}\n{config_to_yaml(cfg)}")
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
        require_network(state, path, self.model_name, self.model_kwargs)
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
        changed = [f"{key} {yaml_text(saved)} -> "
                   + (yaml_text(self.cfg[key]) if key in self.cfg else "(no longer a setting)")
                   for key, saved in state["config"].items()
                   if key not in RUN_KEYS and (key not in self.cfg or self.cfg[key] != saved)]
        if changed:
            print("note: resumed with settings other than the run's own: " + "; ".join(changed))
        trained_with = state.get("world_size", 1)
        if trained_with != distributed.world_size():
            print(f"note: {path} was trained by {trained_with} process(es), this run has "
                  f"{distributed.world_size()}: from epoch {self.start_epoch + 1} on the global "
                  f"batch is {self.cfg.batch_size} x {distributed.world_size()} and the steps "
                  "are not those of the uninterrupted run")

    def steps(self, batches, total, epoch):
        """Iterate `batches` (a batch dict or a tuple of them) on the device, with a progress bar
        showing the running losses and a NaN check every `print_every` steps. Starts the meters
        of epoch `epoch` (0-based); `self.iteration` counts the steps before the current one."""
        self.epoch, self.meters = epoch, Meters()
        bar = tqdm(batches, total=total, desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                   leave=False, dynamic_ncols=True,
                   disable=None if distributed.is_main() else True)
        for step, batch in enumerate(bar):
            arrived = time.perf_counter()  # waiting for data counts as overhead, not as the step
            if isinstance(batch, dict):
                yield to_device(batch, self.device)
            else:
                yield tuple(to_device(part, self.device) for part in batch)
            self.step_seconds += time.perf_counter() - arrived
            self.iteration += 1
            if (step + 1) % self.cfg.print_every == 0:
                bar.set_postfix({k: f"{v:.4f}" for k, v in self.check_finite().items()
                                 if k.startswith("loss")})

    def record(self, logs):
        """Add one step's scalars (device tensors are fine: no host sync here)."""
        self.meters.update(logs)

    def check_finite(self):
        """The running means (over the ranks too); raises `TrainingDiverged` if one is NaN/inf
        on any rank — on every rank at once (checkpoints stay as they were)."""
        means = distributed.mean_over_ranks(self.meters.means(), self.device)
        bad = [name for name, value in means.items() if not math.isfinite(value)]
        if bad:
            raise TrainingDiverged(
                f"{', '.join(bad)} became {means[bad[0]]} in epoch {self.epoch + 1}; stopping. "
                f"The last good checkpoint is {self.dir / 'last.pth'}")
        return means

    def validate(self, epoch):
        """Every `eval_every` epochs and at the last: score the validation split with the
        validated weights. Returns `val_*` floats, `per_class_dice (C,)` and `predictions`, or
        None between evaluations. The script applies what follows from the scores (κ, plateau
        schedule), then calls `checkpoint(epoch, scores)`."""
        cfg = self.cfg
        if (epoch + 1) % cfg.eval_every and epoch + 1 < cfg.epochs:
            return None
        losses = self.check_finite()
        scores = shared = None
        if not self.validated:  # labeled_ratio 1: nothing to score
            scores = {"per_class_dice": None, "areas": None, "predictions": None}
        elif distributed.is_main():  # one validation; its predictions (for the plots) stay here
            scores = evaluate(self.modules[self.validate_weights], self.data, self.split.val, cfg,
                              self.norm, self.device)
            shared = {k: v for k, v in scores.items() if k != "predictions"}
        if self.validated:
            shared = distributed.broadcast_object(shared)  # every rank applies the same scores
            scores = scores if scores is not None else shared
        # the learning rate the epoch trained with, before a plateau schedule reacts to the scores
        self._pending = {"epoch": epoch + 1, "iteration": self.iteration,
                         "lr": self.modules["optimizer"].param_groups[0]["lr"], **losses,
                         **{k: v for k, v in scores.items() if isinstance(v, float)},
                         "seconds": round(time.time() - self.started, 1), "ran_on": self.ran_on}
        return scores

    def checkpoint(self, epoch, scores):
        """After `validate`: log one line, save last.pth (and best.pth when the selected score
        improved), redraw the plots and decide early stopping."""
        cfg, record = self.cfg, self._pending
        score = scores[f"val_{cfg.select_metric}"] if self.validated else math.nan
        improved = score > self.best_score or not self.validated  # no validation: best = last
        if improved and self.validated:
            self.best_score, self.bad_evaluations = score, 0
        elif self.validated:
            self.bad_evaluations += 1
        record["step_seconds"] = round(self.step_seconds, 1)
        self.history.append(record)
        if cfg.early_stop_patience and self.bad_evaluations >= cfg.early_stop_patience:
            self.stopped = True
        if not distributed.is_main():
            return
        with open(self.log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
        self.save(epoch, improved)
        values = " ".join(f"{k} {v:.4f}" for k, v in record.items()
                          if k.startswith(("loss", "val_", "conf")))
        print(f"epoch {epoch + 1}/{cfg.epochs} {values} lr {record['lr']:.2e}"
              f"{' *best*' if improved else ''}")
        areas = scores["areas"]
        if areas is not None and (areas["sink"].any() or areas["missing"].any()):
            print("  " + format_area_flags(areas, self.data.class_names))
        if self.stopped:
            print(f"Early stop: no improvement in {cfg.early_stop_patience} evaluations.")
        last = self.stopped or epoch + 1 == cfg.epochs
        if last or time.time() - self.plotted_at >= cfg.plot_every_seconds:
            self.plot(scores["predictions"])

    def best_epoch(self):
        """The epoch (counted from 1) whose weights best.pth holds: the first evaluation at the
        best score, or the last evaluation without a validation split; 0 before any."""
        if not self.validated:
            return self.history[-1]["epoch"] if self.history else 0
        key = f"val_{self.cfg.select_metric}"
        return next((record["epoch"] for record in self.history if record.get(key) == self.best_score), 0)

    def plot(self, predictions):
        """Redraw curves.png and val_examples.png (`predictions`: of the validation slices;
        None without a validation split, which has no examples)."""
        plot_curves(self.history, self.dir / "curves.png")
        self.plotted_at = time.time()
        if predictions is None:
            return
        count = min(self.cfg.num_examples, len(self.split.val))
        shown = self.split.val[:count]
        truths = np.asarray(self.data.train_masks[shown])
        plot_examples(np.asarray(self.data.train_images[shown]), truths, predictions[:count],
                      self.dir / "val_examples.png",
                      colour_count(self.data, truths, predictions[:count]))

    def save(self, epoch, is_best):
        state = {"model_name": self.model_name, "model_kwargs": self.model_kwargs,
                 "method": self.method, "epoch": epoch, "iteration": self.iteration,
                 "best_score": self.best_score, "bad_evaluations": self.bad_evaluations,
                 "history": self.history, "world_size": distributed.world_size(),
                 "config": {k: v for k, v in self.cfg.items() if not k.startswith("_")},
                 "overrides": list(self.cfg.get("_overrides", ())),
                 "data": self.facts}
        state.update({name: module.state_dict() for name, module in self.modules.items()})
        save_checkpoint(state, self.dir / "last.pth")
        if is_best:
            save_checkpoint(state, self.dir / "best.pth")

    def finish(self):
        """The closing summary line: where the outputs are and what to run next. Under torchrun
        every rank waits here until rank 0 has written everything (a teacher run's best.pth is
        read next by all of them)."""
        distributed.barrier()
        best, seconds = self.dir / "best.pth", time.time() - self.started
        chosen = (f"best {self.cfg.select_metric} {self.best_score:.4f}" if self.validated
                  else "no validation split, best.pth is the last checkpoint")
        then = (f"the {self.cfg._first_of} is ready, the run goes on" if self.cfg.get("_first_of")
                else f"Next: python test.py --ckpt {best}")
        print(f"Done in {seconds:.0f} s ({self.step_seconds / max(seconds, 1e-9):.0%} in training "
              f"steps): {chosen}; checkpoints, log and plots in {self.dir}/. {then}")
