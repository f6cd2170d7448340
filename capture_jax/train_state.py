"""The training state and the jitted train step: what a step needs, and nothing of the data.

No TensorFlow and no Orbax here, so a benchmark (`bench/device_check.py`) runs the real step on a
machine that has only JAX and Flax. `experiment.setup` builds a run's `TrainState` shapes;
`train.py` drives the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from capture_jax import losses, optim, sharding
from capture_jax.models import capture


@dataclasses.dataclass
class TrainState:
    """Everything a step needs besides the batch: NNX graph definitions, states and shardings.

    In `Experiment.shapes` the states are abstract (`jax.ShapeDtypeStruct`s).
    """

    model_def: Any
    opt_def: Any
    model: Any  # nnx.State of the parameters.
    opt: Any  # nnx.State of the optimiser (step counter, moments).
    model_sharding: Any
    opt_sharding: Any


def new_model_and_optimizer(config: ml_collections.ConfigDict, tx: optax.GradientTransformation):
    """A fresh `(CaptureModel, nnx.Optimizer)` from `config.seed`."""
    model = capture.CaptureModel(config.model, rngs=nnx.Rngs(config.seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def train_state_shapes(config: ml_collections.ConfigDict, mesh, rules,
                       tx: optax.GradientTransformation) -> TrainState:
    """Graph definitions, shardings and abstract (shape-only) states: nothing is allocated.

    Must run inside `jax.set_mesh(mesh)` and `nnx.logical_axis_rules(rules)`.
    """
    abstract_model, abstract_opt = nnx.eval_shape(lambda: new_model_and_optimizer(config, tx))
    model_def, model_state = nnx.split(abstract_model)
    opt_def, opt_state = nnx.split(abstract_opt)
    model_sh = sharding.state_shardings(model_state, mesh, rules)
    opt_sh = sharding.state_shardings(opt_state, mesh, rules)
    check_divisible(model_state, model_sh, mesh, config.sharding_rules)
    return TrainState(model_def, opt_def, model_state, opt_state, model_sh, opt_sh)



def create_train_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                       shapes: TrainState) -> TrainState:
    """Parameters and optimiser state initialised directly sharded (never on one device), onto
    `shapes` (`experiment.train_state_shapes`); under the mesh and rules of those shapes."""

    def init():
        model, opt = new_model_and_optimizer(config, tx)
        return nnx.state(model), nnx.state(opt)

    model, opt = jax.jit(init, out_shardings=(shapes.model_sharding, shapes.opt_sharding))()
    return dataclasses.replace(shapes, model=model, opt=opt)


def make_train_step(config, state: TrainState, batch_sharding: NamedSharding, mesh):
    """The jitted step: forward, losses, gradients, optimiser update; returns scalar metrics.

    Nothing concrete is made here (the root key is made inside the step), so the step also
    lowers for devices that are not present (`capture_jax.aot`).
    """
    schedule = optim.learning_rate_schedule(config)
    accum = max(config.optim.grad_accum_steps, 1)

    def train_step(model_state, opt_state, batch, step):
        model = nnx.merge(state.model_def, model_state)
        opt = nnx.merge(state.opt_def, opt_state)
        dropout_key = jax.random.fold_in(jax.random.key(config.seed, impl=config.rng_impl), step)

        def loss_fn(model):
            outputs = model(batch, train=True, dropout_key=dropout_key)
            return losses.compute_losses(outputs, batch, config, step // accum)

        (loss, parts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        metrics = {"loss": loss, **{f"loss_{k}": v for k, v in parts.items()}}
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(nnx.state(model, nnx.Param))
        metrics["learning_rate"] = schedule(step // accum)
        return nnx.state(model), nnx.state(opt), metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(
        train_step,
        in_shardings=(state.model_sharding, state.opt_sharding, batch_sharding, replicated),
        out_shardings=(state.model_sharding, state.opt_sharding, replicated),
        donate_argnums=(0, 1),
    )


def check_divisible(abstract_state, shardings, mesh, rules_name: str) -> None:
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
