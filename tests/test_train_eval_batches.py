"""EvalBatches: the eval split is read once and replayed when it fits, else read every time."""

import ml_collections
import numpy as np
import pytest

from vig_jax.train import loop


def _config():
    c = ml_collections.ConfigDict()
    c.data = dict(
        dataset="fake",
        data_dir=None,
        eval_split="validation",
        image_size=4,
        crop_pct=1.0,
        eval_batch_size=2,
        num_workers=0,
        read_threads=1,
    )
    return c


@pytest.fixture
def reads(monkeypatch):
    """Replaces the pipeline by 3 batches of 2 [4, 4, 3] uint8 images; counts the passes read."""
    count = []

    def make_eval_iterator(**kwargs):
        count.append(kwargs)
        for i in range(3):
            image = np.full((2, 4, 4, 3), i, np.uint8)
            yield {"image": image, "label": np.array([i, i], np.int32)}

    monkeypatch.setattr(loop.data, "make_eval_iterator", make_eval_iterator)
    return count


def _passes(batches, n):
    return [[(int(b["image"][0, 0, 0, 0]), b["label"].tolist()) for b in batches] for _ in range(n)]


def test_small_split_is_read_once_and_replayed(reads):
    batches = loop.EvalBatches(_config())
    passes = _passes(batches, 3)
    assert len(reads) == 1 and reads[0]["split"] == "validation"
    assert passes[0] == [(0, [0, 0]), (1, [1, 1]), (2, [2, 2])]
    assert passes[1] == passes[0] and passes[2] == passes[0]


def test_split_over_the_limit_is_read_every_pass(reads):
    one_batch = 2 * 4 * 4 * 3 + 2 * 4  # image + label bytes
    batches = loop.EvalBatches(_config(), max_bytes=2 * one_batch)  # 3 batches do not fit
    passes = _passes(batches, 2)
    assert len(reads) == 2 and passes[1] == passes[0]
    assert len(passes[0]) == 3


def test_pass_stopped_early_is_not_cached(reads):
    batches = loop.EvalBatches(_config())
    next(iter(batches))  # abandoned after one batch
    assert len(_passes(batches, 1)[0]) == 3 and len(reads) == 2


@pytest.fixture
def on_disk(reads, monkeypatch, tmp_path):
    """Batches kept under tmp_path/cache (a fixed dataset fingerprint); yields a config maker."""
    fingerprint = {"dataset": "fake", "num_examples": 6}
    monkeypatch.setattr(loop.data, "split_fingerprint", lambda *a: dict(fingerprint))

    def config(**data):
        c = _config()
        c.data.update(eval_cache_dir=str(tmp_path / "cache"), **data)
        return c

    config.fingerprint = fingerprint
    return config


def test_disk_cache_replays_the_first_pass_in_later_runs(reads, on_disk):
    """max_bytes=0 (nothing kept in memory): the first pass is read and written; later passes and
    a new EvalBatches (a restarted run) read the same batches from disk, not the pipeline."""
    first = loop.EvalBatches(on_disk(), max_bytes=0)
    passes = _passes(first, 2) + _passes(loop.EvalBatches(on_disk(), max_bytes=0), 1)
    assert len(reads) == 1
    assert passes[0] == [(0, [0, 0]), (1, [1, 1]), (2, [2, 2])]
    assert passes[1] == passes[0] and passes[2] == passes[0]
    stored = list(loop.EvalBatches(on_disk(), max_bytes=0))
    assert [b["image"].shape for b in stored] == [(2, 4, 4, 3)] * 3
    np.testing.assert_array_equal(stored[2]["image"], np.full((2, 4, 4, 3), 2, np.uint8))


def test_disk_cache_is_not_used_for_other_settings_or_data(reads, on_disk):
    _passes(loop.EvalBatches(on_disk(), max_bytes=0), 1)
    _passes(loop.EvalBatches(on_disk(crop_pct=0.875), max_bytes=0), 1)  # another transform
    assert len(reads) == 2
    on_disk.fingerprint["num_examples"] = 8  # the data prepared again
    _passes(loop.EvalBatches(on_disk(), max_bytes=0), 1)
    assert len(reads) == 3


def test_disk_cache_of_an_abandoned_or_damaged_pass_is_read_again(reads, on_disk, tmp_path):
    batches = loop.EvalBatches(on_disk(), max_bytes=0)
    next(iter(batches))  # abandoned after one batch: nothing kept
    assert not any((tmp_path / "cache").iterdir())
    assert len(_passes(batches, 1)[0]) == 3 and len(reads) == 2
    (raw,) = (tmp_path / "cache").glob("*.image.raw")
    raw.write_bytes(raw.read_bytes()[:-1])  # truncated
    passes = _passes(loop.EvalBatches(on_disk(), max_bytes=0), 2)
    assert len(reads) == 3 and passes[1] == passes[0] and len(passes[0]) == 3
