"""K-fold splits, checkpoint ensembles and out-of-fold scores (README, Cross-validation and
ensembles), on the tiny phantom with tiny networks saved as checkpoints."""
import csv
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import test as test_script
from conftest import one_line_error
import train_supervised
from dataloaders import load_challenge, make_split
from networks import build_model
from utils.checkpoint import save_checkpoint
from utils.errors import InputError
from utils.metrics import score_predictions


# ==== the split ====
def test_folds_partition_the_labeled_images_in_near_equal_parts(tiny_phantom):
    data = load_challenge(tiny_phantom)
    labeled = data.labeled_indices
    assert len(labeled) == 12
    splits = [make_split(data, 0.75, split_seed=4, folds=5, fold=k) for k in range(5)]
    # consecutive parts of the seeded shuffle, sizes 3, 3, 2, 2, 2 (12 = 5·2 + 2)
    shuffled = np.random.default_rng(4).permutation(labeled)
    bounds = [0, 3, 6, 8, 10, 12]
    for k, split in enumerate(splits):
        assert split.val.tolist() == sorted(shuffled[bounds[k]:bounds[k + 1]])
        assert split.train.tolist() == sorted(set(labeled) - set(split.val))
        assert split.unlabeled.tolist() == data.unlabeled_indices.tolist()
    validated = np.concatenate([s.val for s in splits])
    assert sorted(validated) == labeled.tolist()                  # disjoint and covering
    again = make_split(data, 0.75, split_seed=4, folds=5, fold=2)
    assert again.val.tolist() == splits[2].val.tolist()           # a pure function
    other_seed = [make_split(data, 0.75, split_seed=5, folds=5, fold=k).val.tolist() for k in range(5)]
    assert other_seed != [s.val.tolist() for s in splits]


def test_folds_zero_is_the_ratio_split_and_num_labeled_still_restricts(tiny_phantom):
    data = load_challenge(tiny_phantom)
    shuffled = np.random.default_rng(1).permutation(data.labeled_indices)
    ratio = make_split(data, 0.75, split_seed=1)
    assert ratio.train.tolist() == sorted(shuffled[:9]) and ratio.val.tolist() == sorted(shuffled[9:])
    fold = make_split(data, 0.75, split_seed=1, folds=3, fold=1)
    few = make_split(data, 0.75, num_labeled=5, split_seed=1, folds=3, fold=1)
    assert few.val.tolist() == fold.val.tolist() == sorted(shuffled[4:8])
    assert few.train.tolist() == sorted(np.concatenate([shuffled[:4], shuffled[8:9]]))
    assert few.unlabeled.tolist() == sorted(set(data.unlabeled_indices) | set(shuffled[9:]))


@pytest.mark.parametrize("folds, fold, message", [
    (3, 3, "fold: 3 is not between 0 and 2 \\(--folds 3\\)"),
    (3, -1, "fold: -1 is not between 0 and 2"),
    (1, 0, "folds: 1 is not 0 \\(the labeled_ratio split\\) or at least 2"),
    (-2, 0, "folds: -2 is not 0"),
    (13, 0, "folds: 13 folds but .* has only 12 labeled images"),
    (0, 1, "fold: 1 given without --folds"),
])
def test_bad_fold_arguments(tiny_phantom, folds, fold, message):
    with pytest.raises(InputError, match=message):
        make_split(load_challenge(tiny_phantom), 0.75, folds=folds, fold=fold)


def test_training_scripts_reject_bad_folds(tiny_phantom, capsys, tmp_path, monkeypatch):
    from conftest import ROOT
    monkeypatch.chdir(tmp_path)
    os.symlink(ROOT / "configs", tmp_path / "configs")
    argv = ["--config", "configs/tiny.yaml", "--data", str(tiny_phantom), "--folds", "3"]
    assert "error: fold: 3 is not between 0 and 2" in one_line_error(
        capsys, argv + ["--fold", "3"], train_supervised.main)


# ==== checkpoints of tiny networks ====
NORMS = [{"mean": 0.2, "std": 0.3}, {"mean": 0.5, "std": 0.25}]


def save_member(path, root, img_size=64, seed=0, norm=NORMS[0], folds=0, fold=0,
                split_seed=0, constant_class=None, num_classes=15, label_mode=None):
    """A checkpoint of an untrained AttUNet-4 laid out as a training run writes it; with
    `constant_class` the network predicts that class everywhere (zero classifier weights)."""
    torch.manual_seed(seed)
    model = build_model("attunet", in_channels=1, num_classes=num_classes, base=4)
    if constant_class is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.zero_()
            model.classifier.bias[constant_class] = 10.0
    data = load_challenge(root)
    config = {"labeled_ratio": 0.75, "num_labeled": 0, "split_seed": split_seed,
              "partial_labels": True, "aug_flip": False, "folds": folds, "fold": fold}
    if label_mode is not None:
        config["label_mode"] = label_mode
    split = make_split(data, 0.75, 0, split_seed, folds=folds, fold=fold)
    facts = {"num_classes": num_classes, "class_names": data.class_names, "img_size": img_size,
             "normalize": norm, "root": str(root), "val_indices": split.val.tolist()}
    save_checkpoint({"model_name": "attunet", "model_kwargs": {"in_channels": 1,
                     "num_classes": num_classes, "base": 4}, "model": model.state_dict(),
                     "teacher": None, "method": "supervised", "epoch": 0, "config": config,
                     "data": facts}, path)
    return model.eval()


def softmax_at_file_size(model, images, img_size, norm):
    """The member's softmax for `images (N,H,W) uint8`, computed here step by step."""
    x = torch.from_numpy(np.array(images))[:, None]
    x = v2.functional.resize(x, [img_size, img_size], antialias=True)
    x = (x.float() / 255.0 - norm["mean"]) / norm["std"]
    with torch.no_grad():
        probabilities = model(x).softmax(1)
    return F.interpolate(probabilities, size=images.shape[1:], mode="bilinear",
                         align_corners=False)


def read_submission(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    values = np.array([row[1:] for row in rows[1:]], dtype=np.uint8)   # (pixels, images)
    return rows[0][1:], values.T


def test_ensemble_is_the_argmax_of_the_members_mean_softmax(tiny_phantom, tmp_path, capsys):
    """Two members with different image sizes (32 and 64) and normalisations; the background
    probability of the mean (and of each member, for its own line) scaled by --background_scale."""
    data = load_challenge(tiny_phantom)
    models = [save_member(tmp_path / "a" / "best.pth", tiny_phantom, 32, 0, NORMS[0]),
              save_member(tmp_path / "b" / "best.pth", tiny_phantom, 64, 1, NORMS[1])]
    out = tmp_path / "ensemble.csv"
    test_script.main(["--gpu", "-1", "--ckpt", str(tmp_path / "a" / "best.pth"),
                      str(tmp_path / "b" / "best.pth"), "--out", str(out), "--tta", "none",
                      "--no-postprocess", "--background_scale", "0.5"])
    printed = capsys.readouterr().out
    names, submitted = read_submission(out)
    assert names == list(data.test_names)

    def background_halved(probabilities):
        return torch.cat([probabilities[:, :1] / 2, probabilities[:, 1:]], 1)

    images = np.asarray(data.test_images)
    unscaled = [softmax_at_file_size(m, images, size, norm) for m, size, norm in zip(models, (32, 64), NORMS)]
    each = [background_halved(probabilities) for probabilities in unscaled]
    mean = (each[0] + each[1]) / 2
    expected = mean.argmax(1).numpy()
    top2 = mean.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1] > 1e-5).numpy()        # pixels that no rounding can flip
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(submitted.reshape(expected.shape)[clear], expected[clear])
    # the members differ, so averaging changed something (else this test could not fail)
    assert (each[0].argmax(1) != each[1].argmax(1)).any()
    assert (((unscaled[0] + unscaled[1]) / 2).argmax(1).numpy() != expected).any()  # and so did the scale

    for path, probabilities in zip(("a", "b"), each):
        scores = score_predictions(data.test_masks, probabilities.argmax(1).numpy().astype(np.uint8),
                                   data.num_classes)
        assert (f"member {tmp_path / path / 'best.pth'}: per-class Dice {scores['dice']:.4f} | "
                f"Rand index {scores['rand']:.4f}") in printed
    assert "ensemble, test (6 slices, full labels): per-class Dice" in printed
    assert "test Dice: ensemble" in printed and "best member" in printed


def test_a_quoted_glob_names_the_members(tiny_phantom, tmp_path, capsys):
    for k in range(2):
        save_member(tmp_path / f"run{k}" / "best.pth", tiny_phantom, 32, k)
    test_script.main(["--gpu", "-1", "--ckpt", str(tmp_path / "run*" / "best.pth")])
    printed = capsys.readouterr().out
    assert "Ensemble of 2 checkpoints" in printed
    assert (tmp_path / "ensemble_submission.csv").is_file()     # in the members' common folder


@pytest.fixture
def two_folds(tiny_phantom, tmp_path):
    """The two fold checkpoints of `--folds 2`: fold 0's model always says class 1 (liver),
    fold 1's always class 2 (spleen)."""
    paths = [tmp_path / f"fold{k}" / "best.pth" for k in range(2)]
    for k, path in enumerate(paths):
        save_member(path, tiny_phantom, 32, folds=2, fold=k, constant_class=k + 1)
    return paths


def test_out_of_fold_predicts_each_image_with_the_model_that_validated_it(
        tiny_phantom, two_folds, capsys):
    data = load_challenge(tiny_phantom)
    labeled = data.labeled_indices
    shuffled = np.random.default_rng(0).permutation(labeled)
    fold_of = {index: 0 for index in shuffled[:6]} | {index: 1 for index in shuffled[6:]}
    truth = np.asarray(data.train_masks[labeled])
    annotated = data.annotated[labeled]

    def score_when(class_of_fold):
        predictions = np.stack([np.full(truth.shape[1:], class_of_fold[fold_of[i]], np.uint8)
                                for i in labeled])
        return score_predictions(truth, predictions, data.num_classes, annotated)["dice"]

    right, swapped = score_when({0: 1, 1: 2}), score_when({0: 2, 1: 1})
    assert f"{right:.4f}" != f"{swapped:.4f}"                 # the assignment is visible
    test_script.main(["--gpu", "-1", "--split", "oof", "--ckpt"] + [str(p) for p in two_folds])
    printed = capsys.readouterr().out
    assert (f"out-of-fold (12 labeled slices, 2 folds) (annotated classes only): "
            f"per-class Dice {right:.4f}") in printed
    assert f"fold 0 (6 slices, {two_folds[0]})" in printed


def test_oof_refuses_checkpoints_that_are_not_one_partition(tiny_phantom, two_folds, tmp_path,
                                                            capsys):
    base = ["--gpu", "-1", "--split", "oof", "--ckpt"]
    assert "fold 1 of --folds 2 missing (given: 0)" in one_line_error(
        capsys, base + [str(two_folds[0])])
    duplicate = tmp_path / "again" / "best.pth"
    save_member(duplicate, tiny_phantom, 32, seed=5, folds=2, fold=0)
    assert "both validate fold 0" in one_line_error(
        capsys, base + [str(two_folds[0]), str(duplicate), str(two_folds[1])])
    three = tmp_path / "three" / "best.pth"
    save_member(three, tiny_phantom, 32, folds=3, fold=2)
    assert "--folds 3" in one_line_error(capsys, base + [str(p) for p in two_folds] + [str(three)])
    seeded = tmp_path / "seeded" / "best.pth"
    save_member(seeded, tiny_phantom, 32, folds=2, fold=1, split_seed=7)
    assert "split_seed 7" in one_line_error(capsys, base + [str(two_folds[0]), str(seeded)])
    plain = tmp_path / "plain" / "best.pth"
    save_member(plain, tiny_phantom, 32)
    assert "not a fold checkpoint" in one_line_error(capsys, base + [str(plain)])


def test_val_with_several_folds_points_to_oof(two_folds, capsys, tmp_path):
    ckpts = ["--ckpt"] + [str(p) for p in two_folds]
    error = one_line_error(capsys, ["--gpu", "-1", "--split", "val"] + ckpts)
    assert "--split val: the checkpoints validate on different images" in error
    assert "use --split oof" in error
    test_script.main(["--gpu", "-1"] + ckpts)          # the default split: a note, then the test
    printed = capsys.readouterr().out
    assert "note: --split val: the checkpoints validate on different images" in printed
    assert "ensemble, test (6 slices, full labels)" in printed
    assert (tmp_path / "ensemble_submission.csv").is_file()


def test_members_must_agree_on_classes_and_label_mode(tiny_phantom, tmp_path, capsys):
    first = tmp_path / "first.pth"
    save_member(first, tiny_phantom)
    fewer = tmp_path / "fewer.pth"
    save_member(fewer, tiny_phantom, num_classes=9)
    assert "fewer.pth: 9 classes" in one_line_error(capsys, ["--ckpt", str(first), str(fewer)])
    instance = tmp_path / "instance.pth"
    save_member(instance, tiny_phantom, label_mode="instance")
    assert "instance.pth: label_mode instance" in one_line_error(
        capsys, ["--ckpt", str(first), str(instance)])
    assert "given twice" in one_line_error(capsys, ["--ckpt", str(first), str(first)])
