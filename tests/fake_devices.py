"""JAX set-up shared by the tests' worker processes (run as scripts, not by pytest)."""

import os
import tempfile

import jax


def use_fake_cpu_devices(count: int) -> None:
    """``count`` fake CPU devices and the test session's compilation cache (see conftest.py).

    Call before any JAX computation: the device count is fixed when the backend starts.
    """
    jax.config.update("jax_num_cpu_devices", count)
    # The session's cache: a worker reuses the programs other tests compiled.
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("DDST_TEST_JAX_CACHE",
                                     os.path.join(tempfile.gettempdir(), "ddst_jax_test_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
