"""Random pretraining batches from shapes alone: numpy only (no JAX, no PyTorch), so the JAX
and the PyTorch side of bench/device_check.py draw the same batch in different processes."""

from __future__ import annotations

import numpy as np


def random_batch(shapes: dict[str, tuple[tuple[int, ...], str]], vocab_size: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of `shapes` (key -> (shape, dtype name)) with plausible values: 15% MRM
    selections; titles of 8 to T tokens padded with id 0 like real ones (repeated ids matter on
    GPUs: models/layers.py lookup); 15% of the real tokens selected for MLM."""
    rng = np.random.default_rng(seed)
    batch = {}
    for key, (shape, dtype) in shapes.items():
        if key == "text_ids":
            batch[key] = rng.integers(5, vocab_size, shape).astype(np.int32)
        elif key in ("mrm_mask", "mrm_zero"):
            batch[key] = (rng.uniform(size=shape) < 0.15).astype(dtype)
        elif key.endswith("mask"):
            batch[key] = np.ones(shape, dtype)
        else:
            batch[key] = rng.normal(size=shape).astype(dtype)
    ids = batch["text_ids"]
    real = np.arange(ids.shape[1])[None] < rng.integers(8, ids.shape[1] + 1, (ids.shape[0], 1))
    batch["text_ids"] = np.where(real, ids, 0).astype(ids.dtype)
    batch["text_mask"] = real.astype(batch["text_mask"].dtype)
    labels = rng.integers(5, vocab_size, ids.shape)
    selected = real & (rng.uniform(size=labels.shape) < 0.15)
    batch["mlm_labels"] = np.where(selected, labels, -1).astype(np.int32)
    return batch
