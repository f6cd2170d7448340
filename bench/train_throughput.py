"""Training throughput: examples/s, step time and MFU per (variant, batch), plus the input pipeline.

    python bench/train_throughput.py [--variants demo,paper] [--batch_sizes 8,32] [--steps 5]
        [--dtype float32|bfloat16] [--remat] [--pipeline]

The step is the real jitted `train_step` of capture_jax/train.py (forward, three losses, backward,
AdamW) on random batches of the variant's shapes, over all local devices as a data-parallel mesh;
the median of `--steps` timed steps after two warm-up steps. MFU uses the spec's 41.7 GFLOP per
example for `paper` and 3 x XLA's forward count otherwise, against the device's peak bf16 FLOP/s
(none on CPU: MFU is null there, achieved FLOP/s is printed instead). `--pipeline` also measures
the tf.data input pipeline of the `demo` config (examples/s, on the synthetic data). One JSON line
per measurement.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from flax import nnx  # noqa: E402

from capture_jax import input_pipeline, optim, sharding, train  # noqa: E402
from capture_jax.models import cost  # noqa: E402
from configs import capture as capture_configs  # noqa: E402


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
    labels = rng.integers(5, model_config.vocab_size, batch["text_ids"].shape)
    batch["mlm_labels"] = np.where(rng.uniform(size=labels.shape) < 0.15, labels, -1).astype(np.int32)
    return batch


def measure_step(variant: str, batch_size: int, steps: int, dtype: str | None, remat: bool) -> dict:
    config = capture_configs.get_config(variant)
    config.global_batch_size = batch_size
    if dtype:
        config.model.dtype = dtype
    for stack in ("text", "visual", "co", "joint"):
        config.model[stack].remat = remat
    mesh = sharding.make_mesh({"data": -1})
    rules = sharding.rules("dp")
    tx = optim.create_optimizer(config)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = train.create_train_state(config, mesh, rules, tx)
        batch_sh = sharding.batch_sharding(mesh, rules)
        step_fn = train.make_train_step(config, state, batch_sh, mesh)
        batch = jax.device_put(random_batch(config.model, batch_size), batch_sh)
        start = time.perf_counter()
        model, opt, metrics = step_fn(state.model, state.opt, batch, 0)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        model, opt, metrics = step_fn(model, opt, batch, 1)
        jax.block_until_ready(metrics)
        times = []
        for i in range(steps):
            start = time.perf_counter()
            model, opt, metrics = step_fn(model, opt, batch, i + 2)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = cost.train_flops_per_example(config.model, variant)
    peak = cost.peak_flops(jax.devices()[0])
    examples_per_s = batch_size / step_s
    return {
        "bench": "train_step", "variant": variant, "batch": batch_size,
        "dtype": config.model.dtype, "remat": remat,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "step_s": round(step_s, 4), "examples_per_s": round(examples_per_s, 2),
        "train_gflop_per_example": round(flops / 1e9, 4),
        "achieved_tflop_per_s": round(examples_per_s * flops / 1e12, 4),
        "mfu": round(examples_per_s * flops / (peak * jax.device_count()), 4) if peak else None,
        "first_step_s_incl_compile": round(compile_s, 1), "steps_timed": steps,
        "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
    }


def measure_pipeline(batches: int) -> dict:
    """The demo config's tf.data pipeline alone: decode, resize, tokenise, mask, batch."""
    config = capture_configs.get_config("demo")
    with tempfile.TemporaryDirectory() as workdir:
        iterator = input_pipeline.create_train_iterator(config, workdir, start_step=0)
        next(iterator)  # Start-up (and a first-use build of the synthetic data) is not timed.
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        seconds = time.perf_counter() - start
    return {"bench": "input_pipeline", "variant": "demo", "batch": config.global_batch_size,
            "image_size": config.model.visual.image_size,
            "examples_per_s": round(batches * config.global_batch_size / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="demo")
    parser.add_argument("--batch_sizes", default="32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default=None, help="compute dtype; default: the variant's")
    parser.add_argument("--remat", action="store_true", help="rematerialise every layer stack")
    parser.add_argument("--pipeline", action="store_true", help="also time the input pipeline")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    for variant in args.variants.split(","):
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            print(json.dumps(measure_step(variant, batch_size, args.steps, args.dtype, args.remat)),
                  flush=True)
    if args.pipeline:
        print(json.dumps(measure_pipeline(batches=40)), flush=True)


if __name__ == "__main__":
    main()
