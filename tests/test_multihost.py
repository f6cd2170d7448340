"""Two real processes train, checkpoint, resume and evaluate exactly like one process.

Each process runs main.py's entry point (`tests/multihost_worker.py`, which also records what the
process read and wrote) with a loopback coordinator and 4 fake CPU devices, so the 8 global
devices span both processes; process 0 is told its place by flags, process 1 by environment
variables. Two launches, each of both processes:
  launch 1  `tiny` on `synthetic_tiny`, mesh data=4 x model=2 (rules tp), 2 steps, checkpoint;
  launch 2  resumes that checkpoint onto mesh fsdp=4 x model=2 (rules fsdp_tp: every parameter
            is split across the two processes, so both must write checkpoint shards), 2 more
            steps, checkpoint, then the retrieval evaluation (dev/test x joint/visual/text).
Against one process with 8 fake devices:
  losses    this pytest process trains the same two phases on the same meshes (while launch 1
            runs), fed the same global batches: a 2-process global batch is process 0's rows then
            process 1's, which `create_train_iterator(process_index=, process_count=)` reproduces.
            Equal to float32 rounding: the cross-process all-reduces (Gloo) may add the
            per-device partial sums in another order.
  scores    one process (`main.py --mode=evaluate`, 8 devices) scores the two processes' final
            checkpoint: every score and every ranked list is identical. (Two separately trained
            runs differ by rounding, and some retrieval scores here are within 1e-7 of a tie.)
            Its evaluation batches hold 32 rows, like the two processes' 16 + 16, so every
            device computes the same shapes.

Both processes compile every program: JAX's persistent compilation cache is written by process 0
only and its CPU keys differ between processes, so with it process 0 would skip compiling and wait
for process 1 at the first collective, and CPU collectives (Gloo) give their peers 30 s to arrive.
"""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfds_product1m import tfds_product1m_dataset_builder  # noqa: F401  (registers the builder)
from capture_jax import input_pipeline, train
from configs import capture as capture_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES, DEVICES = 2, 8
COMMON = {"num_train_steps": 4, "log_every": 1, "checkpoint_every": 2, "evals.retrieval.every": 0}
PHASES = (  # (mesh, sharding rules, extra overrides) of launch 1 and launch 2.
    (dict(data=4, fsdp=1, model=2), "tp", dict(halt_after_step=2)),
    (dict(data=1, fsdp=4, model=2), "fsdp_tp", {}),
)
LOSS_RTOL = 1e-5  # float32 rounding of differently ordered sums (see the module docstring)
TIMEOUT_S = 300
SPLITS, KINDS = ("dev", "test"), ("joint", "clr_concat", "capture", "tfidf", "color_histogram")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("tfds_product1m/synthetic_tiny", data_dir=path).download_and_prepare()
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_env(processes: int) -> dict[str, str]:
    """This environment with the 8 fake CPU devices split over `processes` processes."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy")}
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES // processes}"
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    if processes > 1:  # See the module docstring.
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def _overrides(data_dir: str, mesh: dict, rules: str, extra: dict) -> list[str]:
    values = dict(COMMON, **extra, sharding_rules=rules)
    values.update({f"mesh.{axis}": size for axis, size in mesh.items()})
    values["dataset.data_dir"] = data_dir
    return [f"--config.{k}={v}" for k, v in values.items()]


class _Launch:
    """`processes` processes of `tests/multihost_worker.py`, started at once; `wait()` returns
    their records. With 2, process 0 gets the coordinator, process count and id as flags and
    process 1 as the environment variables main.py also reads (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID)."""

    def __init__(self, name: str, workdir: str, args: list[str], tmp_path, processes: int):
        self.name, self.tmp_path, self.procs, self.logs = name, tmp_path, [], []
        address = f"127.0.0.1:{_free_port()}"
        for pid in range(processes):
            self.logs.append(tmp_path / f"{name}.process{pid}.log")
            cmd = [sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"),
                   str(tmp_path / f"{name}.process{pid}.json"),
                   "--config", "configs/capture.py:tiny", "--workdir", workdir, *args]
            env = _process_env(processes)
            if processes > 1 and pid == 0:
                cmd += [f"--coordinator_address={address}", f"--num_processes={processes}",
                        f"--process_id={pid}"]
            elif processes > 1:
                env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(processes),
                           JAX_PROCESS_ID=str(pid))
            with open(self.logs[-1], "w") as log:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                                   stderr=subprocess.STDOUT))

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()

    def wait(self) -> list[dict]:
        failed = None
        for pid, proc in enumerate(self.procs):
            try:
                if proc.wait(timeout=TIMEOUT_S) != 0 and failed is None:
                    failed = f"process {pid} exited with {proc.returncode}"
            except subprocess.TimeoutExpired:
                failed = f"process {pid} still ran after {TIMEOUT_S} s"
                self.kill()
                break
        if failed:
            tails = "\n".join(f"--- {log.name} (last lines)\n" + "".join(log.read_text().splitlines(
                keepends=True)[-40:]) for log in self.logs)
            pytest.fail(f"{self.name}: {failed}.\n{tails}")
        return [json.loads((self.tmp_path / f"{self.name}.process{pid}.json").read_text())
                for pid in range(len(self.procs))]


def _train_in_this_process(data_dir: str, workdir: str, monkeypatch) -> list[dict]:
    """The two phases with 8 devices, fed the two processes' global batches: the loss history."""
    one_host = input_pipeline.create_train_iterator

    def two_hosts(config, builder, tokenizer, *, start_step=0):
        hosts = [one_host(config, builder, tokenizer, start_step=start_step, process_index=i,
                          process_count=NUM_PROCESSES) for i in range(NUM_PROCESSES)]
        for parts in zip(*hosts):
            yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    monkeypatch.setattr(input_pipeline, "create_train_iterator", two_hosts)
    history = []
    for mesh, rules, extra in PHASES:
        config = capture_configs.get_config("tiny")
        config.update_from_flattened_dict(dict(COMMON, **extra, sharding_rules=rules))
        config.mesh.update(mesh)
        config.evals.retrieval.every = -1
        config.dataset.data_dir = data_dir
        history += train.train_and_evaluate(config, workdir)["history"]
    return history


def _losses(history: list[dict]) -> dict[int, list[float]]:
    return {int(h["step"]): [h[k] for k in ("loss", "loss_mlm", "loss_mrm", "loss_clr")]
            for h in history}


def _retrieval_files(workdir: str) -> dict[str, str]:
    return {f"{split}/{kind}/{name}": (pathlib.Path(workdir, "retrieval", split, kind, name)
                                       .read_text())
            for split in SPLITS for kind in KINDS
            for name in ("retrieval_id_list.txt", "metric_results.json")}


def test_two_processes_train_resume_and_evaluate_like_one(data_dir, tmp_path, monkeypatch):
    workdir = str(tmp_path / "two_processes")
    first = _Launch("launch1", workdir, _overrides(data_dir, *PHASES[0]), tmp_path, NUM_PROCESSES)
    try:  # Meanwhile (the launch's processes often wait on each other).
        one_history = _train_in_this_process(data_dir, str(tmp_path / "one_process"), monkeypatch)
    except BaseException:
        first.kill()
        raise
    launches = [first.wait(), _Launch("launch2", workdir, _overrides(data_dir, *PHASES[1]),
                                      tmp_path, NUM_PROCESSES).wait()]
    for records in launches:
        assert [r["process"] for r in records] == [[0, 2], [1, 2]]
        # Both processes compute the same replicated metrics and scores.
        assert _losses(records[0]["result"]["history"]) == _losses(records[1]["result"]["history"])
        assert records[0]["result"]["scores"] == records[1]["result"]["scores"]
    assert launches[0][0]["result"]["step"] == 2 and launches[1][0]["result"]["step"] == 4

    # The losses of steps 1-4 equal one process's.
    two = _losses(launches[0][0]["result"]["history"] + launches[1][0]["result"]["history"])
    one = _losses(one_history)
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)],
                               rtol=LOSS_RTOL)

    # One process scoring the two processes' checkpoint (on a copy of their workdir) gets the
    # same scores and writes the same retrieval files, exactly.
    copy = str(tmp_path / "scored_by_one_process")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("retrieval", "events.*"))
    mesh, rules, _ = PHASES[1]
    eval_batch = NUM_PROCESSES * capture_configs.get_config("tiny").evals.retrieval.batch_size
    args = [*_overrides(data_dir, mesh, rules, {}), "--mode=evaluate",
            f"--config.evals.retrieval.batch_size={eval_batch}"]
    evaluated = _Launch("evaluate", copy, args, tmp_path, processes=1).wait()[0]
    assert evaluated["process"] == [0, 1]
    two_scores = launches[1][0]["result"]["scores"]
    assert list(two_scores) == ["4"]
    assert {f"{s}/{k}" for s in SPLITS for k in KINDS} <= {
        name.split("/", 1)[1].rsplit("/", 1)[0] for name in two_scores["4"]}
    assert two_scores["4"] == evaluated["result"]
    assert _retrieval_files(workdir) == _retrieval_files(copy)

    # Each process read its own slice of the training data.
    for records in launches:
        read = [set(r["read_ids"]) for r in records]
        assert all(len(ids) >= 2 * 4 for ids in read)  # 2 steps x 4 rows per process, at least.
        assert not read[0] & read[1]

    # Only process 0 wrote logs, the config, the vocabulary and the retrieval files; process 1
    # wrote nothing under the workdir outside checkpoints/ (checked from its audit events, plus
    # the TensorBoard files, whose names carry the writing process's pid).
    for records in launches:
        stray = [p for p in records[1]["written"] if p.startswith(workdir + os.sep)
                 and not p.startswith(os.path.join(workdir, "checkpoints") + os.sep)]
        assert not stray, stray
    event_pids = {int(name.split(".")[-3]) for name in os.listdir(workdir)
                  if name.startswith("events.out.tfevents")}  # ...<time>.<host>.<pid>.<n>.v2
    assert event_pids == {records[0]["pid"] for records in launches}
    written0 = set(launches[1][0]["written"])
    for split in SPLITS:
        for kind in KINDS:
            for name in ("retrieval_id_list.txt", "metric_results.json", "report.html"):
                assert os.path.join(workdir, "retrieval", split, kind, name) in written0
    assert os.path.join(workdir, "config.json") in set(launches[0][0]["written"])

    # Checkpoints are written collectively: at step 4 the parameters are split across the
    # processes, and each wrote its own shards.
    for item in ("model", "opt"):
        files = os.listdir(os.path.join(workdir, "checkpoints", "4", item))
        assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(files), files


def test_incomplete_process_flags_are_one_sentence(tmp_path):
    """--num_processes without a coordinator, where no cluster is detected: what to give."""
    cmd = [sys.executable, "main.py", "--config", "configs/capture.py:tiny",
           "--workdir", str(tmp_path / "w"), "--num_processes=2", "--process_id=1"]
    result = subprocess.run(cmd, cwd=REPO, env=_process_env(1), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot start as one of several processes"), result.stderr[-2000:]
    assert "--coordinator_address" in last and "Traceback" not in result.stderr
