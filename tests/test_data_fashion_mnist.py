"""Fashion-MNIST prepared offline from the Debian IDX files (data/fashion_mnist.py, issue 9).

Needs `apt-get install dataset-fashion-mnist` (CI installs it) or $VIG_FASHION_MNIST_DIR; skipped
with that message otherwise. Preparing all 70k examples takes ~6 s of CPU.
"""

import gzip

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.helpers import fashion_mnist_tfds_dir
from vig_jax import data
from vig_jax.data import fashion_mnist, sources

LABEL_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _raw(split):
    """The IDX arrays straight from the source files: images [N, 28, 28], labels [N]."""
    directory = fashion_mnist.resolve_source_dir()
    images_file, labels_file, count = fashion_mnist._FILES[split]
    images = fashion_mnist._read_idx(directory / images_file, fashion_mnist._IMAGE_MAGIC, count)
    labels = fashion_mnist._read_idx(directory / labels_file, fashion_mnist._LABEL_MAGIC, count)
    return images, labels


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fashion_mnist_tfds_dir(tmp_path_factory)


def test_fashion_mnist_info_matches_tfds(data_dir):
    info = data.dataset_info("fashion_mnist", data_dir)
    assert info == data.DatasetInfo(
        num_classes=10, num_examples={"train": 60000, "test": 10000}, image_shape=(28, 28, 1)
    )
    # TFDS's own registered builder recognises what we wrote: same name, version and features.
    stock = tfds.builder("fashion_mnist", data_dir=data_dir)
    assert type(stock).__module__ == "tensorflow_datasets.image_classification.mnist"
    assert stock.is_prepared() and str(stock.version) == "3.0.1"
    assert stock.info.features["label"].names == LABEL_NAMES
    assert stock.info.features["image"].shape == (28, 28, 1)
    assert stock.info.features["image"].np_dtype == np.uint8
    assert {name: s.num_examples for name, s in stock.info.splits.items()} == info.num_examples
    ours, theirs = (
        stock.as_data_source("test"),
        sources.data_source("fashion_mnist", data_dir, "test"),
    )
    np.testing.assert_array_equal(ours[17]["image"], theirs[17]["image"])


def test_fashion_mnist_records_are_the_idx_examples(data_dir):
    source = sources.data_source("fashion_mnist", data_dir, "test")
    raw_images, raw_labels = _raw("test")
    labels = np.array([source[i]["label"] for i in range(len(source))])
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(raw_labels))
    for i in (0, 1234, 9999):
        record = source[i]
        assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
        matches = np.flatnonzero((raw_images == record["image"][..., 0]).all(axis=(1, 2)))
        assert matches.size >= 1, f"record {i} is not an IDX image"
        assert record["label"] in raw_labels[matches]


def test_fashion_mnist_eval_iterator_gives_rgb(data_dir):
    batch = next(
        data.make_eval_iterator(
            dataset="fashion_mnist",
            data_dir=data_dir,
            split="test",
            image_size=28,
            crop_pct=1.0,
            batch_size=16,
            shard_index=0,
            shard_count=1,
            num_workers=0,
        )
    )
    assert batch["image"].shape == (16, 28, 28, 3)
    source = sources.data_source("fashion_mnist", data_dir, "test")
    for c in range(3):
        np.testing.assert_array_equal(batch["image"][0, ..., c], source[0]["image"][..., 0])


def test_fashion_mnist_missing_files_name_path_and_package(tmp_path, monkeypatch):
    empty = tmp_path / "no_idx_here"
    empty.mkdir()
    monkeypatch.setenv(fashion_mnist.SOURCE_DIR_ENV, str(empty))
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST IDX files not found") as error:
        data.dataset_info("fashion_mnist", str(tmp_path / "tfds"))
    message = str(error.value)
    assert str(empty / "train-images-idx3-ubyte.gz") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert fashion_mnist.SOURCE_DIR_ENV in message


def test_read_idx_rejects_a_wrong_header(tmp_path):
    path = tmp_path / "bad-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(np.array([2049, 5], ">u4").tobytes() + bytes(5))
    np.testing.assert_array_equal(fashion_mnist._read_idx(path, 2049, 5), np.zeros(5))
    with pytest.raises(ValueError, match="IDX header"):
        fashion_mnist._read_idx(path, 2049, 6)


def test_source_dir_precedence(monkeypatch):
    monkeypatch.delenv(fashion_mnist.SOURCE_DIR_ENV, raising=False)
    assert str(fashion_mnist.resolve_source_dir()) == fashion_mnist.DEFAULT_SOURCE_DIR
    monkeypatch.setenv(fashion_mnist.SOURCE_DIR_ENV, "/from/env")
    assert str(fashion_mnist.resolve_source_dir()) == "/from/env"
    assert str(fashion_mnist.resolve_source_dir("/from/arg")) == "/from/arg"


def test_fashion_mnist_train_iterator_with_worker_processes(data_dir):
    """Grain's worker processes unpickle the source: the local builder must survive pickling
    (TFDS's default pickling re-ran __init__ with keywords this builder does not take)."""
    kwargs = dict(
        dataset="fashion_mnist",
        data_dir=data_dir,
        split="train",
        image_size=28,
        batch_size=8,
        seed=0,
        augment={"kind": "none"},
        shard_index=0,
        shard_count=1,
    )
    with_workers = data.make_train_iterator(num_workers=1, **kwargs)
    in_process = data.make_train_iterator(num_workers=0, **kwargs)
    try:
        a, b = next(with_workers), next(in_process)
    finally:
        with_workers.close()
        in_process.close()
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
