"""Detector region features end to end: TSV parsing, the `*_regions` builds, the `regions` input
pipeline (locations and MRM masks against hand computations) and a tiny train + evaluate run."""

import base64
import os
import types

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfds_product1m import tfds_product1m_dataset_builder  # noqa: F401  (registers the builder)
from capture_jax import input_pipeline as ip
from capture_jax import visual_inputs as vi
from capture_jax import cli, train, vocab
from capture_jax.evaluators import report
from configs import capture as capture_configs
from tfds_product1m import product1m_files as files
from tfds_product1m import region_features as rf
from tfds_product1m import synthetic, synthetic_spec
from tfds_product1m.tfds_product1m_dataset_builder import Product1MConfig

TINY = "tfds_product1m/synthetic_regions_tiny"
DIM = synthetic_spec.TINY_REGIONS.feature_dim  # 24


def _b64(array) -> str:
    return base64.b64encode(np.asarray(array, "<f4").tobytes()).decode()


BOXES = np.array([[10, 20, 110, 70], [0, 0, 200, 100], [50, 25, 60, 30]], np.float32)
FEATS = np.arange(3 * 4, dtype=np.float32).reshape(3, 4) / 8


# ------------------------------------------------------------------------------ TSV parsing
def test_line_round_trips_and_lxmert_layout_is_read():
    line = rf.encode_line("600000000001", 200, 100, BOXES, FEATS)
    assert line.count("\t") == 5 and line.endswith("\n")
    r = rf.parse_line(line.encode(), feature_dim=4)
    assert (r.image_id, r.image_w, r.image_h) == ("600000000001", 200, 100)
    np.testing.assert_array_equal(r.boxes, BOXES)
    np.testing.assert_array_equal(r.features, FEATS)
    assert r.features.dtype == np.float32 and rf.parse_line(line).features.shape == (3, 4)
    # LXMERT: img_id img_h img_w objects_id objects_conf attrs_id attrs_conf num_boxes boxes feats
    lxmert = "\t".join(["7", "100", "200", "AA==", "AA==", "AA==", "AA==", "3", _b64(BOXES),
                        _b64(FEATS)])
    r = rf.parse_line(lxmert, feature_dim=4)
    assert (r.image_id, r.image_w, r.image_h) == ("7", 200, 100)
    np.testing.assert_array_equal(r.features, FEATS)


def test_a_line_with_zero_boxes_is_valid_and_empty():
    r = rf.parse_line("9\t640\t480\t0\t\t\n", feature_dim=2048)
    assert r.boxes.shape == (0, 4) and r.features.shape == (0, 2048)
    assert r.boxes.dtype == r.features.dtype == np.float32


@pytest.mark.parametrize("line, message", [
    ("1\t200\t100\t3\t" + _b64(BOXES) + "\t" + _b64(FEATS)[:-5] + "!@#$%", "not valid base64"),
    ("1\t200\t100\t3\t" + _b64(BOXES) + "\t" + _b64(FEATS[:2]), "not 3 rows|expected 3 x 4"),
    ("1\t200\t100\t2\t" + _b64(BOXES) + "\t" + _b64(FEATS[:2]), "expected 2 x 4"),
    ("1\t200\t100\t3\t" + _b64(BOXES) + "\t" + _b64(np.zeros((3, 5))), "expected 3 x 4"),
    ("1\t200\t100\t1\t" + _b64(BOXES[:1]) + "\t" + _b64([[np.nan] * 4]), "non-finite"),
    ("1\tabc\t100\t3\t" + _b64(BOXES) + "\t" + _b64(FEATS), "not an integer"),
    ("1\t0\t100\t3\t" + _b64(BOXES) + "\t" + _b64(FEATS), "bad sizes"),
    ("1\t200\t100\t3\t" + _b64(BOXES), "5 tab-separated fields"),
], ids=["bad_base64", "short_features", "num_boxes_mismatch", "wrong_width", "nan",
        "bad_int", "zero_width", "missing_field"])
def test_corrupt_lines_raise(line, message):
    with pytest.raises(rf.BadRegionsError, match=message):
        rf.parse_line(line, feature_dim=4)


def test_index_counts_dirty_lines_and_reads_back_by_offset(tmp_path):
    (tmp_path / "a").mkdir()
    good = {i: rf.encode_line(i, 200, 100, BOXES[:k], FEATS[:k])
            for k, i in enumerate(["11", "12", "13"], 1)}
    (tmp_path / "a" / "part0.tsv").write_text(
        "\t".join(rf.TSV_FIELDS) + "\n" + good["11"] + "\n" + "garbage without tabs\n"
        + good["12"], encoding="ascii")
    (tmp_path / "part1.TSV").write_text(
        rf.encode_line("11", 1, 1, BOXES[:0], FEATS[:0]) + good["13"]
        + "14\t200\t100\t3\tnot-base64\tnope\n", encoding="ascii")
    (tmp_path / "notes.txt").write_text("11\tnot a feature file\n")
    paths = rf.find_tsv_files(tmp_path)
    assert [os.path.relpath(p, tmp_path) for p in paths] == ["part1.TSV", "a/part0.tsv"]
    index, stats = rf.index_tsv_files(paths)
    assert stats.to_json() == {"files": 2, "indexed": 4, "duplicate_ids": 1, "bad_lines": 1,
                               "blank_lines": 1, "header_lines": 1}
    assert sorted(index) == ["11", "12", "13", "14"]
    assert index["11"][0].endswith("part1.TSV")  # Walk order: the first file's line wins.
    assert rf.load_regions(index["13"], 4)[0].features.shape == (3, 4)
    assert rf.load_regions(index["11"], 4)[0].boxes.shape == (0, 4)
    assert rf.load_regions(index["14"], 4) == (None, "bad_regions")
    assert rf.load_regions(None, 4) == (None, "missing_regions")
    assert rf.probe_feature_dim(index, ["99", "11", "14", "12"]) == (4, index["12"][0])


def test_load_row_stores_float16_and_counts_zero_box_rows(tmp_path):
    tsv = tmp_path / "f.tsv"
    tsv.write_text(rf.encode_line("1", 200, 100, BOXES, FEATS)
                   + rf.encode_line("2", 64, 48, BOXES[:0], FEATS[:0])
                   + rf.encode_line("3", 64, 48, BOXES[:1], FEATS[:1] * 1e6), encoding="ascii")
    index, _ = rf.index_tsv_files([str(tsv)])
    row = files.Row("1", "标题", ("品牌 产品",), 1)
    load = dict(max_side=64, with_image=False, feature_dim=4)
    example, fixes = rf.load_row(row, None, index["1"], **load)
    f = example.features
    assert fixes == () and (f["original_width"], f["original_height"]) == (200, 100)
    assert f["regions"]["features"].dtype == np.float16 and f["regions"]["image_width"] == 200
    np.testing.assert_array_equal(f["regions"]["features"], FEATS.astype(np.float16))
    assert rf.load_row(row, None, index["2"], **load)[1] == ("no_regions",)
    assert rf.load_row(row, None, index["3"], **load) == (None, ("bad_regions",))  # > float16
    assert rf.load_row(row, None, None, **load) == (None, ("missing_regions",))
    with_image = dict(load, with_image=True)
    assert rf.load_row(row, None, index["1"], **with_image) == (None, ("missing_image",))


# ------------------------------------------------------------------------------ the generator
def test_generator_cli_writes_tsvs_with_product_and_distractor_boxes(tmp_path):
    summary = cli.call(synthetic, ["--out", str(tmp_path), "--products", "4", "--train", "8",
                                   "--gallery_per_product", "2", "--dev", "8", "--test", "8",
                                   "--image_size", "48", "--region_features", "--feature_dim", "8"])
    for split, info in summary.items():
        assert info["region_dirty"] == {"zero_boxes": 1, "bad_features": 1, "no_features": 1}
        # A line per image written: clean rows plus the corrupt_image row.
        assert info["region_lines"] == info["examples"] + 1
        index, stats = rf.index_tsv_files([str(tmp_path / info["region_file"])])
        assert stats.indexed == info["region_lines"] and stats.duplicate_ids == 0
        rows = files.read_split_file(tmp_path / info["file"], split)[0]
        parsed = {row.id: rf.load_regions(index.get(row.id), 8) for row in rows}
        reasons = [reason for _, reason in parsed.values()]
        assert reasons.count("missing_regions") == reasons.count("bad_regions") == 1
        kept = [(row, r) for row in rows for r, _ in [parsed[row.id]] if r is not None]
        assert sum(len(r.boxes) == 0 for _, r in kept) == 1
        for row, r in kept:
            if len(r.boxes):  # Every product drawn has a box, plus 2-4 distractors.
                products = len(row.labels) if split != "train" else None  # Train: unlabelled.
                assert 3 <= len(r.boxes) and (products is None or
                                              products + 2 <= len(r.boxes) <= products + 4)
                assert r.features.shape == (len(r.boxes), 8) and (r.features >= 0).all()
                assert (r.image_w, r.image_h) == (48, 48)


# ------------------------------------------------------------------------------ the build
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder(TINY, data_dir=path).download_and_prepare()
    return path


@pytest.fixture(scope="module")
def builder(data_dir):
    return tfds.builder(TINY, data_dir=data_dir)


def test_built_split_shapes_dtypes_and_audit(builder):
    assert "image" not in builder.info.features
    spec = synthetic_spec.TINY_REGIONS
    stats = builder.info.metadata["build_stats"]
    for split in files.SPLITS:
        assert builder.info.splits[split].num_examples == spec.split_rows(split)
        s = stats[split]
        assert s["written"] == spec.split_rows(split)
        assert s["rows_read"] == s["written"] + sum(s["skipped"].values())
        assert (s["skipped"]["missing_regions"], s["skipped"]["bad_regions"]) == (1, 1), split
        assert s["skipped"]["missing_image"] == s["skipped"]["bad_image"] == 0
        assert s["fixed"]["no_regions"] == 1
    assert builder.info.metadata["region_index"]["files"] == 4
    counts = []
    for ex in tfds.as_numpy(builder.as_dataset("dev")):
        regions = ex["regions"]
        n = regions["boxes"].shape[0]
        assert regions["features"].dtype == np.float16 and regions["features"].shape == (n, DIM)
        assert regions["boxes"].dtype == np.float32 and regions["boxes"].shape == (n, 4)
        assert regions["image_width"] == regions["image_height"] == spec.image_size
        assert ex["original_width"] == spec.image_size and len(ex["labels"]) >= 1
        if n:  # Boxes inside the image; products plus 2-4 distractors.
            assert (regions["boxes"][:, :2] < regions["boxes"][:, 2:]).all()
            assert regions["boxes"].min() >= 0 and regions["boxes"].max() <= spec.image_size
            assert n >= len(ex["labels"]) + 2 and (regions["features"] >= 0).all()
        counts.append(n)
    assert counts.count(0) == 1 and max(counts) > 5  # The zero-box row; more than R = 5 regions.


def test_build_with_images_and_regions_and_wrong_width_error(tmp_path):
    spec = synthetic_spec.TINY_REGIONS
    both = Product1MConfig(name="regions_and_images", synthetic=spec, region_features=True,
                           feature_dim=DIM, max_image_side=spec.image_size)
    builder = tfds.builder("tfds_product1m", config=both, data_dir=str(tmp_path / "a"))
    builder.download_and_prepare()
    assert {"image", "regions"} <= set(builder.info.features)
    s = builder.info.metadata["build_stats"]["gallery"]
    assert s["written"] == spec.split_rows("gallery") and s["fixed"]["mode_CMYK"] == 1
    ex = next(iter(tfds.as_numpy(builder.as_dataset("gallery").take(1))))
    assert ex["image"].shape[2] == 3 and ex["regions"]["features"].shape[1] == DIM
    wrong = Product1MConfig(name="wrong_width", synthetic=spec, region_features=True,
                            feature_dim=48, with_image=False)
    with pytest.raises(ValueError, match="are 24-d but config wrong_width expects 48-d"):
        tfds.builder("tfds_product1m", config=wrong,
                     data_dir=str(tmp_path / "b")).download_and_prepare()


def test_full_regions_without_tsv_files_says_where_to_put_them(tmp_path):
    raw = tmp_path / "raw"
    synthetic.write_product1m(raw, synthetic.SyntheticSpec(
        num_products=4, num_train=8, gallery_per_product=2, num_dev=2, num_test=2,
        image_size=32, dirty=False))
    builder = tfds.builder("tfds_product1m/full_regions", data_dir=str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match=r"No region feature file \(\*\.tsv\) found"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))


# ------------------------------------------------------------------------------ the pipeline
def test_region_inputs_match_hand_computed_locations():
    regions = {"features": tf.constant(FEATS, tf.float16), "boxes": tf.constant(BOXES),
               "image_width": tf.constant(200), "image_height": tf.constant(100)}
    feats, locations, mask = (x.numpy() for x in vi.region_inputs(regions, 5))
    expected = np.array([
        [10 / 200, 20 / 100, 110 / 200, 70 / 100, 100 * 50 / 20000],  # 0.05 .2 .55 .7 .25
        [0, 0, 1, 1, 1],
        [50 / 200, 25 / 100, 60 / 200, 30 / 100, 10 * 5 / 20000],  # 0.25 .25 .3 .3 .0025
        [0] * 5, [0] * 5], np.float32)
    np.testing.assert_allclose(locations, expected, rtol=1e-6)
    assert mask.tolist() == [1, 1, 1, 0, 0] and feats.dtype == np.float32
    np.testing.assert_array_equal(feats, np.concatenate([FEATS, np.zeros((2, 4))]))
    feats, locations, mask = (x.numpy() for x in vi.region_inputs(regions, 2))  # Truncated.
    assert mask.tolist() == [1, 1] and feats.shape == (2, 4)
    np.testing.assert_allclose(locations, expected[:2], rtol=1e-6)


def test_region_masks_skip_padding_and_zero_90_percent():
    real = tf.constant([1] * 10000 + [0] * 10000, tf.int32)
    selected, zero = (x.numpy() for x in vi.mask_regions(real, ip.example_seed(0, 5), 0.15))
    assert not selected[10000:].any() and not zero[10000:].any()
    assert abs(selected[:10000].mean() - 0.15) < 0.015
    assert np.all(zero <= selected) and abs(zero.sum() / selected.sum() - 0.9) < 0.03
    # The same randomness as the pixels front end on the real slots.
    patches, _ = vi.mask_patches(20000, ip.example_seed(0, 5), 0.15)
    np.testing.assert_array_equal(selected[:10000], patches.numpy()[:10000])


def regions_config(data_dir, **changes):
    config = capture_configs.get_config("tiny")
    config.model.visual.kind = "regions"
    config.dataset.name, config.dataset.data_dir = TINY, data_dir
    config.update_from_flattened_dict(changes)
    return config


def test_train_and_eval_batches(data_dir, builder, tmp_path):
    config = regions_config(data_dir)
    r, b = config.model.visual.num_regions, config.global_batch_size
    tokenizer = vocab.load_tokenizer(config, str(tmp_path), builder)
    batch = next(ip.create_train_iterator(config, builder, tokenizer))
    assert {k: (v.shape, v.dtype) for k, v in batch.items() if k.startswith(("visual", "mrm"))} == {
        "visual_feats": ((b, r, DIM), np.float32), "visual_boxes": ((b, r, 5), np.float32),
        "visual_mask": ((b, r), np.int32), "mrm_mask": ((b, r), np.float32),
        "mrm_zero": ((b, r), np.float32)}
    assert "image" not in batch
    assert np.all(batch["mrm_mask"] <= batch["visual_mask"]) and np.all(
        batch["mrm_zero"] <= batch["mrm_mask"])
    # Eval: unmasked, and equal to the stored rows computed by hand.
    stored = {ex["id"].decode(): ex["regions"] for ex in tfds.as_numpy(builder.as_dataset("dev"))}
    rows = 0
    for batch, item_ids, *_ in ip.EvalDataset(config, builder, tokenizer, "dev", 16):
        assert not batch["mrm_mask"].any() and not batch["mrm_zero"].any()
        for i, item_id in enumerate(item_ids):
            if not item_id:
                assert not batch["visual_mask"][i].any()
                continue
            s, rows = stored[item_id], rows + 1
            n = min(len(s["boxes"]), r)
            assert batch["visual_mask"][i].tolist() == [1] * n + [0] * (r - n)
            np.testing.assert_array_equal(batch["visual_feats"][i, :n],
                                          s["features"][:n].astype(np.float32))
            x1, y1, x2, y2 = s["boxes"][:n].T
            w, h = float(s["image_width"]), float(s["image_height"])
            np.testing.assert_allclose(
                batch["visual_boxes"][i, :n],
                np.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) * (y2 - y1) / (w * h)], -1),
                rtol=1e-6)
            assert not batch["visual_feats"][i, n:].any() and not batch["visual_boxes"][i, n:].any()
    assert rows == len(stored) == 16


def test_front_end_and_dataset_mismatches_are_one_sentence(data_dir, builder, tmp_path):
    with pytest.raises(ValueError, match="has no images .*--config.model.visual.kind=regions"):
        ip.check_dataset(regions_config(data_dir, **{"model.visual.kind": "pixels"}), builder)
    with pytest.raises(ValueError, match="stores 24-d region features .*"
                                         "--config.model.visual.feature_dim=24"):
        ip.check_dataset(regions_config(data_dir, **{"model.visual.feature_dim": 2048}), builder)
    images_only = types.SimpleNamespace(info=types.SimpleNamespace(features={"image": None}))
    with pytest.raises(ValueError, match="has no detector region features: use tfds_product1m/"
                                         "full_regions .* or set --config.model.visual.kind="):
        vi.create(regions_config(data_dir), images_only)
    with pytest.raises(FileNotFoundError, match="full_regions is not built"):
        ip.get_builder(regions_config(str(tmp_path), **{"dataset.name":
                                                         "tfds_product1m/full_regions"}))


# ------------------------------------------------------------------------------ end to end
def test_tiny_regions_model_trains(data_dir, tmp_path):
    """The trainer on region batches (retrieval on them is `demo_regions`' job, see README)."""
    config = regions_config(data_dir, num_train_steps=3, log_every=1, checkpoint_every=0,
                            **{"evals.retrieval.every": -1, "mesh.data": 1})
    # One device: shardings are tested apart.
    result = train.train_and_evaluate(config, str(tmp_path), jax.devices()[:1])
    assert result["step"] == 3 and result["finished"]
    losses = [h["loss_mrm"] for h in result["history"]]
    assert all(np.isfinite(losses)) and max(losses) > 0


def test_report_without_images_shows_placeholders(builder, tmp_path):
    ids = [ex["id"].decode() for ex in tfds.as_numpy(builder.as_dataset("dev").take(3))]
    items = report.read_items(builder, "dev", set(ids))
    assert sorted(items) == sorted(ids) and all(uri == "" for _, uri in items.values())
    scores = {f"top{n}": {"mAP": 1.0, "Prec": 1.0, "mAR": 1.0} for n in (10, 50, 100)}
    path = str(tmp_path / "report.html")
    report.write_report(path, "regions", scores, [(ids[0], ["a b"], ids[1:], 1.0, 2)],
                        {i: "a b" for i in ids}, items)
    page = open(path, encoding="utf-8").read()
    assert page.count('alt="no image"') == 3 and "data:image/jpeg" not in page
    assert items[ids[1]][0] and items[ids[1]][0] in page  # Titles still shown.
