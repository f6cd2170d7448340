"""One accelerator check in one go: our `paper` step against the authors' model in PyTorch on the
same chip, MFU, the speed options, and the ranker.

    python bench/device_check.py [--budget_s 330] [--batches 256,512,1024] [--jobs ...]
    python bench/device_check.py --tiny     # a CPU dry run of every code path

Every measurement runs in a process of its own (bench/device_measure.py for ours and the ranker,
bench/torch_step.py for PyTorch), so JAX and PyTorch never share the GPU's memory, and a job
still running at its time limit is killed and reported while the others go on. Prints one JSON
line per measurement, flushed as it goes:
  * `env`: JAX, Flax and Optax versions, the devices, the bf16 peak used for MFU; `torch_env`:
    PyTorch's version and device, or why PyTorch is not there (its jobs are then `skipped`);
  * `train_step` (ours, bench/train_throughput.py's measurement: the real jitted step on random
    batches of the variant's shapes, median of timed steps after two warm-ups): `paper` in
    bfloat16 at each of `--batches`; step time, examples/s, FLOPs counted, MFU, XLA's scratch
    memory, peak device memory; `profile` after the first (`--profile_steps`);
  * `torch_step` (bench/torch_step.py: the reference model, bfloat16 autocast, eager then
    `torch.compile`d) on the same batch (same shapes, same numbers) at the same batch size, with
    its MFU counted as ours, and a `ratio` line: our examples/s over the faster PyTorch's;
  * the options (`--options`, at `--options_batch`): ours with one config field changed each,
    e.g. the dropout PRNG `rng_impl=unsafe_rbg`, MLM logits at 16 masked positions only
    (`model.mlm_max_predictions=16`, counted at the FLOPs that step needs);
  * `ranker`: the evaluator's exact top-100 for 6,547 1024-d queries over `--ranker_sizes`
    rows by `screen` and `exact`, and `ranker_choice`: which was faster at each size, against
    `capture_jax.evaluators.ranker.ACCELERATOR_AUTO` (what `auto` runs on accelerators);
  * `skipped` (no time left, or no PyTorch) and `error` (a job that failed or ran out of time).

MFU = examples/s x train FLOPs per example / the chip's peak dense bfloat16 FLOP/s
(capture_jax/models/cost.py): for `paper` the reference's count, 41.7 GFLOP (3 x the forward,
MLM logits at every position); with `model.mlm_max_predictions` = K the step's own count, 41.7 G
less 3 x what XLA counts the skipped logits at; for other variants 3 x XLA's forward count.

`--budget_s` is the whole run's limit: a job gets at most its kind's cap (`--job_cap_s`) and
never past the budget; one with less than 20 s left is skipped. Compilations are cached under
`--cache_dir` (JAX's persistent cache, TorchInductor's), so a second run on the same machine
compiles less and gets further. Imports nothing of TensorFlow, TFDS, Orbax or clu.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
flags.DEFINE_bool("tiny", False, "CPU dry run: the `tiny` variant (with region features, so "
                  "the PyTorch reference runs it too), a small ranker, two timed steps.")
flags.DEFINE_float("budget_s", 330.0, "Wall-clock limit of the whole run, in seconds.")
flags.DEFINE_list("batches", ["256", "512", "1024"], "Global batch sizes, ours and PyTorch's.")
flags.DEFINE_list("options", ["rng_impl=unsafe_rbg", "model.mlm_max_predictions=16"],
                  "Config changes measured one at a time at --options_batch.")
flags.DEFINE_integer("options_batch", 512, "Batch size of the --options jobs.")
flags.DEFINE_list("jobs", [], "Replaces the default job list: ours:BATCH[:FIELD=VALUE...], "
                  "torch:BATCH, ranker (in the order given).")
flags.DEFINE_list("ranker_sizes", ["1000000", "10000000"], "Gallery sizes for the ranker.")
flags.DEFINE_list("ranker_methods", ["screen", "exact"], "Ranking methods measured per size.")
flags.DEFINE_integer("steps", 5, "Timed steps per setting, ours and PyTorch's.")
flags.DEFINE_integer("profile_steps", 3, "Steps traced after the first of ours (0: none).")
flags.DEFINE_string("profile_dir", None, "Where the trace goes (default: $OUT/profile when $OUT "
                    "is set, else a temporary directory).")
flags.DEFINE_string("torch_python", sys.executable, "The Python that runs PyTorch (it needs "
                    "torch, numpy and absl only).")
flags.DEFINE_string("cache_dir", "/tmp/capture_jax_device_cache", "Compilation caches (empty: "
                    "none; --tiny: none).")
flags.DEFINE_list("job_cap_s", ["env=60", "ours=150", "torch=240", "ranker=200"],
                  "Per job kind, the most seconds one job may take.")

MIN_JOB_S = 20.0  # A job with less time left than this is skipped.


def say(line: dict) -> None:
    print(json.dumps(line), flush=True)


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def job_list() -> list[tuple[str, int | None, dict]]:
    """(kind, batch, overrides), most important first: the budget may cut the tail."""
    if FLAGS.jobs:
        jobs = []
        for item in FLAGS.jobs:
            kind, *rest = item.split(":")
            if kind not in ("ours", "torch", "ranker") or (kind != "ranker" and not rest):
                raise app.UsageError(f"--jobs item {item!r}: use ours:BATCH[:FIELD=VALUE...], "
                                     "torch:BATCH or ranker.")
            overrides = dict((k, parse_value(v)) for k, v in (o.split("=", 1) for o in rest[1:]))
            jobs.append((kind, int(rest[0]) if rest else None, overrides))
        return jobs
    batches = [8] if FLAGS.tiny else [int(b) for b in FLAGS.batches]
    options_batch = 8 if FLAGS.tiny else FLAGS.options_batch
    option_items = (["rng_impl=unsafe_rbg", "model.mlm_max_predictions=4"]  # T = 8 in tiny.
                    if FLAGS.tiny and not FLAGS["options"].present else FLAGS.options)
    options = [dict([(k, parse_value(v))]) for k, v in (o.split("=", 1) for o in option_items)]
    jobs = [("ours", batches[0], {}), ("torch", batches[0], {})]  # The 1.5x goal is at 256.
    jobs += [("ours", b, {}) for b in batches[1:]] + [("ranker", None, {})]
    jobs += [("ours", options_batch, o) for o in options]
    jobs += [("torch", b, {}) for b in batches[1:]]
    return jobs


def run_child(argv: list[str], limit_s: float, env: dict) -> list[dict]:
    """Runs a measurement process, relaying its JSON lines as they come; kills it at `limit_s`."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=os.path.dirname(BENCH))
    deadline, lines, buffer = time.monotonic() + limit_s, [], ""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"still running after {limit_s:.0f} s (killed)")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 5.0))
        if ready:
            chunk = proc.stdout.readline()
            if not chunk:
                break
            buffer = chunk
            if buffer.startswith("{"):
                lines.append(json.loads(buffer))
                say(lines[-1])
    stderr = proc.stderr.read()
    if proc.wait() != 0:
        tail = [s for s in stderr.strip().splitlines() if s.strip()][-3:]
        raise RuntimeError(f"exit status {proc.returncode}: " + " | ".join(tail)[-1500:])
    return lines


def torch_available(env: dict) -> dict:
    probe = ("import json, torch, absl; print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.cuda.is_available(), 'device': torch.cuda.get_device_name(0) "
             "if torch.cuda.is_available() else 'cpu'}))")
    run = subprocess.run([FLAGS.torch_python, "-c", probe], capture_output=True, text=True,
                         env=env, timeout=120)
    if run.returncode:
        why = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return {"bench": "torch_env", "available": False, "python": FLAGS.torch_python,
                "why": f"PyTorch is not importable by {FLAGS.torch_python} ({why}): its jobs "
                       "are skipped; give --torch_python a Python that has torch and absl."}
    return {"bench": "torch_env", "available": True, "python": FLAGS.torch_python,
            **json.loads(run.stdout.strip().splitlines()[-1])}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    start = time.monotonic()
    from configs import capture as capture_configs
    from common import batch_shapes  # Shapes only: JAX is imported, no device is touched.

    caps = {k: float(v) for k, v in (item.split("=") for item in FLAGS.job_cap_s)}
    budget = FLAGS.budget_s
    if FLAGS.tiny and not FLAGS["budget_s"].present:  # A CPU dry run is cut by nothing but errors.
        budget, caps = 3600.0, {k: 1200.0 for k in caps}
    variant = "tiny" if FLAGS.tiny else "paper"
    env = dict(os.environ)
    cache = "" if FLAGS.tiny else FLAGS.cache_dir
    if cache:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(cache, "jax"))
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "inductor"))
    profile_dir = FLAGS.profile_dir or (os.path.join(os.environ["OUT"], "profile")
                                        if os.environ.get("OUT") else tempfile.mkdtemp())
    sizes = [2000] if FLAGS.tiny else [int(s) for s in FLAGS.ranker_sizes if s]
    queries, dim = (64, 32) if FLAGS.tiny else (6547, 1024)
    base_overrides = {"model.visual.kind": "regions"} if FLAGS.tiny else {}
    measure = [sys.executable, os.path.join(BENCH, "device_measure.py"), "--job"]
    env_lines = run_child(measure + [json.dumps({"kind": "env"})], caps["env"], env)
    peak = (env_lines[0].get("peak_bf16_tflop_per_s") or 0) * 1e12 if env_lines else 0
    jobs = job_list()
    torch_env = (torch_available(env) if any(kind == "torch" for kind, _, _ in jobs)
                 else {"available": False})
    if any(kind == "torch" for kind, _, _ in jobs):
        say(torch_env)
    ours, first_ours, ranker_lines = {}, True, []
    for kind, batch, overrides in jobs:
        what = f"{kind} {variant}" + (f" batch {batch}" if batch else "") + "".join(
            f" {k}={v}" for k, v in overrides.items())
        left = budget - (time.monotonic() - start)
        if kind == "torch" and not torch_env["available"]:
            say({"bench": "skipped", "what": what, "why": "no PyTorch (see torch_env)"})
            continue
        if kind == "ranker" and not sizes:
            continue
        if left < MIN_JOB_S:
            say({"bench": "skipped", "what": what, "why": f"over the budget ({left:.0f} s left)"})
            continue
        if kind == "ours":
            job = {"kind": "train", "variant": variant, "batch": batch,
                   "steps": 2 if FLAGS.tiny else FLAGS.steps,
                   "overrides": {**base_overrides, **overrides},
                   "profile_steps": FLAGS.profile_steps if first_ours else 0,
                   "profile_dir": profile_dir}
            argv = measure + [json.dumps(job)]
        elif kind == "torch":
            config = capture_configs.get_config(variant)
            if FLAGS.tiny:
                config.model.visual.kind = "regions"
            job = {"variant": variant, "batch": batch, "model": config.model.to_dict(),
                   "shapes": batch_shapes(config.model, batch),
                   "steps": 2 if FLAGS.tiny else FLAGS.steps,
                   # A CPU dry run traces and differentiates the graph without generating code:
                   # TorchInductor's C++ build alone takes minutes on 2 cores.
                   "compile_backend": "aot_eager" if FLAGS.tiny else "inductor"}
            argv = [FLAGS.torch_python, os.path.join(BENCH, "torch_step.py"), "--job",
                    json.dumps(job)]
        else:
            argv = measure + [json.dumps({"kind": "ranker", "sizes": sizes, "queries": queries,
                                          "dim": dim, "methods": FLAGS.ranker_methods})]
        try:
            lines = run_child(argv, min(caps[kind], left), env)
        except Exception as e:  # Reported as a line: the remaining measurements still run.
            say({"bench": "error", "what": what, "error": f"{type(e).__name__}: {e}"[:2000],
                 "elapsed_s": round(time.monotonic() - start, 1)})
            continue
        finally:
            first_ours = first_ours and kind != "ours"
        if kind == "ours" and not overrides and lines:
            ours[batch] = lines[0]
        elif kind == "torch":
            report_ratio(batch, ours.get(batch), lines, peak)
        elif kind == "ranker":
            ranker_lines += lines
    if ranker_lines:
        report_ranker_choice(ranker_lines)
    say({"bench": "done", "elapsed_s": round(time.monotonic() - start, 1)})


def report_ratio(batch: int, ours: dict | None, torch_lines: list[dict], peak: float) -> None:
    """Each PyTorch mode's MFU (our FLOP count) and our examples/s over the faster one's."""
    gflop = ours["train_gflop_per_example"] if ours else None
    modes = {}
    for line in torch_lines:
        modes[line["mode"]] = line["examples_per_s"]
    faster = max(modes, key=modes.get) if modes else None
    line = {"bench": "ratio", "batch": batch,
            "ours_examples_per_s": ours["examples_per_s"] if ours else None,
            **{f"torch_{m}_examples_per_s": v for m, v in modes.items()},
            **{f"torch_{m}_mfu": round(v * gflop * 1e9 / peak, 4) if gflop and peak else None
               for m, v in modes.items()},
            "ours_mfu": ours.get("mfu") if ours else None, "faster_torch": faster,
            "ratio": round(ours["examples_per_s"] / modes[faster], 3) if ours and faster else None}
    say(line)


def report_ranker_choice(lines: list[dict]) -> None:
    """Per gallery size, the faster method; against what `auto` runs on accelerators now."""
    from capture_jax.evaluators import ranker

    by_size = {}
    for line in lines:
        by_size.setdefault(line["gallery"], {})[line["method"]] = line["seconds"]
    faster = {size: min(times, key=times.get) for size, times in by_size.items()}
    say({"bench": "ranker_choice", "seconds": {str(k): v for k, v in by_size.items()},
         "faster": {str(k): v for k, v in faster.items()},
         "accelerator_auto_now": ranker.ACCELERATOR_AUTO})


if __name__ == "__main__":
    app.run(main)
