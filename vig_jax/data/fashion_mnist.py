"""TFDS `fashion_mnist` prepared offline from the original IDX files.

TFDS's own builder downloads the IDX files and yields numpy images, which TFDS can only encode with
TensorFlow. `LocalFashionMNIST` subclasses it unchanged in name, version, features and splits
(image [28, 28, 1] uint8, label ClassLabel(10), train 60000 / test 10000), but reads the files from
a local directory (Debian's `dataset-fashion-mnist` package by default) and yields PNG bytes, so it
prepares without network or TensorFlow into `<data_dir>/fashion_mnist/3.0.1/` as ArrayRecord.
`tfds.builder("fashion_mnist")` (the stock class) reads the result, and a copy prepared by stock
TFDS with `file_format="array_record"` (which needs TensorFlow) holds the same examples.
"""

import gzip
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist

from vig_jax.data.png import encode_png

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
SOURCE_DIR_ENV = "VIG_FASHION_MNIST_DIR"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049  # IDX headers: ubyte data of rank 3 and rank 1


def resolve_source_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    """Directory holding the IDX files: `override`, else $VIG_FASHION_MNIST_DIR, else Debian's."""
    return pathlib.Path(override or os.environ.get(SOURCE_DIR_ENV) or DEFAULT_SOURCE_DIR)


def check_source_files(directory: pathlib.Path) -> None:
    """Raises FileNotFoundError naming the missing files and how to get them."""
    missing = [
        directory / name for images, labels, _ in _FILES.values() for name in (images, labels)
    ]
    missing = [path for path in missing if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found: {', '.join(map(str, missing))}. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, puts them in "
            f"{DEFAULT_SOURCE_DIR}), or point ${SOURCE_DIR_ENV} at a directory holding "
            "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz."
        )


def _read_idx(path: pathlib.Path, magic: int, count: int) -> np.ndarray:
    """Reads a gzipped IDX file of uint8: [count] labels or [count, 28, 28] images."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    rank = magic & 0xFF
    header = np.frombuffer(data, dtype=">u4", count=1 + rank)
    if header[0] != magic or header[1] != count:
        raise ValueError(f"{path}: IDX header {header.tolist()} != magic {magic}, count {count}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + rank)).reshape(header[1:])


class LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
    """TFDS's `fashion_mnist` (same name, version, info), prepared from local IDX files.

    `skip_registration` keeps TFDS's registered builder in place: `tfds.builder("fashion_mnist")`
    still returns the stock class, which reads what this one wrote.
    """

    name = "fashion_mnist"

    def __init__(self, *, data_dir: str | None, source_dir: str | os.PathLike | None = None):
        """data_dir: TFDS data dir (None: TFDS's default); source_dir: see resolve_source_dir."""
        # ArrayRecord: the random-access format that `as_data_source` and grain read.
        super().__init__(data_dir=data_dir, file_format="array_record")
        self._source_dir = resolve_source_dir(source_dir)

    def __getstate__(self):
        # Grain's worker processes unpickle the data source, and TFDS's own pickling re-runs
        # __init__ with the base class's keywords (config, version); this one takes these two.
        return {"data_dir": self._original_state["data_dir"], "source_dir": str(self._source_dir)}

    def __setstate__(self, state):
        self.__init__(**state)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the files are local
        check_source_files(self._source_dir)
        return {split: self._generate_examples(split) for split in _FILES}

    def _generate_examples(self, split):
        images_file, labels_file, count = _FILES[split]
        images = _read_idx(self._source_dir / images_file, _IMAGE_MAGIC, count)
        labels = _read_idx(self._source_dir / labels_file, _LABEL_MAGIC, count)
        # Same keys as TFDS's builder (the index), hence the same example order after preparation.
        for index in range(count):
            yield index, {"image": encode_png(images[index]), "label": int(labels[index])}


def prepare(
    data_dir: str | None, source_dir: str | os.PathLike | None = None
) -> tfds.core.DatasetBuilder:
    """Prepares `fashion_mnist` under `data_dir` (None: TFDS's default) unless done; ~6 s of CPU.

    Args:
      data_dir: TFDS data dir.
      source_dir: directory of the IDX files; see `resolve_source_dir`.
    Returns:
      The prepared builder.
    Raises:
      FileNotFoundError: IDX files missing (names them and the apt package).
    """
    builder = LocalFashionMNIST(data_dir=data_dir, source_dir=source_dir)
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder
