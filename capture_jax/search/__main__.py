"""Index a catalogue with a trained run, query it, or serve a page that queries it.

  python -m capture_jax.search index --workdir RUN --out INDEX [--split gallery]
      [--catalogue DIR [--images DIR]] [--kinds prefusion,joint] [--step N] [--approximate hnsw]
  python -m capture_jax.search query --index INDEX --image PATH --title TEXT [--k 10]
      [--boxes "x1,y1,x2,y2;x1,y1,x2,y2"] [--json]
  python -m capture_jax.search serve --index INDEX [--port 8000] [--host 127.0.0.1]

A mistake (a bad picture, title or box, a missing checkpoint, an index made by another model)
ends with one sentence on stderr, exit 1; a bad flag, exit 2.
"""

from __future__ import annotations

import json
import logging as std_logging
import sys
from collections.abc import Sequence

from capture_jax import cli

cli.import_tensorflow_for_data_only()  # First: TF reads pictures; the accelerators are JAX's.

from absl import flags, logging  # noqa: E402

from capture_jax import checkpointing  # noqa: E402
from capture_jax.search import catalogue, run  # noqa: E402
from capture_jax.search.inputs import QueryError  # noqa: E402

COMMANDS = ("index", "query", "serve")
FLAGS = flags.FlagValues()
# index
flags.DEFINE_string("workdir", None, "index: the training run (config.json, vocab, "
                    "checkpoints). query/serve: another run than the index's own (checked).",
                    flag_values=FLAGS)
flags.DEFINE_integer("step", -1, "index: the checkpoint step (-1: the latest).",
                     flag_values=FLAGS)
flags.DEFINE_string("out", None, "index: the index directory to write.", flag_values=FLAGS)
flags.DEFINE_string("split", "gallery", "index: the built split (or, with --catalogue, the "
                    "official split file) to index.", flag_values=FLAGS)
flags.DEFINE_string("catalogue", None, "index: a directory with the official split file "
                    "(product1m_<split>_ossurl_v2.txt) instead of the run's built dataset.",
                    flag_values=FLAGS)
flags.DEFINE_string("images", None, "index: where <id>.jpg of --catalogue are (default: "
                    "--catalogue).", flag_values=FLAGS)
flags.DEFINE_integer("max_image_side", 256, "index --catalogue: the longer side images are "
                     "scaled down to, as the dataset build did.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "index: TFDS data_dir of the built split (default: the "
                    "run's).", flag_values=FLAGS)
flags.DEFINE_list("kinds", [], "index: feature kinds to store (default: the run's headline "
                  "kind; `all`).", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 0, "index: rows per embedding batch (0: the evaluator's).",
                     flag_values=FLAGS)
flags.DEFINE_bool("thumbnails", True, "index: store thumbnails for the page.", flag_values=FLAGS)
flags.DEFINE_enum("approximate", None, list(catalogue.APPROXIMATE), "index: also build a faiss "
                  "approximate index; query/serve: search it instead of the exact ranker.",
                  flag_values=FLAGS)
# query
flags.DEFINE_string("index", None, "query/serve: an index directory.", flag_values=FLAGS)
flags.DEFINE_string("image", None, "query: the picture.", flag_values=FLAGS)
flags.DEFINE_string("title", None, "query: the product title.", flag_values=FLAGS)
flags.DEFINE_integer("k", 10, "query: items to list.", flag_values=FLAGS)
flags.DEFINE_string("boxes", None, "query: products in the picture, pixel corners "
                    "x1,y1,x2,y2;x1,y1,x2,y2 (each box with the title is a query; the lists "
                    "merge, each item at its best score).", flag_values=FLAGS)
flags.DEFINE_string("kind", None, "query/serve: feature kind (default: the index's first).",
                    flag_values=FLAGS)
flags.DEFINE_bool("json", False, "query: print JSON.", flag_values=FLAGS)
# serve
flags.DEFINE_string("host", "127.0.0.1", "serve: address to listen on.", flag_values=FLAGS)
flags.DEFINE_integer("port", 8000, "serve: port.", flag_values=FLAGS)
flags.DEFINE_integer("max_batch", 8, "serve: query rows embedded and ranked together.",
                     flag_values=FLAGS)
flags.DEFINE_float("batch_wait_ms", 5.0, "serve: how long a request waits for others to share "
                   "its batch.", flag_values=FLAGS)

USER_ERRORS = (ValueError, FileNotFoundError, checkpointing.CheckpointError)


def _require(*names: str) -> None:
    missing = [f"--{n}" for n in names if FLAGS[n].value is None]
    if missing:
        cli.usage_error(f"{sys.argv[1] if len(sys.argv) > 1 else 'this command'} needs "
                        f"{', '.join(missing)}", cli.USAGE_STATUS)


def index() -> dict:
    _require("workdir", "out")
    from tqdm import tqdm

    model = run.Model(FLAGS.workdir, FLAGS.step)
    kinds = run.feature_kinds(FLAGS.kinds, model.config)
    bar = tqdm(unit="batch" if not FLAGS.catalogue else "row", desc="embedding",
               file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    if FLAGS.catalogue:
        made = catalogue.from_directory(model, FLAGS.catalogue, FLAGS.split, FLAGS.images,
                                        FLAGS.max_image_side, kinds, progress, FLAGS.thumbnails)
    else:
        batch = FLAGS.batch_size or model.config.evals.retrieval.batch_size
        made = catalogue.from_split(model, FLAGS.split, FLAGS.data_dir, batch, kinds, progress,
                                    FLAGS.thumbnails)
    bar.close()
    manifest = catalogue.write(FLAGS.out, model, kinds, *made, approximate=FLAGS.approximate)
    print(f"Indexed {manifest['count']} items ({', '.join(kinds)}) of {manifest['source']} with "
          f"{manifest['variant']} step {manifest['step']} into {FLAGS.out}.")
    return manifest


def query() -> list[dict]:
    _require("index", "image", "title")
    from capture_jax.search import searcher

    try:
        with open(FLAGS.image, "rb") as f:
            image = f.read()
    except OSError as e:
        raise QueryError(f"Cannot read the picture {FLAGS.image}: {e.strerror}.") from None
    s = searcher.Searcher(FLAGS.index, workdir=FLAGS.workdir,
                          step=FLAGS.step if FLAGS.step >= 0 else None,
                          approximate=bool(FLAGS.approximate), batch_size=1)
    [hits] = s.search([s.prepare(image, FLAGS.title, FLAGS.boxes)], FLAGS.k, FLAGS.kind)
    if FLAGS.json:
        print(json.dumps(hits, ensure_ascii=False, indent=1))
    else:
        for h in hits:
            box = f"  (box {h['box']})" if h["box"] else ""
            print(f"{h['rank']:>3}  {h['score']:9.4f}  {h['id']}  {h['title']}{box}")
    return hits


def serve() -> None:
    _require("index")
    from capture_jax.search import searcher, server

    s = searcher.Searcher(FLAGS.index, workdir=FLAGS.workdir,
                          step=FLAGS.step if FLAGS.step >= 0 else None,
                          approximate=bool(FLAGS.approximate), batch_size=FLAGS.max_batch)
    s.check_kind(FLAGS.kind)
    server.serve(s, FLAGS.host, FLAGS.port, FLAGS.max_batch, FLAGS.kind,
                 FLAGS.batch_wait_ms)


def main(argv: Sequence[str]):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        cli.usage_error(f"give one command, {' | '.join(COMMANDS)}, then its flags (got "
                        f"{' '.join(argv[1:]) or 'none'})", cli.USAGE_STATUS)
    logging.get_absl_handler().addFilter(cli.QuietLibraries())
    std_logging.getLogger("faiss.loader").setLevel(std_logging.WARNING)  # Which build it loads.
    try:
        return {"index": index, "query": query, "serve": serve}[argv[1]]()
    except USER_ERRORS as e:
        logging.vlog(1, "Traceback:", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    cli.run(main, FLAGS)
