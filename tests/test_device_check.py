"""bench/device_check.py's CPU dry run (`--tiny`): every code path of the accelerator check runs
here, so it cannot rot between the rare sessions that have a GPU."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_device_check_dry_run_prints_a_line_per_measurement():
    run = subprocess.run([sys.executable, "bench/device_check.py", "--tiny"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)  # 8 CPU devices: conftest
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    kinds = [line["bench"] for line in lines]
    assert kinds == ["env", "train_step", "profile", "skipped", "ranker", "ranker"], lines
    env, step, profile, skipped, screen, exact = lines
    assert env["backend"] == "cpu" and env["jax"] and env["flax"]
    assert env["imported_data_libraries"] == []  # It runs where TensorFlow and Orbax are not.
    assert step["variant"] == "tiny" and step["attention_impl"] == "xla" and step["loss_finite"]
    assert step["examples_per_s"] > 0 and step["temp_mib"] is not None
    assert step["pipelined_step_s"] > 0
    assert profile["ops_per_step"] > 0 and 0 < profile["busy_ms_per_step"]
    assert profile["busy_ms_per_step"] <= profile["window_ms_per_step"] and profile["top_ops"]
    assert "cudnn" in skipped["what"] and skipped["why"] == "needs an NVIDIA GPU"
    assert (screen["method"], exact["method"]) == ("screen", "exact")
    assert screen["certified"] + screen["ranked_again"] == 64
    for ranker in (screen, exact):
        assert ranker["agreement_with_numpy"] == 1.0 and ranker["queries_per_s"] > 0
