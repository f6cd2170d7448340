"""What the project's commands share: absl flags, one-sentence usage errors, quiet logs, and the
start of a multi-process run.

Every command (`main.py`, `python -m capture_jax.metrics`, `python -m capture_jax.convert`,
`python -m tfds_product1m.synthetic`, `bench/*.py`) takes absl flags (`--flag=value`, booleans as
`--flag` / `--noflag`, `--helpshort`) and reports a bad flag as one sentence on stderr. The flag
plumbing itself (`run`, `call`, `usage_error`, ...) lives in `tfds_product1m.command_line`, the
lower layer, and is re-exported here; this module adds what only training-side commands need
(TensorFlow for data only, quiet library logs, `jax.distributed`).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tempfile

from tfds_product1m.command_line import (USAGE_STATUS, call, last_line,  # noqa: F401 (re-exported)
                                         no_arguments, parse_flags, run, usage_error)

# Native (C++) start-up lines of TensorFlow and XLA that say nothing a user can act on: a machine
# without an NVIDIA driver, oneDNN notices, CUDA plugin registrations.
_NATIVE_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|failed call to cuInit|"
    r"oneDNN custom operations|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|TF-TRT Warning|This TensorFlow binary is optimized")


@contextlib.contextmanager
def native_noise_filtered():
    """Runs the block with the process's stderr (file descriptor 2, where C++ libraries log) going
    to a temporary file, then writes back every line of it but the start-up noise above."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            sys.stderr.write("".join(line for line in text.splitlines(keepends=True)
                                     if not _NATIVE_NOISE.search(line)))
            sys.stderr.flush()


def import_tensorflow_for_data_only():
    """Imports TensorFlow quietly and hides the GPUs from it: it only feeds data, and would
    otherwise take accelerator memory that JAX preallocates. Call before JAX starts."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # oneDNN speeds up TF's matrix and convolution kernels, which the input pipeline does not run;
    # left on, it logs an ERROR-level notice about int64 ops on machines without AVX-512.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    with native_noise_filtered():
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    return tf


class QuietLibraries:
    """A log filter that drops INFO lines from Orbax, TFDS and JAX internals (hundreds per
    checkpoint): `logging.get_absl_handler().addFilter(QuietLibraries())`."""

    def filter(self, record) -> bool:
        noisy = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/")
        return record.levelno >= 30 or not any(part in record.pathname for part in noisy)


def env_count(name: str) -> str | None:
    """The integer environment variable `name` (a flag default), checked: one sentence if bad."""
    value = os.environ.get(name)
    if value is not None and not value.strip().isdigit():
        raise SystemExit(f"error: {name}={value!r} is not a non-negative integer: fix or unset it.")
    return value


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """`jax.distributed.initialize`: explicit values (flags, or their environment variables) >
    cluster auto-detection > a one-process run (pre-emption saves need `jax.distributed` even
    then)."""
    import jax  # Here, not at the top: the commands that never start JAX do not import it.

    explicit = (coordinator_address, num_processes, process_id)
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
