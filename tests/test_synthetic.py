"""The synthetic Product1M generator: official format, determinism, exact dirty-row accounting.

The checks read the written files back with an independent little parser (not the builder's), so a
miscounted summary or a malformed line fails here before it confuses the builder's own tests.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import re

import pytest
from PIL import Image, ImageOps

from capture_jax import cli
from tfds_product1m import synthetic

SEP, LABEL_SEP = "#####", "#;#"
DROPPED = {"short_row", "duplicate_id", "missing_image", "corrupt_image"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    root = tmp_path_factory.mktemp("tiny")
    return root, synthetic.write_product1m(root, synthetic.TINY)


def _tree(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _audit(root: pathlib.Path, split: str, size: int) -> tuple[dict[int, str], list[tuple]]:
    """Classifies every line of a split from the files alone: ({line: dirty kind}, kept rows).

    Kept rows are (id, title, labels) of the rows a correct builder keeps. Kept images must decode
    at `size` x `size` (after the EXIF transpose for rotated ones).
    """
    images = {p.name: p for p in root.rglob("*.jpg")}
    text = (root / synthetic.split_filename(split)).read_bytes().decode("utf-8")
    assert text.endswith("\n")
    kinds: dict[int, str] = {}
    kept, seen = [], set()
    for number, line in enumerate(text.split("\n")[:-1], 1):
        if not line:
            kinds[number] = "blank_line"
            continue
        if line.endswith("\r"):
            kinds[number], line = "crlf", line[:-1]
        assert "\r" not in line
        fields = line.split(SEP)
        if len(fields) < (4 if split == "train" else 5):
            kinds[number] = "short_row"
            continue
        assert len(fields) == (4 if split == "train" else 5), line
        parts = fields + (fields[4].split(LABEL_SEP) if split != "train" else [])
        if any(p != p.strip() for p in parts):
            kinds[number] = "stray_spaces"
        row_id, title = fields[0].strip(), fields[1].strip()
        labels = [x.strip() for x in fields[4].split(LABEL_SEP)] if split != "train" else []
        assert re.fullmatch(r"\d{12}", row_id), row_id
        assert fields[2].strip() == f"https://img-a.example/{row_id}.jpg"
        if row_id in seen:
            kinds[number] = "duplicate_id"
            continue
        seen.add(row_id)
        if not title:
            kinds[number] = "empty_title"
        path = images.get(f"{row_id}.jpg")
        if path is None:
            kinds[number] = "missing_image"
            continue
        assert path.relative_to(root).parts[:3] == ("images", split, row_id[-2:])
        try:  # a small truncated JPEG may fail already in open()
            im = Image.open(path)
            im.load()
        except OSError:
            kinds[number] = "corrupt_image"
            continue
        with im:
            quirk = {"PNG": "png_as_jpg"}.get(im.format) or {"L": "grayscale", "CMYK": "cmyk"}.get(
                im.mode) or ("exif_rotated" if im.getexif().get(0x0112) == 6 else None)
            if quirk:
                kinds[number] = quirk
            assert im.format in ("JPEG", "PNG") and im.mode in ("RGB", "RGBA", "L", "CMYK")
            assert ImageOps.exif_transpose(im).size == (size, size)
        kept.append((row_id, title, labels))
    return kinds, kept


def test_same_spec_gives_the_same_bytes_and_another_seed_differs(tmp_path):
    spec = dataclasses.replace(synthetic.TINY, num_train=40, num_products=12, image_size=48)
    synthetic.write_product1m(tmp_path / "a", spec)
    synthetic.write_product1m(tmp_path / "b", spec)
    synthetic.write_product1m(tmp_path / "c", dataclasses.replace(spec, seed=1))
    a, b, c = (_tree(tmp_path / d) for d in "abc")
    assert a == b and len(a) > 100
    for name in (synthetic.split_filename("train"), synthetic.split_filename("dev")):
        assert a[name] != c[name]


def test_summary_matches_what_is_in_the_files(tiny):
    root, summary = tiny
    assert list(summary) == list(synthetic.SPLITS)
    for split, info in summary.items():
        kinds, kept = _audit(root, split, synthetic.TINY.image_size)
        assert kinds == {r["line"]: r["kind"] for r in info["dirty_rows"]}, split
        counts = collections.Counter(kinds.values())
        assert info["dirty"] == {k: counts[k] for k in synthetic.DIRTY_KINDS}
        assert all(info["dirty"][k] == 1 for k in synthetic.DIRTY_KINDS)  # each kind, each split
        assert info["lines"] == info["rows"] + counts["blank_line"]
        assert info["examples"] == info["rows"] - sum(counts[k] for k in DROPPED) == len(kept)
        assert info["examples"] == synthetic.TINY.split_rows(split)


def test_rows_have_the_official_format(tiny):
    root, _ = tiny
    catalogue = {p.label for p in synthetic.make_catalogue(24, 0)}
    kept = {s: _audit(root, s, synthetic.TINY.image_size)[1] for s in synthetic.SPLITS}
    all_ids = [r[0] for rows in kept.values() for r in rows]
    assert len(all_ids) == len(set(all_ids))  # unique within and across splits
    assert all(not labels for _, _, labels in kept["train"])
    gallery = collections.Counter(labels[0] for _, _, labels in kept["gallery"])
    assert all(len(r[2]) == 1 for r in kept["gallery"])
    assert set(gallery) == catalogue and set(gallery.values()) == {3}
    assert all(re.fullmatch(r"[^\s#]+ [^\s#]+", label) for label in gallery)
    for split in ("dev", "test"):
        for _, _, labels in kept[split]:
            assert 1 <= len(labels) <= 12 and set(labels) <= set(gallery)
    titles = [t for rows in kept.values() for _, t, _ in rows if t]
    assert 20 <= sum(map(len, titles)) / len(titles) <= 35
    assert any(re.search(r"[A-Z]{4,}", t) for t in titles)  # Latin brand spellings
    assert any(re.search(r"\d+(ml|g)", t) for t in titles)  # units


def test_dev_and_test_keep_duplicate_labels(tmp_path):
    spec = dataclasses.replace(synthetic.TINY, num_dev=60, num_test=60, image_size=32)
    synthetic.write_product1m(tmp_path, spec)
    lengths, duplicates = [], 0
    for split in ("dev", "test"):
        for _, _, labels in _audit(tmp_path, split, 32)[1]:
            lengths.append(len(labels))
            duplicates += len(set(labels)) < len(labels)
    assert duplicates >= 1 and min(lengths) >= 2 and max(lengths) <= 6
    assert 2.3 <= sum(lengths) / len(lengths) <= 3.5  # Product1M: about 2.8


def test_broken_images_are_broken_in_the_stated_way(tiny):
    root, summary = tiny
    images = {p.name: p for p in root.rglob("*.jpg")}
    for split, info in summary.items():
        rows = {r["kind"]: r["id"] for r in info["dirty_rows"]}
        assert f"{rows['missing_image']}.jpg" not in images
        with pytest.raises(OSError):
            Image.open(images[f"{rows['corrupt_image']}.jpg"]).load()
        with Image.open(images[f"{rows['png_as_jpg']}.jpg"]) as im:
            assert (im.format, im.mode) == ("PNG", "RGBA")
        with Image.open(images[f"{rows['cmyk']}.jpg"]) as im:
            assert (im.format, im.mode) == ("JPEG", "CMYK")
        with Image.open(images[f"{rows['exif_rotated']}.jpg"]) as im:
            assert im.getexif()[0x0112] == 6
        assert f"{rows['duplicate_id']}.jpg" in images  # the first row's image


def test_no_dirty_writes_only_clean_rows(tmp_path):
    spec = dataclasses.replace(synthetic.TINY, dirty=False, num_dev=3, num_test=2, image_size=32)
    summary = synthetic.write_product1m(tmp_path, spec)
    for split, info in summary.items():
        kinds, kept = _audit(tmp_path, split, 32)
        assert kinds == {} and info["dirty_rows"] == [] and not any(info["dirty"].values())
        assert info["lines"] == info["rows"] == info["examples"] == len(kept)
        assert len(kept) == spec.split_rows(split)


def test_catalogue_is_shaped_like_product1m():
    for num, brands in ((24, 8), (100, 16), (1000, 20)):
        cat = synthetic.make_catalogue(num, seed=0)
        assert len(cat) == num and len({p.label for p in cat}) == num
        assert len({p.brand for p in cat}) == len({p.brand_latin for p in cat}) == brands
    series = collections.defaultdict(list)
    for p in synthetic.make_catalogue(100, seed=0):
        series[p.brand, p.series].append(p)
    assert max(map(len, series.values())) >= 3
    for members in series.values():  # one look per series; items differ in shape or proportions
        assert len({(p.body, p.cap, p.label_rgb, p.mark) for p in members}) == 1
        assert len({(p.shape, p.aspect, p.text_lines) for p in members}) == len(members)


def test_every_product_appears_in_train():
    spec = synthetic.TINY
    cat = synthetic.make_catalogue(spec.num_products, spec.seed)
    seen = set()
    for i in range(spec.num_train):
        rnd = synthetic.random.Random(f"{spec.seed}/train/{i}")
        seen.update(synthetic.make_row(spec, cat, "train", i, rnd).products)
    assert seen == set(range(spec.num_products))


def test_ids_are_stable_and_unique():
    ids = {synthetic.make_id(0, s, i) for s in synthetic.SPLITS for i in range(5000)}
    assert len(ids) == 20000 and all(re.fullmatch(r"6\d{11}", i) for i in ids)
    assert synthetic.make_id(0, "gallery", 7) == synthetic.make_id(0, "gallery", 7)
    assert synthetic.make_id(0, "gallery", 7) != synthetic.make_id(1, "gallery", 7)


def test_cli_writes_a_directory(tmp_path, capsys):
    out = tmp_path / "p1m"
    summary = cli.call(synthetic, ["--out", str(out), "--products", "8", "--train", "16",
                                   "--gallery_per_product", "2", "--dev", "8", "--test", "8",
                                   "--image_size", "40", "--seed", "5"])
    assert summary["gallery"]["examples"] == 16 and summary["train"]["dirty"]["cmyk"] == 1
    assert "wrote" in capsys.readouterr().out
    for split in synthetic.SPLITS:
        assert (out / synthetic.split_filename(split)).is_file()
    readme = (out / "README.txt").read_text(encoding="utf-8")
    assert "SYNTHETIC" in readme and "seed: 5" in readme


@pytest.mark.parametrize("args, message", [
    (["--products", "1"], "--products=1: must be an integer >= 2"),
    (["--train", "-3"], "--train=-3: must be an integer >= 1"),
    (["--dev", "many"], "--dev=many: must be an integer >= 1"),
    (["--products", "10", "--train", "5"], "num_train must be >= num_products"),
    (["--dev", "3"], "every split needs >= 8 rows"),
    (["--image_size", "4000"], "image_size must be 32..1024"),
])
def test_cli_rejects_bad_args_with_one_sentence(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        cli.call(synthetic, ["--out", str(tmp_path / "x")] + args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
