"""Tests of capture_jax.evaluators.retrieval: exact sharded top-k, end-to-end evaluation on
synthetic_tiny, a known-answer ranking, and the HTML report rendered by headless Chromium."""

import json
import os
import shutil
import subprocess

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from capture_jax import input_pipeline, metrics, sharding
from capture_jax.evaluators import retrieval
from fake_batches import build, tiny_config

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


@pytest.mark.parametrize("mesh_name", list(MESHES))
@PATHS
def test_top_k_equals_numpy_on_random_floats(mesh_name, k, tile):
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((2003, 24)).astype(np.float32)  # G not a multiple of 8.
    queries = rng.standard_normal((150, 24)).astype(np.float32)  # Q not a multiple of 56.
    scores, indices = retrieval.top_k(queries, gallery, k, make_mesh(mesh_name), query_chunk=64,
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


@pytest.mark.parametrize("mesh_name", list(MESHES))
@PATHS
def test_top_k_breaks_ties_by_lower_gallery_index(mesh_name, k, tile):
    """Small integer features: exact float32 scores with many ties."""
    rng = np.random.default_rng(1)
    gallery = rng.integers(-2, 3, (2003, 6)).astype(np.float32)
    queries = rng.integers(-2, 3, (37, 6)).astype(np.float32)
    scores, indices = retrieval.top_k(queries, gallery, k, make_mesh(mesh_name), query_chunk=16,
                                      gallery_tile=tile)
    ref_scores, ref_indices = reference_top_k(queries, gallery, k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(scores, ref_scores)


def test_top_k_with_fewer_gallery_items_than_k():
    rng = np.random.default_rng(2)
    gallery, queries = rng.standard_normal((13, 8)), rng.standard_normal((3, 8))
    scores, indices = retrieval.top_k(queries, gallery, 100, make_mesh("8dev_2x2x2"))
    assert indices.shape == (3, 13) and np.isfinite(scores).all()
    np.testing.assert_array_equal(indices, reference_top_k(queries, gallery, 13)[1])


# ------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """synthetic_tiny, a random tiny pixels model FSDP-sharded on a 4x2 mesh, and a config."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    workdir = str(tmp_path_factory.mktemp("workdir"))
    tfds.builder("tfds_product1m/synthetic_tiny", data_dir=data_dir).download_and_prepare()
    model = tiny_config("pixels")
    config = ml_collections.ConfigDict(dict(
        dataset=dict(name="tfds_product1m/synthetic_tiny", data_dir=data_dir,
                     train_split="train", shuffle_buffer=64),
        vocab_path=None, vocab_size=400, seed=0, model=model, eval_batch_size=8,
        eval=retrieval.eval_config()))
    config.eval.update(report_queries=5, query_chunk=8, gallery_tile=64)
    config.model.vocab_size = input_pipeline.load_tokenizer(config, workdir).vocab_size
    mesh, rules = sharding.make_mesh(dict(data=4, fsdp=2)), sharding.rules("fsdp")
    graphdef, state = nnx.split(build(config.model))
    state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    return config, workdir, graphdef, state, mesh, rules


def read_split(config, split):
    """{id: labels} straight from TFDS."""
    ds = tfds.builder(config.dataset.name, data_dir=config.dataset.data_dir).as_dataset(
        split, decoders={"image": tfds.decode.SkipDecoding()})
    return {ex["id"].decode(): [s.decode() for s in ex["labels"]] for ex in tfds.as_numpy(ds)}


class FakeWriter:
    def __init__(self):
        self.scalars = {}

    def write_scalars(self, step, scalars):
        self.scalars.update({(step, k): v for k, v in scalars.items()})

    def flush(self):
        pass


@pytest.fixture(scope="module")
def evaluated(setup):
    config, workdir, graphdef, state, mesh, rules = setup
    writer = FakeWriter()
    results = retrieval.evaluate(config, workdir, graphdef, state, mesh, rules, step=7,
                                 writer=writer)
    return results, writer


def test_embed_split_equals_unsharded_embedding_in_dataset_order(setup):
    config, workdir, graphdef, state, mesh, rules = setup
    features, ids, labels = retrieval.embed_split(config, workdir, graphdef, state, mesh, rules,
                                                  "dev")
    embed = jax.jit(lambda s, b: nnx.merge(graphdef, s).embed(b)["joint"])
    single = jax.device_put(jax.device_get(state), jax.devices()[0])
    expected, expected_ids = [], []
    for batch, item_ids, _ in input_pipeline.create_eval_dataset(config, workdir, "dev"):
        valid = batch["valid"] == 1
        expected.append(np.asarray(embed(single, batch))[valid])
        expected_ids += list(item_ids[valid])
    assert ids == expected_ids and ids == list(read_split(config, "dev"))
    assert labels == list(read_split(config, "dev").values())
    np.testing.assert_allclose(features["joint"], np.concatenate(expected), atol=1e-5)
    assert features["visual"].shape == features["text"].shape == (16, config.model.out_dim)


def test_evaluate_writes_official_files_and_scores(setup, evaluated):
    config, workdir, *_ = setup
    results, writer = evaluated
    gallery = {gid: ls[0] for gid, ls in read_split(config, "gallery").items()}
    kinds = ("joint", "visual", "text")
    assert set(results) == {f"{s}/{k}" for s in ("dev", "test") for k in kinds}
    for split in ("dev", "test"):
        query_labels = read_split(config, split)
        for kind in ("joint", "visual", "text"):
            out = os.path.join(workdir, "retrieval", split, kind)
            lines = open(os.path.join(out, "retrieval_id_list.txt"), encoding="utf-8").read()
            lines = lines.splitlines()
            assert len(lines) == len(query_labels) == 16
            for line in lines:
                qid, *ids = line.split(",")
                assert qid in query_labels and 1 <= len(ids) <= 100 and set(ids) <= set(gallery)
                assert len(ids) == len(set(ids)) == min(100, len(gallery))
            entries = metrics.read_retrieval_file(os.path.join(out, "retrieval_id_list.txt"))
            recomputed, _ = metrics.score([r for _, r in entries],
                                          [query_labels[q] for q, _ in entries], gallery)
            assert results[f"{split}/{kind}"] == recomputed
            written = json.load(open(os.path.join(out, "metric_results.json")))
            assert set(written) == {"top10", "top50", "top100"}
            assert all(set(v) == {"mAP", "Prec", "mAR"} for v in written.values())
            assert written == recomputed  # JSON floats round-trip exactly.
            assert writer.scalars[(7, f"retrieval/{split}/{kind}/mAP@10")] == pytest.approx(
                recomputed["top10"]["mAP"])
            report = open(os.path.join(out, "report.html"), encoding="utf-8").read()
            assert report.count('src="data:image/jpeg;base64,') == 5 * 11  # 5 queries + top 10
            assert "✓" in report or "✗" in report


def test_known_answer_ranking_scores_100(setup, monkeypatch):
    """Gallery items of label j are e_j; a query is the sum of its labels' e_j: positives first."""
    config, workdir, graphdef, state, mesh, rules = setup
    rng = np.random.default_rng(3)
    labels = [f"brand{j} product" for j in range(30)]
    g_labels = [[labels[j]] for j in range(30) for _ in range(3)]  # 3 items per label
    q_labels = [list(rng.choice(labels, rng.integers(1, 4), replace=False)) for _ in range(20)]
    eye = np.eye(30, dtype=np.float32)
    g_feats = eye[[labels.index(ls[0]) for ls in g_labels]]
    q_feats = np.stack([eye[[labels.index(label) for label in ls]].sum(0) for ls in q_labels])

    def fake_embed_split(config, workdir, graphdef, model_state, mesh, rules, split):
        feats, ls = (g_feats, g_labels) if split == "gallery" else (q_feats, q_labels)
        ids = [f"{split}{i:04d}" for i in range(len(ls))]
        return {"joint": feats, "visual": feats, "text": feats}, ids, ls

    monkeypatch.setattr(retrieval, "embed_split", fake_embed_split)
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval.report_queries = 0
    results = retrieval.evaluate(config, workdir + "/known", graphdef, state, mesh, rules, step=0)
    for scores in results.values():
        assert scores == {f"top{n}": {"mAP": 100.0, "Prec": 100.0, "mAR": 100.0}
                          for n in (10, 50, 100)}


# ------------------------------------------------------------------------------- report
def test_report_renders_in_headless_chromium(setup, evaluated, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from PIL import Image

    report = os.path.join(setup[1], "retrieval", "dev", "joint", "report.html")
    png = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}",
                    "--window-size=1200,1600", f"file://{report}"],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    assert len(pixels) == 1200 * 1600

    def count(rgb):
        return int((np.abs(pixels - rgb).sum(1) < 40).sum())

    assert count((0x1A, 0x8F, 0x2E)) + count((0xC6, 0x28, 0x28)) > 1000  # hit/miss borders
    assert len(np.unique(pixels[::97], axis=0)) > 200  # thumbnails drew (not a blank page)
    if os.environ.get("RETRIEVAL_SCREENSHOT"):
        shutil.copy(png, os.environ["RETRIEVAL_SCREENSHOT"])


def test_report_escapes_text_and_marks_hits(tmp_path):
    path = str(tmp_path / "report.html")
    scores = {f"top{n}": {"mAP": 50.0, "Prec": 25.0, "mAR": 10.0} for n in (10, 50, 100)}
    retrieval.write_report(path, "t<i>", scores, [("q1", ["a&b"], ["g1", "g2"])],
                           {"g1": "a&b", "g2": "<script>x</script>"},
                           {"g1": ("<b>title</b>", ""), "q1": ("", "")})
    text = open(path, encoding="utf-8").read()
    assert "<script>" not in text and "&lt;script&gt;" in text and "&lt;b&gt;title" in text
    assert text.count('class="g hit"') == 1 and text.count('class="g miss"') == 1
    assert "1/10 hits" in text and "(no title)" in text and "<td>50.00</td>" in text
