"""The training loop around the step (utils/engine.py driven by train_supervised.py): a NaN loss
stops the run with the last checkpoint intact, early stopping counts evaluations without
improvement, the poly schedule advances once per optimiser step and the plateau schedule once per
evaluation, on the selected validation score; BCP says when best.pth is from its copy-paste
phase. Validation scores are scripted so that every
expected number can be worked out by hand."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_supervised
import train_teacher_student
from utils import engine
from utils.checkpoint import load_checkpoint
from utils.engine import Meters, TrainingRun
from utils.errors import TrainingDiverged, run_cli

TINY = ["--config", "configs/tiny.yaml"]


@pytest.fixture
def run_args(workdir, tiny_phantom, monkeypatch):
    """Flags of a tiny run in `workdir/run`, with the figures left out (not under test here)."""
    monkeypatch.setattr(engine, "plot_curves", lambda *args, **kwargs: None)
    monkeypatch.setattr(engine, "plot_examples", lambda *args, **kwargs: None)
    return TINY + ["--data", str(tiny_phantom), "--out_dir", "run", "--iters_per_epoch", "1"]


def script_scores(monkeypatch, dice, rand=None):
    """Make evaluation `i` report `val_dice = dice[i]` (and `val_rand = rand[i]`)."""
    real_evaluate, evaluations = engine.evaluate, iter(range(len(dice)))

    def scripted(*args, **kwargs):
        scores = real_evaluate(*args, **kwargs)
        index = next(evaluations)
        scores["val_dice"] = dice[index]
        if rand is not None:
            scores["val_rand"] = rand[index]
        return scores
    monkeypatch.setattr(engine, "evaluate", scripted)


def record_step_lrs(monkeypatch):
    """The learning rate of every optimiser step, in order."""
    lrs, real_step = [], train_supervised.optimizer_step

    def recording(loss, optimizer, scaler, cfg):
        lrs.append(optimizer.param_groups[0]["lr"])
        real_step(loss, optimizer, scaler, cfg)
    monkeypatch.setattr(train_supervised, "optimizer_step", recording)
    return lrs


def log_records(run_dir="run"):
    return [json.loads(line) for line in Path(run_dir, "log.jsonl").read_text().splitlines()]


# ==== NaN stop ====
def test_check_finite_names_the_bad_losses_and_the_last_checkpoint():
    meters = Meters()
    meters.update({"loss": 1.0, "loss_u": torch.tensor(2.0)})
    meters.update({"loss": 3.0, "loss_u": torch.tensor(4.0)})
    run = SimpleNamespace(meters=meters, epoch=2, dir=Path("runs/x"), device=torch.device("cpu"))
    assert TrainingRun.check_finite(run) == {"loss": 2.0, "loss_u": 3.0}
    meters.update({"loss": 1.0, "loss_u": math.inf})
    with pytest.raises(TrainingDiverged,
                       match=r"^loss_u became inf in epoch 3; .* runs/x/last\.pth$"):
        TrainingRun.check_finite(run)


def test_a_nan_loss_exits_1_with_one_line_and_keeps_the_last_checkpoint(run_args, monkeypatch,
                                                                         capsys):
    # epoch 1 trains one good step and saves its checkpoints; the step of epoch 2 returns NaN
    saved = {}
    real_build_loss = train_supervised.build_loss

    def build_poisoned_loss(cfg, *args):
        loss_fn = real_build_loss(cfg, *args)
        real_terms, calls = loss_fn.terms, []

        def terms(*args, **kwargs):  # the script sums the named terms (forward does too)
            calls.append(1)
            if len(calls) == 1:
                return real_terms(*args, **kwargs)
            saved.update({name: Path("run", name).read_bytes()
                          for name in ("last.pth", "best.pth")})
            return {name: value * math.nan for name, value in real_terms(*args, **kwargs).items()}
        loss_fn.terms = terms
        return loss_fn
    monkeypatch.setattr(train_supervised, "build_loss", build_poisoned_loss)

    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_supervised.main, run_args + ["--epochs", "2"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error == ("error: loss became nan in epoch 2; stopping. The last good checkpoint is "
                     "run/last.pth")
    for name, before in saved.items():
        assert Path("run", name).read_bytes() == before, name
    assert [r["epoch"] for r in log_records()] == [1]
    state = load_checkpoint("run/last.pth")
    assert state["epoch"] == 0 and all(v.isfinite().all() for v in state["model"].values())


# ==== early stopping ====
def test_early_stopping_counts_evaluations_without_improvement(run_args, monkeypatch, capsys):
    # patience 2: 0.2 best, 0.1 bad (1), 0.3 best (0), 0.3 not better (1), 0.25 bad (2) → stop
    # after the 5th of 10 evaluations; an equal score is no improvement.
    script_scores(monkeypatch, [0.2, 0.1, 0.3, 0.3, 0.25, 0.9, 0.9, 0.9, 0.9, 0.9])
    lrs = record_step_lrs(monkeypatch)
    train_supervised.main(run_args + ["--epochs", "10", "--eval_every", "1",
                                      "--early_stop_patience", "2", "--scheduler", "plateau",
                                      "--plateau_patience", "100"])
    assert "Early stop: no improvement in 2 evaluations." in capsys.readouterr().out
    assert [r["val_dice"] for r in log_records()] == [0.2, 0.1, 0.3, 0.3, 0.25]
    assert len(lrs) == 5                                   # no step after the stop
    last, best = load_checkpoint("run/last.pth"), load_checkpoint("run/best.pth")
    assert (last["epoch"], last["bad_evaluations"], last["best_score"]) == (4, 2, 0.3)
    assert best["epoch"] == 2                              # the first 0.3


# ==== which epoch best.pth holds ====
BCP_4_EPOCHS = ["--mode", "bcp", "--warm_start", "false", "--pretrain_share", "0.5", "--eval_every", "1",
                "--early_stop_patience", "0"]


@pytest.mark.parametrize("dice, best_epoch", [
    ([0.9, 0.5, 0.6, 0.7], 1),   # the copy-paste phase (epochs 1-2) validated highest
    ([0.5, 0.8, 0.8, 0.7], 2),   # an equal score later is no improvement: epoch 2 stays
    ([0.5, 0.6, 0.6, 0.7], 4)])  # an epoch with pseudo-labels: nothing to say
def test_bcp_says_when_best_pth_is_from_its_copy_paste_phase(run_args, monkeypatch, capsys, dice,
                                                              best_epoch):
    script_scores(monkeypatch, dice)
    train_teacher_student.main(run_args + BCP_4_EPOCHS + ["--epochs", "4"])
    out = capsys.readouterr().out
    assert load_checkpoint("run/best.pth")["epoch"] + 1 == best_epoch
    note = f"note: best.pth holds epoch {best_epoch}, of the labeled copy-paste phase (epochs 1-2)"
    assert (note in out) == (best_epoch <= 2)


def test_bcp_knows_the_epoch_of_best_pth_after_a_resume(run_args, monkeypatch, capsys):
    script_scores(monkeypatch, [0.9, 0.5, 0.6, 0.7])  # two evaluations before the resume, two after
    train_teacher_student.main(run_args + BCP_4_EPOCHS + ["--epochs", "2"])
    capsys.readouterr()
    train_teacher_student.main(["--resume", "run/last.pth", "--epochs", "4"])  # best: epoch 1, restored
    assert "note: best.pth holds epoch 1, of the labeled copy-paste phase" in capsys.readouterr().out


# ==== which schedule steps when ====
def test_poly_schedule_steps_once_per_optimiser_step(run_args, monkeypatch):
    # 2 epochs of 3 steps: lr of step k = 0.01·(1 − k/6)²; a falling validation score changes
    # nothing (plateau logic must not touch poly).
    script_scores(monkeypatch, [0.5, 0.1])
    lrs = record_step_lrs(monkeypatch)
    train_supervised.main(run_args + ["--epochs", "2", "--iters_per_epoch", "3",
                                      "--eval_every", "1", "--scheduler", "poly",
                                      "--poly_power", "2", "--lr", "0.01",
                                      "--early_stop_patience", "0"])
    expected = [0.01 * (1 - k / 6) ** 2 for k in range(6)]   # 0.01·[36, 25, 16, 9, 4, 1]/36
    assert lrs == pytest.approx(expected, rel=1e-12)
    # the log holds the lr after each epoch's steps: after 3 and after 6 of 6
    assert [r["lr"] for r in log_records()] == pytest.approx([0.01 * 0.25, 0.0], abs=1e-15)


def test_plateau_schedule_steps_after_each_evaluation_on_the_selected_score(run_args,
                                                                            monkeypatch):
    # 6 epochs, evaluations after epochs 2, 4 and 6 with Dice 0.2, 0.1, 0.1 (patience 0, factor
    # 0.5): 0.2 is an improvement; each 0.1 is one bad evaluation > 0, so the lr halves after
    # the 2nd and the 3rd evaluation. Epochs 1–4 train at 0.01, epochs 5–6 at 0.005; the last
    # checkpoint holds 0.0025. The Rand index rises every time: had the schedule followed it
    # (or the loss), the lr would never (or at other times) halve.
    script_scores(monkeypatch, dice=[0.2, 0.1, 0.1], rand=[0.1, 0.2, 0.3])
    lrs = record_step_lrs(monkeypatch)
    train_supervised.main(run_args + ["--epochs", "6", "--eval_every", "2",
                                      "--scheduler", "plateau", "--plateau_patience", "0",
                                      "--plateau_factor", "0.5", "--lr", "0.01",
                                      "--select_metric", "dice", "--early_stop_patience", "0"])
    assert lrs == [0.01, 0.01, 0.01, 0.01, 0.005, 0.005]
    records = log_records()
    assert [r["epoch"] for r in records] == [2, 4, 6]
    assert [r["lr"] for r in records] == [0.01, 0.01, 0.005]   # what each epoch trained with
    assert load_checkpoint("run/last.pth")["optimizer"]["param_groups"][0]["lr"] == 0.0025
