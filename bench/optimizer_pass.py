"""The optimiser's pass over the parameters: `optim.create_optimizer` against the optax chain.

    python bench/optimizer_pass.py [--variant paper] [--repeats 5]

Times what a train step spends after the gradient: the update of `optim.create_optimizer(config)`
(the fused `clipped_adamw`), applied to the parameters, plus the gradient and parameter norms the
step logs; and the same with `optim.optax_chain` (clip_by_global_norm + optax.adamw, the same
numbers). Parameters of the variant's shapes (148M for `paper`), fixed random gradients, donated
state as in the step; both compiled first, then `--repeats` rounds interleaved (order alternating),
median and range of each. Also counts, from XLA's compiled program, the fusions that write a
parameter-sized array (passes over memory) per parameter. One JSON line.
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from capture_jax import cli, optim, sharding  # noqa: E402
from capture_jax.models import capture  # noqa: E402
from common import interleaved, update_with_norms  # noqa: E402  (bench/)
from configs import capture as capture_configs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("variant", "paper", "A variant of configs/capture.py.")
flags.DEFINE_integer("repeats", 5, "Timed rounds of each.")


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    config = capture_configs.get_config(FLAGS.variant)
    mesh, rules = sharding.make_mesh({"data": -1}), sharding.rules("dp")
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        abstract = nnx.eval_shape(lambda: capture.CaptureModel(config.model, rngs=nnx.Rngs(0)))
    shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    rng = np.random.default_rng(0)
    draw = lambda: jax.tree.map(
        lambda s: jax.numpy.asarray(0.02 * rng.standard_normal(s.shape, np.float32)), shapes)
    grads = draw()
    txs = {"fused": optim.create_optimizer(config),
           "optax_chain": optim.optax_chain(config, optim.learning_rate_schedule(config))}
    steps, states, writes = {}, {}, {}

    def run(name):  # One update of `name`'s donated state.
        states[name][0], states[name][1], *norms = steps[name](*states[name], grads)
        jax.block_until_ready(norms)

    for name, tx in txs.items():
        params = draw()
        compiled = jax.jit(update_with_norms(tx), donate_argnums=(0, 1)).lower(
            params, tx.init(params), grads).compile()
        entry = compiled.as_text().split("ENTRY", 1)[1].splitlines()
        matrices = [f"f32[{','.join(map(str, p.shape))}]" for p in jax.tree.leaves(params)
                    if p.ndim == 2]
        writes[name] = round(sum(any(f"= {s}" in line for s in set(matrices)) and "fusion("
                                 in line for line in entry) / len(matrices), 2)
        steps[name], states[name] = compiled, [params, tx.init(params)]
        for _ in range(2):  # Warm-up.
            run(name)
    times = interleaved(FLAGS.repeats, {name: lambda name=name: run(name) for name in txs})
    line = {"bench": "optimizer_pass", "variant": FLAGS.variant,
            "parameters": int(sum(np.prod(p.shape) for p in jax.tree.leaves(shapes))),
            "repeats": FLAGS.repeats, "cpus": os.cpu_count(),
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
    for name, t in times.items():
        line[f"{name}_s"] = round(statistics.median(t), 4)
        line[f"{name}_s_range"] = [round(min(t), 4), round(max(t), 4)]
        line[f"{name}_matrix_writes_per_parameter"] = writes[name]
    line["speedup"] = round(line["optax_chain_s"] / line["fused_s"], 2)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    cli.run(main)
