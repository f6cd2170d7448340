"""Pretrains and evaluates CAPTURE: python main.py --config configs/capture.py:demo --workdir DIR."""

import os
import socket

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402  (first, so it can be kept off the accelerators)

tf.config.set_visible_devices([], "GPU")  # TF only feeds data; the accelerators belong to JAX.

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


def _env_count(name: str) -> str | None:
    """The integer environment variable `name` (a flag default), checked: one sentence if bad."""
    value = os.environ.get(name)
    if value is not None and not value.strip().isdigit():
        raise SystemExit(f"error: {name}={value!r} is not a non-negative integer: fix or unset it.")
    return value


_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"), "host:port of process 0, "
    "for multi-process runs on clusters JAX does not detect by itself (TPU pods, SLURM, Open MPI "
    "and Kubernetes are detected). Default: $JAX_COORDINATOR_ADDRESS.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", _env_count("JAX_NUM_PROCESSES"),
                                      "Processes in the run. Default: $JAX_NUM_PROCESSES.")
_PROCESS_ID = flags.DEFINE_integer("process_id", _env_count("JAX_PROCESS_ID"),
                                   "This process's index. Default: $JAX_PROCESS_ID.")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
    """Explicit flags (or their environment variables) > cluster auto-detection > a one-process
    run (pre-emption saves need `jax.distributed` even then)."""
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(v is not None for v in explicit):
        try:  # Auto-detection may complete what is missing (e.g. the process id on SLURM).
            jax.distributed.initialize(*explicit)
        except (ValueError, TypeError) as e:
            raise SystemExit(
                f"error: cannot start as one of several processes ({e}): give all of "
                "--coordinator_address, --num_processes and --process_id, or none of them where "
                "JAX detects the cluster (TPU pods, SLURM, Open MPI, Kubernetes).") from None
        return
    try:
        jax.distributed.initialize()
    except ValueError:  # No cluster detected: this machine alone.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=1, process_id=0)


def _parse_flags(argv):
    """absl's parser, with a bad flag, config variant or override reported as one sentence."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError) as e:
        raise SystemExit(f"error: {_last_line(e)} (see --helpshort)") from None


def _last_line(error: BaseException) -> str:
    """The informative last line of a (possibly nested) flag or config error."""
    text = str(error).replace("\\n", "\n").replace("\\'", "'").strip()
    if len(text) > 1 and text[0] == text[-1] == "'":
        text = text[1:-1]
    line = text.splitlines()[-1].strip() if text else type(error).__name__
    if line.startswith("Did you mean"):
        line = f"unknown config field. {line}"
    return line.removeprefix("ValueError: ")


class _QuietLibraries:
    """Drops INFO lines from Orbax, TFDS and JAX internals (hundreds per checkpoint)."""

    def filter(self, record) -> bool:
        noisy = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/")
        return record.levelno >= 30 or not any(part in record.pathname for part in noisy)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    _initialize_distributed()
    logging.info("JAX process %d/%d, %d devices (%s).", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind)
    run = train.evaluate_only if _MODE.value == "evaluate" else train.train_and_evaluate
    try:
        config = _CONFIG.value
        config.get("variant")  # ml_collections defers a config file's load error to first use.
    except OSError as e:
        raise SystemExit(f"error: cannot load --config: {_last_line(e)}") from None
    try:
        run(config, _WORKDIR.value)
    except train.USER_ERRORS as e:  # Missing data, bad config, broken checkpoint, NaN: one sentence.
        logging.vlog(1, "Traceback:", exc_info=True)
        raise SystemExit(f"error: {e} (--verbosity=1 shows the traceback)") from None


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
