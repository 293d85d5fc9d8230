"""`train_and_evaluate(config, workdir)`: the training loop, resumable and sharded.

Reads as a table of contents: signals, workdir lock, config checks (`trainer.plan_run`), data,
restore (or init), then the step loop with log / checkpoint / eval hooks. The resume order is:
the newest checkpoint in `workdir` that restores completely, else the params at
`config.init_from` (a fine-tune: `vig_jax.train.init_from`), else a fresh initialisation from
`config.seed`.

Faults (docs/faults.md has the table): every run stops with one of the errors of
`vig_jax.train.errors`; none loses more than the steps since the last good checkpoint.
"""

import contextlib
import os
import pathlib
import signal
import socket
import sys
import threading

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from vig_jax import data
from vig_jax.data.batch_store import BatchStore
from vig_jax.data.pipeline import RepeatFirstBatch
from vig_jax.train import init_from, sharding
from vig_jax.train.checkpoint import Checkpointer
from vig_jax.train.errors import EXIT_PREEMPTED, NonFiniteLossError, Preempted
from vig_jax.train.metrics import InputWait, MetricsWriter, Progress, peak_memory_gb
from vig_jax.train.trainer import Trainer, oom_hint, plan_run
from vig_jax.train.workdir import WorkdirLock, truncate_metrics

__all__ = ["EvalBatches", "NonFiniteLossError", "evaluate", "train_and_evaluate"]


# Cores a training process needs beside its input workers: on the H200 host, ViG-S (224², batch
# 128) on JPEGs with 20 workers on 24 cores trained within 1% of its speed on a repeated batch;
# with 22 workers on 22 cores it lost 29% without waiting for batches (docs/data.md).
SPARE_CORES = 4


def workers_cores_warning(num_workers: int, cores: int) -> str | None:
    """A one-line warning when `num_workers` input workers leave the training process fewer than
    SPARE_CORES of the `cores` it may run on, else None."""
    if num_workers == 0 or cores - num_workers >= SPARE_CORES:
        return None
    return (
        f"data.num_workers={num_workers} on {cores} cores leaves the training process "
        f"{max(cores - num_workers, 0)} of its own: its step dispatch then competes with the "
        f"workers (29% slower measured); use at most {max(cores - SPARE_CORES, 1)} (docs/data.md)"
    )


def _available_cores() -> int:
    """CPU cores this process may run on (its affinity, e.g. under taskset), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _train_iterator(config, shard_batch: int):
    d = config.data
    warning = workers_cores_warning(d.num_workers, _available_cores())
    if warning:
        _say(warning)
    batches = data.make_train_iterator(
        dataset=d.dataset,
        data_dir=d.data_dir,
        split=d.train_split,
        image_size=d.image_size,
        batch_size=shard_batch,
        seed=config.seed,
        augment=d.augment.to_dict(),
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        num_workers=d.num_workers,
        read_threads=d.read_threads,
    )
    if not d.repeat_first_batch:
        return batches
    _say("data.repeat_first_batch=True: every step trains on the first batch (a benchmark setting)")
    return RepeatFirstBatch(batches)


# A host copy of the eval batches is kept when they fit in this many bytes (Fashion-MNIST's test
# split at 56 px: 94 MB; ImageNet's validation split at 224 px, 7.5 GB, is read again every time).
EVAL_CACHE_MAX_BYTES = 2 << 30


class EvalBatches:
    """This process's batches of `config.data.eval_split`, iterable once per evaluation.

    The first pass reads them through the input pipeline; if they fit in `max_bytes` they are kept
    in host memory and later passes replay them (the eval transform is deterministic, so they are
    the same batches), which saves restarting the pipeline's worker processes for every evaluation
    (each evaluation took ~5 s in the H100 Fashion-MNIST run, for 10k 56-px images that need a
    fraction of a second of GPU time). Otherwise every pass reads them again, unless
    `config.data.eval_cache_dir` is set: then the first pass also writes them there
    (`data.batch_store.BatchStore`) and later passes, in this run or a later one with the same
    settings and data, read them back memory-mapped.
    """

    def __init__(self, config, max_bytes: int = EVAL_CACHE_MAX_BYTES):
        self._config, self._max_bytes = config, max_bytes
        self._cached: list[dict[str, np.ndarray]] | None = None
        self._store = self._disk_store()

    def _disk_store(self) -> BatchStore | None:
        """`config.data.eval_cache_dir` (if set): this process's batches kept on disk there."""
        d = self._config.data
        directory = d.get("eval_cache_dir")
        if not directory:
            return None
        key = dict(
            data.split_fingerprint(d.dataset, d.data_dir, d.eval_split),
            image_size=d.image_size,
            crop_pct=d.crop_pct,
            batch_size=d.eval_batch_size // jax.process_count(),
            shard=[jax.process_index(), jax.process_count()],
        )
        return BatchStore(directory, key)

    def _read(self):
        d = self._config.data
        return data.make_eval_iterator(
            dataset=d.dataset,
            data_dir=d.data_dir,
            split=d.eval_split,
            image_size=d.image_size,
            crop_pct=d.crop_pct,
            batch_size=d.eval_batch_size // jax.process_count(),
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            num_workers=d.num_workers,
            read_threads=d.read_threads,
        )

    def __iter__(self):
        if self._cached is not None:
            yield from self._cached
            return
        if self._store is not None and self._store.complete():
            yield from self._store.read()
            return
        kept, size = [], 0
        store = self._store.writer() if self._store is not None else contextlib.nullcontext()
        with store as writer:
            for batch in self._read():
                if kept is not None:
                    size += sum(x.nbytes for x in batch.values())
                    if size <= self._max_bytes:
                        kept.append(batch)
                    else:
                        kept = None
                if writer is not None:
                    writer.add(batch)
                yield batch
            if writer is not None:
                writer.commit()
        if kept is not None:
            self._cached = kept


def evaluate(trainer: Trainer, params, config, batches: EvalBatches | None = None):
    """One pass over `config.data.eval_split` (or over `batches`, to reuse them across calls):
    {"loss", "top1", "top5"} over the real examples."""
    if batches is None:
        batches = EvalBatches(config, max_bytes=0)
    sums = None
    for local in batches:
        out = trainer.eval_step(params, sharding.global_batch(local, trainer.mesh))
        sums = out if sums is None else jax.tree_util.tree_map(lambda a, b: a + b, sums, out)
    sums = jax.device_get(sums)
    count = float(sums["count"])
    return {
        "loss": float(sums["loss_sum"]) / count,
        "top1": float(sums["top1"]) / count,
        "top5": float(sums["top5"]) / count,
    }


class _StopRequest:
    """SIGTERM and SIGINT become a flag the loop polls after each step: it then saves and stops.

    Until the first step of the run is done there is nothing new to save, and the process may be
    deep in a compile that can take minutes (Python signal handlers only run between bytecodes):
    a watcher thread, woken through `signal.set_wakeup_fd`, then exits the process at once with
    `EXIT_PREEMPTED` after running `cleanups` (releasing the workdir lock).
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None  # name of the signal received
        self.cleanups: list = []
        self._before_first_step = True
        self._previous: dict = {}
        self._wakeup = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        self._previous = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._wakeup = (reader, writer, signal.set_wakeup_fd(writer.fileno()))
        threading.Thread(target=self._watch, args=(reader,), daemon=True).start()
        return self

    def _handle(self, signum, frame):
        del frame
        self.requested = signal.Signals(signum).name

    def _watch(self, reader: socket.socket):
        while True:
            try:
                received = reader.recv(1)
            except OSError:
                return
            if not received:
                return
            if received[0] in self._SIGNALS and self._before_first_step:
                name = signal.Signals(received[0]).name
                sys.stderr.write(f"{name} before the first step: nothing new to save, exiting\n")
                sys.stderr.flush()
                for cleanup in self.cleanups:
                    cleanup()
                os._exit(EXIT_PREEMPTED)

    def first_step_done(self) -> None:
        self._before_first_step = False

    def __exit__(self, *exc):
        if self._wakeup is not None:
            reader, writer, previous_fd = self._wakeup
            signal.set_wakeup_fd(previous_fd)
            writer.close()
            reader.close()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _stop_agreed(requested: bool, step: int, every: int) -> bool:
    """Whether all processes stop after `step`: any process's SIGTERM stops every process.

    With several processes the flags are gathered every `every` steps only (a collective), so
    all processes save the same step; a single process checks every step.
    """
    if jax.process_count() == 1:
        return requested
    if step % every:
        return False
    return bool(np.any(multihost_utils.process_allgather(np.asarray(requested))))


def _check_finite(window: list[tuple[int, dict]], last_good_step: int | None) -> list[dict]:
    """Host copies of the window's metrics; raises at the first non-finite loss or gradient.

    The gradient norm is checked too: a non-finite gradient with a finite loss already puts
    NaNs in the params, which must not be checkpointed.
    """
    host = jax.device_get([m for _, m in window])
    for (step, _), m in zip(window, host, strict=True):
        if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
            raise NonFiniteLossError(
                f"loss is {float(m['loss'])} (gradient norm {float(m['grad_norm'])}) at step "
                f"{step}; training stopped. The last good checkpoint is step {last_good_step} "
                "(restarting resumes from it)."
            )
    return host


def _say(message: str) -> None:
    """One line for the user, above the progress bar (process 0 only)."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message)


def restore_or_init(config, trainer: Trainer, ckpt: Checkpointer, train_iter):
    """`(state, step)` to start from: the newest checkpoint in the workdir that restores
    completely (the data iterator is set to its position), else `init_from.initial_state` at
    step 0 (the params at `config.init_from`, or a fresh init from `config.seed`).

    Raises:
      UserError: the workdir's checkpoints hold another model (see `Checkpointer.restore_latest`).
    """
    found = ckpt.restore_latest(trainer.abstract_state, _say, check_data=train_iter.set_state)
    if found is None:
        return init_from.initial_state(trainer, config, log=_say), 0
    step, state, _ = found
    _say(f"resumed from step {step} in {ckpt.directory}")
    return state, step


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict[str, float]:
    """Trains per `config` (see configs/common.py), writing checkpoints and metrics to `workdir`.

    Resumes from the newest good checkpoint in `workdir/checkpoints` if there is one. Returns
    the last evaluation metrics ({"eval/top1", ...}).

    Raises (all `vig_jax.train.errors.RunError`s, each with its exit code):
      UserError: a config field, the dataset or the workdir (in use by another run, not
        writable, or holding a run of another model); raised before the first step.
      NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint is kept).
      CheckpointSaveError: a save failed or stalled (the previous checkpoint is kept).
      Preempted: SIGTERM/SIGINT; a checkpoint of the step reached was saved.
    """
    workdir = pathlib.Path(workdir)
    loop = config.loop
    is_main = jax.process_index() == 0
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(_StopRequest())
        if is_main:
            lock = WorkdirLock(workdir, _say)
            stop.cleanups.append(lock.release)  # before taking it: a signal may come at once
            stack.enter_context(lock)
        mesh = sharding.make_mesh()
        plan = plan_run(config, mesh)
        trainer, total_steps = plan.trainer, plan.total_steps
        ckpt = Checkpointer(workdir / "checkpoints", keep=loop.keep_checkpoints)
        stack.callback(ckpt.close)
        train_iter = _train_iterator(config, config.data.batch_size // jax.process_count())
        # grain's threads / worker processes must not outlive the run.
        stack.callback(train_iter.close)
        state, start = restore_or_init(config, trainer, ckpt, train_iter)
        if is_main and truncate_metrics(workdir, start):
            _say(f"metrics.jsonl: dropped the lines after step {start} (they are re-run)")
        writer = MetricsWriter(workdir, enabled=is_main, resumed_at=start)
        stack.callback(writer.close)
        progress = Progress(
            initial=start,
            total=total_steps,
            batch_size=config.data.batch_size,
            enabled=loop.progress_bar,
        )
        stack.callback(progress.close)
        eval_batches = EvalBatches(config)
        last_ckpt = start if start else None
        eval_metrics: dict[str, float] = {}
        window: list[tuple[int, dict]] = []  # device metrics of the steps not yet logged
        input_wait = InputWait()
        for step in range(start + 1, total_steps + 1):
            global_batch = sharding.global_batch(input_wait.next(train_iter), mesh)
            with oom_hint():
                state, metrics = trainer.train_step(state, global_batch)
            if step == start + 1:
                jax.block_until_ready(metrics)
                stop.first_step_done()
            ckpt.check()  # a save that failed since the last step stops the run now
            window.append((step, metrics))
            last = step == total_steps
            # A signal: save right away, no evaluation (grace periods before SIGKILL are short).
            stopping = _stop_agreed(stop.requested is not None, step, loop.log_every_steps)
            save = last or stopping or step % plan.ckpt_every_steps == 0
            if save or step % loop.log_every_steps == 0:
                host = _check_finite(window, last_ckpt)
                mean = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}
                mean["train/lr"] = float(host[-1]["lr"])
                mean["train/img_per_s"] = progress.update(
                    step, mean["train/loss"], mean["train/lr"]
                )
                mean["train/input_wait_frac"] = input_wait.fraction()
                peak = peak_memory_gb()
                if peak is not None:
                    mean["device/peak_memory_gb"] = peak
                writer.write(step, mean)
                if not loop.progress_bar:  # logs without a terminal still show the run's progress
                    _say(_train_line(step, total_steps, mean))
                window = []
            # Saved before the evaluation: a failing evaluation must not cost this checkpoint.
            if save:
                ckpt.save(step, state, train_iter.get_state())
                last_ckpt = step
            if stopping and not last:
                ckpt.wait()
                raise Preempted(
                    f"{stop.requested or 'a signal'}: saved checkpoint at step {step} in "
                    f"{ckpt.directory}; rerun the same command to resume"
                )
            if last or step % plan.eval_every_steps == 0:
                eval_metrics = _evaluate_all(trainer, state, config, eval_batches)
                writer.write(step, eval_metrics)
                _say(f"step {step}: " + _format(eval_metrics))
                input_wait.restart()  # the evaluation is not training time
        ckpt.wait()
    return eval_metrics


def _evaluate_all(trainer: Trainer, state, config, batches: EvalBatches) -> dict[str, float]:
    out = {f"eval/{k}": v for k, v in evaluate(trainer, state.params, config, batches).items()}
    if state.ema is not None:
        ema = evaluate(trainer, state.ema, config, batches)
        out |= {f"eval_ema/{k}": v for k, v in ema.items()}
    return out


def _train_line(step: int, total: int, mean: dict[str, float]) -> str:
    """`step 50/1000: loss 2.3149, lr 7.13e-06, 3,172 img/s, input wait 1.0%`."""
    wait = 100 * mean["train/input_wait_frac"]
    return (
        f"step {step}/{total}: loss {mean['train/loss']:.4f}, lr {mean['train/lr']:.2e}, "
        f"{mean['train/img_per_s']:,.0f} img/s, input wait {wait:.1f}%"
    )


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
