"""Test-wide setup: fake CPU devices must be configured before JAX starts a backend."""

import os
import tempfile

# Tests run a handful of tiny iterations per compiled program, so XLA's CPU backend
# optimisations cost far more (compile) than they save (run): level 0 halves compile time.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402

# Eight fake CPU devices, so mesh/data-parallel code paths run in every test session.
jax.config.update("jax_num_cpu_devices", 8)
# Compiled programs are reused across tests that build the same step (resume, re-runs).
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("DDST_TEST_JAX_CACHE",
                                 os.path.join(tempfile.gettempdir(), "ddst_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

# Run as separate processes by tests/test_multiprocess.py, tests/test_fault_injection.py and
# tests/test_resume_devices.py; importing them here would reconfigure this session's devices.
collect_ignore = ["tests/multiprocess_worker.py", "tests/lock_worker.py",
                  "tests/resume_devices_worker.py"]
