"""Objectives against small numpy references; switches, weights and empty selections."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from capture_jax import losses
from configs import capture as capture_configs


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_info_nce(text, visual, temperature):
    z = np.concatenate([visual, text]).astype(np.float64)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    n, b = len(z), len(text)
    total = 0.0
    for i in range(n):
        positive = (i + b) % n
        others = [j for j in range(n) if j != i]  # the positive and the 2B - 2 negatives
        logits = np.array([z[i] @ z[j] for j in others]) / temperature
        total -= z[i] @ z[positive] / temperature - np.log(np.exp(logits).sum())
    return total / n


def test_mlm_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    labels = np.where(rng.uniform(size=(3, 5)) < 0.4, rng.integers(0, 11, (3, 5)), -1)
    labels[0, 0] = 4
    lp = np_log_softmax(logits.astype(np.float64))
    sel = np.argwhere(labels >= 0)
    expected = -np.mean([lp[i, t, labels[i, t]] for i, t in sel])
    np.testing.assert_allclose(losses.mlm_loss(jnp.asarray(logits), jnp.asarray(labels)), expected,
                               rtol=1e-5, atol=1e-5)
    got = losses.mlm_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert got.dtype == jnp.float32


def test_mrm_matches_numpy():
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 4, 6))
    mask = np.array([[1, 0, 1, 0], [0, 0, 0, 1]])
    expected = np.mean([(pred[i, r] - target[i, r]) ** 2 for i, r in np.argwhere(mask)])
    got = losses.mrm_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                          jnp.asarray(mask))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_info_nce_matches_numpy(batch_size):
    rng = np.random.default_rng(batch_size)
    text, visual = rng.normal(size=(2, batch_size, 8)).astype(np.float32)
    got = losses.clr_loss(jnp.asarray(text), jnp.asarray(visual), 0.07)
    np.testing.assert_allclose(got, np_info_nce(text, visual, 0.07), rtol=1e-5, atol=1e-5)


def test_empty_selections_give_zero_and_finite_gradients():
    logits, pred = jnp.ones((2, 3, 7)), jnp.ones((2, 4, 5))
    none_mlm, none_mrm = -jnp.ones((2, 3), jnp.int32), jnp.zeros((2, 4))
    def total(lg, p):
        return losses.mlm_loss(lg, none_mlm) + losses.mrm_loss(p, jnp.zeros_like(p), none_mrm)

    grads = jax.grad(total, argnums=(0, 1))(logits, pred)
    assert float(losses.mlm_loss(logits, none_mlm)) == 0.0
    assert float(losses.mrm_loss(pred, pred + 1, none_mrm)) == 0.0
    assert all(np.isfinite(g).all() and not np.any(g) for g in grads)


def fake_outputs_and_batch():
    rng = np.random.default_rng(2)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    outputs = dict(mlm_logits=f(2, 3, 7), mrm_pred=f(2, 4, 5), mrm_targets=f(2, 4, 5),
                   clr_text=f(2, 6), clr_visual=f(2, 6))
    batch = dict(mlm_labels=jnp.array([[1, -1, 2], [-1, 3, -1]]),
                 mrm_mask=jnp.array([[1, 0, 0, 1], [0, 1, 0, 0]]))
    return outputs, batch


def test_compute_losses_weights_and_switches():
    outputs, batch = fake_outputs_and_batch()
    config = ml_collections.ConfigDict(dict(loss=capture_configs.get_config().loss))
    assert config.loss.clr_temperature == 0.07
    total, parts = losses.compute_losses(outputs, batch, config)
    assert set(parts) == {"mlm", "mrm", "clr"}
    np.testing.assert_allclose(total, sum(parts.values()), rtol=1e-6)
    np.testing.assert_allclose(parts["clr"], losses.clr_loss(outputs["clr_text"],
                                                             outputs["clr_visual"], 0.07))
    config.loss.update(mlm_weight=0.5, mrm_weight=2.0, use_clr=False)
    weighted, parts2 = losses.compute_losses(outputs, batch, config)
    assert set(parts2) == {"mlm", "mrm"}
    np.testing.assert_allclose(weighted, 0.5 * parts["mlm"] + 2.0 * parts["mrm"], rtol=1e-6)
    with pytest.raises(ValueError, match="mrm_mask"):
        losses.compute_losses(outputs, {"mlm_labels": batch["mlm_labels"]}, config)
    config.loss.update(use_mlm=False, use_mrm=False)
    with pytest.raises(ValueError, match="Every objective is off"):
        losses.compute_losses(outputs, batch, config)


def test_clr_warmup_optimises_clr_alone_until_its_step():
    outputs, batch = fake_outputs_and_batch()
    config = ml_collections.ConfigDict(dict(loss=capture_configs.get_config().loss))
    config.loss.update(clr_warmup_steps=3, mlm_weight=0.5)
    for step, expect_all in [(0, False), (2, False), (3, True), (10, True)]:
        total, parts = jax.jit(lambda s: losses.compute_losses(outputs, batch, config, s))(step)
        assert set(parts) == {"mlm", "mrm", "clr"}  # Still computed and logged.
        want = parts["clr"] + (0.5 * parts["mlm"] + parts["mrm"] if expect_all else 0.0)
        np.testing.assert_allclose(total, want, rtol=1e-6)
    config.loss.use_clr = False  # Without CLR there is nothing to warm up: weights as given.
    total, parts = losses.compute_losses(outputs, batch, config, 0)
    np.testing.assert_allclose(total, 0.5 * parts["mlm"] + parts["mrm"], rtol=1e-6)
