"""Dataset build throughput: writing synthetic Product1M raw files, then building `full` from them.

    python bench/build_dataset.py [--train 1500 --image_size 256 --repeats 3]

Prints one JSON line: rows/s for the generator, for the TFDS build of the `full` config (parse,
image check/clean-up, TFRecord writing) and end to end, each the median over `--repeats` runs in
fresh directories.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow_datasets as tfds  # noqa: E402
from absl import flags, logging  # noqa: E402

from tfds_product1m import tfds_product1m_dataset_builder  # noqa: E402,F401  (registers the builder)
from capture_jax import cli  # noqa: E402
from tfds_product1m import synthetic  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("products", 60, "Products in the catalogue.")
flags.DEFINE_integer("train", 1500, "Train rows.")
flags.DEFINE_integer("gallery_per_product", 4, "Gallery rows per product.")
flags.DEFINE_integer("queries", 100, "Dev and test rows each.")
flags.DEFINE_integer("image_size", 256, "Side of the generated images in pixels.")
flags.DEFINE_integer("repeats", 3, "Runs in fresh directories; the medians are printed.")


def _run_once(spec: synthetic.SyntheticSpec) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        raw, data = os.path.join(tmp, "raw"), os.path.join(tmp, "data")
        start = time.perf_counter()
        synthetic.write_product1m(raw, spec)
        generated = time.perf_counter()
        builder = tfds.builder("tfds_product1m/full", data_dir=data)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=raw))
        built = time.perf_counter()
        stats = builder.info.metadata["build_stats"]
        rows_read = sum(s["rows_read"] for s in stats.values())
        written = sum(s["written"] for s in stats.values())
    return {
        "rows": rows_read,
        "written": written,
        "generate_s": generated - start,
        "build_s": built - generated,
    }


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    logging.set_verbosity(logging.WARNING)
    spec = synthetic.SyntheticSpec(
        num_products=FLAGS.products,
        num_train=FLAGS.train,
        gallery_per_product=FLAGS.gallery_per_product,
        num_dev=FLAGS.queries,
        num_test=FLAGS.queries,
        image_size=FLAGS.image_size,
    )
    runs = [_run_once(spec) for _ in range(FLAGS.repeats)]
    rows = runs[0]["rows"]
    gen_s = statistics.median(r["generate_s"] for r in runs)
    build_s = statistics.median(r["build_s"] for r in runs)
    total_s = statistics.median(r["generate_s"] + r["build_s"] for r in runs)
    print(json.dumps({
        "bench": "build_dataset",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "image_size": FLAGS.image_size,
        "rows": rows,
        "written": runs[0]["written"],
        "repeats": FLAGS.repeats,
        "generate_rows_per_s": round(rows / gen_s, 1),
        "build_rows_per_s": round(rows / build_s, 1),
        "end_to_end_rows_per_s": round(rows / total_s, 1),
        "all_runs_s": [[round(r["generate_s"], 2), round(r["build_s"], 2)] for r in runs],
    }))


if __name__ == "__main__":
    cli.run(main)
