"""Test set-up shared by every test: 8 fake CPU devices, quiet TensorFlow.

XLA reads `XLA_FLAGS` once, when JAX first initialises its backend, so this must run before any
test module imports jax. pytest imports conftest.py files before the test modules beside them.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
