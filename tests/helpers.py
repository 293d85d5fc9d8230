"""Assertions shared by the tests."""

import importlib.util

import numpy as np


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


def load_module(path, name):
    """The Python file at `path` imported as a module called `name` (benchmark scripts, configs:
    files that are not part of an installed package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
