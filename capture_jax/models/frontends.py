"""Visual front ends, model side: what turns a batch's visual inputs into regions.

`config.visual.kind` picks a class of `FRONT_ENDS`. Each one says which batch keys it reads, the
width of its region features (`feature_dim`, the input of the visual embedding), the width of its
MRM targets (`target_dim`), how it computes features, boxes, mask and targets (`__call__`) and
what its batch looks like (`abstract_batch`). What every front end shares (MRM zeroing, the
global token) is `FrontEnd.inputs`.

- `regions`: detector features and 5-d boxes (`visual_feats`, `visual_boxes`, `visual_mask`);
  the MRM targets are the features themselves.
- `pixels`: the image cut into a grid of patches, each patch a region (feature = its pixels,
  optionally through a conv stem; box = its grid cell); the MRM targets are MAE's per-patch
  normalised pixels.

A front end holds no parameters: the learnable part it asks for (`make_stem`, e.g. the pixels
conv stem) is held by the model as `visual_stem`, so checkpoint paths do not depend on the class.

A new front end is one class here plus an entry in `FRONT_ENDS`, and one class in
`capture_jax/visual_inputs.py` (its tf.data side, which `models/` must not import) plus an entry
in `VISUAL_INPUTS` there; `FRONT_ENDS` is the authoritative list of kinds.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from capture_jax.models import layers

Array = jax.Array
Batch = Mapping[str, Array]
GLOBAL_BOX = (0.0, 0.0, 1.0, 1.0, 1.0)  # The global token's box: the whole image.


def patchify(images: Array, patch: int) -> Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major grid order."""
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {patch}.")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def grid_boxes(rows: int, cols: int) -> Array:
    """5-d boxes [x1, y1, x2, y2, area] of a rows x cols grid, row-major, image-normalised."""
    r, c = jnp.meshgrid(jnp.arange(rows), jnp.arange(cols), indexing="ij")
    r, c = r.reshape(-1).astype(jnp.float32), c.reshape(-1).astype(jnp.float32)
    area = jnp.full_like(r, 1.0 / (rows * cols))
    return jnp.stack([c / cols, r / rows, (c + 1) / cols, (r + 1) / rows, area], axis=-1)


def _mask(batch: Batch, feats: Array) -> Array:
    """`visual_mask` as float32 [B, R]; all ones when the batch has none."""
    mask = batch.get("visual_mask")
    return jnp.ones(feats.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)


def _mrm_specs(b: int, r: int) -> dict[str, jax.ShapeDtypeStruct]:
    return dict(mrm_mask=jax.ShapeDtypeStruct((b, r), jnp.int32),
                mrm_zero=jax.ShapeDtypeStruct((b, r), jnp.int32))


class FrontEnd(nnx.Module):
    """A visual front end (no parameters of its own; see the module docstring)."""

    feature_dim: int  # Width of the per-region features `__call__` returns.
    target_dim: int  # Width of the MRM targets.

    def make_stem(self, common: layers.Common, rngs: nnx.Rngs) -> nnx.Module | None:
        """The learnable part, held by the model as `visual_stem` and passed back to calls."""
        return None

    def __call__(self, batch: Batch, stem: nnx.Module | None
                 ) -> tuple[Array, Array, Array, Array]:
        """Per-region features [B, R, feature_dim], boxes [B, R, 5], mask [B, R] and MRM
        targets [B, R, target_dim], all float32, before MRM zeroing and the global token."""
        raise NotImplementedError

    @staticmethod
    def abstract_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict:
        """ShapeDtypeStructs of the visual keys and `mrm_mask` / `mrm_zero` for `config.model`."""
        raise NotImplementedError

    def inputs(self, batch: Batch, stem: nnx.Module | None) -> tuple[Array, Array, Array, Array]:
        """Region features (MRM-zeroed), boxes and mask with the global token first (mean of the
        real, zeroed features; box `GLOBAL_BOX`), so V = R + 1; MRM targets without gradient."""
        feats, boxes, mask, targets = self(batch, stem)
        b = feats.shape[0]
        if "mrm_zero" in batch:
            feats = feats * (1.0 - batch["mrm_zero"].astype(jnp.float32))[..., None]
        count = jnp.maximum(mask.sum(1, keepdims=True), 1.0)
        global_feat = (feats * mask[..., None]).sum(1) / count
        global_box = jnp.broadcast_to(jnp.array(GLOBAL_BOX), (b, 5))
        feats = jnp.concatenate([global_feat[:, None], feats], axis=1)
        boxes = jnp.concatenate([global_box[:, None], boxes], axis=1)
        mask = jnp.concatenate([jnp.ones((b, 1), jnp.float32), mask], axis=1)
        return feats, boxes, mask, jax.lax.stop_gradient(targets)


class Regions(FrontEnd):
    """Detector region features and boxes as given; the MRM targets are the features."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.feature_dim = self.target_dim = config.visual.feature_dim

    def __call__(self, batch, stem):
        feats = batch["visual_feats"].astype(jnp.float32)
        boxes = batch["visual_boxes"].astype(jnp.float32)
        return feats, boxes, _mask(batch, feats), feats

    @staticmethod
    def abstract_batch(config, batch_size):
        b, v = batch_size, config.visual
        r = v.num_regions
        return dict(visual_feats=jax.ShapeDtypeStruct((b, r, v.feature_dim), jnp.float32),
                    visual_boxes=jax.ShapeDtypeStruct((b, r, 5), jnp.float32),
                    visual_mask=jax.ShapeDtypeStruct((b, r), jnp.int32), **_mrm_specs(b, r))


class Pixels(FrontEnd):
    """Image patches as regions: raw pixels, or `visual.stem_channels` > 0 maps of a conv stem
    (kernel = stride = `visual.stem_stride`, GELU) over each patch; MAE-normalised pixel targets."""

    def __init__(self, config: ml_collections.ConfigDict):
        v = config.visual
        self.patch_size, self.stem_channels, self.stem_stride = (
            v.patch_size, v.stem_channels, v.stem_stride)
        self.target_dim = self.feature_dim = v.patch_size**2 * 3
        if v.stem_channels:
            if v.patch_size % v.stem_stride:
                raise ValueError(f"stem_stride {v.stem_stride} must divide the patch size.")
            self.feature_dim = (v.patch_size // v.stem_stride) ** 2 * v.stem_channels

    def make_stem(self, common, rngs):
        if not self.stem_channels:
            return None
        s = self.stem_stride
        return nnx.Conv(
            3, self.stem_channels, (s, s), s, padding="VALID", dtype=common.dtype, rngs=rngs,
            kernel_init=nnx.with_partitioning(nnx.initializers.normal(common.init_std),
                                              (None, None, None, "feature")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("feature",)))

    def __call__(self, batch, stem):
        image, p = batch["image"].astype(jnp.float32), self.patch_size
        raw = patchify(image, p)
        mean, var = raw.mean(-1, keepdims=True), raw.var(-1, keepdims=True)
        targets = (raw - mean) / jnp.sqrt(var + 1e-6)  # MAE per-patch normalised pixels
        feats = raw
        if stem is not None:
            feats = patchify(layers.gelu(stem(image)).astype(jnp.float32), p // self.stem_stride)
        boxes = jnp.broadcast_to(grid_boxes(image.shape[1] // p, image.shape[2] // p),
                                 (*feats.shape[:2], 5))
        return feats, boxes, _mask(batch, feats), targets

    @staticmethod
    def abstract_batch(config, batch_size):
        b, v = batch_size, config.visual
        image = jax.ShapeDtypeStruct((b, v.image_size, v.image_size, 3), jnp.float32)
        return dict(image=image, **_mrm_specs(b, (v.image_size // v.patch_size) ** 2))


FRONT_ENDS: dict[str, type[FrontEnd]] = {"regions": Regions, "pixels": Pixels}


def get(kind: str) -> type[FrontEnd]:
    """The front-end class of `visual.kind` = `kind`."""
    if kind not in FRONT_ENDS:
        raise ValueError(f"Unknown visual.kind {kind!r}: use one of {sorted(FRONT_ENDS)}.")
    return FRONT_ENDS[kind]
