"""Exact top-100 retrieval: the sharded JAX ranker against a straightforward numpy baseline.

For each gallery size (default 10k, 100k, 1M; 1024-d float32, rows L2-normalised; 6,547 queries
like the Product1M test split) it ranks the whole gallery for every query twice in the same
process: `capture_jax.evaluators.ranker.top_k` (after one warm-up chunk that compiles it), then
numpy (per query chunk: `q @ g.T`, `np.argpartition(-scores, k)`, sort those k). It prints one
JSON line per size: seconds and queries/s of both, the speed-up, the agreement of the two index
lists, and the peak resident memory after the JAX run and after both. Each size runs in a fresh
subprocess, so the peaks are per size.

The numpy chunk is capped so that its temporaries (scores, -scores, int64 argpartition) stay
under --numpy_chunk_gb; the JAX ranker's working memory is query_chunk x gallery_tile floats per
device whatever the gallery size.

  python bench/retrieval.py [--sizes 10000,100000,1000000] [--queries 6547] [--dim 1024]
                            [--devices 1]   # fake CPU devices for the JAX mesh
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
    gib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    chunk = ranker.query_chunk_size(len(queries), ec.query_chunk)
    start = time.perf_counter()
    ranker.top_k(queries[:chunk], gallery, k, mesh, **kw)  # compiles the program for `chunk`
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    _, jax_idx = ranker.top_k(queries, gallery, k, mesh, **kw)
    jax_s = time.perf_counter() - start
    rss_jax = gib()
    ranker._RANKERS.clear()
    np_chunk = int(min(ec.query_chunk, max(8, args.numpy_chunk_gb * 2**30 // (16 * size))))
    start = time.perf_counter()
    np_idx = numpy_top_k(queries, gallery, k, np_chunk)
    np_s = time.perf_counter() - start
    return dict(
        benchmark="retrieval_top_k", gallery=size, queries=args.queries, dim=args.dim, k=k,
        jax_s=round(jax_s, 2), jax_queries_per_s=round(args.queries / jax_s, 1),
        numpy_s=round(np_s, 2), numpy_queries_per_s=round(args.queries / np_s, 1),
        speedup=round(np_s / jax_s, 2), jax_warmup_s=round(warmup, 2),
        index_agreement=round(float(np.mean(jax_idx == np_idx)), 6),
        jax_query_chunk=chunk, gallery_tile=ec.gallery_tile, numpy_query_chunk=np_chunk,
        peak_rss_gib_after_jax=round(rss_jax, 2), peak_rss_gib=round(gib(), 2),
        devices=jax.device_count(), cpus=os.cpu_count(),
        loadavg_1min_at_end=round(os.getloadavg()[0], 2))


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    if FLAGS.size:
        print(json.dumps(run_one(FLAGS)), flush=True)
        return
    for size in FLAGS.sizes:
        cmd = [sys.executable, __file__, "--size", size] + [
            f"--{name}={getattr(FLAGS, name)}" for name in
            ("queries", "dim", "k", "devices", "numpy_chunk_gb")]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    cli.run(main)
