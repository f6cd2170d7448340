"""Pretrains and evaluates CAPTURE: python main.py --config configs/capture.py:demo --workdir DIR."""

import os

from capture_jax import cli

cli.import_tensorflow_for_data_only()  # First: TF feeds data; the accelerators belong to JAX.

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from capture_jax import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and variant, e.g. configs/capture.py:demo.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum(
    "mode", "train_and_evaluate", ["train_and_evaluate", "evaluate"],
    "Train (resuming from --workdir if possible) then evaluate, or only evaluate its latest checkpoint.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"), "host:port of process 0, "
    "for multi-process runs on clusters JAX does not detect by itself (TPU pods, SLURM, Open MPI "
    "and Kubernetes are detected). Default: $JAX_COORDINATOR_ADDRESS.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", cli.env_count("JAX_NUM_PROCESSES"),
                                      "Processes in the run. Default: $JAX_NUM_PROCESSES.")
_PROCESS_ID = flags.DEFINE_integer("process_id", cli.env_count("JAX_PROCESS_ID"),
                                   "This process's index. Default: $JAX_PROCESS_ID.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    cli.no_arguments(argv, status=1)
    logging.get_absl_handler().addFilter(cli.QuietLibraries())
    cli.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info("JAX process %d/%d, %d devices (%s).", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind)
    run = train.evaluate_only if _MODE.value == "evaluate" else train.train_and_evaluate
    try:
        config = _CONFIG.value
        config.get("variant")  # ml_collections defers a config file's load error to first use.
    except OSError as e:
        raise SystemExit(f"error: cannot load --config: {cli.last_line(e)}") from None
    try:
        run(config, _WORKDIR.value)
    except train.USER_ERRORS as e:  # Missing data, bad config, broken checkpoint, NaN: one sentence.
        logging.vlog(1, "Traceback:", exc_info=True)
        raise SystemExit(f"error: {e} (--verbosity=1 shows the traceback)") from None


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
