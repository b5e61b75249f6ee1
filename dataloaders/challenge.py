"""The challenge files on disk -> NumPy arrays (README, Using the challenge data).

A data folder holds `train-images/` (or `train-images.zip`), optionally `test-images/` (or its
zip), the training labels `y_train.csv` (shipped as `label_Hnl61pT.csv`), and optionally
`annotated_labels.json`, `y_test.csv` (phantom only) and `classes.yaml`. Images are decoded
once and cached as a `.npy` beside the folder or zip, keyed on the files' names, sizes and
modification times; later runs memory-map the cache.

Two label modes (README, "#150 instance mode"):
- `class` (challenge #165): mask values are class ids below `num_classes`, the same organ has the
  same id on every image;
- `instance` (challenge #150): mask values are per-image structure ids 0..255 that mean nothing
  across images (0 = no structure, or one left unsegmented). A model cannot learn them as
  classes; it learns the three `INSTANCE_TARGET_CLASSES` instead (utils/instances.py).
"""
import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from dataloaders.label_csv import load_label_masks
from utils.errors import InputError
from utils.files import atomic_path

LABEL_FILES = ("y_train.csv", "label_Hnl61pT.csv")
LABEL_MODES = ("class", "instance")
# What a model predicts in instance mode: each pixel is background, the interior of a structure,
# or its boundary (where it meets another structure or background).
INSTANCE_TARGET_CLASSES = {0: "background", 1: "interior", 2: "boundary"}


@dataclass
class ChallengeData:
    """Everything a script needs from a data folder. Arrays are `(N, H, W) uint8`.

    In `instance` label mode the masks hold structure ids 0..255, `num_classes` is 3 and
    `class_names` is `INSTANCE_TARGET_CLASSES` (what the model predicts), and `annotated` is
    `(N, 3)`: interior and boundary True on every labeled image (a labeled structure is drawn
    whole, so its interior and boundary pixels are all known), False on unlabeled ones; column
    0 is False as in class mode. Which 0-pixels are uncertain (a structure left unsegmented) is
    decided per pixel by `utils.instances.instance_targets`, not per image.
    """
    root: Path
    train_images: np.ndarray
    train_masks: np.ndarray
    train_names: list
    annotated: np.ndarray               # (N, num_classes) bool: ids annotated on each image
    test_images: np.ndarray | None
    test_names: list
    test_masks: np.ndarray | None       # full test labels (phantom's y_test.csv) or None
    num_classes: int
    class_names: dict = field(default_factory=dict)
    label_mode: str = "class"           # class | instance

    @property
    def image_size(self):
        return tuple(self.train_images.shape[1:])

    @property
    def labeled_indices(self):
        """Training images with a non-empty mask, in file order."""
        return np.flatnonzero(self.train_masks.reshape(len(self.train_masks), -1).any(axis=1))

    @property
    def unlabeled_indices(self):
        return np.setdiff1d(np.arange(len(self.train_masks)), self.labeled_indices)


def image_sort_key(name):
    """Numerical order of `12.png`-style names (`10.png` after `9.png`); other names after."""
    stem = name.rsplit(".", 1)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def has_challenge_files(root):
    root = Path(root)
    return (root / "train-images").is_dir() or (root / "train-images.zip").is_file()


def _png_files(folder):
    """The files of `folder` (hidden ones skipped), each checked to be a .png file."""
    files = [path for path in folder.iterdir() if not path.name.startswith(".")]
    for path in files:
        if path.suffix.lower() != ".png" or not path.is_file():
            raise InputError(f"{path}: not a PNG image (the folder must hold only .png files)")
    return files


def _png_sources(root, split):
    """[(name, reader)] of the PNGs of `split` ('train' or 'test'), or None if absent."""
    folder, archive = root / f"{split}-images", root / f"{split}-images.zip"
    if folder.is_dir():
        files = _png_files(folder)
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return {p.name: p.read_bytes for p in files}, stamp, folder
    if archive.is_file():
        try:
            handle = zipfile.ZipFile(archive)
        except zipfile.BadZipFile:
            raise InputError(f"{archive}: not a readable zip file") from None
        members = {}
        for info in handle.infolist():
            name = Path(info.filename).name
            if info.is_dir() or "__MACOSX" in info.filename or name.startswith("."):
                continue
            if not name.lower().endswith(".png"):
                raise InputError(f"{archive}: member {info.filename} is not a PNG image")
            members[name] = (lambda member=info.filename: handle.read(member))
        stat = archive.stat()
        return members, [(archive.name, stat.st_size, stat.st_mtime_ns)], archive
    return None


def _decode_png(raw, where):
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"{where}: unreadable PNG")
    if image.ndim == 3:
        if image.shape[2] == 4:
            image = image[:, :, :3]
        if not (np.array_equal(image[:, :, 0], image[:, :, 1])
                and np.array_equal(image[:, :, 0], image[:, :, 2])):
            raise InputError(f"{where}: colour image; expected 8-bit grayscale CT")
        image = image[:, :, 0]
    if image.dtype != np.uint8:
        raise InputError(f"{where}: {image.dtype} pixels; expected 8-bit grayscale")
    return image


def load_images(root, split):
    """Decode (or memory-map from the cache) the PNGs of `split` in numerical name order.

    Returns `(images (N,H,W) uint8, names)` or `(None, [])` when the split is absent.
    """
    found = _png_sources(Path(root), split)
    if found is None:
        return None, []
    readers, stamp, source = found
    if not readers:
        raise InputError(f"{source}: no PNG images")
    names = sorted(readers, key=image_sort_key)
    key = hashlib.sha1(json.dumps(sorted(stamp)).encode()).hexdigest()[:16]
    cache = source.parent / f".{source.name}.{key}.cache.npy"
    if cache.is_file():
        images = np.load(cache, mmap_mode="r")
        if len(images) == len(names):
            return images, names
    first = _decode_png(readers[names[0]](), source / names[0])
    images = np.empty((len(names),) + first.shape, np.uint8)
    images[0] = first
    for i, name in enumerate(names[1:], start=1):
        image = _decode_png(readers[name](), source / name)
        if image.shape != first.shape:
            raise InputError(f"{source / name}: size {image.shape[1]}x{image.shape[0]} differs "
                             f"from {names[0]} ({first.shape[1]}x{first.shape[0]}); "
                             "all images must have one size")
        images[i] = image
    _write_cache(cache, images, source)
    return images, names


def read_image_folder(folder):
    """Every PNG of a folder of new slices, any size each: `[(name, image (H,W) uint8)]` in
    numerical name order. Raises InputError for a missing or empty folder, a file that is not a
    PNG, or an image that is not 8-bit grayscale."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of PNG images")
    files = sorted(_png_files(folder), key=lambda path: image_sort_key(path.name))
    if not files:
        raise InputError(f"{folder}: no PNG images")
    return [(path.name, _decode_png(path.read_bytes(), path)) for path in files]


def _write_cache(cache, array, source):
    """Atomically save `array` as `cache`, removing older caches of the same source."""
    try:
        for old in cache.parent.glob(f".{source.name}.*.cache.npy"):
            old.unlink()
        with atomic_path(cache) as temporary, open(temporary, "xb") as handle:
            np.save(handle, array)
    except OSError:
        pass  # a read-only data folder just means no cache


def _read_classes(root):
    path = root / "classes.yaml"
    if not path.is_file():
        return {}
    try:
        classes = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise InputError(f"{path}: not valid YAML") from None
    if not isinstance(classes, dict) or not all(isinstance(k, int) and k >= 0 for k in classes):
        raise InputError(f"{path}: expected 'id: name' lines with integer ids")
    return {int(k): str(v) for k, v in classes.items()}


def _read_annotated(root, masks, num_classes):
    """(N, C) bool: the ids annotated on each image (JSON list, else the ids present)."""
    present = np.stack([np.bincount(mask.ravel(), minlength=num_classes)[:num_classes] > 0
                        for mask in masks]) if len(masks) else np.zeros((0, num_classes), bool)
    path = root / "annotated_labels.json"
    if path.is_file():
        try:
            lists = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise InputError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(lists, list) or len(lists) != len(masks):
            raise InputError(f"{path}: expected a list of {len(masks)} lists of structure ids "
                             f"(one per training image)")
        for i, ids in enumerate(lists):
            bad = [v for v in ids if not isinstance(v, int) or not 0 <= v < num_classes]
            if bad:
                raise InputError(f"{path}: image {i} lists ids {bad} outside 0..{num_classes - 1}")
            present[i, ids] = True
    present[:, 0] = False
    return present


def _read_masks(path, image_names, image_size, kind):
    masks, names = load_label_masks(path)
    if tuple(masks.shape[1:]) != tuple(image_size):
        raise InputError(f"{path}: {masks.shape[1] * masks.shape[2]} pixel rows but the "
                         f"{kind} images are {image_size[1]}x{image_size[0]}")
    missing = sorted(set(image_names) - set(names), key=image_sort_key)
    extra = sorted(set(names) - set(image_names), key=image_sort_key)
    if missing or extra:
        what = [f"no column for {', '.join(missing[:3])}" * bool(missing),
                f"columns {', '.join(extra[:3])} match no {kind} image" * bool(extra)]
        raise InputError(f"{path}: columns do not match the {kind} images "
                         f"({'; '.join(w for w in what if w)})")
    order = {name: i for i, name in enumerate(names)}
    return masks, [order[name] for name in image_names]


def _check_class_labels(path, masks, num_classes, class_names):
    """Class mode: every label must be below num_classes; instance ids get a hint at the mode."""
    if masks.size == 0 or int(masks.max()) < num_classes:
        return
    hint = "" if class_names else (" (per-image structure ids of challenge #150? "
                                   "use --label_mode instance)")
    raise InputError(f"{path}: label {int(masks.max())} is not below num_classes "
                     f"{num_classes}{hint}")


def _instance_annotated(masks):
    """(N, 3) bool of instance mode (see `ChallengeData`): interior and boundary on labeled images."""
    labeled = masks.reshape(len(masks), -1).any(axis=1)
    annotated = np.zeros((len(masks), len(INSTANCE_TARGET_CLASSES)), bool)
    annotated[:, 1:] = labeled[:, None]
    return annotated


def data_classes(root, num_classes=55, label_mode="class"):
    """(class names, number of classes) of data folder `root`, as `load_challenge` reads them
    (without the images): in instance mode the 3 targets (`INSTANCE_TARGET_CLASSES`); in class
    mode the ids of its `classes.yaml` (the largest + 1 classes), or none and `num_classes`."""
    if label_mode == "instance":
        return dict(INSTANCE_TARGET_CLASSES), len(INSTANCE_TARGET_CLASSES)
    class_names = _read_classes(Path(root))
    return class_names, (max(class_names) + 1 if class_names else num_classes)


def load_challenge(root, num_classes=55, label_mode="class"):
    """Load a challenge (or phantom) data folder; see `ChallengeData`. Errors name the file.

    label_mode: `class` (values are class ids below `num_classes`, or below the ids of a
    `classes.yaml`) or `instance` (values are structure ids 0..255; `num_classes`,
    `classes.yaml` and `annotated_labels.json` are not used).
    """
    if label_mode not in LABEL_MODES:
        raise InputError(f"label_mode: unknown '{label_mode}' (choose {' or '.join(LABEL_MODES)})")
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: data folder not found")
    train_images, image_names = load_images(root, "train")
    if train_images is None:
        raise InputError(f"{root}: no train-images/ folder or train-images.zip")
    label_path = next((root / n for n in LABEL_FILES if (root / n).is_file()), None)
    if label_path is None:
        raise InputError(f"{root}: no training labels ({' or '.join(LABEL_FILES)})")
    masks, columns = _read_masks(label_path, image_names, train_images.shape[1:], "training")
    # Keep the CSV's column order (the challenge's) and put the images in that order.
    if columns != sorted(columns):
        by_column = np.argsort(columns)
        train_images = train_images[by_column]
        image_names = [image_names[i] for i in by_column]
    class_names, num_classes = data_classes(root, num_classes, label_mode)
    if label_mode == "class":
        _check_class_labels(label_path, masks, num_classes, class_names)

    test_images, test_names = load_images(root, "test")
    test_masks = None
    if test_images is not None and tuple(test_images.shape[1:]) != tuple(train_images.shape[1:]):
        raise InputError(f"{root / 'test-images'}: test images are {test_images.shape[2]}x"
                         f"{test_images.shape[1]}, training images "
                         f"{train_images.shape[2]}x{train_images.shape[1]}")
    if test_images is not None and (root / "y_test.csv").is_file():
        test_label, test_columns = _read_masks(root / "y_test.csv", test_names,
                                               test_images.shape[1:], "test")
        test_masks = test_label[test_columns]
        if label_mode == "class":
            _check_class_labels(root / "y_test.csv", test_masks, num_classes, class_names)

    annotated = (_instance_annotated(masks) if label_mode == "instance"
                 else _read_annotated(root, masks, num_classes))
    return ChallengeData(
        root=root, train_images=train_images, train_masks=masks, train_names=image_names,
        annotated=annotated, test_images=test_images, test_names=test_names,
        test_masks=test_masks, num_classes=num_classes, class_names=class_names,
        label_mode=label_mode)


@dataclass
class Split:
    """Indices into the training images: labeled train / validation / unlabeled pool.

    `folds`/`fold` say which K-fold part validates (0/0: the `labeled_ratio` split)."""
    train: np.ndarray
    val: np.ndarray
    unlabeled: np.ndarray
    folds: int = 0
    fold: int = 0


def _check_folds(data, folds, fold, count):
    if folds == 0:
        if fold != 0:
            raise InputError(f"fold: {fold} given without --folds K (K >= 2 parts)")
        return
    if folds < 2:
        raise InputError(f"folds: {folds} is not 0 (the labeled_ratio split) or at least 2")
    if folds > count:
        raise InputError(f"folds: {folds} folds but {data.root} has only {count} labeled images")
    if not 0 <= fold < folds:
        raise InputError(f"fold: {fold} is not between 0 and {folds - 1} (--folds {folds})")


def make_split(data, labeled_ratio, num_labeled=0, split_seed=0, folds=0, fold=0):
    """A pure function of (data, ratio, num_labeled, seed, folds, fold), so test.py can rebuild it.

    The labeled images are shuffled with `split_seed`. With `folds = 0` the first
    `labeled_ratio` of them train and the rest validate; `labeled_ratio = 1` trains on all of
    them and leaves the validation split empty (the final model). With `folds = K >= 2` the shuffled
    list is cut into K consecutive parts whose sizes differ by at most one; part `fold`
    validates and the other parts train (K-fold cross-validation: every labeled image
    validates exactly once over the K folds; `labeled_ratio` is unused). With
    `num_labeled = n > 0`, only the first n of the training share train, and the others join
    the unlabeled pool (their labels unused): validation stays the same for every n, so
    few-label runs compare on the same images.
    """
    labeled = data.labeled_indices
    if len(labeled) == 0:
        raise InputError(f"{data.root}: no labeled images (every training mask is empty)")
    _check_folds(data, folds, fold, len(labeled))
    if not folds and not 0 < labeled_ratio <= 1:
        raise InputError(f"labeled_ratio: {labeled_ratio} is not in (0, 1] (1 = train on every "
                         "labeled image, no validation)")
    every_image = not folds and labeled_ratio == 1
    if len(labeled) < 2 and not every_image:
        raise InputError(f"{data.root}: only one labeled image; need two (train + validation) "
                         "or --labeled_ratio 1")
    shuffled = np.random.default_rng(split_seed).permutation(labeled)
    if folds:
        parts = np.array_split(shuffled, folds)
        train, val = np.concatenate(parts[:fold] + parts[fold + 1:]), parts[fold]
        share = f"fold {fold} of --folds {folds}"
    else:
        n_train = (len(labeled) if every_image else
                   min(max(1, int(round(labeled_ratio * len(labeled)))), len(labeled) - 1))
        train, val = shuffled[:n_train], shuffled[n_train:]
        share = f"labeled_ratio {labeled_ratio}"
    unlabeled = data.unlabeled_indices
    if num_labeled:
        if not 0 < num_labeled <= len(train):
            raise InputError(f"num_labeled: {num_labeled} is not between 1 and {len(train)} "
                             f"(the labeled training images at {share})")
        unlabeled = np.sort(np.concatenate([unlabeled, train[num_labeled:]]))
        train = train[:num_labeled]
    return Split(train=np.sort(train), val=np.sort(val), unlabeled=unlabeled, folds=folds,
                 fold=fold)


def split_summary(split):
    validation = f"fold {split.fold} of {split.folds}" if split.folds else "validation"
    if not len(split.val):
        validation = "validation (labeled_ratio 1: best.pth is the last checkpoint)"
    return (f"{len(split.train)} labeled for training, {len(split.val)} for {validation}, "
            f"{len(split.unlabeled)} unlabeled")
