"""Test configuration: 8 simulated CPU devices, before JAX initialises."""

import os

# Must happen before the first JAX operation initialises the backend. The
# config option (unlike XLA_FLAGS) is not inherited by subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

try:
    jax.config.update("jax_num_cpu_devices", 8)
except RuntimeError:  # pragma: no cover - backend already initialised elsewhere
    pass

import pytest  # noqa: E402


@pytest.fixture(params=[True, False], ids=["jit", "nojit"])
def maybe_jit(request):
    """Runs a test once under ``jax.jit`` and once eagerly."""
    return jax.jit if request.param else (lambda fn: fn)


@pytest.fixture(scope="session")
def n_devices():
    n = jax.device_count()
    if n < 8:  # pragma: no cover
        pytest.skip(f"needs 8 devices, got {n} (backend initialised before conftest)")
    return n
