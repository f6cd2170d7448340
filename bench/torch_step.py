"""The authors' model (bench/torch_reference.py) trained in PyTorch, one batch size, for
bench/device_check.py: eager, then `torch.compile`d, on the same batch as our step.

    python bench/torch_step.py --job '{"variant": "paper", "batch": 256, "model": {...},
        "shapes": {...}, "steps": 5, "modes": ["eager", "compile"]}'

`model` is our `config.model` as a dict (the reference takes its sizes and dropout rates),
`shapes` the batch keys -> [shape, dtype] (bench/common.py `batch_shapes`); the batch is drawn by
bench/batches.py with the same seed as ours, so both frameworks train on the same numbers. It
imports PyTorch, numpy and absl, nothing of JAX: the device check runs it in a process of its
own (GPU memory is not shared with JAX's allocator) and, for a CPU dry run, under another Python
where PyTorch is installed (`--torch_python`).

Per mode one JSON line: on a CUDA device bfloat16 autocast, float32 matmuls outside it at
TF32 ("high", as XLA's default on GPUs), fused AdamW; on a CPU bfloat16 autocast and the default
AdamW. `torch_reference.train_step` is the whole step (forward, losses, backward, clipping,
AdamW, the norms); `step_s` is the median of `steps` timed steps (each waited for) after two
warm-ups, `pipelined_step_s` the same number back to back with one wait, `first_step_s` the
first warm-up (for `compile`: the compilation), `peak_device_mib` the largest allocation of
that mode (CUDA only).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402

import batches  # noqa: E402  (bench/)
import torch_reference  # noqa: E402  (bench/)

FLAGS = flags.FLAGS
flags.DEFINE_string("job", None, "The measurement as JSON (see the module docstring).",
                    required=True)


def namespace(value):
    """A config dict as attributes (what `ReferenceConfig.from_model_config` reads)."""
    if isinstance(value, dict):
        return types.SimpleNamespace(**{k: namespace(v) for k, v in value.items()})
    return value


def measure(job: dict, mode: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    config = torch_reference.ReferenceConfig.from_model_config(namespace(job["model"]))
    model = torch_reference.CaptureReference(config).to(device).train()
    opt = torch_reference.make_optimizer(model, **(dict(fused=True) if cuda else {}))
    shapes = {k: (tuple(shape), dtype) for k, (shape, dtype) in job["shapes"].items()}
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in
             batches.random_batch(shapes, job["model"]["vocab_size"], job.get("seed", 0)).items()}
    backend = job.get("compile_backend", "inductor")
    forward = torch.compile(model, backend=backend) if mode == "compile" else model
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return torch_reference.train_step(forward, opt, batch)

    start = time.perf_counter()
    step()
    sync()
    first_s = time.perf_counter() - start
    step()
    sync()
    times = []
    for _ in range(job["steps"]):
        start = time.perf_counter()
        metrics = step()
        sync()
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(job["steps"]):
        metrics = step()
    sync()
    pipelined_s = (time.perf_counter() - start) / job["steps"]
    step_s = statistics.median(times)
    return {
        "bench": "torch_step", "mode": mode, "variant": job["variant"], "batch": job["batch"],
        "autocast": "bfloat16", "adamw": "fused" if cuda else "default",
        "compile_backend": backend if mode == "compile" else None,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "step_s": round(step_s, 4),
        "pipelined_step_s": round(pipelined_s, 4),
        "examples_per_s": round(job["batch"] / step_s, 2), "first_step_s": round(first_s, 1),
        "peak_device_mib": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                            if cuda else None),
        "steps_timed": job["steps"], "loss_finite": bool(torch.isfinite(metrics["loss"])),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    job = json.loads(FLAGS.job)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    for mode in job.get("modes", ["eager", "compile"]):
        print(json.dumps(measure(job, mode, device)), flush=True)


if __name__ == "__main__":
    app.run(main)
