"""Instance mode (#150) wired through the scripts: structure ids from predicted probabilities in
the shared prediction, 2-iteration runs of the three training scripts that test.py scores by the
Rand index and writes as ids, the phantom of the mode, and the one-line refusals."""
import csv
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import test as test_script
import train_supervised
import train_teacher_student
import train_unimatch
from conftest import training_config
from dataloaders import phantom
from dataloaders.challenge import load_challenge
from utils import runtime
from utils.builders import supervised_targets
from utils.checkpoint import load_checkpoint
from utils.config import load_config
from utils.errors import run_cli
from utils.inference import Member, predict_ensemble, predict_slices
from utils.losses import IGNORE_INDEX, build_loss, instance_zero_pixel_loss
from utils.metrics import rand_index

TINY = ["--config", "configs/tiny.yaml", "--label_mode", "instance"]


class FixedLogits(nn.Module):
    """Returns the same hand-made logits `[3, H, W]` for every image (the input is ignored)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(len(x), -1, -1, -1)


def confident(target, margin=10.0):
    """3-class map `(H, W)` -> logits with `margin` on its class (softmax ≈ one-hot)."""
    return margin * np.eye(3, dtype=np.float32)[target].transpose(2, 0, 1)


NORM = {"mean": 0.5, "std": 0.25}
IMAGES = np.zeros((2, 16, 16), np.uint8)  # what the network sees does not matter here


# ==== prediction returns structure ids ====
def test_prediction_in_instance_mode_returns_the_structures_of_the_probabilities():
    # two squares that touch along column 8, drawn with their 1-pixel boundaries:
    # B = background, N = interior, E = boundary (the left square's last column and the right
    # square's first column are both boundary: the contact line is two pixels wide)
    target = np.zeros((16, 16), np.int64)
    target[3:13, 2:8] = 2
    target[4:12, 3:7] = 1
    target[3:13, 8:14] = 2
    target[4:12, 9:13] = 1
    model = FixedLogits(confident(target))
    labels = predict_slices(model, IMAGES, 16, NORM, torch.device("cpu"), label_mode="instance")
    assert labels.dtype == np.uint8 and labels.shape == (2, 16, 16)
    left, right = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    left[3:13, 2:8], right[3:13, 8:14] = True, True
    for image in labels:
        assert set(np.unique(image)) == {0, 1, 2}           # two structures, ids 1 and 2
        assert np.all(image[~(left | right)] == 0)
        (id_left,), (id_right,) = np.unique(image[left]), np.unique(image[right])
        assert id_left != id_right                           # the boundary kept them apart
    classes = predict_slices(model, IMAGES, 16, NORM, torch.device("cpu"))  # class mode: argmax
    assert np.array_equal(classes[0], target)


def test_an_ensemble_averages_the_probabilities_before_the_watershed():
    # two separate squares; member A calls the right one background (logit 1 vs 0, 0), member
    # B calls both interior (logit 4). The mean on the right square, by hand:
    # A = (e, 1, 1) / (e + 2) = (0.576, 0.212, 0.212), B = (1, e⁴, 1) / (e⁴ + 2) = (0.018,
    # 0.964, 0.018), mean = (0.297, 0.588, 0.115): foreground (background < 0.5) and a seed
    # (interior ≥ 0.5), so the ensemble has both squares while member A has only the left one.
    left, right = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    left[4:12, 1:7], right[4:12, 9:15] = True, True
    logits_a = np.zeros((3, 16, 16), np.float32)
    logits_a[0] = 4.0 * ~(left | right) + 1.0 * right
    logits_a[1] = 4.0 * left
    logits_b = np.zeros((3, 16, 16), np.float32)
    logits_b[0] = 4.0 * ~(left | right)
    logits_b[1] = 4.0 * (left | right)
    members = [Member(FixedLogits(logits), 16, NORM) for logits in (logits_a, logits_b)]
    result = predict_ensemble(members, IMAGES, torch.device("cpu"), each_member=True,
                              label_mode="instance")
    structures = {(image == value).tobytes() for image in result.labels[:1]
                  for value in np.unique(image) if value}
    assert structures == {left.tobytes(), right.tobytes()}
    member_a = result.member_labels[0, 0]
    assert np.array_equal(member_a > 0, left) and len(np.unique(member_a[left])) == 1


# ==== the targets every script trains on ====
def test_supervised_targets_turn_ids_into_three_classes_and_ignore_uncertain_zeros():
    mask = torch.zeros(1, 6, 6, dtype=torch.long)
    mask[0, 1:5, 1:5] = 255                       # one structure; 255 is an id, not "ignore"
    air = torch.zeros(1, 6, 6, dtype=torch.bool)
    air[0, 0] = True                              # the top row is surely background
    batch = {"mask": mask, "certain_background": air, "image": torch.zeros(1, 1, 6, 6)}
    cfg = SimpleNamespace(label_mode="instance", boundary_width=1, partial_labels=True)
    I = IGNORE_INDEX  # noqa: E741  (one letter keeps the map square)
    expected = torch.tensor([[0, 0, 0, 0, 0, 0],
                             [I, 2, 2, 2, 2, I],
                             [I, 2, 1, 1, 2, I],
                             [I, 2, 1, 1, 2, I],
                             [I, 2, 2, 2, 2, I],
                             [I, I, I, I, I, I]])
    assert torch.equal(supervised_targets(batch, cfg)["mask"][0], expected)
    cfg.partial_labels = False                    # full labels: every 0 is background
    assert torch.equal(supervised_targets(batch, cfg)["mask"][0],
                       torch.where(expected == I, 0, expected))
    cfg.label_mode = "class"
    assert supervised_targets(batch, cfg) is batch


def test_the_instance_zero_pixel_term_lets_any_zero_pixel_be_an_unsegmented_structure():
    # one slice of 4 pixels: certain background (0), uncertain (IGNORE), interior, and an uncertain
    # pixel the caller excludes; probabilities (background, interior, boundary) chosen by hand
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    logits = torch.tensor(np.log(probabilities).T.reshape(1, 3, 1, 4), dtype=torch.float32)
    target = torch.tensor([[[0, IGNORE_INDEX, 1, IGNORE_INDEX]]])
    excluded = torch.tensor([[[False, False, False, True]]])
    rate = 0.9
    # -log(p_background + (1 - r)(p_interior + p_boundary)) on the first two pixels only, although
    # the slice holds a labelled interior (in class mode that class would count as annotated)
    expected = -(np.log(0.7 + 0.1 * 0.3) + np.log(0.1 + 0.1 * 0.9)) / 2
    got = instance_zero_pixel_loss(logits, target, excluded, annotation_rate=rate)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the training loss uses it as its zero-pixel term in instance mode (weight 0.5 here)
    cfg = training_config(label_mode="instance", num_classes=3, zero_ce_weight=0.5,
                          annotation_rate=rate)
    terms = build_loss(cfg).terms(logits, target, ignore=excluded)
    assert terms["zero_ce"].item() == pytest.approx(0.5 * expected, rel=1e-5)
    # rate 1: plain cross-entropy toward background on those pixels
    got = instance_zero_pixel_loss(logits, target, excluded, annotation_rate=1.0)
    assert got.item() == pytest.approx(-(np.log(0.7) + np.log(0.1)) / 2, rel=1e-5)


def test_instance_mode_trains_without_the_zero_pixel_term_unless_it_is_given(capsys):
    default = load_config("supervised", [])["zero_ce_weight"]
    assert default > 0
    assert runtime.zero_pixel_weight(load_config("supervised", ["--label_mode", "instance"])) == 0
    assert f"no zero-pixel term (zero_ce_weight 0, not {default}" in capsys.readouterr().out
    given = load_config("supervised", ["--label_mode", "instance", "--zero_ce_weight", "0.3"])
    assert runtime.zero_pixel_weight(given) == 0.3
    assert runtime.zero_pixel_weight(load_config("supervised", [])) == default  # class mode


# ==== the three scripts in instance mode, scored by test.py ====
@pytest.fixture(scope="module")
def instance_data(tmp_path_factory):
    """The tiny phantom of conftest (24 + 6 slices at 128x128) in the #150 layout."""
    return phantom.generate_phantom(tmp_path_factory.mktemp("tiny_instance") / "data",
                                    n_train=24, labeled_fraction=0.5, n_test=6, size=128, seed=3,
                                    label_format="instance")


RUNS = {
    "supervised": (train_supervised.main, []),
    "unimatch": (train_unimatch.main, []),
    "pseudo_label": (train_teacher_student.main, ["--mode", "pseudo_label", "--epochs", "1",
                                                  "--n_pseudo", "2"]),
    "mean_teacher": (train_teacher_student.main, ["--mode", "mean_teacher", "--epochs", "1"]),
    # 2 epochs: the second self-trains on the dual teacher's 3-class pseudo-labels
    "bcp": (train_teacher_student.main, ["--mode", "bcp", "--pretrain_share", "0.5",
                                         "--iters_per_epoch", "1"]),
}


@pytest.mark.parametrize("name", RUNS)
def test_each_script_trains_in_instance_mode_and_test_py_scores_ids(name, instance_data, workdir,
                                                                     capsys):
    main, extra = RUNS[name]
    main(TINY + ["--data", str(instance_data), "--out_dir", "run"] + extra)
    state = load_checkpoint(workdir / "run" / "best.pth")
    assert state["data"]["label_mode"] == "instance" and state["data"]["num_classes"] == 3
    assert state["config"]["select_metric"] == "rand"
    capsys.readouterr()
    test_script.main(["--ckpt", "run/best.pth", "--gpu", "-1", "--save_png", "2"])
    out = capsys.readouterr().out
    assert "val (2 slices): Rand index" in out and "test (6 slices, full labels): Rand index" in out
    assert not re.search(r"per-class Dice \d", out)
    data = load_challenge(instance_data, label_mode="instance")
    with open(workdir / "run" / "submission.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    ids = np.array([row[1:] for row in rows[1:]], dtype=np.int64).T.reshape(6, 128, 128)
    assert ids.max() <= 255 and rows[0][1:] == data.test_names
    printed = float(out.split("test (6 slices, full labels): Rand index ")[1].split()[0])
    assert printed == pytest.approx(rand_index(data.test_masks, ids), abs=5e-5)
    assert len(list((workdir / "run" / "predictions_png").glob("*.png"))) == 2
    scores = json.loads((workdir / "run" / "scores.json").read_text())
    assert scores["background_scale"] is None and scores["postprocess"] is None  # class maps only


def test_no_data_folder_means_the_instance_phantom(workdir, monkeypatch):
    made = []
    monkeypatch.setattr(runtime, "ensure_phantom",
                        lambda folder, **options: made.append((str(folder), options)))
    monkeypatch.setattr(runtime, "has_challenge_files", lambda folder: False)  # data/ is empty
    cfg = runtime.setup("supervised", TINY, "")
    assert made == [("data/phantom_instance", {"label_format": "instance"})]
    assert cfg.data == "data/phantom_instance"


# ==== one-line refusals ====
def one_line_error(capsys, main, argv):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--edge_guided", "true"], "error: edge_guided: not in instance mode"),
    (["--loss", "tvmf_dice"], "error: loss: tvmf_dice sets its per-class κ"),
    (["--area_weight", "0.1"], "error: area_weight, pseudo_area_filter: class area bounds"),
    (["--select_metric", "dice"], "error: select_metric: instance mode selects by the Rand"),
    (["--zero_ce_presence"], "error: zero_ce_presence: weighs organ classes"),
    (["--label_mode", "ids"], "error: label_mode: unknown 'ids' (choose class or instance)"),
])
def test_options_that_read_classes_are_refused_in_instance_mode(flags, message, instance_data,
                                                                workdir, capsys):
    argv = TINY + ["--data", str(instance_data)] + flags
    assert one_line_error(capsys, train_supervised.main, argv).startswith(message)


@pytest.mark.parametrize("main, flags", [(train_unimatch.main, []),
                                         (train_teacher_student.main, ["--mode", "mean_teacher"])])
def test_the_pseudo_background_scale_is_refused_in_instance_mode(main, flags, instance_data, workdir, capsys):
    argv = TINY + ["--data", str(instance_data), "--pseudo_background_scale", "0.5"] + flags
    assert one_line_error(capsys, main, argv).startswith(
        "error: pseudo_background_scale: shifts the background against organ classes")


@pytest.mark.parametrize("script, flags", [("unimatch", []), ("teacher_student", ["--mode", "bcp"])])
def test_instance_mode_records_the_plain_softmax_its_teachers_use(script, flags, instance_data,
                                                                  tiny_phantom, workdir):
    """unimatch.yaml and teacher_student_bcp.yaml say 0.5 (class mode keeps it); instance mode's
    teachers take 1, and the run's config says so."""
    from utils.runtime import setup
    instance = setup(script, TINY + ["--data", str(instance_data), "--gpu", "-1"] + flags, None)
    assert instance.pseudo_background_scale == 1.0
    classes = setup(script, ["--data", str(tiny_phantom), "--gpu", "-1"] + flags, None)
    assert classes.pseudo_background_scale == 0.5


def test_class_map_options_are_refused_for_an_instance_checkpoint(instance_data, workdir, capsys):
    train_supervised.main(TINY + ["--data", str(instance_data), "--out_dir", "run",
                                  "--epochs", "1", "--iters_per_epoch", "1"])
    error = one_line_error(capsys, test_script.main, ["--ckpt", "run/best.pth", "--gpu", "-1",
                                                      "--postprocess", "true"])
    assert error.startswith("error: --postprocess: cleans class maps per class")
    error = one_line_error(capsys, test_script.main, ["--ckpt", "run/best.pth", "--gpu", "-1",
                                                      "--background_scale", "0.5"])
    assert error.startswith("error: --background_scale: scales the background of class maps")
