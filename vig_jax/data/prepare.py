"""Prepares image datasets as TFDS ArrayRecord, without TensorFlow (issue 20).

    python -m vig_jax.data.prepare --from-folder DIR --name NAME [--data-dir D] [--val-fraction F]
    python -m vig_jax.data.prepare --imagenet DIR [--data-dir D]

`--from-folder`: DIR/<class>/*.jpg|png|... (a seeded, per-class split of `--val-fraction` becomes
"validation"), or DIR/train/<class>/... with DIR/val/ or DIR/validation/ (and DIR/test/) holding
the same classes. Class names are the sorted subfolder names.
`--imagenet`: ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar in DIR, or the extracted layout
DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG (or DIR/val/*.JPEG, labelled from the list TFDS
ships); written as TFDS's `imagenet2012` 5.1.0 with its features and label order (sorted WordNet
ids, from the label file inside the installed tensorflow_datasets package).

Either way the result is `<data_dir>/<name>/<version>/` as TFDS writes it (ArrayRecord shards,
dataset_info.json, features.json, label names), read by name through `vig_jax.data.sources` like
any prepared TFDS dataset, written by `vig_jax.data.writer.write_dataset` (which also writes the
demo set and Fashion-MNIST): worker processes, one shard each, into a hidden temporary directory
that is renamed into place only when complete, so an interrupted run leaves nothing that looks
prepared, and running it again starts over.

Images: an RGB JPEG (or RGB PNG) is stored as its original bytes, after checking that it decodes
in full; other decodable images (CMYK or grey JPEGs, PNGs named .JPEG, palette or RGBA PNGs, ...)
are converted to RGB and re-encoded, as JPEG when the source was a JPEG or is named like one, else
as PNG; undecodable files are skipped and listed in the report at the end.
"""

import argparse
import dataclasses
import io
import os
import pathlib
import re
import sys
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from PIL import Image

from vig_jax.data.writer import (
    Report,
    UnreadableImage,
    default_data_dir,
    write_dataset,
)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
_JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg"})
_REENCODE_JPEG_QUALITY = 95
_SPLIT_ALIASES = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
_DATASET_NAME = re.compile(r"[a-z][a-z0-9_]*")

IMAGENET_NAME, IMAGENET_VERSION = "imagenet2012", "5.1.0"
_IMAGENET_TARS = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
_IMAGENET_VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """One image to store: bytes of `path` (or `size` bytes at `offset` of it: a tar member).

    Attributes:
      path: file on disk.
      label: class index.
      file_name: stored in the example and shown in the report (e.g. "cat/001.jpg").
      offset, size: byte range inside `path` when the image is a tar member.
    """

    path: str
    label: int
    file_name: str
    offset: int | None = None
    size: int | None = None

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset is None:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


def checked_image_bytes(data: bytes, file_name: str, *, jpeg_only: bool) -> tuple[bytes, str]:
    """The bytes to store for one image file, after checking that it decodes in full.

    Args:
      data: the file's bytes.
      file_name: its name; a .jpg/.jpeg name asks for JPEG when re-encoding.
      jpeg_only: re-encode anything but an RGB JPEG as JPEG (imagenet2012's feature is JPEG).
    Returns:
      (bytes, why): the original bytes and "" for an RGB JPEG (or an RGB PNG, unless jpeg_only
      or named like a JPEG), else RGB re-encoded bytes and the reason, e.g. "CMYK JPEG -> RGB
      JPEG".
    Raises:
      UnreadableImage: the bytes do not decode as an image.
    """
    try:
        jpeg_name = os.path.splitext(file_name)[1].lower() in _JPEG_EXTENSIONS
        with Image.open(io.BytesIO(data)) as image:
            kind = f"{image.mode} {image.format}"
            if image.mode == "RGB" and (
                image.format == "JPEG" or (image.format == "PNG" and not (jpeg_only or jpeg_name))
            ):
                # The entropy-coded data is decoded in full at any DCT scale, so 1/8 finds a
                # truncated or corrupt file at a fraction of the cost.
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
                return data, ""
            rgb = image.convert("RGB")  # decodes everything
            as_jpeg = jpeg_only or jpeg_name or image.format == "JPEG"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"{type(error).__name__}: {error}") from None
    out = io.BytesIO()
    if as_jpeg:
        rgb.save(out, "JPEG", quality=_REENCODE_JPEG_QUALITY)
    else:
        rgb.save(out, "PNG")
    return out.getvalue(), f"{kind} -> RGB {'JPEG' if as_jpeg else 'PNG'}"


@dataclasses.dataclass(frozen=True)
class ImageExample:
    """`make_example` for `ImageFile`s: {"image": checked bytes, "label", "file_name"}."""

    jpeg_only: bool

    def __call__(self, item: ImageFile) -> tuple[dict[str, Any], str]:
        try:
            data = item.read()
        except OSError as error:  # vanished, unreadable: reported like an undecodable file
            raise UnreadableImage(f"cannot read: {error}") from None
        data, why = checked_image_bytes(data, item.file_name, jpeg_only=self.jpeg_only)
        return {"image": data, "label": item.label, "file_name": item.file_name}, why


# ---------------------------------------------------------------------------------------------
# Class-per-subfolder datasets


def _image_files(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )


def _class_dirs(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_splits(
    root: str | os.PathLike, *, val_fraction: float, seed: int
) -> tuple[list[str], dict[str, list[ImageFile]]]:
    """Class names and split items of a class-per-subfolder image folder.

    Args:
      root: DIR/<class>/... or DIR/train/<class>/... (+ DIR/val|validation/, DIR/test/).
      val_fraction: fraction of each class moved to "validation" when there is no val folder
        (0: no validation split).
      seed: fixes that split.
    Returns:
      (class names, {split: [ImageFile]}), labels index the sorted class names.
    Raises:
      FileNotFoundError / ValueError: no such folder, no classes, an empty class, a val class
        that train lacks, a bad fraction.
    """
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--from-folder {root}: no such directory")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    split_dirs = {_SPLIT_ALIASES[d]: root / d for d in _class_dirs(root) if d in _SPLIT_ALIASES}
    if "train" not in split_dirs:
        split_dirs = {"train": root}
    if "validation" in split_dirs and split_dirs.get("validation") != split_dirs["train"]:
        val_fraction = 0.0  # a val folder exists: use it, split nothing off
    classes = _class_dirs(split_dirs["train"])
    if not classes:
        raise ValueError(
            f"{split_dirs['train']} has no class subfolders; expected DIR/<class>/<image> "
            "or DIR/train/<class>/<image>"
        )
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[ImageFile]] = {}
    for split, directory in split_dirs.items():
        unknown = sorted(set(_class_dirs(directory)) - set(classes))
        if unknown:
            raise ValueError(f"{directory} has classes that train lacks: {unknown[:10]}")
        items = []
        for name in _class_dirs(directory):
            files = _image_files(directory / name)
            if split == "train" and not files:
                raise ValueError(f"class folder {directory / name} has no images")
            items += [ImageFile(str(p), index[name], str(p.relative_to(directory))) for p in files]
        splits[split] = items
    if val_fraction > 0:
        rng = np.random.default_rng(seed)
        train, val = [], []
        for label in range(len(classes)):
            mine = [item for item in splits["train"] if item.label == label]
            picked = set(rng.permutation(len(mine))[: round(val_fraction * len(mine))].tolist())
            for i, item in enumerate(mine):
                (val if i in picked else train).append(item)
        splits["train"], splits["validation"] = train, val
    return classes, splits


def image_features(class_names: Sequence[str]) -> tfds.features.FeaturesDict:
    """Features of the datasets we prepare from images: image bytes, label, file name."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=list(class_names)),
            "file_name": tfds.features.Text(),
        }
    )


def prepare_folder(
    root: str | os.PathLike,
    *,
    name: str,
    data_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    seed: int = 0,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Report:
    """`--from-folder`: see the module docstring and `folder_splits`; writes `<name>` 1.0.0.

    Raises:
      ValueError: `name` not a valid TFDS name, or the name of a TFDS dataset (TFDS would read
        ours with that dataset's code); see also `folder_splits` and `write_dataset`.
    """
    if not _DATASET_NAME.fullmatch(name):
        raise ValueError(f"--name must be lower_snake_case (a TFDS name), got {name!r}")
    if name in tfds.list_builders(with_community_datasets=False):
        raise ValueError(f"--name {name!r} is a TFDS dataset already; choose another name")
    classes, splits = folder_splits(root, val_fraction=val_fraction, seed=seed)
    return write_dataset(
        name=name,
        version="1.0.0",
        features=image_features(classes),
        splits=splits,
        make_example=ImageExample(jpeg_only=False),
        data_dir=data_dir,
        num_workers=os.cpu_count() if num_workers is None else num_workers,
        description=f"Prepared by vig_jax.data.prepare from {pathlib.Path(root).resolve()}",
        seed=seed,
        overwrite=overwrite,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------
# ImageNet-1k as TFDS's imagenet2012


def _tfds_imagenet_file(name: str) -> pathlib.Path:
    """A text file that tensorflow_datasets ships beside its imagenet2012 builder."""
    return pathlib.Path(tfds.__file__).parent / "datasets" / "imagenet2012" / name


def imagenet_class_names() -> list[str]:
    """TFDS's imagenet2012 label order: the 1000 WordNet ids of its labels.txt (sorted)."""
    return _tfds_imagenet_file("labels.txt").read_text().split()


def imagenet_validation_labels() -> list[str]:
    """WordNet id of each validation image, ILSVRC2012_val_00000001.JPEG first (TFDS's list)."""
    return _tfds_imagenet_file("validation_labels.txt").read_text().split()


def _tar_members(path: pathlib.Path, offset: int = 0) -> list[tuple[str, int, int]]:
    """(name, data offset in `path`, size) of the regular files of a tar at `offset` of `path`."""
    with open(path, "rb") as f:
        f.seek(offset)
        with tarfile.open(fileobj=f, mode="r:") as tar:
            return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def _validation_item(path, name, label_of, offset=None, size=None) -> ImageFile | None:
    match = _IMAGENET_VAL_FILE.fullmatch(os.path.basename(name))
    if match is None:
        return None
    number = int(match.group(1))
    return ImageFile(str(path), label_of[number], os.path.basename(name), offset, size)


def imagenet_splits(root: str | os.PathLike, progress: bool = True) -> dict[str, list[ImageFile]]:
    """The train and validation items of ImageNet-1k in `root` (official tars or extracted).

    Raises:
      FileNotFoundError: neither layout found (names what was looked for).
      ValueError: a class folder or inner tar that is not one of the 1000 WordNet ids.
    """
    root = pathlib.Path(root).expanduser()
    classes = imagenet_class_names()
    index = {wnid: i for i, wnid in enumerate(classes)}
    val_labels = imagenet_validation_labels()
    label_of = {n + 1: index[wnid] for n, wnid in enumerate(val_labels)}

    def label(wnid: str, where) -> int:
        if wnid not in index:
            raise ValueError(f"{where}: {wnid!r} is not an ImageNet-1k WordNet id")
        return index[wnid]

    splits = {}
    train_tar, train_dir = root / _IMAGENET_TARS["train"], root / "train"
    if train_tar.is_file():
        inner = _tar_members(train_tar)
        items = []
        for tar_name, offset, _ in tqdm.tqdm(
            inner, desc="listing train tar", unit="class", disable=not progress, file=sys.stderr
        ):
            wnid = label(pathlib.PurePath(tar_name).stem, train_tar)
            items += [
                ImageFile(str(train_tar), wnid, os.path.basename(n), off, size)
                for n, off, size in _tar_members(train_tar, offset)
            ]
        splits["train"] = items
    elif train_dir.is_dir():
        splits["train"] = [
            ImageFile(str(p), label(wnid, train_dir), p.name)
            for wnid in _class_dirs(train_dir)
            for p in _image_files(train_dir / wnid)
        ]
    val_tar = root / _IMAGENET_TARS["validation"]
    val_dir = next((root / d for d in ("val", "validation") if (root / d).is_dir()), None)
    if val_tar.is_file():
        members = _tar_members(val_tar)
        found = [_validation_item(val_tar, n, label_of, off, size) for n, off, size in members]
        splits["validation"] = [item for item in found if item is not None]
    elif val_dir is not None:
        items = [
            ImageFile(str(p), label(wnid, val_dir), p.name)
            for wnid in _class_dirs(val_dir)
            for p in _image_files(val_dir / wnid)
        ]
        flat = [p for p in val_dir.iterdir() if p.is_file()]
        items += [i for i in (_validation_item(p, p.name, label_of) for p in flat) if i]
        splits["validation"] = sorted(items, key=lambda item: item.file_name)
    if not splits:
        raise FileNotFoundError(
            f"--imagenet {root}: found neither {', '.join(_IMAGENET_TARS.values())} nor "
            "train/<wnid>/*.JPEG, val/<wnid>/*.JPEG (or val/ILSVRC2012_val_*.JPEG)"
        )
    return splits


def prepare_imagenet(
    root: str | os.PathLike,
    *,
    data_dir: str | os.PathLike,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Report:
    """`--imagenet`: writes TFDS's imagenet2012 5.1.0 (features and label order from TFDS)."""
    splits = imagenet_splits(root, progress=progress)
    # The registered builder's own features: what `tfds.builder("imagenet2012")` reads with.
    features = tfds.builder_cls(IMAGENET_NAME)(data_dir=str(data_dir)).info.features
    return write_dataset(
        name=IMAGENET_NAME,
        version=IMAGENET_VERSION,
        features=features,
        splits=splits,
        make_example=ImageExample(jpeg_only=True),
        data_dir=data_dir,
        num_workers=os.cpu_count() if num_workers is None else num_workers,
        description=f"ImageNet-1k (ILSVRC 2012) prepared by vig_jax.data.prepare from {root}",
        overwrite=overwrite,
        progress=progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vig_jax.data.prepare", description=__doc__.split("\n\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folder", metavar="DIR", help="class-per-subfolder images")
    source.add_argument("--imagenet", metavar="DIR", help="ImageNet-1k tars or extracted folders")
    parser.add_argument("--name", help="dataset name (with --from-folder), e.g. my_flowers")
    parser.add_argument(
        "--data-dir", default=default_data_dir(), help="TFDS data dir (%(default)s)"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="without a val/ folder: share of each class held out as validation (%(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="split and shuffle seed")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes")
    parser.add_argument("--overwrite", action="store_true", help="replace a prepared copy")
    args = parser.parse_args(argv)
    if args.from_folder is not None and not args.name:
        parser.error("--from-folder needs --name")
    if args.imagenet is not None and args.name:
        parser.error("--imagenet always writes 'imagenet2012'; drop --name")
    try:
        if args.imagenet is not None:
            report = prepare_imagenet(
                args.imagenet,
                data_dir=args.data_dir,
                num_workers=args.workers,
                overwrite=args.overwrite,
            )
        else:
            report = prepare_folder(
                args.from_folder,
                name=args.name,
                data_dir=args.data_dir,
                val_fraction=args.val_fraction,
                seed=args.seed,
                num_workers=args.workers,
                overwrite=args.overwrite,
            )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    name = args.name or IMAGENET_NAME
    print(f"train with: --config.data.dataset={name} --config.data.data_dir={args.data_dir}")
    return 0


if __name__ == "__main__":
    # Through the package module, so worker processes unpickle its classes under their real name.
    from vig_jax.data import prepare

    sys.exit(prepare.main())
