"""Metrics output: JSON lines and TensorBoard event files in the workdir, plus a tqdm progress bar.

TensorBoard files are written with `tensorboard`'s own event writer and summary protos, so no
TensorFlow is needed. Only process 0 writes; other processes get a writer that does nothing.
"""

import json
import math
import pathlib
import time
from collections.abc import Iterator

import jax
import tqdm
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricsWriter:
    """Appends `{"step": s, name: value, ...}` lines to `metrics.jsonl` and scalars to TensorBoard.

    Args:
      workdir: run directory; files go to `workdir/metrics.jsonl` and `workdir/tensorboard/`.
      enabled: False on processes other than 0.
      resumed_at: the step a resumed run restored; TensorBoard then drops the earlier run's events
        after it (a SessionLog START at the next step, TensorBoard's restart marker), as
        `workdir.truncate_metrics` does for `metrics.jsonl`.
    """

    def __init__(
        self, workdir: str | pathlib.Path, *, enabled: bool, resumed_at: int | None = None
    ):
        self._enabled = enabled
        if not enabled:
            return
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        # Appending: a resumed run continues the same files.
        self._jsonl = open(workdir / "metrics.jsonl", "a")  # closed in close()
        self._events = EventFileWriter(str(workdir / "tensorboard"))
        if resumed_at:
            restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._events.add_event(
                event_pb2.Event(wall_time=time.time(), step=resumed_at + 1, session_log=restart)
            )

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._enabled:
            return
        scalars = {name: float(value) for name, value in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        )
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
        self._events.add_event(event)

    def flush(self) -> None:
        if self._enabled:
            self._jsonl.flush()
            self._events.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._events.close()


def peak_memory_gb() -> float | None:
    """The largest `peak_bytes_in_use` of this process's devices in GB, None where the backend
    keeps no memory statistics (CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / 1e9 if peaks else None


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """All lines of `workdir/metrics.jsonl`, in order."""
    with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


class InputWait:
    """The share of the training loop's wall time spent waiting for the input pipeline.

    The host runs ahead of the device (asynchronous dispatch) and waits for it only when it reads
    metrics, so time blocked in `next(batches)` is time the device may sit idle for lack of a
    batch: near 0 when the device is the bottleneck, large when the input is.
    """

    def __init__(self):
        self.restart()

    def next(self, batches: Iterator):
        """next(batches), timed."""
        start = time.perf_counter()
        batch = next(batches)
        self._wait += time.perf_counter() - start
        return batch

    def fraction(self) -> float:
        """Waiting seconds / wall seconds since the last `fraction` or `restart`; then restarts."""
        now = time.perf_counter()
        share = self._wait / max(now - self._start, 1e-9)
        self._wait, self._start = 0.0, now
        return share

    def restart(self) -> None:
        """Starts a new window (e.g. after an evaluation, which is not training time)."""
        self._wait, self._start = 0.0, time.perf_counter()


class Progress:
    """tqdm bar over optimizer steps showing loss, lr and img/s (tqdm adds it/s and the ETA)."""

    def __init__(self, *, initial: int, total: int, batch_size: int, enabled: bool):
        self._batch_size = batch_size
        self._bar = tqdm.tqdm(
            initial=initial,
            total=total,
            unit="step",
            dynamic_ncols=True,
            disable=not (enabled and jax.process_index() == 0),
        )
        self._last = (initial, time.perf_counter())

    def update(self, step: int, loss: float, lr: float) -> float:
        """Moves the bar to `step` (steps done), shows the latest values and returns the img/s
        since the previous update (all processes together)."""
        last_step, last_time = self._last
        now = time.perf_counter()
        rate = (step - last_step) * self._batch_size / max(now - last_time, 1e-9)
        self._last = (step, now)
        shown = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
        self._bar.set_postfix(loss=shown, lr=f"{lr:.2e}", img_s=f"{rate:,.0f}", refresh=False)
        self._bar.update(step - self._bar.n)
        return rate

    def write(self, message: str) -> None:
        """Prints above the bar (or plainly when disabled, on process 0)."""
        if jax.process_index() == 0:
            tqdm.tqdm.write(message)

    def close(self) -> None:
        self._bar.close()
