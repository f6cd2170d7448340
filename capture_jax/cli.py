"""What the project's commands share: absl flags, one-sentence usage errors, quiet logs, and the
start of a multi-process run.

Every command (`main.py`, `python -m capture_jax.metrics`, `python -m capture_jax.convert`,
`python -m tfds_product1m.synthetic`, `bench/*.py`) takes absl flags (`--flag=value`, booleans as
`--flag` / `--noflag`, `--helpshort`) and reports a bad flag as one sentence on stderr. `main.py`
and the bench scripts define their flags on absl's global `flags.FLAGS`. Modules that the library
also imports (metrics, convert, synthetic) keep theirs in a `FLAGS = flags.FlagValues()` of their
own, so importing them defines no flag, and run with `run(main, FLAGS)`; tests run such a
command in-process with `call(module, args)`.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tempfile
import types
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags

# Exit status of a usage error (a bad flag) in the commands, as for most Unix tools; main.py's
# own status for every error it reports is 1.
USAGE_STATUS = 2


def last_line(error: BaseException) -> str:
    """The informative last line of a (possibly nested) flag or config error."""
    text = str(error).replace("\\n", "\n").replace("\\'", "'").strip()
    if len(text) > 1 and text[0] == text[-1] == "'":
        text = text[1:-1]
    line = text.splitlines()[-1].strip() if text else type(error).__name__
    if line.startswith("Did you mean"):
        line = f"unknown config field. {line}"
    return line.removeprefix("ValueError: ")


def usage_error(message: str, status: int = 1) -> NoReturn:
    """Ends the process with `error: MESSAGE (see --helpshort)` on stderr and exit `status`."""
    print(f"error: {message} (see --helpshort)", file=sys.stderr)
    raise SystemExit(status)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS,
                status: int = 1) -> list[str]:
    """absl's parser, with a bad flag, config variant or override reported as one sentence.

    `argv` starts with the program name; returns it and the arguments that are not flags.
    """
    try:
        return flag_values(list(argv))
    except (flags.Error, AttributeError, KeyError, ValueError) as e:
        usage_error(last_line(e), status)


def run(main: Callable[[list[str]], Any], command_flags: flags.FlagValues | None = None) -> None:
    """`app.run(main)` for a command: bad flags as one sentence (exit `USAGE_STATUS`).

    `command_flags` (a command's own FlagValues) join absl's global flags for the parse, so
    `--helpshort` lists them. `main`'s return value is for in-process callers (`call`); the
    command's exit status comes from what it raises.
    """
    def parse(argv: list[str]) -> list[str]:
        if command_flags is not None:
            flags.FLAGS.append_flag_values(command_flags)
            for name in command_flags:  # Listed by --helpshort, as the main module's flags are.
                flags.FLAGS.register_key_flag_for_module(sys.argv[0], command_flags[name])
        rest = parse_flags(argv, flags.FLAGS, USAGE_STATUS)
        if command_flags is not None:
            command_flags.mark_as_parsed()  # Its flags are the objects parsed just now.
        return rest

    def main_without_result(argv: list[str]) -> None:
        main(argv)

    app.run(main_without_result, flags_parser=parse)


def call(command: types.ModuleType, args: Sequence[str]) -> Any:
    """Runs the command of `command` (a module with `FLAGS` of its own and `main`) with the flags
    `args` (no program name) in this process, as its command line would (flags start from their
    defaults); `main`'s return value. For tests."""
    command.FLAGS.unparse_flags()
    return command.main(parse_flags([command.__name__, *args], command.FLAGS, USAGE_STATUS))


def no_arguments(argv: Sequence[str], status: int = USAGE_STATUS) -> None:
    """For a command that takes flags only: anything else in `argv` (after the program name) is
    a usage error (absl prints the command's help, then the error)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}", exitcode=status)


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
