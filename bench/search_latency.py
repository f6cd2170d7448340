"""python -m capture_jax.search, measured: the index rate of a run's model and the query latency
over catalogues of Product1M's gallery size and of 1M items.

* `index`: embedding the run's built gallery split as `search index` does (examples/s; the
  first batch, which compiles, left out), and the whole command's rate with thumbnails.
* `stages`: one query's CPU time (time.process_time, all threads; on a loaded machine the
  measure that still means something) per stage, median of `--queries`: checking and cleaning
  the picture, decoding and resizing it, tokenising the title, the model, the ranker.
* `query`: a query is a picture and a title, checked and made into rows (`Searcher.prepare`),
  embedded by the run's model and ranked (`Searcher.search`): the server's work for a request,
  without HTTP. Catalogues of `--vectors` unit vectors of the model's feature width (the
  index's kind), `--sizes` rows; one query at a time, and 8 at once (8 requests arriving
  together, embedded and ranked in one batch: each waits for the whole batch). p50 and p99 of
  `--queries` requests after 3 warm-up ones, and the CPU time per request.
* `approximate`: faiss IVF (sqrt(N) lists, 16 probed) and HNSW (32 links, efSearch 128, where
  N <= --hnsw_max) against the exact ranker: build time, p50/p99 of one query, recall@10 of
  200 queries (catalogue rows plus noise of norm 0.5).

`--vectors random`: uniform on the sphere (no structure: IVF's worst case); `clustered`: like
embeddings of a catalogue with several items per product, N/50 random centres, each item its
centre plus Gaussian noise of norm 0.75 (cosine to its centre about 0.8), normalised.

One JSON line per measurement.

  python bench/search_latency.py --workdir DEMO_RUN [--sizes 40033,1000000] [--queries 100]
"""

import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from capture_jax import cli  # noqa: E402

cli.import_tensorflow_for_data_only()

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from capture_jax.search import catalogue, inputs, run, searcher  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained run (e.g. a `demo` run).", required=True)
flags.DEFINE_list("sizes", ["40033", "1000000"], "Catalogue sizes (rows).")
flags.DEFINE_integer("queries", 100, "Timed requests per setting.")
flags.DEFINE_integer("hnsw_max", 100_000, "Largest catalogue that gets an HNSW index.")
flags.DEFINE_bool("index_rate", True, "Measure the index rate on the run's gallery.")
flags.DEFINE_enum("vectors", "random", ["random", "clustered"], "Catalogue vectors (see above).")
flags.DEFINE_list("approximate", ["ivf", "hnsw"], "Approximate indexes to measure.")


def percentiles(seconds) -> dict:
    ms = 1000 * np.asarray(seconds)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "n": len(ms)}


def index_rate(workdir: str) -> None:
    model = run.Model(workdir)
    kind = run.feature_kinds([], model.config)
    batch = model.config.evals.retrieval.batch_size
    stamps = []
    start = time.perf_counter()
    made = catalogue.from_split(model, "gallery", None, batch, kind,
                                lambda done, total: stamps.append(time.perf_counter()), True)
    total_s = time.perf_counter() - start
    count = len(made[1])
    steady = (len(stamps) - 1) * batch / (stamps[-1] - stamps[0]) if len(stamps) > 2 else None
    print(json.dumps({"measure": "index", "variant": model.config.variant, "rows": count,
                      "batch": batch, "devices": model.mesh.size,
                      "embed_examples_per_s": round(steady, 1) if steady else None,
                      "command_examples_per_s": round(count / total_s, 1),
                      "command_s": round(total_s, 1)}), flush=True)


def unit_vectors(rng, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fake_index(path: str, model, kind: str, size: int, approximate: str | None) -> np.ndarray:
    """An index of `size` `--vectors` unit vectors, made by `model` (its manifest), at `path`."""
    dim = model.embed({k: v for k, v in _rows(model).items()}, (kind,))[kind].shape[1]
    rng = np.random.default_rng(0)
    if FLAGS.vectors == "random":
        features = unit_vectors(rng, size, dim)
    else:
        centres = unit_vectors(rng, max(1, size // 50), dim)
        features = np.empty((size, dim), np.float32)
        for start in range(0, size, 100_000):  # Bounded memory at 1M rows.
            n = min(100_000, size - start)
            part = centres[rng.integers(0, len(centres), n)] + 0.75 * unit_vectors(rng, n, dim)
            features[start:start + n] = part / np.linalg.norm(part, axis=1, keepdims=True)
    ids = [f"{i:09d}" for i in range(size)]
    catalogue.write(path, model, (kind,), {kind: features}, ids, [""] * size, [b""] * size,
                    {"random": size}, 256, approximate)
    return features


def _rows(model):
    rows = model.empty_rows(1)
    rows["text_mask"][:, :2] = 1
    return rows


def latency(s: searcher.Searcher, pictures, titles, batch: int, n: int) -> dict:
    """p50/p99 of the seconds per request, `batch` requests at a time (each waits for its
    batch), and the median CPU time per request."""
    times, cpu = [], []
    for i in range(n + 3):
        start, start_cpu = time.perf_counter(), time.process_time()
        group = [s.prepare(pictures[(i * batch + j) % len(pictures)],
                           titles[(i * batch + j) % len(titles)]) for j in range(batch)]
        s.search(group, k=10)
        if i >= 3:
            times += [time.perf_counter() - start] * batch
            cpu.append((time.process_time() - start_cpu) / batch)
    return {**percentiles(times), "cpu_ms_per_request": round(1000 * float(np.median(cpu)), 2)}


def stages(s: searcher.Searcher, kind: str, pictures, titles, n: int) -> dict:
    """Median CPU milliseconds of one query's stages (`Searcher.prepare` and `search`, apart)."""
    model, spent = s.model, {}

    def timed(name, f, *args):
        start = time.process_time()
        out = f(*args)
        spent.setdefault(name, []).append(time.process_time() - start)
        return out

    for i in range(n + 3):
        title = inputs.check_title(titles[i % len(titles)])
        picture = timed("picture_check_clean", inputs.read_picture, pictures[i % len(pictures)],
                        s.index.manifest["max_image_side"])
        rows = model.empty_rows(1)
        rows["image"] = timed("decode_resize", inputs.pixel_rows, picture, [], model.image_size)
        rows["text_ids"], rows["text_mask"] = timed("tokenise", inputs.text_rows,
                                                    model.tokenizer, title, 1)
        features = timed("embed", model.embed, rows, (kind,))[kind]
        timed("rank", s.index.search, kind, features, 10, model.mesh)
        if i < 3:
            spent.clear()
    return {f"{name}_cpu_ms": round(1000 * float(np.median(v)), 2) for name, v in spent.items()}


def machine() -> dict:
    """The load the numbers were measured under (they mean little on a loaded machine)."""
    return {"load_average": [round(x, 2) for x in os.getloadavg()],
            "cpus": len(os.sched_getaffinity(0)), "vectors": FLAGS.vectors}


def main(argv):
    del argv
    model_run = os.path.abspath(FLAGS.workdir)
    if FLAGS.index_rate:
        index_rate(model_run)
    import tensorflow_datasets as tfds

    from capture_jax import input_pipeline  # noqa: F401  (registers the dataset builder)

    config = run.read_config(model_run)
    ds = tfds.builder(config.dataset.name, data_dir=config.dataset.data_dir).as_dataset(
        split="test", decoders={"image": tfds.decode.SkipDecoding()})
    examples = [(ex["image"], ex["title"].decode()) for ex in tfds.as_numpy(ds.take(64))
                if ex["title"].strip()]
    pictures, titles = [e[0] for e in examples], [e[1] for e in examples]
    model = run.Model(model_run, batch_size=8)
    kind = run.feature_kinds([], model.config)[0]
    for size in map(int, FLAGS.sizes):
        tmp = tempfile.mkdtemp(prefix="search_bench_")
        try:
            features = fake_index(tmp, model, kind, size, None)
            exact = searcher.Searcher(tmp, batch_size=8)
            head = {"variant": model.config.variant, "kind": kind, "dim": features.shape[1],
                    "items": size}
            print(json.dumps({"measure": "stages", **head, **stages(
                exact, kind, pictures, titles, FLAGS.queries), **machine()}), flush=True)
            for batch in (1, 8):
                print(json.dumps({"measure": "query", **head, "concurrent": batch,
                                  "search": "exact", **latency(exact, pictures, titles, batch,
                                                               FLAGS.queries), **machine()}),
                      flush=True)
            queries = features[np.random.default_rng(1).choice(size, 200, replace=False)] + \
                0.5 * np.random.default_rng(2).standard_normal((200, features.shape[1]),
                                                                 np.float32) / np.sqrt(
                    features.shape[1])
            _, truth = exact.index.search(kind, queries, 10, exact.model.mesh)
            del exact  # Its copy of the catalogue: 2 GB at 1M rows of 512.
            for method in FLAGS.approximate:
                if method == "hnsw" and size > FLAGS.hnsw_max:
                    continue
                start = time.perf_counter()
                catalogue.build_approximate(features, method,
                                            os.path.join(tmp, f"{kind}.{method}.faiss"))
                build_s = time.perf_counter() - start
                with open(os.path.join(tmp, "manifest.json")) as f:
                    manifest = json.load(f)
                with open(os.path.join(tmp, "manifest.json"), "w") as f:
                    json.dump({**manifest, "approximate": method}, f)
                s = searcher.Searcher(tmp, approximate=True, batch_size=8)
                _, found = s.index.search(kind, queries, 10, s.model.mesh, approximate=True)
                recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)])
                print(json.dumps({"measure": "approximate", "method": method, **head,
                                  "build_s": round(build_s, 1),
                                  "recall_at_10": round(float(recall), 4),
                                  **latency(s, pictures, titles, 1, FLAGS.queries), **machine()}),
                      flush=True)
                del s
                os.remove(os.path.join(tmp, f"{kind}.{method}.faiss"))
        finally:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
