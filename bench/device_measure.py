"""One measurement of bench/device_check.py, in a process of its own: the environment, our train
step at one setting, or the ranker. `python bench/device_measure.py --job JSON`; one JSON line per
measurement, flushed as it goes (bench/device_check.py says what each holds).

Imports JAX, Flax, Optax, ml_collections and absl, nothing of TensorFlow, TFDS, Orbax or clu.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time

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
flags.DEFINE_string("job", None, "The measurement as JSON: {kind: env | train | ranker, ...}.")


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
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            # What it must run without (an accelerator image may lack them): none imported.
            "imported_data_libraries": sorted({m.split(".")[0] for m in sys.modules} & {
                "tensorflow", "tensorflow_datasets", "orbax", "clu"})}


def train_lines(job: dict) -> None:
    """Our step at one setting (bench/train_throughput.py's measurement), then its profile."""
    variant, batch = job["variant"], job["batch"]
    dtype = "bfloat16" if jax.default_backend() == "gpu" or variant.startswith("paper") else None
    profile_dir, profile_steps = job.get("profile_dir"), job.get("profile_steps", 0)
    line = train_throughput.measure_step(
        variant, batch, job["steps"], dtype, job.get("remat", "none"), 0,
        job.get("attention", "auto"), profile_dir if profile_steps else None, profile_steps,
        overrides=job.get("overrides"))
    stats = jax.devices()[0].memory_stats() or {}
    line["peak_device_mib"] = (round(stats["peak_bytes_in_use"] / 2**20, 1)
                               if "peak_bytes_in_use" in stats else None)
    line["overrides"] = job.get("overrides") or {}
    say(line)
    if profile_dir and profile_steps:
        say({"bench": "profile", "what": f"{variant} batch {batch}",
             **profile_summary.summarize(profile_dir, profile_steps), "trace_dir": profile_dir})


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
    line = {"bench": "ranker", "method": method,
            **{key: v for key, v in stats.items() if key != "method"},
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
    job = json.loads(FLAGS.job)
    if job["kind"] == "env":
        say(env_line())
    elif job["kind"] == "train":
        train_lines(job)
    elif job["kind"] == "ranker":
        for size in job["sizes"]:
            for method in job["methods"]:
                say(ranker_line(size, job["queries"], job["dim"], 100, method))
    else:
        raise SystemExit(f"Unknown job kind {job['kind']!r}.")


if __name__ == "__main__":
    cli.run(main)
