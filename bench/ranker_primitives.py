"""What an exact top-100 ranker can cost on this machine: its building blocks, timed one by one.

`bench/retrieval.py` times whole rankers; this script times the pieces they are made of, for one
query chunk against one gallery tile (default 1024 x 32768, 1024-d, unit rows), so the ceiling of
each ranker design can be read off before building it. Per score element (one query x one gallery
row) it measures, median of --repeats runs after a warm-up:

  numpy_matmul, numpy_argpartition   the numpy baseline of bench/retrieval.py (its two parts)
  xla_dot_f32                        float32 scores, Precision.HIGHEST (the exact ranker's multiply)
  xla_dot_bf16                       bfloat16 inputs, float32 accumulation (a screening multiply)
  xla_top_k                          lax.top_k(k) over the whole tile
  xla_block_select                   the exact ranker's block pruning: maxima of 32-row blocks,
                                     top_k(k) over them, top_k(k) over the k selected blocks' rows
  xla_gather_rescore                 a float32 rescore of --candidates gathered rows per query
                                     (lax.map over 16 queries at a time), per query, not per element

and prints one JSON line per piece, then one line of ceilings: the speed-up over the numpy
baseline that each design would reach if everything else it does were free,

  exact_f32      numpy / (f32 dot + block selection)
  bf16_screened  numpy / (bf16 dot + block selection), plus the gather rescore at 10k items
                 (a screened ranker must rescore its candidates exactly; that cost does not shrink
                 with the gallery, so it matters most for small galleries). Optimistic: the
                 selection is timed for k, and a screened ranker must select --candidates.

  python bench/ranker_primitives.py [--queries 1024] [--tile 32768] [--dim 1024] [--k 100]
                                    [--candidates 256] [--repeats 5]
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from capture_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("queries", 1024, "Queries in the chunk.")
flags.DEFINE_integer("tile", 32768, "Gallery rows in the tile.")
flags.DEFINE_integer("dim", 1024, "Feature width.")
flags.DEFINE_integer("k", 100, "Gallery ids kept per query.")
flags.DEFINE_integer("candidates", 256, "Rows per query that a screened ranker rescores.")
flags.DEFINE_integer("repeats", 5, "Timed runs per piece (after a warm-up); the median counts.")

_BLOCK = 32  # As in capture_jax/evaluators/ranker.py.


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    nq, nt, d, k = FLAGS.queries, FLAGS.tile, FLAGS.dim, FLAGS.k
    if nt % _BLOCK or nt // _BLOCK <= k:
        cli.usage_error(f"--tile must be a multiple of {_BLOCK} with more than --k blocks; "
                        f"got {nt}.", cli.USAGE_STATUS)

    rng = np.random.default_rng(0)

    def unit_rows(n):
        x = rng.standard_normal((n, d), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    q, g = unit_rows(nq), unit_rows(nt)
    qj, gj = jnp.asarray(q), jnp.asarray(g)
    q16, g16 = qj.astype(jnp.bfloat16), gj.astype(jnp.bfloat16)
    dims = (((1,), (1,)), ((), ()))
    f32 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims,
                                                   precision=jax.lax.Precision.HIGHEST))
    bf16 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims,
                                                    preferred_element_type=jnp.float32))
    scores = f32(qj, gj)
    scores_np = q @ g.T

    def block_select(s):
        _, blocks = jax.lax.top_k(s.reshape(nq, -1, _BLOCK).max(-1), k)
        pos = (blocks[:, :, None] * _BLOCK + jnp.arange(_BLOCK)).reshape(nq, -1)
        return jax.lax.top_k(jnp.take_along_axis(s, pos, axis=1), k)

    top_k = jax.jit(lambda s: jax.lax.top_k(s, k))
    block_select = jax.jit(block_select)
    ids = jnp.asarray(rng.integers(0, nt, (nq, FLAGS.candidates), dtype=np.int32))
    rescore = jax.jit(lambda qq, gg, ii: jax.lax.map(
        lambda a: jnp.take(gg, a[1], axis=0) @ a[0], (qq, ii), batch_size=16))
    pieces = {
        "numpy_matmul": lambda: q @ g.T,
        "numpy_argpartition": lambda: np.argpartition(-scores_np, k, axis=1)[:, :k],
        "xla_dot_f32": lambda: f32(qj, gj),
        "xla_dot_bf16": lambda: bf16(q16, g16),
        "xla_top_k": lambda: top_k(scores),
        "xla_block_select": lambda: block_select(scores),
        "xla_gather_rescore": lambda: rescore(qj, gj, ids),
    }
    elements = nq * nt
    ns = {}
    for name, fn in pieces.items():
        seconds = median_seconds(fn, FLAGS.repeats)
        per_query = name == "xla_gather_rescore"
        ns[name] = seconds / (nq if per_query else elements) * 1e9
        line = {"benchmark": "ranker_primitive", "piece": name, "seconds": round(seconds, 4),
                "ns_per_query" if per_query else "ns_per_element": round(ns[name], 3)}
        if name.startswith(("numpy_matmul", "xla_dot")):
            line["gflop_per_s"] = round(2 * elements * d / seconds / 1e9, 1)
        print(json.dumps(line), flush=True)

    numpy_per = ns["numpy_matmul"] + ns["numpy_argpartition"]
    screened = ns["xla_dot_bf16"] + ns["xla_block_select"]
    print(json.dumps(dict(
        benchmark="ranker_ceiling", queries=nq, tile=nt, dim=d, k=k, candidates=FLAGS.candidates,
        exact_f32=round(numpy_per / (ns["xla_dot_f32"] + ns["xla_block_select"]), 2),
        bf16_screened=round(numpy_per / screened, 2),
        bf16_screened_10k=round(numpy_per * 10_000 /
                                (screened * 10_000 + ns["xla_gather_rescore"]), 2),
        cpus=os.cpu_count(), loadavg_1min_at_end=round(os.getloadavg()[0], 2))), flush=True)


if __name__ == "__main__":
    cli.run(main)
