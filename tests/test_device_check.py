"""bench/device_check.py's CPU dry run (`--tiny`): every code path of the accelerator check runs
here, so it cannot rot between the rare sessions that have a GPU. The PyTorch side runs where
CAPTURE_JAX_TORCH_PYTHON names a Python with torch and absl (or this one has torch); otherwise the
check must say that PyTorch is absent and skip its jobs."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(1200)  # Six measurement processes, each starting JAX or PyTorch.
def test_the_device_check_dry_run_prints_a_line_per_measurement():
    torch_python = os.environ.get("CAPTURE_JAX_TORCH_PYTHON", sys.executable)
    has_torch = torch_python != sys.executable or importlib.util.find_spec("torch") is not None
    run = subprocess.run([sys.executable, "bench/device_check.py", "--tiny",
                          f"--torch_python={torch_python}"], cwd=REPO,
                         capture_output=True, text=True, timeout=1200)  # 8 CPU devices: conftest
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert not [line for line in lines if line["bench"] == "error"], lines
    by_kind = {}
    for line in lines:
        by_kind.setdefault(line["bench"], []).append(line)
    env, torch_env = by_kind["env"][0], by_kind["torch_env"][0]
    assert env["backend"] == "cpu" and env["jax"] and env["flax"]
    assert env["imported_data_libraries"] == []  # It runs where TensorFlow and Orbax are not.
    default, rng, mlm = by_kind["train_step"]
    assert default["variant"] == "tiny" and default["batch"] == 8 and default["loss_finite"]
    assert default["examples_per_s"] > 0 and default["temp_mib"] is not None
    assert default["pipelined_step_s"] > 0
    assert rng["overrides"]["rng_impl"] == "unsafe_rbg" and rng["loss_finite"]
    assert mlm["mlm_max_predictions"] == 4 and mlm["loss_finite"]
    assert mlm["train_gflop_per_example"] < default["train_gflop_per_example"]
    profile = by_kind["profile"][0]
    assert profile["ops_per_step"] > 0 and 0 < profile["busy_ms_per_step"]
    assert profile["busy_ms_per_step"] <= profile["window_ms_per_step"] and profile["top_ops"]
    if has_torch:
        assert torch_env["available"]
        eager, compiled = by_kind["torch_step"]
        assert (eager["mode"], compiled["mode"]) == ("eager", "compile")
        for line in (eager, compiled):
            assert line["batch"] == 8 and line["loss_finite"] and line["examples_per_s"] > 0
        ratio = by_kind["ratio"][0]
        assert ratio["batch"] == 8 and ratio["ratio"] > 0
        assert ratio["faster_torch"] in ("eager", "compile")
    else:
        assert not torch_env["available"] and "PyTorch is not importable" in torch_env["why"]
        assert [s["why"] for s in by_kind["skipped"]] == ["no PyTorch (see torch_env)"]
    screen, exact = by_kind["ranker"]
    assert (screen["method"], exact["method"]) == ("screen", "exact")
    assert screen["certified"] + screen["ranked_again"] == 64
    for ranker in (screen, exact):
        assert ranker["agreement_with_numpy"] == 1.0 and ranker["queries_per_s"] > 0
    choice = by_kind["ranker_choice"][0]
    assert choice["faster"]["2000"] in ("screen", "exact") and choice["accelerator_auto_now"]
    assert by_kind["done"]
