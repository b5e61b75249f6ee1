"""The user loop on a tiny phantom: train_supervised.py -> best.pth -> test.py -> submission."""
import csv
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import test as test_script
from conftest import one_line_error
import train_supervised
from utils.checkpoint import load_checkpoint

TINY = ["--config", "configs/tiny.yaml"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_phantom):
    """One 2-epoch run shared by the tests that only read its outputs."""
    from conftest import ROOT
    folder = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        os.symlink(ROOT / "configs", folder / "configs")
        train_supervised.main(TINY + ["--data", str(tiny_phantom), "--out_dir", "run"])
    finally:
        os.chdir(cwd)
    return folder / "run"


def test_a_run_writes_every_output(trained):
    for name in ("config.yaml", "log.jsonl", "last.pth", "best.pth", "curves.png", "val_examples.png"):
        assert (trained / name).is_file(), name
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"loss", "lr", "val_dice", "val_rand", "seconds", "step_seconds"} <= set(records[0])
    # where it computed: one thread (conftest), the CPU's model, one process
    assert records[0]["ran_on"] == records[1]["ran_on"]
    assert re.fullmatch(rf"torch {re.escape(torch.__version__)}, cpu \((.+), 1 thread\), 1 process",
                        records[0]["ran_on"])
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*: (.+)$", cpuinfo.read_text(), re.MULTILINE) if cpuinfo.exists() else []
    assert not names or f"cpu ({names[0].strip()}, 1 thread)" in records[0]["ran_on"]
    # the per-class area report's summary: sinks and suppressed classes are visible in the log
    assert {"val_worst_area_ratio", "val_sink_classes", "val_missing_classes"} <= set(records[0])
    assert (trained.parent / "runs" / "latest").resolve() == trained.resolve()
    state = torch.load(trained / "best.pth", weights_only=True)   # a plain dict
    assert state["model_name"] == "attunet" and state["data"]["img_size"] == 64
    assert {"model", "optimizer", "scheduler", "config", "epoch", "best_score"} <= set(state)


def test_test_py_reproduces_the_logged_validation_score(trained, capsys, monkeypatch):
    """With the training's own evaluation (no TTA, no post-processing, the plain argmax: test.py's
    defaults add all three) test.py scores the validation split exactly as the log did."""
    monkeypatch.chdir(trained.parent)
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: r["val_dice"])
    test_script.main(["--ckpt", "run/best.pth", "--gpu", "-1", "--tta", "none", "--no-postprocess",
                      "--background_scale", "1"])
    out = capsys.readouterr().out
    assert f"per-class Dice {best['val_dice']:.4f} | Rand index {best['val_rand']:.4f}" in out
    assert "Predicted vs true area per class (annotated slices only):" in out


def test_test_py_flags_a_sink_and_a_missing_class(capsys):
    # class 1: 2 true pixels, 7 predicted (3.5x) -> sink; class 2: 4 true, none predicted -> missing
    truth = np.array([[[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], [[2, 2, 2, 2, 0], [0, 0, 0, 0, 0]]])
    predictions = np.array([[[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]])
    data = SimpleNamespace(num_classes=4, class_names={1: "liver", 2: "spleen", 3: "kidney"},
                           label_mode="class")
    test_script.report("test", truth, predictions, data)
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()
            if line.strip().split()[-1:] in (["SINK"], ["MISSING"])}
    assert set(rows) == {"liver", "spleen"}
    assert rows["liver"].endswith("SINK") and rows["spleen"].endswith("MISSING")


def test_submission_reads_back_with_the_challenge_shape(trained, tiny_phantom):
    path = trained / "submission.csv"
    if not path.exists():
        test_script.main(["--ckpt", str(trained / "best.pth"), "--gpu", "-1"])
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    names = sorted(p.name for p in (tiny_phantom / "test-images").iterdir())
    assert rows[0][1:] == sorted(names, key=lambda n: int(n.split(".")[0]))
    assert len(rows) - 1 == 128 * 128                       # H·W pixel rows at the file size
    assert [r[0] for r in rows[1:4]] == ["Pixel 0", "Pixel 1", "Pixel 2"]
    assert all(0 <= int(v) < 15 for r in rows[1:200] for v in r[1:])


def test_ckpt_falls_back_to_runs_latest(trained, capsys, monkeypatch):
    monkeypatch.chdir(trained.parent)
    test_script.main(["--ckpt", "best.pth", "--gpu", "-1", "--out", str(trained / "sub2.csv")])
    assert "using runs/latest/best.pth" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--use_test_as_unlabeled", "--labeled_as_unlabeled", "--warm_start"])
def test_supervised_refuses_the_semi_supervised_keys(workdir, tiny_phantom, capsys, flag):
    """They live in configs/semi_supervised.yaml: train_supervised.py has no unlabeled pool and
    no warm start, so the flag is unknown there rather than silently ignored."""
    with pytest.raises(SystemExit) as exit_info:
        train_supervised.main(TINY + ["--data", str(tiny_phantom), flag, "true"])
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {flag} true" in capsys.readouterr().err


def test_resume_repeats_the_uninterrupted_run(workdir, tiny_phantom):
    common = TINY + ["--data", str(tiny_phantom)]
    train_supervised.main(common + ["--out_dir", "full"])
    train_supervised.main(common + ["--out_dir", "half", "--epochs", "1"])
    train_supervised.main(common + ["--out_dir", "half", "--resume", "half/last.pth"])
    full, resumed = load_checkpoint("full/last.pth"), load_checkpoint("half/last.pth")
    assert resumed["epoch"] == full["epoch"] == 1
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert resumed["history"][-1]["val_dice"] == full["history"][-1]["val_dice"]
    assert resumed["history"][-1]["loss"] == full["history"][-1]["loss"]


def test_resume_continues_with_the_settings_the_run_was_started_with(workdir, tiny_phantom, capsys):
    """Only --resume (and the tiny config, which asks for 2 epochs) on the second call: the run's
    own --lr and --seed come from its checkpoint, so it repeats the uninterrupted run."""
    common = TINY + ["--data", str(tiny_phantom)]
    own = ["--lr", "0.02", "--seed", "3"]
    train_supervised.main(common + own + ["--out_dir", "full"])
    train_supervised.main(common + own + ["--out_dir", "half", "--epochs", "1"])
    capsys.readouterr()
    train_supervised.main(common + ["--resume", "half/last.pth"])
    assert "note: resumed with settings other than the run's own: epochs 1 -> 2" in capsys.readouterr().out
    full, resumed = load_checkpoint("full/last.pth"), load_checkpoint("half/last.pth")
    assert resumed["config"]["lr"] == 0.02 and resumed["config"]["seed"] == 3
    assert "lr" in resumed["overrides"] and "seed" in resumed["overrides"]
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert resumed["history"][-1]["val_dice"] == full["history"][-1]["val_dice"]


def test_a_failed_write_leaves_the_old_checkpoint_intact(workdir, tiny_phantom, monkeypatch):
    common = TINY + ["--data", str(tiny_phantom), "--out_dir", "run", "--epochs", "1"]
    train_supervised.main(common)
    before = (workdir / "run" / "best.pth").read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        train_supervised.main(common + ["--seed", "1"])
    assert (workdir / "run" / "best.pth").read_bytes() == before
    assert not [p for p in (workdir / "run").iterdir() if p.name.endswith(".tmp")]


def test_bad_checkpoints_exit_2_with_one_line(workdir, trained, capsys):
    (workdir / "junk.pth").write_bytes(b"this is not a checkpoint")
    assert "junk.pth: not a readable checkpoint" in one_line_error(capsys, ["--ckpt", "junk.pth"])
    torch.save({"weights": torch.zeros(3)}, workdir / "foreign.pth")
    assert "foreign.pth: not a FewCTSeg checkpoint" in one_line_error(capsys, ["--ckpt", "foreign.pth"])
    state = torch.load(trained / "best.pth", weights_only=True)
    state["model_kwargs"]["base"] = 8                          # weights no longer fit
    torch.save(state, workdir / "mismatch.pth")
    assert "weights do not match the attunet network" in one_line_error(capsys, ["--ckpt", "mismatch.pth"])
    assert "missing.pth: checkpoint not found" in one_line_error(capsys, ["--ckpt", "missing.pth"])


@pytest.mark.parametrize("flag", ["--init_ckpt", "--resume"])
def test_a_checkpoint_of_another_network_exits_2_naming_both(workdir, trained, tiny_phantom, capsys, flag):
    """A SegFormer UniMatch run started from, or a SegFormer run resuming, the tiny AttUNet run."""
    import train_unimatch
    checkpoint = trained / ("best.pth" if flag == "--init_ckpt" else "last.pth")
    main = train_unimatch.main if flag == "--init_ckpt" else train_supervised.main
    err = one_line_error(capsys, TINY + ["--data", str(tiny_phantom), "--out_dir", "other",
                                         "--model", "segformer_b0", flag, str(checkpoint)], main)
    assert err.startswith(f"error: {checkpoint}: the checkpoint's network is attunet {{'in_channels': 1")
    assert "this run builds segformer_b0 {'in_channels': 1" in err
    assert not (workdir / "other").exists()  # nothing written for a run that cannot start


def test_missing_test_images_and_bad_flags_exit_2(workdir, trained, capsys, tiny_phantom):
    import shutil
    data = workdir / "no_test"
    shutil.copytree(tiny_phantom, data)
    shutil.rmtree(data / "test-images")
    error = one_line_error(capsys, ["--ckpt", str(trained / "best.pth"), "--data", str(data),
                                    "--split", "test"])
    assert "no test images" in error
    assert "--tta: unknown 'spin'" in one_line_error(capsys, ["--ckpt", str(trained / "best.pth"),
                                                              "--tta", "spin"])


def test_train_errors_exit_2(workdir, capsys, tiny_phantom):
    base = TINY + ["--data", str(tiny_phantom)]
    assert "labeled_ratio: 1.5" in one_line_error(capsys, base + ["--labeled_ratio", "1.5"],
                                                  train_supervised.main)
    assert "unknown model 'unet9'" in one_line_error(capsys, base + ["--model", "unet9"],
                                                     train_supervised.main)
    assert "nowhere: no train-images" in one_line_error(capsys, TINY + ["--data", "nowhere"],
                                                        train_supervised.main)


def test_watershed_baseline_is_scored_by_the_rand_index(tiny_phantom, capsys):
    test_script.main(["--baseline", "watershed", "--data", str(tiny_phantom), "--gpu", "-1"])
    out = capsys.readouterr().out
    assert "val (" in out and "test (6 slices, full labels): Rand index" in out
    assert "no per-class Dice" in out


def test_labeled_ratio_one_trains_on_every_labeled_image_and_keeps_the_last(workdir, tiny_phantom,
                                                                            capsys):
    base = TINY + ["--data", str(tiny_phantom), "--labeled_ratio", "1"]
    assert "add --scheduler poly" in one_line_error(capsys, base, train_supervised.main)
    assert "loss: tvmf_dice" in one_line_error(
        capsys, base + ["--scheduler", "poly", "--loss", "tvmf_dice"], train_supervised.main)
    train_supervised.main(base + ["--scheduler", "poly", "--out_dir", "all"])
    out = capsys.readouterr().out
    assert "12 labeled for training, 0 for validation" in out
    assert "no validation split, best.pth is the last checkpoint" in out
    best, last = (torch.load(f"all/{name}.pth", weights_only=True) for name in ("best", "last"))
    assert best["epoch"] == last["epoch"] == 1
    for key, value in last["model"].items():
        assert torch.equal(best["model"][key], value), key
    assert best["data"]["val_indices"] == [] and len(best["data"]["train_indices"]) == 12
    records = [json.loads(line) for line in (workdir / "all" / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and not any(key.startswith("val_") for key in records[0])


def test_images_folder_of_two_sizes_gets_a_label_png_each(trained, tiny_phantom, tmp_path, capsys):
    """New slices of two sizes: each label PNG has its image's size; the slices of the training
    size get the labels test.py writes for them in the submission of the data folder."""
    import cv2
    from dataloaders.label_csv import read_label_csv
    from utils.checkpoint import model_from_checkpoint
    from utils.inference import predict_slices
    folder = tmp_path / "new"
    folder.mkdir()
    sources = sorted((tiny_phantom / "test-images").glob("*.png"))[:3]
    for source in sources:
        (folder / source.name).write_bytes(source.read_bytes())
    odd = cv2.resize(cv2.imread(str(sources[0]), cv2.IMREAD_GRAYSCALE), (80, 96))
    cv2.imwrite(str(folder / "odd.png"), odd)
    ckpt = str(trained / "best.pth")
    plain = ["--tta", "none", "--no-postprocess", "--background_scale", "1"]  # as `predict_slices` below
    test_script.main(["--ckpt", ckpt, "--out", str(tmp_path / "reference.csv")] + plain)
    reference, names, _ = read_label_csv(tmp_path / "reference.csv")
    capsys.readouterr()
    test_script.main(["--ckpt", ckpt, "--images", str(folder), "--out_dir", str(tmp_path / "out"),
                      "--save_png", "2"] + plain)
    out = capsys.readouterr().out
    assert f"4 label PNGs (class ids) in {tmp_path / 'out'}/" in out
    assert "no submission CSV: the images have 2 sizes" in out
    for source in sources:
        labels = cv2.imread(str(tmp_path / "out" / source.name), cv2.IMREAD_UNCHANGED)
        assert labels.dtype == np.uint8
        assert np.array_equal(labels, reference[names.index(source.name)])
    labels = cv2.imread(str(tmp_path / "out" / "odd.png"), cv2.IMREAD_UNCHANGED)
    state = load_checkpoint(trained / "best.pth")
    alone = predict_slices(model_from_checkpoint(state), odd[None], state["data"]["img_size"],
                           state["data"]["normalize"], "cpu")[0]
    assert labels.shape == (96, 80) and np.array_equal(labels, alone)
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 2
    # one size: the challenge CSV of the predictions as well
    (folder / "odd.png").unlink()
    test_script.main(["--ckpt", ckpt, "--images", str(folder), "--out_dir", str(tmp_path / "one")]
                     + plain)
    masks, written, _ = read_label_csv(tmp_path / "one" / "submission.csv")
    assert written == [source.name for source in sources]
    assert np.array_equal(masks, reference[[names.index(name) for name in written]])


@pytest.mark.parametrize("breakage, message", [
    ("notes.txt", "notes.txt: not a PNG image"),
    ("colour.png", "colour.png: colour image; expected 8-bit grayscale CT"),
    ("", "no PNG images"),
])
def test_images_folder_errors_name_the_file(trained, tmp_path, capsys, breakage, message):
    import cv2
    folder = tmp_path / "new"
    folder.mkdir()
    if breakage == "notes.txt":
        cv2.imwrite(str(folder / "1.png"), np.zeros((8, 8), np.uint8))
        (folder / breakage).write_text("x")
    elif breakage:
        cv2.imwrite(str(folder / breakage), np.dstack([np.zeros((8, 8), np.uint8),
                                                       np.ones((8, 8), np.uint8) * 9,
                                                       np.zeros((8, 8), np.uint8)]))
    assert message in one_line_error(capsys, ["--ckpt", str(trained / "best.pth"), "--images",
                                              str(folder)])
    assert not (trained / "predictions").exists()


def test_val_of_a_checkpoint_trained_on_every_labeled_image(workdir, tiny_phantom, capsys):
    train_supervised.main(TINY + ["--data", str(tiny_phantom), "--labeled_ratio", "1",
                                  "--scheduler", "poly", "--epochs", "1", "--out_dir", "all"])
    assert "was trained with labeled_ratio 1" in one_line_error(
        capsys, ["--ckpt", "all/best.pth", "--split", "val"])
    test_script.main(["--ckpt", "all/best.pth"])  # the default split: a note, then the test images
    out = capsys.readouterr().out
    assert "Validation is skipped; the test images follow" in out
    assert "test (6 slices, full labels)" in out
