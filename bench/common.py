"""Random batches of a variant's shapes for the benchmarks (no data, no TensorFlow)."""

import numpy as np

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
