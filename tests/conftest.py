"""Shared test setup: fake CPU devices (sharding tests), x64 fixture, golden paths, GPU marker."""

import os

# Sharding tests need several devices; on CPU we fake four. Must be set before JAX is imported.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

import pathlib

import jax
import pytest

GOLDEN_DIR = pathlib.Path(
    os.environ.get(
        "VIG_GOLDEN_DIR", pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "golden"
    )
)


def golden_file(name):
    """Path of a golden file in ../shared/golden; skips the test with the path when it is absent."""
    path = GOLDEN_DIR / name
    if not path.exists():
        pytest.skip(f"golden file not found: {path} (set VIG_GOLDEN_DIR to its folder)")
    return path


@pytest.fixture
def x64():
    """Enables float64 inside the test only."""
    with jax.enable_x64(True):
        yield


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(
        reason="needs a GPU (compiled Pallas/Triton); run `pytest -m gpu` there"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
