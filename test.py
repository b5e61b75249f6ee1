"""Score checkpoints and write the challenge submission (README: The loop; Cross-validation and
ensembles).

    python test.py --ckpt best.pth                  # tries runs/latest/best.pth if ./best.pth is absent
    python test.py --ckpt runs/latest/best.pth --tta none --no-postprocess --save_png 8
    python test.py --ckpt runs/fold*/best.pth --split oof   # K fold checkpoints: cross-validated score
    python test.py --ckpt runs/fold*/best.pth --tta shift   # several checkpoints: their ensemble
    python test.py --baseline watershed --data data/phantom   # the challenge's classical baseline
    python test.py --ckpt best.pth --images new_slices/ --out_dir labels/   # label PNGs of new images

Everything about a model and its preprocessing comes from its checkpoint, its label mode
included: an instance checkpoint (README, "#150 instance mode") predicts structure ids, scored
by the Rand index and written as ids in the submission. The validation
split is rebuilt from the checkpoint's config and scored with the challenge metrics; when the
data folder has test images, their predictions are written as `submission.csv` next to the
checkpoint (or `--out`) and read back to check it; when it also has test labels (the phantom's
`y_test.csv`), the test predictions are scored too. Every score printed is also written to
`scores.json` next to the submission (README: The loop), the input of `python -m utils.runs`.

Several `--ckpt` paths (or a shell glob) form an ensemble: the mean of the members' softmax,
each member with its own image size, normalisation and the chosen TTA. Each member's score and
the ensemble's are printed, and one submission (`ensemble_submission.csv` in the members'
common folder, or `--out`) is written. `--split oof` takes the K checkpoints of one
`--folds K` split and scores every labeled image with the model that validated on it.
"""
import argparse
import glob
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dataloaders.challenge import ChallengeData, load_challenge, make_split, read_image_folder
from dataloaders.label_csv import read_label_csv, write_label_csv
from utils.checkpoint import evaluated_weights, load_checkpoint, model_from_checkpoint
from utils.config import Config, load_config, script_defaults
from utils.engine import colour_count, score_labels
from utils.errors import InputError, run_cli
from utils.files import atomic_path
from utils.inference import Member, predict_ensemble
from utils.metrics import (area_summary, class_area_report, dice_table, format_area_report,
                           format_dice_table)
from utils.plots import save_overlays
from utils.postprocess import postprocess, watershed_baseline
from utils.runtime import check_config, pick_device

METRIC_NAMES = {"dice": "Dice", "rand": "Rand index"}


def checkpoint_arguments(argv):
    """Take `--ckpt A B C …` out of `argv` (the config's flags take one value each).

    Returns (the paths or patterns given, or None; the other arguments)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--ckpt", nargs="+")
    known, rest = parser.parse_known_args(argv)
    return known.ckpt, rest


def find_checkpoint(path):
    """`path`, or `runs/latest/<path>` when `path` does not exist (saying which was used)."""
    path = Path(path)
    if path.is_file():
        return path
    fallback = Path("runs") / "latest" / path
    if fallback.is_file():
        print(f"{path} not found; using {fallback} ({fallback.resolve()})")
        return fallback
    raise InputError(f"{path}: checkpoint not found (nor {fallback})")


def find_checkpoints(patterns):
    """The checkpoint files named by `patterns`; a pattern the shell left unexpanded (quoted,
    or a shell without globbing) is expanded here."""
    paths = []
    for pattern in patterns:
        if any(char in pattern for char in "*?[") and not Path(pattern).exists():
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise InputError(f"{pattern}: no checkpoint matches")
            paths += [Path(match) for match in matches]
        else:
            paths.append(find_checkpoint(pattern))
    for i, path in enumerate(paths):
        if path.resolve() in [p.resolve() for p in paths[:i]]:
            raise InputError(f"{path}: given twice in --ckpt")
    return paths


class Checkpoint:
    """One `--ckpt` file: its state, its network (on the host) and what it was trained on."""

    def __init__(self, path, weights_choice):
        self.path = path
        self.state = load_checkpoint(path, map_location="cpu")
        self.config, self.facts = self.state["config"], self.state["data"]
        evaluated = evaluated_weights(self.config, self.state.get("teacher") is not None)
        self.weights = weights_choice or {"teacher": "teacher", "model": "student"}[evaluated]
        model = model_from_checkpoint(self.state, "model" if self.weights == "student"
                                      else self.weights, path)
        self.member = Member(model, self.facts["img_size"], self.facts["normalize"])
        self.folds, self.fold = self.config.get("folds", 0), self.config.get("fold", 0)
        self.label_mode = self.config.get("label_mode", "class")

    def describe(self):
        fold = f", fold {self.fold} of {self.folds}" if self.folds else ""
        return (f"Checkpoint {self.path}: {self.state['model_name']} {self.state['model_kwargs']}, "
                f"{self.weights} weights, epoch {self.state['epoch'] + 1}, trained by "
                f"{self.state['method']}{fold}")

    def split(self, data):
        """The split this checkpoint was trained with, rebuilt from its config."""
        split = make_split(data, self.config["labeled_ratio"], self.config["num_labeled"],
                           self.config["split_seed"], folds=self.folds, fold=self.fold)
        if split.val.tolist() != self.facts["val_indices"]:
            print(f"warning: the rebuilt validation split of {self.path} differs from the one "
                  "in the checkpoint (has the data changed?)")
        return split


def check_members_agree(checkpoints):
    """Ensemble members must predict the same classes in the same label mode."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        if other.facts["num_classes"] != first.facts["num_classes"]:
            raise InputError(f"{other.path}: {other.facts['num_classes']} classes, {first.path} "
                             f"has {first.facts['num_classes']}; ensemble members must predict "
                             "the same classes")
        names, first_names = other.facts.get("class_names", {}), first.facts.get("class_names", {})
        if names != first_names:
            differing = sorted(set(names.items()) ^ set(first_names.items()))[0][0]
            raise InputError(f"{other.path}: class {differing} is "
                             f"'{names.get(differing, '(none)')}', in {first.path} "
                             f"'{first_names.get(differing, '(none)')}'; ensemble members must "
                             "name their classes alike")
        if other.label_mode != first.label_mode:
            raise InputError(f"{other.path}: label_mode {other.label_mode}, {first.path} has "
                             f"{first.label_mode}; ensemble members must share the label mode")


def check_folds_partition(checkpoints):
    """`--split oof`: the checkpoints must be the K folds of one split, each fold once."""
    first = checkpoints[0]
    for checkpoint in checkpoints:
        if checkpoint.folds < 2:
            raise InputError(f"{checkpoint.path}: not a fold checkpoint (trained without "
                             "--folds K); --split oof needs the K checkpoints of one --folds K "
                             "split")
        for what, value in (("--folds", lambda c: c.folds),
                            ("split_seed", lambda c: c.config["split_seed"]),
                            ("data folder", lambda c: c.facts["root"])):
            if value(checkpoint) != value(first):
                raise InputError(f"{checkpoint.path}: {what} {value(checkpoint)}, {first.path} "
                                 f"has {value(first)}; --split oof needs the folds of one split")
    by_fold = {}
    for checkpoint in checkpoints:
        if checkpoint.fold in by_fold:
            raise InputError(f"--split oof: {by_fold[checkpoint.fold].path} and {checkpoint.path} "
                             f"both validate fold {checkpoint.fold}")
        by_fold[checkpoint.fold] = checkpoint
    missing = sorted(set(range(first.folds)) - set(by_fold))
    if missing:
        raise InputError(f"--split oof: fold {', '.join(map(str, missing))} of --folds "
                         f"{first.folds} missing (given: {', '.join(map(str, sorted(by_fold)))}); "
                         "every labeled image must be validated by one checkpoint")


def mixed_validation(checkpoints, splits, split_name):
    """Why `--split val|train` means nothing for these checkpoints (None when it does): several
    checkpoints must share one split, else a member's validation images trained another."""
    if all(np.array_equal(s.val, splits[0].val) for s in splits[1:]):
        return None
    folds = sorted({c.fold for c in checkpoints if c.folds})
    which = (f"folds {', '.join(map(str, folds))} of one --folds split"
             if len(folds) == len(checkpoints) else "different splits")
    return (f"--split {split_name}: the checkpoints validate on different images ({which}), so "
            "one member's validation images trained another; use --split oof for the "
            "cross-validated score of K fold checkpoints")


def no_validation(checkpoints, splits, split_name):
    """Why `--split val` means nothing for a checkpoint trained on every labeled image
    (`labeled_ratio: 1`), or None."""
    if split_name != "val" or len(splits[0].val):
        return None
    return (f"--split val: {checkpoints[0].path} was trained with labeled_ratio 1 (every labeled "
            "image trained it), so there is no validation split to score; use --split train, "
            "or the test images")


def main_score(data):
    """The score that ranks predictions: Dice of classes, the Rand index of structure ids."""
    return "rand" if data.label_mode == "instance" else "dice"


def summary_line(scores):
    dice = f"per-class Dice {scores['dice']:.4f} | " if "dice" in scores else ""
    return (f"{dice}Rand index {scores['rand']:.4f} | foreground predicted "
            f"{scores['fg_pred']:.4f} vs true {scores['fg_true']:.4f}")


def report(title, truth, predictions, data, annotated=None):
    """Print the challenge scores of `predictions` and, for classes, the per-class table.

    Structure ids (instance mode, and the watershed baseline, whose folder is read as ids) get
    the Rand index only: a per-class Dice of ids means nothing. Returns (the scores of
    `score_labels`, the `class_area_report`, None for structure ids)."""
    scores = score_labels(truth, predictions, data, annotated)
    if data.label_mode == "instance":
        print(f"{title}: {summary_line(scores)} (structure ids: no per-class Dice)")
        return scores, None
    print(f"{title}: {summary_line(scores)}")
    print(format_dice_table(dice_table(truth, predictions, data.num_classes), data.class_names))
    areas = class_area_report(truth, predictions, data.num_classes, annotated)
    print(f"Predicted vs true area per class{' (annotated slices only)' if annotated is not None else ''}:")
    print(format_area_report(areas, data.class_names))
    return scores, areas


def json_safe(value):
    """`value` with only JSON types: NaN and infinities become None, tuples lists, numpy
    scalars Python numbers, paths and other objects their text."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def split_entry(scores, areas, data, slices):
    """The scores.json entry of one scored split, from `report`'s (scores, areas): the challenge
    scores (Dice None for structure ids), per-class Dice by class name, and the area report of
    the classes it judges (None for structure ids)."""
    names = data.class_names or {}
    names = {int(label): str(text) for label, text in (
        names.items() if isinstance(names, dict) else enumerate(names))}

    def name(label):
        return names.get(int(label)) or str(label)

    per_class = scores.get("per_class_dice")
    entry = {"slices": slices, "dice": scores.get("dice"), "rand": scores["rand"],
             "fg_pred": scores["fg_pred"], "fg_true": scores["fg_true"],
             "per_class_dice": None if per_class is None else {
                 name(label): per_class[label] for label in range(1, len(per_class))},
             "area": None, "worst_area_ratio": None, "sink_classes": None, "missing_classes": None}
    if areas is not None:
        judged = np.flatnonzero(~np.isnan(areas["ratio"]))
        entry["area"] = {name(label): {
            "predicted": int(areas["predicted"][label]), "true": int(areas["true"][label]),
            "ratio": float(areas["ratio"][label]),
            "flag": "SINK" if areas["sink"][label] else "MISSING" if areas["missing"][label] else ""}
            for label in judged}
        entry["worst_area_ratio"] = area_summary(areas)["worst_area_ratio"]
        entry["sink_classes"] = [name(label) for label in np.flatnonzero(areas["sink"])]
        entry["missing_classes"] = [name(label) for label in np.flatnonzero(areas["missing"])]
    return json_safe(entry)


def write_scores(path, checkpoints, cfg, data, splits):
    """Write scores.json: what was scored (checkpoints, weights, TTA, background scale,
    post-processing, the training config) and one `split_entry` per scored split. Returns a note
    for the summary."""
    document = {"checkpoints": [str(c.path) for c in checkpoints],
                "weights": [c.weights for c in checkpoints], "tta": cfg.tta,
                **{key: cfg[key] if data.label_mode == "class" else None  # class maps only
                   for key in ("background_scale", "postprocess")},
                "baseline": cfg.baseline or None,
                "data": str(data.root), "label_mode": data.label_mode,
                "config": checkpoints[0].config if checkpoints else None}
    if len(checkpoints) > 1:
        document["member_configs"] = [c.config for c in checkpoints]
    text = json.dumps(json_safe({**document, **splits}), indent=1, allow_nan=False)
    try:
        with atomic_path(path) as temporary:
            Path(temporary).write_text(text + "\n")
    except OSError as error:
        print(f"warning: could not write {path} ({error.strerror or error}); pass --out to "
              "write the submission and scores.json elsewhere")
        return f"scores not written ({path}: {error.strerror or error})"
    return f"scores {path}"


def report_members(checkpoints, member_labels, truth, data, annotated=None):
    """One score line per ensemble member; returns (best member's main score, its checkpoint)."""
    best = None
    for checkpoint, labels in zip(checkpoints, member_labels):
        scores = score_labels(truth, labels, data, annotated)
        print(f"  member {checkpoint.path}: {summary_line(scores)}")
        if best is None or scores[main_score(data)] > best[0]:
            best = (scores[main_score(data)], checkpoint)
    return best


def load_members(patterns, cfg):
    """The checkpoints of `--ckpt` (one, or an ensemble's members), described and checked
    against each other and the options."""
    checkpoints = [Checkpoint(path, cfg.weights) for path in find_checkpoints(patterns)]
    check_members_agree(checkpoints)
    for checkpoint in checkpoints:
        print(checkpoint.describe())
        if cfg.tta in ("flip", "shift_flip") and not checkpoint.config.get("aug_flip", False):
            print(f"warning: --tta with flips on {checkpoint.path}, trained without flips: "
                  "left and right organs are different classes, so mirrored slices may "
                  "confuse it")
    if len(checkpoints) > 1:
        print(f"Ensemble of {len(checkpoints)} checkpoints: mean softmax, each with its own "
              "preprocessing")
    if "postprocess" in cfg._overrides and cfg.postprocess and checkpoints[0].label_mode == "instance":
        raise InputError("--postprocess: cleans class maps per class; the structures of an "
                         "instance checkpoint are already cleaned by the watershed (small "
                         "seeds merged, small regions removed)")
    if "background_scale" in cfg._overrides and checkpoints[0].label_mode == "instance":
        raise InputError("--background_scale: scales the background of class maps; an instance "
                         "checkpoint's structures come from its background / interior / boundary "
                         "probabilities by the watershed")
    return checkpoints


def finished(labels, cfg, label_mode="class"):
    """Class maps `labels (N,H,W)` after `--postprocess` (unchanged without it). Structure ids
    (instance mode) are left alone: the watershed has cleaned them already."""
    if not cfg.postprocess or label_mode == "instance":
        return labels
    return postprocess(labels, cfg.min_component_size, cfg.single_instance_classes)


def model_predictor(checkpoints, cfg, device, label_mode):
    """The predict function of `checkpoints` (their ensemble when several), with `--tta`,
    `--background_scale` and `--postprocess`: `predict(images (N,H,W), each_member=False)`
    returns (labels (N,H,W), each member's labels (M,N,H,W) when `each_member`, else None)."""
    members = [c.member for c in checkpoints]

    def predict(images, each_member=False):
        prediction = predict_ensemble(members, images, device, cfg.batch_size, cfg.tta,
                                      each_member=each_member,
                                      progress=lambda it: tqdm(it, desc="predict", leave=False),
                                      label_mode=label_mode, background_scale=cfg.background_scale)
        member_labels = ([finished(labels, cfg, label_mode) for labels in prediction.member_labels]
                         if each_member else None)
        return finished(prediction.labels, cfg, label_mode), member_labels
    return predict


def baseline_predict(images, each_member=False):
    """The watershed baseline as a predict function: (structure ids (N,H,W), None: no members).
    `--postprocess` cleans classes, so it leaves these ids alone."""
    return watershed_baseline(np.asarray(images)), None


@dataclass
class Scoring:
    """What every scoring task needs: the models (or the baseline), their data and where the
    results go."""
    cfg: Config                 # the resolved test config
    device: torch.device        # where the networks predict
    data: ChallengeData         # the data scored, in the checkpoints' label mode (the baseline: ids)
    checkpoints: list           # the --ckpt `Checkpoint`s (an ensemble's members); [] = baseline
    predict: Callable           # `model_predictor` of the checkpoints, or `baseline_predict`
    out_dir: Path               # overlays, default submission: the checkpoints' (common) folder, or --data
    submission_path: Path       # the submission file (`--out`); scores.json goes next to it

    @property
    def ensemble(self):
        return len(self.checkpoints) > 1

    @property
    def partial_labels(self):
        """Every checkpoint was trained on partial labels: the classes annotated on a slice are
        the ones scored (vacuously true for the baseline, whose ids `report` scores whole)."""
        return all(c.config["partial_labels"] for c in self.checkpoints)

    def annotated(self, indices):
        """`annotated (N,C)` of the training slices `indices` with partial labels, else None."""
        return self.data.annotated[indices] if self.partial_labels else None

    @property
    def title_note(self):
        """Said after a score's title when a model's class scores read annotated classes only."""
        restricted = self.partial_labels and self.checkpoints and self.data.label_mode == "class"
        return " (annotated classes only)" if restricted else ""


def resolve_config(argv):
    """The `--ckpt` patterns of `argv` (or None), its test config — checked (utils.runtime's
    `check_config`: the choices, and `--baseline` without what needs a model) and frozen — and
    the device."""
    patterns, argv = checkpoint_arguments(argv)
    cfg = load_config("test", argv, __doc__)
    device = pick_device(cfg.gpu)
    check_config(cfg, "test")
    return patterns, cfg.freeze(), device


def load_baseline(cfg, device):
    """`--baseline watershed`: the `Scoring` of the baseline on `--data`, its results in the data
    folder (or next to `--out`)."""
    out_dir = Path(cfg.data)
    # Scored by the Rand index only, for which class ids are structure ids too: reading the
    # masks as ids accepts #165 and #150 folders alike.
    data = load_challenge(cfg.data, label_mode="instance")
    print("Scoring the watershed baseline (Sobel + median + markers + watershed).")
    submission_path = Path(cfg.out) if cfg.out else out_dir / "submission.csv"
    return Scoring(cfg, device, data, [], baseline_predict, out_dir, submission_path)


def load_models(checkpoints, cfg, device):
    """The `Scoring` of `checkpoints` on the data they were trained on (or `--data`), their
    results next to them (an ensemble's in the members' common folder) or next to `--out`."""
    roots = sorted({c.facts["root"] for c in checkpoints})
    if not cfg.data and len(roots) > 1:
        raise InputError(f"--ckpt: the checkpoints were trained on different data folders "
                         f"({', '.join(roots)}); pass --data")
    facts, first = checkpoints[0].facts, checkpoints[0].path
    data = load_challenge(cfg.data or roots[0], num_classes=facts["num_classes"],
                          label_mode=checkpoints[0].label_mode)
    if data.num_classes != facts["num_classes"]:
        raise InputError(f"{first}: trained for {facts['num_classes']} classes, the data in "
                         f"{data.root} has {data.num_classes}")
    parents = [str(c.path.parent.absolute()) for c in checkpoints]
    out_dir = Path(parents[0]) if len(checkpoints) == 1 else Path(os.path.commonpath(parents))
    submission_path = Path(cfg.out) if cfg.out else out_dir / (
        "ensemble_submission.csv" if len(checkpoints) > 1 else "submission.csv")
    return Scoring(cfg, device, data, checkpoints,
                   model_predictor(checkpoints, cfg, device, data.label_mode), out_dir,
                   submission_path)


def score_validation(scoring):
    """`--split val|train`: score the validation (or training) slices of the checkpoints' split
    (the baseline: the default config's split); an ensemble's members get a line each first.

    When the split means nothing for these checkpoints (`mixed_validation`, `no_validation`):
    an error if `--split` was given, else a note, and nothing is scored. Returns {split name:
    its scores.json entry}, or {} when skipped."""
    cfg, data, checkpoints = scoring.cfg, scoring.data, scoring.checkpoints
    if checkpoints:
        splits = [c.split(data) for c in checkpoints]
    else:
        defaults = script_defaults("default")  # the training scripts' default split
        splits = [make_split(data, defaults.labeled_ratio, defaults.num_labeled, defaults.split_seed)]
    skipped = mixed_validation(checkpoints, splits, cfg.split) or no_validation(
        checkpoints, splits, cfg.split)
    if skipped and "split" in cfg._overrides:
        raise InputError(skipped)
    if skipped:
        print(f"note: {skipped}. Validation is skipped; the test images follow.")
        return {}
    indices = splits[0].val if cfg.split == "val" else splits[0].train
    truth = np.asarray(data.train_masks[indices])
    annotated = scoring.annotated(indices)
    predictions, member_labels = scoring.predict(data.train_images[indices], scoring.ensemble)
    if scoring.ensemble:
        report_members(checkpoints, member_labels, truth, data, annotated)
    title = f"{'ensemble, ' if scoring.ensemble else ''}{cfg.split} ({len(indices)} slices)"
    return {cfg.split: split_entry(*report(title + scoring.title_note, truth, predictions, data,
                                           annotated), data, len(indices))}


def score_out_of_fold(scoring):
    """`--split oof`: every labeled slice predicted by the fold checkpoint that validated it (a
    line per fold), then scored together. Returns {"oof": its scores.json entry}."""
    checkpoints, data = scoring.checkpoints, scoring.data
    check_folds_partition(checkpoints)
    labeled = data.labeled_indices
    truth = np.asarray(data.train_masks[labeled])
    annotated = scoring.annotated(labeled)
    predictions = np.empty_like(truth)
    for checkpoint in sorted(checkpoints, key=lambda c: c.fold):
        fold = checkpoint.split(data).val
        rows = np.searchsorted(labeled, fold)
        predict = model_predictor([checkpoint], scoring.cfg, scoring.device, data.label_mode)
        predictions[rows] = predict(data.train_images[fold])[0]
        scores = score_labels(truth[rows], predictions[rows], data,
                              None if annotated is None else annotated[rows])
        print(f"  fold {checkpoint.fold} ({len(fold)} slices, {checkpoint.path}): "
              f"{summary_line(scores)}")
    title = f"out-of-fold ({len(labeled)} labeled slices, {len(checkpoints)} folds)"
    return {"oof": split_entry(*report(title + scoring.title_note, truth, predictions, data,
                                       annotated), data, len(labeled))}


def check_test_split(scoring):
    """`--split test`: only the test images are scored (`predict_test_images`), so the data must
    have them and their labels. Returns {}: no training slices scored."""
    data = scoring.data
    if data.test_images is None:
        raise InputError(f"{data.root}: --split test, but there are no test images "
                         "(test-images/ or test-images.zip)")
    if data.test_masks is None:
        raise InputError(f"{data.root}: --split test needs test labels (y_test.csv)")
    return {}


def write_submission(scoring, predictions):
    """Write the test `predictions (N,H,W)` as the submission and read it back to check it.
    Returns its summary part."""
    data, path = scoring.data, scoring.submission_path
    write_label_csv(path, predictions, data.test_names)
    masks, names, _ = read_label_csv(path)
    if names != list(data.test_names) or not np.array_equal(masks, predictions):
        raise InputError(f"{path}: the submission read back differs from what was written")
    return f"submission {path} ({masks.shape[1] * masks.shape[2]} pixel rows x {len(names)} images)"


def score_test(scoring, predictions, member_labels):
    """Print the scores of the test `predictions` against the test labels (an ensemble's
    `member_labels` get a line each first). Returns (the scores.json entry, for an ensemble the
    summary part comparing it with its best member, else None)."""
    data = scoring.data
    best = (report_members(scoring.checkpoints, member_labels, data.test_masks, data)
            if scoring.ensemble else None)
    scores, areas = report(f"{'ensemble, ' if scoring.ensemble else ''}test "
                           f"({len(data.test_names)} slices, full labels)",
                           data.test_masks, predictions, data)
    entry = split_entry(scores, areas, data, len(data.test_names))
    if best is None:
        return entry, None
    metric = main_score(data)
    return entry, (f"test {METRIC_NAMES[metric]}: ensemble {scores[metric]:.4f}, "
                   f"best member {best[0]:.4f} ({best[1].path})")


def save_test_overlays(scoring, predictions):
    """Save `--save_png` overlays of the first test `predictions` (with their truth when the
    data has test labels) in `<out_dir>/predictions_png/`. Returns its summary part."""
    data = scoring.data
    count = min(scoring.cfg.save_png, len(data.test_names))
    png_dir = scoring.out_dir / "predictions_png"
    truths = data.test_masks[:count] if data.test_masks is not None else None
    save_overlays(png_dir, data.test_names[:count], data.test_images[:count], predictions[:count],
                  colour_count(data, predictions[:count], truths), truths)
    return f"{count} overlays in {png_dir}/"


def predict_test_images(scoring):
    """The test images, when the data folder has them: predicted, written as the submission
    (checkpoints only), scored when it has test labels, and drawn (`--save_png`, checkpoints
    only). Returns ({"test": its scores.json entry} when scored, else {}; the summary parts)."""
    data = scoring.data
    if data.test_images is None:
        return {}, [f"no test images in {data.root}, so no submission"]
    labeled = data.test_masks is not None
    predictions, member_labels = scoring.predict(data.test_images, scoring.ensemble and labeled)
    results, summary = {}, []
    if scoring.checkpoints:
        summary.append(write_submission(scoring, predictions))
    if labeled:
        results["test"], comparison = score_test(scoring, predictions, member_labels)
        if comparison:
            summary.append(comparison)
    if scoring.cfg.save_png and scoring.checkpoints:
        summary.append(save_test_overlays(scoring, predictions))
    return results, summary


def finish(scoring, results, summary):
    """Write scores.json (`results`: split name -> its entry) next to the submission and print
    the "Done: …" line of the `summary` parts."""
    if not scoring.checkpoints:
        summary = summary + ["the watershed baseline writes no submission"]
    summary = summary + [write_scores(scoring.submission_path.parent / "scores.json",
                                      scoring.checkpoints, scoring.cfg, scoring.data, results)]
    print("Done: " + "; ".join(summary) + ". Next: edit a train_*.py script or its config and rerun.")


def predict_images(checkpoints, cfg, device):
    """`--images DIR`: predict every PNG of a folder of new slices (any size each, no labels or
    training files) with the checkpoints' preprocessing, `--tta` and `--postprocess`; write one
    label PNG per image (class ids, or structure ids in instance mode) to `--out_dir`
    (default `<checkpoint folder>/predictions/<DIR name>/`), `--save_png N` overlays, and the
    challenge CSV when every image has the same size."""
    folder = Path(cfg.images)
    images = read_image_folder(folder)
    names = [name for name, _ in images]
    out_dir = (Path(cfg.out_dir) if cfg.out_dir
               else checkpoints[0].path.parent / "predictions" / folder.name)
    label_mode = checkpoints[0].label_mode
    predict = model_predictor(checkpoints, cfg, device, label_mode)
    by_size = {}  # one batch stack per image size
    for position, (_, image) in enumerate(images):
        by_size.setdefault(image.shape, []).append(position)
    labels = [None] * len(images)
    for positions in by_size.values():
        stack = np.stack([images[position][1] for position in positions])
        for position, label in zip(positions, predict(stack)[0]):
            labels[position] = label
    for name, label in zip(names, labels):
        with atomic_path(out_dir / name) as temporary:
            if not cv2.imwrite(temporary, label):
                raise InputError(f"{out_dir / name}: could not write the label PNG")
    what = "structure ids" if label_mode == "instance" else "class ids"
    summary = [f"{len(names)} label PNGs ({what}) in {out_dir}/"]
    if cfg.save_png:
        count = min(cfg.save_png, len(names))
        colours = (max(int(label.max()) for label in labels) + 1 if label_mode == "instance"
                   else checkpoints[0].facts["num_classes"])
        save_overlays(out_dir / "overlays", names[:count], [image for _, image in images[:count]],
                      labels[:count], colours)
        summary.append(f"{count} overlays in {out_dir / 'overlays'}/")
    if len(by_size) == 1:
        out = Path(cfg.out) if cfg.out else out_dir / "submission.csv"
        write_label_csv(out, np.stack(labels), names)
        summary.append(f"submission {out}")
    else:
        summary.append(f"no submission CSV: the images have {len(by_size)} sizes")
    print("Done: " + "; ".join(summary) + ".")


def main(argv=None):
    patterns, cfg, device = resolve_config(argv)
    if cfg.baseline:
        scoring = load_baseline(cfg, device)
    else:
        checkpoints = load_members(patterns or [cfg.ckpt], cfg)
        if cfg.images:
            return predict_images(checkpoints, cfg, device)
        scoring = load_models(checkpoints, cfg, device)
    score_split = {"oof": score_out_of_fold, "test": check_test_split}.get(cfg.split, score_validation)
    results = score_split(scoring)
    test_results, summary = predict_test_images(scoring)
    finish(scoring, {**results, **test_results}, summary)


if __name__ == "__main__":
    run_cli(main)
