"""Sources and grain pipelines on the embedded demo dataset, prepared through the real TFDS path.

The dataset is prepared once per test run into a temp data dir (~6 s of CPU).
"""

import hashlib
import math

import numpy as np
import pytest

from tests.helpers import shared_tfds_dir
from vig_jax import data
from vig_jax.data import demo_dataset, sources, transforms
from vig_jax.data.pipeline import RepeatFirstBatch

DEMO = "vig_demo_shapes"
NONE = dict(kind="none")
PAD_CROP = dict(kind="pad_crop", padding=4, hflip=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return shared_tfds_dir(tmp_path_factory, DEMO)


def _digest(image):
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _train(data_dir, **overrides):
    args = dict(
        dataset=DEMO,
        data_dir=data_dir,
        split="train",
        image_size=32,
        batch_size=8,
        seed=0,
        augment=PAD_CROP,
        shard_index=0,
        shard_count=1,
        num_workers=0,
    )
    return data.make_train_iterator(**{**args, **overrides})


def _eval(data_dir, **overrides):
    args = dict(
        dataset=DEMO,
        data_dir=data_dir,
        split="validation",
        image_size=32,
        crop_pct=0.875,
        batch_size=128,
        shard_index=0,
        shard_count=1,
        num_workers=0,
    )
    return data.make_eval_iterator(**{**args, **overrides})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in g:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_demo_dataset_info_and_records(data_dir):
    info = data.dataset_info(DEMO, data_dir)
    assert info == data.DatasetInfo(
        num_classes=10, num_examples={"train": 5000, "validation": 1000}, image_shape=(48, 48, 3)
    )
    source = sources.data_source(DEMO, data_dir, "validation")
    labels = np.array([source[i]["label"] for i in range(len(source))])
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 100))
    example = source[0]
    assert example["image"].shape == (48, 48, 3) and example["image"].dtype == np.uint8


def test_demo_dataset_stores_exactly_the_rendered_examples(data_dir):
    # Deterministic generation: re-rendering the split gives the stored images and labels.
    source = sources.data_source(DEMO, data_dir, "validation")
    stored = {(_digest(source[i]["image"]), int(source[i]["label"])) for i in range(len(source))}
    rendered = set()
    for index in range(demo_dataset.SPLIT_SIZES["validation"]):
        image, label = demo_dataset.render_example("validation", index)
        rendered.add((_digest(image), label))
    assert stored == rendered and len(stored) == 1000
    image, _ = demo_dataset.render_example("train", 0)
    assert _digest(image) not in {d for d, _ in stored}  # splits draw different examples


def test_unknown_and_unprepared_datasets_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'no_such_set'"):
        data.dataset_info("no_such_set", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not prepared") as error:
        data.dataset_info("imagenet2012", str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "imagenet2012") in message
    assert f"python -m vig_jax.data.prepare --imagenet DIR --data-dir {tmp_path}" in message


def test_train_iterator_shapes_and_determinism(data_dir):
    batches = _take(_train(data_dir), 3)
    for batch in batches:
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
        assert 0 <= batch["label"].min() and batch["label"].max() < 10
    _assert_batches_equal(_take(_train(data_dir), 3), batches)
    other = _take(_train(data_dir, seed=1), 3)
    assert not np.array_equal(other[0]["image"], batches[0]["image"])


def test_train_iterator_shards_are_disjoint_and_cover_the_split(data_dir):
    # augment none at the native size: output images are the stored ones, so they identify examples.
    seen = []
    for shard in range(2):
        it = _train(
            data_dir,
            split="validation",
            augment=NONE,
            image_size=48,
            batch_size=100,
            shard_index=shard,
            shard_count=2,
        )
        seen.append({_digest(image) for batch in _take(it, 5) for image in batch["image"]})
    assert len(seen[0]) == len(seen[1]) == 500
    assert not seen[0] & seen[1]


def test_train_iterator_reshuffles_each_epoch(data_dir):
    it = _train(
        data_dir,
        split="validation",
        augment=NONE,
        image_size=48,
        batch_size=100,
        shard_index=0,
        shard_count=2,
    )
    first, second = (
        [_digest(image) for batch in _take(it, 5) for image in batch["image"]] for _ in range(2)
    )
    assert set(first) == set(second) and first != second


def test_train_iterator_resumes_exactly_from_state(data_dir):
    it = _train(data_dir)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 2)
    resumed = _train(data_dir)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 2), expected)


def test_train_iterator_same_batches_with_worker_processes(data_dir):
    expected = _take(_train(data_dir), 3)
    it = _train(data_dir, num_workers=1)
    try:
        _assert_batches_equal(_take(it, 2), expected[:2])
        state = it.get_state()
    finally:
        it.close()
    # The state does not depend on num_workers: resume the worker run in-process.
    resumed = _train(data_dir)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 1), expected[2:])


def test_batches_do_not_depend_on_read_threads(data_dir):
    expected = _take(_train(data_dir), 3)
    it = _train(data_dir, read_threads=1)
    _assert_batches_equal(_take(it, 2), expected[:2])
    resumed = _train(data_dir, read_threads=2)
    resumed.set_state(it.get_state())
    _assert_batches_equal(_take(resumed, 1), expected[2:])
    _assert_batches_equal(list(_eval(data_dir, read_threads=1)), list(_eval(data_dir)))


def test_train_iterator_rejects_bad_arguments(data_dir):
    with pytest.raises(ValueError, match="shard_index"):
        _train(data_dir, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        _train(data_dir, batch_size=0)
    with pytest.raises(ValueError, match="augment kind"):
        _train(data_dir, augment=dict(kind="mixup"))
    with pytest.raises(ValueError, match="batches"):
        _train(data_dir).set_state({"batches": -1})
    with pytest.raises(ValueError, match="read_threads must be >= 1"):
        _train(data_dir, read_threads=0)
    with pytest.raises(ValueError, match="read_threads must be >= 1"):
        _eval(data_dir, read_threads=0)


@pytest.mark.parametrize("shard_count", [1, 3])
def test_eval_iterator_pads_and_masks(data_dir, shard_count):
    source = sources.data_source(DEMO, data_dir, "validation")
    transform = transforms.EvalTransform(32, 0.875)
    total = 0
    for shard in range(shard_count):
        batches = list(_eval(data_dir, shard_index=shard, shard_count=shard_count))
        # Same number of batches on every process: ceil(ceil(1000 / shards) / 128).
        assert len(batches) == math.ceil(math.ceil(1000 / shard_count) / 128)
        images = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        mask = np.concatenate([b["mask"] for b in batches])
        assert all(
            b["image"].shape == (128, 32, 32, 3) and b["mask"].dtype == bool for b in batches
        )
        indices = range(shard, 1000, shard_count)
        real = len(indices)
        assert mask[:real].all() and not mask[real:].any()  # padding only at the end
        assert (images[real:] == 0).all() and (labels[real:] == 0).all()
        for position in (0, real // 2, real - 1):  # real examples in shard order, eval-transformed
            want = transform(source[indices[position]])
            np.testing.assert_array_equal(images[position], want["image"])
            assert labels[position] == want["label"]
        total += real
    assert total == 1000


def test_repeat_first_batch_repeats_it_and_keeps_the_train_state(data_dir):
    """The benchmark input: the pipeline's first batch every time, the state counting batches as
    TrainIterator's does (so checkpoints resume either way); a bad state still raises."""
    first, second = _take(_train(data_dir), 2)
    it = RepeatFirstBatch(_train(data_dir))
    got = _take(it, 3)
    _assert_batches_equal(got, [first] * 3)
    assert _digest(second["image"]) != _digest(first["image"])  # a real pipeline moves on
    assert it.get_state() == {"batches": 3}
    it.set_state({"batches": 7})
    assert it.get_state() == {"batches": 7}
    _assert_batches_equal(_take(it, 1), [first])
    assert it.get_state() == {"batches": 8}
    with pytest.raises(ValueError, match="batches"):
        it.set_state({"batches": -1})
    it.close()
    # With a worker process (batches arrive through shared memory), after the pipeline is closed.
    it = RepeatFirstBatch(_train(data_dir, num_workers=1))
    _assert_batches_equal(_take(it, 3), [first] * 3)
    it.close()


def test_training_loop_takes_repeat_first_batch_from_the_config(data_dir, capsys):
    from configs import demo
    from vig_jax.train import loop

    config = demo.get_config()
    config.data.update(dataset=DEMO, data_dir=data_dir, num_workers=0)
    assert type(loop._train_iterator(config, 4)).__name__ == "TrainIterator"
    assert "repeat_first_batch" not in capsys.readouterr().out
    config.data.repeat_first_batch = True
    it = loop._train_iterator(config, 4)
    assert isinstance(it, RepeatFirstBatch)
    assert "every step trains on the first batch" in capsys.readouterr().out  # never silent
    _assert_batches_equal(_take(it, 2)[1:], _take(it, 1))
    it.close()


def test_eval_batches_kept_on_disk_equal_the_pipelines(data_dir, tmp_path):
    """`data.eval_cache_dir` on the real split: the batches read back from disk equal the
    pipeline's; preparing the data again (a new dataset_info.json) is seen by the fingerprint."""
    import ml_collections

    from vig_jax.train.loop import EvalBatches

    config = ml_collections.ConfigDict()
    config.data = dict(dataset=DEMO, data_dir=data_dir, eval_split="validation", image_size=32,
                       crop_pct=0.875, eval_batch_size=128, num_workers=0, read_threads=2,
                       eval_cache_dir=str(tmp_path))  # fmt: skip
    want = list(_eval(data_dir))
    first = list(EvalBatches(config, max_bytes=0))
    stored = list(EvalBatches(config, max_bytes=0))
    assert len(list(tmp_path.glob("*.json"))) == 1
    _assert_batches_equal(first, want)
    _assert_batches_equal(stored, want)
    fingerprint = data.split_fingerprint(DEMO, data_dir, "validation")
    assert fingerprint["num_examples"] == 1000 and fingerprint["prepared_ns"] > 0
