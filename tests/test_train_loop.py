"""train.py end to end on the demo dataset, in subprocesses on 4 fake CPU devices.

One uninterrupted run is the reference. A second run is SIGKILLed after its first checkpoint,
restarted, stopped with SIGTERM (which must save a checkpoint), restarted again, and must end
with the same params and per-step losses. A third starts from a copy of a good checkpoint with
a config that makes the loss NaN and must stop naming the step, keeping the good checkpoint.
"""

import fcntl
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from tests.helpers import assert_close
from vig_jax.convert import save_params
from vig_jax.train.errors import EXIT_NONFINITE, EXIT_PREEMPTED
from vig_jax.train.metrics import InputWait, read_metrics

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 8
FLAGS = [
    "--config=configs/demo.py",
    "--config.model.overrides.embed_dim=32",
    "--config.model.overrides.depth=1",
    "--config.model.dtype=bfloat16",  # bf16 compute; params and optimizer state stay float32
    "--config.data.image_size=32",
    "--config.data.batch_size=16",
    "--config.data.eval_batch_size=32",
    "--config.data.eval_split=validation[:64]",
    f"--config.loop.total_steps={TOTAL_STEPS}",
    "--config.loop.log_every_steps=1",
    "--config.loop.eval_every_steps=4",
    "--config.loop.ckpt_every_steps=2",
    "--config.loop.progress_bar=False",
]
# Identical runs in one process: bitwise equal; across restarts the compiled code is the same
# (shared compilation cache), so only reduction order could differ, and it does not on CPU.
RESUME_TOL = 1e-6


def _session_dir(tmp_path_factory):
    """A folder shared by this session's xdist workers (each has its own basetemp below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    # All runs (of every xdist worker) share one persistent compilation cache: restarts and
    # later runs skip recompiling.
    cache = _session_dir(tmp_path_factory) / "train_loop_jax_cache"
    cache.mkdir(exist_ok=True)
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _start(workdir, env, *extra):
    return subprocess.Popen(
        [sys.executable, "train.py", f"--workdir={workdir}", *FLAGS, *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _steps(workdir):
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _wait_for_checkpoint(proc, workdir, above, timeout=300):
    """Polls until a complete checkpoint with step > `above` exists; returns its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [s for s in _steps(workdir) if s > above]
        if done:
            return done[0]
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before a checkpoint > {above}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no checkpoint > {above} within {timeout} s")


def _state(workdir, step):
    path = pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "state"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sharding info not provided")  # read as saved
        with ocp.PyTreeCheckpointer() as ckptr:
            return ckptr.restore(path)


def _params(workdir, step):
    return _state(workdir, step)["params"]


def _last_per_step(workdir, key):
    """{step: value} of the line with `key` per step."""
    return {m["step"]: m[key] for m in read_metrics(workdir) if key in m}


@pytest.fixture(scope="session")
def reference(tmp_path_factory, env):
    """The uninterrupted run, made once per session even when several xdist workers need it."""
    root = _session_dir(tmp_path_factory)
    workdir = root / "train_loop_uninterrupted"
    with open(root / "train_loop_uninterrupted.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (root / "train_loop_uninterrupted.done").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            rc, out = _finish(_start(workdir, env))
            assert rc == 0, out
            (root / "train_loop_uninterrupted.out").write_text(out)
            (root / "train_loop_uninterrupted.done").write_text("ok")
    return workdir


def test_train_e2e_writes_metrics_and_checkpoints(reference):
    losses = _last_per_step(reference, "train/loss")
    assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
    assert all(np.isfinite(list(losses.values())))
    evals = {m["step"]: m for m in read_metrics(reference) if "eval/top1" in m}
    assert sorted(evals) == [4, TOTAL_STEPS]
    for m in evals.values():
        assert 0.0 <= m["eval/top1"] <= m["eval/top5"] <= 1.0 and np.isfinite(m["eval/loss"])
    waits = _last_per_step(reference, "train/input_wait_frac")
    assert sorted(waits) == list(range(1, TOTAL_STEPS + 1))
    assert all(0.0 <= w <= 1.0 for w in waits.values()), waits
    # Without the progress bar, each logged step is one line of stdout with the logged loss.
    out = (reference.parent / "train_loop_uninterrupted.out").read_text()
    for step in (1, TOTAL_STEPS):
        assert f"step {step}/{TOTAL_STEPS}: loss {losses[step]:.4f}, lr " in out, out
    assert "img/s, input wait " in out, out
    # keep_checkpoints=2 of the saves at 2, 4, 6, 8.
    assert _steps(reference) == [6, 8]
    # bf16 compute, float32 state: every saved float array (params, Adam moments) is float32.
    floats = [
        (path, leaf.dtype)
        for path, leaf in _leaves(_state(reference, TOTAL_STEPS))
        if np.issubdtype(leaf.dtype, np.floating)
    ]
    assert any(path.startswith("/opt_state") for path, _ in floats)
    assert all(dtype == np.float32 for _, dtype in floats), floats
    # TensorBoard events readable without TensorFlow, with the same scalars.
    (event_file,) = (reference / "tensorboard").iterdir()
    tags = {
        (event.step, value.tag)
        for event in EventFileLoader(str(event_file)).Load()
        for value in event.summary.value
    }
    assert (1, "train/loss") in tags and (TOTAL_STEPS, "eval/top1") in tags


def test_resume_after_sigkill_and_sigterm_matches_uninterrupted(reference, tmp_path, env):
    workdir = tmp_path / "interrupted"
    # 1. SIGKILL right after the first checkpoint is complete.
    proc = _start(workdir, env)
    first = _wait_for_checkpoint(proc, workdir, above=0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert TOTAL_STEPS not in _steps(workdir), "killed run finished before the kill"
    # 2. Restart; SIGTERM once it has written a new checkpoint: it must save where it stops.
    proc = _start(workdir, env)
    second = _wait_for_checkpoint(proc, workdir, above=max(_steps(workdir)))
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert f"resumed from step {first}" in out
    stopped = max(_steps(workdir))
    assert stopped >= second
    assert rc == (EXIT_PREEMPTED if stopped < TOTAL_STEPS else 0), out
    if stopped < TOTAL_STEPS:
        assert f"SIGTERM: saved checkpoint at step {stopped}" in out
        # 3. Restart to the end.
        rc, out = _finish(_start(workdir, env))
        assert rc == 0, out
        assert f"resumed from step {stopped}" in out

    want = _leaves(_params(reference, TOTAL_STEPS))
    got = _leaves(_params(workdir, TOTAL_STEPS))
    for (path, w), (path_got, g) in zip(want, got, strict=True):
        assert path == path_got
        assert_close(path, g, w, RESUME_TOL)
    want_losses = _last_per_step(reference, "train/loss")
    got_losses = _last_per_step(workdir, "train/loss")
    # Each resume dropped the lines after its checkpoint: no step is logged twice.
    logged = [m["step"] for m in read_metrics(workdir) if "train/loss" in m]
    assert logged == sorted(set(logged)), logged
    assert sorted(got_losses) == sorted(want_losses)
    for step in want_losses:
        assert got_losses[step] == pytest.approx(want_losses[step], rel=RESUME_TOL), step
    want_eval = _last_per_step(reference, "eval/loss")[TOTAL_STEPS]
    assert _last_per_step(workdir, "eval/loss")[TOTAL_STEPS] == pytest.approx(want_eval, rel=1e-5)


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], f"{prefix}/{k}")
    elif isinstance(tree, list | tuple):
        for i, x in enumerate(tree):
            yield from _leaves(x, f"{prefix}/{i}")
    elif tree is not None:
        yield prefix, np.asarray(tree)


def test_nonfinite_loss_stops_naming_step_and_keeps_last_good_checkpoint(reference, tmp_path, env):
    workdir = tmp_path / "nan"
    shutil.copytree(reference / "checkpoints" / "6", workdir / "checkpoints" / "6")
    # std 0 turns every normalised pixel into inf: the first step after the restore is NaN.
    rc, out = _finish(_start(workdir, env, "--config.data.std=(0.0, 0.0, 0.0)"))
    assert rc == EXIT_NONFINITE
    assert "NonFiniteLossError: loss is nan" in out and "at step 7" in out
    assert "last good checkpoint is step 6" in out
    assert _steps(workdir) == [6]


def _evaluate_cli(checkpoint, env):
    flags = [f for f in FLAGS if not f.startswith("--config.loop")]
    out = subprocess.run(
        [sys.executable, "-m", "vig_jax.evaluate", f"--checkpoint={checkpoint}", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_evaluate_cli_on_training_and_converted_checkpoints(reference, tmp_path, env):
    want = {m["step"]: m for m in read_metrics(reference) if "eval/loss" in m}[TOTAL_STEPS]
    got = _evaluate_cli(reference, env)
    assert got["step"] == TOTAL_STEPS
    for key in ("eval/loss", "eval/top1", "eval/top5"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    # The converter's format: params/ (orbax) + model.json.
    converted = tmp_path / "converted"
    save_params(_params(reference, TOTAL_STEPS), converted, model_name="vig_t", num_classes=10)
    got = _evaluate_cli(converted, env)
    assert got["step"] is None
    for key in ("eval/loss", "eval/top1", "eval/top5"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_input_wait_tells_an_input_bound_loop_from_a_device_bound_one():
    """The share of time in next(batches): a pipeline slower than the loop shows, a fast one not."""

    def slow_batches():
        while True:
            time.sleep(0.02)
            yield 0

    wait = InputWait()
    batches = slow_batches()
    for _ in range(10):
        wait.next(batches)  # nothing else to do: the loop only waits for input
    assert wait.fraction() > 0.5
    ready = iter(range(100))
    for _ in range(10):
        wait.next(ready)
        time.sleep(0.02)  # the "step": the batch was always there
    assert wait.fraction() < 0.2


def test_workers_that_leave_the_training_process_too_few_cores_are_named():
    from vig_jax.train.loop import SPARE_CORES, workers_cores_warning

    assert workers_cores_warning(0, 2) is None  # no workers: the loop reads the data itself
    assert workers_cores_warning(20, 24) is None and SPARE_CORES == 4
    msg = workers_cores_warning(16, 16)
    assert "data.num_workers=16 on 16 cores" in msg and "at most 12" in msg and "\n" not in msg
    assert "at most 1 " in workers_cores_warning(2, 2)
