"""UniMatch: CutMix boxes, pseudo-labels, confidence masking, FP stream and loss weights."""
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import IntensityClassifier, Recorder, one_line_error, training_config

from train_unimatch import unimatch_step
from utils.losses import IGNORE_INDEX, build_stream_loss
from utils.mixing import paste, random_boxes


def test_cutmix_boxes_have_the_specified_area_and_aspect():
    torch.manual_seed(0)
    boxes = random_boxes(2000, 128, 96, p=1.0, area=(0.02, 0.4), aspect=(0.3, 1 / 0.3))
    assert boxes.any(dim=(1, 2)).all()
    rows, cols = boxes.any(2), boxes.any(1)
    heights, widths = rows.sum(1).float(), cols.sum(1).float()
    # each mask is exactly one filled rectangle
    assert torch.equal(boxes.sum((1, 2)).float(), heights * widths)
    area = heights * widths / (128 * 96)
    aspect = widths / heights
    # rounding box sides to whole pixels moves area and aspect slightly; clamping to the image
    # only shrinks a box
    assert area.min() >= 0.02 * 0.85 and area.max() <= 0.4 * 1.05
    assert aspect.min() >= 0.3 * 0.85 and aspect.max() <= (1 / 0.3) * 1.15
    assert area.max() > 0.3 and area.min() < 0.05          # the whole range is used


def test_cutmix_probability():
    torch.manual_seed(1)
    boxes = random_boxes(4000, 32, 32, p=0.5)
    assert abs(boxes.any(dim=(1, 2)).float().mean().item() - 0.5) < 0.04
    assert not random_boxes(50, 32, 32, p=0.0).any()


def test_paste_images_and_maps():
    boxes = torch.zeros(1, 4, 4, dtype=torch.bool)
    boxes[0, 1:3, 2:4] = True
    target, source = torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 4, 4)
    mixed = paste(target, source, boxes)
    assert torch.equal(mixed[0, 0], boxes[0].float()) and torch.equal(mixed[0, 1], boxes[0].float())
    assert torch.equal(paste(torch.zeros(1, 4, 4), torch.ones(1, 4, 4), boxes)[0], boxes[0].float())


def make_cfg(**changes):
    cfg = dict(cutmix_p=1.0, cutmix_area=[0.1, 0.3], cutmix_aspect=[0.5, 2.0], conf_thresh=0.95,
               fp_dropout=0.5, image_filter=0.0, mu_img=0.5, lambda_fp=0.5,
               pseudo_area_filter=False, mix_source="loader", pseudo_background_scale=1.0,
               label_mode="class")
    cfg.update(changes)
    return SimpleNamespace(**cfg)


def make_batches(u_value=1.0, mix_value=0.0, n=3, size=16):
    full = lambda v: torch.full((n, 1, size, size), float(v))  # noqa: E731
    batch_x = {"image": full(1.0), "mask": torch.ones(n, size, size, dtype=torch.long),
               "annotated": torch.ones(n, 3, dtype=torch.bool),
               "certain_background": torch.zeros(n, size, size, dtype=torch.bool)}
    batch_u = {"image_w": full(u_value), "image_s1": full(u_value), "image_s2": full(u_value)}
    batch_mix = {"image_w": full(mix_value), "image_s1": full(mix_value), "image_s2": full(mix_value)}
    return batch_x, batch_u, batch_mix


def test_pseudo_labels_inside_boxes_come_from_the_mix_batch():
    torch.manual_seed(0)
    model, stream = IntensityClassifier(), Recorder()
    batch_x, batch_u, batch_mix = make_batches(u_value=1.0, mix_value=0.0)
    unimatch_step(model, batch_x, batch_u, batch_mix, lambda *a, **k: torch.tensor(8.0), stream,
                  make_cfg())
    # the stream loss gets exactly (logits, target, ignore), no options
    assert [set(call) for call in stream.calls] == [{"logits", "target", "ignore"}] * 3
    target_s1, ignore_s1 = stream.calls[0]["target"], stream.calls[0]["ignore"]
    target_s2 = stream.calls[1]["target"]
    target_fp, ignore_fp = stream.calls[2]["target"], stream.calls[2]["ignore"]
    strong_inputs = model.decoded_batches[-1]                 # the [s1, s2] forward
    box1 = strong_inputs[:3, 0] == 0.0                        # pasted pixels carry the mix value 0
    assert box1.any() and (~box1).any()
    assert torch.equal(target_s1, torch.where(box1, 2, 1))   # mix prediction inside, u_w outside
    box2 = strong_inputs[3:, 0] == 0.0
    assert torch.equal(target_s2, torch.where(box2, 2, 1))
    assert not torch.equal(box1, box2)                        # independent boxes per strong view
    assert (target_fp == 1).all() and not ignore_fp.any() and not ignore_s1.any()


def test_batch_mix_source_pastes_the_next_slice_of_the_same_batch():
    """Slice i's partner is slice (i + 1) mod 3: its strong view inside the box, its weak-view
    pseudo-label and confidence as targets there; no third batch and no extra forward."""
    torch.manual_seed(0)
    model, stream = IntensityClassifier(), Recorder()
    batch_x, batch_u, _ = make_batches(n=3)
    # weak views: slice 0 -> class 1 (confident), 1 -> class 2 (confident), 2 -> a 50/50 tie
    batch_u["image_w"] = torch.tensor([1.0, 0.0, 0.5]).view(3, 1, 1, 1).expand(3, 1, 16, 16)
    batch_u["image_s1"] = torch.tensor([10.0, 11.0, 12.0]).view(3, 1, 1, 1).expand(3, 1, 16, 16)
    batch_u["image_s2"] = torch.tensor([20.0, 21.0, 22.0]).view(3, 1, 1, 1).expand(3, 1, 16, 16)
    unimatch_step(model, batch_x, batch_u, None, lambda *a, **k: torch.tensor(8.0), stream,
                  make_cfg(mix_source="batch"))
    assert [len(b) for b in model.decoded_batches] == [9, 6]   # [x, u_w, u_w FP], [s1, s2]
    strong_inputs = model.decoded_batches[-1][:, 0]
    own_class, own_unsure = torch.tensor([1, 2, 1]), torch.tensor([False, False, True])
    partner = torch.tensor([1, 2, 0])
    for view, first_value in ((0, 10.0), (1, 20.0)):
        inputs = strong_inputs[3 * view:3 * view + 3]
        values = first_value + torch.arange(3.0).view(3, 1, 1)
        box = inputs == first_value + partner.view(3, 1, 1).float()
        assert box.any((1, 2)).all() and (~box).any((1, 2)).all()
        assert torch.equal(inputs, torch.where(box, values[partner], values))
        call = stream.calls[view]
        assert torch.equal(call["target"], torch.where(box, own_class[partner].view(3, 1, 1),
                                                       own_class.view(3, 1, 1)))
        assert torch.equal(call["ignore"], torch.where(box, own_unsure[partner].view(3, 1, 1),
                                                       own_unsure.view(3, 1, 1)))
    fp = stream.calls[2]                                          # the FP stream is not mixed
    assert torch.equal(fp["target"], own_class.view(3, 1, 1).expand(3, 16, 16))
    assert torch.equal(fp["ignore"], own_unsure.view(3, 1, 1).expand(3, 16, 16))


def test_batch_mix_source_with_one_slice_pastes_the_slice_into_itself():
    torch.manual_seed(0)
    model, stream = IntensityClassifier(), Recorder()
    batch_x, batch_u, _ = make_batches(n=1)
    batch_u["image_s1"] = torch.rand(1, 1, 16, 16)
    unimatch_step(model, batch_x, batch_u, None, lambda *a, **k: torch.tensor(8.0), stream,
                  make_cfg(mix_source="batch"))
    assert torch.equal(model.decoded_batches[-1][:1], batch_u["image_s1"])
    assert (stream.calls[0]["target"] == 1).all() and not stream.calls[0]["ignore"].any()


def test_an_unknown_mix_source_is_one_line(capsys):
    import train_unimatch
    err = one_line_error(capsys, ["--mix_source", "both"], train_unimatch.main)
    assert err == "error: mix_source: unknown 'both' (choose loader or batch)"


def test_a_negative_pseudo_background_scale_is_one_line(capsys):
    import train_unimatch
    err = one_line_error(capsys, ["--pseudo_background_scale", "-0.5"], train_unimatch.main)
    assert err == "error: pseudo_background_scale: must be >= 0 (1 = the plain softmax), got -0.5"


def test_the_area_filter_ignores_a_class_beyond_its_bound():
    torch.manual_seed(0)
    model, stream = IntensityClassifier(), Recorder()
    batch_x, batch_u, batch_mix = make_batches(u_value=1.0, mix_value=0.0)
    # u_w is class 1 on every pixel (area 1.0 > bound 0.5): ignored; the mix batch's class 2
    # (area 1.0 ≤ bound 1.0) is kept inside the boxes
    bounds = torch.tensor([1.0, 0.5, 1.0])
    unimatch_step(model, batch_x, batch_u, batch_mix, lambda *a, **k: torch.tensor(8.0), stream,
                  make_cfg(pseudo_area_filter=True), area_bounds=bounds)
    box1 = model.decoded_batches[-1][:3, 0] == 0.0
    assert torch.equal(stream.calls[0]["target"], torch.where(box1, 2, IGNORE_INDEX))
    assert (stream.calls[2]["target"] == IGNORE_INDEX).all()    # the FP stream: all of u_w


class BackgroundLeaning(IntensityClassifier):
    """Softmax (0.6, 0.4, 0) on every pixel, whatever the input: background by a little."""

    def decode(self, features, size):
        logits = super().decode(features, size)
        return logits * 0 + torch.tensor([math.log(0.6), math.log(0.4), -30.0]).view(1, 3, 1, 1)


@pytest.mark.parametrize("scale, label, confidence", [(1.0, 0, 0.6), (0.5, 1, 0.4 / 0.7)])
def test_pseudo_background_scale_shifts_every_stream_s_targets(scale, label, confidence):
    """p0 × scale, renormalised: at 0.5 (0.3, 0.4) / 0.7 makes class 1 the pseudo-label, with
    confidence 4/7 ≥ τ = 0.5, in the weak view's streams and in the mix batch's boxes alike."""
    torch.manual_seed(0)
    stream = Recorder()
    batch_x, batch_u, batch_mix = make_batches(u_value=1.0, mix_value=0.0)
    _, logs = unimatch_step(BackgroundLeaning(), batch_x, batch_u, batch_mix,
                            lambda *a, **k: torch.tensor(0.0), stream,
                            make_cfg(conf_thresh=0.5, pseudo_background_scale=scale))
    for call in stream.calls:  # s1, s2 (boxes from the mix batch), FP
        assert (call["target"] == label).all() and not call["ignore"].any()
    assert logs["conf_ratio"].item() == 1.0
    unsure = make_cfg(conf_thresh=confidence + 1e-3, pseudo_background_scale=scale)
    stream = Recorder()
    unimatch_step(BackgroundLeaning(), batch_x, batch_u, batch_mix, lambda *a, **k: torch.tensor(0.0),
                  stream, unsure)
    assert all(call["ignore"].all() for call in stream.calls)  # the renormalised confidence is τ's


def test_pixels_under_tau_are_ignored_and_get_no_gradient():
    torch.manual_seed(0)
    model = IntensityClassifier()
    batch_x, batch_u, batch_mix = make_batches(u_value=0.5, mix_value=0.0)  # u_w: a 50/50 tie
    stream = Recorder()
    unimatch_step(model, batch_x, batch_u, batch_mix, lambda *a, **k: torch.tensor(0.0), stream,
                  make_cfg())
    ignore_s1, ignore_fp = stream.calls[0]["ignore"], stream.calls[2]["ignore"]
    assert ignore_fp.all()                                     # nothing confident in u_w
    strong_inputs = model.decoded_batches[-1][:3, 0]
    assert torch.equal(ignore_s1, strong_inputs != 0.0)        # only the confident mix boxes count
    # with the real Dice stream loss, the unconfident pixels get exactly zero gradient
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    ignore = torch.rand(2, 8, 8) < 0.5
    build_stream_loss("dice", training_config())(logits, target, ignore).backward()
    assert (logits.grad.abs().sum(1)[ignore] == 0).all()
    assert (logits.grad.abs().sum(1)[~ignore] > 0).any()


def test_fp_stream_perturbs_features_in_one_decoder_call():
    torch.manual_seed(0)
    model = IntensityClassifier()
    batch_x, batch_u, batch_mix = make_batches(u_value=1.0, mix_value=0.0, n=4)
    unimatch_step(model, batch_x, batch_u, batch_mix, lambda *a, **k: torch.tensor(0.0),
                  Recorder(), make_cfg(fp_dropout=0.5))
    sizes = [len(b) for b in model.decoded_batches]
    assert sizes == [4, 4 + 4 + 4, 8]        # mix (eval), [x, u_w, u_w perturbed], [s1, s2]
    joint = model.decoded_batches[1]
    clean_u_w, perturbed = joint[4:8], joint[8:]
    assert torch.equal(clean_u_w, torch.ones_like(clean_u_w))
    # channel dropout: every map is either zeroed or scaled by 1 / (1 - p)
    assert not torch.equal(perturbed, clean_u_w)
    assert set(perturbed.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("mu_img, lambda_fp", [(0.5, 0.5), (1.0, 0.0), (0.2, 2.0)])
def test_loss_weights_follow_the_config(mu_img, lambda_fp):
    torch.manual_seed(0)
    batch_x, batch_u, batch_mix = make_batches()
    loss, logs = unimatch_step(IntensityClassifier(), batch_x, batch_u, batch_mix,
                               lambda *a, **k: torch.tensor(8.0), Recorder((1.0, 2.0, 4.0)),
                               make_cfg(mu_img=mu_img, lambda_fp=lambda_fp))
    expected = (8.0 + mu_img / 2 * (1.0 + 2.0) + lambda_fp * 4.0) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(logs["conf_ratio"].item(), 1.0)


def test_image_filter_drops_unconfident_slices():
    torch.manual_seed(0)
    batch_x, batch_u, batch_mix = make_batches(n=2)
    batch_u["image_w"][1] = 0.5            # slice 1 is a tie everywhere, slice 0 is confident
    stream = Recorder()
    unimatch_step(IntensityClassifier(), batch_x, batch_u, batch_mix,
                  lambda *a, **k: torch.tensor(0.0), stream, make_cfg(image_filter=0.5))
    ignore_fp = stream.calls[2]["ignore"]
    assert not ignore_fp[0].any() and ignore_fp[1].all()


def test_warmup_is_supervised_only():
    batch_x, batch_u, batch_mix = make_batches()
    model, stream = IntensityClassifier(), Recorder()
    loss, logs = unimatch_step(model, batch_x, batch_u, batch_mix,
                               lambda *a, **k: torch.tensor(8.0), stream, make_cfg(), warmup=True)
    assert loss.item() == 8.0 and not stream.calls and len(model.decoded_batches) == 1


@pytest.mark.parametrize("mix_source", ["loader", "batch"])
def test_two_iteration_smoke_run_writes_a_checkpoint_test_py_reads(mix_source, tiny_phantom, tmp_path,
                                                                  monkeypatch, capsys):
    import json

    import test as test_script
    import train_unimatch
    from conftest import ROOT
    monkeypatch.chdir(tmp_path)
    train_unimatch.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--data",
                         str(tiny_phantom), "--out_dir", "run", "--epochs", "1", "--mix_source", mix_source])
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert {"loss_x", "loss_s", "loss_fp", "conf_ratio", "val_dice"} <= set(record)
    assert record["iteration"] == 2
    test_script.main(["--ckpt", "run/best.pth", "--gpu", "-1", "--tta", "none", "--no-postprocess",
                      "--background_scale", "1"])
    out = capsys.readouterr().out
    assert f"per-class Dice {record['val_dice']:.4f}" in out and "trained by unimatch" in out


def test_warm_start_trains_a_supervised_run_first_and_starts_from_its_best(tiny_phantom, tmp_path,
                                                                           monkeypatch, capsys):
    import train_unimatch
    from conftest import ROOT
    from utils.checkpoint import load_checkpoint
    monkeypatch.chdir(tmp_path)
    loaded, real_load = [], train_unimatch.load_init_weights

    def recording_load(model, path, *args):
        real_load(model, path, *args)
        loaded.append((path, {k: v.clone() for k, v in model.state_dict().items()}))
        latest_during_warm_start.append(os.path.lexists("runs/latest"))

    latest_during_warm_start = []

    monkeypatch.setattr(train_unimatch, "load_init_weights", recording_load)
    common = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--data", str(tiny_phantom)]
    train_unimatch.main(common + ["--out_dir", "run", "--epochs", "1", "--warm_start_epochs", "2"])

    start = load_checkpoint(tmp_path / "run" / "warm_start" / "best.pth")
    assert start["method"] == "supervised" and start["config"]["epochs"] == 2
    assert start["config"]["seed"] == 0 and start["config"]["img_size"] == 64  # the run's keys
    [(path, weights)] = loaded
    assert path == tmp_path.joinpath("run", "warm_start", "best.pth").relative_to(tmp_path)
    for key, value in start["model"].items():
        assert torch.equal(weights[key], value), key
    # runs/latest and the closing "Next:" line are the run's, never its warm start's
    assert latest_during_warm_start == [False]
    assert Path("runs/latest").resolve() == (tmp_path / "run").resolve()
    out = capsys.readouterr().out
    assert "the warm start is ready, the run goes on" in out
    assert [line.split("Next: ")[1] for line in out.splitlines() if "Next: " in line] == \
        ["python test.py --ckpt run/best.pth"]

    # resuming, from init_ckpt, or with warm_start false: no supervised run first
    train_unimatch.main(common + ["--out_dir", "run", "--resume", "run/last.pth", "--epochs", "2"])
    train_unimatch.main(common + ["--out_dir", "init", "--epochs", "1",
                                  "--init_ckpt", "run/warm_start/best.pth"])
    train_unimatch.main(common + ["--out_dir", "scratch", "--epochs", "1", "--warm_start", "false"])
    assert len(loaded) == 1
    assert not (tmp_path / "init" / "warm_start").exists()
    assert not (tmp_path / "scratch" / "warm_start").exists()
    assert load_checkpoint(tmp_path / "run" / "warm_start" / "best.pth")["history"] == start["history"]
