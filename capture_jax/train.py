"""Pretraining CAPTURE: `train_and_evaluate(config, workdir)`, read top to bottom.

1. `experiment.setup`: mesh, sharding rules, dataset, tokenizer, model and optimiser shapes, once;
   the evaluators of `config.evals` are built from it (`evaluators.create`).
2. Model and optimiser created directly sharded (`jax.jit` with `out_shardings`), or restored:
   latest checkpoint in the workdir (or `config.restore_step`) > `config.init_from` (weights
   only) > from scratch. The workdir is locked for the run (`workdir_lock`: one run per workdir).
3. A jitted `train_step(model_state, opt_state, batch, step)` with explicit shardings and donated
   state. Dropout keys are `fold_in(seed, step)` and the data position is derived from the step,
   so a resumed run replays exactly what an uninterrupted run would have done.
4. Periodic actions, all decided by `is_due`: metrics to TensorBoard and the log, Orbax checkpoints
   (async), each evaluator on its own schedule. SIGTERM (pre-emption) saves the current step and returns.
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
from absl import logging
from clu import periodic_actions

from capture_jax import checkpointing, convert, experiment, input_pipeline
from capture_jax import progress, workdir_lock
from capture_jax import evaluators as evaluators_lib
from capture_jax.train_state import TrainState, create_train_state, make_train_step
from capture_jax.models import cost


# Errors a user causes and can fix (missing data, bad config or flags, broken checkpoint,
# diverged run); main.py reports them as one sentence instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, checkpointing.CheckpointError, FloatingPointError)


def is_due(step: int, every: int, total: int | None = None) -> bool:
    """Whether a periodic action runs after `step` completed steps: every `every`, and at the end."""
    if step <= 0:
        return False
    return (every > 0 and step % every == 0) or (total is not None and step == total)


def _restore_step(config: ml_collections.ConfigDict, manager) -> int:
    """`config.restore_step`, or -1 (the latest) once this run has already gone back to it.

    A run that went back to step N records `went_back_to: N` in the meta of every step it saves
    since, so a restart of the same command (a pre-empted job keeps its flags) resumes from its
    latest step instead of going back to N again.
    """
    latest = manager.latest_step()
    if (config.restore_step >= 0 and latest is not None and latest > config.restore_step
            and checkpointing.went_back_to(manager, latest) == config.restore_step):
        logging.info("config.restore_step=%d was applied when this run went back to step %d; "
                     "resuming from its latest step, %d.", config.restore_step,
                     config.restore_step, latest)
        return -1
    return config.restore_step


def restore_or_initialize(exp: experiment.Experiment,
                          manager) -> tuple[TrainState, int, str, dict[str, Any]]:
    """Start-up order: latest checkpoint in workdir (or config.restore_step) > config.init_from
    > from scratch. Also returns what every later checkpoint's meta carries on (`went_back_to`)."""
    config, shapes = exp.config, exp.shapes
    restore_step = _restore_step(config, manager)
    resume_at = checkpointing.step_to_restore(manager, restore_step)
    if resume_at is not None:  # Restored straight onto the shardings: no initialisation first.
        with exp.context():
            restored = checkpointing.restore(
                manager, resume_at,
                checkpointing.abstract_target(shapes.model, shapes.model_sharding),
                checkpointing.abstract_target(shapes.opt, shapes.opt_sharding))
        lineage = {k: v for k, v in restored["meta"].items() if k == "went_back_to"}
        if checkpointing.set_aside_later_steps(manager, resume_at):  # Going back to restore_step.
            lineage = {"went_back_to": resume_at}
        logging.info("Resumed from %s at step %d.", manager.directory, resume_at)
        state = dataclasses.replace(shapes, model=restored["model"], opt=restored["opt"])
        return state, resume_at, f"resumed at step {resume_at}", lineage
    lineage = {}
    if checkpointing.set_aside_later_steps(manager, 0):  # restore_step=0: start again.
        lineage = {"went_back_to": 0}
    with exp.context():
        state = create_train_state(config, exp.tx, shapes)
    if config.init_from.checkpoint:
        with exp.context():
            state.model, _ = checkpointing.restore_weights(
                config.init_from.checkpoint,
                checkpointing.abstract_target(state.model, state.model_sharding))
        return state, 0, f"weights from {config.init_from.checkpoint}", lineage
    if config.init_from.bert:
        with exp.context():
            state.model, _ = convert.load_bert_weights(state.model, config.init_from.bert,
                                                       config.model)
        return state, 0, f"text stream from BERT {config.init_from.bert}", lineage
    return state, 0, "from scratch", lineage


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


@workdir_lock.exclusive()
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Pretrains per `config` in `workdir`, running the evaluators of `config.evals` on their
    schedules.

    `devices` (default: all) are the devices the mesh spans. Returns the final step, the logged
    metric history, evaluation scores by step, and whether the schedule was `finished` (False
    after a pre-emption or `halt_after_step`).
    """
    os.makedirs(workdir, exist_ok=True)
    exp = experiment.setup(config, workdir, devices)
    config, workdir, is_main = exp.config, exp.workdir, exp.is_main
    evaluators = evaluators_lib.create(exp, scheduled_only=True)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    total = config.num_train_steps
    writer = progress.create_writer(workdir, is_main)
    manager = checkpointing.create_manager(workdir, max_to_keep=config.keep_checkpoints)

    state, start_step, origin, lineage = restore_or_initialize(exp, manager)
    with exp.context():
        train_step = make_train_step(config, state, exp.batch_sharding, exp.mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.model))
    logging.info("CAPTURE %s: %s parameters, mesh %s, rules %s, %s.", config.variant,
                 f"{num_params:,}", dict(exp.mesh.shape), config.sharding_rules, origin)
    if start_step == 0 and is_main:
        writer.write_hparams({"variant": config.variant, "params": num_params,
                              "global_batch_size": config.global_batch_size, "steps": total})

    peak = cost.peak_flops(jax.devices()[0]) if config.log_mfu else None
    flops = cost.train_flops_per_example(config.model, config.variant) if peak else None
    hooks = []
    if config.profile and is_main:
        hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5,
                                              profile_duration_ms=None))
    guard = _NonFiniteGuard()
    guard.last_checkpoint = manager.latest_step()
    stop_at = total if config.halt_after_step < 0 else min(total, config.halt_after_step)
    _say_what_is_left(start_step, stop_at, total, config.halt_after_step)
    train_iter = input_pipeline.DevicePrefetch(  # Global batches made ahead by a thread.
        input_pipeline.create_train_iterator(config, exp.builder, exp.tokenizer,
                                             start_step=start_step),
        exp.batch_sharding, config.dataset.device_prefetch)
    clock = progress.Progress(start_step, stop_at, config.global_batch_size)
    history, window = [], []
    scores: dict[int, dict] = {}
    step, preempted = start_step, False

    while step < stop_at:
        batch = next(train_iter)
        if step == start_step:
            logging.info("Compiling the train step and running step %d ...", step + 1)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state.model, state.opt, metrics = train_step(state.model, state.opt, batch, step)
        step += 1
        guard.add(step, metrics)
        if step == start_step + 1:
            jax.block_until_ready(metrics)
            logging.info("Step %d done in %s (compilation included).", step,
                         progress.duration(clock.first_step_done()))
        for hook in hooks:
            hook(step)
        preempted = manager.reached_preemption(step)
        checkpoint_now = is_due(step, config.checkpoint_every, stop_at) or preempted
        if is_due(step, config.log_every, stop_at) or checkpoint_now:
            window += guard.flush(manager.directory)  # Raises before a bad state is saved.
            if is_due(step, config.log_every, stop_at):
                summary = {k: float(np.mean([v[k] for v in window])) for k in window[0]}
                summary["examples_per_sec"], eta = clock.interval(step)
                if flops and peak:
                    summary["mfu"] = summary["examples_per_sec"] * flops / (peak * jax.device_count())
                writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
                logging.info("step %d/%d: %s; %s", step, total, progress.metrics_text(summary),
                             eta)
                history.append({"step": step, **summary})
                window = []
        if checkpoint_now:
            saving = time.perf_counter()
            checkpointing.save(manager, step, state.model,
                               {"step": step, "variant": config.variant, **lineage}, state.opt)
            logging.info("Checkpoint of step %d: %s/%d (%s; written in the background).", step,
                         manager.directory, step, progress.duration(time.perf_counter() - saving))
            guard.last_checkpoint = step
        if preempted:
            logging.warning("Pre-emption signal: saved step %d; exiting.", step)
            break
        due = [e for e in evaluators if is_due(step, e.every, total)]
        if due:
            scores[step] = _evaluate(due, state, step, writer)
    train_iter.close()
    manager.wait_until_finished()
    manager.close()
    if start_step >= total and evaluators:  # Already trained: evaluate again.
        scores[step] = _evaluate(evaluators, state, step, writer)
    writer.flush()
    if preempted:
        ended = "pre-empted; the same command resumes."
    elif start_step >= total:
        ended = (f"already complete: the checkpoint is at step {start_step} and num_train_steps "
                 f"is {total}, so nothing was trained; raise --config.num_train_steps to train on.")
    elif step >= total:
        ended = "finished."
    else:
        ended = (f"halted after step {step} (halt_after_step); the same command with "
                 "--config.halt_after_step=-1 (or a later step) continues.")
    logging.info("%s", progress.final_summary(
        variant=config.variant, start_step=start_step, step=step, total=total,
        wall_s=clock.wall_s(), batch=config.global_batch_size, first_step_s=clock.first_step_s,
        score_lines=[line for e in evaluators for line in e.summary()], workdir=workdir,
        checkpoint_dir=checkpointing.checkpoint_dir(workdir), ended=ended))
    return {"step": step, "history": history, "scores": scores, "finished": step >= total,
            "checkpoint_dir": checkpointing.checkpoint_dir(workdir)}


def _say_what_is_left(start_step: int, stop_at: int, total: int, halt_after_step: int) -> None:
    """A line when there is nothing to train: the run is complete, or past `halt_after_step`."""
    if start_step >= total:
        logging.info("Nothing to train: the checkpoint is at step %d of %d (the run is complete); "
                     "evaluating it. Raise --config.num_train_steps to train on, or use a new "
                     "--workdir for a new run.", start_step, total)
    elif start_step >= stop_at:
        logging.info("Nothing to train: the checkpoint is at step %d and halt_after_step is %d; "
                     "rerun with --config.halt_after_step=-1 (or a later step) to continue to "
                     "step %d.", start_step, halt_after_step, total)


def _evaluate(evaluators: list[evaluators_lib.Scheduled], state: TrainState, step: int,
              writer) -> dict[str, float]:
    """Runs `evaluators` on the current parameters; their `(name, value)` pairs are written as
    scalars and returned as a dict."""
    values = {}
    for evaluator in evaluators:
        values.update(evaluator.evaluate(state.model, step))
    if jax.process_index() == 0:
        writer.write_scalars(step, values)
        writer.flush()
    return values


@workdir_lock.exclusive(create=False)
def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """`main.py --mode=evaluate`: every evaluator of `config.evals` (whatever its schedule) on the
    latest checkpoint in `workdir` (or step `config.restore_step`)."""
    if config.restore_step == 0:
        raise ValueError("config.restore_step=0 (start again from step 0) leaves no checkpoint to "
                         "evaluate: give a checkpoint's step, or -1 for the latest.")
    manager = checkpointing.create_manager(os.path.abspath(workdir), max_to_keep=None)
    step = checkpointing.step_to_restore(manager, config.restore_step)
    if step is None:
        raise FileNotFoundError(
            f"No checkpoint in {manager.directory}: train first (--mode=train_and_evaluate) or "
            "point --workdir at a run, or at a directory from `python -m capture_jax.convert`.")
    exp = experiment.setup(config, workdir)
    evaluators = evaluators_lib.create(exp)
    writer = progress.create_writer(exp.workdir, exp.is_main)
    shapes = exp.shapes
    with exp.context():
        target = checkpointing.abstract_target(shapes.model, shapes.model_sharding)
        model = checkpointing.restore(manager, step, target, purpose="evaluate")["model"]
    manager.close()
    scores = _evaluate(evaluators, dataclasses.replace(shapes, model=model), step, writer)
    writer.flush()
    return scores
