"""Test set-up: 8 simulated CPU devices, so sharded paths are tested on every machine.

XLA_FLAGS must be set before JAX initialises its backends, hence at import time here.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# The suite's cost is compiling many tiny programs; XLA's optimisation passes roughly
# double that and buy nothing at these sizes (same results, checked by the parity tests).
jax.config.update("jax_disable_most_optimizations", True)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES
