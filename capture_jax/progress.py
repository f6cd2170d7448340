"""What a training run tells its user: one log line per `log_every` steps (each metric once, with
a smoothed ETA), TensorBoard scalars, and a summary block at the end."""

from __future__ import annotations

import os
import time

from clu import metric_writers

_ETA_SMOOTHING = 0.3  # Weight of the newest interval in the moving average of seconds per step.


def create_writer(workdir: str, is_main: bool) -> metric_writers.MetricWriter:
    """TensorBoard event files in `workdir` on process 0, nothing elsewhere. No logging writer:
    the trainer logs each metric once itself."""
    if is_main:
        return metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
    return metric_writers.MultiWriter([])


def duration(seconds: float) -> str:
    """`45 s`, `12 min 5 s`, `3 h 20 min`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class Progress:
    """Times the run: the first step (compilation) apart, then a moving average of seconds per
    step for the ETA, so that one slow interval (an evaluation, a checkpoint) does not make it
    jump."""

    def __init__(self, start_step: int, stop_at: int, global_batch_size: int):
        self.start_step, self.stop_at, self.batch = start_step, stop_at, global_batch_size
        self.started = time.perf_counter()
        self.first_step_s: float | None = None
        self._per_step: float | None = None
        self._mark = (start_step, self.started)

    def first_step_done(self) -> float:
        """Seconds the first step took (compilation included); restarts the interval clock."""
        now = time.perf_counter()
        self.first_step_s = now - self.started
        self._mark = (self.start_step + 1, now)
        return self.first_step_s

    def interval(self, step: int) -> tuple[float, str]:
        """Examples per second since the last call (or the first step) and the ETA text."""
        last_step, last_time = self._mark
        now = time.perf_counter()
        steps, seconds = step - last_step, now - last_time
        self._mark = (step, now)
        if steps <= 0:
            return 0.0, "ETA unknown"
        per_step = seconds / steps
        self._per_step = per_step if self._per_step is None else (
            _ETA_SMOOTHING * per_step + (1 - _ETA_SMOOTHING) * self._per_step)
        return steps * self.batch / seconds, f"ETA {duration((self.stop_at - step) * self._per_step)}"

    def wall_s(self) -> float:
        return time.perf_counter() - self.started


def metrics_text(summary: dict[str, float]) -> str:
    """`loss 3.89, loss_clr 3.89, ...` (4 significant digits)."""
    return ", ".join(f"{k} {v:.4g}" for k, v in summary.items())


def final_summary(*, variant: str, start_step: int, step: int, total: int, wall_s: float,
                  batch: int, first_step_s: float | None, score_lines: list[str], workdir: str,
                  checkpoint_dir: str, ended: str) -> str:
    """The block printed when a run ends: what it did, its scores and where its files are."""
    trained = step - start_step
    lines = [f"Run summary ({variant}): {ended}",
             f"  steps       {start_step} -> {step} of {total} ({trained} this run)",
             f"  wall time   {duration(wall_s)}"]
    if trained > 1 and first_step_s is not None and wall_s > first_step_s:
        lines.append(f"  throughput  {(trained - 1) * batch / (wall_s - first_step_s):.1f} "
                     f"examples/s after the first step ({duration(first_step_s)} with compilation;"
                     " evaluations included)")
    lines += [f"  {line}" for line in score_lines]
    index = os.path.join(workdir, "retrieval", "index.html")
    if os.path.exists(index):
        lines.append(f"  report      {index}")
    lines += [f"  checkpoints {checkpoint_dir}",
              f"  tensorboard tensorboard --logdir {workdir}"]
    return "\n".join(lines)
