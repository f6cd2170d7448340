"""Orbax checkpoints of a run, and where a run starts from: resume > `init_from` > scratch.

Layout: `workdir/checkpoints/<step>/` holds three items:
  model  the model's parameters (an `nnx.State`), restorable on any mesh;
  opt    the optimiser state (step counter, Adam moments);
  meta   JSON: step, config fingerprint, what the run started from.
A weights-only checkpoint (`init_from` sources, converted reference weights) has `model` and
`meta` only. Restores always go onto an abstract target that carries the new run's shardings, so
a checkpoint written on one mesh restores onto another.

A run resumes from the latest step, or from `config.restore_step`. A step that cannot be read is
reported in one sentence naming its directory, the item and the exact way on (`restore_step` of
the previous step); when a run goes back to an earlier step, the later step directories are moved
aside to `checkpoints/superseded-<step>-<time>` (never deleted), so those steps can be saved again.
"""

from __future__ import annotations

import gc
import logging as std_logging
import os
import sys
import time
import types
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = "checkpoints"

# Orbax splits every replicated array across its replicas for saving, compiling one slicing program
# per array shape (about 150 for this model, seconds on every first save). Arrays under 8 MiB
# (biases, LayerNorms, most small matrices) are written whole by one replica instead.
# Orbax warns that the default handler is replaced, which is the intent. (The absl logger's level
# is touched, not absl's verbosity flag, so --verbosity keeps working.)
_absl_logger = logging.get_absl_logger()
_level = _absl_logger.level
_absl_logger.setLevel(std_logging.ERROR)
ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=8 << 20),
    override=True,
)
_absl_logger.setLevel(_level)


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def create_manager(workdir: str, *, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    """An async manager over `workdir/checkpoints`; the caller decides when to save."""
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True
        ),
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    model_state: Any,
    meta: Mapping[str, Any],
    opt_state: Any | None = None,
) -> None:
    """Starts an async save of `step` (every process calls it: the write is collective)."""
    items = {"model": ocp.args.StandardSave(model_state), "meta": ocp.args.JsonSave(dict(meta))}
    if opt_state is not None:
        items["opt"] = ocp.args.StandardSave(opt_state)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def abstract_target(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `state` (concrete or abstract) that carry `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def step_to_restore(manager: ocp.CheckpointManager, restore_step: int) -> int | None:
    """The step a run starts from: the latest (`restore_step` -1; None if there is none), step
    `restore_step` (which must exist), or None for 0 (start again from step 0)."""
    if restore_step < 0:
        return manager.latest_step()
    if restore_step == 0:
        return None
    steps = manager.all_steps()
    if restore_step not in steps:
        raise ValueError(
            f"config.restore_step={restore_step} is not a checkpoint in {manager.directory} "
            f"(it has steps {list(steps)}): give one of them, 0 to start again from step 0, or -1 "
            "for the latest.")
    return restore_step


def went_back_to(manager: ocp.CheckpointManager, step: int) -> int | None:
    """The `restore_step` that the run which saved `step` had gone back to (its meta's
    `went_back_to`), or None: not recorded, or `meta` unreadable (the restore then reports it)."""
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # A damaged step: its full restore names the damage.
        return None
    return meta.get("went_back_to")


def set_aside_later_steps(manager: ocp.CheckpointManager, step: int) -> list[int]:
    """Moves the step directories after `step` (a run going back to `step`) to
    `superseded-<step>-<time>` beside them, so Orbax can save those steps again; returns those
    steps. Process 0 moves them (the directory is shared); every process then reloads its manager.
    """
    later = [s for s in manager.all_steps() if s > step]
    if later and jax.process_index() == 0:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for s in later:
            source = os.path.join(manager.directory, str(s))
            target = os.path.join(manager.directory, f"superseded-{s}-{stamp}")
            os.rename(source, target)
            logging.warning("Resuming from step %d: moved the later step %d aside to %s (not "
                            "deleted; delete it yourself once it is not needed).", step, s, target)
    if later:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("capture_jax: later checkpoints set aside")
        manager.reload()
    return later


# What a damaged checkpoint's error tells the user to do, by where the checkpoint is used.
_WAY_ON = {
    "resume": ("rerun with --config.restore_step={prev} to resume from the previous checkpoint "
               "(step {prev}; step {step} is then moved aside, not deleted)",
               "rerun with --config.restore_step=0 to start again from step 0 (step {step} is "
               "then moved aside, not deleted), or use a new --workdir"),
    "evaluate": ("rerun with --config.restore_step={prev} to evaluate the previous checkpoint "
                 "(step {prev})",
                 "there is no earlier checkpoint to evaluate"),
    "weights": ("point config.init_from.checkpoint at another checkpoint, or move {step_dir} "
                "away to use step {prev}",
                "point config.init_from.checkpoint at another checkpoint"),
}


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_model: Any,
    abstract_opt: Any | None = None,
    *,
    purpose: str = "resume",
) -> dict[str, Any]:
    """Restores `model` (and `opt` if a target is given) and `meta` of `step`.

    A step that cannot be read raises `CheckpointError`: one sentence naming its directory, the
    item that fails, and the way on for `purpose` ("resume", "evaluate" or "weights").
    """
    items = {"model": ocp.args.StandardRestore(abstract_model), "meta": ocp.args.JsonRestore()}
    if abstract_opt is not None:
        items["opt"] = ocp.args.StandardRestore(abstract_opt)
    _abandoned_reads.install()
    try:
        return dict(manager.restore(step, args=ocp.args.Composite(**items)))
    except Exception as e:  # Orbax raises many types for truncated or mismatched files.
        _abandoned_reads.after_failure = True
        message = _damaged(manager, step, items, e, purpose)
        gc.collect()  # Orbax's other reads of that step, abandoned, are closed now.
        raise CheckpointError(message) from e


class _AbandonedReads(std_logging.Filter):
    """Sends to the DEBUG log what Orbax's abandoned reads print after a failed restore.

    When one array of a step cannot be read, Orbax gives up on the step while its other reads are
    in flight. Those finish later onto a closed event loop ("RuntimeError: Event loop is closed",
    from TensorStore's callback threads), are collected unfinished ("Exception ignored in:
    <coroutine ...>" with a page of TensorStore spec each), or are logged by asyncio ("Task
    exception was never retrieved"): hundreds of lines that repeat the one failure `restore`
    reports in a sentence. Anything else still reaches the previous hook and asyncio's log.
    """

    def __init__(self):
        super().__init__()
        self.after_failure = False  # Set once a restore of this process has failed.
        self.previous_hook = None

    def install(self) -> None:
        if self.previous_hook is None:
            self.previous_hook = sys.unraisablehook
            sys.unraisablehook = self.unraisable_hook
            std_logging.getLogger("asyncio").addFilter(self)
            warnings.filterwarnings(  # Collected before it ever ran: the same abandoned read.
                "ignore", message="coroutine '_read_array_index_and_device_put' was never awaited")

    def unraisable_hook(self, unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        orbax_read = (isinstance(unraisable.object, types.CoroutineType) and code is not None
                      and f"{os.sep}orbax{os.sep}" in code.co_filename)
        closed_loop = (unraisable.object is None and unraisable.exc_type is RuntimeError
                       and str(unraisable.exc_value) == "Event loop is closed")
        if orbax_read or closed_loop:
            logging.debug("An abandoned checkpoint read failed too: %s", unraisable.exc_value)
        else:
            self.previous_hook(unraisable)

    def filter(self, record: std_logging.LogRecord) -> bool:
        if self.after_failure and "exception was never retrieved" in str(record.msg):
            logging.debug("An abandoned checkpoint read failed too: %s", record.getMessage()[:200])
            return False
        return True


_abandoned_reads = _AbandonedReads()


def _damaged(manager, step: int, items: dict, error: Exception, purpose: str) -> str:
    """The one-sentence report of a step that cannot be restored: which item, and what to do."""
    step_dir = os.path.join(manager.directory, str(step))
    bad, cause = None, error
    for name in ("meta", "model", "opt"):  # Each item alone, to name the one that fails.
        if name in items:
            try:
                manager.restore(step, args=ocp.args.Composite(**{name: items[name]}))
            except Exception as e:
                bad, cause = name, e
                break
    while cause.__cause__ is not None:  # Orbax wraps TensorStore's error, which says what broke.
        cause = cause.__cause__
    what = f"its '{bad}' item is" if bad else f"its items {sorted(items)} are"
    reason = " ".join((str(cause).strip().splitlines() or [""])[0].split())
    reason = f"{type(cause).__name__}: {reason[:160]}{'...' if len(reason) > 160 else ''}"
    earlier = [s for s in manager.all_steps() if s < step]
    with_prev, without = _WAY_ON[purpose]
    way_on = (with_prev if earlier else without).format(
        prev=max(earlier, default=0), step=step, step_dir=step_dir)
    return (f"The checkpoint of step {step} ({step_dir}) cannot be read: {what} damaged or "
            f"incomplete ({reason}); {way_on}.")


def resolve_weights_dir(path: str) -> str:
    """A checkpoints directory from `init_from.checkpoint`: a workdir or its `checkpoints/`."""
    path = os.path.abspath(os.path.expanduser(path))
    nested = os.path.join(path, CHECKPOINT_DIR)
    if os.path.isdir(nested):
        return nested
    if os.path.isdir(path):
        return path
    raise FileNotFoundError(
        f"config.init_from.checkpoint={path} does not exist: give a previous run's --workdir "
        "(or its checkpoints/ directory), or a directory written by `python -m capture_jax.convert`."
    )


def restore_weights(path: str, abstract_model: Any) -> tuple[Any, int]:
    """Model parameters only, from the latest step under `path`. Returns (state, source step)."""
    directory = resolve_weights_dir(path)
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False,
                               read_only=True)) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"No checkpoint in {directory} (config.init_from.checkpoint): it must contain "
                "numbered step directories written by this project."
            )
        restored = restore(manager, step, abstract_model, purpose="weights")
    logging.info("Initialised the model from %s (step %d; weights only).", directory, step)
    return restored["model"], step
