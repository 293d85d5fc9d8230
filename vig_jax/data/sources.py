"""Dataset sources: TFDS datasets read by random access (`as_data_source`), no TensorFlow.

Two datasets are prepared here on first use, offline: `vig_demo_shapes` (procedural) and
`fashion_mnist` (from local IDX files). Any other name (e.g. `imagenet2012`, or a folder of images)
must already be prepared in ArrayRecord format in the data dir (`python -m vig_jax.data.prepare`);
we only read it.
"""

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from vig_jax.data import demo_dataset, fashion_mnist, writer

# Datasets we prepare ourselves on first use, without network or TensorFlow.
_LOCAL_DATASETS = {"vig_demo_shapes": demo_dataset.prepare, "fashion_mnist": fashion_mnist.prepare}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the schedule need to know about a dataset.

    Attributes:
      num_classes: number of labels.
      num_examples: examples per split, e.g. {"train": 60000, "test": 10000}.
      image_shape: stored image shape (h, w, C); h and w are None for variable-size images. The
        pipeline always outputs 3 channels, whatever C is.
    """

    num_classes: int
    num_examples: dict[str, int]
    image_shape: tuple[int | None, int | None, int]


def _not_prepared_message(dataset: str, builder: tfds.core.DatasetBuilder) -> str:
    root = builder.data_dir_root
    return (
        f"TFDS dataset {dataset!r} is not prepared: no dataset_info.json in {builder.data_dir}. "
        f"vig-jax only reads prepared datasets ({', '.join(sorted(_LOCAL_DATASETS))} excepted). "
        "Prepare it once, without TensorFlow: "
        f"`python -m vig_jax.data.prepare --imagenet DIR --data-dir {root}` for imagenet2012 "
        "(DIR: the ILSVRC2012 tars, or train/ and val/ folders), or "
        f"`python -m vig_jax.data.prepare --from-folder DIR --name NAME --data-dir {root}` for a "
        f"folder of images; other TFDS datasets: `tfds build {dataset} --data_dir={root} "
        "--file_format=array_record` (TFDS's builders may need TensorFlow), or copy a prepared "
        "ArrayRecord copy there. Reading needs no TensorFlow."
    )


def get_builder(dataset: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """A prepared TFDS builder for `dataset`; the local datasets are prepared on first use.

    Args:
      dataset: TFDS name, e.g. "vig_demo_shapes", "fashion_mnist", "imagenet2012".
      data_dir: TFDS data dir; None means TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    Raises:
      ValueError: unknown dataset name.
      FileNotFoundError: a dataset we cannot prepare is not prepared (says where TFDS looked), or
        Fashion-MNIST's source files are missing (names them and the apt package).
    """
    if dataset in _LOCAL_DATASETS:
        _LOCAL_DATASETS[dataset](data_dir or writer.default_data_dir())
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"unknown dataset {dataset!r}: not one of ours ({', '.join(sorted(_LOCAL_DATASETS))}), "
            f"not a TFDS name, and not prepared in {data_dir or writer.default_data_dir()} "
            f"(a folder of images: `python -m vig_jax.data.prepare --from-folder DIR --name "
            f"{dataset}`)"
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(_not_prepared_message(dataset, builder))
    return builder


def dataset_info(dataset: str, data_dir: str | None) -> DatasetInfo:
    """Classes, split sizes and image shape of `dataset` (prepares the local datasets if needed)."""
    info = get_builder(dataset, data_dir).info
    return DatasetInfo(
        num_classes=info.features["label"].num_classes,
        num_examples={name: split.num_examples for name, split in info.splits.items()},
        image_shape=tuple(info.features["image"].shape),
    )


def split_fingerprint(dataset: str, data_dir: str | None, split: str) -> dict[str, Any]:
    """What identifies the prepared data of `split`: where it lies, its TFDS version, its size and
    when its dataset_info.json was written (preparing it again changes that)."""
    builder = get_builder(dataset, data_dir)
    info_file = os.path.join(builder.data_dir, "dataset_info.json")
    return {
        "dataset": dataset,
        "data_dir": os.path.abspath(builder.data_dir),
        "version": str(builder.info.version),
        "split": split,
        "num_examples": len(data_source(dataset, data_dir, split, decode_images=False)),
        "prepared_ns": os.stat(info_file).st_mtime_ns,
    }


def data_source(
    dataset: str, data_dir: str | None, split: str, *, decode_images: bool = True
) -> Sequence[dict[str, Any]]:
    """Random-access split: `source[i] == {"image": uint8 [h, w, C], "label": int, ...}`.

    Args:
      dataset, data_dir: as in `get_builder`.
      split: a split name or TFDS slice, e.g. "train", "validation", "train[:90%]".
      decode_images: False gives "image" as its stored encoded bytes (JPEG, PNG), which the
        transforms decode at the scale they need.
    Raises:
      ValueError: unknown split, or the dataset was prepared in a format without random access.
    """
    builder = get_builder(dataset, data_dir)
    decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
    try:
        return builder.as_data_source(split=split, decoders=decoders)
    except NotImplementedError as e:
        raise ValueError(
            f"{dataset!r} in {builder.data_dir} is prepared as {builder.info.file_format}, "
            "which has no random access; prepare it again with --file_format=array_record"
        ) from e
