"""The real input pipeline's cost per example: TFDS `tfds_product1m` through
`input_pipeline.create_train_iterator` to host batches (decode, tokenise, mask, batch).

    taskset -c 0 python bench/input_rate.py [--variants paper,paper_pixels] [--batch 64]
        [--batches 40] [--repeats 3]

`paper` reads `synthetic_regions` (36 region features of 2048 per row, stored float16) and
`paper_pixels` reads `synthetic` (JPEGs decoded and resized to 224 px): the variants' own
pipelines on synthetic data of the real layout, built on first use. Per repeat, a fresh iterator,
two batches not timed (start-up, shuffle buffer), then `--batches` batches: wall-clock seconds and
the process's CPU seconds (user + system, every thread: `resource.getrusage`), so a machine
shared with other work still gives the cost: `examples_per_cpu_s` is what one host core feeds
when the pipeline has that core to itself. Pin it with `taskset -c 0` to measure one core (tf.data
then runs its threads there). One JSON line per variant: medians over the repeats, and each
repeat's numbers.
"""

import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402

from capture_jax import cli  # noqa: E402
from configs import capture as capture_configs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("variants", ["paper", "paper_pixels"], "Variants whose pipeline to measure.")
flags.DEFINE_integer("batch", 64, "Host batch size.")
flags.DEFINE_integer("batches", 40, "Timed batches per repeat.")
flags.DEFINE_integer("repeats", 3, "Repeats (medians count).")
flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's).")

SYNTHETIC = {"regions": "tfds_product1m/synthetic_regions", "pixels": "tfds_product1m/synthetic"}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(variant: str) -> dict:
    from capture_jax import input_pipeline, vocab  # TensorFlow: only here.

    config = capture_configs.get_config(variant)
    config.dataset.name = SYNTHETIC[config.model.visual.kind]
    config.dataset.data_dir = FLAGS.data_dir
    config.global_batch_size = FLAGS.batch
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        builder = input_pipeline.get_builder(config)
        tokenizer = vocab.load_tokenizer(config, workdir, builder)
        config.model.vocab_size = tokenizer.vocab_size
        for _ in range(FLAGS.repeats):
            iterator = input_pipeline.create_train_iterator(config, builder, tokenizer)
            for _ in range(2):
                batch = next(iterator)
            wall, cpu = time.perf_counter(), cpu_seconds()
            for _ in range(FLAGS.batches):
                batch = next(iterator)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            examples = FLAGS.batches * FLAGS.batch
            runs.append({"examples_per_s": examples / wall, "examples_per_cpu_s": examples / cpu,
                         "cpu_ms_per_example": 1000 * cpu / examples})
            del iterator
    median = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    return {"bench": "input_rate", "variant": variant, "dataset": config.dataset.name,
            "rows": builder.info.splits["train"].num_examples, "batch": FLAGS.batch,
            "batches": FLAGS.batches, "repeats": FLAGS.repeats,
            "shapes": {k: list(v.shape) for k, v in batch.items()},
            "dtypes": {k: str(v.dtype) for k, v in batch.items()},
            "cpus_allowed": len(os.sched_getaffinity(0)), **median,
            "runs": [{k: round(v, 2) for k, v in r.items()} for r in runs]}


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    logging.set_verbosity(logging.WARNING)
    for variant in FLAGS.variants:
        print(json.dumps(measure(variant)), flush=True)


if __name__ == "__main__":
    cli.run(main)
