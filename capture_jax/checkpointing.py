"""Orbax checkpoints of a run, and where a run starts from: resume > `init_from` > scratch.

Layout: `workdir/checkpoints/<step>/` holds three items:
  model  the model's parameters (an `nnx.State`), restorable on any mesh;
  opt    the optimiser state (step counter, Adam moments);
  meta   JSON: step, config fingerprint, what the run started from.
A weights-only checkpoint (`init_from` sources, converted reference weights) has `model` and
`meta` only. Restores always go onto an abstract target that carries the new run's shardings, so
a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import logging as std_logging
import os
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


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_model: Any,
    abstract_opt: Any | None = None,
) -> dict[str, Any]:
    """Restores `model` (and `opt` if a target is given) and `meta` of `step`."""
    items = {"model": ocp.args.StandardRestore(abstract_model), "meta": ocp.args.JsonRestore()}
    if abstract_opt is not None:
        items["opt"] = ocp.args.StandardRestore(abstract_opt)
    try:
        return dict(manager.restore(step, args=ocp.args.Composite(**items)))
    except Exception as e:  # Orbax raises many types for truncated or mismatched files.
        raise CheckpointError(
            f"The checkpoint of step {step} in {manager.directory} cannot be restored "
            f"({type(e).__name__}: {str(e)[:300]}). Delete that step's directory to resume from "
            "an earlier checkpoint, or start in a new --workdir."
        ) from e


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
        restored = restore(manager, step, abstract_model)
    logging.info("Initialised the model from %s (step %d; weights only).", directory, step)
    return restored["model"], step
