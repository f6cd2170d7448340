"""Visual front ends, input side: the tf.data half of `config.model.visual.kind`.

One class per front end, chosen from `VISUAL_INPUTS` by `create`; each checks that the dataset
fits it (one sentence otherwise) and gives an example's visual inputs (`example`), its MRM masks
(`masks`) and the per-batch work (`finish`); `slots` is P or R, the number of maskable
patches/regions. Its model-side twin is `capture_jax/models/frontends.py`, whose `FRONT_ENDS`
is the authoritative list of kinds (both tables have the same keys).

TensorFlow ops run only when these are called; `input_pipeline` hides TF from GPUs/TPUs first.
"""

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- masking
def mask_patches(num_patches: int, seed: tf.Tensor, prob: float):
    """MRM masks float32 [P]: (selected for the loss, zeroed = ~90% of the selected)."""
    s_select, s_zero = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    selected = tf.random.stateless_uniform([num_patches], s_select) < prob
    zero = selected & (tf.random.stateless_uniform([num_patches], s_zero) < 0.9)
    return tf.cast(selected, tf.float32), tf.cast(zero, tf.float32)


def mask_regions(visual_mask: tf.Tensor, seed: tf.Tensor, prob: float):
    """`mask_patches` over the R region slots, restricted to real regions (visual_mask [R] = 1)."""
    selected, zero = mask_patches(visual_mask.shape[0], seed, prob)
    real = tf.cast(visual_mask, tf.float32)
    return selected * real, zero * real


# --------------------------------------------------------------------------- regions
def region_inputs(regions: dict[str, tf.Tensor], num_regions: int):
    """Stored `regions` -> (feats float32 [R, D], locations float32 [R, 5], mask int32 [R]).

    The first R = `num_regions` regions in file order, zero rows after the real ones. Locations
    are ViLBERT's (x1/W, y1/H, x2/W, y2/H, (x2-x1)(y2-y1)/(W*H)), W x H = the image the boxes
    refer to.
    """
    feats, boxes = regions["features"], regions["boxes"]
    n = tf.minimum(tf.shape(feats)[0], num_regions)
    w = tf.cast(regions["image_width"], tf.float32)
    h = tf.cast(regions["image_height"], tf.float32)
    x1, y1, x2, y2 = tf.unstack(boxes[:n], num=4, axis=-1)
    locations = tf.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) * (y2 - y1) / (w * h)], -1)
    pad = [[0, num_regions - n], [0, 0]]
    feats = tf.pad(tf.cast(feats[:n], tf.float32), pad)
    feats = tf.ensure_shape(feats, [num_regions, regions["features"].shape[-1]])
    locations = tf.ensure_shape(tf.pad(locations, pad), [num_regions, 5])
    mask = tf.ensure_shape(tf.pad(tf.ones([n], tf.int32), pad[:1]), [num_regions])
    return feats, locations, mask


# --------------------------------------------------------------------------- images
def decode_image(jpeg: tf.Tensor, size: int) -> tf.Tensor:
    """JPEG bytes -> float32 [size, size, 3] in 0..255, aspect kept, padded with black."""
    image = tf.io.decode_jpeg(jpeg, channels=3)
    return tf.image.resize_with_pad(image, size, size, antialias=True)


def normalize_images(images: tf.Tensor) -> tf.Tensor:
    """0..255 -> [0, 1] -> ImageNet mean/std normalisation (per batch: one vectorised op)."""
    return (images / 255.0 - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


# --------------------------------------------------------------------------- front ends
class VisualInput:
    """The visual half of an example and its MRM masks, for one front end."""

    slots: int  # P patches or R region slots: the length of `mrm_mask` / `mrm_zero`.

    def example(self, ex) -> dict[str, tf.Tensor]:
        """One decoded example's visual inputs."""
        raise NotImplementedError

    def masks(self, visual: dict[str, tf.Tensor], seed: tf.Tensor, prob: float):
        """(mrm_mask, mrm_zero) float32 [slots] for one example."""
        raise NotImplementedError

    def finish(self, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Per-batch work (vectorised over the batch); none by default."""
        return batch


class PixelsInput(VisualInput):
    """`pixels`: the dataset's images, resized and padded to `image_size`, normalised per batch."""

    def __init__(self, config, builder):
        v, name = config.model.visual, config.dataset.name
        if "image" not in builder.info.features:
            raise ValueError(
                f"Dataset {name} has no images (it holds detector region features): set "
                "--config.model.visual.kind=regions, or use a dataset with images such as "
                "tfds_product1m/full or synthetic.")
        self.size, patch = v.image_size, v.patch_size
        if self.size % patch:
            raise ValueError(f"image_size {self.size} is not a multiple of patch_size {patch}: "
                             "fix one.")
        self.slots = (self.size // patch) ** 2

    def example(self, ex):
        """The image in 0..255 (normalised in `finish`)."""
        return {"image": decode_image(ex["image"], self.size)}

    def masks(self, visual, seed, prob):
        return mask_patches(self.slots, seed, prob)

    def finish(self, batch):
        return {**batch, "image": normalize_images(batch["image"])}


class RegionsInput(VisualInput):
    """`regions`: the dataset's detector regions (a `*_regions` config) of the model's width."""

    def __init__(self, config, builder):
        v, name, features = config.model.visual, config.dataset.name, builder.info.features
        if "regions" not in features:
            raise ValueError(
                f"Dataset {name} has no detector region features: use "
                "tfds_product1m/full_regions (README, 'Region features') or "
                "configs/capture.py:demo_regions, or set --config.model.visual.kind=pixels.")
        dim = features["regions"]["features"].shape[-1]
        if dim != v.feature_dim:
            raise ValueError(f"Dataset {name} stores {dim}-d region features but "
                             f"model.visual.feature_dim is {v.feature_dim}: set "
                             f"--config.model.visual.feature_dim={dim}.")
        self.slots = v.num_regions

    def example(self, ex):
        feats, boxes, mask = region_inputs(ex["regions"], self.slots)
        return {"visual_feats": feats, "visual_boxes": boxes, "visual_mask": mask}

    def masks(self, visual, seed, prob):
        return mask_regions(visual["visual_mask"], seed, prob)


VISUAL_INPUTS: dict[str, type[VisualInput]] = {"regions": RegionsInput, "pixels": PixelsInput}


def create(config, builder) -> VisualInput:
    """The input side of `config.model.visual.kind`, checked against the dataset of `builder`."""
    kind = config.model.visual.kind
    if kind not in VISUAL_INPUTS:
        raise ValueError(f"Unknown model.visual.kind {kind!r}: use one of {sorted(VISUAL_INPUTS)}.")
    return VISUAL_INPUTS[kind](config, builder)
