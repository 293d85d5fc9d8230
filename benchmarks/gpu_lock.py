"""One GPU, several benchmark processes: compile concurrently, time one at a time.

Compiling (XLA, and Triton for the Pallas kernels) takes most of a benchmark's wall time and runs
on the CPU, so a driver may run several case processes at once on one GPU. Each process compiles
outside the lock and holds it only for its warm-up and timed runs, so no two timings overlap on the
GPU. The lock is an exclusive `flock` on the file named by $VIG_BENCH_GPU_LOCK; without that
variable `timing_lock()` does nothing (a single process needs no lock).

    with timing_lock():
        times = time_steps(compiled, ...)

`concurrent_env(lock_path)` is the environment for such child processes: the lock, and no JAX GPU
memory preallocation (each process would otherwise take 75% of the card), so that every process's
`peak_bytes_in_use` is still its own.
"""

import contextlib
import fcntl
import os

LOCK_ENV = "VIG_BENCH_GPU_LOCK"


@contextlib.contextmanager
def timing_lock():
    """Holds the lock named by $VIG_BENCH_GPU_LOCK for the `with` body (no-op if unset)."""
    path = os.environ.get(LOCK_ENV)
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def concurrent_env(lock_path: str, env: dict | None = None) -> dict:
    """A copy of `env` (default os.environ) for a child that shares the GPU with others."""
    env = dict(os.environ if env is None else env)
    env[LOCK_ENV] = str(lock_path)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env
