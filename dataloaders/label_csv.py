"""Read and write the challenge label CSVs — the one place that knows their layout.

Layout (train labels `y_train.csv` / `label_Hnl61pT.csv`, phantom `y_test.csv`, submissions):

    ,0.png,1.png,...            header: index name (any, often empty), then one column per image
    Pixel 0,0,0,...             one row per pixel, row-major over a square H×W image
    Pixel 1,0,12,...            values: integers 0–255
    ...                         H·W rows (65,536 for 256×256)

Read naively, this is the transpose of what a model wants; `read_label_csv` returns
`(N, H, W) uint8` masks. `load_label_masks` adds a `.npy` cache next to the CSV.

Parsing works on raw bytes with NumPy: the file is read in chunks of whole lines, each chunk is
parsed on a worker thread (NumPy releases the GIL), and the per-chunk `(images, pixels)` blocks are
joined at the end, so peak memory stays near twice the output (about the file size) plus a few
chunks. A chunk that is not plain `Pixel i,<int>,<int>...` (floats like `3.0`, quotes, stray
characters, ragged lines) goes through a slower line-by-line parser, which is also the one that
words the error messages.
"""
import collections
import concurrent.futures
import csv
import io
import json
import os
import re
import warnings

import numpy as np

from utils.errors import InputError
from utils.files import atomic_path

_CHUNK_BYTES = 8 << 20  # at most: a chunk's int64 separator positions then stay ~32 MB
_MIN_CHUNK_BYTES = 64 << 10  # chunks are ~1/16 of the file between the two, so memory scales with it
_WORKERS = max(1, min(4, os.cpu_count() or 1))
_CONTEXT = 2  # bytes of the previous chunk kept in front, so digits before a separator are views
_SEPARATOR_BELOW = ord("0")  # ' ', ',', '\n' (and '.', '-', '"', '\r') are below '0'
_PIXEL_WORD = np.frombuffer(b"Pixel", np.uint8)
_PIXEL_CELL = re.compile(rb"^(?:pixel\s*)?(\d+)$", re.IGNORECASE)
_CACHE_VERSION = 1
_unwritable_cache_dirs = set()


# ---------------------------------------------------------------- reading


def read_label_csv(path):
    """Parse a label CSV (no caching).

    Returns `(masks, image_names, pixel_index)`: masks `(N, H, W) uint8` with H = W = sqrt(rows),
    image_names the N header names in column order, pixel_index `(H·W,) int64` (checked to be
    0..H·W-1 in order). Raises `InputError` naming the file (and line) for any malformed input.
    """
    path = os.fspath(path)
    try:
        file = open(path, "rb")
    except OSError as error:
        raise InputError(f"{path}: cannot open label CSV ({error.strerror})") from None
    with file:
        image_names = _parse_header(path, file.readline())
        blocks = _parse_body(path, file, image_names)
    rows = sum(block.pixel_index.size for _, block in blocks)
    if rows == 0:
        raise InputError(f"{path}: no pixel rows after the header")
    side = int(round(rows ** 0.5))
    if side * side != rows:
        raise InputError(f"{path}: {rows} pixel rows is not a square image (expected H·W rows with H = W)")
    pixel_index = np.concatenate([block.pixel_index for _, block in blocks])
    _check_pixel_index(path, blocks, pixel_index)
    masks = np.concatenate([block.values_by_image for _, block in blocks], axis=1)
    return masks.reshape(len(image_names), side, side), image_names, pixel_index


# A parsed chunk. values_by_image (N, L) uint8 and pixel_index (L,) int64 for its L pixel rows;
# line_count counts every line of the chunk (blank ones too); row_lines (L,) gives each row's line
# offset inside the chunk, or None when row k is simply line k.
_Block = collections.namedtuple("_Block", "values_by_image pixel_index line_count row_lines")


class _LineError(Exception):
    """A malformed line inside a chunk; the reader turns it into an InputError with path and line."""

    def __init__(self, line_offset, problem):
        super().__init__(problem)
        self.line_offset, self.problem = line_offset, problem


def _parse_header(path, header_line):
    if not header_line.strip():
        raise InputError(f"{path}: empty file or blank header row (expected ',0.png,1.png,...')")
    text = header_line.decode("utf-8-sig", errors="replace").rstrip("\r\n")
    cells = next(csv.reader([text]))
    image_names = [cell.strip() for cell in cells[1:]]
    if not image_names:
        raise InputError(f"{path}: the header row has no image columns (expected ',0.png,1.png,...')")
    seen = set()
    for name in image_names:
        if name in seen:
            raise InputError(f"{path}: image column '{name}' appears twice in the header")
        seen.add(name)
    return image_names


def _parse_body(path, file, image_names):
    """Parse the rows after the header on worker threads; returns [(first line number, _Block)]."""
    blocks, pending = [], collections.deque()
    next_line = 2  # line 1 is the header

    def collect_oldest():
        nonlocal next_line
        try:
            block = pending.popleft().result()
        except _LineError as error:
            raise InputError(f"{path}: line {next_line + error.line_offset}: {error.problem}") from None
        blocks.append((next_line, block))
        next_line += block.line_count

    with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
        try:
            chunk_bytes = min(_CHUNK_BYTES, max(os.fstat(file.fileno()).st_size // 16, _MIN_CHUNK_BYTES))
            for buffer, end in _line_chunks(file, chunk_bytes):
                pending.append(pool.submit(_parse_chunk, image_names, buffer, end))
                if len(pending) > _WORKERS:  # bounds the memory held by chunks in flight
                    collect_oldest()
            while pending:
                collect_oldest()
        finally:
            for future in pending:
                future.cancel()
    return blocks


def _line_chunks(file, chunk_bytes):
    """Yield `(buffer, end)`: `buffer[:end]` is `_CONTEXT` bytes of earlier text, then whole lines."""
    carry = b"\n" * _CONTEXT
    while True:
        data = file.read(chunk_bytes)
        buffer = carry + data
        if b"\r" in buffer:  # Windows line ends: drop them here, at C speed
            buffer = buffer.replace(b"\r\n", b"\n")
        if not data:
            if len(buffer) > _CONTEXT:  # a last line without a newline
                yield buffer + b"\n", len(buffer) + 1
            return
        end = buffer.rfind(b"\n", _CONTEXT) + 1
        if end == 0:  # no line ends in this read yet: read on
            carry = buffer
            continue
        yield buffer, end
        carry = buffer[end - _CONTEXT:]


def _parse_chunk(image_names, buffer, end):
    block = _parse_chunk_fast(np.frombuffer(buffer, np.uint8, count=end), len(image_names))
    return block if block is not None else _parse_chunk_slow(image_names, buffer[_CONTEXT:end])


def _parse_chunk_fast(chunk, n_columns):
    """Exact `Pixel i,v,...,v\\n` lines with 1–3 digit values → `_Block`; None for anything else.

    Every field ends at a separator (a byte below '0'). Because the chunk starts with `_CONTEXT`
    bytes before its body, the last and second-to-last bytes of the field ending at body position
    s are `chunk[s + 1]` and `chunk[s]`: one contiguous gather each. Single-digit values (the vast
    majority) need nothing more; multi-digit ones are finished through a sparse index.
    """
    body = chunk[_CONTEXT:]
    separators = np.flatnonzero(body < _SEPARATOR_BELOW)
    per_line = n_columns + 2  # the space in "Pixel i", N commas, the newline
    line_count = separators.size // per_line
    if line_count == 0 or separators.size != line_count * per_line:
        return None
    separators = separators.reshape(line_count, per_line)
    # a space first and a newline last on each line, and exactly L·N commas in all: then the
    # separators in between are all commas and every line is "<word> <digits>,<v>,...,<v>\n"
    if not ((body[separators[:, 0]] == ord(" ")).all() and (body[separators[:, -1]] == ord("\n")).all()
            and np.count_nonzero(body == ord(",")) == line_count * n_columns):
        return None
    pixel_index = _parse_pixel_fields(body, separators)
    if pixel_index is None:
        return None

    values = chunk[1:].take(separators)  # (L, N+2) last digit of each field
    values -= ord("0")
    if values[:, 2:].max(initial=0) > 9:  # a letter, or an empty field (its "digit" is a separator)
        return None
    second_last = chunk.take(separators)
    multi_digit = np.flatnonzero(second_last[:, 2:] >= _SEPARATOR_BELOW)  # indices into (L, N)
    if multi_digit.size:
        fields = multi_digit + 2 * (multi_digit // n_columns) + 2  # the same fields in (L, N+2)
        field_ends = separators.reshape(-1)[fields]
        tens = second_last.reshape(-1)[fields].astype(np.int16) - ord("0")
        hundreds_byte = chunk[field_ends - 1]
        has_hundreds = hundreds_byte >= _SEPARATOR_BELOW
        hundreds = np.where(has_hundreds, hundreds_byte.astype(np.int16) - ord("0"), 0)
        too_long = has_hundreds & (chunk[field_ends - 2] >= _SEPARATOR_BELOW)
        if tens.max() > 9 or hundreds.max() > 9 or too_long.any():
            return None
        wide = values.reshape(-1)[fields] + 10 * tens + 100 * hundreds
        if wide.max() > 255:
            return None
        values.reshape(-1)[fields] = wide
    values_by_image = np.ascontiguousarray(values[:, 2:].T)
    return _Block(values_by_image, pixel_index, line_count, None)


def _parse_pixel_fields(body, separators):
    """Check each line starts with "Pixel " and read the digits up to its first comma; None if not."""
    space_at, comma_at, newline_at = separators[:, 0], separators[:, 1], separators[:, -1]
    line_start = np.concatenate([[0], newline_at[:-1] + 1])
    if not (space_at - line_start == _PIXEL_WORD.size).all():
        return None
    if not (body[line_start[:, None] + np.arange(_PIXEL_WORD.size)] == _PIXEL_WORD).all():
        return None
    digit_count = comma_at - space_at - 1
    if digit_count.min() < 1 or digit_count.max() > 12:
        return None
    pixel_index = np.zeros(newline_at.size, np.int64)
    for place in range(int(digit_count.max())):
        present = place < digit_count
        digit = body[np.where(present, comma_at - 1 - place, comma_at)].astype(np.int64) - ord("0")
        if (present & ((digit < 0) | (digit > 9))).any():
            return None
        pixel_index += np.where(present, digit * 10 ** place, 0)
    return pixel_index


def _parse_chunk_slow(image_names, text):
    """Line-by-line parser for whatever the fast path declines (`3.0`, quotes, spaces, errors)."""
    text = text.replace(b'"', b"")
    lines = text.split(b"\n")[:-1]  # the chunk ends with a newline
    rows, pixel_index, row_lines = [], [], []
    for line_offset, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        cells = line.split(b",")
        if len(cells) != len(image_names) + 1:
            raise _LineError(line_offset, f"{len(cells)} columns where the header has {len(image_names) + 1}")
        match = _PIXEL_CELL.match(cells[0].strip())
        if match is None:
            raise _LineError(line_offset, f"index cell {cells[0].decode(errors='replace')!r} is not 'Pixel <i>'")
        pixel_index.append(int(match.group(1)))
        rows.append(np.array(cells[1:]))
        row_lines.append(line_offset)
    if not rows:
        return _Block(np.zeros((len(image_names), 0), np.uint8), np.zeros(0, np.int64), len(lines), None)
    cells = np.stack(rows)
    try:
        numbers = cells.astype(np.float64)
        bad = ~((numbers >= 0) & (numbers <= 255) & (numbers == np.round(numbers)))
    except ValueError:  # some cell is not a number at all: find it for the message
        bad = np.zeros(cells.shape, bool)
        row = next(row for row, line in enumerate(rows) if not _parses_as_numbers(line))
        bad[row] = [not _parses_as_numbers(cell) for cell in rows[row]]
    if bad.any():
        row, column = np.argwhere(bad)[0]
        value = cells[row, column].decode(errors="replace").strip()
        raise _LineError(row_lines[row], f"column '{image_names[column]}': value {value!r} is not an integer in 0-255")
    return _Block(np.ascontiguousarray(numbers.astype(np.uint8).T), np.array(pixel_index, np.int64),
                  len(lines), np.array(row_lines, np.int64))


def _parses_as_numbers(cells):
    try:
        np.asarray(cells).astype(np.float64)
        return True
    except ValueError:
        return False


def _check_pixel_index(path, blocks, pixel_index):
    wrong = np.flatnonzero(pixel_index != np.arange(pixel_index.size))
    if not wrong.size:
        return
    row = int(wrong[0])
    for first_line, block in blocks:
        if row < block.pixel_index.size:
            line = first_line + (row if block.row_lines is None else int(block.row_lines[row]))
            found = int(block.pixel_index[row])
            break
        row -= block.pixel_index.size
    raise InputError(f"{path}: line {line}: index 'Pixel {found}' where 'Pixel {int(wrong[0])}' was expected "
                     "(rows must run Pixel 0 .. Pixel H*W-1 in order)")


# ---------------------------------------------------------------- writing


def _cell_text_table(separator):
    """(256,) uint32 whose 4 bytes are the text of v then `separator`, NUL-padded (NUL = no byte)."""
    table = np.zeros((256, 4), np.uint8)
    for value in range(256):
        text = f"{value}{separator}".encode()
        table[value, :len(text)] = np.frombuffer(text, np.uint8)
    return table.view(np.uint32).ravel()


_CELL_THEN_COMMA = _cell_text_table(",")
_CELL_THEN_NEWLINE = _cell_text_table("\n")
_WRITE_BLOCK_ROWS = 2048


def write_label_csv(path, masks, image_names):
    """Write `(N, H, W)` integer masks (values 0–255) in the challenge orientation, atomically.

    One row per pixel (`Pixel 0` .. `Pixel H·W-1`), one column per image named by image_names,
    an empty index header cell, integer text. The file is written to a temporary file in the
    same folder and renamed over `path`; on any failure the temporary file is removed and an
    existing `path` is left untouched.
    """
    path = os.fspath(path)
    masks = np.asarray(masks)
    image_names = [str(name) for name in image_names]
    if masks.ndim != 3:
        raise InputError(f"{path}: masks must be (N, H, W), got shape {masks.shape}")
    if not (np.issubdtype(masks.dtype, np.integer) or masks.dtype == np.bool_):
        raise InputError(f"{path}: masks must hold integers, got dtype {masks.dtype}")
    if masks.shape[0] == 0 or masks.shape[1] != masks.shape[2]:
        raise InputError(f"{path}: masks must be at least one square image, got shape {masks.shape}")
    if masks.shape[0] != len(image_names):
        raise InputError(f"{path}: {masks.shape[0]} masks but {len(image_names)} image names")
    if len(set(image_names)) != len(image_names):
        raise InputError(f"{path}: image names must be unique")
    if masks.size and masks.dtype != np.uint8 and (masks.min() < 0 or masks.max() > 255):
        raise InputError(f"{path}: mask values must be in 0-255, got {masks.min()}..{masks.max()}")
    values_by_image = masks.reshape(masks.shape[0], -1).astype(np.uint8, copy=False)

    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow([""] + image_names)

    def write(file):
        file.write(header.getvalue().encode())
        starts = range(0, values_by_image.shape[1], _WRITE_BLOCK_ROWS)
        with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
            for text in pool.map(lambda start: _format_rows(values_by_image, start), starts):
                file.write(text)

    with atomic_path(path) as temporary, open(temporary, "xb") as file:
        write(file)


def _format_rows(values_by_image, start):
    """Text of pixel rows start..start+_WRITE_BLOCK_ROWS-1 as a uint8 array, built by table lookup.

    Each row is laid out in 4-byte slots (the "Pixel i," label, then one slot per value) with NUL
    padding, and the NULs are squeezed out at the end.
    """
    # copy the column slab first: transposing straight out of (N, H·W) strides across pages
    block = np.ascontiguousarray(values_by_image[:, start:start + _WRITE_BLOCK_ROWS]).T.astype(np.intp)
    rows, n_images = block.shape
    labels = np.array([f"Pixel {pixel}," for pixel in range(start, start + rows)], dtype=np.bytes_)
    label_slots = -(-labels.dtype.itemsize // 4)
    slots = np.zeros((rows, label_slots + n_images), np.uint32)
    slots.view(np.uint8)[:, :labels.dtype.itemsize] = labels.view(np.uint8).reshape(rows, -1)
    np.take(_CELL_THEN_COMMA, block, out=slots[:, label_slots:], mode="clip")
    slots[:, -1] = _CELL_THEN_NEWLINE.take(block[:, -1])
    text = slots.view(np.uint8).reshape(-1)
    return np.compress(text != 0, text)


# ---------------------------------------------------------------- cache


def load_label_masks(path):
    """Label masks of a CSV, cached: returns `(masks (N, H, W) uint8, image_names)`.

    The first call parses the CSV and saves `<csv>.cache.npy` plus `<csv>.cache.json` (image
    names, the CSV's size and mtime_ns) next to it; later calls memory-map the `.npy` (read-only)
    while the CSV's size and mtime are unchanged, and rebuild it when they change. In a folder
    that cannot be written, the parsed array is returned and a warning is given once per folder.
    """
    path = os.fspath(path)
    npy_path, json_path = path + ".cache.npy", path + ".cache.json"
    try:
        before = os.stat(path)
    except OSError as error:
        raise InputError(f"{path}: cannot read label CSV ({error.strerror})") from None
    key = {"version": _CACHE_VERSION, "csv_size": before.st_size, "csv_mtime_ns": before.st_mtime_ns}
    cached = _open_cache(npy_path, json_path, key)
    if cached is not None:
        return cached
    masks, image_names, _ = read_label_csv(path)
    after = os.stat(path)
    if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):  # not rewritten meanwhile
        try:
            with atomic_path(npy_path) as temporary, open(temporary, "xb") as file:
                np.save(file, masks)
            description = dict(key, image_names=image_names, shape=list(masks.shape))
            with atomic_path(json_path) as temporary, open(temporary, "x") as file:
                file.write(json.dumps(description))
        except OSError as error:
            folder = os.path.dirname(os.path.abspath(path))
            if folder not in _unwritable_cache_dirs:
                _unwritable_cache_dirs.add(folder)
                warnings.warn(f"{path}: cannot write the label cache next to it ({error.strerror}); "
                              "the CSV will be parsed again on every run", stacklevel=2)
    return masks, image_names


def _open_cache(npy_path, json_path, key):
    try:
        with open(json_path, "rb") as file:
            description = json.loads(file.read())
        if any(description.get(name) != value for name, value in key.items()):
            return None
        masks = np.load(npy_path, mmap_mode="r")
        if masks.dtype != np.uint8 or list(masks.shape) != description["shape"]:
            return None
        return masks, list(description["image_names"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
