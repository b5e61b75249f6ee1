"""Every training script under torchrun: two CPU processes (gloo) on the tiny phantom.

Each launch goes through tests/torchrun_entry.py, which can make each rank dump its own networks
(to check that the processes hold the same weights) or make one rank's loss NaN.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import test as test_script
import train_supervised
from conftest import ROOT
from utils import runtime
from utils.errors import InputError

ENTRY = ROOT / "tests" / "torchrun_entry.py"
# A per-pixel loss over complete labels and a network without BatchNorm (SegFormer's encoder has
# LayerNorm only; the one BatchNorm of its decoder becomes an identity, in both runs): the
# gradient of a global batch is then the mean of its samples' whatever the processes that hold them
NO_BATCHNORM = {"NO_BATCHNORM": "1"}
PER_PIXEL = ["--model", "segformer_b0", "--loss", "ce", "--partial_labels", "false",
             "--background_ce_weight", "0",  # a mean over the batch's air pixels, not per pixel
             "--set", "model_kwargs.segformer.drop_path_rate=0",
             "--set", "model_kwargs.segformer.dropout=0", "--iters_per_epoch", "3"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    os.symlink(ROOT / "configs", folder / "configs")
    return folder


def torchrun(workdir, script, *flags, processes=2, env=None, timeout=240):
    """Run `script` under torchrun; returns (CompletedProcess, seconds)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), str(ENTRY), script,
               "--config", "configs/tiny.yaml", *flags]
    started = time.time()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return done, time.time() - started


def rank_weights(folder):
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def parameters_only(state):
    """A state dict without BatchNorm statistics (per process on the CPU, rank 0's are kept)."""
    return {k: v for k, v in state.items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def assert_same_weights(first, second, atol=0.0):
    assert first.keys() == second.keys()
    for name in first:
        difference = (first[name].double() - second[name].double()).abs().max().item()
        assert difference <= atol, f"{name} differs by {difference}"


def assert_close_in_rms(first, second, rms):
    """Same keys, and each tensor's root-mean-square difference at most `rms`."""
    assert first.keys() == second.keys()
    for name in first:
        difference = (first[name].double() - second[name].double()).pow(2).mean().sqrt().item()
        assert difference <= rms, f"{name} differs by {difference} (root mean square)"


def records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_by_two(workdir, tiny_phantom):
    """2 processes x batch 2, 2 epochs of 3 steps, each rank's weights dumped."""
    dump = workdir / "dump_2x2"
    dump.mkdir()
    done, _ = torchrun(workdir, "train_supervised", "--data", str(tiny_phantom), *PER_PIXEL,
                       "--out_dir", "run_2x2", "--local-rank=0",
                       env={"DUMP_DIR": str(dump), **NO_BATCHNORM})
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir / "run_2x2", dump, done


def test_rank_zero_alone_writes_and_its_checkpoint_is_a_plain_one(two_by_two, workdir, capsys,
                                                                  monkeypatch):
    run, dump, done = two_by_two
    assert [r["epoch"] for r in records(run)] == [1, 2]       # one line per evaluation
    assert records(run)[0]["ran_on"].endswith(", 2 processes")
    assert done.stdout.count("epoch 2/2 loss") == 1           # one process prints
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".pth") == ["best.pth", "last.pth"]
    state = torch.load(run / "last.pth", weights_only=True)
    assert state["world_size"] == 2 and state["iteration"] == 6
    assert not any(key.startswith("module.") for key in state["model"])
    ranks = rank_weights(dump)
    assert_same_weights(ranks[0]["model"], ranks[1]["model"])   # DDP kept the replicas equal
    assert_same_weights(state["model"], ranks[0]["model"])
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(torch.nn, "BatchNorm2d", torch.nn.Identity)   # the network it trained
    test_script.main(["--ckpt", str(run / "best.pth"), "--gpu", "-1", "--tta", "none",
                      "--no-postprocess", "--background_scale", "1"])  # as validated
    best = max(records(run), key=lambda r: r["val_dice"])
    assert f"per-class Dice {best['val_dice']:.4f}" in capsys.readouterr().out


def test_two_processes_of_batch_2_train_as_one_of_batch_4(two_by_two, workdir, tiny_phantom,
                                                          monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(torch.nn, "BatchNorm2d", torch.nn.Identity)   # as NO_BATCHNORM does
    train_supervised.main(["--config", "configs/tiny.yaml", "--data", str(tiny_phantom),
                           *PER_PIXEL, "--batch_size", "4", "--out_dir", "run_1x4"])
    one = torch.load(workdir / "run_1x4" / "last.pth", weights_only=True)["model"]
    two = torch.load(two_by_two[0] / "last.pth", weights_only=True)["model"]
    # round-off only, per tensor as the root-mean-square difference: AdamW turns the round-off
    # of a near-zero gradient into up to a step (lr = 2e-3) on single weights, so a maximum says
    # little; the RMS stays under 1e-5 here, while other training slices (--split_seed 1) give
    # 1e-3 to 6e-3 on every tensor
    assert_close_in_rms(one, two, rms=1e-4)


def test_resume_under_ddp_repeats_the_uninterrupted_run(two_by_two, workdir, tiny_phantom):
    common = ["--data", str(tiny_phantom), *PER_PIXEL, "--out_dir", "run_resumed"]
    done, _ = torchrun(workdir, "train_supervised", *common, "--epochs", "1", env=NO_BATCHNORM)
    assert done.returncode == 0, done.stderr[-3000:]
    done, _ = torchrun(workdir, "train_supervised", *common, "--resume", "run_resumed/last.pth",
                       env=NO_BATCHNORM)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = torch.load(workdir / "run_resumed" / "last.pth", weights_only=True)
    uninterrupted = torch.load(two_by_two[0] / "last.pth", weights_only=True)
    assert_same_weights(resumed["model"], uninterrupted["model"])
    assert [r["val_dice"] for r in resumed["history"]] == \
        [r["val_dice"] for r in uninterrupted["history"]]


def test_unimatch_under_torchrun_keeps_the_replicas_equal(workdir, tiny_phantom):
    dump = workdir / "dump_unimatch"
    dump.mkdir()
    done, _ = torchrun(workdir, "train_unimatch", "--data", str(tiny_phantom), "--epochs", "1",
                       "--out_dir", "run_unimatch", env={"DUMP_DIR": str(dump)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "BatchNorm statistics are per process" in done.stdout
    ranks = rank_weights(dump)
    assert_same_weights(*(parameters_only(weights["model"]) for weights in ranks))
    assert len(records(workdir / "run_unimatch")) == 1


@pytest.mark.parametrize("mode, flags", [
    ("mean_teacher", ["--epochs", "1"]),
    ("bcp", ["--iters_per_epoch", "2", "--pretrain_share", "0.5", "--edge_guided", "true"]),
    ("pseudo_label", ["--epochs", "1", "--teacher_epochs", "1"]),
])
def test_teacher_student_modes_give_every_rank_the_same_teachers(mode, flags, workdir,
                                                                 tiny_phantom):
    dump = workdir / f"dump_{mode}"
    dump.mkdir()
    done, _ = torchrun(workdir, "train_teacher_student", "--data", str(tiny_phantom),
                       "--mode", mode, *flags, "--out_dir", f"run_{mode}",
                       env={"DUMP_DIR": str(dump)})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = rank_weights(dump)
    assert set(ranks[0]) == {"pseudo_label": {"model"}, "mean_teacher": {"model", "teacher"},
                             "bcp": {"model", "teacher", "static_teacher"}}[mode]
    assert_same_weights(*(parameters_only(weights["model"]) for weights in ranks))
    for name in set(ranks[0]) - {"model"}:   # teachers: parameters and BatchNorm statistics
        assert_same_weights(ranks[0][name], ranks[1][name])
    if mode == "pseudo_label":  # labelled in two shares, gathered, written once
        scores = json.loads((workdir / f"run_{mode}" / "pseudo_labels" / "scores.json").read_text())
        assert len(scores["slices"]) == 12    # the whole unlabeled pool of the phantom
        assert (workdir / f"run_{mode}" / "teacher" / "best.pth").is_file()


def test_a_nan_on_one_rank_stops_both_promptly(workdir, tiny_phantom):
    done, seconds = torchrun(workdir, "train_supervised", "--data", str(tiny_phantom),
                             "--epochs", "50", "--out_dir", "run_nan", env={"NAN_RANK": "1"})
    assert done.returncode != 0
    assert done.stderr.count("error: loss became nan in epoch 1") == 2   # both ranks, one line
    assert not (workdir / "run_nan" / "last.pth").exists()
    assert seconds < 120


def test_bad_input_ends_every_rank_with_the_one_line_error(workdir):
    done, _ = torchrun(workdir, "train_supervised", "--data", str(workdir / "missing"))
    assert done.returncode != 0
    assert done.stderr.count(f"error: {workdir / 'missing'}: no train-images/") == 2
    assert "exitcode  : 2" in done.stderr     # torchrun's report of each process's exit status


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    runtime.pick_device.cache_clear()
    with pytest.raises(InputError, match="--nproc_per_node: 4 processes on this node but 2 CUDA"):
        runtime.pick_device(0)
    runtime.pick_device.cache_clear()
