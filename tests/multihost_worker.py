"""One process of tests/test_multihost.py: main.py's own entry point, with a record of what it did.

    python tests/multihost_worker.py RECORD.json [main.py flags ...]

Runs `main.main` exactly as `python main.py [flags]` would (same flag parsing, distributed
initialisation and error handling), and records for the test, in RECORD.json:
  process, pid  this process's `jax.process_index()` and their count; its OS process id;
  result        what `train.train_and_evaluate` / `train.evaluate_only` returned (losses, scores);
  read_ids      the ids of the training examples this process read from the TFRecords;
  written       every path this process opened for writing, created, renamed or removed, from
                Python's audit events (so files written through Python's `open`, `os` and
                `shutil`, which is everything but TensorFlow's and TensorStore's own writers).
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_written: list[str] = []


def _audit(event: str, args: tuple) -> None:
    """Collects the paths of writing file-system events (sys.addaudithook)."""
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if mode else bool((flags or 0) & _WRITE_FLAGS)
        if writes and isinstance(path, (str, bytes, os.PathLike)):
            _written.append(os.fsdecode(path))
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree"):
        _written.append(os.fsdecode(args[0]))
    elif event in ("os.rename", "shutil.copyfile", "shutil.move"):
        _written.append(os.fsdecode(args[1]))


def main() -> None:
    record_path = sys.argv.pop(1)
    sys.addaudithook(_audit)

    import jax
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from absl import app

    import main as capture_main  # Defines main.py's flags.
    from capture_jax import cli, input_pipeline, train

    read_ids: list[str] = []
    train_records = input_pipeline.train_records

    def recording_train_records(builder, split, *args, **kwargs):
        """The same dataset, noting each example's id as the pipeline pulls it."""
        features = builder.info.features
        decoders = {"image": tfds.decode.SkipDecoding()}

        def note(position, serialized):
            item_id = features.deserialize_example(serialized, decoders=decoders)["id"]
            noted = tf.py_function(lambda i: read_ids.append(i.numpy().decode()) or 0,
                                   [item_id], tf.int32)
            with tf.control_dependencies([noted]):
                return tf.identity(position), serialized

        return train_records(builder, split, *args, **kwargs).map(note)

    input_pipeline.train_records = recording_train_records

    def recorded(run):
        def wrapper(config, workdir, *args, **kwargs):
            result = run(config, workdir, *args, **kwargs)
            record = {"process": [jax.process_index(), jax.process_count()], "pid": os.getpid(),
                      "result": result, "read_ids": read_ids, "written": _written}
            with open(record_path, "w") as f:
                json.dump(record, f, default=str)
            return result
        return wrapper

    train.train_and_evaluate = recorded(train.train_and_evaluate)
    train.evaluate_only = recorded(train.evaluate_only)
    app.run(capture_main.main, argv=[os.path.join(REPO, "main.py"), *sys.argv[1:]],
            flags_parser=cli.parse_flags)


if __name__ == "__main__":
    main()
