"""Where a step's time goes, from a JAX profiler trace: device busy time, kernels and top ops.

`summarize(trace_dir, steps)` reads the newest `perfetto_trace.json.gz` that
`jax.profiler.trace(trace_dir, create_perfetto_trace=True)` wrote around `steps` train steps and
returns one dict (a JSON line of `bench/device_check.py`):

* `window_ms_per_step`: first device op start to last device op end, per step;
* `busy_ms_per_step`: the union of all device op intervals (streams overlapping count once), so
  window - busy is time the device sat idle (waiting on the host: dispatch, launch gaps, syncs);
* `ops_per_step`: device ops (kernels, copies) per step;
* `top_ops` / `top_op_kinds`: the ops with the most time per step, by name and by name with its
  numeric suffix removed (`fusion.123` -> `fusion`), as [name, ms per step, count per step].

Device ops are the events of processes named `/device:...` (GPU, TPU). A CPU trace has none; then
the XLA ops of the host threads stand in (events named like HLO instructions, `fusion.12`, not
Python's `$...` nor the runtime's `ThunkExecutor::Execute`); they run on several threads, so
their times per step can add up to more than the window.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

_HLO_NAME = re.compile(r"[a-z][a-z0-9_-]*(\.\d+)?")


def _events(trace_dir: str) -> tuple[list[dict], dict[int, str]]:
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"No perfetto_trace.json.gz under {trace_dir}: trace with "
                                "jax.profiler.trace(dir, create_perfetto_trace=True).")
    with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    return [e for e in events if e.get("ph") == "X" and "dur" in e], names


def summarize(trace_dir: str, steps: int, top: int = 15) -> dict:
    events, process_names = _events(trace_dir)
    devices = {pid for pid, name in process_names.items() if name.startswith("/device:")}
    if devices:
        ops = [e for e in events if e["pid"] in devices]
        where = sorted({process_names[p] for p in devices})
    else:  # XLA's op names (fusion.12, dot.3, copy), not the runtime's (ThunkExecutor::Execute)
        ops = [e for e in events if _HLO_NAME.fullmatch(e["name"])]
        where = ["host (no device process in the trace)"]
    if not ops:
        raise ValueError(f"The trace under {trace_dir} has no device or XLA ops.")
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in ops)
    busy, (cur_start, cur_end) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy, cur_start, cur_end = busy + cur_end - cur_start, start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    window = max(e for _, e in spans) - spans[0][0]

    def table(key):
        total, count = collections.Counter(), collections.Counter()
        for e in ops:
            total[key(e["name"])] += e["dur"]
            count[key(e["name"])] += 1
        return [[name, round(us / 1e3 / steps, 3), round(count[name] / steps, 1)]
                for name, us in total.most_common(top)]

    return {"bench": "profile", "steps": steps, "where": where,
            "window_ms_per_step": round(window / 1e3 / steps, 2),
            "busy_ms_per_step": round(busy / 1e3 / steps, 2),
            "ops_per_step": round(len(ops) / steps, 1),
            "top_ops": table(lambda n: n),
            "top_op_kinds": table(lambda n: re.sub(r"[._]\d+$", "", n))}
