"""Building `tfds_product1m` end to end: synthetic_tiny read back, audit counts, errors, stock CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfds_product1m  # noqa: F401  (registers the builder)
from tfds_product1m import product1m_files as files
from tfds_product1m import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the generator injects -> what the builder must report.
_SKIPPED = {"short_row": "short_row", "duplicate_id": "duplicate_id",
            "missing_image": "missing_image", "corrupt_image": "bad_image"}
_FIXED = {"crlf": ["crlf"], "empty_title": ["empty_title"], "exif_rotated": ["exif_rotated"],
          "cmyk": ["mode_CMYK"], "grayscale": ["mode_L"], "png_as_jpg": ["non_jpeg", "mode_RGBA"],
          "stray_spaces": ["stray_whitespace"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = tfds.builder("tfds_product1m/synthetic_tiny", data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


@pytest.fixture(scope="module")
def tiny_summary(tmp_path_factory):
    """The generator's own account of what it wrote for synthetic_tiny (it is deterministic)."""
    return synthetic.write_product1m(tmp_path_factory.mktemp("raw"), synthetic.TINY)


def test_audit_matches_the_injected_dirt_exactly(tiny, tiny_summary):
    stats = tiny.info.metadata["build_stats"]
    assert sorted(stats) == sorted(files.SPLITS)
    for split, injected in tiny_summary.items():
        got, dirty = stats[split], injected["dirty"]
        assert got["rows_read"] == injected["rows"], split
        assert got["written"] == injected["examples"] == tiny.info.splits[split].num_examples
        assert got["rows_read"] == got["written"] + sum(got["skipped"].values())
        expected_skips = {reason: 0 for reason in files.SKIP_REASONS}
        for kind, reason in _SKIPPED.items():
            expected_skips[reason] += dirty[kind]
        assert got["skipped"] == expected_skips, split
        expected_fixes = {}
        for kind, fixes in _FIXED.items():
            for fix in fixes:
                expected_fixes[fix] = expected_fixes.get(fix, 0) + dirty[kind]
        assert got["fixed"] == {k: v for k, v in expected_fixes.items() if v}, split
        assert got["blank_lines"] == dirty["blank_line"]


def test_official_ground_truth_kept_for_every_labelled_row(tiny, tiny_summary):
    """Every gallery/dev/test line with five fields, built or not, with its labels as the
    official script reads them; it survives a reload from metadata.json."""
    reloaded = tfds.builder("tfds_product1m/synthetic_tiny", data_dir=os.path.dirname(
        os.path.dirname(os.path.dirname(tiny.data_dir))))
    gt = reloaded.info.metadata["ground_truth"]
    assert sorted(gt) == ["dev", "gallery", "test"]
    for split in gt:
        built = {ex["id"].decode(): [x.decode() for x in ex["labels"]] for ex in tfds.as_numpy(
            tiny.as_dataset(split, decoders={"image": tfds.decode.SkipDecoding()}))}
        labels, dirty = gt[split]["labels"], tiny_summary[split]["dirty"]
        # Rows without an image (missing, corrupt) are not built but keep their labels; the
        # short row cannot be read and is reported; the duplicate id keeps the later line.
        assert len(labels) == len(built) + dirty["missing_image"] + dirty["corrupt_image"]
        assert len(gt[split]["unusable_lines"]) == dirty["short_row"] + dirty["blank_line"]
        assert gt[split]["repeated_ids"] == dirty["duplicate_id"]
        assert gt[split]["padded"] == dirty["stray_spaces"]
        same = [i for i in built if i in labels]  # The space-padded id is kept padded.
        assert len(same) == len(built) - dirty["stray_spaces"]
        differ = [i for i in same if labels[i] != built[i]]  # The builder keeps the first line.
        assert len(differ) == dirty["duplicate_id"]


def test_audit_is_written_to_metadata_json_and_reloads(tiny):
    path = os.path.join(tiny.data_dir, "metadata.json")
    with open(path) as f:
        on_disk = json.load(f)
    assert on_disk["build_stats"] == json.loads(json.dumps(tiny.info.metadata["build_stats"]))
    assert on_disk["splits_built"] == list(files.SPLITS) and on_disk["splits_missing"] == []
    reloaded = tfds.builder("tfds_product1m/synthetic_tiny", data_dir=os.path.dirname(
        os.path.dirname(os.path.dirname(tiny.data_dir))))
    assert reloaded.info.metadata["build_stats"]["dev"]["written"] == tiny.info.splits["dev"].num_examples


def test_read_back_titles_labels_and_images(tiny, tiny_summary):
    max_side = tiny.builder_config.max_image_side
    gallery_labels = set()
    for split in files.SPLITS:
        examples = list(tfds.as_numpy(tiny.as_dataset(split=split)))
        ids = [e["id"].decode() for e in examples]
        assert len(ids) == len(set(ids)) == tiny_summary[split]["examples"]
        for e in examples:
            image = e["image"]
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            assert max(image.shape[:2]) <= max_side and image.std() > 0
            labels = [l.decode() for l in e["labels"]]
            if split == "train":
                assert labels == []
            elif split == "gallery":
                assert len(labels) == 1
                gallery_labels.update(labels)
            else:
                assert 1 <= len(labels) <= 12 and set(labels) <= gallery_labels
        titles = [e["title"].decode() for e in examples]
        assert sum(any("\u4e00" <= c <= "\u9fff" for c in t) for t in titles) >= len(titles) - 1
    # A query listing the same product twice keeps both entries.
    queries = list(tfds.as_numpy(tiny.as_dataset(split="test"))) + list(
        tfds.as_numpy(tiny.as_dataset(split="dev")))
    assert any(len(set(e["labels"])) < len(e["labels"]) for e in queries)
    assert all(len(l.split(" ")) == 2 for l in gallery_labels)  # "品牌 产品"


def test_full_without_manual_dir_explains_the_download(tmp_path):
    builder = tfds.builder("tfds_product1m/full", data_dir=str(tmp_path / "data"))
    with pytest.raises(AssertionError, match="Manual directory .* does not exist or is empty"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "nothing")))
    assert "product1m_train_ossurl_v2.txt" in builder.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_full_with_no_split_file_says_which_names_it_wants(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "readme.txt").write_text("not product1m")
    builder = tfds.builder("tfds_product1m/full", data_dir=str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="product1m_gallery_ossurl_v2.txt"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "raw")))


def test_full_builds_whatever_splits_exist(tmp_path):
    raw = tmp_path / "raw"
    spec = synthetic.SyntheticSpec(num_products=4, num_train=8, gallery_per_product=2, num_dev=2,
                                   num_test=3, image_size=32, dirty=False)
    synthetic.write_product1m(raw, spec)
    os.remove(raw / files.split_filename("train"))
    os.remove(raw / files.split_filename("dev"))
    builder = tfds.builder("tfds_product1m/full", data_dir=str(tmp_path / "data"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
    assert sorted(builder.info.splits) == ["gallery", "test"]
    assert builder.info.splits["gallery"].num_examples == 8
    assert builder.info.metadata["splits_missing"] == ["train", "dev"]


def test_stock_cli_builds_full_from_generated_directory(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    raw, data = tmp_path / "raw", tmp_path / "data"
    subprocess.run([sys.executable, "-m", "tfds_product1m.synthetic", "--out", str(raw),
                    "--products", "4", "--train", "9", "--gallery_per_product", "2", "--dev", "8",
                    "--test", "8", "--image_size", "32"], check=True, cwd=REPO, env=env)
    tfds_cli = os.path.join(os.path.dirname(sys.executable), "tfds")  # the stock console script
    subprocess.run([tfds_cli, "build", "tfds_product1m", "--config=full", f"--manual_dir={raw}",
                    f"--data_dir={data}"], check=True, cwd=REPO, env=env, capture_output=True)
    builder = tfds.builder("tfds_product1m/full", data_dir=str(data))
    assert {s: builder.info.splits[s].num_examples for s in files.SPLITS} == {
        "train": 9, "gallery": 8, "dev": 8, "test": 8}
