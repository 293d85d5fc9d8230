"""Shared test setup: fake CPU devices (sharding tests), a temp TFDS data dir and compilation cache,
x64 fixture, golden paths, GPU marker."""

import os
import shutil
import tempfile
from importlib import metadata

# Sharding tests need several devices; on CPU we fake four. Must be set before JAX is imported.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

# Most tests are dominated by compiling tiny models: with LLVM's optimisation off XLA compiles them
# ~40% faster (the programs run ~75% slower). The transfer-learning test's subprocess, which runs
# many steps, drops the flag (tests/test_finetune.py).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"


# jaxlib 0.10's XLA:CPU runs some fusions through YNNPACK, whose transpose segfaulted in the
# backward of the chunked BiGLA (tests/test_bigla.py; any later test could then crash) on an
# AVX2-only AMD EPYC; the same programs run without those fusions. Off for CPU-only installs of
# jaxlib 0.10 (a jaxlib that does not know the flag would refuse to start).
if "ynn_fusion_type" not in os.environ["XLA_FLAGS"]:
    dists = {(d.metadata["Name"] or "").lower(): d.version for d in metadata.distributions()}
    gpu = any(n.startswith(("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm")) for n in dists)
    if dists.get("jaxlib", "").startswith("0.10.") and not gpu:
        os.environ["XLA_FLAGS"] += " --xla_cpu_experimental_ynn_fusion_type="

# Tests write only into temp dirs. TFDS's default data dir (where anything given data_dir=None
# prepares its dataset, e.g. train.py in test_train_loop's subprocesses) is a temp dir made by the
# main pytest process and passed to its xdist workers and their subprocesses in the environment;
# the process that made it removes it at exit. Set before TFDS is imported, which reads it once.
# (This module is imported twice, as conftest and as tests.conftest: one dir per process.)
if not os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("VIG_TESTS_PID") != str(
    os.getpid()
):
    os.environ["VIG_TESTS_PID"] = str(os.getpid())
    os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="vig_tests_tfds_")
    # One persistent compilation cache for the run, made and removed the same way: the workers and
    # the subprocesses of one run share the programs any of them compiled (many tests compile the
    # same tiny models). Measured on 2 cores: test_models, test_gla_layer and test_train_step at
    # -n 2 took 248 s without, 230 s with it. Tests that need their own cache or none still set or
    # drop JAX_COMPILATION_CACHE_DIR for their subprocesses.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vig_tests_jax_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pathlib

import jax
import jax.numpy as jnp
import pytest

from tests.helpers import lower_for_cuda, skip_or_fail_in_ci

GOLDEN_DIR = pathlib.Path(
    os.environ.get(
        "VIG_GOLDEN_DIR", pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "golden"
    )
)


def golden_file(name):
    """Path of a golden file in ../shared/golden; when it is absent, skips the test naming the
    path, or fails it under CI=true (parity tests must not pass by skipping)."""
    path = GOLDEN_DIR / name
    if not path.exists():
        skip_or_fail_in_ci(f"golden file not found: {path} (set VIG_GOLDEN_DIR to its folder)")
    return path


def pytest_unconfigure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for var, prefix in (("TFDS_DATA_DIR", "vig_tests_tfds_"),
                        ("JAX_COMPILATION_CACHE_DIR", "vig_tests_jax_cache_")):  # fmt: skip
        path = pathlib.Path(os.environ.get(var, ""))
        if path.name.startswith(prefix):
            shutil.rmtree(path, ignore_errors=True)


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


@pytest.fixture(scope="module")
def mosaic_lowers():
    """Skips (naming the error) when this jaxlib cannot cross-lower any Mosaic GPU kernel: then
    the cross-lowering tests of our Mosaic GPU kernels would say nothing about them."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def toy(x_ref, o_ref, x_smem, barrier):
        plgpu.copy_gmem_to_smem(x_ref, x_smem, barrier.at[0])
        plgpu.barrier_wait(barrier.at[0])
        o_ref[...] = x_smem[...] + 1.0

    x = jax.ShapeDtypeStruct((128,), jnp.float32)
    call = plgpu.kernel(
        toy,
        out_type=x,
        scratch_types=[plgpu.SMEM((128,), jnp.float32), plgpu.Barrier(num_barriers=1)],
    )
    try:
        lower_for_cuda(call, x)
    except Exception as error:  # any failure here is the platform's, not the kernel's
        pytest.skip(f"this jaxlib cannot lower a Mosaic GPU kernel for cuda: {error!r:.200}")
