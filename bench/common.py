"""What several benchmarks share (no flags, no data, no TensorFlow): random batches of a
variant's shapes, the optimiser part of a train step, and interleaved timing."""

import time

import numpy as np
import optax

from capture_jax.models import cost

import batches  # bench/: numpy only


def batch_shapes(model_config, batch_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The variant's batch keys -> (shape, dtype name), as `batches.random_batch` takes them."""
    return {k: (tuple(s.shape), np.dtype(s.dtype).name)
            for k, s in cost.abstract_batch(model_config, batch_size).items()}


def random_batch(model_config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of the variant's shapes with plausible values (bench/batches.py)."""
    return batches.random_batch(batch_shapes(model_config, batch_size),
                                model_config.vocab_size, seed)


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
