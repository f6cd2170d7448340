"""Test set-up shared by every test: 8 fake CPU devices, quiet TensorFlow.

XLA reads `XLA_FLAGS` once, when JAX first initialises its backend, so this must run before any
test module imports jax. pytest imports conftest.py files before the test modules beside them.
"""

import os
import tempfile

# 8 fake CPU devices for the sharding tests; XLA's CPU backend optimisations only cost compile
# time on the test-sized models (numerics are unchanged), so they are off.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests (and the main.py subprocesses, which inherit this environment) compile the same
# train step: JAX's persistent compilation cache compiles each program once per machine.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "capture_jax_test_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
