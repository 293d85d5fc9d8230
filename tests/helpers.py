"""Helpers and assertions shared by the tests."""

import fcntl
import importlib.util
import os
import subprocess
import sys

import jax
import jax.extend.core
import numpy as np

GRAD_NAMES = ("dq", "dk", "dv", "dgf", "dgb")  # BiGLA's five input gradients, in argument order
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def sub_eqns(jaxpr):
    """Equations of the sub-jaxprs (pjit, custom_vjp, pallas bodies) of a jaxpr, recursively."""
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from sub.eqns
            yield from sub_eqns(sub)


def pallas_operand_dtypes(jaxpr, keep):
    """dtype names of the operands of every pallas_call in a jaxpr (and its sub-jaxprs) whose
    shape `keep(shape)` accepts."""
    return {
        str(v.aval.dtype)
        for e in [*jaxpr.eqns, *sub_eqns(jaxpr)]
        if e.primitive.name == "pallas_call"
        for v in e.invars
        if hasattr(v.aval, "shape") and keep(v.aval.shape)
    }


def run_fast(fn, *args):
    """fn(*args) under jit. BiGLA tests are compile-bound on CPU: LLVM -O0 about halves XLA:CPU
    compile time (CI budget) and changes no HLO, so the numerics are those of the default build."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def patch_bigla(monkeypatch, fn):
    """Replaces BiGLA inside the models by fn(q, k, v, gf, gb, **kw): the GLA layer's `bigla` and
    the one `bigla_packed` (the layer's default entry) hands XLA's slices to off the pallas path."""
    import pallas_kernels.bigla
    from vig_jax.models import gla

    monkeypatch.setattr(gla, "bigla", fn)
    monkeypatch.setattr(pallas_kernels.bigla, "bigla", fn)


def rel_err(got, want):
    """max |got - want| / max |want| in float64 (NaN if either has a NaN)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    scale = max(np.abs(want).max(initial=0.0), 1e-30)
    return np.abs(got - want).max(initial=0.0) / scale


def assert_close(name, got, want, tol):
    """Fails unless max|got - want| <= tol * max|want|; the message names tensor and errors."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), (
        f"{name}: {np.size(got) - np.isfinite(got).sum()} non-finite values"
    )
    abs_err = np.abs(got - want).max(initial=0.0)
    err = rel_err(got, want)
    assert err <= tol, f"{name}: max abs err {abs_err:.3e}, relative {err:.3e} > tol {tol:.1e}"


def run_benchmark(script, *args, cache_dir, timeout, env=None):
    """Runs a benchmark script in a fresh Python (env: default os.environ) with a persistent
    compilation cache in `cache_dir`; fails the test with its output's tail unless it exits 0."""
    env = dict(os.environ if env is None else env, JAX_COMPILATION_CACHE_DIR=str(cache_dir))
    cmd = [sys.executable, str(script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def load_module(path, name):
    """The Python file at `path` imported as a module called `name` (benchmark scripts, configs:
    files that are not part of an installed package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_tfds_dir(tmp_path_factory, dataset):
    """A TFDS data dir holding `dataset`, prepared once per test run.

    Under xdist the workers share the parent of their temp dirs, so one worker prepares while
    the other waits on the lock and then reads the same files.
    """
    from vig_jax.data import sources  # TFDS: imported only by the tests that need data

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "tfds"
    path.mkdir(exist_ok=True)
    with open(path / f"{dataset}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sources.get_builder(dataset, str(path))  # prepares on first use
    return str(path)


def fashion_mnist_tfds_dir(tmp_path_factory):
    """`shared_tfds_dir` with Fashion-MNIST; without its IDX files, skips naming the missing one
    (fails under CI=true, where .ci/run installs them)."""
    from vig_jax.data import fashion_mnist

    try:
        fashion_mnist.check_source_files(fashion_mnist.resolve_source_dir())
    except FileNotFoundError as error:
        skip_or_fail_in_ci(str(error))
    return shared_tfds_dir(tmp_path_factory, "fashion_mnist")


def in_ci() -> bool:
    """True when the environment says CI (CI=true, as .ci/run and CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail_in_ci(reason):
    """Skips the test for a missing input (golden files, datasets); under CI=true fails it instead,
    so that a CI run missing an input is red, not green with skips."""
    import pytest

    if in_ci():
        pytest.fail(f"{reason} [CI=true: a missing input fails instead of skipping]", pytrace=False)
    pytest.skip(reason)


def lower_for_cuda(f, *args):
    """StableHLO text of jit(f) lowered for CUDA on this (CPU) machine."""
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
