"""TFDS `fashion_mnist` prepared offline from the original IDX files.

TFDS's own builder downloads the IDX files and yields numpy images, which TFDS can only encode with
TensorFlow. `prepare` writes the same dataset (TFDS's name, version, features and splits: image
[28, 28, 1] uint8, label ClassLabel(10), train 60000 / test 10000) from a local directory (Debian's
`dataset-fashion-mnist` package by default) as PNG bytes, through `writer.write_dataset`, without
network or TensorFlow, into `<data_dir>/fashion_mnist/3.0.1/` as ArrayRecord.
`tfds.builder("fashion_mnist")` (the stock class) reads the result, and a copy prepared by stock
TFDS with `file_format="array_record"` (which needs TensorFlow) holds the same examples.
"""

import gzip
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from vig_jax.data import writer
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


NAME = "fashion_mnist"


def _example(item: tuple[np.ndarray, int]) -> tuple[dict, str]:
    image, label = item
    return {"image": encode_png(image), "label": int(label)}, ""


def prepare(data_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None) -> None:
    """Prepares `fashion_mnist` under `data_dir` unless done; ~6 s of CPU.

    Args:
      data_dir: TFDS data dir.
      source_dir: directory of the IDX files; see `resolve_source_dir`.
    Raises:
      FileNotFoundError: IDX files missing (names them and the apt package).
    """
    stock = tfds.builder_cls(NAME)(data_dir=str(data_dir))  # TFDS's features and version
    if writer.is_prepared(data_dir, NAME, str(stock.version)):
        return
    directory = resolve_source_dir(source_dir)
    check_source_files(directory)
    splits = {}
    for split, (images_file, labels_file, count) in _FILES.items():
        images = _read_idx(directory / images_file, _IMAGE_MAGIC, count)
        labels = _read_idx(directory / labels_file, _LABEL_MAGIC, count)
        splits[split] = list(zip(images, labels, strict=True))
    writer.write_dataset(
        name=NAME,
        version=str(stock.version),
        features=stock.info.features,
        splits=splits,
        make_example=_example,
        data_dir=data_dir,
        num_workers=0,  # tiny images: worker start-up would cost more than it saves
        description=stock.info.description,
        progress=False,
    )
