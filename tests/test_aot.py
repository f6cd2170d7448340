"""`python -m capture_jax.aot`: the `tiny` train and embedding steps compiled for a TPU slice that
is not here, run as a user types it; and the per-chip batch search on a made-up memory line.

libtpu is not in requirements.txt: `.ci/run` installs it into a directory of its own and names
it in $CAPTURE_JAX_LIBTPU. Only the command's subprocess is pointed at it (TPU_LIBRARY_PATH), so
this pytest process never loads it.
"""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from capture_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def libtpu_env() -> dict:
    """The environment of the command: this one, less the fake CPU devices, with libtpu."""
    where = os.environ.get("CAPTURE_JAX_LIBTPU")
    if not where:  # A developer's run without libtpu; .ci/run always sets it, so CI runs these.
        pytest.skip(f"libtpu is not installed: `pip install --target DIR libtpu=="
                    f"{aot.LIBTPU_VERSION}` and set CAPTURE_JAX_LIBTPU=DIR (.ci/run does both)")
    library = os.path.join(where, "libtpu", "libtpu.so")
    if not os.path.isfile(library):
        pytest.fail(f"No libtpu.so under $CAPTURE_JAX_LIBTPU ({where!r}): install it with `pip "
                    f"install --target DIR libtpu=={aot.LIBTPU_VERSION}` and set "
                    "CAPTURE_JAX_LIBTPU=DIR (.ci/run does both).")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return dict(env, TPU_LIBRARY_PATH=library, PYTHONPATH=ROOT)


def test_libtpu_version_is_the_one_jax_tpu_pins():
    pins = [r for r in importlib.metadata.requires("jax") if r.startswith("libtpu")]
    assert len(pins) == 1, pins
    pinned = pins[0].split(";")[0].removeprefix("libtpu==").rstrip(".*")
    assert aot.LIBTPU_VERSION.startswith(pinned), (aot.LIBTPU_VERSION, pins)


def run_aot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capture_jax.aot", *args], cwd=ROOT,
                          env=libtpu_env(), capture_output=True, text=True, timeout=600)


def test_tiny_compiles_for_a_tpu_slice():
    done = run_aot("--config", "configs/capture.py:tiny", "--topology", "v5e:2x2",
                   "--batch_per_chip", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    head, train, embed = lines[0], lines[1], lines[-1]
    assert (head["chips"], head["device_kind"], head["mesh"]["data"]) == (4, "TPU v5 lite", 4)
    assert "estimates of XLA's cost model" in head["note"]
    assert train["what"] == "train_step (given batch)" and train["fits"]
    assert train["global_batch"] == 8 and 0 < train["hbm_gib"] < train["chip_hbm_gib"]
    assert train["xla_tflop_per_chip"] > 0 and train["estimated_step_ms_xla_cost_model"] > 0
    assert 0 < train["estimated_mfu_xla_cost_model"] < 1
    assert embed["what"] == "embed_step" and embed["fits"]
    assert embed["global_batch"] == 16  # evals.retrieval.batch_size of `tiny`, one host.
    # libtpu's start-up warnings on a machine that is no TPU VM are held back.
    assert "TPU_WORKER_HOSTNAMES" not in done.stderr


def test_user_mistakes_are_one_sentence():
    done = run_aot("--config", "configs/capture.py:tiny", "--topology", "v9:2x2")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: libtpu knows no TPU topology 'v9:2x2'")
    done = run_aot("--config", "configs/capture.py:tiny", "--topology", "v5e:2x2",
                   "--batch_per_chip", "2", "--config.mesh.data=3", "--noembed")
    assert done.returncode == 1
    assert "does not divide the 4 devices" in done.stderr.strip().splitlines()[-1]


class LinearMemory:
    """A stand-in for `aot.Program` whose train step needs `fixed + per_example * batch`
    bytes and fits under `limit` (the compiler's verdict)."""

    def __init__(self, fixed: float, per_example: float, limit: float):
        self.fixed, self.per_example, self.limit = fixed, per_example, limit
        self.compiled = []

    def train(self, batch: int) -> aot.Compiled:
        self.compiled.append(batch)
        need = int(self.fixed + self.per_example * batch)
        fits = need <= self.limit
        return aot.Compiled(batch, fits, temporaries=need,
                            compiler_limit=0 if fits else int(self.limit))


@pytest.mark.parametrize("limit", [16 * aot.GIB, 95 * aot.GIB, 2.5 * aot.GIB])
def test_batch_search_finds_the_largest_that_fits(limit):
    program = LinearMemory(1.5 * aot.GIB, 30e6, limit)
    best = aot.find_batch(program, limit, [64, 256], 8, 4096, lambda *_: None)
    largest = min(4096, int((limit - program.fixed) // program.per_example) // 8 * 8)
    assert best.fits and best.batch_per_chip == largest
    assert len(program.compiled) <= 4  # Two probes, then the line's batch is confirmed.


def test_batch_search_steps_down_when_the_compiler_says_no():
    program = LinearMemory(1.5 * aot.GIB, 30e6, 14 * aot.GIB)  # The compiler allows less.
    best = aot.find_batch(program, 16 * aot.GIB, [64, 256], 8, 4096, lambda *_: None)
    assert best.fits and best.batch_per_chip > 256
    assert program.fixed + program.per_example * best.batch_per_chip <= program.limit
