"""Transforms on stored image bytes (issue 19) against the same transforms on decoded arrays.

The pipeline now hands the transforms the encoded bytes, so that a JPEG can be decoded at a reduced
DCT scale (Pillow's draft) when the crop is downscaled anyway. These tests pin that this is the
same augmentation: identical output where no reduced decode applies, the decoded crop never below
the output size, and the crop, flip and RandAugment statistics of the recipe's definition.
"""

import io
import math

import numpy as np
import pytest
from PIL import Image

from tests.test_data_transforms import DEIT
from vig_jax.data import imagenet_like, randaugment, transforms


def _jpeg(height, width, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(imagenet_like.render(rng, height, width))
    out = io.BytesIO()
    image.convert(mode).save(out, "JPEG", quality=90)
    return out.getvalue()


def _decoded(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_train_transform_on_bytes_equals_arrays_when_no_reduced_decode():
    # Crops of a 300x260 image are < 2 x 224: full-scale decode, so the very same pixels.
    data = _jpeg(260, 300)
    transform = transforms.TrainTransform.from_config(DEIT, image_size=224)
    for seed in range(12):
        from_bytes = transform({"image": data, "label": 3}, np.random.default_rng(seed))
        from_array = transform({"image": _decoded(data), "label": 3}, np.random.default_rng(seed))
        np.testing.assert_array_equal(from_bytes["image"], from_array["image"], err_msg=str(seed))
        assert from_bytes["label"] == 3 and from_bytes["label"].dtype == np.int32


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_train_transform_on_bytes_with_reduced_decode_is_close(mode):
    data = _jpeg(480, 640, seed=1, mode=mode)
    transform = transforms.TrainTransform.from_config(dict(DEIT, randaugment=None), image_size=32)
    diffs = []
    for seed in range(20):
        a = transform({"image": data, "label": 0}, np.random.default_rng(seed))["image"]
        b = transform({"image": _decoded(data), "label": 0}, np.random.default_rng(seed))["image"]
        assert a.shape == (32, 32, 3) and a.dtype == np.uint8
        diffs.append(np.abs(a.astype(int) - b).mean())
    # Same crops and flips (so close), decoded at 1/2-1/8 scale then resized (so not identical).
    assert np.mean(diffs) < 4.0 and max(diffs) > 0, diffs


def test_reduced_decode_keeps_the_crop_at_least_the_output_size():
    data = _jpeg(481, 643, seed=2)
    for box, out, scale in [
        ((0, 0, 643, 481), (64, 64), 4),  # 481 / 8 < 64 <= 481 / 4
        ((10.5, 20, 10.5 + 130, 150), (64, 64), 2),
        ((0, 0, 127, 127), (64, 64), 1),  # just below twice the output: full scale
        ((0, 0, 643, 481), (40, 40), 8),
        ((0, 0, 643, 481), (224, 256), 1),  # eval-style, per axis: 481 < 2 x 256
    ]:
        image, scaled = transforms.decode_region(transforms.open_image(data), box, out)
        assert image.mode == "RGB"
        assert image.width == math.ceil(643 / scale) and image.height == math.ceil(481 / scale)
        assert scaled[2] - scaled[0] >= out[0] and scaled[3] - scaled[1] >= out[1], (box, out)


def test_eval_transform_on_bytes_matches_arrays():
    transform = transforms.EvalTransform(224, 0.875)
    small = _jpeg(333, 500, seed=3)  # shorter side < 2 x 256: decoded in full, same pixels
    np.testing.assert_array_equal(
        transform({"image": small, "label": 0})["image"],
        transform({"image": _decoded(small), "label": 0})["image"],
    )
    big = _jpeg(600, 900, seed=4)  # decoded at 1/2, still >= 256 on the shorter side
    got = transform({"image": big, "label": 0})["image"]
    want = transform({"image": _decoded(big), "label": 0})["image"]
    assert got.shape == want.shape == (224, 224, 3)
    assert 0 < np.abs(got.astype(int) - want).mean() < 3.0
    grey = _jpeg(200, 150, seed=5, mode="L")  # upscaled, grey -> RGB
    out = transform({"image": grey, "label": 0})["image"]
    assert out.shape == (224, 224, 3) and (out[..., 0] == out[..., 2]).all()


def _recorded_statistics(monkeypatch, n, data):
    """Runs the DeiT transform on `data` n times; returns the crop boxes, flips and ops drawn."""
    boxes, flips, ops = [], [], []
    draw_box = transforms.random_resized_crop_box

    def record_box(*args):
        boxes.append(draw_box(*args))
        return boxes[-1]

    transpose = Image.Image.transpose

    def record_flip(self, method):
        flips.append(method)
        return transpose(self, method)

    def recorder(op):
        def record(img, level, rng):
            ops.append((op.__name__, level))
            return op(img, level, rng)

        return record

    monkeypatch.setattr(transforms, "random_resized_crop_box", record_box)
    monkeypatch.setattr(Image.Image, "transpose", record_flip)
    monkeypatch.setattr(randaugment, "OPS", tuple(recorder(op) for op in randaugment.OPS))
    transform = transforms.TrainTransform.from_config(DEIT, image_size=32)
    for seed in range(n):
        transform({"image": data, "label": 0}, np.random.default_rng(seed))
    return boxes, flips, ops


def test_crop_flip_and_randaugment_statistics_match_the_recipe(monkeypatch):
    n, height, width = 600, 300, 400
    op_names = [op.__name__ for op in randaugment.OPS]
    boxes, flips, ops = _recorded_statistics(monkeypatch, n, _jpeg(height, width, seed=6))
    assert len(boxes) == n
    # Crops: the definition sampled directly (area ~ U(scale), log-uniform aspect, redrawn until
    # the box fits), to compare means within sampling error.
    rng = np.random.default_rng(123)
    want_area, want_log_ratio = [], []
    while len(want_area) < 20000:
        area = rng.uniform(0.08, 1.0)
        log_ratio = rng.uniform(math.log(3 / 4), math.log(4 / 3))
        w = math.sqrt(area * height * width * math.exp(log_ratio))
        h = math.sqrt(area * height * width / math.exp(log_ratio))
        if round(w) <= width and round(h) <= height:
            want_area.append(area)
            want_log_ratio.append(log_ratio)
    areas = np.array([ch * cw / (height * width) for _, _, ch, cw in boxes])
    log_ratios = np.log([cw / ch for _, _, ch, cw in boxes])
    assert abs(areas.mean() - np.mean(want_area)) < 4 * np.std(want_area) / math.sqrt(n)
    assert (
        abs(log_ratios.mean() - np.mean(want_log_ratio))
        < 4 * np.std(want_log_ratio) / (math.sqrt(n)) + 0.01
    )  # rounding of the box to whole pixels
    assert areas.min() >= 0.07 and areas.max() <= 1.0
    # Flips: probability 1/2.
    flipped = flips.count(Image.Transpose.FLIP_LEFT_RIGHT)
    assert abs(flipped - n / 2) < 4 * math.sqrt(n / 4)
    # RandAugment: 2 draws per image, each applied with probability 1/2, uniform over 15 ops,
    # level ~ N(9, 0.5) clipped to [0, 10].
    names = [name for name, _ in ops]
    p = 2 * 0.5 / len(op_names)
    counts = np.array([names.count(name) for name in op_names])
    assert abs(len(ops) - n) < 4 * math.sqrt(2 * n * 0.25)
    assert (np.abs(counts - n * p) < 4 * math.sqrt(n * p * (1 - p)) + 1).all(), counts
    levels = np.array([level for _, level in ops])
    assert abs(levels.mean() - 9.0) < 0.1 and levels.max() <= 10.0 and 0.3 < levels.std() < 0.7


def test_train_transform_on_bytes_is_deterministic_under_a_seed():
    data = _jpeg(300, 400, seed=7)
    transform = transforms.TrainTransform.from_config(DEIT, image_size=64)
    outs = [
        transform({"image": data, "label": 0}, np.random.default_rng(s))["image"] for s in (0, 0, 1)
    ]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
