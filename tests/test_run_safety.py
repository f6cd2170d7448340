"""One run per workdir (capture_jax/workdir_lock.py) and damaged checkpoints (restore_step)."""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest

from capture_jax import train, workdir_lock
from test_train import data_dir, tiny_config  # noqa: F401  (data_dir: the shared fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300  # For each main.py run: generous, on 2 busy CPU cores; never asserted.


def _main_command(workdir, data_dir, *overrides):
    return [sys.executable, "main.py", "--config", "configs/capture.py:tiny", "--workdir", workdir,
            f"--config.dataset.data_dir={data_dir}", "--config.evals.retrieval.every=-1",
            *overrides]


def _run_main(workdir, data_dir, *overrides):
    return subprocess.run(_main_command(workdir, data_dir, *overrides), cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _write_lock(workdir, **fields):
    holder = dict(host="elsewhere", pid=4242, mode="train_and_evaluate", since=time.time(),
                  heartbeat=time.time(), token="someone-elses", process_start="")
    holder.update(fields)
    path = os.path.join(workdir, workdir_lock.LOCK_FILE)
    with open(path, "w") as f:
        json.dump(holder, f)
    return path


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _holder(path):
    with open(path) as f:
        return json.load(f)


def test_a_live_holder_refuses_and_a_gone_one_is_taken_over(tmp_path, caplog):
    workdir = str(tmp_path)
    first = workdir_lock.WorkdirLock(workdir, "train_and_evaluate")
    first.acquire()
    assert _holder(first.path)["pid"] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirInUseError,
                       match=f"host {socket.gethostname()}, pid {os.getpid()}, since "):
        workdir_lock.WorkdirLock(workdir, "evaluate_only").acquire()
    first.release()
    assert not os.listdir(workdir)  # The lock file (and any temporary file) is gone.

    # Gone: a dead process on this host; another host's holder without a heartbeat for too long;
    # an unreadable lock file that old.
    old = time.time() - workdir_lock.STALE_AFTER_S - 60
    for stale in (dict(host=socket.gethostname(), pid=_dead_pid()), dict(heartbeat=old), None):
        path = _write_lock(workdir, **(stale or {}))
        if stale is None:
            with open(path, "w") as f:
                f.write('{"host": "cut sh')
            os.utime(path, (old, old))
        caplog.clear()
        lock = workdir_lock.WorkdirLock(workdir, "train_and_evaluate")
        lock.acquire()
        assert _holder(path)["token"] == lock.holder.token
        assert any(r.levelname == "WARNING" and "Took over the lock" in r.getMessage()
                   for r in caplog.records), stale
        lock.release()

    # Alive: another host's holder with a recent heartbeat, an unreadable recent file, and this
    # host's live process (this one, under another token).
    for alive, named in ((dict(), "host elsewhere, pid 4242"), (None, "unreadable"),
                         (dict(host=socket.gethostname(), pid=os.getpid()), f"pid {os.getpid()}")):
        path = _write_lock(workdir, **(alive or {}))
        if alive is None:
            with open(path, "w") as f:
                f.write("")
        with pytest.raises(workdir_lock.WorkdirInUseError, match=named):
            workdir_lock.WorkdirLock(workdir, "train_and_evaluate").acquire()
        assert os.path.exists(path)
    os.remove(path)


def test_the_heartbeat_refreshes_and_a_successors_lock_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
    lock = workdir_lock.WorkdirLock(str(tmp_path), "train_and_evaluate")
    lock.acquire()
    first = _holder(lock.path)["heartbeat"]
    deadline = time.time() + 30
    while _holder(lock.path)["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert _holder(lock.path)["heartbeat"] > first
    _write_lock(str(tmp_path), token="successor")  # Taken over by a run that judged it gone.
    lock.release()
    assert _holder(lock.path)["token"] == "successor"


def test_runs_release_the_lock_on_errors_and_evaluate_is_refused_during_a_run(data_dir,
                                                                           tmp_path):
    workdir = str(tmp_path / "w")
    with pytest.raises(ValueError, match="global_batch_size 6"):
        train.train_and_evaluate(tiny_config(data_dir, global_batch_size=6), workdir)
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
    with workdir_lock.hold(workdir, "train_and_evaluate"):  # A live training run.
        with pytest.raises(workdir_lock.WorkdirInUseError, match="in use by another run"):
            train.evaluate_only(tiny_config(data_dir), workdir)
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))


def test_a_second_run_stops_and_a_killed_runs_lock_is_taken_over(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    first = subprocess.Popen(
        _main_command(workdir, data_dir, "--config.num_train_steps=100000",
                      "--config.checkpoint_every=2", "--config.log_every=1"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        lines, deadline = [], time.time() + TIMEOUT_S
        for line in first.stdout:  # Until it trains and has a checkpoint.
            lines.append(line)
            if (" step 3/100000" in line and os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
                    or time.time() > deadline):
                break
        assert first.poll() is None, "".join(lines)[-3000:]
        second = _run_main(workdir, data_dir, "--config.num_train_steps=100000")
        assert second.returncode != 0
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("error: The workdir") and f"pid {first.pid}," in last, last
        assert "resumed" not in second.stderr
    finally:
        first.kill()  # kill -9: no chance to release the lock.
        first.communicate()
    assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
    steps = ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()
    assert steps, "".join(lines)[-3000:]
    third = _run_main(workdir, data_dir, "--config.num_train_steps=100000",
                      f"--config.halt_after_step={steps[-1] + 1}")
    assert third.returncode == 0, third.stderr[-3000:]
    took_over = [line for line in third.stderr.splitlines() if "Took over the lock" in line]
    assert took_over and took_over[0].startswith("W"), third.stderr[-3000:]  # absl's WARNING.
    assert f"pid {first.pid}" in took_over[0]
    assert f"resumed at step {steps[-1]}" in third.stderr
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # Released.


def test_a_damaged_checkpoint_names_its_step_and_restore_step_resumes_before_it(data_dir,
                                                                                tmp_path):
    workdir = str(tmp_path / "run")
    straight = train.train_and_evaluate(tiny_config(data_dir), workdir)  # Saves steps 3 and 6.
    checkpoints = os.path.join(workdir, "checkpoints")
    assert straight["step"] == 6 and sorted(os.listdir(checkpoints)) == ["3", "6"]
    files = [f for f in glob.glob(os.path.join(checkpoints, "6", "model", "**"), recursive=True)
             if os.path.isfile(f) and os.sep + "d" + os.sep in f]  # The array data files.
    largest = max(files, key=os.path.getsize)
    half = os.path.getsize(largest) // 2
    os.truncate(largest, half)

    result = _run_main(workdir, data_dir)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    error = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert error and len(lines) - error[-1] <= 3, "\n".join(lines[-10:])
    message = " ".join(lines[error[-1]:])
    assert os.path.join(checkpoints, "6") in message and "'model' item" in message, message
    assert "rerun with --config.restore_step=3 to resume from the previous checkpoint (step 3" in (
        message)
    assert "Traceback" not in result.stderr

    resumed = train.train_and_evaluate(tiny_config(data_dir, restore_step=3), workdir)
    assert resumed["step"] == 6
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"][3:]]
    aside = glob.glob(os.path.join(checkpoints, "superseded-6-*"))
    assert len(aside) == 1  # The damaged step, moved aside with its files, not deleted.
    assert os.path.getsize(largest.replace(os.path.join(checkpoints, "6"), aside[0])) == half
    assert ocp.CheckpointManager(checkpoints).all_steps() == [3, 6]  # Step 6 saved again.
    # The same command again (a pre-empted job restarts with its flags): it went back to step 3
    # already, so it resumes from its latest step instead of going back once more.
    again = train.train_and_evaluate(tiny_config(data_dir, restore_step=3, num_train_steps=8,
                                                 checkpoint_every=2), workdir)
    assert [h["step"] for h in again["history"]] == [7, 8]
    assert len(glob.glob(os.path.join(checkpoints, "superseded-*"))) == 1
    with pytest.raises(ValueError, match=r"restore_step=4 is not a checkpoint .*steps \[3, 6, 8\]"):
        train.train_and_evaluate(tiny_config(data_dir, restore_step=4), workdir)
