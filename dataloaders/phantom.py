"""The built-in CT phantom: synthetic axial abdominal slices in the challenge layout (README, The built-in phantom).

    python -m dataloaders.phantom --out data/phantom
    python -m dataloaders.phantom --out /tmp/tiny --n_train 40 --n_test 10 --size 128
    python -m dataloaders.phantom --format instance --out data/phantom_instance   # #150 layout

writes `train-images/0.png …`, `test-images/<n_train>.png …`, `y_train.csv` (partial labels on
the first round(labeled_fraction·n_train) images, all-zero columns after), `annotated_labels.json`,
`y_test.csv` (full labels) and `classes.yaml`, then `.phantom_complete` last, so a folder without
it is an unfinished run. It is for smoke tests and method comparison, not for real CT.

`--format instance` writes the 2024 challenge's (#150) layout instead: the same images, but mask
values are per-image structure ids — each 8-connected component of each organ is a structure
with a random id in 1..255, unique within its image (`instance_ids`) — and no
`annotated_labels.json` or `classes.yaml` (#150 has neither). Partial training labels keep each
structure with probability `p_annotated`, as the class format keeps each organ.

How a slice is made (`render_slice`): a slice level z in [0, 1] (0 = lower abdomen, 1 = liver dome)
sets the cross-section of every organ as an ellipsoid would (radius ∝ sqrt(1 - t²)), so organs
appear, grow and vanish together. Each structure is an ellipse whose outline is perturbed by a few
random angular harmonics, drawn in a canonical body frame into a Hounsfield-unit map and a label
map, painted in a fixed order (later structures win, so labels never overlap and intensities match
them). One cv2.remap then applies a random rotation, scale, shift and a smooth elastic field (a
coarse random displacement grid, cubic-upsampled). Then, in image space: the couch, correlated
noise, blur and a soft-tissue window (W400/L40) to 8 bits. Each slice uses its own generator
`np.random.default_rng([seed, index])`, so the output does not depend on chunking or workers.
"""
import argparse
import inspect
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from dataloaders.label_csv import write_label_csv
from utils.errors import InputError, run_cli
from utils.files import atomic_path

CLASS_NAMES = {
    0: "background", 1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left", 5: "aorta",
    6: "ivc", 7: "vertebra", 8: "stomach", 9: "small_bowel", 10: "colon", 11: "pancreas",
    12: "gallbladder", 13: "liver_lesion", 14: "psoas",
}
(LIVER, SPLEEN, KIDNEY_RIGHT, KIDNEY_LEFT, AORTA, IVC, VERTEBRA, STOMACH, SMALL_BOWEL, COLON,
 PANCREAS, GALLBLADDER, LIVER_LESION, PSOAS) = range(1, 15)
SIZES = (128, 256, 512)
LABEL_FORMATS = ("class", "instance")  # challenge #165 class ids | challenge #150 structure ids
COMPLETE_MARKER = ".phantom_complete"
OWNER_STAMP = ".phantom_owner"  # written first: lets a rerun overwrite an unfinished phantom
WINDOW_LEVEL, WINDOW_WIDTH = 40.0, 400.0  # soft-tissue window in HU
AIR_HU = -1000.0

# Slice-level profiles (z_start, z_peak, z_end): the organ's cross-section radius relative to
# its largest, sqrt(1 - t²) with t = 0 at z_peak and |t| = 1 at z_start / z_end.
PROFILES = {
    "liver_right": (0.15, 0.8, 1.3), "liver_left": (0.45, 0.9, 1.3), "spleen": (0.45, 0.75, 1.05),
    "kidney_right": (-0.05, 0.35, 0.7), "kidney_left": (0.05, 0.45, 0.8),
    "stomach": (0.45, 0.85, 1.25), "pancreas": (0.32, 0.55, 0.78), "gallbladder": (0.28, 0.5, 0.72),
    "psoas": (-0.6, -0.1, 0.55), "colon_transverse": (0.1, 0.4, 0.62),
    "colon_ascending": (-0.6, 0.0, 0.45), "colon_descending": (-0.6, 0.1, 0.58),
    "small_bowel": (-0.6, 0.05, 0.62),
}


def level_profile(z, name):
    """Cross-section radius factor in [0, 1] of structure `name` at slice level z."""
    start, peak, end = PROFILES[name]
    t = (z - peak) / ((peak - start) if z < peak else (end - peak))
    return float(np.sqrt(max(0.0, 1.0 - t * t)))


# ==== drawing in the canonical frame ====
class Canvas:
    """HU and label maps of one slice in the canonical frame, coordinates in [-1, 1].

    x grows to the image right (= patient left), y grows down (= posterior). `occupied` marks
    pixels taken by anything other than the body layers, so bowel can fill only the free fat.
    """

    def __init__(self, size, rng):
        self.size = size
        self.rng = rng
        self.coords = ((np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0)
        self.hu = np.full((size, size), AIR_HU, np.float32)
        self.label = np.zeros((size, size), np.uint8)
        self.occupied = np.zeros((size, size), bool)
        self.cavity = np.zeros((size, size), bool)
        self.fat_inner = np.zeros((size, size), bool)  # inside the subcutaneous fat
        # one smooth random field per slice, reused for mottled contents (food, faeces, bone)
        self.mottle = smooth_noise(rng, 12, size)

    def window(self, center, reach):
        """(rows, cols) slices covering the square center ± reach (canonical units)."""
        def span(c):
            low = int(np.floor((c - reach + 1.0) * self.size / 2.0))
            high = int(np.ceil((c + reach + 1.0) * self.size / 2.0)) + 1
            return slice(min(max(low, 0), self.size), min(max(high, 0), self.size))
        return span(center[1]), span(center[0])

    @staticmethod
    def union(*windows):
        """The smallest window containing all `windows`."""
        return tuple(slice(min(w[axis].start for w in windows), max(w[axis].stop for w in windows))
                     for axis in (0, 1))

    def grid(self, window):
        """Broadcastable (x, y) canonical coordinates of the pixels in `window`."""
        return self.coords[window[1]][None, :], self.coords[window[0]][:, None]

    def is_free(self, point):
        """Whether the canonical `point` lies in cavity fat not yet taken by a structure."""
        col, row = (min(int((c + 1.0) * self.size / 2.0), self.size - 1) for c in point)
        return self.cavity[row, col] and not self.occupied[row, col]

    def paint(self, window, mask, label, hu, only_free=False):
        """Set label and HU (scalar or window-shaped) where `mask`; `only_free`: cavity fat only."""
        if only_free:
            mask = mask & self.cavity[window] & ~self.occupied[window]
        self.label[window][mask] = label
        self.hu[window][mask] = hu[mask] if np.ndim(hu) else hu
        self.occupied[window] |= mask
        return mask


def smooth_noise(rng, cells, size):
    """(size, size) float32 smooth random field, about unit variance, `cells` bumps across.

    Cubic upsampling to 4·cells then linear to `size`: as smooth as a cubic resize to the full
    size, at a tenth of its cost.
    """
    coarse = rng.standard_normal((cells, cells), dtype=np.float32)
    middle = cv2.resize(coarse, (4 * cells, 4 * cells), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(middle, (size, size), interpolation=cv2.INTER_LINEAR)


def random_harmonics(rng, wobble):
    """Outline perturbation r(θ) = 1 + Σ_{k=2..5} a_k cos(kθ + φ_k) as (a_k cos φ_k, a_k sin φ_k)
    pairs; higher orders get smaller amplitudes."""
    amplitudes = (wobble * rng.standard_normal(4) / np.arange(1, 5)).tolist()
    phases = rng.uniform(0, 2 * np.pi, 4).tolist()
    # Python floats keep float32 arrays float32 (NumPy's weak scalars)
    return [(a * math.cos(p), a * math.sin(p)) for a, p in zip(amplitudes, phases)]


def outline_radius(cos_theta, sin_theta, harmonics):
    """r(θ) of `random_harmonics` from cos θ and sin θ (angle-addition recursion, no arctan2)."""
    outline = 1.0
    cos_k, sin_k = cos_theta, sin_theta
    for cos_part, sin_part in harmonics:  # orders 2, 3, 4, 5
        cos_k, sin_k = cos_k * cos_theta - sin_k * sin_theta, sin_k * cos_theta + cos_k * sin_theta
        outline = outline + (cos_part * cos_k - sin_part * sin_k)  # a·cos(kθ + φ)
    return outline


def blob_field(canvas, window, center, radii, angle, harmonics):
    """Normalised radius of an irregular ellipse on `window`: < 1 inside, 1 on the outline.

    `radii` (along, across) the direction `angle` (radians, image axes); `harmonics` from
    `random_harmonics` bend the outline.
    """
    x, y = canvas.grid(window)
    x, y = x - np.float32(center[0]), y - np.float32(center[1])
    cos_a, sin_a = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    along = (x * cos_a + y * sin_a) * np.float32(1.0 / radii[0])
    across = (y * cos_a - x * sin_a) * np.float32(1.0 / radii[1])
    radius = np.sqrt(along * along + across * across) + np.float32(1e-6)
    outline = outline_radius(along / radius, across / radius, harmonics)
    return radius / np.maximum(outline, np.float32(0.3))


def blob(canvas, center, radii, angle=0.0, wobble=0.12, rng=None):
    """A random irregular ellipse: returns (window, rho) with rho < 1 inside; its outline is
    drawn from `rng` (default: the slice's generator)."""
    harmonics = random_harmonics(canvas.rng if rng is None else rng, wobble)
    window = canvas.window(center, reach(radii, harmonics))
    return window, blob_field(canvas, window, center, radii, angle, harmonics)


def reach(radii, harmonics):
    """Largest distance from the center of a blob's outline."""
    return max(radii) * (1.0 + sum(math.hypot(*pair) for pair in harmonics))


# ==== anatomy ====
def draw_body(canvas):
    """Skin, subcutaneous fat and muscle wall around the abdominal cavity (all label 0).

    Returns the cavity scale: organ positions are multiplied by it so thick fat shrinks the
    layout instead of pushing organs into the wall.
    """
    rng = canvas.rng
    x, y = canvas.coords[None, :] / np.float32(0.84), canvas.coords[:, None].copy()
    split = int(np.searchsorted(canvas.coords, 0.0))  # anterior rows (y < 0) come first
    y[:split] /= np.float32(0.62)
    y[split:] /= np.float32(0.50)
    power = np.float32(rng.uniform(2.4, 3.0))  # a superellipse flattens the back
    rho = np.empty((canvas.size, canvas.size), np.float32)
    rho[:split] = np.sqrt(x * x + y[:split] * y[:split])
    rho[split:] = (np.abs(x) ** power + y[split:] ** power) ** np.float32(1.0 / power)
    radius = np.sqrt(x * x + y * y) + np.float32(1e-6)
    cos_theta, sin_theta = x / radius, y / radius  # θ: angle in the ellipse-normalised frame
    rho /= outline_radius(cos_theta, sin_theta, random_harmonics(rng, 0.02))
    skin = np.float32(0.012 * 256 / canvas.size + 0.006)
    fat_mean = rng.uniform(0.05, 0.13)
    fat_direction = rng.uniform(-1, 1)
    fat = np.float32(fat_mean) * (1.0 + np.float32(0.3 * np.cos(fat_direction)) * cos_theta
                                  - np.float32(0.3 * np.sin(fat_direction)) * sin_theta
                                  + 0.15 * (cos_theta * cos_theta - sin_theta * sin_theta))
    # obliques thicker laterally, the two recti either side of a thin linea alba anteriorly
    # (|cos θ| near the anterior midline is about the angle from it)
    lateral = np.abs(cos_theta)
    anterior = sin_theta < 0
    muscle = np.float32(0.045) * (0.55 + 0.6 * lateral
                                  + anterior * (0.9 * np.exp(-((lateral - 0.27) / 0.15) ** 2)
                                                - 0.5 * np.exp(-(lateral / 0.05) ** 2)))
    fat_inner = 1.0 - skin - fat
    cavity_edge = fat_inner - muscle
    canvas.hu[:] = np.select(
        [rho < cavity_edge, rho < fat_inner, rho < 1.0 - skin, rho < 1.0],
        [np.float32(rng.normal(-95, 6)), np.float32(rng.normal(55, 6)),
         np.float32(rng.normal(-105, 6)), np.float32(20.0)], AIR_HU)
    canvas.cavity[:] = rho < cavity_edge
    canvas.fat_inner[:] = rho < fat_inner
    return (1.0 - skin - fat_mean - 0.045) / 0.87


def draw_ribs(canvas, z, k):
    """Rib cross-sections in the lateral wall, more of them higher up (label 0)."""
    rng = canvas.rng
    count = int(round(rng.uniform(2, 5) * np.clip((z - 0.3) / 0.5, 0, 1)))
    ring = 1.0 - (1.0 - k * 0.87) * 0.7  # about the middle of the wall
    for side in (-1, 1):
        for angle in rng.uniform(-0.4, 1.4, count):  # from slightly anterior to posterolateral
            center = (side * 0.84 * ring * np.cos(angle),
                      ring * np.sin(angle) * (0.50 if angle > 0 else 0.62))
            tangent = np.arctan2(np.cos(angle), -side * np.sin(angle))
            window, rho = blob(canvas, center, (0.03, 0.016), tangent, 0.05)
            canvas.paint(window, rho < 1, 0, np.where(rho > 0.6, 700.0, 250.0).astype(np.float32))


def draw_spine(canvas, z, k, hu):
    """Paraspinal and psoas muscles, vertebral body with posterior elements, spinal canal."""
    rng = canvas.rng
    body_center = (0.0, 0.095 * k)
    body_radii = (0.118 * k, 0.087 * k)
    canal_center = (0.0, body_center[1] + body_radii[1] + 0.04 * k)
    for side in (-1, 1):  # erector spinae: inside the subcutaneous fat
        window, rho = blob(canvas, (side * 0.15 * k, canal_center[1] + 0.1 * k),
                           (0.13 * k, 0.095 * k), side * 0.25, 0.08)
        canvas.paint(window, (rho < 1) & canvas.fat_inner[window], 0, hu["muscle"])
    psoas = level_profile(z, "psoas")
    if psoas > 0.15:
        for side in (-1, 1):
            window, rho = blob(canvas, (side * (0.13 + 0.05 * psoas) * k, body_center[1] - 0.01),
                               (0.09 * psoas * k, 0.075 * psoas * k), side * 0.6, 0.08)
            canvas.paint(window, rho < 1, PSOAS, hu["muscle"])
    bone = hu["bone"] + 30 * canvas.mottle
    window, rho = blob(canvas, body_center, body_radii, 0.0, 0.04)
    canvas.paint(window, rho < 1, VERTEBRA, np.where(rho > 0.88, 650.0, bone[window]))
    elements = [(canal_center, (0.075 * k, 0.068 * k), 0.0),  # pedicles and laminae around canal
                ((0.0, canal_center[1] + 0.095 * k), (0.016 * k, 0.06 * k), 0.0)]  # spinous
    if rng.random() < 0.6:  # transverse processes (lumbar levels)
        elements += [((side * 0.12 * k, canal_center[1] - 0.02 * k), (0.06 * k, 0.016 * k),
                      side * -0.3) for side in (-1, 1)]
    for center, radii, angle in elements:
        window, rho = blob(canvas, center, radii, angle, 0.03)
        canvas.paint(window, rho < 1, VERTEBRA, np.float32(550.0))
    window, rho = blob(canvas, canal_center, (0.05 * k, 0.042 * k), 0.0, 0.03)
    canvas.paint(window, rho < 1, 0, np.float32(25.0))


def draw_stomach(canvas, z, k, hu, gravity):
    """Stomach with an enhancing wall and air over fluid, plain fluid, or mottled food."""
    rng = canvas.rng
    size = level_profile(z, "stomach")
    if size < 0.2:
        return
    center = ((0.3 + rng.normal(0, 0.03)) * k, (-0.26 + rng.normal(0, 0.03)) * k)
    window, rho = blob(canvas, center, (0.21 * size * k, 0.15 * size * k), -0.35, 0.15)
    x, y = canvas.grid(window)
    down = (x - center[0]) * gravity[0] + (y - center[1]) * gravity[1]
    contents = rng.choice(["air_fluid", "fluid", "food"], p=[0.45, 0.3, 0.25])
    if contents == "air_fluid":
        lumen = np.where(down < rng.uniform(-0.4, 0.3) * 0.15 * size * k, AIR_HU, 15.0)
    elif contents == "fluid":
        lumen = np.full(rho.shape, 15.0)
    else:
        lumen = 30.0 + 45.0 * canvas.mottle[window]
    wall = rho > rng.uniform(0.8, 0.9)
    canvas.paint(window, rho < 1, STOMACH, np.where(wall, hu["wall"], lumen).astype(np.float32))


def draw_spleen(canvas, z, k, hu):
    """Crescent against the left posterolateral wall (image right)."""
    size = level_profile(z, "spleen")
    if size < 0.15:
        return
    center = (0.55 * k, 0.1 * k)
    window, rho = blob(canvas, center, (0.23 * size * k, 0.13 * size * k), 2.2, 0.12)
    hollow = blob_field(canvas, window, (center[0] - 0.13 * k, center[1] - 0.06 * k),
                        (0.17 * size * k, 0.1 * size * k), 2.2, random_harmonics(canvas.rng, 0.1))
    canvas.paint(window, (rho < 1) & (hollow > 1) & canvas.cavity[window], SPLEEN, hu["spleen"])


def draw_liver(canvas, z, k, hu):
    """Right lobe filling the right upper cavity, left lobe across the midline higher up,
    brighter portal vein branches inside. Returns (window, liver mask on it), or None."""
    rng = canvas.rng
    right, left = level_profile(z, "liver_right"), level_profile(z, "liver_left")
    if right < 0.15:
        return None
    lobes = [((-0.4 * k, -0.1 * k), (0.44 * right * k, 0.45 * right * k), 0.0,
              random_harmonics(rng, 0.1))]
    if left > 0.1:
        lobes.append(((0.0, -0.36 * k), (0.36 * left * k, 0.15 * left * k), -0.15,
                      random_harmonics(rng, 0.12)))
    window = Canvas.union(*[canvas.window(lobe[0], reach(lobe[1], lobe[3])) for lobe in lobes])
    liver = np.zeros(canvas.cavity[window].shape, bool)
    for lobe in lobes:
        liver |= blob_field(canvas, window, *lobe) < 1
    spine_area = blob_field(canvas, window, (0.05 * k, 0.12 * k), (0.2 * k, 0.26 * k), 0.0,
                            random_harmonics(rng, 0.05)) < 1
    liver &= canvas.cavity[window] & ~spine_area
    vessels = np.zeros(canvas.hu.shape, np.uint8)
    hilum = np.array([(-0.15 * k + 1) * canvas.size / 2, (-0.1 * k + 1) * canvas.size / 2])
    step = 0.06 * canvas.size / 2
    for _ in range(rng.integers(3, 7)):  # portal branches: bending walks that thin out
        point, direction = hilum, rng.uniform(2.0, 4.4)  # toward the lateral/anterior periphery
        width = rng.uniform(1.5, 3.0) * canvas.size / 256
        for _ in range(rng.integers(3, 8)):
            direction += rng.normal(0, 0.3)
            end = point + step * np.array([np.cos(direction), np.sin(direction)])
            cv2.line(vessels, tuple(int(v) for v in point), tuple(int(v) for v in end), 1,
                     max(1, int(round(width))))
            point, width = end, width * 0.85
    intensity = np.where(vessels[window] > 0, hu["liver"] + 45.0, hu["liver"]).astype(np.float32)
    return window, canvas.paint(window, liver, LIVER, intensity)


def draw_kidneys(canvas, z, k, hu):
    """Bean-shaped kidneys with cortex, medulla and renal-sinus fat at the anteromedial hilum."""
    for label, name, side in ((KIDNEY_RIGHT, "kidney_right", -1), (KIDNEY_LEFT, "kidney_left", 1)):
        size = level_profile(z, name)
        if size < 0.2:
            continue
        center = (side * 0.36 * k, 0.11 * k)
        angle = np.pi / 2 + side * -0.75  # long axis from posteromedial to anterolateral
        window, rho = blob(canvas, center, (0.16 * size * k, 0.11 * size * k), angle, 0.06)
        sinus = blob_field(canvas, window, (center[0] - side * 0.07 * size * k,
                                            center[1] - 0.035 * size * k),
                           (0.06 * size * k, 0.035 * size * k), -side * 0.6,
                           random_harmonics(canvas.rng, 0.1)) < 1
        cortex = np.where(rho > 0.7, hu["kidney"], hu["kidney"] - 35.0).astype(np.float32)
        canvas.paint(window, (rho < 1) & ~sinus, label, cortex)
        canvas.paint(window, (rho < 1) & sinus, 0, np.float32(-80.0))


def draw_liver_lesions(canvas, liver, hu):
    """0–3 hypodense tumours, each clipped to the liver; `liver` = (window, mask) of draw_liver."""
    rng = canvas.rng
    window, mask = liver
    rows, cols = np.nonzero(mask)
    rows, cols = rows + window[0].start, cols + window[1].start
    if len(rows) < 0.005 * canvas.size ** 2 or rng.random() < 0.45:
        return
    for _ in range(rng.integers(1, 4)):
        pick = rng.integers(len(rows))
        center = (canvas.coords[cols[pick]], canvas.coords[rows[pick]])
        radius = rng.uniform(0.025, 0.075)
        window, rho = blob(canvas, center, (radius, radius * rng.uniform(0.75, 1.0)),
                           rng.uniform(0, np.pi), 0.15)
        inside = (rho < 1) & (canvas.label[window] == LIVER)
        rim = rng.random() < 0.3
        lesion_hu = hu["liver"] - rng.uniform(45, 80)
        canvas.paint(window, inside, LIVER_LESION,
                     np.where(rim & (rho > 0.75), lesion_hu + 30, lesion_hu).astype(np.float32))


def draw_gallbladder(canvas, z, k):
    size = level_profile(z, "gallbladder")
    if size < 0.3:
        return
    center = ((-0.2 + canvas.rng.normal(0, 0.02)) * k, (-0.28 + canvas.rng.normal(0, 0.02)) * k)
    window, rho = blob(canvas, center, (0.08 * size * k, 0.055 * size * k),
                       canvas.rng.uniform(0.6, 1.6), 0.06)
    canvas.paint(window, rho < 1, GALLBLADDER, np.float32(canvas.rng.normal(8, 4)))


def draw_pancreas(canvas, z, k, hu):
    """Lobulated band from the head (right of the SMA) to the tail at the splenic hilum, with
    the superior mesenteric artery behind its neck."""
    rng = canvas.rng
    window, rho = blob(canvas, (0.04 * k, -0.12 * k), (0.017 * k, 0.017 * k), 0.0, 0.02)
    canvas.paint(window, rho < 1, 0, hu["aorta"])
    size = level_profile(z, "pancreas")
    if size < 0.3:
        return
    control = np.array([(-0.15, -0.15), (0.02, -0.22), (0.22, -0.17), (0.4, -0.05)]) * k
    control += rng.normal(0, 0.015, control.shape)
    steps = np.linspace(0, 1, 14)
    for t in steps[steps < 0.45 + 0.55 * size]:
        # cubic Bézier through the four control points
        point = ((1 - t) ** 3 * control[0] + 3 * (1 - t) ** 2 * t * control[1]
                 + 3 * (1 - t) * t ** 2 * control[2] + t ** 3 * control[3])
        radius = (0.065 - 0.03 * t) * k * (0.6 + 0.4 * size)
        window, rho = blob(canvas, point, (radius, radius * 0.8), rng.uniform(0, np.pi), 0.25)
        canvas.paint(window, rho < 1, PANCREAS, hu["pancreas"])


def draw_vessels(canvas, k, hu):
    """IVC right of the midline, aorta left-anterior of the spine (occasional calcification)."""
    rng = canvas.rng
    window, rho = blob(canvas, (-0.11 * k, -0.045 * k), (0.065 * k, 0.045 * k),
                       rng.uniform(-0.3, 0.3), 0.08)
    canvas.paint(window, rho < 1, IVC, hu["ivc"])
    radius = rng.uniform(0.05, 0.062) * k
    center = (0.06 * k, 0.01 * k - radius)
    window, rho = blob(canvas, center, (radius, radius * rng.uniform(0.9, 1.0)), 0.0, 0.03)
    calcified = rng.random() < 0.3
    angle = rng.uniform(0, 2 * np.pi)
    x, y = canvas.grid(window)
    plaque = calcified & (rho > 0.8) & (np.cos(np.arctan2(y - center[1], x - center[0]) - angle)
                                        > 0.9)
    canvas.paint(window, rho < 1, AORTA, np.where(plaque, 700.0, hu["aorta"]).astype(np.float32))


def draw_colon(canvas, z, k):
    """Ascending, descending and transverse colon: thin wall, air with mottled faeces."""
    rng = canvas.rng
    segments = [("colon_ascending", (-0.56, 0.0), (0.1, 0.09)),
                ("colon_descending", (0.6, 0.06), (0.08, 0.075)),
                ("colon_transverse", (0.0, -0.42), (0.22, 0.065))]
    for name, center, radii in segments:
        size = level_profile(z, name)
        if size < 0.35 or rng.random() < 0.15:
            continue
        center = ((center[0] + rng.normal(0, 0.03)) * k, (center[1] + rng.normal(0, 0.03)) * k)
        window, rho = blob(canvas, center, (radii[0] * size * k, radii[1] * k),
                           rng.uniform(-0.3, 0.3), 0.22)
        faeces = canvas.mottle[window] > rng.uniform(-1.0, 1.2)
        lumen = np.where(faeces, -40.0 + 60.0 * canvas.mottle[window], AIR_HU)
        intensity = np.where(rho > 0.85, 60.0, lumen).astype(np.float32)
        canvas.paint(window, rho < 1, COLON, intensity, only_free=True)


def draw_small_bowel(canvas, z, k, hu):
    """Loops with an enhancing wall and fluid content, packed into the free anterior fat;
    then a few mesenteric vessels in the fat that is left."""
    rng = canvas.rng
    loops = int(round(30 * level_profile(z, "small_bowel"))) + rng.integers(0, 4)
    for _ in range(loops):
        center = (rng.uniform(-0.5, 0.55) * k, rng.uniform(-0.5, 0.12) * k)
        if not canvas.is_free(center):
            continue
        radius = rng.uniform(0.045, 0.075) * k
        window, rho = blob(canvas, center, (radius * rng.uniform(1.0, 1.8), radius),
                           rng.uniform(0, np.pi), 0.2)
        content = rng.choice([15.0, 35.0, AIR_HU], p=[0.6, 0.3, 0.1])
        canvas.paint(window, rho < 1, SMALL_BOWEL,
                     np.where(rho > 0.8, hu["wall"], content).astype(np.float32), only_free=True)
    for _ in range(rng.integers(3, 9)):
        center = (rng.uniform(-0.4, 0.4) * k, rng.uniform(-0.45, 0.0) * k)
        if not canvas.is_free(center):
            continue
        radius = rng.uniform(0.008, 0.014)
        window, rho = blob(canvas, center, (radius, radius), 0.0, 0.05)
        canvas.paint(window, rho < 1, 0, hu["ivc"], only_free=True)


def draw_unlabeled_tissue(canvas, k, amount, rng):
    """Soft tissue outside the label set, as on CT (all label 0): `amount` in (0, 1] scales
    about 30 solid blobs of organ intensity (35-130 HU, the range of liver, spleen, pancreas and
    bowel wall; muscles, lymph nodes, duodenum, unlabelled bowel on a real slice) in the cavity
    fat left free, and a mesenteric haze that raises the remaining fat by ~20 HU on average
    (`amount` 1), ~150 HU at its peaks.
    Without it the cavity between organs is clean fat, far darker than any organ, which a
    network learns as background from the air alone; on CT that tissue is where partial labels
    grow sink classes. Draws only from `rng`, so the labelled anatomy is unchanged."""
    for _ in range(round(30 * amount)):
        center = (rng.uniform(-0.7, 0.7) * k, rng.uniform(-0.6, 0.45) * k)
        if not canvas.is_free(center):
            continue
        radius = rng.uniform(0.035, 0.09) * k
        window, rho = blob(canvas, center, (radius * rng.uniform(1.0, 2.0), radius),
                           rng.uniform(0, np.pi), 0.2, rng)
        intensity = rng.uniform(35, 130) + 15.0 * canvas.mottle[window]
        canvas.paint(window, rho < 1, 0, intensity.astype(np.float32), only_free=True)
    fat = canvas.cavity & ~canvas.occupied
    haze = np.clip(smooth_noise(rng, 8, canvas.size), 0, None) * np.float32(60 * amount)
    canvas.hu[fat] += haze[fat]


def tissue_hu(rng):
    """Per-slice tissue intensities (portal-venous phase, HU) with patient-to-patient spread."""
    liver = rng.normal(105, 10)
    aorta = liver + rng.uniform(60, 140)
    return {"liver": np.float32(liver), "spleen": np.float32(liver + rng.normal(10, 8)),
            "aorta": np.float32(aorta), "ivc": np.float32(aorta - rng.uniform(10, 50)),
            "kidney": np.float32(rng.normal(175, 15)), "pancreas": np.float32(rng.normal(95, 8)),
            "muscle": np.float32(rng.normal(55, 5)), "bone": np.float32(rng.normal(220, 25)),
            "wall": np.float32(rng.normal(100, 10))}


# ==== one slice ====
def render_slice(seed, index, size=256, unlabeled_tissue=0.0):
    """Generate slice `index` of the phantom with base `seed`; `unlabeled_tissue` > 0 adds
    organ-like tissue outside the label set (`draw_unlabeled_tissue`).

    Returns (image, labels): `(size, size) uint8` grayscale (soft-tissue window) and
    `(size, size) uint8` structure ids 0..14 (`CLASS_NAMES`), the full label map.
    """
    rng = np.random.default_rng([seed, index])
    z = rng.uniform(0.0, 1.0)
    hu = tissue_hu(rng)
    rotation = rng.uniform(-0.1, 0.1)  # radians, about ±6°
    gravity = (-np.sin(rotation), np.cos(rotation))  # image "down" in the canonical frame
    canvas = Canvas(size, rng)
    k = draw_body(canvas)
    draw_ribs(canvas, z, k)
    draw_spine(canvas, z, k, hu)
    draw_stomach(canvas, z, k, hu, gravity)
    draw_spleen(canvas, z, k, hu)
    liver = draw_liver(canvas, z, k, hu)
    draw_kidneys(canvas, z, k, hu)
    if liver is not None:
        draw_liver_lesions(canvas, liver, hu)
    draw_gallbladder(canvas, z, k)
    draw_pancreas(canvas, z, k, hu)
    draw_vessels(canvas, k, hu)
    draw_colon(canvas, z, k)
    draw_small_bowel(canvas, z, k, hu)
    if unlabeled_tissue:  # from a generator of its own: the rest of the slice is unchanged
        draw_unlabeled_tissue(canvas, k, unlabeled_tissue, np.random.default_rng([seed, index, 3]))
    hu_image, labels = warp(canvas, rng, rotation)
    add_couch(hu_image, rng)
    return to_gray(hu_image, rng), labels


def warp(canvas, rng, rotation):
    """Random rotation, anisotropic scale, shift and smooth elastic field, via one cv2.remap.

    Returns the image-space HU map (linear interpolation: partial-volume edges) and labels
    (nearest neighbour).
    """
    size = canvas.size
    scale = rng.uniform(0.95, 1.12) * np.array([rng.uniform(0.95, 1.05), 1.0])
    shift = np.array([rng.uniform(-0.05, 0.05), rng.uniform(-0.12, -0.05)])
    x = ((canvas.coords - np.float32(shift[0])) / np.float32(scale[0]))[None, :]
    y = ((canvas.coords - np.float32(shift[1])) / np.float32(scale[1]))[:, None]
    cos_r, sin_r = np.float32(np.cos(rotation)), np.float32(np.sin(rotation))
    to_pixels = np.float32(size / 2.0)  # canonical [-1, 1] -> pixel index of the canvas
    elastic = np.float32(0.025) * to_pixels
    map_x = (x * cos_r + y * sin_r + 1) * to_pixels - 0.5 + elastic * smooth_noise(rng, 5, size)
    map_y = (y * cos_r - x * sin_r + 1) * to_pixels - 0.5 + elastic * smooth_noise(rng, 5, size)
    hu = cv2.remap(canvas.hu, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                   borderValue=AIR_HU)
    labels = cv2.remap(canvas.label, map_x, map_y, cv2.INTER_NEAREST,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return hu, labels


def add_couch(hu, rng):
    """The table under the patient: a slightly curved top plate, an air-like foam core and a
    base plate, just below the lowest body pixel (label 0; modifies `hu` in place)."""
    size = hu.shape[0]
    body = hu > -500
    columns = np.nonzero(body.any(axis=0))[0]
    if len(columns) == 0:
        return
    bottom = size - 1 - np.argmax(body[::-1, columns], axis=0)
    center = size / 2.0
    curvature = rng.uniform(0.0, 0.25) / size  # rows per column²: the cradle rises at the sides
    lift = curvature * (np.arange(size) - center) ** 2
    top = np.max(bottom - lift[columns]) + 1 + int(rng.integers(0, 3)) - lift
    half_width = rng.uniform(0.40, 0.47) * size
    inside = np.abs(np.arange(size) - center) < half_width
    plate = max(2, round(3 * size / 256))
    gap = round(rng.uniform(8, 14) * size / 256)
    rows = np.arange(size, dtype=np.float64)[:, None]
    depth = rows - top[None, :]
    top_plate = (depth >= 0) & (depth < plate) & inside
    base_plate = (depth >= plate + gap) & (depth < 2 * plate + gap) & inside
    hu[top_plate] = rng.uniform(80, 200)
    hu[base_plate] = rng.uniform(20, 150)


def to_gray(hu, rng):
    """Correlated CT noise, partial-volume blur and the W400/L40 window -> uint8."""
    size = hu.shape[0]
    pixel = size / 256.0
    fine_sigma = 0.9 * pixel
    # uniform white noise is cheaper than normal and the blur makes it Gaussian anyway
    white = rng.random(hu.shape, dtype=np.float32) - np.float32(0.5)
    fine = cv2.GaussianBlur(white, (0, 0), fine_sigma)
    fine *= np.float32(np.sqrt(12.0) * 2.0 * np.sqrt(np.pi) * fine_sigma)  # unit std again
    coarse = smooth_noise(rng, 10, size)
    hu = hu + np.float32(rng.uniform(10, 20)) * fine + np.float32(rng.uniform(3, 7)) * coarse
    hu = cv2.GaussianBlur(hu, (0, 0), 0.6 * pixel)
    gray = (hu - np.float32(WINDOW_LEVEL - WINDOW_WIDTH / 2)) * np.float32(255.0 / WINDOW_WIDTH)
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def partial_labels(seed, index, labels, p_annotated):
    """Keep each present structure with probability `p_annotated` (at least one if any).

    Returns (mask uint8 like `labels` with unkept ids set to 0, sorted list of kept ids).
    A separate generator from the image's, so `p_annotated` does not change the images.
    """
    rng = np.random.default_rng([seed, index, 1])
    present = np.nonzero(np.bincount(labels.ravel(), minlength=256)[1:])[0] + 1
    kept = present[rng.random(len(present)) < p_annotated]
    if len(kept) == 0 and len(present):
        kept = present[[rng.integers(len(present))]]
    lookup = np.zeros(256, np.uint8)
    lookup[kept] = kept
    return lookup[labels], [int(v) for v in kept]


def instance_ids(seed, index, labels):
    """Structure ids of a class map in the #150 style: each 8-connected component of each class
    > 0 gets its own random id in 1..255, unique within the image; 0 stays 0.

    Deterministic for (seed, index), from a generator of its own (images and partial labels do
    not change). Returns a uint8 array like `labels`.
    """
    structures = np.zeros(labels.shape, np.int32)
    count = 0
    for class_id in np.unique(labels[labels > 0]):
        components, found = ndimage.label(labels == class_id, structure=np.ones((3, 3), bool))
        structures[components > 0] = components[components > 0] + count
        count += found
    if count > 255:
        raise ValueError(f"slice {index}: {count} structures do not fit ids 1..255")
    rng = np.random.default_rng([seed, index, 2])
    lookup = np.concatenate([[0], rng.choice(255, count, replace=False) + 1]).astype(np.uint8)
    return lookup[structures]


# ==== the folder ====
def _render_many(job):
    seed, indices, size, unlabeled_tissue = job
    return [render_slice(seed, index, size, unlabeled_tissue) for index in indices]


def render_all(seed, indices, size, workers, unlabeled_tissue=0.0):
    """Yield (index, image, labels) in order; with `workers` > 1, chunks go to a process pool
    (results are identical either way: each slice has its own generator).

    Only the 'fork' start method is used: 'spawn' would re-run a calling script that lacks a
    `__main__` guard. Where fork does not exist, slices are rendered in this process.
    """
    chunk = 32
    jobs = [(seed, indices[i:i + chunk], size, unlabeled_tissue)
            for i in range(0, len(indices), chunk)]
    if workers <= 1 or len(jobs) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for job in jobs:
            yield from ((i, *s) for i, s in zip(job[1], _render_many(job)))
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for job, slices in zip(jobs, pool.map(_render_many, jobs)):
            yield from ((i, *s) for i, s in zip(job[1], slices))


def check_arguments(n_train, labeled_fraction, n_test, size, p_annotated, label_format,
                    unlabeled_tissue):
    if label_format not in LABEL_FORMATS:
        raise InputError(f"--format: '{label_format}' is not one of {', '.join(LABEL_FORMATS)}")
    if size not in SIZES:
        raise InputError(f"--size: {size} is not one of {', '.join(map(str, SIZES))}")
    for flag, value in (("--n_train", n_train), ("--n_test", n_test)):
        if value <= 0:
            raise InputError(f"{flag}: must be a positive number of images, got {value}")
    for flag, value in (("--labeled_fraction", labeled_fraction), ("--p_annotated", p_annotated),
                        ("--unlabeled_tissue", unlabeled_tissue)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{flag}: must be in [0, 1], got {value}")


def _prepare_folder(out_dir):
    """Claim `out_dir` for a (re)generation; refuse a non-empty folder that is not a phantom."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / OWNER_STAMP).exists():
        raise InputError(f"{out_dir}: not empty and not a phantom folder; choose a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    (out_dir / OWNER_STAMP).write_text("written by dataloaders/phantom.py\n")
    for folder in ("train-images", "test-images"):  # stale slices of a larger earlier phantom
        (out_dir / folder).mkdir(exist_ok=True)
        for stale in (out_dir / folder).glob("*.png"):
            stale.unlink()


def generate_phantom(out_dir, n_train=400, labeled_fraction=0.4, n_test=100, size=256, seed=0,
                     p_annotated=0.6, label_format="class", unlabeled_tissue=0.0, workers=None):
    """Write the phantom data folder to `out_dir`: the layout of the README's "Using the challenge
    data", plus y_test.csv and classes.yaml.

    Train images are 0..n_train-1 (the first round(labeled_fraction·n_train) carry partial
    labels), test images n_train..n_train+n_test-1. `label_format` `instance` writes structure
    ids instead of classes (`instance_ids`) and neither annotated_labels.json nor classes.yaml;
    the images are the same. `unlabeled_tissue` > 0 adds organ-like tissue outside the label
    set to every slice (`draw_unlabeled_tissue`; labels unchanged). `workers`: processes
    (default: up to 4 for large jobs, else 1); the output does not depend on it.
    Returns `out_dir` as a Path.
    Raises InputError on bad arguments or a non-empty folder that is not a phantom.
    """
    settings = phantom_settings(n_train=n_train, labeled_fraction=labeled_fraction,
                                n_test=n_test, size=size, seed=seed, p_annotated=p_annotated,
                                label_format=label_format, unlabeled_tissue=unlabeled_tissue)
    check_arguments(n_train, labeled_fraction, n_test, size, p_annotated, label_format,
                    unlabeled_tissue)
    out_dir = Path(out_dir)
    _prepare_folder(out_dir)
    n_labeled = round(labeled_fraction * n_train)
    total = n_train + n_test
    if workers is None:
        workers = min(os.cpu_count() or 1, 4) if total * size * size >= 200 * 256 * 256 else 1
    train_masks = np.zeros((n_train, size, size), np.uint8)
    test_masks = np.zeros((n_test, size, size), np.uint8)
    annotated = [[] for _ in range(n_train)]
    slices = render_all(seed, list(range(total)), size, workers, unlabeled_tissue)
    for index, image, labels in tqdm(slices, total=total, desc="phantom", leave=False,
                                     disable=None):
        if label_format == "instance":
            labels = instance_ids(seed, index, labels)
        if index < n_train:
            cv2.imwrite(str(out_dir / "train-images" / f"{index}.png"), image)
            if index < n_labeled:
                train_masks[index], annotated[index] = partial_labels(seed, index, labels,
                                                                      p_annotated)
        else:
            cv2.imwrite(str(out_dir / "test-images" / f"{index}.png"), image)
            test_masks[index - n_train] = labels
    write_label_csv(out_dir / "y_train.csv", train_masks, [f"{i}.png" for i in range(n_train)])
    write_label_csv(out_dir / "y_test.csv", test_masks,
                    [f"{i}.png" for i in range(n_train, total)])
    for stale in ("annotated_labels.json", "classes.yaml"):  # of an earlier class-format run
        (out_dir / stale).unlink(missing_ok=True)
    if label_format == "class":
        (out_dir / "annotated_labels.json").write_text(json.dumps(annotated) + "\n")
        (out_dir / "classes.yaml").write_text(
            "".join(f"{i}: {name}\n" for i, name in CLASS_NAMES.items()))
    with atomic_path(out_dir / COMPLETE_MARKER) as temporary:  # last: the folder is complete
        Path(temporary).write_text(json.dumps(settings) + "\n")
    return out_dir


def phantom_settings(**kwargs):
    """The `generate_phantom` arguments that decide its output, defaults filled in (a dict)."""
    bound = inspect.signature(generate_phantom).bind(None, **kwargs)
    bound.apply_defaults()
    return {key: value for key, value in bound.arguments.items()
            if key not in ("out_dir", "workers")}


def ensure_phantom(out_dir="data/phantom", **kwargs):
    """Generate the phantom into `out_dir` unless a complete one with the same settings is there.

    kwargs are those of `generate_phantom`. Returns `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    marker = out_dir / COMPLETE_MARKER
    settings = phantom_settings(**kwargs)
    try:
        if json.loads(marker.read_text()) == settings:
            return out_dir
    except (OSError, json.JSONDecodeError):
        pass  # missing or damaged marker: (re)generate
    start = time.perf_counter()
    generate_phantom(out_dir, **kwargs)
    print(f"Generated the CT phantom in {out_dir}/ ({settings['n_train']} train + "
          f"{settings['n_test']} test slices, {time.perf_counter() - start:.1f} s).")
    return out_dir


def main(argv=None):
    defaults = phantom_settings()
    parser = argparse.ArgumentParser(
        description="Write the built-in CT phantom in the challenge layout.")
    parser.add_argument("--out", default="data/phantom", help="output folder")
    parser.add_argument("--n_train", type=int, default=defaults["n_train"],
                        help="training images")
    parser.add_argument("--labeled_fraction", type=float, default=defaults["labeled_fraction"],
                        help="fraction of training images (the first ones) with partial labels")
    parser.add_argument("--n_test", type=int, default=defaults["n_test"],
                        help="test images (full labels)")
    parser.add_argument("--size", type=int, default=defaults["size"],
                        help="image side: 128, 256 or 512")
    parser.add_argument("--seed", type=int, default=defaults["seed"],
                        help="base seed (slice i uses the generator [seed, i])")
    parser.add_argument("--p_annotated", type=float, default=defaults["p_annotated"],
                        help="probability that a present structure is annotated")
    parser.add_argument("--format", dest="label_format", default=defaults["label_format"],
                        help="class: organ class ids (challenge #165) | instance: per-image "
                             "structure ids 1..255 (challenge #150)")
    parser.add_argument("--unlabeled_tissue", type=float, default=defaults["unlabeled_tissue"],
                        help="0-1: organ-like soft tissue outside the label set (blobs of organ "
                             "intensity, mesenteric haze), as on CT; 0 = clean cavity fat")
    args = parser.parse_args(argv)
    settings = {key: value for key, value in vars(args).items() if key != "out"}
    print("phantom: " + ", ".join(f"{key}={value}" for key, value in settings.items()))
    start = time.perf_counter()
    out_dir = generate_phantom(args.out, **settings)
    print(f"Wrote {args.n_train} train ({round(args.labeled_fraction * args.n_train)} labeled) + "
          f"{args.n_test} test slices ({args.size}x{args.size}) to {out_dir}/ in "
          f"{time.perf_counter() - start:.1f} s; next: python train_supervised.py --data {out_dir}"
          + " --label_mode instance" * (args.label_format == "instance"))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
