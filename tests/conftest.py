"""Shared fixtures: a tiny phantom generated once per session, and a challenge-format writer."""
import csv
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    """A 24-train / 6-test phantom at 64x64 (labeled fraction 0.5)."""
    from dataloaders.phantom import generate_phantom
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom(root, n_train=24, labeled_fraction=0.5, n_test=6, size=128, seed=3)
    return root


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
