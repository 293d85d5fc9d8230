"""One pass of evaluation batches kept on disk and replayed memory-mapped.

The evaluation transform is deterministic, so the batches of one (split, image size, crop, batch,
shard) are the same at every evaluation. `BatchStore` writes them while the first pass is read
through the pipeline (one raw file per key of the batch, then a JSON record of their dtype, shape
and count, written last and atomically), and later passes, in this or a later process, read them
back memory-mapped: no JPEG decode and no resize, only a copy out of the page cache.

A store is complete only if its record names the same key (the settings and the dataset's
fingerprint, `sources.split_fingerprint`) and every file has the recorded size; otherwise the next
pass is read through the pipeline and written again. A pass abandoned half-way leaves no record.
"""

import contextlib
import hashlib
import json
import os
import pathlib
import types
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

FORMAT = 1  # bump when the stored layout or the transform's output changes


class BatchStore:
    """Batches of one evaluation pass under `directory`, named by a hash of `key`."""

    def __init__(self, directory: str | os.PathLike, key: Mapping[str, Any]):
        self.directory = pathlib.Path(directory)
        self.key = {"format": FORMAT, **key}
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self._record = self.directory / f"eval-{digest}.json"

    def _file(self, name: str) -> pathlib.Path:
        return self._record.with_name(f"{self._record.stem}.{name}.raw")

    def _load_record(self) -> dict | None:
        try:
            record = json.loads(self._record.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if record.get("key") != self.key:
            return None
        per_example = {name: int(np.prod(a["shape"])) * np.dtype(a["dtype"]).itemsize
                       for name, a in record["arrays"].items()}  # fmt: skip
        count = record["num_batches"] * record["batch_size"]
        for name, nbytes in per_example.items():
            path = self._file(name)
            if not path.exists() or path.stat().st_size != count * nbytes:
                return None
        return record

    def complete(self) -> bool:
        """Whether a full pass with this key is stored."""
        return self._load_record() is not None

    def read(self) -> Iterator[dict[str, np.ndarray]]:
        """The stored pass, batch by batch (views of memory-mapped files)."""
        record = self._load_record()
        if record is None:
            raise FileNotFoundError(f"no complete evaluation batches in {self._record}")
        b, n = record["batch_size"], record["num_batches"]
        arrays = {
            name: np.memmap(self._file(name), np.dtype(a["dtype"]), "r", 0, (n * b, *a["shape"]))
            for name, a in record["arrays"].items()
        }
        for i in range(n):
            yield {name: np.asarray(x[i * b : (i + 1) * b]) for name, x in arrays.items()}

    @contextlib.contextmanager
    def writer(self):
        """Context of one pass being written: `.add(batch)` per batch, `.commit()` at its end. Left
        without commit (the pass stopped early, or an error), it removes what it wrote."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._record.unlink(missing_ok=True)  # first: a pass being rewritten is never complete
        files, shapes, state = {}, {}, {"batches": 0, "batch_size": None, "done": False}

        def add(batch: Mapping[str, np.ndarray]) -> None:
            size = len(next(iter(batch.values())))
            if state["batch_size"] is None:
                state["batch_size"] = size
            elif size != state["batch_size"]:
                raise ValueError(f"batches of {size} after batches of {state['batch_size']}")
            for name, x in batch.items():
                x = np.ascontiguousarray(x)
                if name not in files:
                    files[name] = open(self._file(name), "wb")  # noqa: SIM115 (closed below)
                    shapes[name] = {"dtype": x.dtype.str, "shape": list(x.shape[1:])}
                files[name].write(x.tobytes())
            state["batches"] += 1

        def commit() -> None:
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
            record = {
                "key": self.key,
                "batch_size": state["batch_size"] or 0,
                "num_batches": state["batches"],
                "arrays": shapes,
            }
            tmp = self._record.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self._record)
            state["done"] = True

        try:
            yield types.SimpleNamespace(add=add, commit=commit)
        finally:
            for f in files.values():
                f.close()
            if not state["done"]:
                for name in files:
                    self._file(name).unlink(missing_ok=True)
