"""Tests of capture_jax.evaluators: exact sharded top-k, end-to-end evaluation on synthetic_tiny
scored against the official rules, a known-answer ranking, the baselines, and the HTML report and
index rendered by headless Chromium."""

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

import official_rules
from capture_jax import cli, evaluators, experiment, input_pipeline, metrics, sharding, train
from capture_jax.evaluators import baselines, embedding, ground_truth, ranker, report, retrieval
from capture_jax.models import capture
from configs import capture as capture_configs

MESHES = {"8dev_2x2x2": dict(data=2, fsdp=2, model=2), "1dev": dict(data=1)}


def make_mesh(name):
    devices = jax.devices() if name.startswith("8") else jax.devices()[:1]
    return sharding.make_mesh(MESHES[name], devices)


def reference_top_k(queries, gallery, k):
    """Stable argsort of -scores in float64: ties go to the lower gallery index."""
    scores = np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


# ------------------------------------------------------------------------------------ top_k
# (k, gallery_tile): with G = 2003, "pruned" searches blocks of 32 rows (tiles of 256 rows hold
# 8 > k blocks) and "direct" whole tiles; the 1-device mesh sees 8 tiles, the 8-device one 1.
PATHS = pytest.mark.parametrize("k,tile", [(5, 256), (100, 256)], ids=["pruned", "direct"])
# Every method on both meshes (faiss runs on the host: once). `screen` keeps k + 3 candidates per
# tile, so it prunes, certifies and (on ties) ranks again.
METHODS = pytest.mark.parametrize("method,mesh_name", [
    ("faiss", "1dev"), *((m, name) for m in ("exact", "screen") for name in MESHES)])


def rank(queries, gallery, k, mesh_name, method, screen_candidates=None, **kw):
    return ranker.top_k(queries, gallery, k, make_mesh(mesh_name), method=method,
                        screen_candidates=screen_candidates or k + 3, **kw)


@METHODS
@PATHS
def test_top_k_equals_numpy_on_random_floats(method, mesh_name, k, tile):
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((2003, 24)).astype(np.float32)  # G not a multiple of 8.
    queries = rng.standard_normal((150, 24)).astype(np.float32)  # Q not a multiple of 56.
    scores, indices = rank(queries, gallery, k, mesh_name, method, query_chunk=64,
                           gallery_tile=tile)
    ref_scores, ref_indices = reference_top_k(queries, gallery, k)
    assert scores.shape == indices.shape == (150, k)
    # Exact ranking, except that items whose float64 scores differ by float32 rounding (about
    # 1 in 10,000 here) may swap places.
    exact = np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T
    swapped = indices != ref_indices
    assert swapped.mean() < 1e-3
    np.testing.assert_allclose(np.take_along_axis(exact, indices, 1), ref_scores, atol=1e-5)
    assert all(len(set(row)) == k for row in indices)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


@METHODS
@PATHS
def test_top_k_breaks_ties_by_lower_gallery_index(method, mesh_name, k, tile):
    """Small integer features: exact float32 scores with many ties. They are exact in bfloat16
    too; the screen keeps only k per tile, so for k = 5 (the k-th best of 2003 items ties the
    6th best of its tile) queries are not certified and are ranked again."""
    rng = np.random.default_rng(1)
    gallery = rng.integers(-2, 3, (2003, 6)).astype(np.float32)
    queries = rng.integers(-2, 3, (37, 6)).astype(np.float32)
    stats = {}
    scores, indices = rank(queries, gallery, k, mesh_name, method, screen_candidates=k,
                           query_chunk=16, gallery_tile=tile, stats=stats)
    ref_scores, ref_indices = reference_top_k(queries, gallery, k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(scores, ref_scores)
    assert stats["method"] == method
    if method != "exact" and k == 5:  # faiss: ties running past its margin of 8.
        assert stats["ranked_again"] > 0


@pytest.mark.parametrize("method", ["faiss", "exact", "screen"])
def test_top_k_with_fewer_gallery_items_than_k(method):
    rng = np.random.default_rng(2)
    gallery, queries = rng.standard_normal((13, 8)), rng.standard_normal((3, 8))
    scores, indices = ranker.top_k(queries, gallery, 100, make_mesh("8dev_2x2x2"), method=method)
    assert indices.shape == (3, 13) and np.isfinite(scores).all()
    np.testing.assert_array_equal(indices, reference_top_k(queries, gallery, 13)[1])


@pytest.mark.parametrize("k", [1, 5, 100, 3000])
def test_few_top_k_equals_numpy_with_ties_to_the_lower_index(k):
    """The search server's ranker for a few queries: ties (small integer features) at and
    before the cut go to the lower index; k past the gallery's size lists it all."""
    rng = np.random.default_rng(3)
    gallery = rng.integers(-2, 3, (2003, 6)).astype(np.float32)
    queries = rng.integers(-2, 3, (ranker.FEW_QUERIES - 1, 6)).astype(np.float32)
    scores, indices = ranker.few_top_k(queries, gallery, k)
    ref_scores, ref_indices = reference_top_k(queries, gallery, min(k, 2003))
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(scores, ref_scores)
    floats = rng.standard_normal((2003, 24)).astype(np.float32)
    few = rng.standard_normal((3, 24)).astype(np.float32)
    np.testing.assert_allclose(ranker.few_top_k(few, floats, k)[0],
                               reference_top_k(few, floats, min(k, 2003))[0], atol=1e-5)


def test_screen_certifies_separated_queries_and_its_bound_holds():
    """Gallery items near each query (an embedding's neighbours) stand out: the bfloat16 screen
    certifies every query without ranking again, with the exact float32 answer; and the error
    bound covers the largest |q.g - fl(q~.g~)| over all pairs, including the worst-aligned."""
    rng = np.random.default_rng(3)
    dim = 256
    gallery = rng.standard_normal((4096, dim)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[rng.choice(4096, 40, replace=False)] + 0.05 * rng.standard_normal(
        (40, dim)).astype(np.float32)
    stats = {}
    scores, indices = ranker.top_k(queries, gallery, 10, make_mesh("1dev"), method="screen",
                                   screen_candidates=64, gallery_tile=1024, stats=stats)
    assert stats == dict(method="screen", certified=40, ranked_again=0)
    np.testing.assert_array_equal(indices, reference_top_k(queries, gallery, 10)[1])

    bf16 = lambda x: x.astype(jnp.bfloat16).astype(np.float32)
    q16, g16 = np.asarray(bf16(queries)), np.asarray(bf16(gallery))
    screened = np.asarray(jnp.dot(jnp.asarray(q16, jnp.bfloat16), jnp.asarray(g16, jnp.bfloat16).T,
                                  preferred_element_type=jnp.float32))
    error = np.abs(np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T - screened)
    g_norms = [float(np.max(n)) for n in ranker._bf16_error(gallery)]
    bound = ranker.screen_error_bound(*ranker._bf16_error(queries), *g_norms, dim)
    assert (error.max(1) <= bound).all()
    # Worst alignment: a gallery row along a query's own rounding error.
    dq = queries[0] - q16[0]
    worst = dq / np.linalg.norm(dq)
    err = abs(float(np.dot(np.float64(queries[0]), worst)) - float(np.dot(q16[0], bf16(worst))))
    assert err <= ranker.screen_error_bound(*(n[:1] for n in ranker._bf16_error(queries)),
                                            *g_norms, dim)[0]


def test_unknown_ranking_method_is_one_clear_error():
    with pytest.raises(ValueError, match="Unknown ranking method 'fast'; choose one of auto, "
                       "exact, faiss, screen"):
        ranker.top_k(np.ones((2, 4)), np.ones((5, 4)), 3, make_mesh("1dev"), method="fast")


def test_auto_ranks_with_faiss_on_cpus_and_exact_without_it(monkeypatch):
    """`auto` is faiss on a CPU mesh (faiss-cpu is a requirement), `exact` where faiss cannot be
    imported; an explicit method is kept, and the result is the same exact top-k."""
    rng = np.random.default_rng(4)
    gallery, queries = rng.standard_normal((300, 16)), rng.standard_normal((7, 16))
    mesh = make_mesh("8dev_2x2x2")
    stats = {}
    _, indices = ranker.top_k(queries, gallery, 20, mesh, stats=stats)
    assert stats["method"] == "faiss"
    np.testing.assert_array_equal(indices, reference_top_k(queries, gallery, 20)[1])
    assert ranker.resolve_method("exact", mesh) == "exact"
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError.
    assert ranker.resolve_method("auto", mesh) == "exact"


# ------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """synthetic_tiny and a random tiny pixels model FSDP-sharded on a 4x2 mesh: (experiment,
    model state)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    workdir = str(tmp_path_factory.mktemp("workdir"))
    tfds.builder("tfds_product1m/synthetic_tiny", data_dir=data_dir).download_and_prepare()
    config = capture_configs.get_config("tiny")
    config.update(variant="tiny-test", vocab_size=400, sharding_rules="fsdp")
    config.dataset.update(name="tfds_product1m/synthetic_tiny", data_dir=data_dir)
    config.mesh.update(data=4, fsdp=2, model=1)
    config.evals.retrieval.update(batch_size=8, report_queries=5, query_chunk=8, gallery_tile=64)
    exp = experiment.setup(config, workdir)
    with exp.context():
        return exp, train.create_train_state(exp.config, exp.tx, exp.shapes).model


def read_split(config, split):
    """{id: labels} straight from TFDS."""
    ds = tfds.builder(config.dataset.name, data_dir=config.dataset.data_dir).as_dataset(
        split, decoders={"image": tfds.decode.SkipDecoding()})
    return {ex["id"].decode(): [s.decode() for s in ex["labels"]] for ex in tfds.as_numpy(ds)}


KINDS = (*capture.FEATURE_KINDS, "tfidf", "color_histogram")


@pytest.fixture(scope="module")
def evaluated(setup):
    exp, state = setup
    [evaluator] = evaluators.create(exp)  # config.evals.retrieval
    return dict(evaluator.evaluate(state, step=7))


def raw_dir(config):
    """The Product1M-format text files the synthetic build was made from."""
    [path] = glob.glob(os.path.join(config.dataset.data_dir, "downloads", "synthetic_raw", "*"))
    return path


def test_embed_split_equals_unsharded_embedding_in_dataset_order(setup):
    exp, state = setup
    config = exp.config
    dev = embedding.embed_split(exp, state, "dev", 8, ("color_histogram",))
    embed = jax.jit(lambda s, b: nnx.merge(exp.shapes.model_def, s).embed(b)["joint"])
    single = jax.device_put(jax.device_get(state), jax.devices()[0])
    expected, expected_ids, expected_titles = [], [], []
    for batch, item_ids, _, titles in input_pipeline.EvalDataset(config, exp.builder,
                                                                 exp.tokenizer, "dev", 8):
        valid = batch["valid"] == 1
        expected.append(np.asarray(embed(single, batch))[valid])
        expected_ids += list(item_ids[valid])
        expected_titles += [t for t, ok in zip(titles, valid) if ok]
    assert dev.ids == expected_ids and dev.ids == list(read_split(config, "dev"))
    assert dev.labels == list(read_split(config, "dev").values())
    assert dev.titles == expected_titles and any(dev.titles)
    np.testing.assert_allclose(dev.features["joint"], np.concatenate(expected), atol=1e-5)
    assert set(dev.features) == {*capture.FEATURE_KINDS, "color_histogram"}
    assert dev.features["visual"].shape == dev.features["text"].shape == (16, config.model.out_dim)
    hist = dev.features["color_histogram"]
    assert hist.shape == (16, 512) and (hist >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(hist, axis=1), 1, atol=1e-5)


def test_ground_truth_keeps_rows_the_build_skipped(setup):
    """The metadata holds every gallery row of the text file, the unbuilt ones included, with the
    labels the official rules read (spaces kept)."""
    exp = setup[0]
    config = exp.config
    gt = ground_truth.load(exp.builder, "gallery", ("dev", "test"))
    from tfds_product1m import product1m_files
    official = product1m_files.read_official_labels(
        os.path.join(raw_dir(config), "product1m_gallery_ossurl_v2.txt"))
    assert gt.gallery == {g: ls[0] for g, ls in official.labels.items()}
    built = set(read_split(config, "gallery"))
    skipped = set(gt.gallery) - built
    assert len(skipped) >= 2  # missing_image, corrupt_image (and the space-padded id).
    assert any("spaces" in w for w in gt.warnings)
    note = ground_truth.unreachable_note("dev", gt, built)
    assert f"{len(skipped)} of the {len(gt.gallery)} gallery rows" in note


def test_in_run_scores_equal_the_scoring_command_and_the_official_script(setup, evaluated,
                                                                         tmp_path):
    config, workdir = setup[0].config, setup[0].workdir
    scores = evaluated
    gt_dir = raw_dir(config)
    num_gallery = len(read_split(config, "gallery"))
    # The official script stops on the synthetic files' blank and short lines; ours leaves them
    # out (with a warning). The port runs on copies without them.
    usable = tmp_path / "usable_gt"
    usable.mkdir()
    for name in os.listdir(gt_dir):
        if name.endswith("_ossurl_v2.txt"):
            with open(os.path.join(gt_dir, name), encoding="utf-8", newline="") as f:
                lines = [x for x in f.readlines() if len(x.strip().split("#####")) >= 5]
            (usable / name).write_bytes("".join(lines).encode())
    for split in ("dev", "test"):
        query_ids = set(read_split(config, split))
        for kind in KINDS:
            out = os.path.join(workdir, "retrieval", split, kind)
            ret = os.path.join(out, "retrieval_id_list.txt")
            lines = open(ret, encoding="utf-8").read().splitlines()
            assert len(lines) == len(query_ids) == 16
            for line in lines:
                qid, *ids = line.split(",")
                assert qid in query_ids and len(ids) == len(set(ids)) == min(100, num_gallery)
            written = open(os.path.join(out, "metric_results.json"), "rb").read()
            cli.call(metrics, ["--gt_dir", gt_dir, "--retrieval_file", ret,
                               "--output_dir", str(tmp_path / split / kind)])
            assert (tmp_path / split / kind / "metric_results.json").read_bytes() == written
            official_rules.write_json(tmp_path / "official.json",
                                      official_rules.score_files(str(usable), ret))
            assert (tmp_path / "official.json").read_bytes() == written
            values = json.loads(written)
            assert all(0 <= v <= 1 for s in values.values() for v in s.values())
            assert scores[f"retrieval/{split}/{kind}/mAP@10"] == 100 * values["top10"]["mAP"]
            page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
            assert page.count('src="data:image/jpeg;base64,') == 5 * 11  # 5 queries + top 10
            assert "AP@10" in page and "gallery positives" in page and "evenly spaced" in page


def test_index_lists_every_kind_and_baseline_with_links(setup, evaluated):
    workdir = setup[0].workdir
    page = open(os.path.join(workdir, "retrieval", "index.html"), encoding="utf-8").read()
    for split in ("dev", "test"):
        for kind in KINDS:
            assert f'href="{split}/{kind}/report.html"' in page
    assert "joint (headline)" in page and "tiny-test" in page and "step" in page
    assert "no ranking can retrieve" in page  # The unreachable positives are reported.
    assert "usual mAP (not official)" in page and "min(N, positives)" in page


def test_known_answer_ranking_scores_1(setup, monkeypatch):
    """Gallery items of label j are e_j; a query is the sum of its labels' e_j: positives first."""
    exp, state = setup
    rng = np.random.default_rng(3)
    labels = [f"brand{j} product" for j in range(30)]
    g_labels = [[labels[j]] for j in range(30) for _ in range(3)]  # 3 items per label
    q_labels = [list(rng.choice(labels, rng.integers(1, 4), replace=False)) for _ in range(20)]
    eye = np.eye(30, dtype=np.float32)
    g_feats = eye[[labels.index(ls[0]) for ls in g_labels]]
    q_feats = np.stack([eye[[labels.index(label) for label in ls]].sum(0) for ls in q_labels])
    ids = {s: [f"{s}{i:04d}" for i in range(n)] for s, n in (("gallery", 90), ("dev", 20),
                                                              ("test", 20))}

    def fake_embed_split(experiment, model_state, split, batch_size, image_baselines=()):
        feats, ls = (g_feats, g_labels) if split == "gallery" else (q_feats, q_labels)
        return embedding.Embedded({k: feats for k in capture.FEATURE_KINDS}, ids[split], ls,
                                  [""] * len(ls))

    gt = ground_truth.GroundTruth(dict(zip(ids["gallery"], (ls[0] for ls in g_labels))),
                               {s: dict(zip(ids[s], map(tuple, q_labels))) for s in ("dev", "test")},
                               [])
    monkeypatch.setattr(embedding, "embed_split", fake_embed_split)
    monkeypatch.setattr(ground_truth, "load", lambda *args: gt)
    fields = {k: v for k, v in exp.config.evals.retrieval.items() if k not in ("type", "every")}
    fields.update(report_queries=0, baselines=())
    known = dataclasses.replace(exp, workdir=exp.workdir + "/known")
    scores = dict(retrieval.Evaluator(known, **fields).evaluate(state, step=0))
    assert len(scores) == 2 * len(capture.FEATURE_KINDS) * 12  # 9 official, 3 usual mAP.
    assert all(v == 100.0 for v in scores.values())


def test_tfidf_equals_a_dense_computation():
    titles = ["雅莉诗 小黑瓶精华 30ml", "雅莉诗小黑瓶面霜 正品", "YALISHI 玻尿酸水", "兰若 樱花口红",
              "兰若樱花 口红 包邮", ""]
    queries = ["雅莉诗小黑瓶 套装", "樱花口红", "ZZZ"]
    tfidf = baselines.TfIdf(titles)
    grams = sorted(tfidf.vocab, key=tfidf.vocab.get)

    def dense(t):
        t = t.lower()
        v = np.array([sum(t[i:i + len(g)] == g for i in range(len(t) - len(g) + 1))
                      for g in grams], float) * tfidf.idf
        return v / max(np.linalg.norm(v), 1e-12)

    df = np.array([sum(g in t.lower() for t in titles) for g in grams])
    np.testing.assert_allclose(tfidf.idf, np.log(7 / (1 + df)) + 1)
    scores = np.stack([dense(q) for q in queries]) @ np.stack([dense(t) for t in titles]).T
    want = np.argsort(-scores, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(tfidf.top_k(queries, 4), want)
    assert list(tfidf.top_k(queries, 4)[1][:2]) == [3, 4]


def test_image_baselines_and_their_front_ends():
    image = np.zeros((2, 4, 4, 3), np.float32)
    image[1, :2] = 1.0  # Half white.
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.2, 0.2])
    batch = {"image": (image - mean) / std, "visual_feats": np.ones((2, 3, 5), np.float32),
             "visual_mask": np.array([[1, 1, 0], [1, 0, 0]], np.float32)}
    out = baselines.image_features(batch, ("color_histogram", "region_mean"), mean, std)
    hist = np.asarray(out["color_histogram"])
    assert hist[0, 0] == pytest.approx(1) and hist[0, 1:].sum() == pytest.approx(0, abs=1e-6)
    np.testing.assert_allclose(hist[1, [0, 511]], [np.sqrt(0.5)] * 2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["region_mean"]), np.full((2, 5), 5 ** -0.5),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="needs a regions front end"):
        baselines.check(("region_mean",), "pixels")
    with pytest.raises(ValueError, match="Unknown baseline"):
        baselines.check(("bm25",), "pixels")


# ------------------------------------------------------------------------------- report
def test_report_and_index_render_in_headless_chromium(setup, evaluated, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from PIL import Image

    def screenshot(page, name):
        png = tmp_path / f"{name}.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}",
                        "--window-size=1200,1600", f"file://{page}"],
                       check=True, capture_output=True, timeout=120)
        if os.environ.get("RETRIEVAL_SCREENSHOT"):  # A folder to keep the screenshots in.
            shutil.copy(png, os.path.join(os.environ["RETRIEVAL_SCREENSHOT"], png.name))
        pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
        assert len(pixels) == 1200 * 1600
        return pixels

    def count(pixels, rgb):
        return int((np.abs(pixels - rgb).sum(1) < 40).sum())

    pixels = screenshot(os.path.join(setup[0].workdir, "retrieval", "dev", "joint", "report.html"),
                        "report")
    assert count(pixels, (0x1A, 0x8F, 0x2E)) + count(pixels, (0xC6, 0x28, 0x28)) > 1000  # borders
    assert len(np.unique(pixels[::97], axis=0)) > 200  # thumbnails drew (not a blank page)
    pixels = screenshot(os.path.join(setup[0].workdir, "retrieval", "index.html"), "index")
    assert count(pixels, (0xEA, 0xF6, 0xEA)) > 2000  # The best rows' background.
    assert count(pixels, (0x22, 0x22, 0x22)) + count(pixels, (0x00, 0x00, 0xEE)) > 5000  # text


def test_report_escapes_text_and_marks_hits(tmp_path):
    path = str(tmp_path / "report.html")
    scores = {f"top{n}": {"mAP": 0.5, "Prec": 0.25, "mAR": 0.1} for n in (10, 50, 100)}
    report.write_report(path, "t<i>", scores, [("q1", ["a&b"], ["g1", "g2"], 0.25, 7)],
                        {"g1": "a&b", "g2": "<script>x</script>"},
                        {"g1": ("<b>title</b>", ""), "q1": ("", "")}, "Shown: <all>.")
    text = open(path, encoding="utf-8").read()
    assert "<script>" not in text and "&lt;script&gt;" in text and "&lt;b&gt;title" in text
    assert text.count('class="g hit"') == 1 and text.count('class="g miss"') == 1
    assert "1/10 hits" in text and "(no title)" in text and "<td>50.00</td>" in text
    assert "AP@10 25.0" in text and "7 gallery positives" in text and "Shown: &lt;all&gt;." in text


def test_dataset_without_ground_truth_asks_for_a_rebuild():
    import types
    old = types.SimpleNamespace(info=types.SimpleNamespace(
        metadata={"build_stats": {}}, full_name="tfds_product1m/synthetic_tiny/1.0.0"),
        data_dir="/data/tfds_product1m/synthetic_tiny/1.0.0")
    with pytest.raises(ValueError, match=r"without the official ground truth .* rebuild it"):
        ground_truth.load(old, "gallery", ("dev", "test"))
