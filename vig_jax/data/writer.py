"""One writer for every dataset we prepare: TFDS ArrayRecord shards written in parallel.

`write_dataset` turns split items into `<data_dir>/<name>/<version>/` exactly as TFDS lays a dataset
out (ArrayRecord shards, dataset_info.json, features.json, label names), so that
`tfds.builder(name, data_dir=...)` and `vig_jax.data.sources` read it by name; no TensorFlow is
involved. Used by `prepare` (image folders, ImageNet), `demo_dataset` and `fashion_mnist`.

Each worker process writes whole shards into a hidden temporary directory beside the target, which
is renamed into place once the metadata is written: an interrupted run leaves nothing that looks
prepared, and the next run deletes its leftovers and starts over.
"""

import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

_MAX_SHARD_LENGTH = 1024  # ~110 MB of ImageNet JPEGs per ArrayRecord file


class UnreadableImage(Exception):
    """An image file that does not decode; `write_dataset` skips it and reports it."""


@dataclasses.dataclass
class Report:
    """What `write_dataset` wrote: examples per split, re-encoded and skipped files, timing."""

    path: pathlib.Path
    num_examples: dict[str, int]
    reencoded: list[tuple[str, str]]  # (file_name, why)
    skipped: list[tuple[str, str]]  # (file_name, error)
    seconds: float
    num_workers: int

    def summary(self) -> str:
        total = sum(self.num_examples.values()) + len(self.skipped)
        rate = total / max(self.seconds, 1e-9)
        processes = max(self.num_workers, 1)  # 0 workers: written by this process
        lines = [
            f"wrote {self.path}: "
            + ", ".join(f"{split} {n}" for split, n in self.num_examples.items())
            + f" examples in {self.seconds:.1f} s ({rate:.0f} images/s with {processes} "
            f"process{'es' if processes > 1 else ''}, {rate / processes:.0f} per process)"
        ]
        if self.reencoded:
            lines.append(f"re-encoded as RGB: {len(self.reencoded)} files")
            lines += [f"  {name}: {why}" for name, why in self.reencoded[:20]]
            if len(self.reencoded) > 20:
                lines.append(f"  ... and {len(self.reencoded) - 20} more")
        if self.skipped:
            lines.append(f"SKIPPED {len(self.skipped)} undecodable files:")
            lines += [f"  {name}: {error}" for name, error in self.skipped]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Shard:
    path: str  # ArrayRecord file to write
    split: str
    index: int
    items: Sequence[Any]


def _write_shard(
    shard: _Shard, features: tfds.features.FeaturesDict, make_example: Callable
) -> tuple[_Shard, int, int, list, list]:
    """Writes one shard; returns (shard, examples, bytes, reencoded, skipped)."""
    writer = ArrayRecordWriter(shard.path, "group_size:1")  # TFDS's option: random access
    count = num_bytes = 0
    reencoded, skipped = [], []
    try:
        for item in shard.items:
            try:
                example, why = make_example(item)
            except UnreadableImage as error:
                skipped.append((getattr(item, "file_name", repr(item)), str(error)))
                continue
            if why:
                reencoded.append((example["file_name"], why))
            record = features.serialize_example(example)
            writer.write(record)
            count += 1
            num_bytes += len(record)
    finally:
        writer.close()
    return shard, count, num_bytes, reencoded, skipped


def _shards(name: str, directory: pathlib.Path, split: str, items: Sequence, num_workers: int):
    n = len(items)
    num_shards = max(math.ceil(n / _MAX_SHARD_LENGTH), min(4 * max(num_workers, 1), n), 1)
    bounds = np.linspace(0, n, num_shards + 1).round().astype(int)
    return [
        _Shard(
            path=str(directory / f"{name}-{split}.array_record-{i:05d}-of-{num_shards:05d}"),
            split=split,
            index=i,
            items=items[bounds[i] : bounds[i + 1]],
        )
        for i in range(num_shards)
    ]


def is_prepared(data_dir: str | os.PathLike, name: str, version: str) -> bool:
    """Whether `<data_dir>/<name>/<version>/dataset_info.json` exists (what TFDS checks)."""
    return (pathlib.Path(data_dir) / name / version / "dataset_info.json").is_file()


def write_dataset(
    *,
    name: str,
    version: str,
    features: tfds.features.FeaturesDict,
    splits: Mapping[str, Sequence[Any]],
    make_example: Callable[[Any], tuple[dict[str, Any], str]],
    data_dir: str | os.PathLike,
    num_workers: int,
    description: str,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Report:
    """Writes `splits` as the TFDS dataset `<data_dir>/<name>/<version>/` (ArrayRecord).

    Each split's items are shuffled under `seed` (so any slice, e.g. "train[:10%]", is a random
    sample), cut into shards, and every shard written by one worker: `make_example(item)` gives
    the example for `features.serialize_example` and a re-encoding note ("" if none), or raises
    `UnreadableImage` to skip the item. Everything is written to a hidden temporary directory
    beside the target, renamed into place once metadata is written; a leftover one from an
    interrupted run is deleted.

    Args:
      name, version: TFDS name and version, e.g. "imagenet2012", "5.1.0".
      features: the dataset's features (what TFDS reads them with).
      splits: split name -> items (picklable when num_workers > 0).
      make_example: picklable callable (a module-level function or a frozen dataclass).
      data_dir: TFDS data dir.
      num_workers: worker processes; 0 writes in this process.
      description: stored in dataset_info.json.
      seed: shuffle seed.
      overwrite: replace a prepared copy (else a prepared copy is an error).
      progress: show a progress bar on stderr.
    Returns:
      The report (counts, re-encoded and skipped files).
    Raises:
      FileExistsError: already prepared and not `overwrite`.
      ValueError: a split is empty, or all of its images were skipped.
    """
    start = time.perf_counter()
    parent = pathlib.Path(data_dir).expanduser() / name
    final = parent / version
    if is_prepared(data_dir, name, version) and not overwrite:
        raise FileExistsError(f"{final} is already prepared; pass overwrite to replace it")
    for split, items in splits.items():
        if not items:
            raise ValueError(f"split {split!r} of {name!r} has no examples")
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".incomplete-{version}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    temp = parent / f".incomplete-{version}-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    try:
        shards = []
        for split_index, (split, items) in enumerate(splits.items()):
            order = np.random.default_rng([seed, split_index]).permutation(len(items))
            shards += _shards(name, temp, split, [items[i] for i in order], num_workers)
        results = _run_shards(shards, features, make_example, num_workers, progress)
        split_infos, num_examples, reencoded, skipped = [], {}, [], []
        for split in splits:
            mine = sorted((r for r in results if r[0].split == split), key=lambda r: r[0].index)
            num_examples[split] = sum(r[1] for r in mine)
            if num_examples[split] == 0:
                raise ValueError(f"split {split!r} of {name!r}: no image decoded")
            split_infos.append(
                tfds.core.SplitInfo(
                    name=split,
                    shard_lengths=[r[1] for r in mine],
                    num_bytes=sum(r[2] for r in mine),
                    filename_template=None,
                )
            )
            for r in mine:
                reencoded += r[3]
                skipped += r[4]
        tfds.folder_dataset.write_metadata(
            data_dir=temp,
            features=features,
            split_infos=split_infos,
            version=version,
            check_data=False,  # reads through tf.data
            description=description,
        )
        if final.exists():  # overwrite: move the old copy aside first, then delete it
            old = parent / f".incomplete-{version}-old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            shutil.rmtree(old)
        temp.rename(final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return Report(
        path=final,
        num_examples=num_examples,
        reencoded=reencoded,
        skipped=skipped,
        seconds=time.perf_counter() - start,
        num_workers=num_workers,
    )


def _run_shards(shards, features, make_example, num_workers, progress):
    total = sum(len(s.items) for s in shards)
    bar = tqdm.tqdm(total=total, unit="img", disable=not progress, file=sys.stderr)
    results = []
    with bar:
        if num_workers == 0:
            for shard in shards:
                results.append(_write_shard(shard, features, make_example))
                bar.update(len(shard.items))
            return results
        # spawn: the caller may have started threads (JAX, grain) that fork would copy mid-state.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            futures = [pool.submit(_write_shard, s, features, make_example) for s in shards]
            try:
                for future in concurrent.futures.as_completed(futures):
                    results.append(future.result())
                    bar.update(len(results[-1][0].items))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return results


def default_data_dir() -> str:
    """TFDS's default data dir: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
