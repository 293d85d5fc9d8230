"""Fault injection on the demo-sized model (issue 18; docs/faults.md has the table).

Every fault must end in one clean line and its exit code (`vig_jax.train.errors`), lose no more
than the steps since the last good checkpoint, and a rerun must end with parameters equal to an
uninterrupted run's, bit for bit (CPU). In-process runs cover what needs no second process:
corrupt checkpoint files, failing and stalled writers, bad config fields, an evaluation failure.
Subprocesses of `train.py` cover signals, a second run into a busy workdir and the exit codes.
"""

import asyncio
import dataclasses
import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from tests.helpers import load_module, shared_tfds_dir
from vig_jax.train import checkpoint, loop, sharding
from vig_jax.train.checkpoint import Checkpointer
from vig_jax.train.errors import (
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    CheckpointSaveError,
    UserError,
)
from vig_jax.train.metrics import read_metrics
from vig_jax.train.trainer import plan_run

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL = 6  # steps of the in-process runs: checkpoints at 2, 4, 6
OVERRIDES = {
    "model.overrides.embed_dim": 32,
    "model.overrides.depth": 1,
    "data.image_size": 32,
    "data.batch_size": 16,
    "data.eval_batch_size": 32,
    "data.eval_split": "validation[:64]",
    "loop.log_every_steps": 1,
    "loop.eval_every_steps": 1000,  # only after the last step
    "loop.ckpt_every_steps": 2,
    "loop.keep_checkpoints": 3,
    "loop.progress_bar": False,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return shared_tfds_dir(tmp_path_factory, "vig_demo_shapes")


@pytest.fixture(scope="module", autouse=True)
def one_trainer_per_config():
    """In-process runs of one config share one `RunPlan`, so its jitted steps compile once (a
    restarted process gets the same programs from the persistent compilation cache)."""
    plans = {}

    def cached(config, mesh):
        c = config.to_dict()
        steps = c["loop"].pop("total_steps"), c["loop"].pop("ckpt_every_steps")
        key = json.dumps(c, sort_keys=True, default=str)
        if key not in plans:
            plans[key] = plan_run(config, mesh)
        return dataclasses.replace(plans[key], total_steps=steps[0], ckpt_every_steps=steps[1])

    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop, "plan_run", cached)
        yield


def make_config(data_dir, total=TOTAL, **changes):
    """configs/demo.py shrunk by OVERRIDES, then `changes` ("data.batch_size": 6, ...)."""
    c = load_module(ROOT / "configs" / "demo.py", "demo_config").get_config()
    for key, value in {**OVERRIDES, "data.data_dir": data_dir, "loop.total_steps": total}.items():
        _set(c, key, value)
    for key, value in changes.items():
        _set(c, key.replace("__", "."), value)
    return c


def _set(config, key, value):
    *parents, name = key.split(".")
    for parent in parents:
        config = config[parent]
    config[name] = value


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _assert_bitwise(got, want):
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want)]
    for path, g, w in zip(paths, jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w, err_msg=path)


def _restore(workdir, config, step=None):
    """Host copy of the whole TrainState saved at `step` (default: the latest)."""
    plan = plan_run(config, sharding.make_mesh())
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", keep=10)
    try:
        state, _ = ckpt.restore(step or ckpt.latest_step(), plan.trainer.abstract_state)
        return _host(state)
    finally:
        ckpt.close()


def _steps(workdir):
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted in-process run: its workdir (checkpoints 2, 4, 6) and final state."""
    workdir = tmp_path_factory.mktemp("reference")
    loop.train_and_evaluate(make_config(data_dir), workdir)
    assert _steps(workdir) == [2, 4, TOTAL]
    return workdir, _restore(workdir, make_config(data_dir))


def _copy(reference_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference_workdir / "checkpoints", workdir / "checkpoints")
    return workdir


# --- corrupt checkpoints -------------------------------------------------------------------------


def _corruptions(checkpoint_dir):
    files = sorted(p.relative_to(checkpoint_dir) for p in checkpoint_dir.rglob("*") if p.is_file())
    return [(str(f), how) for f in files for how in ("truncated", "garbled")] + [
        ("state", "missing"),
        ("data", "missing"),
    ]


def _corrupt(path: pathlib.Path, how: str):
    if how == "missing":
        shutil.rmtree(path)
        return
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # every byte of the middle half flipped
        quarter = len(data) // 4
        for i in range(quarter, max(len(data) - quarter, quarter + 1)):
            data[i % max(len(data), 1)] ^= 0xFF if data else 0
        path.write_bytes(bytes(data) or b"\xff")


# orbax's leftover reads of a failed restore end on a closed event loop (docs/faults.md, Limits).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_corrupt_file_of_the_newest_checkpoint_falls_back(
    reference, data_dir, tmp_path, monkeypatch
):
    """Each file of checkpoint 6 truncated or garbled (and state/ or data/ missing): the restore
    takes checkpoint 6 only if it restores exactly as saved, else moves it aside, says why in
    one line and takes checkpoint 4. One fallback is then trained on to the end, bit for bit."""
    monkeypatch.setattr(checkpoint, "RESTORE_DRAIN_S", 0)  # a pause for a quiet stderr only
    ref_dir, ref_state = reference
    config = make_config(data_dir)
    plan = plan_run(config, sharding.make_mesh())
    ref_4 = _restore(ref_dir, config, 4)
    cases = _corruptions(ref_dir / "checkpoints" / str(TOTAL))
    assert len(cases) >= 20, cases
    outcomes = {}
    for i, (name, how) in enumerate(cases):
        workdir = tmp_path / f"case{i}"
        shutil.copytree(ref_dir / "checkpoints", workdir / "checkpoints")
        _corrupt(workdir / "checkpoints" / str(TOTAL) / name, how)
        lines = []
        ckpt = Checkpointer(workdir / "checkpoints", keep=3)
        try:
            step, state, data_state = ckpt.restore_latest(plan.trainer.abstract_state, lines.append)
        finally:
            ckpt.close()
        want = ref_state if step == TOTAL else ref_4
        assert step in (4, TOTAL), (name, how, step)
        _assert_bitwise(_host(state), want)
        assert data_state == {"batches": step}
        if step == 4:
            assert len(lines) == 1 and f"checkpoints/{TOTAL} is unreadable (" in lines[0], lines
            moved = workdir / "checkpoints.set_aside" / str(TOTAL)
            assert f"moved to {moved}" in lines[0] and moved.is_dir()
            assert _steps(workdir) == [2, 4]
        else:
            assert not lines
        outcomes[(name, how)] = step
    # Every restore reads these; the commit markers, _sharding and most per-process OCDBT files
    # (their arrays are merged into state/d) are not read, so corrupting them harms nothing.
    read = ["data/metadata", "state/_METADATA", "state/manifest.ocdbt", "state/array_metadatas"]
    for (name, how), step in outcomes.items():
        if name.startswith(tuple(read)) or name.startswith("state/d/") or how == "missing":
            assert step == 4, (name, how)

    # Training on from the fallback redoes steps 5-6 and ends where the reference ended.
    workdir = _copy(ref_dir, tmp_path)
    _corrupt(workdir / "checkpoints" / str(TOTAL) / "state", "missing")
    (workdir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in range(1, 7))
    )
    loop.train_and_evaluate(config, workdir)
    _assert_bitwise(_restore(workdir, config), ref_state)
    assert [m["step"] for m in read_metrics(workdir)][:6] == [1, 2, 3, 4, 5, 6]
    assert len({m["step"] for m in read_metrics(workdir) if "train/loss" in m}) == 6


# --- failing and stalled saves, a failing evaluation ---------------------------------------------


def _failing_writer(monkeypatch, error, after_steps=()):
    """Orbax's JSON writer of the data item (data/metadata, written in the save thread) raises
    `error` for the checkpoints of steps not in `after_steps` (the checksums item is written)."""
    real = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def save_fn(self, x, directory):
        if "batches" not in x or x["batches"] in after_steps:
            return await real(self, x, directory)
        if error == "stall":  # writes after orbax's timeout (3 s here) has given up on it
            await asyncio.sleep(6)
            return await real(self, x, directory)
        raise error

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", save_fn)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "fault,error,match",
    [
        ("disk_full", OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        ("read_only", OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
        ("stalled", "stall", "TimeoutError"),
    ],
)
def test_failed_save_stops_within_one_step_and_rerun_matches(
    reference, data_dir, tmp_path, monkeypatch, fault, error, match
):
    """The save of step 4 fails in its thread: the run stops after step 5 naming the checkpoint
    path and the cause; checkpoint 2 is intact and the rerun ends bit for bit at the reference."""
    del fault
    ref_dir, ref_state = reference
    config = make_config(data_dir)
    workdir = tmp_path / "run"
    _failing_writer(monkeypatch, error, after_steps=(2,))
    if error == "stall":  # long enough for the good save of step 2 on a busy machine
        monkeypatch.setattr(checkpoint, "SAVE_TIMEOUT_S", 3)
    else:
        # The loop's per-step check does not wait for a save still running; on a loaded machine the
        # failing save thread can still be running at step 5. Let that one check wait for it, so
        # the test asks what the loop promises: a failure known at a check stops the run there.
        real_check = checkpoint.Checkpointer.check

        def check(self, *, block=False):
            return real_check(self, block=block or self._pending == 4)

        monkeypatch.setattr(checkpoint.Checkpointer, "check", check)
    with pytest.raises(CheckpointSaveError, match=f"checkpoints/4 failed: .*{match}"):
        loop.train_and_evaluate(config, workdir)
    # The array writes of the failed save may still run in orbax threads (a process would exit).
    for thread in threading.enumerate():
        if type(thread).__name__ == "_SignalingThread":
            thread.join(timeout=60)
    # A failure is seen at the first check after the save thread failed (step 5, see above); a
    # stall once the timeout is over (here at the save of step 6).
    if error != "stall":
        assert max(m["step"] for m in read_metrics(workdir)) <= 5
    assert _steps(workdir) == [2]
    monkeypatch.undo()
    loop.train_and_evaluate(config, workdir)
    _assert_bitwise(_restore(workdir, config), ref_state)
    assert [m["step"] for m in read_metrics(workdir) if "train/loss" in m] == list(range(1, 7))


def test_failed_evaluation_keeps_the_checkpoint_of_its_step(data_dir, tmp_path, monkeypatch):
    def evaluate(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(loop, "evaluate", evaluate)
    with pytest.raises(RuntimeError, match="evaluation broke"):  # at step 6, the only evaluation
        loop.train_and_evaluate(make_config(data_dir), tmp_path)
    assert _steps(tmp_path) == [2, 4, TOTAL]


# --- user errors, before the first step ----------------------------------------------------------


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"data.train_split": "trian"}, r"data.train_split='trian': Unknown split 'trian'"),
        ({"data.eval_split": "val"}, r"data.eval_split='val': Unknown split 'val'"),
        ({"data.eval_batch_size": -5}, r"data.eval_batch_size=-5 must be a positive multiple"),
        ({"data.batch_size": 0}, r"data.batch_size=0 must be a positive multiple"),
        ({"data.batch_size": 6}, r"data.batch_size=6 must split into .* divisible by the 4"),
        ({"data.batch_size": 8192}, r"data.batch_size=8192 exceeds the 5000 examples"),
        ({"data.image_size": 0}, r"data.image_size must be >= 1, got 0"),
        ({"data.dataset": "imagenet2012"}, r"'imagenet2012' is not prepared"),
        ({"model.name": "vig_x"}, r"config: unknown model 'vig_x'"),
        ({"loop.keep_checkpoints": 0}, r"loop.keep_checkpoints must be >= 1, got 0"),
        ({"loop.eval_every_steps": 0}, r"loop.eval_every_steps must be >= 1, got 0"),
        ({"loop.eval_every_epochs": 1.0}, r"set exactly one of loop.eval_every_steps and loop"),
        ({"optimizer.warmup_epochs": 100.0}, r"config: need 0 <= warmup steps"),
    ],
    ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else "",
)
def test_bad_config_field_is_one_user_error_before_anything_runs(
    data_dir, tmp_path, changes, match
):
    config = make_config(data_dir, **changes)
    with pytest.raises(UserError, match=match) as info:
        loop.train_and_evaluate(config, tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists() or not _steps(tmp_path / "run")


def test_workdir_of_another_model_is_a_user_error_and_nothing_moves(reference, data_dir, tmp_path):
    workdir = _copy(reference[0], tmp_path)
    config = make_config(data_dir, **{"model.overrides.embed_dim": 48})
    with pytest.raises(UserError, match=r"holds a run of another model .*checkpoint 6 differs"):
        loop.train_and_evaluate(config, workdir)
    assert _steps(workdir) == [2, 4, TOTAL]
    assert not (workdir / "checkpoints.set_aside").exists()


def test_unwritable_workdir_is_a_user_error(data_dir, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"cannot write to workdir .*file/run: Not a directory"):
        loop.train_and_evaluate(make_config(data_dir), tmp_path / "file" / "run")


# --- train.py in subprocesses: signals, a second run, exit codes ---------------------------------

CLI_TOTAL = 32  # steps of the subprocess runs, checkpointed every CLI_CKPT
CLI_CKPT = 4


def _flags(data_dir, total):
    overrides = {**OVERRIDES, "loop.ckpt_every_steps": CLI_CKPT, "loop.total_steps": total}
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    return ["--config=configs/demo.py", *flags, f"--config.data.data_dir={data_dir}"]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _start(workdir, env, *flags):
    return subprocess.Popen(
        [sys.executable, "train.py", f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _wait(predicate, proc, what, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no {what} within {timeout} s")


def _saving(workdir):
    d = workdir / "checkpoints"
    return d.exists() and any("tmp" in p.name for p in d.iterdir())


def test_cli_faults_end_in_one_line_and_the_rerun_matches(data_dir, cli_env, tmp_path):
    """SIGSTOP a run after its first checkpoint: a second run into its workdir refuses, naming
    it. SIGCONT, then SIGKILL it in the middle of an async save. The rerun takes over the stale
    lock and resumes from the last complete checkpoint; SIGTERM and then SIGINT stop two reruns
    (each saves, exit 75); the last rerun ends with the parameters of an uninterrupted run."""
    flags = _flags(data_dir, CLI_TOTAL)
    config = make_config(data_dir, CLI_TOTAL, **{"loop.ckpt_every_steps": CLI_CKPT})
    loop.train_and_evaluate(config, tmp_path / "reference")  # same programs as the subprocesses

    workdir = tmp_path / "interrupted"
    first = _start(workdir, cli_env, *flags)
    _wait(lambda: _steps(workdir), first, "a first checkpoint")
    first.send_signal(signal.SIGSTOP)
    rc, _, err = _finish(_start(workdir, cli_env, *flags))
    assert rc == EXIT_USER_ERROR
    assert err.strip().splitlines()[-1] == (
        f"error: workdir {workdir} is in use by another run (pid {first.pid} on host "
        f"{os.uname().nodename}, started {err.split('started ')[-1].split(')')[0]}); stop it or "
        "choose another --workdir"
    )
    first.send_signal(signal.SIGCONT)
    _wait(lambda: _saving(workdir), first, "an async save")
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = max(_steps(workdir))
    assert killed_at < CLI_TOTAL

    for stop in (signal.SIGTERM, signal.SIGINT):
        proc = _start(workdir, cli_env, *flags)
        before = max(_steps(workdir))
        _wait(lambda b=before: max(_steps(workdir)) > b, proc, "a new checkpoint")
        proc.send_signal(stop)  # >= 7 steps before the end: it arrives mid-run
        rc, out, err = _finish(proc)
        if stop == signal.SIGTERM:
            assert f"pid {first.pid}" in out and "that process is gone" in out
        assert f"resumed from step {before} in " in out
        assert rc == EXIT_PREEMPTED, err
        stopped = max(_steps(workdir))
        assert stopped < CLI_TOTAL
        assert err.strip().splitlines()[-1] == (
            f"Preempted: {stop.name}: saved checkpoint at step {stopped} in "
            f"{workdir / 'checkpoints'}; rerun the same command to resume"
        )
    rc, out, err = _finish(_start(workdir, cli_env, *flags))
    assert rc == 0, err
    _assert_bitwise(_restore(workdir, config), _restore(tmp_path / "reference", config))
    logged = [m["step"] for m in read_metrics(workdir) if "train/loss" in m]
    assert logged == list(range(1, CLI_TOTAL + 1))
    assert (workdir / "lock").read_text() == ""  # released


def test_cli_sigterm_before_the_first_step_exits_at_once(data_dir, cli_env, tmp_path):
    env = {**cli_env, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cold_cache")}
    workdir = tmp_path / "run"
    proc = _start(workdir, env, *_flags(data_dir, CLI_TOTAL))
    lock = workdir / "lock"
    _wait(lambda: lock.exists() and lock.read_text(), proc, "the workdir lock")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc, out, err = _finish(proc)
    assert time.monotonic() - sent < 10
    assert rc == EXIT_PREEMPTED, err
    assert err.strip().splitlines()[-1] == (
        "SIGTERM before the first step: nothing new to save, exiting"
    )
    assert _steps(workdir) == [] and lock.read_text() == ""


@pytest.mark.parametrize(
    "args,line",
    [
        (["--config.data.train_split=trian"], "error: data.train_split='trian': Unknown split"),
        (["--config=configs/nope.py"], "error: config file configs/nope.py not found"),
    ],
    ids=["unknown_split", "missing_config"],
)
def test_cli_user_error_is_one_line_and_exit_2(data_dir, cli_env, tmp_path, args, line):
    """A misspelt field and a wrong type: tests/test_configs.py."""
    flags = [*_flags(data_dir, 2), *args]
    rc, _, err = _finish(_start(tmp_path / "run", cli_env, *flags), timeout=120)
    assert rc == EXIT_USER_ERROR, err
    lines = [x for x in err.strip().splitlines() if not x.startswith(("W", "I"))]
    assert len(lines) == 1 and lines[0].startswith(line), err
