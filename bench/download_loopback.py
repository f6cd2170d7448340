"""Downloader throughput against a loopback HTTP server: no network, so this measures the
downloader's own cost (img2dataset start-up, requests, moving images into place), an upper bound
for a real download, which the image hosts and the network limit.

    python bench/download_loopback.py [--images 2000 --image_size 800 --processes 2 --threads 32]

Prints one JSON line: images/s and MB/s of the whole `download()` (one pass, all answers 200),
the median over `--repeats` runs into fresh directories, and the mean image size.
"""

from __future__ import annotations

import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402
from PIL import Image  # noqa: E402

from capture_jax import cli  # noqa: E402
from loopback_images import ImageServer  # noqa: E402
from tfds_product1m import download  # noqa: E402
from tfds_product1m import product1m_files as files  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 2000, "Rows (one image each), all in the train split.")
flags.DEFINE_integer("image_size", 800, "Side of the served JPEGs (Product1M's are ~800 px).")
flags.DEFINE_integer("processes", 2, "img2dataset processes.")
flags.DEFINE_integer("threads", 32, "Threads per process.")
flags.DEFINE_integer("repeats", 3, "Runs into fresh directories; the median is printed.")


def _images(n: int, size: int) -> dict[str, bytes]:
    """`n` distinct noisy JPEGs (noise: so sizes are like photos', not like flat colour)."""
    rnd = random.Random(0)
    tiles = []
    for _ in range(8):
        im = Image.effect_noise((size, size), 40).convert("RGB")
        im = Image.blend(im, Image.new("RGB", im.size, tuple(rnd.randrange(256)
                                                            for _ in range(3))), 0.6)
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=90)
        tiles.append(out.getvalue())
    # Distinct ids; bytes reused from the tiles (the server's cost is not what is measured).
    return {f"6{i:011d}": tiles[i % len(tiles)] for i in range(n)}


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    logging.set_verbosity(logging.WARNING)
    images = _images(FLAGS.images, FLAGS.image_size)
    options = download.Options(processes=FLAGS.processes, threads=FLAGS.threads, retries=0)
    runs = []
    with ImageServer(images) as server:
        for _ in range(FLAGS.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                official = os.path.join(tmp, "official")
                os.makedirs(official)
                with open(os.path.join(official, files.split_filename("train")), "w") as f:
                    for item_id in images:
                        f.write(f"{item_id}#####标题#####{server.url('a', item_id)}#####"
                                f"{server.url('b', item_id)}\n")
                start = time.perf_counter()
                report = download.download(official, os.path.join(tmp, "out"), ["train"],
                                           options)
                runs.append(time.perf_counter() - start)
                assert report["total"]["saved"] == len(images), report["total"]
    seconds = statistics.median(runs)
    mean_bytes = sum(len(b) for b in images.values()) / len(images)
    print(json.dumps({
        "bench": "download_loopback",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "images": len(images), "image_size": FLAGS.image_size,
        "mean_image_kb": round(mean_bytes / 1024, 1),
        "processes": FLAGS.processes, "threads": FLAGS.threads, "repeats": FLAGS.repeats,
        "images_per_s": round(len(images) / seconds, 1),
        "mb_per_s": round(len(images) * mean_bytes / seconds / 2**20, 1),
        "all_runs_s": [round(r, 2) for r in runs],
    }))


if __name__ == "__main__":
    cli.run(main)
