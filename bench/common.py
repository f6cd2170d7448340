"""What several benchmarks share (no flags, no data, no TensorFlow): random batches of a
variant's shapes, the optimiser part of a train step, and interleaved timing."""

import time

import numpy as np
import optax

from capture_jax.models import cost


def random_batch(model_config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of the variant's shapes with plausible values (15% MLM/MRM selections)."""
    rng = np.random.default_rng(seed)
    batch = {}
    for key, spec in cost.abstract_batch(model_config, batch_size).items():
        if key == "text_ids":
            batch[key] = rng.integers(5, model_config.vocab_size, spec.shape).astype(np.int32)
        elif key in ("mrm_mask", "mrm_zero"):
            batch[key] = (rng.uniform(size=spec.shape) < 0.15).astype(spec.dtype)
        elif key.endswith("mask"):
            batch[key] = np.ones(spec.shape, spec.dtype)
        else:
            batch[key] = rng.normal(size=spec.shape).astype(spec.dtype)
    # Titles of 8 to T tokens, padded with id 0 like real ones (repeated ids matter on GPUs:
    # models/layers.py lookup).
    ids = batch["text_ids"]
    real = np.arange(ids.shape[1])[None] < rng.integers(8, ids.shape[1] + 1, (ids.shape[0], 1))
    batch["text_ids"] = np.where(real, ids, 0).astype(ids.dtype)
    batch["text_mask"] = real.astype(batch["text_mask"].dtype)
    labels = rng.integers(5, model_config.vocab_size, ids.shape)
    selected = real & (rng.uniform(size=labels.shape) < 0.15)
    batch["mlm_labels"] = np.where(selected, labels, -1).astype(np.int32)
    return batch


def update_with_norms(tx: optax.GradientTransformation):
    """What a train step does after the gradient: `tx`'s update applied to the parameters, and
    the gradient and parameter norms it logs. (params, opt_state, grads) -> (params, opt_state,
    grad_norm, param_norm); jit it with donate_argnums=(0, 1) as the step donates its state."""
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, optax.tree.norm(grads), optax.tree.norm(params)
    return update


def interleaved(repeats: int, fns: dict) -> dict[str, list[float]]:
    """Seconds of `repeats` calls of each of `fns` (name -> callable that waits for its result),
    in turn, the order reversed every other round."""
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times
