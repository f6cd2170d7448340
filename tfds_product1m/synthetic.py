"""Deterministic generator of a Product1M-shaped directory (official text format + images).

Why: the real images are not reachable from here, yet the builder, the pipeline, the trainer
and the scores must run on data with the real structure. This writes the four official
`product1m_*_ossurl_v2.txt` files and `<id>.jpg` images of a made-up cosmetics catalogue in which
retrieval is real: a series shares its colours (a brand its mark), so only the shape, proportions
and label details of a product (and the title) tell instances apart.

Dirty rows (only when `spec.dirty`), the same in EACH of the four splits, so that the builder's
error handling is always exercised and counted:
  * on clean rows, which stay valid examples (one row each, spread over the split):
    `crlf` (line ends in CRLF), `png_as_jpg` (RGBA PNG bytes in `<id>.jpg`), `grayscale` (mode L
    JPEG), `cmyk` (CMYK JPEG), `exif_rotated` (stored turned 90 degrees with EXIF Orientation=6,
    upright after `ImageOps.exif_transpose`), `empty_title`, `stray_spaces` (spaces around every
    field and around every label);
  * extra lines, which a correct parser drops: `blank_line`, `short_row` (the last field is
    missing), `missing_image` (no file), `corrupt_image` (the first third of a JPEG),
    `duplicate_id` (reuses the id of the split's first row, other content: keep the first).
So per split: examples kept = rows - short_row - duplicate_id - missing_image - corrupt_image,
which equals the clean row count of the spec (`num_train`, `num_products * gallery_per_product`,
`num_dev`, `num_test`). Every row's content is seeded by (seed, split, index) alone.

Region features (`spec.region_features`, `--region_features`): `region_features/<split>.tsv` in
the bottom-up-attention format (`region_features.py`), one line per image. Boxes are the true
product boxes (the drawn sprite's opaque extent, clipped to the image) plus 2-4 random distractor
boxes, shuffled. Each region's feature is `StandInDetector`: a fixed, seeded random projection
(then ReLU) of the region's crop downsampled to 16 x 16 RGB. It stands in for a frozen detector
backbone: like one, it maps the same product to nearby features whatever the picture, but it
knows nothing about objects. With dirty rows, per split: the missing_image row has no line
(`no_features`), the corrupt_image row's line is cut short (`bad_features`), and the last clean
row's line has zero boxes (`zero_boxes`, still a valid example).

The catalogue, its pictures and the stand-in detector live in `synthetic_catalogue.py`; the spec
(sizes, dirty-row kinds) in `synthetic_spec.py`; this module writes rows, files and images.

Command: python -m tfds_product1m.synthetic --out DIR [--products N] [--train N] ...
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import pathlib
import random
import time
from collections.abc import Sequence

from absl import flags
from PIL import Image

from tfds_product1m import command_line as cli
from tfds_product1m.product1m_files import FIELD_SEP as SEP
from tfds_product1m.product1m_files import LABEL_SEP, SPLITS, split_filename
from tfds_product1m.synthetic_catalogue import (COUNT_WORDS, MARKETING, SET_WORDS, TYPES, Product,
                                                Renderer, StandInDetector, make_catalogue,
                                                region_line)
from tfds_product1m.synthetic_spec import (DIRTY_KINDS, DROPPED_KINDS, EXTRA_LINES,  # noqa: F401
                                           REGION_DIRTY_KINDS, ROW_QUIRKS, TINY, SyntheticSpec)

SPLIT_CODE = {"train": 1, "gallery": 2, "dev": 3, "test": 4}  # the 2nd id digit: unique ids


# ----------------------------------------------------------------------------- rows
@dataclasses.dataclass
class Row:
    """One line of a split file before dirty-row treatment."""
    id: str
    title: str
    products: list[int]  # instances in the picture, repeats included; labels follow this list


def make_id(seed: int, split: str, index: int) -> str:
    """12-digit id, stable per (seed, split, index), unique across splits (index < 1e8)."""
    x = (index * 73_856_093 + 19_349_663 * (seed + 1)) % 10**8  # bijections of [0, 1e8) ...
    scrambled = (int(f"{x:08d}"[::-1]) * 83_492_791 + 2_654_435) % 10**8  # ... so ids differ
    return f"6{SPLIT_CODE[split]}{seed % 100:02d}{scrambled:08d}"


def _brand_token(p: Product, rnd: random.Random) -> str:
    r = rnd.random()
    if r < 0.55:
        return p.brand
    return p.brand_latin if r < 0.7 else rnd.choice((f"{p.brand_latin}/{p.brand}",
                                                    f"{p.brand}{p.brand_latin}"))


def _title(products: list[Product], rnd: random.Random) -> str:
    """An e-commerce title; for sets it may omit products or name only the set (fuzzy)."""
    first, distinct = products[0], list(dict.fromkeys(products))
    words = rnd.sample(MARKETING, rnd.randint(3, 5))
    if len(distinct) == 1:
        unit = [rnd.choice(TYPES[first.kind][1])] if rnd.random() < 0.6 else []
        name = rnd.choice((first.series + first.kind, first.series + " " + first.kind,
                           first.kind, first.series + first.kind))
        core = [_brand_token(first, rnd), name] + unit
    else:
        by_brand = {p.brand: p for p in distinct}  # name at most two brands, once each
        brands = [_brand_token(p, rnd) for p in list(by_brand.values())[:2]]
        named = [p for p in distinct if rnd.random() > 0.2] or distinct[:1]
        items = "".join(TYPES[p.kind][2] for p in named) if rnd.random() < 0.8 else ""
        set_word = rnd.choice(SET_WORDS + [COUNT_WORDS[min(6, len(products))]] * 2)
        core = brands + [first.series + items + set_word]
        words = words[:4]
    if rnd.random() < 0.25:
        core = core[1:] + core[:1]  # brand after the product words
    front = [w for w in words if rnd.random() < 0.3]
    tokens = front + core + [w for w in words if w not in front]
    return "".join(t + (" " if rnd.random() < 0.2 else "") for t in tokens).strip()


def _pick_set(anchor: Product, catalogue: list[Product], rnd: random.Random) -> list[int]:
    """2-6 instances around `anchor`: mostly one series or brand, sometimes a product twice."""
    n = rnd.choices((2, 3, 4, 5, 6), (45, 30, 13, 7, 5))[0]
    repeats = 1 if n >= 3 and rnd.random() < 0.3 else 0
    tiers = [[p.index for p in catalogue if p.series == anchor.series and p.brand == anchor.brand],
             [p.index for p in catalogue if p.brand == anchor.brand], range(len(catalogue))]
    start = 0 if rnd.random() < 0.65 else (1 if rnd.random() < 0.6 else 2)
    chosen = [anchor.index]
    for tier in tiers[start:]:
        pool = [i for i in tier if i not in chosen]
        chosen += rnd.sample(pool, min(len(pool), n - repeats - len(chosen)))
    chosen += [rnd.choice(chosen) for _ in range(repeats)]
    rnd.shuffle(chosen)
    return chosen


@functools.lru_cache(maxsize=4)
def _train_order(seed: int, num: int) -> list[int]:
    """A seeded permutation of the products: train row i < P holds product order[i]."""
    return random.Random(f"{seed}/perm").sample(range(num), num)


def make_row(spec: SyntheticSpec, catalogue: list[Product], split: str, index: int,
             rnd: random.Random) -> Row:
    """Content of row `index`: train covers every product (row i holds product i mod P)."""
    num = len(catalogue)
    if split == "gallery":
        products = [index // spec.gallery_per_product % num]
    elif split == "train":
        anchor = catalogue[_train_order(spec.seed, num)[index]] if index < num \
            else rnd.choice(catalogue)
        products = [anchor.index] if rnd.random() < 0.6 else _pick_set(anchor, catalogue, rnd)
    else:
        products = _pick_set(rnd.choice(catalogue), catalogue, rnd)
    return Row(make_id(spec.seed, split, index), _title([catalogue[i] for i in products], rnd),
               products)


# ----------------------------------------------------------------------------- writing
def _encode(im: Image.Image, kind: str | None) -> bytes:
    buf = io.BytesIO()
    if kind == "png_as_jpg":
        im.save(buf, "PNG")
    elif kind == "exif_rotated":  # Orientation 6: the viewer turns it 90 degrees clockwise
        exif = Image.Exif()
        exif[0x0112] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=90, exif=exif)
    else:
        mode = {"grayscale": "L", "cmyk": "CMYK"}.get(kind or "", "RGB")
        (im if im.mode == mode else im.convert(mode)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 3] if kind == "corrupt_image" else data


REGION_DIR = "region_features"  # <out>/region_features/<split>.tsv


def image_path(out_dir: str | os.PathLike, split: str, row_id: str) -> pathlib.Path:
    """Community-script-like layout: images/<split>/<last two id digits>/<id>.jpg."""
    return pathlib.Path(out_dir) / "images" / split / row_id[-2:] / f"{row_id}.jpg"


def _line(row: Row, split: str, catalogue: list[Product], kind: str | None) -> str:
    fields = [row.id, "" if kind == "empty_title" else row.title,
              f"https://img-a.example/{row.id}.jpg", f"https://img-b.example/p1m/{row.id}.jpg"]
    labels = [catalogue[i].label for i in row.products]
    if kind == "stray_spaces":
        fields, labels = [f" {f}  " for f in fields], [f"  {x} " for x in labels]
    if split != "train":
        fields.append(LABEL_SEP.join(labels[:1] if split == "gallery" else labels))
    if kind == "short_row":
        fields = fields[:-1]
    return SEP.join(fields) + ("\r\n" if kind == "crlf" else "\n")


def write_split(out_dir: pathlib.Path, spec: SyntheticSpec, catalogue: list[Product],
                renderer: Renderer, split: str) -> dict:
    """Writes one split file and its images; returns its summary (see write_product1m)."""
    n = spec.split_rows(split)
    quirk_at = {(k + 1) * n // (len(ROW_QUIRKS) + 1): q for k, q in enumerate(ROW_QUIRKS)}
    extra_after = {e * n // (len(EXTRA_LINES) + 1): kind
                   for e, kind in enumerate(EXTRA_LINES, 1)} if spec.dirty else {}
    lines: list[str] = []
    dirty_rows: list[dict] = []
    tsv_lines: list[str] = []
    region_dirty = {k: 0 for k in REGION_DIRTY_KINDS}

    def emit(row: Row, kind: str | None, region_kind: str | None = None) -> None:
        rnd = random.Random(f"{spec.seed}/{split}/{row.id}/image")
        if kind:
            row_id = None if kind == "blank_line" else row.id
            dirty_rows.append({"kind": kind, "id": row_id, "line": len(lines) + 1})
        lines.append("\n" if kind == "blank_line" else _line(row, split, catalogue, kind))
        if kind not in ("blank_line", "short_row", "missing_image", "duplicate_id"):
            boxes: list = []
            im = renderer.render(row.products, rnd, transparent=kind == "png_as_jpg", boxes=boxes)
            path = image_path(out_dir, split, row.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_encode(im, kind))
            if detector is not None:
                region_kind = "bad_features" if kind == "corrupt_image" else region_kind
                tsv_lines.append(region_line(row.id, im, boxes, detector, random.Random(
                    f"{spec.seed}/{split}/{row.id}/regions"), region_kind))
        elif detector is not None and kind == "missing_image":
            region_kind = "no_features"
        if detector is not None and region_kind:
            region_dirty[region_kind] += 1

    detector = StandInDetector(spec.feature_dim, spec.seed) if spec.region_features else None
    for i in range(n):
        row = make_row(spec, catalogue, split, i, random.Random(f"{spec.seed}/{split}/{i}"))
        emit(row, quirk_at.get(i) if spec.dirty else None,
             "zero_boxes" if spec.dirty and i == n - 1 else None)
        if i in extra_after:
            kind = extra_after[i]
            e = 10**8 - 1 - EXTRA_LINES.index(kind)  # ids far from clean rows: those stay stable
            extra = make_row(spec, catalogue, split, e, random.Random(f"{spec.seed}/{split}/x{e}"))
            if kind == "duplicate_id":  # row 0 never carries a quirk (those start at n // 8)
                extra.id = make_id(spec.seed, split, 0)
            emit(extra, kind)
    (out_dir / split_filename(split)).write_bytes("".join(lines).encode("utf-8"))
    counts = {k: sum(r["kind"] == k for r in dirty_rows) for k in DIRTY_KINDS}
    rows = len(lines) - counts["blank_line"]
    summary = {"file": split_filename(split), "lines": len(lines), "rows": rows,
               "examples": rows - sum(counts[k] for k in DROPPED_KINDS),
               "dirty": counts, "dirty_rows": dirty_rows}
    if detector is not None:
        tsv = out_dir / REGION_DIR / f"{split}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        tsv.write_bytes("".join(tsv_lines).encode("ascii"))
        summary.update(region_file=str(tsv.relative_to(out_dir)), region_lines=len(tsv_lines),
                       region_dirty=region_dirty)
    return summary


def write_product1m(out_dir: str | os.PathLike, spec: SyntheticSpec) -> dict:
    """Writes the four official text files, the images and README.txt; returns a summary.

    Summary: {split: {"file", "lines" (incl. blank), "rows" (non-blank lines a parser reads),
    "examples" (rows a correct builder keeps = rows - short_row - duplicate_id - missing_image -
    corrupt_image), "dirty": {kind: count for every kind in DIRTY_KINDS},
    "dirty_rows": [{"kind", "id" (None for the blank line), "line" (1-based)}, ...]}}, plus with
    region features "region_file", "region_lines" (TSV lines) and "region_dirty": {kind: count
    for every kind in REGION_DIRTY_KINDS}.
    """
    spec.validate()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    catalogue = make_catalogue(spec.num_products, spec.seed)
    renderer = Renderer(catalogue, spec.image_size, spec.seed)
    summary = {s: write_split(out, spec, catalogue, renderer, s) for s in SPLITS}
    counts = {s: {k: v for k, v in summary[s].items() if k != "dirty_rows"} for s in SPLITS}
    (out / "README.txt").write_text(
        "SYNTHETIC Product1M-format data made by tfds_product1m/synthetic.py: made-up products, "
        "drawn images; not the real dataset.\n"
        f"seed: {spec.seed}\nspec: {json.dumps(dataclasses.asdict(spec))}\n"
        "images: images/<split>/<last two id digits>/<id>.jpg\n"
        + (f"region features: {REGION_DIR}/<split>.tsv (stand-in detector, see the module "
           "docstring)\n" if spec.region_features else "") +
        f"dirty rows (see the module docstring): {json.dumps(counts, ensure_ascii=False)}\n",
        encoding="utf-8")
    return summary


# ------------------------------------------------------------------------------ the command
class _AtLeast(flags.ArgumentParser):
    """An integer flag >= `minimum`; any other value reads 'must be an integer >= N, got X'."""

    def __init__(self, minimum: int):
        self.minimum = minimum
        self.syntactic_help = f"an integer >= {minimum}"

    def parse(self, argument) -> int:
        text = str(argument)
        if not text.lstrip("-").isdigit() or int(text) < self.minimum:
            raise ValueError(f"must be an integer >= {self.minimum}, got {text!r}")
        return int(text)

    def flag_type(self) -> str:
        return "int"


FLAGS = flags.FlagValues()  # The command's own flags (the TFDS builder imports this module).
flags.DEFINE_string("out", None, "Output directory.", required=True, flag_values=FLAGS)
# Integer flag -> (SyntheticSpec field it sets, its smallest value).
_COUNT_FLAGS = {"products": ("num_products", 2), "train": ("num_train", 1),
                "gallery_per_product": ("gallery_per_product", 1), "dev": ("num_dev", 1),
                "test": ("num_test", 1), "image_size": ("image_size", 32), "seed": ("seed", 0),
                "feature_dim": ("feature_dim", 1)}
for _flag, (_field, _minimum) in _COUNT_FLAGS.items():
    flags.DEFINE(_AtLeast(_minimum), _flag, getattr(SyntheticSpec(), _field),
                 f"SyntheticSpec.{_field}.", flag_values=FLAGS)
flags.DEFINE_bool("no_dirty", False, "Write no deliberately dirty rows.", flag_values=FLAGS)
flags.DEFINE_bool("region_features", False, "Also write bottom-up-attention style region "
                  "feature TSVs (stand-in detector, --feature_dim wide).", flag_values=FLAGS)


def main(argv: Sequence[str]) -> dict:
    """Writes a synthetic Product1M directory per the flags and prints a one-line summary;
    returns `write_product1m`'s summary."""
    cli.no_arguments(argv)
    spec = SyntheticSpec(dirty=not FLAGS.no_dirty, region_features=FLAGS.region_features,
                         **{field: FLAGS[flag].value for flag, (field, _) in _COUNT_FLAGS.items()})
    try:
        spec.validate()
    except ValueError as e:
        cli.usage_error(str(e).rstrip("."), cli.USAGE_STATUS)
    out_dir = FLAGS.out
    start = time.perf_counter()
    summary = write_product1m(out_dir, spec)
    secs = time.perf_counter() - start
    rows = sum(s["rows"] for s in summary.values())
    kept = ", ".join(f"{split} {s['examples']}" for split, s in summary.items())
    print(f"wrote {rows} rows ({kept} valid examples) to {out_dir} in {secs:.1f}s "
          f"({rows / secs:.0f} rows/s)")
    return summary


if __name__ == "__main__":
    cli.run(main, FLAGS)
