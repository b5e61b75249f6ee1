"""Score a checkpoint and write the challenge submission.

    python test.py --ckpt best.pth                  # tries runs/latest/best.pth if ./best.pth is absent
    python test.py --ckpt runs/latest/best.pth --tta shift --postprocess true --save_png 8
    python test.py --baseline watershed --data data/phantom   # the challenge's classical baseline

Everything about the model and its preprocessing comes from the checkpoint. The validation
split is rebuilt from the checkpoint's config and scored with the challenge metrics; when the
data folder has test images, their predictions are written as `submission.csv` next to the
checkpoint (or `--out`) and read back to check it; when it also has test labels (the phantom's
`y_test.csv`), the test predictions are scored too.
"""
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataloaders.challenge import load_challenge, make_split
from dataloaders.label_csv import read_label_csv, write_label_csv
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.config import CONFIG_DIR, load_config, read_yaml_chain
from utils.errors import InputError, run_cli
from utils.inference import TTA_MODES, predict_slices
from utils.metrics import dice_table, format_dice_table, rand_index, score_predictions
from utils.plots import save_overlays
from utils.postprocess import postprocess, watershed_baseline
from utils.runtime import pick_device


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


def report(title, truth, predictions, data, annotated=None, baseline=False):
    """Print the challenge scores of `predictions` and, for a model, the per-class table.

    The watershed baseline predicts structure ids, not classes: only its Rand index means
    anything, so it gets no Dice and no restriction to annotated classes."""
    if baseline:
        print(f"{title}: Rand index {rand_index(truth, predictions):.4f} "
              "(structure ids: no per-class Dice)")
        return
    scores = score_predictions(truth, predictions, data.num_classes, annotated)
    print(f"{title}: per-class Dice {scores['dice']:.4f} | Rand index {scores['rand']:.4f} | "
          f"foreground predicted {scores['fg_pred']:.4f} vs true {scores['fg_true']:.4f}")
    print(format_dice_table(dice_table(truth, predictions, data.num_classes), data.class_names))


def main(argv=None):
    cfg = load_config("test", argv, __doc__)
    device = pick_device(cfg.gpu)
    if cfg.tta not in TTA_MODES:
        raise InputError(f"--tta: unknown '{cfg.tta}' (choose {', '.join(TTA_MODES)})")
    if cfg.split not in ("val", "train", "test"):
        raise InputError(f"--split: unknown '{cfg.split}' (choose val, train or test)")

    # ==== model and data, all from the checkpoint ====
    if cfg.baseline:
        if cfg.baseline != "watershed":
            raise InputError(f"--baseline: unknown '{cfg.baseline}' (the only one is watershed)")
        if not cfg.data:
            raise InputError("--baseline watershed needs --data (there is no checkpoint)")
        state, model, out_dir = None, None, Path(cfg.data)
        # Scored by the Rand index only, for which class ids are structure ids too: reading the
        # masks as ids accepts #165 and #150 folders alike.
        data = load_challenge(cfg.data, label_mode="instance")
        train_cfg = read_yaml_chain(CONFIG_DIR / "default.yaml")[0]  # the training defaults' split
        print("Scoring the watershed baseline (Sobel + median + markers + watershed).")
    else:
        ckpt = find_checkpoint(cfg.ckpt)
        state = load_checkpoint(ckpt, map_location=device)
        if cfg.weights not in ("", "teacher", "student"):
            raise InputError(f"--weights: unknown '{cfg.weights}' (choose teacher or student)")
        weights = cfg.weights or ("teacher" if state.get("teacher") is not None else "student")
        model = model_from_checkpoint(state, "model" if weights == "student" else weights,
                                      ckpt).to(device)
        train_cfg, facts, out_dir = state["config"], state["data"], ckpt.parent
        data = load_challenge(cfg.data or facts["root"], num_classes=facts["num_classes"])
        if data.num_classes != facts["num_classes"]:
            raise InputError(f"{ckpt}: trained for {facts['num_classes']} classes, the data in "
                             f"{data.root} has {data.num_classes}")
        print(f"Checkpoint {ckpt}: {state['model_name']} {state['model_kwargs']}, "
              f"{weights} weights, epoch {state['epoch'] + 1}, trained by {state['method']}")
        if cfg.tta in ("flip", "shift_flip") and not train_cfg.get("aug_flip", False):
            print("warning: --tta with flips on a model trained without flips: left and right "
                  "organs are different classes, so mirrored slices may confuse it")

    def predict(images):
        if model is None:
            return watershed_baseline(np.asarray(images))
        predictions = predict_slices(model, images, facts["img_size"], facts["normalize"], device,
                                     cfg.batch_size, cfg.tta,
                                     progress=lambda it: tqdm(it, desc="predict", leave=False))
        if cfg.postprocess:
            predictions = postprocess(predictions, cfg.min_component_size,
                                      cfg.single_instance_classes)
        return predictions

    # ==== score the chosen split ====
    if cfg.split == "test":
        if data.test_images is None:
            raise InputError(f"{data.root}: --split test, but there are no test images "
                             "(test-images/ or test-images.zip)")
        if data.test_masks is None:
            raise InputError(f"{data.root}: --split test needs test labels (y_test.csv)")
    else:
        split = make_split(data, train_cfg["labeled_ratio"], train_cfg["num_labeled"],
                           train_cfg["split_seed"])
        if state is not None and split.val.tolist() != facts["val_indices"]:
            print("warning: the rebuilt validation split differs from the one in the checkpoint "
                  "(has the data changed?)")
        indices = split.val if cfg.split == "val" else split.train
        truth = np.asarray(data.train_masks[indices])
        predictions = predict(data.train_images[indices])
        partial = data.annotated[indices] if train_cfg["partial_labels"] else None
        note = " (annotated classes only)" if partial is not None and model is not None else ""
        report(f"{cfg.split} ({len(indices)} slices){note}", truth, predictions, data, partial,
               baseline=model is None)

    # ==== test images: submission, and scores when labels exist ====
    summary = []
    if data.test_images is not None:
        test_predictions = predict(data.test_images)
        if model is not None:
            out = Path(cfg.out) if cfg.out else out_dir / "submission.csv"
            write_label_csv(out, test_predictions, data.test_names)
            masks, names, _ = read_label_csv(out)
            if names != list(data.test_names) or not np.array_equal(masks, test_predictions):
                raise InputError(f"{out}: the submission read back differs from what was written")
            summary.append(f"submission {out} ({masks.shape[1] * masks.shape[2]} pixel rows x "
                           f"{len(names)} images)")
        if data.test_masks is not None:
            report(f"test ({len(data.test_names)} slices, full labels)", data.test_masks,
                   test_predictions, data, baseline=model is None)
        if cfg.save_png and model is not None:
            count = min(cfg.save_png, len(data.test_names))
            png_dir = out_dir / "predictions_png"
            truths = data.test_masks[:count] if data.test_masks is not None else None
            save_overlays(png_dir, data.test_names[:count], data.test_images[:count],
                          test_predictions[:count], data.num_classes, truths)
            summary.append(f"{count} overlays in {png_dir}/")
    else:
        summary.append(f"no test images in {data.root}, so no submission")
    if model is None:
        summary.append("the watershed baseline writes no submission")
    print("Done: " + "; ".join(summary) + ". Next: edit a train_*.py script or its config and rerun.")


if __name__ == "__main__":
    run_cli(main)
