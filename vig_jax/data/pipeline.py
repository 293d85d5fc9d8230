"""grain input pipelines: per-process shards, shuffled infinite training stream, padded eval pass.

Training: shard (every `shard_count`-th example from `shard_index`) -> shuffle -> random transform
-> repeat (each epoch reshuffled and re-augmented: grain folds the epoch into the seeds) -> batch.
Every random draw is a function of (seed, epoch, position), so the stream does not depend on
`num_workers`, `read_threads` or thread timing, and `get_state`/`set_state` resume it exactly (the
state is the number of batches consumed).

Eval: shard -> transform -> pad with masked examples up to the same number of batches on every
process (the largest shard, rounded up to whole batches), so no example is dropped and all
processes run the same number of steps.
"""

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np
from absl import flags

from vig_jax.data import sources, transforms


def _check_common(image_size, batch_size, shard_index, shard_count, num_workers, read_threads):
    if image_size <= 0 or batch_size <= 0:
        raise ValueError(f"need image_size, batch_size > 0, got {image_size=}, {batch_size=}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index=}, {shard_count=}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers=}")
    if read_threads < 1:
        raise ValueError(f"read_threads must be >= 1, got {read_threads=}")


# Elements are whole batches (batched before `to_iter_dataset`, so a batch never depends on which
# worker built it). grain's defaults (16 threads, 500 elements ahead) assume small records and
# would hold 500 batches; a few batches ahead, built by a few threads per process, keep up.
READ_THREADS = 4  # per process (each worker, or this process without workers)
_PREFETCH_BATCHES = 8


def iterate(
    dataset: grain.MapDataset, num_workers: int, read_threads: int
) -> grain.DatasetIterator:
    """An iterator over `dataset` (batches), read by `read_threads` threads in this process or in
    each of `num_workers` grain worker processes."""
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=_PREFETCH_BATCHES)
    iter_dataset = dataset.to_iter_dataset(options)
    if num_workers > 0:
        # Batches reach this process through POSIX shared memory (grain copies each numpy array
        # into a new segment and sends only its name), not pickled through a pipe.
        # grain's worker processes read absl flags; outside `absl.app.run` (scripts, tests) they
        # are unparsed and grain raises. Their defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=num_workers)
        iter_dataset = iter_dataset.mp_prefetch(options)
    return iter(iter_dataset)


def make_train_iterator(
    *,
    dataset: str,
    data_dir: str | None,
    split: str,
    image_size: int,
    batch_size: int,
    seed: int,
    augment: Mapping[str, Any],
    shard_index: int,
    shard_count: int,
    num_workers: int,
    read_threads: int = READ_THREADS,
) -> "TrainIterator":
    """Infinite iterator of augmented training batches for this process.

    Args:
      dataset, data_dir, split: see `sources.data_source`.
      image_size: output side S.
      batch_size: examples per batch for this process (b).
      seed: fixes order and augmentations, identical for every process (shards differ anyway).
      augment: augmentation options, see `transforms.TrainTransform.from_config`.
      shard_index, shard_count: this process's disjoint share, usually
        (jax.process_index(), jax.process_count()).
      num_workers: grain worker processes (0: threads in this process).
      read_threads: threads building batches in each worker process (or in this process when
        `num_workers` is 0); workers x threads beyond the cores only adds contention.
    Returns:
      Iterator of {"image": uint8 [b, S, S, 3], "label": int32 [b]} with `get_state()` /
      `set_state(state)` for exact resumption (also with another `num_workers`, `read_threads`).
    Raises:
      ValueError: bad arguments or augment options; see also `sources.get_builder`.
    """
    _check_common(image_size, batch_size, shard_index, shard_count, num_workers, read_threads)
    transform = transforms.TrainTransform.from_config(augment, image_size)
    source = sources.data_source(dataset, data_dir, split, decode_images=False)
    ds = grain.MapDataset.source(source)[shard_index::shard_count].seed(seed)
    ds = ds.shuffle().random_map(transform).repeat(None).batch(batch_size, drop_remainder=True)
    return TrainIterator(ds, num_workers, read_threads)


class TrainIterator:
    """Infinite batch iterator whose state is just the number of batches consumed.

    Batch k is a pure function of k (see the module docstring), so resuming means starting the
    grain pipeline at batch k. The state is therefore valid across `num_workers` and `read_threads`
    settings, unlike grain's own iterator state, whose layout changes with multiprocessing.
    """

    def __init__(self, batches: grain.MapDataset, num_workers: int, read_threads: int):
        self._batches = batches
        self._num_workers = num_workers
        self._read_threads = read_threads
        self._position = 0
        self._iterator = None  # started on first use, so set_state wastes no read-ahead

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = iterate(
                self._batches[self._position :], self._num_workers, self._read_threads
            )
        batch = next(self._iterator)
        self._position += 1
        return batch

    def get_state(self) -> dict[str, int]:
        """JSON-able state: {"batches": number of batches returned so far}."""
        return {"batches": self._position}

    def set_state(self, state: Mapping[str, int]) -> None:
        """Continues after `state["batches"]` batches, as the iterator that produced `state`."""
        position = state["batches"]
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"state must be {{'batches': int >= 0}}, got {state!r}")
        self.close()
        self._position = position

    def close(self) -> None:
        """Stops grain's threads or worker processes (restarted by the next `next`)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None


class RepeatFirstBatch:
    """A benchmark's input: the first batch read from `batches`, returned again at every step.

    The training step then runs without input cost (no reading, decoding or augmenting after the
    first batch; the transfer to the device still happens per step, as in training), so the
    training loop's img/s with it against its img/s with the real pipeline says what the input
    costs (`config.data.repeat_first_batch`). The state is that of `TrainIterator` ({"batches":
    n}), so checkpoints of either resume with the other.
    """

    def __init__(self, batches: TrainIterator):
        self._batches = batches
        self._first = None
        self._position = 0

    def __iter__(self) -> "RepeatFirstBatch":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._first is None:
            # A copy: with worker processes the arrays may live in shared memory that closing
            # the pipeline (its workers are not needed any more) releases.
            self._first = {k: np.array(v, copy=True) for k, v in next(self._batches).items()}
            self._batches.close()
        self._position += 1
        return self._first

    def get_state(self) -> dict[str, int]:
        """{"batches": number of batches returned so far}, as `TrainIterator.get_state`."""
        return {"batches": self._position}

    def set_state(self, state: Mapping[str, int]) -> None:
        """Continues the count after `state["batches"]` batches (the batch stays the same)."""
        self._batches.set_state(state)
        self._position = state["batches"]

    def close(self) -> None:
        self._batches.close()


@dataclasses.dataclass(frozen=True)
class _PaddedEvalExample:
    """Maps an index to the transformed example of the shard, or to a masked zero example."""

    shard: grain.MapDataset
    image_size: int

    def __call__(self, index: int) -> dict[str, Any]:
        if index < len(self.shard):
            return {**self.shard[index], "mask": np.bool_(True)}
        return {
            "image": np.zeros((self.image_size, self.image_size, 3), np.uint8),
            "label": np.int32(0),
            "mask": np.bool_(False),
        }


def make_eval_iterator(
    *,
    dataset: str,
    data_dir: str | None,
    split: str,
    image_size: int,
    crop_pct: float,
    batch_size: int,
    shard_index: int,
    shard_count: int,
    num_workers: int,
    read_threads: int = READ_THREADS,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's shard of `split`, padded to whole batches.

    Args:
      dataset, data_dir, split: see `sources.data_source`.
      image_size: output side S; crop_pct: resize the shorter side to floor(S / crop_pct) first.
      batch_size, shard_index, shard_count, num_workers, read_threads: as in
        `make_train_iterator`.
    Returns:
      Iterator of {"image": uint8 [b, S, S, 3], "label": int32 [b], "mask": bool [b]}; padding
      examples have mask False (zero image, label 0). Every process gets
      ceil(ceil(N / shard_count) / b) batches, N the split size.
    """
    _check_common(image_size, batch_size, shard_index, shard_count, num_workers, read_threads)
    transform = transforms.EvalTransform(image_size, crop_pct)
    source = sources.data_source(dataset, data_dir, split, decode_images=False)
    shard = grain.MapDataset.source(source)[shard_index::shard_count].map(transform)
    num_batches = math.ceil(math.ceil(len(source) / shard_count) / batch_size)
    padded = grain.MapDataset.range(num_batches * batch_size).map(
        _PaddedEvalExample(shard, image_size)
    )
    return iterate(padded.batch(batch_size), num_workers, read_threads)
