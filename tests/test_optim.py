"""The pretraining optimiser: schedule, decay groups, clipping, BERT learning-rate multiplier."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from capture_jax import optim
from configs import capture as capture_configs


def _config(**optim_overrides):
    config = ml_collections.ConfigDict({"num_train_steps": 100,
                                        "optim": capture_configs.get_config().optim})
    config.optim.update(optim_overrides)
    return config


def jax_tree_full(tree, value):
    return jax.tree.map(lambda p: jnp.full(p.shape, value), tree)


def _params():
    return {"text_layers": {"0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))}},
            "joint": {"ln": {"scale": jnp.ones((2,))}, "kernel": jnp.ones((2, 2))}}


def test_schedule_warms_up_linearly_then_decays_to_zero():
    schedule = optim.learning_rate_schedule(_config(learning_rate=1e-3))
    np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 55, 100)],
                               [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)


def test_decay_mask_spares_biases_and_layernorm():
    mask = optim.decay_mask(_params())
    assert mask == {"text_layers": {"0": {"kernel": True, "bias": False}},
                    "joint": {"ln": {"scale": False}, "kernel": True}}


def _first_update(config, grads):
    tx = optim.create_optimizer(config)
    params = _params()
    state = tx.init(params)
    # Step 0 has learning rate 0 during warm-up; take the second step's update.
    _, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    return updates


def test_weight_decay_hits_matrices_only():
    config = _config(learning_rate=1.0, weight_decay=0.5, warmup_fraction=0.0)
    zero = {"text_layers": {"0": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros((2,))}},
            "joint": {"ln": {"scale": jnp.zeros((2,))}, "kernel": jnp.zeros((2, 2))}}
    updates = _first_update(config, zero)
    lr = optim.learning_rate_schedule(config)(1)
    # With zero gradients only decoupled decay moves a parameter: -lr * wd * p.
    np.testing.assert_allclose(updates["joint"]["kernel"], -lr * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["text_layers"]["0"]["kernel"], -lr * 0.5, rtol=1e-6)
    assert not np.any(updates["text_layers"]["0"]["bias"])
    assert not np.any(updates["joint"]["ln"]["scale"])


def test_gradients_are_clipped_by_global_norm_before_adam():
    # With eps = 1 Adam's step g / (|g| + eps) depends on the gradient's size, so clipping shows:
    # 14 entries of 1e6 are clipped to global norm 1, i.e. c = 1/sqrt(14) each.
    config = _config(eps=1.0, weight_decay=0.0, warmup_fraction=0.0, grad_clip_norm=1.0)
    updates = _first_update(config, jax_tree_full(_params(), 1e6))
    c = 1 / np.sqrt(14)
    lr = optim.learning_rate_schedule(config)(1)
    np.testing.assert_allclose(updates["joint"]["kernel"], -lr * c / (c + 1.0), rtol=1e-5)


def test_bert_multiplier_scales_only_bert_parameters():
    grads = jax_tree_full(_params(), 1e-3)
    base = _first_update(_config(weight_decay=0.0, warmup_fraction=0.0), grads)
    scaled = _first_update(
        _config(weight_decay=0.0, warmup_fraction=0.0, bert_lr_multiplier=0.1,
                bert_param_prefixes=("text_layers",)), grads)
    np.testing.assert_allclose(scaled["text_layers"]["0"]["kernel"],
                               0.1 * base["text_layers"]["0"]["kernel"], rtol=1e-5)
    np.testing.assert_allclose(scaled["joint"]["kernel"], base["joint"]["kernel"], rtol=1e-6)


def test_gradient_accumulation_updates_every_k_steps():
    config = _config(grad_accum_steps=2, warmup_fraction=0.0)
    tx = optim.create_optimizer(config)
    params = _params()
    state = tx.init(params)
    grads = jax_tree_full(params, 1e-3)
    first, state = tx.update(grads, state, params)
    second, state = tx.update(grads, state, params)
    assert not np.any(first["joint"]["kernel"]) and np.all(second["joint"]["kernel"] != 0)


def test_fused_update_equals_the_optax_chain_step_after_step():
    """`clipped_adamw` (the default) against the optax chain it fuses, over 6 jitted steps with
    the norm above and below the clip: same updates, same state pytree (checkpoints interchange)."""
    config = _config(learning_rate=1e-2, warmup_fraction=0.3, grad_clip_norm=1.0)
    fused = optim.create_optimizer(config)
    chain = optim.optax_chain(config, optim.learning_rate_schedule(config))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                          _params())
    fused_state, chain_state = fused.init(params), chain.init(params)
    assert jax.tree.structure(fused_state) == jax.tree.structure(chain_state)
    fused_update, chain_update = jax.jit(fused.update), jax.jit(chain.update)
    for step in range(6):
        scale = 3.0 if step % 2 else 0.05  # Clipped on odd steps only.
        grads = jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape),
                                                   jnp.float32), params)
        u_fused, fused_state = fused_update(grads, fused_state, params)
        u_chain, chain_state = chain_update(grads, chain_state, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9),
                     (u_fused, fused_state), (u_chain, chain_state))
        params = jax.tree.map(lambda p, u: p + u, params, u_fused)
    assert int(fused_state[1][0].count) == 6


def test_fused_update_writes_only_the_new_parameter_and_moments():
    """In XLA's compiled step (update + apply), the fused optimiser writes three arrays per
    parameter: the parameter and the two moments. The optax chain also materialises the clipped
    gradient (a fourth full pass, about 1.6x the time at the `paper` size on a CPU)."""
    config = _config()
    params = {f"w{i}": jnp.ones((256, 256 + i)) for i in range(4)}

    def full_size_writes(tx):
        def step(g, s, p):
            u, s = tx.update(g, s, p)
            return jax.tree.map(jnp.add, p, u), s
        hlo = jax.jit(step).lower(params, tx.init(params), params).compile().as_text()
        entry = hlo[hlo.index("ENTRY"):].splitlines()
        return sorted(sum(f"= f32[{w.shape[0]},{w.shape[1]}]" in line and "fusion(" in line
                          for line in entry) for w in params.values())

    assert full_size_writes(optim.create_optimizer(config)) == [3] * len(params)
    assert full_size_writes(optim.optax_chain(
        config, optim.learning_rate_schedule(config))) == [4] * len(params)
