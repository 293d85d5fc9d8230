"""`python -m vig_jax.data.prepare` (data/prepare.py, issue 20) on small generated folders and tars.

Covers: class-per-subfolder layouts (train/val folders, or a seeded split), the ImageNet label
order and both ImageNet layouts (official tars, extracted folders), images that need re-encoding
(CMYK, grey, PNG named .JPEG) or cannot be read (reported, not fatal), reading the result back
through the training and evaluation pipelines (with exact resume), an interrupted run, and that
TensorFlow is never imported.
"""

import hashlib
import importlib.util
import io
import json
import pathlib
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vig_jax import data
from vig_jax.data import prepare, sources, writer

DEIT = dict(
    kind="deit", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=True, randaugment="rand-m9-inc1"
)
CLASSES = ["cat", "dog", "fox"]


def _pixels(seed, h=40, w=56):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, 3) + 30 * np.sin(x[..., None] / rng.uniform(3, 9) + y[..., None])
    return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def _encoded(array, fmt, mode=None):
    image = Image.fromarray(array)
    out = io.BytesIO()
    (image.convert(mode) if mode else image).save(out, fmt)
    return out.getvalue()


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _make_folder(root, per_class=3, val=True):
    """root/train/<class>/ (+ root/val/<class>/) with one awkward file per class in train.

    Returns {relative path under train/: expected outcome} for the awkward files.
    """
    seed = 0
    for c in CLASSES:
        for i in range(per_class):
            seed += 1
            _write(root / "train" / c / f"{i}.jpg", _encoded(_pixels(seed), "JPEG"))
        if val:
            seed += 1
            _write(root / "val" / c / "v.jpeg", _encoded(_pixels(seed), "JPEG"))
    good = _encoded(_pixels(99), "JPEG")
    _write(root / "train" / "cat" / "cmyk.jpg", _encoded(_pixels(100), "JPEG", "CMYK"))
    _write(root / "train" / "dog" / "grey.JPEG", _encoded(_pixels(101), "JPEG", "L"))
    _write(root / "train" / "fox" / "png_named.JPEG", _encoded(_pixels(102), "PNG"))
    _write(root / "train" / "fox" / "truncated.jpg", good[: len(good) // 2])
    _write(root / "train" / "fox" / "notes.txt", b"not an image")  # ignored: not an image name
    return {
        "cat/cmyk.jpg": "CMYK JPEG -> RGB JPEG",
        "dog/grey.JPEG": "L JPEG -> RGB JPEG",
        "fox/png_named.JPEG": "RGB PNG -> RGB JPEG",
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    awkward = _make_folder(root)
    data_dir = tmp_path_factory.mktemp("tfds")
    # One worker process: the spawn path users take, at the least start-up cost.
    report = prepare.prepare_folder(
        root, name="my_pets", data_dir=data_dir, num_workers=1, progress=False
    )
    return root, str(data_dir), report, awkward


def test_prepare_folder_counts_labels_and_report(prepared):
    root, data_dir, report, awkward = prepared
    info = data.dataset_info("my_pets", data_dir)
    # 3 classes x 3 + 3 awkward readable files in train (the truncated one skipped), 3 in val.
    assert info == data.DatasetInfo(
        num_classes=3, num_examples={"train": 12, "validation": 3}, image_shape=(None, None, 3)
    )
    assert tfds.builder("my_pets", data_dir=data_dir).info.features["label"].names == CLASSES
    assert report.num_examples == {"train": 12, "validation": 3}
    assert [name for name, _ in report.skipped] == ["fox/truncated.jpg"]
    assert "truncated" in report.skipped[0][1].lower()
    assert dict(report.reencoded) == awkward
    summary = report.summary()
    assert "SKIPPED 1 undecodable files" in summary and "fox/truncated.jpg" in summary
    # Stored bytes: RGB JPEGs kept as they are, the awkward ones now RGB JPEGs; labels by folder.
    source = sources.data_source("my_pets", data_dir, "train", decode_images=False)
    for i in range(len(source)):
        example = source[i]
        name = example["file_name"].decode()
        assert example["label"] == CLASSES.index(name.split("/")[0]), name
        stored = Image.open(io.BytesIO(example["image"]))
        assert (stored.format, stored.mode) == ("JPEG", "RGB"), name
        if name not in awkward:
            assert example["image"] == (root / "train" / name).read_bytes(), name


def test_prepared_folder_reads_through_train_and_eval_pipelines(prepared):
    _, data_dir, _, _ = prepared
    common = dict(dataset="my_pets", data_dir=data_dir, image_size=32, shard_index=0, shard_count=1)
    train = data.make_train_iterator(
        **common, split="train", batch_size=4, seed=0, augment=DEIT, num_workers=0
    )
    batches = [next(train) for _ in range(4)]
    for batch in batches:
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert set(batch["label"].tolist()) <= {0, 1, 2}
    state = train.get_state()
    expected = [next(train) for _ in range(2)]
    resumed = data.make_train_iterator(
        **common, split="train", batch_size=4, seed=0, augment=DEIT, num_workers=1
    )
    resumed.set_state(state)
    try:
        for want in expected:
            got = next(resumed)
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])
    finally:
        resumed.close()
    evaluation = data.make_eval_iterator(
        **common, split="validation", crop_pct=0.875, batch_size=4, num_workers=0
    )
    (batch,) = list(evaluation)
    assert batch["mask"].tolist() == [True, True, True, False]
    assert sorted(batch["label"][:3].tolist()) == [0, 1, 2]


def test_seeded_split_is_stratified_deterministic_and_disjoint(tmp_path):
    for c in CLASSES:
        for i in range(10):
            _write(tmp_path / c / f"{i}.jpg", b"")  # contents are not read when listing
    classes, splits = prepare.folder_splits(tmp_path, val_fraction=0.2, seed=0)
    assert classes == CLASSES and set(splits) == {"train", "validation"}
    val = [item.file_name for item in splits["validation"]]
    train = [item.file_name for item in splits["train"]]
    assert len(val) == 6 and len(train) == 24 and not set(val) & set(train)
    assert np.bincount([item.label for item in splits["validation"]]).tolist() == [2, 2, 2]
    _, again = prepare.folder_splits(tmp_path, val_fraction=0.2, seed=0)
    _, other = prepare.folder_splits(tmp_path, val_fraction=0.2, seed=1)
    assert [item.file_name for item in again["validation"]] == val
    assert [item.file_name for item in other["validation"]] != val
    _, whole = prepare.folder_splits(tmp_path, val_fraction=0.0, seed=0)
    assert list(whole) == ["train"] and len(whole["train"]) == 30


def test_folder_errors_are_one_line_and_clear(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        prepare.folder_splits(tmp_path / "missing", val_fraction=0.1, seed=0)
    with pytest.raises(ValueError, match="has no class subfolders"):
        prepare.folder_splits(tmp_path, val_fraction=0.1, seed=0)
    _write(tmp_path / "train" / "a" / "1.jpg", b"")
    _write(tmp_path / "val" / "b" / "1.jpg", b"")
    with pytest.raises(ValueError, match=r"has classes that train lacks: \['b'\]"):
        prepare.folder_splits(tmp_path, val_fraction=0.1, seed=0)
    with pytest.raises(ValueError, match="lower_snake_case"):
        prepare.prepare_folder(tmp_path, name="My-Set", data_dir=tmp_path / "d")
    with pytest.raises(ValueError, match="'mnist' is a TFDS dataset already"):
        prepare.prepare_folder(tmp_path, name="mnist", data_dir=tmp_path / "d")
    assert prepare.main(["--from-folder", str(tmp_path / "missing"), "--name", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --from-folder") and "\n" not in err


class _InterruptAfter:
    """make_example that raises KeyboardInterrupt at the `n`-th image (a Ctrl-C mid-run)."""

    def __init__(self, n):
        self.n, self.seen = n, 0
        self.inner = prepare.ImageExample(jpeg_only=False)

    def __call__(self, item):
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt(f"Ctrl-C at image {self.n}")
        return self.inner(item)


def test_interrupted_prepare_leaves_nothing_prepared_and_reruns(tmp_path):
    root, data_dir = tmp_path / "images", tmp_path / "tfds"
    _make_folder(root, per_class=2)
    classes, splits = prepare.folder_splits(root, val_fraction=0.0, seed=0)
    kwargs = dict(
        name="pets",
        version="1.0.0",
        features=prepare.image_features(classes),
        splits=splits,
        data_dir=data_dir,
        num_workers=0,
        description="test",
        progress=False,
    )
    with pytest.raises(KeyboardInterrupt, match="Ctrl-C at image 5"):
        writer.write_dataset(make_example=_InterruptAfter(5), **kwargs)
    assert not writer.is_prepared(data_dir, "pets", "1.0.0")
    assert list((data_dir / "pets").iterdir()) == []  # the temporary directory is gone
    with pytest.raises(ValueError, match="unknown dataset 'pets'"):
        data.dataset_info("pets", str(data_dir))
    # A killed run (no clean-up) leaves a hidden directory: the next run deletes it.
    stale = data_dir / "pets" / ".incomplete-1.0.0-deadbeef"
    _write(stale / "pets-train.array_record-00000-of-00002", b"partial")
    report = writer.write_dataset(make_example=prepare.ImageExample(jpeg_only=False), **kwargs)
    assert report.num_examples == {"train": 9, "validation": 3}
    assert sorted(p.name for p in (data_dir / "pets").iterdir()) == ["1.0.0"]
    assert data.dataset_info("pets", str(data_dir)).num_examples["train"] == 9
    with pytest.raises(FileExistsError, match="already prepared"):
        writer.write_dataset(make_example=prepare.ImageExample(jpeg_only=False), **kwargs)


def _tfds_imagenet_dir():
    """tensorflow_datasets' imagenet2012 folder, found without importing the package."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    return pathlib.Path(spec.origin).parent / "datasets" / "imagenet2012"


def test_imagenet_label_order_is_tfds_label_file():
    shipped = (_tfds_imagenet_dir() / "labels.txt").read_text().split()
    ours = prepare.imagenet_class_names()
    assert ours == shipped and len(ours) == 1000 and ours == sorted(ours)
    assert ours[:2] == ["n01440764", "n01443537"] and ours[-1] == "n15075141"
    # ... and TFDS's registered builder reads the labels in that order.
    builder = tfds.builder_cls("imagenet2012")
    assert builder(data_dir="/nonexistent").info.features["label"].names == shipped
    val = (_tfds_imagenet_dir() / "validation_labels.txt").read_text().split()
    assert prepare.imagenet_validation_labels() == val and len(val) == 50000


def _tar_bytes(members):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


WNIDS = ["n01440764", "n01443537"]  # labels 0 and 1
VAL_NUMBERS = [1, 2, 3]  # ILSVRC2012_val_0000000k.JPEG, labelled from TFDS's list


def _imagenet_files():
    train = {
        f"{w}/{w}_{i}.JPEG": _encoded(_pixels(10 * n + i), "JPEG")
        for n, w in enumerate(WNIDS)
        for i in range(2)
    }
    train[f"{WNIDS[1]}/{WNIDS[1]}_9.JPEG"] = _encoded(_pixels(7), "JPEG", "CMYK")
    val = {f"ILSVRC2012_val_{k:08d}.JPEG": _encoded(_pixels(50 + k), "JPEG") for k in VAL_NUMBERS}
    return train, val


@pytest.mark.parametrize("layout", ["tars", "extracted"])
def test_prepare_imagenet_layouts(tmp_path, layout):
    train, val = _imagenet_files()
    root = tmp_path / "imagenet"
    if layout == "tars":
        inner = {
            f"{w}.tar": _tar_bytes(
                {k.split("/")[1]: v for k, v in train.items() if k.startswith(w)}
            )
            for w in WNIDS
        }
        _write(root / "ILSVRC2012_img_train.tar", _tar_bytes(inner))
        _write(root / "ILSVRC2012_img_val.tar", _tar_bytes(val))
    else:
        for name, content in train.items():
            _write(root / "train" / name, content)
        for name, content in val.items():
            _write(root / "val" / name, content)
    data_dir = tmp_path / "tfds"
    report = prepare.prepare_imagenet(root, data_dir=data_dir, num_workers=0, progress=False)
    assert report.num_examples == {"train": 5, "validation": 3} and not report.skipped
    assert [why for _, why in report.reencoded] == ["CMYK JPEG -> RGB JPEG"]
    # TFDS's own imagenet2012 class reads it: same name, version, features.
    builder = sources.get_builder("imagenet2012", str(data_dir))
    assert type(builder).__module__.startswith("tensorflow_datasets.datasets.imagenet2012")
    assert str(builder.version) == "5.1.0" and builder.info.features["label"].num_classes == 1000
    val_labels = prepare.imagenet_validation_labels()
    classes = prepare.imagenet_class_names()
    for split, files in (("train", train), ("validation", val)):
        source = sources.data_source("imagenet2012", str(data_dir), split, decode_images=False)
        by_name = {pathlib.PurePath(k).name: v for k, v in files.items()}
        for i in range(len(source)):
            example = source[i]
            name = example["file_name"].decode()
            if split == "train":
                want = classes.index(name.split("_")[0])
            else:
                want = classes.index(val_labels[int(name[15:23]) - 1])
            assert example["label"] == want, name
            if "_9." not in name:
                assert example["image"] == by_name[name], name  # original bytes


def test_no_tensorflow_imported_by_prepare_or_training_pipeline(tmp_path):
    # A `tensorflow` package that reports any import of it: the check means something even where
    # TensorFlow is installed (then TFDS could import it lazily) or not (then it would fail).
    marker = tmp_path / "tensorflow_imported"
    stub = _write(
        tmp_path / "stub" / "tensorflow" / "__init__.py",
        f"open({str(marker)!r}, 'w').close()\nraise ImportError('stub')\n".encode(),
    )
    _make_folder(tmp_path / "images", per_class=2)
    script = textwrap.dedent(
        f"""
        import json, sys
        from vig_jax import data
        from vig_jax.data import prepare
        prepare.main(["--from-folder", {str(tmp_path / "images")!r}, "--name", "pets",
                      "--data-dir", {str(tmp_path / "tfds")!r}, "--workers", "0"])
        after_prepare = "tensorflow" in sys.modules
        common = dict(dataset="pets", data_dir={str(tmp_path / "tfds")!r}, image_size=32,
                      shard_index=0, shard_count=1, num_workers=0)
        augment = dict(kind="deit", scale=(0.08, 1.0), ratio=(0.75, 1.33), hflip=True,
                       randaugment="rand-m9-mstd0.5-inc1")
        next(data.make_train_iterator(**common, split="train", batch_size=2, seed=0,
                                      augment=augment))
        list(data.make_eval_iterator(**common, split="validation", crop_pct=0.875, batch_size=2))
        print(json.dumps([after_prepare, "tensorflow" in sys.modules]))
        """
    )
    env = {"PYTHONPATH": str(stub.parent.parent), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False, False]
    assert not marker.exists(), "something imported the tensorflow package"


def test_prepare_cli_reports_and_names_the_training_flags(tmp_path, capsys):
    _make_folder(tmp_path / "images", per_class=1, val=False)
    args = ["--from-folder", str(tmp_path / "images"), "--name", "pets"]
    args += ["--data-dir", str(tmp_path / "tfds"), "--workers", "0", "--val-fraction", "0.5"]
    assert prepare.main(args) == 0
    out = capsys.readouterr().out
    assert "SKIPPED 1 undecodable files" in out and "fox/truncated.jpg" in out
    assert f"--config.data.dataset=pets --config.data.data_dir={tmp_path / 'tfds'}" in out
    assert prepare.main(args) == 2  # already prepared
    assert "pass overwrite" in capsys.readouterr().err
    digest = hashlib.sha1((tmp_path / "tfds" / "pets" / "1.0.0" / "features.json").read_bytes())
    assert prepare.main([*args, "--overwrite"]) == 0
    assert (
        digest.hexdigest()
        == hashlib.sha1(
            (tmp_path / "tfds" / "pets" / "1.0.0" / "features.json").read_bytes()
        ).hexdigest()
    )


def test_a_file_that_cannot_be_read_is_reported_not_fatal(tmp_path):
    item = prepare.ImageFile(str(tmp_path / "gone.jpg"), 0, "cat/gone.jpg")
    with pytest.raises(writer.UnreadableImage, match="cannot read: .*No such file"):
        prepare.ImageExample(jpeg_only=False)(item)
    with pytest.raises(writer.UnreadableImage, match="cannot identify image file"):
        prepare.checked_image_bytes(b"not an image", "x.jpg", jpeg_only=False)
