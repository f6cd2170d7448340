"""`config.rng_impl`: the dropout keys' PRNG implementation. Each one trains, and a step replays
exactly from the same state and step number (what a resumed run relies on)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capture_jax import optim, sharding, train_state
from configs import capture as capture_configs
from fake_batches import make_batch


@functools.cache
def run_steps(impl: str):
    """Steps 0 and 1, then step 1 again from a copy of the state after step 0."""
    config = capture_configs.get_config("tiny")
    config.model.visual.kind, config.rng_impl = "regions", impl
    batch = make_batch(config.model, batch_size=8)
    mesh, rules = sharding.make_mesh({"data": -1}), sharding.rules("dp")
    tx = optim.create_optimizer(config)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = train_state.create_train_state(
            config, tx, train_state.train_state_shapes(config, mesh, rules, tx))
        batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
        step = train_state.make_train_step(config, state, sharding.batch_sharding(mesh, rules),
                                           mesh)
        model, opt, first = step(state.model, state.opt, batch, 0)
        copy = jax.tree.map(jnp.copy, (model, opt))
        _, _, second = step(model, opt, batch, 1)
        _, _, replayed = step(*copy, batch, 1)
    return first, second, replayed


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_each_rng_impl_trains_and_replays_a_step(impl):
    first, second, replayed = run_steps(impl)
    assert np.isfinite(float(first["loss"])) and np.isfinite(float(second["loss"]))
    for key in second:
        assert float(replayed[key]) == float(second[key]), key


def test_the_rng_impl_changes_the_dropout_masks():
    threefry, rbg = run_steps("threefry2x32")[0], run_steps("rbg")[0]
    assert float(threefry["loss"]) != float(rbg["loss"])
