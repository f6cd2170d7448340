"""What a model costs: parameter count and FLOPs, from XLA's analysis of the lowered program.

The model is built abstractly (`nnx.eval_shape`) and only lowered, never run, so even `paper`
needs no parameter memory. The trainer uses these for MFU; `bench/model_flops.py` prints them.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from capture_jax.models import capture, frontends

# Training FLOPs per example of `paper` in the reference's accounting (3 x its 13.9 GFLOP
# forward, docs/reference.md): MFU is reported against this number so that it is comparable
# with the paper's.
PAPER_TRAIN_FLOPS_PER_EXAMPLE = 41.7e9

# Peak dense bf16 FLOP/s per device kind (vendor figures), for MFU. Unknown kinds: no MFU.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict:
    """ShapeDtypeStructs of a pretraining batch for `config.model` at its default sizes."""
    text = jax.ShapeDtypeStruct((batch_size, config.text.length), jnp.int32)
    return dict(text_ids=text, text_mask=text, mlm_labels=text,
                **frontends.get(config.visual.kind).abstract_batch(config, batch_size))


def forward_flops(config: ml_collections.ConfigDict, batch_size: int = 2) -> float:
    """XLA's FLOP count of one forward pass, per example.

    Marginal cost, (F(2b) - F(b)) / b, so that batch-independent work (e.g. casting the parameter
    tables to the compute dtype) is not charged to the examples. MLM logits are counted where the
    model computes them (`mlm_max_predictions`). Attention is counted as XLA's maths whatever
    `attention_impl` says (XLA cannot see into a cuDNN kernel), so that MFU compares like with like.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.attention_impl = "auto"
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


def train_flops_per_example(config: ml_collections.ConfigDict, variant: str) -> float:
    """FLOPs of one training example: 3 x XLA's forward count; for `paper` the reference's 41.7 G,
    less 3 x what MLM logits at only `mlm_max_predictions` positions save (XLA's count)."""
    if variant != "paper":
        return 3 * forward_flops(config)
    if config.mlm_max_predictions <= 0:
        return PAPER_TRAIN_FLOPS_PER_EXAMPLE
    everywhere = ml_collections.ConfigDict(config.to_dict())
    everywhere.mlm_max_predictions = 0
    return PAPER_TRAIN_FLOPS_PER_EXAMPLE - 3 * (forward_flops(everywhere) - forward_flops(config))


def peak_flops(device: jax.Device) -> float | None:
    """The device's peak dense bf16 FLOP/s, if known."""
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_BF16_FLOPS.items():
        if kind == name or kind.startswith(name):
            return flops
    return None
