"""Parser and image clean-up for the official Product1M files: every dirty case, exact counts."""

import io

import numpy as np
import pytest
from PIL import Image

from tfds_product1m import product1m_files as files


def _jpeg(size=(40, 30), color=(200, 30, 30), mode="RGB", fmt="JPEG", exif_orientation=None):
    img = Image.new(mode, size, color)
    out = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _parse(text, split):
    stats = files.SplitStats()
    rows = files.parse_split_lines(io.StringIO(text, newline=""), split, stats)
    return rows, stats


def test_clean_rows_parse_in_order_with_labels_and_duplicates():
    text = (
        "600000000001#####雅诗兰黛 小棕瓶精华 50ml#####u1#####u2#####品牌甲 精华#;#品牌甲 精华#;#品牌乙 面霜\n"
        "600000000002#####兰蔻粉水#####u1#####u2#####品牌乙 面霜\n"
    )
    rows, stats = _parse(text, "dev")
    assert [r.id for r in rows] == ["600000000001", "600000000002"]
    assert rows[0].title == "雅诗兰黛 小棕瓶精华 50ml"
    assert rows[0].labels == ("品牌甲 精华", "品牌甲 精华", "品牌乙 面霜")
    assert rows[0].urls == ("u1", "u2")
    assert stats.rows_read == 2 and sum(stats.skipped.values()) == 0 and not stats.fixed


def test_train_rows_have_no_labels():
    rows, stats = _parse("1#####标题#####u1#####u2\n", "train")
    assert rows == [files.Row("1", "标题", (), 1, ("u1", "u2"))]
    assert stats.rows_read == 1


def test_every_dirty_text_case_is_counted_exactly():
    text = (
        "100#####好标题#####u1#####u2#####品牌 产品\r\n"  # CRLF: kept
        "\n"  # blank line
        "   \r\n"  # whitespace-only line: blank
        "101#####只有三个字段#####u1\n"  # short row: skipped
        " 102 ##### 带空格的标题 #####u1#####u2##### 品牌 产品 #;# 品牌 二号 \n"  # stray spaces: kept
        "100#####重复的id#####u1#####u2#####品牌 产品\n"  # duplicate id: skipped
        "103##########u1#####u2#####品牌 产品\n"  # empty title: kept
        "104#####没有标签#####u1#####u2#####  #;# \n"  # no labels: skipped
        "#####没有id#####u1#####u2#####品牌 产品\n"  # empty id: skipped
        "a/b#####路径id#####u1#####u2#####品牌 产品\n"  # id that is a path: skipped
        "105#####标题里有#####分隔符#####u1#####u2#####品牌 产品\n"  # separator inside the title: kept
    )
    rows, stats = _parse(text, "gallery")
    assert [r.id for r in rows] == ["100", "102", "103", "105"]
    assert rows[1].title == "带空格的标题" and rows[1].labels == ("品牌 产品", "品牌 二号")
    assert rows[2].title == ""
    assert rows[3].title == "标题里有#####分隔符"
    assert stats.blank_lines == 2
    assert stats.rows_read == 9
    assert dict(stats.skipped) == {"short_row": 1, "duplicate_id": 1, "no_labels": 1, "bad_id": 2}
    assert dict(stats.fixed) == {"crlf": 1, "stray_whitespace": 1, "empty_title": 1}
    assert stats.rows_read == len(rows) + sum(stats.skipped.values())


def test_read_split_file_sees_crlf(tmp_path):
    path = tmp_path / files.split_filename("test")
    path.write_bytes("7#####t#####u#####u#####品牌 产品\r\n8#####t#####u#####u#####品牌 乙\r\n".encode())
    rows, stats = files.read_split_file(path, "test")
    assert [r.labels for r in rows] == [("品牌 产品",), ("品牌 乙",)]  # no trailing "\r" in a label
    assert stats.fixed["crlf"] == 2


def test_find_split_files_reports_only_existing(tmp_path):
    (tmp_path / files.split_filename("gallery")).write_text("")
    (tmp_path / files.split_filename("test")).write_text("")
    assert sorted(files.find_split_files(tmp_path)) == ["gallery", "test"]


def test_index_images_finds_ids_in_any_layout(tmp_path):
    for rel in ("images/1.jpg", "data/train/ab/2.jpg", "3.JPG", "data/other/1.jpg", "notes.txt"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    index, duplicates = files.index_images(tmp_path)
    assert sorted(index) == ["1", "2", "3"]
    assert index["1"].endswith("data/other/1.jpg")  # sorted walk: first path wins, deterministic
    assert duplicates == 1


def test_clean_rgb_jpeg_passes_through_unchanged():
    data = _jpeg((40, 30))
    img = files.clean_image(data, max_side=64)
    assert img.jpeg == data and img.fixes == () and (img.width, img.height) == (40, 30)


@pytest.mark.parametrize(
    "data, fix",
    [
        (_jpeg(mode="RGBA", color=(200, 30, 30, 128), fmt="PNG"), ("non_jpeg", "mode_RGBA")),
        (_jpeg(mode="RGB", fmt="GIF"), ("non_jpeg", "mode_P")),
        (_jpeg(mode="L", color=128), ("mode_L",)),
        (_jpeg(mode="CMYK", color=(0, 200, 200, 0)), ("mode_CMYK",)),
    ],
    ids=["png_rgba", "gif", "grayscale", "cmyk"],
)
def test_other_formats_and_modes_become_rgb_jpeg(data, fix):
    img = files.clean_image(data, max_side=64)
    assert img.fixes == fix
    decoded = Image.open(io.BytesIO(img.jpeg))
    assert decoded.format == "JPEG" and decoded.mode == "RGB" and decoded.size == (40, 30)


def test_transparent_png_lands_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    out = io.BytesIO()
    rgba.save(out, format="PNG")
    pixels = np.asarray(Image.open(io.BytesIO(files.clean_image(out.getvalue(), 64).jpeg)))
    assert pixels.min() > 240


def test_exif_rotation_is_applied():
    data = _jpeg((40, 30), exif_orientation=6)  # 6 = rotate 90 degrees clockwise to display
    img = files.clean_image(data, max_side=64)
    assert img.fixes == ("exif_rotated",)
    assert (img.width, img.height) == (30, 40)
    assert Image.open(io.BytesIO(img.jpeg)).size == (30, 40)


def test_large_images_shrink_small_ones_never_grow():
    big = files.clean_image(_jpeg((400, 100)), max_side=64)
    assert big.fixes == ("resized",) and Image.open(io.BytesIO(big.jpeg)).size == (64, 16)
    assert (big.width, big.height) == (400, 100)  # the original size is kept for the record
    huge = files.clean_image(_jpeg((1000, 500), exif_orientation=8), max_side=64)  # draft decode path
    assert huge.fixes == ("exif_rotated", "resized") and (huge.width, huge.height) == (500, 1000)
    assert Image.open(io.BytesIO(huge.jpeg)).size == (32, 64)
    small = files.clean_image(_jpeg((20, 10)), max_side=64)
    assert Image.open(io.BytesIO(small.jpeg)).size == (20, 10)


@pytest.mark.parametrize("data", [b"", b"not an image at all", _jpeg((64, 64))[:300]],
                         ids=["empty", "garbage", "truncated"])
def test_undecodable_images_raise(data):
    with pytest.raises(files.BadImageError):
        files.clean_image(data, max_side=64)


def test_load_example_reports_skip_reasons(tmp_path):
    row = files.Row("9", "标题", ("品牌 产品",), 1)
    assert files.load_example(row, None, 64) == (None, ("missing_image",))
    bad = tmp_path / "9.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    assert files.load_example(row, str(bad), 64) == (None, ("bad_image",))
    good = tmp_path / "10.jpg"
    good.write_bytes(_jpeg())
    example, fixes = files.load_example(row, str(good), 64)
    assert fixes == () and example.key == "9"
    assert example.features["labels"] == ["品牌 产品"] and example.features["original_width"] == 40
