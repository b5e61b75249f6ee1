"""Label CSV reading, writing and caching (dataloaders/label_csv.py).

Fixtures are written with the plain csv module exactly like the challenge files (header
',0.png,1.png,...', one 'Pixel i' row per pixel, one column per image), independently of our writer.
"""
import csv
import os
import warnings

import numpy as np
import pytest

from dataloaders import label_csv
from dataloaders.label_csv import load_label_masks, read_label_csv, write_label_csv
from utils.errors import InputError

N_IMAGES, SIDE = 11, 4


def challenge_masks(seed=0, n_images=N_IMAGES, side=SIDE):
    """(N, side, side) uint8 masks using 1-, 2- and 3-digit values, and an all-zero image."""
    rng = np.random.default_rng(seed)
    masks = rng.choice(np.array([0, 0, 0, 3, 9, 10, 54, 99, 100, 255], np.uint8), size=(n_images, side, side))
    masks[1] = 0  # an unlabeled image
    return masks


def write_challenge_csv(path, masks, names=None, index_header="", cell=str, line_end="\n",
                        final_line_end=True):
    """Write masks the way the challenge ships y_train.csv, with the csv module."""
    names = names if names is not None else [f"{i}.png" for i in range(len(masks))]
    by_pixel = masks.reshape(len(masks), -1).T
    with open(path, "w", newline="") as file:
        writer = csv.writer(file, lineterminator=line_end)
        writer.writerow([index_header] + names)
        for pixel, values in enumerate(by_pixel):
            writer.writerow([f"Pixel {pixel}"] + [cell(int(value)) for value in values])
    if not final_line_end:
        with open(path, "rb+") as file:
            file.truncate(os.path.getsize(path) - len(line_end))
    return names


@pytest.fixture(params=[1 << 20, 97, 16], ids=["one_chunk", "small_chunks", "chunks_shorter_than_a_line"])
def chunk_bytes(request, monkeypatch):
    """Run each reading test with one chunk, with a few lines per chunk and with lines over chunks."""
    monkeypatch.setattr(label_csv, "_CHUNK_BYTES", request.param)
    return request.param


def forbid_slow_parser(monkeypatch):
    def fail(*args):
        raise AssertionError("a plain challenge file went through the slow parser")

    monkeypatch.setattr(label_csv, "_parse_chunk_slow", fail)


def test_read_challenge_layout(tmp_path, chunk_bytes, monkeypatch):
    forbid_slow_parser(monkeypatch)
    masks = challenge_masks()
    names = write_challenge_csv(tmp_path / "y_train.csv", masks)
    read, read_names, pixel_index = read_label_csv(tmp_path / "y_train.csv")
    assert read.dtype == np.uint8 and read.shape == (N_IMAGES, SIDE, SIDE)
    np.testing.assert_array_equal(read, masks)
    assert read_names == names
    np.testing.assert_array_equal(pixel_index, np.arange(SIDE * SIDE))
    assert pixel_index.dtype == np.int64


def test_read_is_row_major_over_the_image(tmp_path, chunk_bytes):
    """Pixel k is row k // W, column k % W of each image."""
    masks = np.arange(2 * 9, dtype=np.uint8).reshape(2, 3, 3)
    write_challenge_csv(tmp_path / "labels.csv", masks)
    with open(tmp_path / "labels.csv") as file:
        rows = list(csv.reader(file))
    assert rows[1 + 5] == ["Pixel 5", "5", "14"]  # pixel 5 = row 1, column 2
    read, _, _ = read_label_csv(tmp_path / "labels.csv")
    assert read[0, 1, 2] == 5 and read[1, 1, 2] == 14


@pytest.mark.parametrize("variant", ["crlf", "quoted_header", "float_values", "spaces", "no_final_newline",
                                     "named_index", "bom"])
def test_read_tolerates_common_variants(tmp_path, chunk_bytes, variant, monkeypatch):
    if variant not in ("float_values", "spaces"):  # only those need the slow parser
        forbid_slow_parser(monkeypatch)
    masks = challenge_masks(seed=1)
    path = tmp_path / "labels.csv"
    options = {"crlf": dict(line_end="\r\n"), "float_values": dict(cell=lambda value: f"{value}.0"),
               "spaces": dict(cell=lambda value: f" {value}"), "no_final_newline": dict(final_line_end=False),
               "named_index": dict(index_header="pixel")}
    names = write_challenge_csv(path, masks, **options.get(variant, {}))
    if variant == "quoted_header":
        text = path.read_text().split("\n", 1)
        path.write_text(",".join(f'"{cell}"' for cell in text[0].split(",")) + "\n" + text[1])
    if variant == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    read, read_names, _ = read_label_csv(path)
    np.testing.assert_array_equal(read, masks)
    assert read_names == names


def test_read_mixes_fast_and_slow_chunks(tmp_path, monkeypatch):
    """A float-formatted line in the middle sends only its chunk to the slow parser."""
    monkeypatch.setattr(label_csv, "_CHUNK_BYTES", 120)
    masks = challenge_masks(seed=2, side=6)
    path = tmp_path / "labels.csv"
    write_challenge_csv(path, masks)
    lines = path.read_text().split("\n")
    lines[20] = ",".join(lines[20].split(",")[:1] + [f"{value}.0" for value in lines[20].split(",")[1:]])
    path.write_text("\n".join(lines))
    read, _, _ = read_label_csv(path)
    np.testing.assert_array_equal(read, masks)


def test_write_then_read_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    masks = rng.integers(0, 256, size=(N_IMAGES, 8, 8)).astype(np.int64)
    names = [f"{500 + i}.png" for i in range(N_IMAGES)]
    write_label_csv(tmp_path / "submission.csv", masks, names)
    read, read_names, _ = read_label_csv(tmp_path / "submission.csv")
    np.testing.assert_array_equal(read, masks)
    assert read_names == names


def test_written_file_has_the_submission_layout(tmp_path):
    """What `read_csv(path, index_col=0)` needs: header of n+1 cells, H·W rows 'Pixel i', integers."""
    masks = challenge_masks(seed=4)
    names = [f"{i}.png" for i in range(N_IMAGES)]
    write_label_csv(tmp_path / "submission.csv", masks, names)
    with open(tmp_path / "submission.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == [""] + names
    assert len(rows) == 1 + SIDE * SIDE
    for pixel, row in enumerate(rows[1:]):
        assert len(row) == N_IMAGES + 1
        assert row[0] == f"Pixel {pixel}"
        assert [int(value) for value in row[1:]] == masks.reshape(N_IMAGES, -1)[:, pixel].tolist()
        assert all(value == str(int(value)) for value in row[1:])  # plain integers: no '3.0', no padding


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "submission.csv"
    path.write_text("old content\n")

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_label_csv(path, challenge_masks(), [f"{i}.png" for i in range(N_IMAGES)])
    with pytest.raises(OSError, match="disk full"):
        write_label_csv(tmp_path / "new.csv", challenge_masks(), [f"{i}.png" for i in range(N_IMAGES)])
    assert path.read_text() == "old content\n"
    assert sorted(os.listdir(tmp_path)) == ["submission.csv"]  # no temporary file left, no new.csv


@pytest.mark.parametrize("masks, names, problem", [
    (np.zeros((4, 4), np.uint8), ["0.png"], "(N, H, W)"),
    (np.zeros((2, 4, 4), np.float32), ["0.png", "1.png"], "integers"),
    (np.zeros((2, 4, 4), np.uint8), ["0.png"], "2 masks but 1 image names"),
    (np.zeros((2, 4, 4), np.uint8), ["0.png", "0.png"], "unique"),
    (np.full((1, 4, 4), 256, np.int32), ["0.png"], "0-255"),
    (np.full((1, 4, 4), -1, np.int32), ["0.png"], "0-255"),
    (np.zeros((1, 4, 5), np.uint8), ["0.png"], "square"),
])
def test_write_rejects_bad_masks(tmp_path, masks, names, problem):
    path = tmp_path / "out.csv"
    with pytest.raises(InputError, match=problem.replace("(", r"\(").replace(")", r"\)")) as error:
        write_label_csv(path, masks, names)
    assert str(path) in str(error.value)
    assert not path.exists()


def write_text(path, header, rows):
    path.write_text("\n".join([header] + rows) + "\n")


GOOD_HEADER = ",0.png,1.png"
GOOD_ROWS = [f"Pixel {pixel},{pixel},0" for pixel in range(4)]


@pytest.mark.parametrize("header, rows, expected", [
    (None, None, "empty file"),
    (GOOD_HEADER, [], "no pixel rows"),
    ("index_only", GOOD_ROWS, "no image columns"),
    (",0.png,0.png", GOOD_ROWS, "'0.png' appears twice"),
    (GOOD_HEADER, GOOD_ROWS[:2] + ["Pixel 2,1,0,7"] + GOOD_ROWS[3:], "line 4: 4 columns where the header has 3"),
    (GOOD_HEADER, GOOD_ROWS[:2] + ["Pixel 2,1"] + GOOD_ROWS[3:], "line 4: 2 columns"),
    (GOOD_HEADER, GOOD_ROWS[:3] + ["Pixel 3,abc,0"], "line 5: column '0.png': value 'abc' is not an integer"),
    (GOOD_HEADER, GOOD_ROWS[:3] + ["Pixel 3,0,"], "line 5: column '1.png': value ''"),
    (GOOD_HEADER, GOOD_ROWS[:3] + ["Pixel 3,2.5,0"], "line 5: column '0.png': value '2.5'"),
    (GOOD_HEADER, GOOD_ROWS[:1] + ["Pixel 1,256,0"] + GOOD_ROWS[2:], "line 3: column '0.png': value '256'"),
    (GOOD_HEADER, GOOD_ROWS[:1] + ["Pixel 1,0,-1"] + GOOD_ROWS[2:], "line 3: column '1.png': value '-1'"),
    (GOOD_HEADER, GOOD_ROWS[:1] + ["Pixel 1,0,1000"] + GOOD_ROWS[2:], "line 3: column '1.png': value '1000'"),
    (GOOD_HEADER, GOOD_ROWS[:1] + ["Pixel 1,0,nan"] + GOOD_ROWS[2:], "line 3: column '1.png': value 'nan'"),
    (GOOD_HEADER, GOOD_ROWS[:3], "3 pixel rows is not a square image"),
    (GOOD_HEADER, GOOD_ROWS[:1] + [GOOD_ROWS[2], GOOD_ROWS[1]] + GOOD_ROWS[3:],
     "line 3: index 'Pixel 2' where 'Pixel 1' was expected"),
    (GOOD_HEADER, GOOD_ROWS[:3] + ["Voxel 3,0,0"], "line 5: index cell 'Voxel 3' is not 'Pixel <i>'"),
])
def test_read_rejects_bad_files(tmp_path, chunk_bytes, header, rows, expected):
    path = tmp_path / "y_train.csv"
    if header is None:
        path.write_bytes(b"")
    else:
        write_text(path, header, rows)
    with pytest.raises(InputError) as error:
        read_label_csv(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert expected in message


def test_read_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot open"):
        read_label_csv(tmp_path / "absent.csv")


def test_cache_is_built_reused_and_rebuilt(tmp_path, monkeypatch):
    path = tmp_path / "y_train.csv"
    first = challenge_masks(seed=5)
    names = write_challenge_csv(path, first)

    masks, read_names = load_label_masks(path)
    np.testing.assert_array_equal(masks, first)
    assert read_names == names
    assert (tmp_path / "y_train.csv.cache.npy").exists() and (tmp_path / "y_train.csv.cache.json").exists()

    real_read = label_csv.read_label_csv

    def must_not_parse(*args):
        raise AssertionError("the CSV was parsed again although the cache is valid")

    monkeypatch.setattr(label_csv, "read_label_csv", must_not_parse)
    cached, cached_names = load_label_masks(path)
    assert isinstance(cached, np.memmap)
    np.testing.assert_array_equal(cached, first)
    assert cached_names == names

    second = challenge_masks(seed=6)
    write_challenge_csv(path, second, names=[f"{i}.png" for i in range(100, 100 + N_IMAGES)])
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a visible change even on coarse clocks
    calls = []
    monkeypatch.setattr(label_csv, "read_label_csv", lambda csv_path: calls.append(csv_path) or real_read(csv_path))
    rebuilt, rebuilt_names = load_label_masks(path)
    assert len(calls) == 1
    np.testing.assert_array_equal(rebuilt, second)
    assert rebuilt_names[0] == "100.png"
    again, _ = load_label_masks(path)  # the rebuilt cache is the one used next
    assert len(calls) == 1
    np.testing.assert_array_equal(again, second)


def test_cache_in_a_read_only_folder_warns_once(tmp_path, monkeypatch):
    path = tmp_path / "y_train.csv"
    masks = challenge_masks(seed=7)
    write_challenge_csv(path, masks)

    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(label_csv, "atomic_path", refuse)
    monkeypatch.setattr(label_csv, "_unwritable_cache_dirs", set())
    with pytest.warns(UserWarning, match="cannot write the label cache"):
        first, _ = load_label_masks(path)
    np.testing.assert_array_equal(first, masks)
    with warnings.catch_warnings(record=True) as later_warnings:
        warnings.simplefilter("always")
        second, _ = load_label_masks(path)
    assert not later_warnings
    np.testing.assert_array_equal(second, masks)
    assert not list(tmp_path.glob("*.cache.*"))

