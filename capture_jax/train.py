"""Pretraining CAPTURE: `train_and_evaluate(config, workdir)`, read top to bottom.

1. Mesh and logical sharding rules from the config; the vocabulary fixes the model's vocab size.
2. Model and optimiser created directly sharded (`jax.jit` with `out_shardings`), or restored:
   latest checkpoint in the workdir > `config.init_from` (weights only) > from scratch.
3. A jitted `train_step(model_state, opt_state, batch, step)` with explicit shardings and donated
   state. Dropout keys are `fold_in(seed, step)` and the data position is derived from the step,
   so a resumed run replays exactly what an uninterrupted run would have done.
4. Periodic actions, all decided by `is_due`: metrics to TensorBoard and the log, Orbax checkpoints
   (async), retrieval evaluation. SIGTERM (pre-emption) saves the current step and returns.
   A non-finite loss stops the run before anything is saved.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from capture_jax import checkpointing, convert, input_pipeline, losses, optim, sharding
from capture_jax.models import capture, cost


# Errors a user causes and can fix (missing data, bad config or flags, broken checkpoint,
# diverged run); main.py reports them as one sentence instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, checkpointing.CheckpointError, FloatingPointError)


def is_due(step: int, every: int, total: int | None = None) -> bool:
    """Whether a periodic action runs after `step` completed steps: every `every`, and at the end."""
    if step <= 0:
        return False
    return (every > 0 and step % every == 0) or (total is not None and step == total)


@dataclasses.dataclass
class TrainState:
    """Everything a step needs besides the batch: NNX graph definitions, states and shardings."""

    model_def: Any
    opt_def: Any
    model: Any  # nnx.State of the parameters.
    opt: Any  # nnx.State of the optimiser (step counter, moments).
    model_sharding: Any
    opt_sharding: Any


def _model_and_optimizer(config: ml_collections.ConfigDict, tx: optax.GradientTransformation):
    model = capture.CaptureModel(config.model, rngs=nnx.Rngs(config.seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def abstract_train_state(config, mesh, rules, tx) -> TrainState:
    """Graph definitions, shardings and abstract (shape-only) states: nothing is allocated.

    Must run inside `jax.set_mesh(mesh)` and `nnx.logical_axis_rules(rules)`.
    """
    abstract_model, abstract_opt = nnx.eval_shape(lambda: _model_and_optimizer(config, tx))
    model_def, abstract_model_state = nnx.split(abstract_model)
    opt_def, abstract_opt_state = nnx.split(abstract_opt)
    model_sh = sharding.state_shardings(abstract_model_state, mesh, rules)
    opt_sh = sharding.state_shardings(abstract_opt_state, mesh, rules)
    _check_divisible(abstract_model_state, model_sh, mesh, config.sharding_rules)
    return TrainState(model_def, opt_def, abstract_model_state, abstract_opt_state, model_sh, opt_sh)


def create_train_state(config, mesh, rules, tx) -> TrainState:
    """Parameters and optimiser state initialised directly sharded (never on one device)."""
    state = abstract_train_state(config, mesh, rules, tx)

    def init():
        model, opt = _model_and_optimizer(config, tx)
        return nnx.state(model), nnx.state(opt)

    state.model, state.opt = jax.jit(init, out_shardings=(state.model_sharding,
                                                          state.opt_sharding))()
    return state


def make_train_step(config, state: TrainState, batch_sharding: NamedSharding, mesh):
    """The jitted step: forward, losses, gradients, optimiser update; returns scalar metrics."""
    root_key = jax.random.key(config.seed)
    schedule = optim.learning_rate_schedule(config)
    accum = max(config.optim.grad_accum_steps, 1)

    def train_step(model_state, opt_state, batch, step):
        model = nnx.merge(state.model_def, model_state)
        opt = nnx.merge(state.opt_def, opt_state)
        dropout_key = jax.random.fold_in(root_key, step)

        def loss_fn(model):
            outputs = model(batch, train=True, dropout_key=dropout_key)
            return losses.compute_losses(outputs, batch, config, step // accum)

        (loss, parts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        metrics = {"loss": loss, **{f"loss_{k}": v for k, v in parts.items()}}
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["param_norm"] = optax.global_norm(nnx.state(model, nnx.Param))
        metrics["learning_rate"] = schedule(step // accum)
        return nnx.state(model), nnx.state(opt), metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(
        train_step,
        in_shardings=(state.model_sharding, state.opt_sharding, batch_sharding, replicated),
        out_shardings=(state.model_sharding, state.opt_sharding, replicated),
        donate_argnums=(0, 1),
    )


def _check_config(config: ml_collections.ConfigDict, mesh) -> None:
    """Mistakes a user can make in a config, each as one sentence."""
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.global_batch_size % batch_shards:
        raise ValueError(
            f"global_batch_size {config.global_batch_size} does not divide over the "
            f"{batch_shards} data x fsdp devices of mesh {dict(mesh.shape)}: make it a multiple of "
            f"{batch_shards} (--config.global_batch_size) or change --config.mesh."
        )


def _with_vocab_size(config: ml_collections.ConfigDict, vocab_size: int):
    """A copy of `config` whose embedding table fits the tokenizer's vocabulary.

    The table is padded to a multiple of `config.vocab_pad_multiple` rows (bert-base-chinese's
    21,128 already is a multiple of 8) so tensor parallelism can split it; the tokenizer never
    produces the padding ids. The size does not depend on the mesh, so checkpoints move freely.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    multiple = max(config.vocab_pad_multiple, 1)
    padded = -(-vocab_size // multiple) * multiple
    if config.model.vocab_size != padded:
        logging.info("Model vocab_size %d -> %d (the tokenizer's %d, padded to a multiple of %d).",
                     config.model.vocab_size, padded, vocab_size, multiple)
        config.model.vocab_size = padded
    return config


def _check_divisible(abstract_state, shardings, mesh, rules_name: str) -> None:
    """Every sharded parameter dimension must split evenly over its mesh axes."""
    for (path, value), (_, spec_holder) in zip(nnx.to_flat_state(abstract_state),
                                               nnx.to_flat_state(shardings)):
        spec = spec_holder.get_value().spec
        for dim, axes in zip(value.shape, spec):
            ways = 1
            for axis in (axes,) if isinstance(axes, str) else (axes or ()):
                ways *= mesh.shape[axis]
            if dim % ways:
                raise ValueError(
                    f"Parameter {'/'.join(map(str, path))} of shape {value.shape} cannot be split "
                    f"{ways} ways ({spec}) under sharding rules '{rules_name}' on mesh "
                    f"{dict(mesh.shape)}: use model sizes divisible by the mesh axes, or a "
                    "smaller model/fsdp axis.")


def restore_or_initialize(config, workdir, mesh, rules, tx, manager):
    """Start-up order: latest checkpoint in workdir > config.init_from > from scratch."""
    latest = manager.latest_step()
    if latest is not None:  # Restored straight onto the shardings: no initialisation first.
        state = abstract_train_state(config, mesh, rules, tx)
        restored = checkpointing.restore(
            manager, latest,
            checkpointing.abstract_target(state.model, state.model_sharding),
            checkpointing.abstract_target(state.opt, state.opt_sharding))
        state.model, state.opt = restored["model"], restored["opt"]
        logging.info("Resumed from %s at step %d.", manager.directory, latest)
        return state, latest, f"resumed at step {latest}"
    state = create_train_state(config, mesh, rules, tx)
    if config.init_from.checkpoint:
        state.model, _ = checkpointing.restore_weights(
            config.init_from.checkpoint,
            checkpointing.abstract_target(state.model, state.model_sharding))
        return state, 0, f"weights from {config.init_from.checkpoint}"
    if config.init_from.bert:
        state.model, _ = convert.load_bert_weights(state.model, config.init_from.bert, config.model)
        return state, 0, f"text stream from BERT {config.init_from.bert}"
    return state, 0, "from scratch"


def _resolve_init(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config`; a BERT start also brings its vocabulary."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.init_from.checkpoint and config.init_from.bert:
        raise ValueError("Set one of config.init_from.checkpoint and config.init_from.bert, not "
                         "both: a checkpoint already holds the text stream.")
    if config.init_from.bert and not config.vocab_path:
        config.vocab_path = convert.bert_vocab_path(config.init_from.bert)
    return config


class _NonFiniteGuard:
    """Holds step metrics on device until a check; raises on the first non-finite loss."""

    def __init__(self):
        self.pending: list[tuple[int, dict]] = []
        self.last_checkpoint: int | None = None

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self, checkpoint_dir: str) -> list[dict[str, float]]:
        values = jax.device_get([m for _, m in self.pending])
        steps = [s for s, _ in self.pending]
        self.pending = []
        for step, m in zip(steps, values):
            if not np.isfinite(m["loss"]):
                last = ("none was saved" if self.last_checkpoint is None else
                        f"step {self.last_checkpoint} in {checkpoint_dir}")
                raise FloatingPointError(
                    f"The loss became {m['loss']} at step {step}; stopped without saving. The last "
                    f"good checkpoint: {last}. Lower --config.optim.learning_rate or check the data.")
        return [{k: float(v) for k, v in m.items()} for m in values]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Pretrains per `config` in `workdir`, evaluating retrieval periodically.

    `devices` (default: all) are the devices the mesh spans. Returns the final step, the logged
    metric history, evaluation scores by step, and whether the schedule was `finished` (False
    after a pre-emption or `halt_after_step`).
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(dict(config.mesh), devices)
    rules = sharding.rules(config.sharding_rules)
    _check_config(config, mesh)
    if config.eval_every >= 0:  # Before training, not after it.
        from capture_jax.evaluators import retrieval
        retrieval.check_eval_config(config)
    config = _resolve_init(config)
    tokenizer = input_pipeline.load_tokenizer(config, workdir)  # Learns the vocab once if needed.
    input_pipeline.check_dataset(config)  # Data present and fits the visual front end.
    config = _with_vocab_size(config, tokenizer.vocab_size)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    total = config.num_train_steps
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    manager = checkpointing.create_manager(workdir, max_to_keep=config.keep_checkpoints)
    tx = optim.create_optimizer(config)
    batch_sharding = sharding.batch_sharding(mesh, rules)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state, start_step, origin = restore_or_initialize(config, workdir, mesh, rules, tx, manager)
        train_step = make_train_step(config, state, batch_sharding, mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.model))
    logging.info("CAPTURE %s: %s parameters, mesh %s, rules %s, %s.", config.variant,
                 f"{num_params:,}", dict(mesh.shape), config.sharding_rules, origin)
    if start_step == 0 and is_main:
        writer.write_hparams({"variant": config.variant, "params": num_params,
                              "global_batch_size": config.global_batch_size, "steps": total})

    peak = cost.peak_flops(jax.devices()[0]) if config.log_mfu else None
    flops = cost.train_flops_per_example(config.model, config.variant) if peak else None
    hooks = [periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                             every_steps=config.log_every)]
    if config.profile and is_main:
        hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5,
                                              profile_duration_ms=None))
    guard = _NonFiniteGuard()
    guard.last_checkpoint = manager.latest_step()
    stop_at = total if config.halt_after_step < 0 else min(total, config.halt_after_step)
    train_iter = input_pipeline.DevicePrefetch(  # Global batches made ahead by a thread.
        input_pipeline.create_train_iterator(config, workdir, start_step=start_step),
        batch_sharding, config.dataset.device_prefetch)
    logged_at, logged_time, history, window = start_step, time.perf_counter(), [], []
    scores: dict[int, dict] = {}
    step = start_step

    while step < stop_at:
        batch = next(train_iter)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state.model, state.opt, metrics = train_step(state.model, state.opt, batch, step)
        step += 1
        guard.add(step, metrics)
        for hook in hooks:
            hook(step)
        preempted = manager.reached_preemption(step)
        checkpoint_now = is_due(step, config.checkpoint_every, stop_at) or preempted
        if is_due(step, config.log_every, stop_at) or checkpoint_now:
            window += guard.flush(manager.directory)  # Raises before a bad state is saved.
            if is_due(step, config.log_every, stop_at):
                elapsed = time.perf_counter() - logged_time
                summary = {k: float(np.mean([v[k] for v in window])) for k in window[0]}
                summary["examples_per_sec"] = (step - logged_at) * config.global_batch_size / elapsed
                if flops and peak:
                    summary["mfu"] = summary["examples_per_sec"] * flops / (peak * jax.device_count())
                writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
                logging.info("step %d/%d: %s", step, total,
                             ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
                history.append({"step": step, **summary})
                logged_at, logged_time, window = step, time.perf_counter(), []
        if checkpoint_now:
            checkpointing.save(manager, step, state.model,
                               {"step": step, "variant": config.variant}, state.opt)
            guard.last_checkpoint = step
        if preempted:
            logging.warning("Pre-emption signal: saved step %d; exiting.", step)
            break
        if config.eval_every >= 0 and is_due(step, config.eval_every, total):
            scores[step] = _evaluate(config, workdir, state, mesh, rules, step, writer)
    train_iter.close()
    manager.wait_until_finished()
    manager.close()
    if start_step == total and config.eval_every >= 0:  # Already trained: evaluate again.
        scores[step] = _evaluate(config, workdir, state, mesh, rules, step, writer)
    writer.flush()
    return {"step": step, "history": history, "scores": scores, "finished": step == total,
            "checkpoint_dir": checkpointing.checkpoint_dir(workdir)}


def _evaluate(config, workdir, state: TrainState, mesh, rules, step: int, writer) -> dict:
    """Retrieval evaluation of the current parameters (see evaluators/retrieval.py); its
    `(name, value)` pairs are written as scalars and returned as a dict."""
    from capture_jax.evaluators import retrieval  # Imported late: it pulls in the report code.

    run_info = {"variant": config.get("variant"), "seed": config.get("seed"), "workdir": workdir}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        pairs = retrieval.evaluate(config, workdir, state.model_def, state.model, mesh, rules,
                                   step=step, run_info=run_info)
    values = dict(pairs)
    if jax.process_index() == 0:
        writer.write_scalars(step, values)
        writer.flush()
    return values


def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`main.py --mode=evaluate`: retrieval scores of the latest checkpoint in `workdir`."""
    workdir = os.path.abspath(workdir)
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = sharding.rules(config.sharding_rules)
    _check_config(config, mesh)
    config = _resolve_init(config)
    config = _with_vocab_size(config, input_pipeline.load_tokenizer(config, workdir).vocab_size)
    input_pipeline.check_dataset(config)
    manager = checkpointing.create_manager(workdir, max_to_keep=None)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"No checkpoint in {manager.directory}: train first (--mode=train_and_evaluate) or "
            "point --workdir at a run, or at a directory from `python -m capture_jax.convert`.")
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = abstract_train_state(config, mesh, rules, optim.create_optimizer(config))
        state.model = checkpointing.restore(
            manager, step, checkpointing.abstract_target(state.model, state.model_sharding))["model"]
    manager.close()
    scores = _evaluate(config, workdir, state, mesh, rules, step, writer)
    writer.flush()
    return scores
