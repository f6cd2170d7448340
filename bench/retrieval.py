"""Exact top-100 retrieval: numpy, faiss and the project's ranker side by side, in one process.

For each gallery size (default 10k, 100k, 1M; 1024-d float32, rows L2-normalised; 6,547 queries
like the Product1M test split) every method ranks the whole gallery for every query, `--repeats`
rounds interleaved (method order rotated each round; median and range reported):

* `numpy`: per query chunk `q @ g.T`, `np.argpartition(-scores, k)`, sort those k;
* `faiss`: `faiss.knn` (exact `IndexFlatIP` search), the number to beat;
* `ranker`: `capture_jax.evaluators.ranker.top_k` with the evaluator's default method (`auto`:
  faiss on CPUs, with the ranker's handling of ties at the cut), ties to the lower id;
* `ranker_exact`, `ranker_faiss`, `ranker_screen`: the ranker's methods by name (float32 on the
  JAX devices; faiss; the bfloat16 screen with float32 rescore), compiled before the first round.

`--methods` picks among them (default: numpy, faiss, ranker). One JSON line per size: seconds
per method, speed-ups against faiss, each method's index agreement with the first method,
peak resident memory. Each size runs in a fresh subprocess. The numpy chunk is capped so its
temporaries stay under --numpy_chunk_gb.

  python bench/retrieval.py [--sizes 10000,100000,1000000] [--queries 6547] [--dim 1024]
      [--repeats 3] [--methods numpy,faiss,ranker,ranker_exact,ranker_faiss,ranker_screen]
      [--devices 1]
"""

import json
import os
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import flags  # noqa: E402

from capture_jax import cli  # noqa: E402  (no JAX yet: run_one sets XLA_FLAGS first)
from configs import capture as capture_configs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["10000", "100000", "1000000"], "Gallery sizes, one subprocess each.")
flags.DEFINE_integer("queries", 6547, "Queries (as many as in the Product1M test split).")
flags.DEFINE_integer("dim", 1024, "Feature width.")
flags.DEFINE_integer("k", 100, "Gallery ids kept per query.")
flags.DEFINE_integer("devices", 1, "Fake CPU devices for the JAX mesh.")
flags.DEFINE_float("numpy_chunk_gb", 4.0, "Cap on the numpy baseline's temporaries per chunk.")
flags.DEFINE_integer("repeats", 3, "Interleaved rounds; the median counts.")
flags.DEFINE_list("methods", ["numpy", "faiss", "ranker"], "Methods to time (see above).")
flags.DEFINE_integer("size", None, "One gallery size, measured in this process (the "
                     "subprocess of each --sizes entry).")


def numpy_top_k(queries, gallery, k, chunk):
    import numpy as np
    out = []
    for s in range(0, len(queries), chunk):
        scores = queries[s:s + chunk] @ gallery.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
        out.append(np.take_along_axis(part, order, 1))
    return np.concatenate(out)


def run_one(args) -> dict:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    import statistics

    import faiss
    import jax
    import numpy as np

    from capture_jax import sharding
    from capture_jax.evaluators import ranker

    size, k = args.size, args.k
    rng = np.random.default_rng(0)

    def features(n):
        x = rng.standard_normal((n, args.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    gallery, queries = features(size), features(args.queries)
    mesh = sharding.make_mesh({"data": -1})
    ec = capture_configs.get_config().evals.retrieval
    kw = dict(query_chunk=ec.query_chunk, gallery_tile=ec.gallery_tile)
    np_chunk = int(min(ec.query_chunk, max(8, args.numpy_chunk_gb * 2**30 // (16 * size))))
    stats = {}
    chunk = ranker.query_chunk_size(len(queries), ec.query_chunk)
    available = {
        "numpy": lambda: numpy_top_k(queries, gallery, k, np_chunk),
        "faiss": lambda: faiss.knn(queries, gallery, k, metric=faiss.METRIC_INNER_PRODUCT)[1],
        "ranker": lambda: ranker.top_k(queries, gallery, k, mesh, method=ec.ranker, **kw)[1],
        "ranker_exact": lambda: ranker.top_k(queries, gallery, k, mesh, method="exact", **kw)[1],
        "ranker_faiss": lambda: ranker.top_k(queries, gallery, k, mesh, method="faiss", **kw)[1],
        "ranker_screen": lambda: ranker.top_k(queries, gallery, k, mesh, method="screen",
                                              stats=stats, **kw)[1],
    }
    default = ranker.resolve_method(ec.ranker, mesh)
    unknown = set(args.methods) - set(available)
    if unknown:
        raise SystemExit(f"Unknown --methods {sorted(unknown)}; choose among {list(available)}.")
    methods = {m: available[m] for m in args.methods}
    for m, method in (("ranker", default), ("ranker_exact", "exact"),
                      ("ranker_screen", "screen")):  # Compile for the chunk shape before timing.
        if m in methods and method != "faiss":
            ranker.top_k(queries[:chunk], gallery, k, mesh, method=method, **kw)
    names, times, results = list(methods), {m: [] for m in methods}, {}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            results[name] = methods[name]()
            times[name].append(time.perf_counter() - start)
    median = {m: statistics.median(t) for m, t in times.items()}
    out = dict(benchmark="retrieval_top_k", gallery=size, queries=args.queries, dim=args.dim,
               k=k, repeats=args.repeats, ranker_method=default,
               **{f"screen_{key}": v for key, v in stats.items() if key != "method"})
    for m in names:
        out[f"{m}_s"] = round(median[m], 3)
        out[f"{m}_s_range"] = [round(min(times[m]), 3), round(max(times[m]), 3)]
    for m in names:
        if m != "faiss" and "faiss" in median:
            out[f"{m}_speed_vs_faiss"] = round(median["faiss"] / median[m], 3)
    for m in names[1:]:
        out[f"{m}_agreement_with_{names[0]}"] = round(
            float(np.mean(results[m] == results[names[0]])), 6)
    out.update(numpy_query_chunk=np_chunk, peak_rss_gib=round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        devices=jax.device_count(), cpus=os.cpu_count(), faiss_threads=faiss.omp_get_max_threads(),
        loadavg_1min_at_end=round(os.getloadavg()[0], 2))
    return out


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    if FLAGS.size:
        print(json.dumps(run_one(FLAGS)), flush=True)
        return
    for size in FLAGS.sizes:
        cmd = [sys.executable, __file__, "--size", size] + [
            f"--{name}={getattr(FLAGS, name)}" for name in
            ("queries", "dim", "k", "devices", "numpy_chunk_gb", "repeats")] + [
            f"--methods={','.join(FLAGS.methods)}"]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    cli.run(main)
