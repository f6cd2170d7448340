"""The train step and the evaluator's embedding step compiled for a TPU slice that is not here.

    python -m capture_jax.aot --config configs/capture.py:paper --topology v5p:2x2x1
    python -m capture_jax.aot --config configs/capture.py:paper --topology v6e:2x4 \\
        --batch_per_chip 512
    python -m capture_jax.aot --config configs/capture.py:paper --topology v5p:4x4x4 \\
        --config.mesh.data=1 --config.mesh.fsdp=-1 --config.sharding_rules=fsdp

`--topology` names a TPU generation (v4, v5e, v5p, v6e) and its grid of chips, as
`jax.experimental.topologies` does; libtpu's compiler then compiles, on this CPU machine, the
very programs a run would execute there: `train_state.make_train_step` and
`evaluators.embedding.embedder`, lowered from `jax.ShapeDtypeStruct`s that carry the run's
shardings on a mesh over the slice's abstract devices. Per chip it prints what the compiler
reports: HBM for arguments, temporaries and outputs against the chip's HBM, XLA's FLOPs beside
the model's count (`models/cost.py`), and the step time of XLA's cost model with the MFU it
implies. Those two are **estimates of XLA's cost model, never measurements**.

Without `--batch_per_chip` it finds the largest per-chip batch that fits: memory is close to
linear in the batch, so two compiles give a line, the line gives a batch, and compiles at that
batch (stepping down if the compiler says it does not fit) confirm it.

Needs libtpu, which `requirements.txt` leaves out (CPU and GPU users never download it): the
version `jax[tpu]` pins for our JAX, `pip install libtpu==0.0.48.1` (or anywhere, with
`TPU_LIBRARY_PATH` pointing at its `libtpu.so`). JAX itself stays on the CPU here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags, logging
from flax import nnx
from jax.experimental import topologies
from ml_collections import config_flags

from capture_jax import cli, optim, sharding, train_state
from capture_jax.models import cost

LIBTPU_VERSION = "0.0.48.1"  # What jax[tpu]==0.11.2 pins (libtpu==0.0.48.*).
GIB = 2**30

# HBM per chip (vendor figures) by the abstract device's kind; the compiler's own limit is a
# little lower and is what decides whether a program fits.
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB,
             "TPU v6 lite": 32 * GIB}

# absl's global flags, as main.py's (config overrides, --config.FIELD=VALUE, need them); only
# tests import this module besides the command.
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/capture.py:VARIANT; override fields with "
                                "--config.FIELD=VALUE.")
flags.DEFINE_string("topology", None, "A TPU slice: GENERATION:GRID, e.g. v5p:2x2x1, v5p:2x2x2, "
                    "v4:2x2x2, v5e:2x4, v6e:2x4, v6e:16x16.")
flags.DEFINE_integer("batch_per_chip", 0, "Examples per chip in the train step (the global batch "
                     "is this times the chips); 0 finds the largest that fits.")
flags.DEFINE_list("probe_batches", ["64", "256"], "Per-chip batches of the two compiles that fit "
                  "the memory line when searching.")
flags.DEFINE_integer("batch_multiple", 8, "The batch found is a multiple of this.")
flags.DEFINE_integer("max_batch_per_chip", 4096, "The search goes no higher.")
flags.DEFINE_bool("embed", True, "Also compile the evaluator's embedding step.")
flags.DEFINE_string("hlo_dir", None, "Write the compiled train step's HLO text here.")


def say(line: dict) -> None:
    print(json.dumps(line), flush=True)


@contextlib.contextmanager
def _libtpu_start_quiet():
    """Runs the block with stderr (file descriptor 2) held back, and writes it back only if the
    block fails: libtpu starting on a machine without a TPU VM's metadata logs warnings about
    it (host bounds, worker hostnames) that do not matter for compiling."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def tpu_devices(topology: str) -> list:
    """The abstract TPU devices of `topology`, one per chip (megacore chips as one device)."""
    if not re.fullmatch(r"v[0-9][a-z]*:[0-9]+(x[0-9]+){1,2}", topology):
        raise ValueError(f"TPU topology {topology!r} is not GENERATION:GRID: name one like "
                         "v5p:2x2x1, v5e:2x4 or v6e:4x4.")
    try:
        with _libtpu_start_quiet():
            devices = topologies.get_topology_desc(topology, "tpu").devices
        chips = {tuple(d.coords) for d in devices}
        if len(chips) < len(devices):  # Two TensorCores per chip (v4): one device per chip.
            devices = topologies.get_topology_desc(topology, "tpu",
                                                   chip_config_name="megacore").devices
    except RuntimeError as e:
        if "not installed" in str(e):
            raise RuntimeError(
                "Compiling for a TPU needs libtpu, which requirements.txt leaves out: "
                f"pip install libtpu=={LIBTPU_VERSION} (or set TPU_LIBRARY_PATH to its "
                "libtpu.so).") from None
        if "INVALID_ARGUMENT" not in str(e):
            raise
        raise ValueError(f"libtpu knows no TPU topology {topology!r} ({cli.last_line(e)}): name "
                         "one like v5p:2x2x1, v5e:2x4 or v6e:4x4.") from None
    return list(devices)


@dataclasses.dataclass
class Compiled:
    """What the compiler says about one program on one chip (all sizes in bytes)."""

    batch_per_chip: int
    fits: bool
    arguments: int = 0
    temporaries: int = 0
    outputs: int = 0  # Not counting those that reuse donated arguments' buffers.
    code: int = 0
    flops: float = 0.0  # XLA's count, per chip.
    bytes_accessed: float = 0.0  # XLA's count of HBM traffic, per chip.
    seconds: float = 0.0  # XLA's cost model (`optimal_seconds`): an estimate.
    fusions: int = 0
    compile_s: float = 0.0
    compiler_limit: int = 0  # HBM the compiler allows, when it said the program does not fit.
    hlo: str = ""

    @property
    def hbm(self) -> int:
        return self.arguments + self.temporaries + self.outputs + self.code


def analyse(compiled, batch_per_chip: int, compile_s: float) -> Compiled:
    mem = compiled.memory_analysis()
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs
    hlo = compiled.as_text()
    return Compiled(
        batch_per_chip, True, mem.argument_size_in_bytes, mem.temp_size_in_bytes,
        mem.output_size_in_bytes - mem.alias_size_in_bytes, mem.generated_code_size_in_bytes,
        float(costs.get("flops", 0.0)), float(costs.get("bytes accessed", 0.0)),
        float(costs.get("optimal_seconds", 0.0)), len(re.findall(r"\bfusion\(", hlo)),
        compile_s, hlo=hlo)


_OUT_OF_MEMORY = re.compile(r"Used ([0-9.]+)([KMGT]) of ([0-9.]+)([KMGT]) hbm")


def compile_or_oom(lower, batch_per_chip: int) -> Compiled:
    """Compiles `lower()`; a program too large for HBM comes back with `fits` False and the
    compiler's figure of what it would use (as `temporaries`)."""
    start = time.perf_counter()
    lowered = lower()
    try:
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError; RESOURCE_EXHAUSTED when it does not fit.
        found = _OUT_OF_MEMORY.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        scale = {"K": 2**10, "M": 2**20, "G": GIB, "T": 2**40}
        used, allowed = (float(found.group(i)) * scale[found.group(i + 1)] for i in (1, 3))
        return Compiled(batch_per_chip, False, temporaries=int(used),
                        compile_s=time.perf_counter() - start, compiler_limit=int(allowed))
    return analyse(compiled, batch_per_chip, time.perf_counter() - start)


def for_tpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with what `auto` settings mean on a TPU (decided there from
    `jax.default_backend()`, which is the CPU here)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.model.embedding_grad == "auto":
        config.model.embedding_grad = "dense"
    if config.model.attention_impl == "cudnn":
        raise ValueError("attention_impl='cudnn' is for NVIDIA GPUs: use "
                         "--config.model.attention_impl=auto on a TPU.")
    return config


class Program:
    """The run's mesh, rules and abstract states on `devices`; lowers its steps at any batch."""

    def __init__(self, config: ml_collections.ConfigDict, devices: Sequence):
        from capture_jax import experiment  # Imports TensorFlow (quietly, see main).

        self.config = for_tpu(config)
        self.devices = devices
        self.mesh = sharding.make_mesh(dict(self.config.mesh), devices)
        self.rules = sharding.rules(self.config.sharding_rules)
        self.check_batch = experiment.check_batch
        self.tx = optim.create_optimizer(self.config)
        with self.context():
            self.shapes = train_state.train_state_shapes(self.config, self.mesh, self.rules,
                                                         self.tx)
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)

    @contextlib.contextmanager
    def context(self):
        """The mesh and the logical axis rules, as `Experiment.context`."""
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            yield

    def _abstract(self, batch: dict) -> dict:
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
                for k, v in batch.items()}

    def _states(self):
        with_sharding = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
        return (jax.tree.map(with_sharding, self.shapes.model, self.shapes.model_sharding),
                jax.tree.map(with_sharding, self.shapes.opt, self.shapes.opt_sharding))

    def train(self, batch_per_chip: int) -> Compiled:
        config = ml_collections.ConfigDict(self.config.to_dict())
        config.global_batch_size = batch_per_chip * len(self.devices)
        self.check_batch(config, self.mesh)

        def lower():
            with self.context():
                step = train_state.make_train_step(config, self.shapes, self.batch_sharding,
                                                   self.mesh)
                batch = self._abstract(cost.abstract_batch(config.model, config.global_batch_size))
                return step.lower(*self._states(), batch, jax.ShapeDtypeStruct((), jnp.int32))
        return compile_or_oom(lower, batch_per_chip)

    def embed(self) -> Compiled:
        """The evaluator's embedding step at the run's batch (`evals.retrieval.batch_size` per
        host); for the first evaluator of type retrieval."""
        from capture_jax.evaluators import baselines, embedding

        evals = [e for e in self.config.evals.values() if e.type == "retrieval"]
        if not evals:
            raise ValueError("The config has no retrieval evaluator to compile.")
        hosts = len({d.process_index for d in self.devices})
        size = evals[0].batch_size * hosts
        if size % len(self.devices):
            raise ValueError(f"The embedding batch of {size} ({evals[0].batch_size} per host) "
                             f"does not divide over {len(self.devices)} chips: set "
                             "--config.evals.retrieval.batch_size to a multiple of the chips per "
                             "host.")
        image = tuple(n for n in evals[0].baselines if n in baselines.IMAGE_BASELINES)
        batch = cost.abstract_batch(self.config.model, size)
        batch.pop("mlm_labels")
        batch["valid"] = batch["row"] = jax.ShapeDtypeStruct((size,), jnp.int32)

        def lower():
            with self.context():
                step = embedding.embedder(self.shapes.model_def, self.shapes.model, self.mesh,
                                          self.rules, image)
                return step.lower(self._states()[0], self._abstract(batch))
        return compile_or_oom(lower, size // len(self.devices))


def fit_batch(first: Compiled, second: Compiled, capacity: float, multiple: int) -> int:
    """The largest multiple of `multiple` whose memory, on the line through two compiles,
    stays under `capacity`."""
    per_example = (second.hbm - first.hbm) / (second.batch_per_chip - first.batch_per_chip)
    if per_example <= 0:
        return 0
    batch = first.batch_per_chip + (capacity - first.hbm) / per_example
    return int(batch // multiple) * multiple


def find_batch(program, capacity: float, probes: Sequence[int], multiple: int, limit: int,
               report) -> Compiled:
    """The compile at the largest per-chip batch (a multiple of `multiple`, at most `limit`)
    that fits: two probes give a line of memory against batch, the line's batch under
    `capacity` is compiled, and a batch the compiler refuses sharpens the line (and the capacity,
    to the compiler's own) for the next try."""
    low, high = sorted(probes)
    first = program.train(low)
    report(first, "probe")
    while not first.fits and low > multiple:  # Even the smaller probe is too large.
        low = max(multiple, low // 2 // multiple * multiple)
        first = program.train(low)
        report(first, "probe")
    if not first.fits:
        raise ValueError(f"The train step does not fit on a chip even at {low} examples per "
                         "chip: shard the parameters (--config.sharding_rules=fsdp) or "
                         "rematerialise (--config.model.joint.remat=true, likewise text, visual, "
                         "co).")
    second = program.train(high)
    report(second, "probe")
    best, too_large = (second, limit + multiple) if second.fits else (first, high)
    points = [first, second]
    for _ in range(4):
        if points[-1].compiler_limit:
            capacity = min(capacity, points[-1].compiler_limit)
        target = min(limit, too_large - multiple, fit_batch(*points[-2:], capacity, multiple))
        if target <= best.batch_per_chip:
            break
        trial = program.train(target)
        report(trial, "confirm")
        if trial.fits:
            best = trial
        else:
            too_large = target
        points.append(trial)  # Each trial lies between the best and the smallest refused.
    return best


def _digits(x: float) -> float:
    return float(f"{x:.4g}")


def line(what: str, c: Compiled, devices: Sequence, hbm: float, model_flops: float | None,
         peak: float | None) -> dict:
    """One JSON report line; step times and MFU are XLA cost-model estimates."""
    out = {"what": what, "batch_per_chip": c.batch_per_chip,
           "global_batch": c.batch_per_chip * len(devices), "fits": c.fits,
           "hbm_gib": round(c.hbm / GIB, 2), "chip_hbm_gib": round(hbm / GIB, 1)}
    if c.fits:
        out.update(arguments_gib=round(c.arguments / GIB, 2),
                   temporaries_gib=round(c.temporaries / GIB, 2),
                   outputs_gib=round(c.outputs / GIB, 2),
                   xla_tflop_per_chip=_digits(c.flops / 1e12),
                   xla_gib_accessed_per_chip=_digits(c.bytes_accessed / GIB))
        if model_flops:
            out["model_tflop_per_chip"] = _digits(model_flops * c.batch_per_chip / 1e12)
        if c.seconds:
            out["estimated_step_ms_xla_cost_model"] = _digits(c.seconds * 1e3)
            if model_flops and peak:
                out["estimated_mfu_xla_cost_model"] = round(
                    model_flops * c.batch_per_chip / c.seconds / peak, 4)
        out["fusions"] = c.fusions
    out["compile_s"] = round(c.compile_s, 1)
    return out


def main(argv: Sequence[str]) -> dict:
    cli.no_arguments(argv)
    if FLAGS.config is None or not FLAGS.topology:
        cli.usage_error("--config and --topology are required, e.g. --config "
                        "configs/capture.py:paper --topology v5p:2x2x1", cli.USAGE_STATUS)
    logging.set_verbosity(logging.WARNING)
    jax.config.update("jax_platforms", "cpu")  # Compile for the TPU; never look for one here.
    # libtpu takes a machine-wide lock for the chips it drives; compiling drives none, so
    # several compiles (two users, a test beside a command) may run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    cli.import_tensorflow_for_data_only()
    try:
        devices = tpu_devices(FLAGS.topology)
        kind = devices[0].device_kind
        hbm = HBM_BYTES.get(kind)
        if hbm is None:
            raise ValueError(f"No HBM size is known for {kind!r}: add it to aot.HBM_BYTES.")
        peak = cost.peak_flops(devices[0])
        config = FLAGS.config
        program = Program(config, devices)
        model_flops = cost.train_flops_per_example(config.model, config.variant)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {cli.last_line(e)}") from None
    say({"topology": FLAGS.topology, "chips": len(devices), "device_kind": kind,
         "hosts": len({d.process_index for d in devices}), "mesh": dict(program.mesh.shape),
         "sharding_rules": config.sharding_rules, "variant": config.variant,
         "dtype": config.model.dtype, "peak_bf16_tflop_per_chip": (peak or 0) / 1e12 or None,
         "model_gflop_per_example": round(model_flops / 1e9, 2),
         "note": "step times and MFU are estimates of XLA's cost model, not measurements"})
    report = lambda c, what: say(line(f"train_step ({what})", c, devices, hbm, model_flops, peak))
    try:
        if FLAGS.batch_per_chip:
            best = program.train(FLAGS.batch_per_chip)
            report(best, "given batch")
        else:
            best = find_batch(program, 0.97 * hbm, [int(b) for b in FLAGS.probe_batches],
                              FLAGS.batch_multiple, FLAGS.max_batch_per_chip, report)
            report(best, "largest that fits")
        result = {"train": line("train_step", best, devices, hbm, model_flops, peak)}
        if FLAGS.hlo_dir and best.hlo:
            os.makedirs(FLAGS.hlo_dir, exist_ok=True)
            name = f"train_step_{FLAGS.topology.replace(':', '_')}_{best.batch_per_chip}.hlo.txt"
            with open(os.path.join(FLAGS.hlo_dir, name), "w") as f:
                f.write(best.hlo)
        if FLAGS.embed:
            embedded = program.embed()
            result["embed"] = line("embed_step", embedded, devices, hbm, None, None)
            say(result["embed"])
    except ValueError as e:
        raise SystemExit(f"error: {cli.last_line(e)}") from None
    return result


if __name__ == "__main__":
    cli.run(main)
