"""Forward FLOPs per example of each model variant, from XLA's cost analysis.

The model is built abstractly (`nnx.eval_shape`) and the forward pass is only lowered, never run,
so even `paper` needs no parameter memory. Counts the full pretraining forward (MLM logits at
every text position, MRM predictions for every region), no dropout. Prints one JSON line.

  python bench/model_flops.py [--variants paper,paper_pixels,demo,demo_regions,tiny]
                              [--batch_size 2]
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere

from absl import flags  # noqa: E402

from capture_jax import cli  # noqa: E402
from capture_jax.models.cost import forward_flops, parameter_count  # noqa: E402
from configs import capture as capture_configs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("variants", list(capture_configs.VARIANTS), "Variants of configs/capture.py.")
flags.register_validator("variants", lambda names: set(names) <= set(capture_configs.VARIANTS),
                         f"choose among {', '.join(capture_configs.VARIANTS)}")
flags.DEFINE_integer("batch_size", 2, "Examples in the lowered forward pass.")


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    result = {}
    for name in FLAGS.variants:
        config = capture_configs.get_config(name).model
        gflop = forward_flops(config, FLAGS.batch_size) / 1e9
        result[name] = dict(
            forward_gflop_per_example=float(f"{gflop:.4g}"),
            params=parameter_count(config),
            text_length=config.text.length,
            visual_kind=config.visual.kind,
        )
    print(json.dumps(dict(benchmark="model_flops", variants=result)))


if __name__ == "__main__":
    cli.run(main)
