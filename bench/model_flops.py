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


from capture_jax.models import variants  # noqa: E402
from capture_jax.models.cost import forward_flops, parameter_count  # noqa: E402


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
