"""Test-wide setup: fake CPU devices must be configured before JAX starts a backend."""

import jax

# Eight fake CPU devices, so mesh/data-parallel code paths run in every test session.
jax.config.update("jax_num_cpu_devices", 8)
