"""Instance mode (#150): the label mode of the loader, 3-class targets from structure ids, structures
from probabilities, the Rand index of a perfect prediction, and the phantom's instance format."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import test as test_script
from conftest import write_challenge_folder
from dataloaders import phantom
from dataloaders.challenge import load_challenge
from dataloaders.label_csv import read_label_csv
from utils.errors import InputError, run_cli
from utils.instances import instance_targets, structures_from_probabilities
from utils.metrics import rand_index

B, N, E = 0, 1, 2  # background, iNterior, boundary (E for edge): one letter keeps the maps square


def one_hot(target):
    """[N,H,W] 3-class map -> [N,3,H,W] float probabilities (a perfect prediction)."""
    return F.one_hot(torch.as_tensor(target), 3).permute(0, 3, 1, 2).float()


# ==== targets ====
def test_touching_structures_get_a_boundary_between_them():
    mask = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0],
                         [0, 7, 7, 7, 9, 9, 9, 0],
                         [0, 7, 7, 7, 9, 9, 9, 0],
                         [0, 7, 7, 7, 9, 9, 9, 0],
                         [0, 7, 7, 7, 9, 9, 9, 0],
                         [0, 0, 0, 0, 0, 0, 0, 0]])
    expected = torch.tensor([[B, B, B, B, B, B, B, B],
                             [B, E, E, E, E, E, E, B],
                             [B, E, N, E, E, N, E, B],
                             [B, E, N, E, E, N, E, B],
                             [B, E, E, E, E, E, E, B],
                             [B, B, B, B, B, B, B, B]])
    target, ignore = instance_targets(mask[None])
    assert target.dtype == torch.int64 and ignore is None
    assert torch.equal(target[0], expected)
    assert torch.equal(instance_targets(mask)[0], expected)  # an unbatched [H, W] mask too


def test_ids_are_arbitrary():
    rng = np.random.default_rng(0)
    mask = np.zeros((2, 12, 12), np.int64)
    mask[:, 2:7, 1:6], mask[:, 2:7, 6:11], mask[:, 8:11, 3:9] = 1, 2, 3
    mask[1, 7:9, 0:4] = 4
    targets = instance_targets(torch.from_numpy(mask))[0]
    for _ in range(3):
        ids = np.concatenate([[0], rng.choice(np.arange(1, 256), 4, replace=False)])
        permuted = torch.from_numpy(ids[mask])
        assert torch.equal(instance_targets(permuted)[0], targets)
    assert torch.equal(instance_targets(torch.from_numpy(mask) * 255)[0], targets)  # 255 is an id


def test_boundary_width_and_the_four_neighbourhood():
    square = torch.zeros(11, 11, dtype=torch.long)
    square[2:9, 2:9] = 5  # 7x7

    def interior(width):
        return (instance_targets(square, width)[0] == N).nonzero().tolist()

    assert interior(1) == [[r, c] for r in range(3, 8) for c in range(3, 8)]
    assert interior(2) == [[r, c] for r in range(4, 7) for c in range(4, 7)]
    # a pixel whose only other-id pixel is diagonal stays interior (city-block distance 2)
    corner = torch.full((6, 6), 1)
    corner[3:, 3:] = 2
    target = instance_targets(corner)[0]
    assert target[2, 2] == N and target[2, 3] == E and target[3, 2] == E and target[3, 3] == E


def test_partial_labels_ignore_the_uncertain_zero_pixels():
    mask = torch.zeros(1, 6, 6, dtype=torch.long)
    mask[0, 2:5, 2:5] = 40
    air = torch.zeros(1, 6, 6, dtype=torch.bool)
    air[0, 0, :] = True          # the top row is air outside the body
    air[0, 3, 3] = True          # an inconsistent air flag inside a structure: the label wins
    target, ignore = instance_targets(mask, certain_background=air)
    expected_ignore = torch.ones(6, 6, dtype=torch.bool)
    expected_ignore[0, :] = False
    expected_ignore[2:5, 2:5] = False
    assert torch.equal(ignore[0], expected_ignore)
    assert (target[0, 0] == B).all() and target[0, 3, 3] == N


def test_target_errors():
    with pytest.raises(ValueError, match="boundary_width"):
        instance_targets(torch.zeros(1, 4, 4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="certain_background"):
        instance_targets(torch.zeros(1, 4, 4, dtype=torch.long),
                         certain_background=torch.zeros(4, 4, dtype=torch.bool))


# ==== structures ====
def two_touching_discs(size=48, radius=11.0, gap=18.0):
    """Soft probability maps [3,H,W] of two overlapping discs (centres `gap` apart) drawn as a
    network would: interior inside, a boundary band on the outline and where the discs meet.
    Also returns the truth partition (each disc pixel to the nearer centre)."""
    rows, cols = np.mgrid[:size, :size].astype(float)
    centres = [(size / 2, size / 2 - gap / 2), (size / 2, size / 2 + gap / 2)]
    distances = np.stack([np.hypot(rows - r, cols - c) for r, c in centres])
    inside = distances.min(0) < radius
    near_outline = np.abs(distances.min(0) - radius) < 1.5
    between = inside & (np.abs(distances[0] - distances[1]) < 2.5)
    boundary = inside & (near_outline | between)
    probabilities = np.where(boundary, [[[0.1]], [[0.2]], [[0.7]]],
                             np.where(inside, [[[0.05]], [[0.85]], [[0.1]]],
                                      [[[0.9]], [[0.05]], [[0.05]]]))
    truth = np.where(inside, 1 + distances.argmin(0), 0)
    return probabilities.astype(np.float32), truth


def test_two_touching_discs_give_two_structures():
    probabilities, truth = two_touching_discs()
    structures = structures_from_probabilities(probabilities)
    assert structures.dtype == np.int32 and structures.shape == truth.shape
    assert sorted(np.unique(structures).tolist()) == [0, 1, 2]
    assert rand_index(truth[None], structures[None]) > 0.9
    # numpy, torch, batched or not: the same answer
    batch = torch.from_numpy(np.stack([probabilities, probabilities]))
    assert np.array_equal(structures_from_probabilities(batch), np.stack([structures] * 2))


def test_small_seeds_merge_small_orphans_vanish_and_the_count_is_capped():
    target = np.full((20, 30), B)
    target[2:10, 2:14] = E
    target[3:9, 3:8] = N          # a 30-pixel seed
    target[5, 11] = N             # a 1-pixel seed in the same blob: merged into the big one
    target[14:17, 2:8] = E        # an 18-pixel blob without interior: a structure of its own
    target[14:16, 12:14] = E      # a 4-pixel blob without interior: removed
    target[2:8, 20:28] = E
    target[3:7, 21:27] = N        # a second seeded structure (48 pixels)
    structures = structures_from_probabilities(one_hot(target[None]), min_seed_size=2,
                                               min_size=10)[0]
    assert np.array_equal(np.unique(structures[2:10, 2:14]), [1])
    assert (structures[2:8, 20:28] == 2).all() and (structures[14:17, 2:8] == 3).all()
    assert (structures[14:16, 12:14] == 0).all() and structures.max() == 3
    capped = structures_from_probabilities(one_hot(target[None]), min_seed_size=2, min_size=10,
                                           max_structures=2)[0]
    assert (capped[14:17, 2:8] == 0).all()  # the smallest of the three is dropped
    assert (capped[2:10, 2:14] == 1).all() and (capped[2:8, 20:28] == 2).all()


def test_perfect_prediction_scores_one_whatever_the_ids():
    truth = np.zeros((2, 24, 24), np.int64)
    truth[0, 2:10, 2:12], truth[0, 2:10, 12:20], truth[0, 14:22, 4:16] = 3, 200, 255
    truth[1, 3:9, 3:21], truth[1, 9:20, 3:12], truth[1, 9:20, 12:21] = 17, 90, 4
    rng = np.random.default_rng(1)
    for _ in range(3):  # the metric: any relabelling of a perfect prediction scores 1
        relabel = rng.permutation(1000)
        assert rand_index(truth, relabel[truth]) == 1.0
    # the extraction: perfect 3-class maps of these structures give them back (ids renumbered)
    structures = structures_from_probabilities(one_hot(instance_targets(torch.from_numpy(truth))[0]),
                                               min_seed_size=1)
    assert rand_index(truth, structures) == 1.0
    assert np.array_equal(np.unique(structures[0]), [0, 1, 2, 3])
    assert np.array_equal(structures > 0, truth > 0)


def test_probability_shape_errors():
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        structures_from_probabilities(np.zeros((1, 4, 8, 8), np.float32))


# ==== the loader's label mode ====
def id_folder(root, ids_max=255):
    images = np.full((4, 8, 8), 100, np.uint8)
    masks = np.zeros((4, 8, 8), np.uint8)
    masks[0, 1:4, 1:4], masks[0, 4:7, 1:4], masks[1, 2:6, 2:6] = 12, ids_max, 77
    write_challenge_folder(root, images, masks)
    return masks


def test_instance_mode_reads_ids(tmp_path):
    masks = id_folder(tmp_path)
    (tmp_path / "classes.yaml").write_text("0: background\n1: liver\n")     # not used
    (tmp_path / "annotated_labels.json").write_text(json.dumps([[1], [], [], []]))  # not used
    data = load_challenge(tmp_path, label_mode="instance")
    assert data.label_mode == "instance" and data.num_classes == 3
    assert data.class_names == {0: "background", 1: "interior", 2: "boundary"}
    np.testing.assert_array_equal(data.train_masks, masks)
    assert data.annotated.tolist() == [[False, True, True]] * 2 + [[False, False, False]] * 2
    assert data.labeled_indices.tolist() == [0, 1]
    (tmp_path / "classes.yaml").unlink()
    assert load_challenge(tmp_path, num_classes=256).label_mode == "class"


def one_line_error(root, **kwargs):
    with pytest.raises(InputError) as error:
        load_challenge(root, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_ids_without_the_mode_are_refused_with_a_hint(tmp_path):
    id_folder(tmp_path)
    message = one_line_error(tmp_path)
    assert message.startswith(f"{tmp_path / 'y_train.csv'}: label 255 is not below num_classes 55")
    assert "--label_mode instance" in message
    assert "label_mode: unknown 'instances'" in one_line_error(tmp_path, label_mode="instances")


def test_class_labels_of_y_test_are_checked_too(tmp_path):
    id_folder(tmp_path, ids_max=40)   # training labels up to 77
    (tmp_path / "test-images").mkdir()
    (tmp_path / "test-images" / "9.png").write_bytes((tmp_path / "train-images" / "0.png").read_bytes())
    write_challenge_folder(tmp_path / "staging", np.zeros((1, 8, 8), np.uint8),
                           np.full((1, 8, 8), 160, np.uint8), names=["9.png"])
    (tmp_path / "staging" / "y_train.csv").rename(tmp_path / "y_test.csv")
    assert ("y_test.csv: label 160 is not below num_classes 100"
            in one_line_error(tmp_path, num_classes=100))
    assert load_challenge(tmp_path, label_mode="instance").test_masks.max() == 160


@pytest.mark.parametrize("value, shown", [("256", "'256'"), ("-1", "'-1'"), ("2.5", "'2.5'"),
                                          ("abc", "'abc'")])
def test_ids_outside_0_255_or_not_integers_are_one_line_errors(tmp_path, value, shown):
    id_folder(tmp_path)
    path = tmp_path / "y_train.csv"
    lines = path.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + "," + value
    path.write_text("\n".join(lines) + "\n")
    message = one_line_error(tmp_path, label_mode="instance")
    assert message.startswith(f"{path}: line 6: column '3.png': value {shown} is not an integer")


# ==== the phantom's instance format ====
SMALL = dict(n_train=8, labeled_fraction=0.5, n_test=4, size=128, seed=7, p_annotated=0.5)


@pytest.fixture(scope="module")
def instance_phantom(tmp_path_factory):
    return phantom.generate_phantom(tmp_path_factory.mktemp("instance") / "data",
                                    label_format="instance", **SMALL)


def full_classes(index):
    return phantom.render_slice(SMALL["seed"], index, SMALL["size"])[1]


def test_instance_ids_are_the_components_of_each_organ():
    for index in range(3):
        classes = full_classes(index)
        ids = phantom.instance_ids(SMALL["seed"], index, classes)
        assert ids.dtype == np.uint8 and np.array_equal(ids > 0, classes > 0)
        assert np.array_equal(ids, phantom.instance_ids(SMALL["seed"], index, classes))
        structures = 0
        for class_id in np.unique(classes[classes > 0]):
            components, count = ndimage.label(classes == class_id, np.ones((3, 3)))
            structures += count
            for component in range(1, count + 1):  # one id per component, used nowhere else
                (value,) = np.unique(ids[components == component])
                assert np.array_equal(ids == value, components == component)
        assert len(np.unique(ids[ids > 0])) == structures


def test_phantom_instance_layout(instance_phantom):
    root = instance_phantom
    assert not (root / "classes.yaml").exists() and not (root / "annotated_labels.json").exists()
    test_masks, names, _ = read_label_csv(root / "y_test.csv")
    assert names == [f"{i}.png" for i in range(8, 12)]
    for column, index in enumerate(range(8, 12)):   # full test labels
        expected = phantom.instance_ids(SMALL["seed"], index, full_classes(index))
        assert np.array_equal(test_masks[column], expected)
    train_masks, _, _ = read_label_csv(root / "y_train.csv")
    for index in range(8):
        full = phantom.instance_ids(SMALL["seed"], index, full_classes(index))
        kept = np.unique(train_masks[index][train_masks[index] > 0])
        if index >= 4:
            assert len(kept) == 0
            continue
        assert 0 < len(kept) and set(kept) <= set(np.unique(full))
        assert np.array_equal(np.isin(full, kept), train_masks[index] > 0)  # kept whole
        assert np.array_equal(train_masks[index][train_masks[index] > 0],
                              full[train_masks[index] > 0])
    assert "--label_mode instance" in one_line_error(root)
    data = load_challenge(root, label_mode="instance")
    assert data.labeled_indices.tolist() == [0, 1, 2, 3]


def test_phantom_instance_images_are_the_class_images(instance_phantom, tmp_path):
    classes = phantom.generate_phantom(tmp_path / "classes", **SMALL)
    for name in ("train-images/3.png", "test-images/9.png"):
        assert (classes / name).read_bytes() == (instance_phantom / name).read_bytes()


def test_bad_format_flag_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(phantom.main, ["--out", str(tmp_path / "x"), "--format", "ids"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error == "error: --format: 'ids' is not one of class, instance\n"


def test_watershed_baseline_scores_an_instance_folder(instance_phantom, capsys):
    test_script.main(["--baseline", "watershed", "--data", str(instance_phantom), "--gpu", "-1"])
    out = capsys.readouterr().out
    assert "test (4 slices, full labels): Rand index" in out
