"""One run per workdir: `workdir/run.lock`, held by process 0 while a run trains or evaluates.

A second `main.py` on a workdir whose run is alive would resume from that run's checkpoints and
write into the same files. So `train.train_and_evaluate` and `train.evaluate_only` (decorated with
`exclusive`) lock the workdir first, before anything is written: process 0 creates the lock file
(the workdir is on a file system all hosts see; the other processes take no lock, and fail with
process 0 if it cannot lock). An evaluate run is refused on the workdir of a live run too (both
write `retrieval/`); evaluate a live run's checkpoint through its scheduled evaluations or after it.

The lock file is JSON naming its holder (host, pid, mode, since when) with a heartbeat that a
background thread refreshes every `HEARTBEAT_S`. It is only ever written whole: created by
`O_CREAT | O_EXCL`, replaced by write-then-rename, and every replacement (heartbeat, take-over)
and the release run under a guard file (`run.lock.guard`, also `O_EXCL`) after checking who holds
the lock. A lock left by a killed run (kill -9, a lost host) is stale, and taken over with a
WARNING: on the same host when its process is gone, on another host when its heartbeat is older
than `STALE_AFTER_S` (the hosts' clocks must roughly agree). A live holder stops the new run with
one sentence (`WorkdirInUseError`, a ValueError, so main.py prints it as one sentence).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0  # Seconds between heartbeats of a holder.
STALE_AFTER_S = 300.0  # A holder on another host without a heartbeat for this long is gone.
_GUARD_STALE_S = 60.0  # A guard file this old was left by a process killed while holding it.


class WorkdirInUseError(ValueError):
    """Another live run holds the workdir."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its lock file says."""

    host: str
    pid: int
    mode: str  # The holding function: train_and_evaluate or evaluate_only.
    since: float  # Unix time the lock was taken.
    heartbeat: float  # Unix time of the last heartbeat.
    token: str  # Unique per acquisition: tells a holder its own lock from a successor's.
    process_start: str = ""  # The process's start time (Linux), against reused pids.

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.since))
        return f"{self.mode} on host {self.host}, pid {self.pid}, since {since}"


def _process_start(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot); '' if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _process_gone(pid: int, process_start: str) -> bool:
    """Whether process `pid` of this host has ended (or its pid now names another process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # Alive, another user's.
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # Killed, not yet reaped.
                return True
    except (OSError, IndexError):
        pass
    now = _process_start(pid)
    return bool(process_start and now and now != process_start)


def _read(path: str) -> tuple[bytes, Holder | None] | None:
    """The lock file's bytes and holder (None if unreadable); None if there is no lock file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(raw)
        holder = Holder(**{k.name: fields[k.name] for k in dataclasses.fields(Holder)
                           if k.name in fields})
    except (ValueError, TypeError):  # Empty, cut short or not ours: judged by its age alone.
        holder = None
    return raw, holder


def _stale(path: str, holder: Holder | None, now: float) -> str | None:
    """Why the lock's holder is gone, or None if it may be alive."""
    if holder is not None and holder.host == socket.gethostname():
        if _process_gone(holder.pid, holder.process_start):
            return f"its process {holder.pid} no longer exists on this host"
        return None
    try:
        beat = holder.heartbeat if holder is not None else os.stat(path).st_mtime
    except OSError:
        return None
    if now - beat > STALE_AFTER_S:
        return f"no heartbeat for {now - beat:.0f} s (stale after {STALE_AFTER_S:.0f} s)"
    return None


@contextlib.contextmanager
def _guard(path: str, wait_s: float = 10.0) -> Iterator[bool]:
    """Serialises the changes of an existing lock file: yields whether the guard was taken."""
    guard = path + ".guard"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - os.stat(guard).st_mtime > _GUARD_STALE_S:
                    os.remove(guard)
                    continue
            if time.monotonic() > deadline:
                yield False
                return
            time.sleep(0.05)
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.remove(guard)


def _write_replacing(path: str, holder: Holder) -> None:
    """Replaces the lock file by `holder`'s, atomically (write a temporary file, rename it)."""
    tmp = f"{path}.{holder.token}.tmp"
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(holder), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _create(path: str, holder: Holder) -> bool:
    """Creates the lock file for `holder` if there is none; whether it did. The file appears
    whole (a complete temporary file hard-linked to its name, which fails if the name exists),
    or, where the file system has no hard links, by O_CREAT | O_EXCL and then written."""
    tmp = f"{path}.{holder.token}.tmp"
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(holder), f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # No hard links here.
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(holder), f)
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        os.remove(tmp)


class WorkdirLock:
    """The lock of one workdir, held by this process: `acquire`, then `release`."""

    def __init__(self, workdir: str, mode: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self.mode = mode
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock, or a stale one (WARNING); a live holder raises WorkdirInUseError."""
        now = time.time()
        me = Holder(socket.gethostname(), os.getpid(), self.mode, now, now, uuid.uuid4().hex,
                    _process_start(os.getpid()))
        for _ in range(20):  # Retries only while other runs change the lock at the same time.
            if _create(self.path, me):
                return self._start(me)
            found = _read(self.path)
            if found is None:  # Released meanwhile.
                continue
            raw, holder = found
            reason = _stale(self.path, holder, time.time())
            if reason is None:
                raise WorkdirInUseError(self._in_use(holder))
            with _guard(self.path) as guarded:
                if guarded and (_read(self.path) or (None,))[0] == raw:  # Unchanged since judged.
                    _write_replacing(self.path, me)
                    what = holder.describe() if holder else "an unreadable lock file"
                    logging.warning("Took over the lock %s of a run that is gone (%s): %s.",
                                    self.path, what, reason)
                    return self._start(me)
            time.sleep(0.1)
        raise WorkdirInUseError(f"Could not lock the workdir {self.workdir}: other runs keep "
                                f"changing {self.path}; stop them, or use another --workdir.")

    def _in_use(self, holder: Holder | None) -> str:
        if holder is None:
            who = "another run (its lock file is unreadable, and recent)"
        else:
            beat = max(time.time() - holder.heartbeat, 0)
            who = f"another run ({holder.describe()}; last heartbeat {beat:.0f} s ago)"
        return (f"The workdir {self.workdir} is in use by {who}: wait for that run to end or stop "
                f"it, or use another --workdir; if it is gone for sure, delete {self.path}.")

    def _start(self, me: Holder) -> None:
        self.holder = me
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _still_mine(self) -> bool:
        found = _read(self.path)
        return bool(found and found[1] and found[1].token == self.holder.token)

    def _beat(self) -> None:
        """Refreshes the heartbeat every HEARTBEAT_S until released (or taken over)."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with _guard(self.path, wait_s=1.0) as guarded:
                    if not guarded:
                        continue
                    if not self._still_mine():
                        logging.error("The lock %s is no longer this run's (another run took it "
                                      "over, judging this one gone): stop one of them.", self.path)
                        return
                    self.holder = dataclasses.replace(self.holder, heartbeat=time.time())
                    _write_replacing(self.path, self.holder)
            except OSError as e:  # A file-system hiccup: try again next time.
                logging.warning("Could not refresh the heartbeat of %s: %s", self.path, e)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file, if it is still this run's."""
        if self.holder is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with _guard(self.path):
            if self._still_mine():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
        self.holder = None


@contextlib.contextmanager
def hold(workdir: str, mode: str, *, create: bool = True) -> Iterator[WorkdirLock | None]:
    """The workdir locked for the duration, by process 0 (the other processes get None).

    `create`: create the workdir if missing (a run that writes one); otherwise a missing workdir
    is not locked (nothing there to protect; the run reports what is missing).
    """
    import jax  # Here: process_index needs JAX started, which the runs using this do.

    lock, error = None, None
    if jax.process_index() == 0 and (create or os.path.isdir(workdir)):
        lock = WorkdirLock(workdir, mode)
        try:
            os.makedirs(workdir, exist_ok=True)
            lock.acquire()
        except WorkdirInUseError as e:
            lock, error = None, e
        except OSError as e:
            lock, error = None, ValueError(
                f"Cannot lock the workdir {lock.workdir} ({e}): give a --workdir this user can "
                "write to.")
    if jax.process_count() > 1:  # Every process stops if process 0 could not lock.
        import numpy as np
        from jax.experimental import multihost_utils

        refused = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if refused and error is None:
            error = WorkdirInUseError(
                f"Process 0 could not lock the workdir {os.path.abspath(workdir)}: another run "
                "holds it (process 0's log names it).")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            try:
                lock.release()
            except OSError as e:  # Never hide the run's own outcome behind this.
                logging.warning("Could not release the lock %s: %s", lock.path, e)


def exclusive(*, create: bool = True) -> Callable:
    """Decorates `run(config, workdir, ...)` to hold the workdir's lock while it runs."""

    def decorate(run: Callable) -> Callable:
        @functools.wraps(run)
        def locked(config: Any, workdir: str, *args, **kwargs):
            with hold(workdir, run.__name__, create=create):
                return run(config, workdir, *args, **kwargs)

        return locked

    return decorate
