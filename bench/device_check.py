"""One accelerator check in one go: the `paper` train step's speed and MFU, and the ranker's.

    python bench/device_check.py [--budget_s 420] [--ranker_sizes 1000000,10000000]
    python bench/device_check.py --tiny     # a CPU dry run of every code path, in a minute

Prints one JSON line per measurement, flushed as it goes, so a run cut short keeps what it
measured:
  * `env`: JAX, Flax and Optax versions, the devices, the bf16 peak used for MFU;
  * `train_step` (bench/train_throughput.py's measurement: the real jitted step on random batches
    of the variant's shapes, median of timed steps after two warm-ups): `paper` in bfloat16 at
    global batches 64, 128, 256, with remat, with each attention implementation, and
    `paper_pixels`; step time, examples/s, MFU, XLA's scratch memory, peak device memory;
  * `profile` (`--profile_steps`, after the first train setting): where that step's time goes,
    from a JAX profiler trace of a few more steps (bench/profile_summary.py: device busy time
    against the step's window, ops per step, the top ops); the trace is kept under
    `--profile_dir` (default: $OUT/profile when $OUT is set, else a temporary directory);
  * `ranker`: the evaluator's exact top-100 (`capture_jax.evaluators.ranker.top_k`) for 6,547
    1024-d queries over 1M and 10M gallery rows, by each of `--ranker_methods` (`screen`: the
    bfloat16 screen with float32 rescore, `exact`: float32 scores): seconds, queries/s, achieved
    TFLOP/s of the equivalent float32 matmul (2 x queries x gallery x dim FLOPs), and for the
    screen how many queries it certified;
  * `skipped`: a measurement not run (over `--budget_s`, or one that needs a GPU), and `error`:
    one that failed, with the exception, so the other lines still come.

It needs JAX (with its accelerator plugin), Flax, Optax, ml_collections and absl, nothing of
TensorFlow, TFDS or Orbax: it imports only the model, the losses, the optimiser and the ranker,
so it runs on an accelerator machine where only those are installed. The README's accelerator
line installs all of that. The `demo` command end to end needs TensorFlow as well and is not
part of this check.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

import profile_summary  # noqa: E402  (bench/: the trace summary)
import train_throughput  # noqa: E402  (bench/: the train-step measurement)
from capture_jax import cli, sharding  # noqa: E402
from capture_jax.models import cost  # noqa: E402
from configs import capture as capture_configs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("tiny", False, "CPU dry run: the `tiny` variant, small ranker, one timed step.")
flags.DEFINE_float("budget_s", 420.0, "Measurements that would start after this many seconds are "
                   "skipped (a `skipped` line each).")
flags.DEFINE_list("ranker_sizes", ["1000000", "10000000"], "Gallery sizes for the ranker.")
flags.DEFINE_list("train_settings", [], "variant:batch:remat:attention items replacing the "
                  "default list, e.g. paper:512:none:auto.")
flags.DEFINE_bool("ranker_first", False, "Measure the ranker before the train steps.")
flags.DEFINE_list("ranker_methods", ["screen", "exact"], "Ranking methods measured per size "
                  "(exact is skipped above 2M rows: it is the screen's fallback, and slow).")
flags.DEFINE_integer("profile_steps", 3, "Steps traced after the first train setting (0: none).")
# --profile_dir is train_throughput's flag (imported above); here its default is $OUT/profile
# when $OUT is set, else a temporary directory.

# (variant, global batch, remat, attention_impl), most important first: the budget may cut the tail.
PAPER_SETTINGS = [
    ("paper", 128, "none", "auto"),
    ("paper", 256, "none", "auto"),
    ("paper", 64, "none", "auto"),
    ("paper", 256, "all", "auto"),
    ("paper", 128, "none", "xla"),
    ("paper", 128, "none", "cudnn"),
    ("paper_pixels", 128, "none", "auto"),
]
TINY_SETTINGS = [("tiny", 8, "none", "xla"), ("tiny", 8, "none", "cudnn")]  # 8: any device count.


def say(line: dict) -> None:
    print(json.dumps(line), flush=True)


def env_line() -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    device = jax.devices()[0]
    return {"bench": "env", "jax": jax.__version__, "jaxlib": version("jaxlib"),
            "flax": version("flax"), "optax": version("optax"), "backend": jax.default_backend(),
            "devices": jax.device_count(), "device_kind": device.device_kind,
            "peak_bf16_tflop_per_s": (cost.peak_flops(device) or 0) / 1e12 or None,
            "python": sys.version.split()[0], "cpus": os.cpu_count(),
            # What it must run without (an accelerator image may lack them): none imported.
            "imported_data_libraries": sorted({m.split(".")[0] for m in sys.modules} & {
                "tensorflow", "tensorflow_datasets", "orbax", "clu"})}


def train_line(variant: str, batch: int, remat: str, attention: str, steps: int,
               profile_dir: str | None = None) -> dict:
    dtype = "bfloat16" if jax.default_backend() == "gpu" or variant.startswith("paper") else None
    line = train_throughput.measure_step(variant, batch, steps, dtype, remat, 0, attention,
                                         profile_dir, FLAGS.profile_steps)
    stats = jax.devices()[0].memory_stats() or {}
    line["peak_device_mib"] = (round(stats["peak_bytes_in_use"] / 2**20, 1)
                               if "peak_bytes_in_use" in stats else None)
    if profile_dir:
        say(line)
        line = {"what": f"{variant} batch {batch} remat {remat} attention {attention}",
                **profile_summary.summarize(profile_dir, FLAGS.profile_steps),
                "trace_dir": profile_dir}
    return line


def ranker_line(size: int, queries: int, dim: int, k: int, method: str) -> dict:
    from capture_jax.evaluators import ranker

    rng = np.random.default_rng(0)
    base = min(size, 1_000_000)  # Rows drawn once and tiled: drawing 10M x 1024 takes minutes.
    gallery = rng.standard_normal((base, dim), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    if size > base:
        gallery = np.tile(gallery, (-(-size // base), 1))[:size]
    query = gallery[rng.choice(base, queries, replace=False)] + 0.01 * rng.standard_normal(
        (queries, dim), dtype=np.float32)
    mesh = sharding.make_mesh({"data": -1})
    ec = capture_configs.get_config().evals.retrieval
    kw = dict(query_chunk=ec.query_chunk, gallery_tile=ec.gallery_tile, method=method,
              screen_candidates=ec.screen_candidates)
    chunk = ranker.query_chunk_size(queries, ec.query_chunk)
    start = time.perf_counter()
    ranker.top_k(query[:chunk], gallery, k, mesh, **kw)  # Compiles the program for one chunk.
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    stats = {}
    _, ids = ranker.top_k(query, gallery, k, mesh, stats=stats, **kw)
    seconds = time.perf_counter() - start
    line = {"bench": "ranker", "method": method, **{f"{k}": v for k, v in stats.items()
                                                    if k != "method"},
            "gallery": size, "queries": queries, "dim": dim, "k": k,
            "seconds": round(seconds, 3), "queries_per_s": round(queries / seconds, 1),
            "matmul_tflop_per_s": round(2 * queries * size * dim / seconds / 1e12, 2),
            "warmup_s": round(warmup_s, 2), "query_chunk": chunk, "gallery_tile": ec.gallery_tile,
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
    if size <= 20_000:  # Small enough to check against numpy here.
        expected = np.argsort(-(query @ gallery.T), axis=1, kind="stable")[:, :k]
        line["agreement_with_numpy"] = float(np.mean(np.asarray(ids) == expected))
    return line


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()
    say(env_line())
    gpu = jax.default_backend() == "gpu"
    settings = TINY_SETTINGS if FLAGS.tiny else PAPER_SETTINGS
    if FLAGS.train_settings:
        settings = [(v, int(b), r, a) for v, b, r, a in
                    (item.split(":") for item in FLAGS.train_settings)]
    steps = 1 if FLAGS.tiny else FLAGS.steps  # --steps: train_throughput's flag (default 5).
    sizes = [2000] if FLAGS.tiny else [int(s) for s in FLAGS.ranker_sizes]
    queries, dim = (64, 32) if FLAGS.tiny else (6547, 1024)
    jobs = [(f"train_step {v} batch {b} remat {r} attention {a}",
             lambda v=v, b=b, r=r, a=a, first=(j == 0): train_line(
                 v, b, r, a, steps, profile_dir if first else None),
             a == "cudnn" and not gpu) for j, (v, b, r, a) in enumerate(settings)]
    ranker_jobs = [(f"ranker {m} gallery {n}", lambda n=n, m=m: ranker_line(n, queries, dim, 100, m),
                    False) for n in sizes for m in FLAGS.ranker_methods
                   if not (m == "exact" and n > 2_000_000 and "screen" in FLAGS.ranker_methods)]
    profile_dir = None
    if FLAGS.profile_steps:
        profile_dir = FLAGS.profile_dir or (os.path.join(os.environ["OUT"], "profile")
                                            if os.environ.get("OUT") else tempfile.mkdtemp())
    jobs = ranker_jobs + jobs if FLAGS.ranker_first else jobs + ranker_jobs
    for name, run, needs_gpu in jobs:
        elapsed = time.perf_counter() - start
        if needs_gpu or elapsed > FLAGS.budget_s:
            why = "needs an NVIDIA GPU" if needs_gpu else f"over the budget ({elapsed:.0f} s)"
            say({"bench": "skipped", "what": name, "why": why})
            continue
        try:
            line = run()
        except Exception as e:  # Reported as a line: the remaining measurements still run.
            line = {"bench": "error", "what": name, "error": f"{type(e).__name__}: {e}"[:2000],
                    "where": traceback.format_exc().splitlines()[-3:]}
        line["elapsed_s"] = round(time.perf_counter() - start, 1)
        say(line)


if __name__ == "__main__":
    cli.run(main)
