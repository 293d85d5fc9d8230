"""Host-side transforms (data/transforms.py, data/randaugment.py): shapes, ranges, determinism."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from vig_jax.data import imagenet_like, png, randaugment, transforms

DEIT = dict(
    kind="deit",
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    hflip=True,
    randaugment="rand-m9-mstd0.5-inc1",
)


def _image(h=40, w=56, c=3, seed=0):
    """A structured, mid-contrast test image [h, w, c] uint8 (smooth ramps plus a block)."""
    y, x = np.mgrid[0:h, 0:w]
    base = 60 + (x * 80 // w) + (y * 40 // h)
    planes = [base, base[::-1], base[:, ::-1]][:c]
    image = np.stack(planes, -1).astype(np.uint8)
    image[h // 4 : h // 2, w // 4 : w // 2] = 200
    return image if c > 1 else image[..., :1]


def test_to_rgb_grey_and_rgb():
    grey = _image(c=1)
    rgb = transforms.to_rgb(grey)
    assert rgb.shape == grey.shape[:2] + (3,)
    assert all(np.array_equal(rgb[..., i], grey[..., 0]) for i in range(3))
    assert transforms.to_rgb(grey[..., 0]).shape == rgb.shape
    assert transforms.to_rgb(rgb) is rgb
    with pytest.raises(ValueError, match="image"):
        transforms.to_rgb(np.zeros((4, 4, 2), np.uint8))


@pytest.mark.parametrize("height,width", [(40, 56), (300, 20), (7, 7)])
def test_random_resized_crop_box_inside_image(height, width):
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(200):
        top, left, ch, cw = transforms.random_resized_crop_box(
            rng, height, width, (0.08, 1.0), (3 / 4, 4 / 3)
        )
        assert 0 <= top and top + ch <= height and 0 <= left and left + cw <= width
        assert ch > 0 and cw > 0
        areas.append(ch * cw / (height * width))
    if height * 3 > width and width * 3 > height:  # not a strip: the area really varies
        assert min(areas) < 0.3 and max(areas) > 0.6


def test_random_resized_crop_box_fallback_is_centre_crop_in_ratio():
    # A 10x100 strip cannot hold a box of full area with aspect in [3/4, 4/3]: centre-crop fallback.
    top, left, ch, cw = transforms.random_resized_crop_box(
        np.random.default_rng(0), 10, 100, (1.0, 1.0), (3 / 4, 4 / 3)
    )
    assert (top, ch) == (0, 10) and cw == round(10 * 4 / 3) and left == (100 - cw) // 2


def _full_resize_then_crop(image, size, crop_pct):
    """The definition: shorter side to floor(size / crop_pct) (bicubic), then the centre crop."""
    height, width = image.shape[:2]
    new_h, new_w = transforms._short_side_size(height, width, int(size / crop_pct))
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    full = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    return np.asarray(full)[top : top + size, left : left + size].astype(int)


def test_resize_and_centre_crop_geometry():
    image = _image(64, 48)
    out = transforms.resize_and_centre_crop(image, 32, crop_pct=0.875)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # Shorter side to floor(32 / 0.875) = 36: the full 36x48 resize, centre-cropped, is the answer.
    # Only the crop is resized, from a box in float32 source coordinates (Pillow's): the weights
    # round differently, by <= 2 levels on this hard-edged block, <= 1 on a photo-like image.
    diff = np.abs(out.astype(int) - _full_resize_then_crop(image, 32, 0.875))
    assert diff.max() <= 2 and diff.mean() < 0.2, (diff.max(), diff.mean())
    photo = imagenet_like.render(np.random.default_rng(0), 300, 400)
    out = transforms.resize_and_centre_crop(photo, 224, crop_pct=0.875)
    want = _full_resize_then_crop(photo, 224, 0.875)
    diff = np.abs(out.astype(int) - want)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    # Negative control: the crop one column off is far outside that tolerance.
    assert np.abs(out[:, 1:].astype(int) - want[:, :-1]).mean() > 1.0
    # crop_pct 1 at the native size is the identity.
    square = _image(32, 32)
    np.testing.assert_array_equal(transforms.resize_and_centre_crop(square, 32, 1.0), square)


def test_pad_and_random_crop_is_a_shifted_window():
    image = _image(16, 16)
    rng = np.random.default_rng(3)
    offsets = set()
    for _ in range(30):
        out = transforms.pad_and_random_crop(rng, image, 4)
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
        found = [
            (t, l)
            for t in range(9)
            for l in range(9)
            if np.array_equal(padded[t : t + 16, l : l + 16], out)
        ]
        assert found, "output is not a window of the zero-padded image"
        offsets.add(found[0])
    assert len(offsets) > 5


@pytest.mark.parametrize(
    "augment",
    [
        DEIT,
        dict(DEIT, randaugment=None),
        dict(kind="pad_crop", padding=4, hflip=True),
        dict(kind="none"),
    ],
    ids=["deit", "deit_no_ra", "pad_crop", "none"],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_train_transform_shapes_dtypes_determinism(augment, channels):
    transform = transforms.TrainTransform.from_config(augment, image_size=24)
    example = {"image": _image(40, 56, channels), "label": 7}
    outs = [transform(example, np.random.default_rng(s))["image"] for s in (0, 0, 1, 2, 3)]
    for out in outs:
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(outs[0], outs[1])  # same seed, same image
    label = transform(example, np.random.default_rng(0))["label"]
    assert label == 7 and label.dtype == np.int32
    if augment["kind"] == "none":
        assert all(np.array_equal(outs[0], o) for o in outs[1:])
    else:
        assert any(not np.array_equal(outs[0], o) for o in outs[2:])


def test_train_transform_hflip_gives_both_orientations():
    transform = transforms.TrainTransform.from_config(
        dict(kind="pad_crop", padding=0, hflip=True), image_size=16
    )
    image = _image(16, 16)
    outs = [
        transform({"image": image, "label": 0}, np.random.default_rng(s))["image"]
        for s in range(20)
    ]
    flipped = [np.array_equal(o, image[:, ::-1]) for o in outs]
    assert all(f or np.array_equal(o, image) for f, o in zip(flipped, outs, strict=True))
    assert 0 < sum(flipped) < 20


def test_eval_transform_matches_resize_and_crop():
    image = _image(64, 48, c=1)
    out = transforms.EvalTransform(32, 0.875)({"image": image, "label": 3})
    want = transforms.resize_and_centre_crop(transforms.to_rgb(image), 32, 0.875)
    np.testing.assert_array_equal(out["image"], want)
    assert out["label"] == 3
    with pytest.raises(ValueError, match="crop_pct"):
        transforms.EvalTransform(32, 1.5)


@pytest.mark.parametrize(
    "augment,match",
    [
        (dict(kind="autoaug"), "kind"),
        (dict(DEIT, colour_jitter=0.4), "unknown: \\['colour_jitter'\\]"),
        ({k: v for k, v in DEIT.items() if k != "hflip"}, "missing: \\['hflip'\\]"),
        (dict(DEIT, scale=(0.5, 0.1)), "scale"),
        (dict(DEIT, scale=(0.0, 1.0)), "scale"),
        (dict(DEIT, hflip=1), "hflip"),
        (dict(DEIT, randaugment="rand-m9-mstd0.5"), "inc1"),
        (dict(DEIT, randaugment="rand-m9-x3-inc1"), "x3"),
        (dict(kind="pad_crop", padding=-1, hflip=True), "padding"),
    ],
)
def test_train_transform_rejects_bad_options(augment, match):
    with pytest.raises(ValueError, match=match):
        transforms.TrainTransform.from_config(augment, image_size=24)


def test_randaugment_parse():
    ra = randaugment.RandAugment.from_string("rand-m9-mstd0.5-inc1")
    assert (ra.magnitude, ra.magnitude_std, ra.num_ops) == (9.0, 0.5, 2)
    assert randaugment.RandAugment.from_string("rand-n3-m5-inc1").num_ops == 3


@pytest.mark.parametrize("op", randaugment.OPS, ids=lambda op: op.__name__)
def test_randaugment_each_op_changes_image_keeps_size(op):
    img = Image.fromarray(_image(32, 40))
    out = op(img, 9.0, np.random.default_rng(0))
    assert out.size == img.size and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), np.asarray(img))


def test_randaugment_level_semantics():
    img = Image.fromarray(_image(32, 40))
    arr = np.asarray(img)
    np.testing.assert_array_equal(np.asarray(randaugment._posterize(img, 10.0, None)), 0)
    np.testing.assert_array_equal(
        np.asarray(randaugment._posterize(img, 0.0, None)), np.asarray(ImageOps.posterize(img, 4))
    )
    add = np.asarray(randaugment._solarize_add(img, 10.0, None)).astype(int)
    np.testing.assert_array_equal(
        add, np.where(arr < 128, np.minimum(arr.astype(int) + 110, 255), arr)
    )
    # Level 0 leaves the geometric ops at the identity.
    np.testing.assert_array_equal(
        np.asarray(randaugment._rotate(img, 0.0, np.random.default_rng(0))), arr
    )


def test_randaugment_changes_images_keeps_shape_and_is_deterministic():
    ra = randaugment.RandAugment.from_string("rand-m9-mstd0.5-inc1")
    img = Image.fromarray(_image(32, 40))
    outs = [np.asarray(ra(img, np.random.default_rng(s))) for s in range(12)]
    assert all(o.shape == (32, 40, 3) and o.dtype == np.uint8 for o in outs)
    # P(both ops skipped) = 1/4 per image; 12 images all unchanged has probability 6e-8.
    assert sum(not np.array_equal(o, np.asarray(img)) for o in outs) >= 6
    np.testing.assert_array_equal(np.asarray(ra(img, np.random.default_rng(5))), outs[5])


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 1), (5, 7, 3)], ids=str)
def test_encode_png_round_trips_through_pillow(shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(png.encode_png(image))))
    np.testing.assert_array_equal(decoded.reshape(shape), image)
    with pytest.raises(ValueError, match="uint8"):
        png.encode_png(image.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        png.encode_png(np.zeros((4, 4, 2), np.uint8))


@pytest.mark.parametrize("vertical", [False, True], ids=["x", "y"])
def test_shear_and_translate_match_pillows_transform(vertical):
    # The numpy form of shear/translate (randaugment.shift_lines) against Pillow's bicubic affine
    # transform, the form timm applies: equal to within one grey level (float32 weights vs
    # Pillow's truncated float64 sum), fill colour and edges included. Non-square, so that an
    # x/y mix-up shows.
    rng = np.random.default_rng(0)
    diffs = []
    for index in range(16):
        img = Image.fromarray(imagenet_like.render(rng, 48 + index, 80))
        if index % 2:
            slope, offset = rng.uniform(-0.3, 0.3), 0.0  # shear
        else:
            slope, offset = 0.0, rng.uniform(-0.45, 0.45) * img.size[int(vertical)]  # translate
        got = np.asarray(randaugment._shift(img, slope, offset, vertical)).astype(int)
        want = np.asarray(randaugment.pillow_shift(img, slope, offset, vertical)).astype(int)
        assert got.shape == want.shape
        diffs.append(np.abs(got - want))
        # Negative control: the opposite direction is far off.
        wrong = np.asarray(randaugment.pillow_shift(img, -slope, -offset, vertical)).astype(int)
        assert np.abs(got - wrong).mean() > 5.0
    assert max(d.max() for d in diffs) <= 1
    assert np.mean([(d > 0).mean() for d in diffs]) < 1e-3
    # Beyond the image: all fill colour; no shift: the identity.
    img = Image.fromarray(_image(20, 30))
    np.testing.assert_array_equal(
        np.asarray(randaugment._shift(img, 0.0, 31.0, vertical)),
        np.broadcast_to(randaugment._FILL, (20, 30, 3)),
    )
    np.testing.assert_array_equal(
        np.asarray(randaugment._shift(img, 0.0, 0.0, vertical)), np.asarray(img)
    )
