"""Test-wide setup: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.needs("mod")`` skips a test where ``mod`` is not importable: the
    GPU image runs this suite from the source tree without tensorboardX or TFDS."""
    import importlib.util

    import pytest

    for item in items:
        for mark in item.iter_markers("needs"):
            missing = [m for m in mark.args if importlib.util.find_spec(m) is None]
            if missing:
                item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)}"))
