"""Shared fixtures and test doubles: a tiny phantom generated once per session, a temporary
working folder for training runs, the default training config, a challenge-format writer, a
per-pixel classifier and a recording loss."""
import csv
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")
# The tests' tensors are tiny: one intra-op thread is as fast, and it does not stall when other
# jobs share the CPU (two spinning threads made the suite 7x slower on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    """A 24-train / 6-test phantom at 64x64 (labeled fraction 0.5)."""
    from dataloaders.phantom import generate_phantom
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom(root, n_train=24, labeled_fraction=0.5, n_test=6, size=128, seed=3)
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run inside a temporary folder (runs/latest is relative) with the repo's configs."""
    monkeypatch.chdir(tmp_path)
    os.symlink(ROOT / "configs", tmp_path / "configs")
    return tmp_path


def training_config(script="default", **overrides):
    """The whole default training config of `script` (configs/<script>.yaml and its base chain)
    with `overrides`, frozen: what a script hands the loss and prior builders, every key there (a
    missing key is a bug, never a default). An override of a key the config lacks is an error."""
    from utils.config import script_defaults
    cfg = script_defaults(script)
    unknown = sorted(set(overrides) - set(cfg))
    assert not unknown, f"not training config keys: {unknown}"
    cfg.update(overrides)
    return cfg.freeze()


def write_challenge_folder(root, images, masks, label_name="y_train.csv", names=None):
    """Write `images (N,H,W) uint8` as train-images/<i>.png and `masks` as the challenge CSV
    (header row, `Pixel i` index, one column per image, pixels as rows) with the csv module."""
    root = Path(root)
    (root / "train-images").mkdir(parents=True, exist_ok=True)
    names = names or [f"{i}.png" for i in range(len(images))]
    for name, image in zip(names, images):
        cv2.imwrite(str(root / "train-images" / name), image)
    flat = np.asarray(masks).reshape(len(masks), -1)
    with open(root / label_name, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([""] + names)
        for pixel in range(flat.shape[1]):
            writer.writerow([f"Pixel {pixel}"] + [int(v) for v in flat[:, pixel]])
    return names


class IntensityClassifier(nn.Module):
    """3 classes from the input value v: logits (0, 12·v, 12·(1−v)) + a trainable 0-offset.
    v = 1 → class 1 (confident), v = 0 → class 2 (confident), v = 0.5 → a 50/50 tie.

    Splits into `encode`/`decode` like the project's networks (UniMatch decodes perturbed
    features) and records what it sees: `inputs`, the images given to `forward`, and
    `decoded_batches`, the features of every decode (a forward decodes once too)."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))
        self.inputs, self.decoded_batches = [], []

    def encode(self, x):
        return [x]

    def decode(self, features, size):
        value = features[0][:, :1]
        self.decoded_batches.append(features[0].detach().clone())
        return torch.cat([torch.zeros_like(value), 12 * value, 12 * (1 - value)], 1) + self.offset

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.decode(self.encode(x), x.shape[-2:])


class Recorder:
    """A loss that records each call as a dict (`logits`, `target`, `ignore` and any keyword
    options) and returns `values[i]` on call i, or 1, 2, 3 … without `values`."""

    def __init__(self, values=None):
        self.calls, self.values = [], None if values is None else list(values)

    def __call__(self, logits, target, ignore=None, **options):
        self.calls.append({"logits": logits, "target": target, "ignore": ignore, **options})
        value = len(self.calls) if self.values is None else self.values[len(self.calls) - 1]
        return logits.sum() * 0 + value


def one_line_error(capsys, argv, main=None):
    """Run a script's `main` (test.py's by default) through `run_cli` on `argv`: it must exit
    with status 2 and one line on stderr, which is returned."""
    from utils.errors import run_cli
    if main is None:
        import test as test_script
        main = test_script.main
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err
