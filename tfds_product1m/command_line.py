"""absl-flag plumbing shared by every command of the project: one-sentence usage errors, flag
parsing that reports a bad flag or config override as one line, and running a command in-process.

It lives in the dataset package because that is the lower layer: `tfds_product1m`'s commands
(`synthetic`, `download`) use it and import nothing from `capture_jax`, whose `cli` module
re-exports these names for the training-side commands. Modules that the library also imports keep
their flags in a `FLAGS = flags.FlagValues()` of their own, so importing them defines no flag, and
run with `run(main, FLAGS)`; tests run such a command in-process with `call(module, args)`.
"""

from __future__ import annotations

import sys
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
