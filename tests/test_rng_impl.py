"""`config.rng_impl`: the dropout keys' PRNG implementation. Each one trains, and a step replays
exactly from the same state and step number (what a resumed run relies on)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capture_jax import optim, sharding, train_state
from configs import capture as capture_configs
from fake_batches import make_batch


def run_steps(impl: str):
    """Steps 0 and 1, then step 1 again from a copy of the state after step 0."""
    config = capture_configs.get_config("tiny")
    config.model.visual.kind, config.rng_impl = "regions", impl
    batch = make_batch(config.model, batch_size=8)
    # One device: the replay property does not depend on the mesh, and each implementation is
    # a compile of its own (the mesh-independence of the losses is tested in test_train.py).
    mesh, rules = sharding.make_mesh({"data": 1}, jax.devices()[:1]), sharding.rules("dp")
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


def test_each_rng_impl_trains_replays_a_step_and_has_its_own_dropout_masks():
    """One test (not one per implementation): the three compiles then run on one worker once."""
    first_losses = {}
    for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
        first, second, replayed = run_steps(impl)
        assert np.isfinite(float(first["loss"])) and np.isfinite(float(second["loss"])), impl
        for key in second:
            assert float(replayed[key]) == float(second[key]), (impl, key)
        first_losses[impl] = float(first["loss"])
    assert first_losses["threefry2x32"] != first_losses["rbg"]
