"""Training throughput: examples/s, step time, memory and MFU per setting, plus the input pipeline.

    python bench/train_throughput.py [--variants demo,paper] [--batch_sizes 8,32] [--steps 5]
        [--dtype float32,bfloat16] [--remat none,all] [--mlm_max_predictions 0,8]
        [--attention_impl auto|xla|cudnn] [--pipeline] [--profile_dir DIR]

Every combination of the comma-separated settings is measured (defaults: the variant's dtype,
no remat, MLM logits at every position, attention 'auto'). `--remat all` rematerialises every
layer stack (text, visual, co, joint); `--mlm_max_predictions K` computes MLM logits at the first
K selected positions only (`config.model.mlm_max_predictions`); `--attention_impl cudnn` needs a
GPU and bfloat16.

The step is the real jitted `train_step` of capture_jax/train.py (forward, three losses, backward,
AdamW) on random batches of the variant's shapes, over all local devices as a data-parallel mesh,
compiled ahead of time so XLA's memory analysis of it can be printed (`temp_mib`: the step's
scratch memory, activations included, per device); the median of `--steps` timed steps after two
warm-up steps. FLOPs per example: for `paper` the spec's 41.7 G (less XLA's count of what
`mlm_max_predictions` saves), otherwise 3 x XLA's forward count (with the MLM logits the model
computes); MFU divides the achieved FLOP/s by the device's peak bf16 FLOP/s (none on CPU: MFU is
null there, achieved FLOP/s is printed instead). `--pipeline` also measures the tf.data input
pipeline of the `demo` config (examples/s, on the synthetic data). `--profile_dir` traces three
more steps of the first setting and adds a `profile` line (bench/profile_summary.py: on a CPU, the
XLA ops of the host threads). One JSON line per measurement.
"""

import itertools
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402
from flax import nnx  # noqa: E402

from capture_jax import cli, optim, sharding, train_state  # noqa: E402  (no TensorFlow: see device_check.py)
from capture_jax.models import cost  # noqa: E402
from configs import capture as capture_configs  # noqa: E402
from common import random_batch  # noqa: E402  (bench/)
import profile_summary  # noqa: E402  (bench/)

FLAGS = flags.FLAGS
flags.DEFINE_list("variants", ["demo"], "Variants of configs/capture.py.")
flags.register_validator("variants", lambda names: set(names) <= set(capture_configs.VARIANTS),
                         f"choose among {', '.join(capture_configs.VARIANTS)}")
flags.DEFINE_list("batch_sizes", ["32"], "Global batch sizes.")
flags.DEFINE_integer("steps", 5, "Timed steps (after two warm-up steps); the median counts.")
flags.DEFINE_list("dtype", [], "Compute dtypes, e.g. float32,bfloat16; default: the variant's.")
flags.DEFINE_list("remat", ["none"], "none and/or all (every layer stack).")
flags.DEFINE_list("mlm_max_predictions", ["0"], "MLM logits at every position (0) and/or at K "
                  "selected positions.")
flags.DEFINE_enum("attention_impl", "auto", ["auto", "xla", "cudnn"], "Attention implementation.")
flags.DEFINE_bool("pipeline", False, "Also time the input pipeline.")
flags.DEFINE_string("profile_dir", None, "Where a profile trace of more steps of the first setting "
                    "goes; a line says where the time went (bench/profile_summary.py). "
                    "bench/device_check.py traces by default ($OUT/profile or a temporary dir).")


PROFILE_STEPS = 3  # Steps traced with --profile_dir.


def measure_step(variant: str, batch_size: int, steps: int, dtype: str | None, remat: str,
                 mlm_max_predictions: int, attention_impl: str, profile_dir: str | None = None,
                 profile_steps: int = PROFILE_STEPS, overrides: dict | None = None) -> dict:
    """One setting's line (see the module docstring). `pipelined_step_s` times the same number
    of steps dispatched back to back with one wait at the end: against `step_s` (a wait after
    every step) it shows how much of a step is the host's. With `profile_dir`, `profile_steps`
    more steps are traced there (`jax.profiler`, with a perfetto trace for
    bench/profile_summary.py). `overrides` (dotted config field -> value, e.g.
    {"rng_impl": "unsafe_rbg"}) are applied last."""
    config = capture_configs.get_config(variant)
    config.global_batch_size = batch_size
    if dtype:
        config.model.dtype = dtype
    if remat not in ("none", "all"):
        raise SystemExit(f"--remat {remat!r}: use none or all.")
    for stack in ("text", "visual", "co", "joint"):
        config.model[stack].remat = remat == "all"
    config.model.mlm_max_predictions = mlm_max_predictions
    config.model.attention_impl = attention_impl
    for field, value in (overrides or {}).items():
        *parents, name = field.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
    mesh = sharding.make_mesh({"data": -1})
    rules = sharding.rules("dp")
    tx = optim.create_optimizer(config)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = train_state.create_train_state(
            config, tx, train_state.train_state_shapes(config, mesh, rules, tx))
        batch_sh = sharding.batch_sharding(mesh, rules)
        step_fn = train_state.make_train_step(config, state, batch_sh, mesh)
        batch = jax.device_put(random_batch(config.model, batch_size), batch_sh)
        start = time.perf_counter()
        step_fn = step_fn.lower(state.model, state.opt, batch, 0).compile()
        compile_s = time.perf_counter() - start
        memory = step_fn.memory_analysis()
        model, opt, metrics = step_fn(state.model, state.opt, batch, 0)
        jax.block_until_ready(metrics)
        model, opt, metrics = step_fn(model, opt, batch, 1)
        jax.block_until_ready(metrics)
        times = []
        for i in range(steps):
            start = time.perf_counter()
            model, opt, metrics = step_fn(model, opt, batch, i + 2)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(steps):
            model, opt, metrics = step_fn(model, opt, batch, i + 2 + steps)
        jax.block_until_ready((model, opt, metrics))
        pipelined_s = (time.perf_counter() - start) / steps
        if profile_dir:
            with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
                for i in range(profile_steps):
                    model, opt, metrics = step_fn(model, opt, batch, i + 2 + 2 * steps)
                jax.block_until_ready((model, opt, metrics))
    step_s = statistics.median(times)
    flops = cost.train_flops_per_example(config.model, variant)
    peak = cost.peak_flops(jax.devices()[0])
    examples_per_s = batch_size / step_s
    return {
        "bench": "train_step", "variant": variant, "batch": batch_size,
        "dtype": config.model.dtype, "remat": remat,
        "mlm_max_predictions": config.model.mlm_max_predictions,
        "attention_impl": attention_impl,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "step_s": round(step_s, 4), "pipelined_step_s": round(pipelined_s, 4),
        "examples_per_s": round(examples_per_s, 2),
        "train_gflop_per_example": round(flops / 1e9, 4),
        "achieved_tflop_per_s": round(examples_per_s * flops / 1e12, 4),
        "mfu": round(examples_per_s * flops / (peak * jax.device_count()), 4) if peak else None,
        "temp_mib": round(memory.temp_size_in_bytes / 2**20, 1) if memory else None,
        "compile_s": round(compile_s, 1), "steps_timed": steps,
        "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
    }


def measure_pipeline(batches: int) -> dict:
    """The demo config's tf.data pipeline alone: decode, resize, tokenise, mask, batch."""
    from capture_jax import input_pipeline, vocab  # TensorFlow: only here.

    config = capture_configs.get_config("demo")
    with tempfile.TemporaryDirectory() as workdir:
        builder = input_pipeline.get_builder(config)
        tokenizer = vocab.load_tokenizer(config, workdir, builder)
        iterator = input_pipeline.create_train_iterator(config, builder, tokenizer, start_step=0)
        next(iterator)  # Start-up (and a first-use build of the synthetic data) is not timed.
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        seconds = time.perf_counter() - start
    return {"bench": "input_pipeline", "variant": "demo", "batch": config.global_batch_size,
            "image_size": config.model.visual.image_size,
            "examples_per_s": round(batches * config.global_batch_size / seconds, 1)}


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    logging.set_verbosity(logging.WARNING)
    try:
        batch_sizes = [int(b) for b in FLAGS.batch_sizes]
        mlm_ks = [int(k) for k in FLAGS.mlm_max_predictions]
    except ValueError as e:
        cli.usage_error(f"--batch_sizes and --mlm_max_predictions take integers ({e})",
                        cli.USAGE_STATUS)
    settings = itertools.product(FLAGS.variants, batch_sizes, FLAGS.dtype or [None], FLAGS.remat,
                                 mlm_ks)
    for i, (variant, batch_size, dtype, remat, mlm_k) in enumerate(settings):
        profile_dir = FLAGS.profile_dir if i == 0 else None
        print(json.dumps(measure_step(variant, batch_size, FLAGS.steps, dtype, remat, mlm_k,
                                      FLAGS.attention_impl, profile_dir)), flush=True)
        if profile_dir:
            print(json.dumps(profile_summary.summarize(profile_dir, PROFILE_STEPS)), flush=True)
    if FLAGS.pipeline:
        print(json.dumps(measure_pipeline(batches=40)), flush=True)


if __name__ == "__main__":
    cli.run(main)
