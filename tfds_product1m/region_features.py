"""Detector region features in bottom-up-attention TSV files: index, parse, write (no TensorFlow).

The usual input of ViLBERT-family models, CAPTURE's included: a Faster R-CNN (bottom-up-attention)
run once over every image, one tab-separated line per image, no header:

    image_id  image_w  image_h  num_boxes  boxes  features

`boxes` and `features` are base64-encoded little-endian float32 arrays of shape [num_boxes, 4]
(x1, y1, x2, y2 in pixels of the image_w x image_h image the detector saw) and
[num_boxes, feature_dim] (2048 for the ResNet-101 detector). LXMERT's 10-field variant
(`img_id img_h img_w objects_id objects_conf attrs_id attrs_conf num_boxes boxes features`) is read
too; a header line (first field `image_id` or `img_id`) is skipped. Any number of `*.tsv` files,
anywhere under a directory, in any order: `index_tsv_files` records where each image's line
starts, so the builder reads one line per row without holding the features in memory.

Dirty input is counted, never fatal: lines without a usable id (`bad_lines`), blank lines, and
an id seen before (`duplicate_ids`, the first line wins) at indexing; a line that does not decode
(wrong field count, bad numbers, bad base64, array sizes that do not match `num_boxes` or the
feature width, non-finite values) raises `BadRegionsError`, which the builder counts as
`bad_regions`. A line with zero boxes is valid: the image then has only the global token.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections.abc import Iterable

import numpy as np

from tfds_product1m import product1m_files as files

TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id",
                 "attrs_conf", "num_boxes", "boxes", "features")
# Field count -> (index of id, width, height, num_boxes, boxes, features).
_LAYOUTS = {len(TSV_FIELDS): (0, 1, 2, 3, 4, 5), len(LXMERT_FIELDS): (0, 2, 1, 7, 8, 9)}
_HEADER_IDS = (b"image_id", b"img_id")


class BadRegionsError(ValueError):
    """A TSV line that does not decode into boxes and features."""


@dataclasses.dataclass(frozen=True)
class Regions:
    """One image's detector output."""

    image_id: str
    image_w: int  # Size of the image the boxes refer to, in pixels.
    image_h: int
    boxes: np.ndarray  # float32 [num_boxes, 4]: x1, y1, x2, y2 in pixels.
    features: np.ndarray  # float32 [num_boxes, feature_dim].


def _array(field: bytes, name: str, rows: int, width: int | None) -> np.ndarray:
    try:
        data = base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRegionsError(f"{name} is not valid base64: {e}") from e
    values = len(data) // 4
    if len(data) % 4 or (rows and values % rows) or (not rows and values):
        raise BadRegionsError(f"{name} holds {len(data)} bytes, not {rows} rows of float32")
    width = width if width is not None else (values // rows if rows else 0)
    if values != rows * width:
        raise BadRegionsError(f"{name} holds {values} floats, expected {rows} x {width}")
    array = np.frombuffer(data, "<f4").reshape(rows, width)
    if not np.isfinite(array).all():
        raise BadRegionsError(f"{name} holds non-finite values")
    return array


def parse_line(line: bytes | str, feature_dim: int | None = None) -> Regions:
    """Decodes one TSV line; `feature_dim` None infers the width. Raises BadRegionsError."""
    if isinstance(line, str):
        line = line.encode("utf-8")
    fields = line.rstrip(b"\r\n").split(b"\t")
    layout = _LAYOUTS.get(len(fields))
    if layout is None:
        raise BadRegionsError(f"{len(fields)} tab-separated fields; expected {len(TSV_FIELDS)} "
                              f"({' '.join(TSV_FIELDS)}) or {len(LXMERT_FIELDS)} (LXMERT)")
    i_id, i_w, i_h, i_n, i_boxes, i_feats = layout
    try:
        image_w, image_h, num_boxes = (int(fields[i]) for i in (i_w, i_h, i_n))
    except ValueError as e:
        raise BadRegionsError(f"image_w, image_h or num_boxes is not an integer: {e}") from e
    if image_w <= 0 or image_h <= 0 or num_boxes < 0:
        raise BadRegionsError(f"bad sizes: image {image_w}x{image_h}, {num_boxes} boxes")
    image_id = fields[i_id].strip().decode("utf-8", errors="replace")
    boxes = _array(fields[i_boxes], "boxes", num_boxes, 4)
    features = _array(fields[i_feats], "features", num_boxes, feature_dim)
    return Regions(image_id, image_w, image_h, boxes, features)


def encode_line(image_id: str, image_w: int, image_h: int, boxes: np.ndarray,
                features: np.ndarray) -> str:
    """One bottom-up-attention TSV line (with its newline), as the detector scripts write it."""
    boxes = np.ascontiguousarray(boxes, "<f4").reshape(-1, 4)
    features = np.ascontiguousarray(features, "<f4")
    if features.shape[0] != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {features.shape[0]} feature rows.")
    b64 = lambda a: base64.b64encode(a.tobytes()).decode("ascii")  # noqa: E731
    return "\t".join([image_id, str(image_w), str(image_h), str(len(boxes)), b64(boxes),
                      b64(features)]) + "\n"


def find_tsv_files(root: str | os.PathLike) -> list[str]:
    """Every `*.tsv` file under `root`, in sorted walk order (deterministic)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found += [os.path.join(dirpath, n) for n in sorted(filenames) if n.lower().endswith(".tsv")]
    return found


@dataclasses.dataclass
class IndexStats:
    """What indexing the TSV files saw: lines indexed and lines ignored, by reason."""

    files: int = 0
    indexed: int = 0  # Distinct ids, each with the position of its (first) line.
    duplicate_ids: int = 0
    bad_lines: int = 0  # No tab or no id: cannot be a feature line.
    blank_lines: int = 0
    header_lines: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def index_tsv_file(path: str) -> tuple[list[tuple[str, int]], IndexStats]:
    """[(id, byte offset of its line)] of one file, in file order, and what was ignored."""
    entries, stats = [], IndexStats(files=1)
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            start, offset = offset, offset + len(line)
            if not line.strip():
                stats.blank_lines += 1
                continue
            head, tab, _ = line.partition(b"\t")
            image_id = head.strip()
            if not tab or not image_id:
                stats.bad_lines += 1
            elif image_id in _HEADER_IDS:
                stats.header_lines += 1
            else:
                entries.append((image_id.decode("utf-8", errors="replace"), start))
    return entries, stats


Location = tuple[str, int]  # (file path, byte offset of the line)


def index_tsv_files(paths: Iterable[str]) -> tuple[dict[str, Location], IndexStats]:
    """{id: (path, offset)} over all files (the first line of an id wins) and the totals.

    Reads every byte once; the index costs a few hundred bytes of memory per image, whatever
    the feature size.
    """
    index: dict[str, Location] = {}
    total = IndexStats()
    for path in paths:
        entries, stats = index_tsv_file(path)
        for field in dataclasses.fields(IndexStats):
            setattr(total, field.name, getattr(total, field.name) + getattr(stats, field.name))
        for image_id, offset in entries:
            if image_id in index:
                total.duplicate_ids += 1
            else:
                index[image_id] = (path, offset)
    total.indexed = len(index)
    return index, total


def read_line(location: Location) -> bytes:
    path, offset = location
    with open(path, "rb") as f:
        f.seek(offset)
        return f.readline()


def load_regions(location: Location | None, feature_dim: int
                 ) -> tuple[Regions | None, str | None]:
    """The regions at `location`, or (None, skip reason: missing_regions or bad_regions)."""
    if location is None:
        return None, "missing_regions"
    try:
        return parse_line(read_line(location), feature_dim), None
    except (BadRegionsError, OSError):
        return None, "bad_regions"


def probe_feature_dim(index: dict[str, Location], ids: Iterable[str], limit: int = 20
                      ) -> tuple[int | None, str | None]:
    """(feature width, file) of the first decodable line with boxes among `ids`, else (None, None).

    Lets the builder stop with one clear sentence when the files hold another width than the
    config expects, instead of counting every row as bad.
    """
    tried = 0
    for image_id in ids:
        location = index.get(image_id)
        if location is None:
            continue
        tried += 1
        try:
            regions = parse_line(read_line(location))
        except (BadRegionsError, OSError):
            regions = None
        if regions is not None and len(regions.boxes):
            return regions.features.shape[1], location[0]
        if tried >= limit:
            break
    return None, None


def load_row(row: files.Row, image_path: str | None, location: Location | None, *,
             max_side: int, with_image: bool, feature_dim: int
             ) -> tuple[files.Example | None, tuple[str, ...]]:
    """Joins a split row with its regions (and its image when `with_image`).

    Returns (example or None, reasons: the skip reason, or the fixes of a kept row). Features are
    stored as float16 (half the size; bottom-up-attention features are post-ReLU averages well
    inside float16's range); a line whose features overflow float16 counts as `bad_regions`.
    A row whose line has zero boxes is kept and counted as fixed `no_regions`. Without the image,
    `original_width`/`original_height` are the detector's image_w/image_h.
    """
    regions, reason = load_regions(location, feature_dim)
    if regions is None:
        return None, (reason,)
    with np.errstate(over="ignore"):  # Overflow is checked just below.
        stored = regions.features.astype(np.float16)
    if not np.isfinite(stored).all():
        return None, ("bad_regions",)
    region_features = {"features": stored, "boxes": regions.boxes,
                       "image_width": regions.image_w, "image_height": regions.image_h}
    fixes = () if len(regions.boxes) else ("no_regions",)
    if with_image:
        example, reasons = files.load_example(row, image_path, max_side)
        if example is None:
            return None, reasons
        return files.Example(row.id, {**example.features, "regions": region_features}), (
            reasons + fixes)
    features = {"id": row.id, "title": row.title, "labels": list(row.labels),
                "original_width": regions.image_w, "original_height": regions.image_h,
                "regions": region_features}
    return files.Example(row.id, features), fixes
