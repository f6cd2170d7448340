"""Random model inputs for the model, loss and sharding tests (not a test module itself)."""

import numpy as np
from flax import nnx
import ml_collections

from capture_jax.models import capture
from configs import capture as capture_configs

# Tests compile many small programs; XLA's CPU backend optimisations only cost time here.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def tiny_config(
    kind: str = "regions", dtype: str = "float32", **changes
) -> ml_collections.ConfigDict:
    """The `tiny` model config with the given front end and compute dtype."""
    config = capture_configs.get_config("tiny").model
    config.visual.kind, config.dtype = kind, dtype
    config.update(changes)
    return config


def build(config: ml_collections.ConfigDict, seed: int = 0) -> capture.CaptureModel:
    """A model with real (random) parameters, outside any mesh."""
    with nnx.use_eager_sharding(False):
        return capture.CaptureModel(config, rngs=nnx.Rngs(seed))


def make_batch(config: ml_collections.ConfigDict, batch_size: int = 4, seed: int = 0,
               padded: bool = True) -> dict[str, np.ndarray]:
    """A pretraining batch: MLM-style labels, MRM masks; per-sample padding when `padded`."""
    rng = np.random.default_rng(seed)
    b, t, v = batch_size, config.text.length, config.visual
    text_len = rng.integers(3, t + 1, b) if padded else np.full(b, t)
    text_mask = (np.arange(t)[None] < text_len[:, None]).astype(np.int32)
    text_ids = rng.integers(5, config.vocab_size, (b, t)).astype(np.int32) * text_mask
    selected = (rng.uniform(size=(b, t)) < 0.3) & (text_mask == 1)
    selected[:, 0] = False
    mlm_labels = np.where(selected, rng.integers(5, config.vocab_size, (b, t)), -1)
    batch = dict(text_ids=text_ids, text_mask=text_mask, mlm_labels=mlm_labels.astype(np.int32))
    if v.kind == "regions":
        r = v.num_regions
        n_regions = rng.integers(2, r + 1, b) if padded else np.full(b, r)
        visual_mask = (np.arange(r)[None] < n_regions[:, None]).astype(np.int32)
        feats = rng.normal(size=(b, r, v.feature_dim)).astype(np.float32)
        x1y1 = rng.uniform(0, 0.5, (b, r, 2))
        x2y2 = x1y1 + rng.uniform(0.1, 0.5, (b, r, 2))
        area = np.prod(x2y2 - x1y1, axis=-1, keepdims=True)
        boxes = np.concatenate([x1y1, x2y2, area], -1).astype(np.float32)
        batch.update(visual_feats=feats * visual_mask[..., None],
                     visual_boxes=boxes * visual_mask[..., None], visual_mask=visual_mask)
    else:
        r = (v.image_size // v.patch_size) ** 2
        visual_mask = np.ones((b, r), np.int32)
        batch["image"] = rng.normal(size=(b, v.image_size, v.image_size, 3)).astype(np.float32)
    mrm_mask = ((rng.uniform(size=(b, r)) < 0.4) & (visual_mask == 1)).astype(np.int32)
    mrm_zero = (mrm_mask * (rng.uniform(size=(b, r)) < 0.9)).astype(np.int32)
    batch.update(mrm_mask=mrm_mask, mrm_zero=mrm_zero)
    return batch
