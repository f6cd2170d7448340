"""Forward FLOPs per example of each model variant, from XLA's cost analysis.

The model is built abstractly (`nnx.eval_shape`) and the forward pass is only lowered, never run,
so even `paper` needs no parameter memory. Counts the full pretraining forward (MLM logits at
every text position, MRM predictions for every region), no dropout. Prints one JSON line.

  python bench/model_flops.py [--variants paper,paper_pixels,demo,tiny] [--batch_size 2]
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from capture_jax.models import capture, variants  # noqa: E402


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict:
    """ShapeDtypeStructs of a pretraining batch for `config.model` at its default sizes."""
    b, t, v = batch_size, config.text.length, config.visual
    f32, i32 = jnp.float32, jnp.int32
    batch = dict(text_ids=jax.ShapeDtypeStruct((b, t), i32),
                 text_mask=jax.ShapeDtypeStruct((b, t), i32))
    if v.kind == "regions":
        r = v.num_regions
        batch.update(visual_feats=jax.ShapeDtypeStruct((b, r, v.feature_dim), f32),
                     visual_boxes=jax.ShapeDtypeStruct((b, r, 5), f32),
                     visual_mask=jax.ShapeDtypeStruct((b, r), i32))
    else:
        r = (v.image_size // v.patch_size) ** 2
        batch["image"] = jax.ShapeDtypeStruct((b, v.image_size, v.image_size, 3), f32)
    batch.update(mrm_mask=jax.ShapeDtypeStruct((b, r), i32),
                 mrm_zero=jax.ShapeDtypeStruct((b, r), i32))
    return batch


def forward_flops(config: ml_collections.ConfigDict, batch_size: int = 2) -> float:
    """XLA's FLOP count of one forward pass, per example.

    Marginal cost, (F(2b) - F(b)) / b, so that batch-independent work (e.g. casting the parameter
    tables to the compute dtype) is not charged to the examples.
    """
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: capture.CaptureModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)

    def forward(state, batch):
        return nnx.merge(graphdef, state)(batch, train=False)

    def flops(b: int) -> float:
        lowered = jax.jit(forward).lower(state, abstract_batch(config, b))
        return float(lowered.cost_analysis()["flops"])

    return (flops(2 * batch_size) - flops(batch_size)) / batch_size


def parameter_count(config: ml_collections.ConfigDict) -> int:
    """Number of parameters (tied MLM decoder counted once), without allocating them."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: capture.CaptureModel(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(variants.VARIANTS))
    parser.add_argument("--batch_size", type=int, default=2)
    args = parser.parse_args()
    result = {}
    for name in args.variants.split(","):
        config = variants.model_config(name)
        gflop = forward_flops(config, args.batch_size) / 1e9
        result[name] = dict(
            forward_gflop_per_example=float(f"{gflop:.4g}"),
            params=parameter_count(config),
            text_length=config.text.length,
            visual_kind=config.visual.kind,
        )
    print(json.dumps(dict(benchmark="model_flops", variants=result)))


if __name__ == "__main__":
    main()
