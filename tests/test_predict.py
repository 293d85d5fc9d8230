"""`python -m vig_jax.predict`: top-k of image files of odd sizes (PNG, JPEG, grey and colour)
through the config's eval transform, one corrupt file reported on its own line, class names."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.helpers import assert_close, load_module
from vig_jax.convert import save_params
from vig_jax.data import mix
from vig_jax.data.transforms import EvalTransform
from vig_jax.models import create_model
from vig_jax.predict import class_names, format_line, load_classifier, predict
from vig_jax.train.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
# configs/demo.py shrunk: 1 block of width 32 at 48 px (3x3 tokens), 10 classes.
OVERRIDES = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def demo_config():
    config = load_module(ROOT / "configs" / "demo.py", "configs.demo").get_config()
    config.model.overrides.update(OVERRIDES)
    return config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A converted checkpoint of the shrunk demo model and four image files, one corrupt."""
    root = tmp_path_factory.mktemp("predict")
    config = demo_config()
    model = create_model("vig_t", num_classes=10, **config.model.overrides.to_dict())
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 48, 48, 3)), train=False)["params"])
    params = init(jax.random.PRNGKey(0))
    save_params(jax.device_get(params), root / "converted", model_name="vig_t", num_classes=10)
    rng = np.random.default_rng(0)
    paths = {
        "png": root / "odd.png",  # colour, 37 x 53
        "jpeg": root / "grey.jpg",  # grey, 61 x 29
        "corrupt": root / "corrupt.jpg",
        "png2": root / "wide.png",  # colour with alpha, 20 x 90
    }
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(paths["png"])
    Image.fromarray(rng.integers(0, 256, (61, 29), dtype=np.uint8)).save(paths["jpeg"])
    paths["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(100))
    Image.fromarray(rng.integers(0, 256, (20, 90, 4), dtype=np.uint8)).save(paths["png2"])
    return root, {k: str(v) for k, v in paths.items()}


def expected_probs(config, params, path):
    """Straight from the definition: RGB, eval transform, normalize, apply, softmax."""
    image = np.asarray(Image.open(path).convert("RGB"))
    image = EvalTransform(config.data.image_size, config.data.crop_pct)(
        {"image": image, "label": 0}
    )
    x = mix.normalize(image["image"][None], config.data.mean, config.data.std)
    overrides = config.model.overrides.to_dict()
    model = create_model("vig_t", num_classes=10, bigla_impl="reference", **overrides)
    return np.asarray(jax.nn.softmax(model.apply({"params": params}, x, train=False)))[0]


def test_predict_topk_of_odd_sized_files_skipping_a_corrupt_one(files):
    root, paths = files
    config = demo_config()
    classifier = load_classifier(str(root / "converted"), config)
    assert (classifier.image_size, classifier.crop_pct) == (48, 0.875)
    errors = []
    order = [paths["png"], paths["corrupt"], paths["jpeg"], paths["png2"]]
    # Batch 2 with 3 readable files: one full batch and one padded one.
    got = predict(classifier, order, top_k=3, batch_size=2, on_error=lambda *e: errors.append(e))
    assert [e[0] for e in errors] == [paths["corrupt"]]
    assert errors[0][1].startswith("cannot read image: ")
    assert list(got) == [paths["png"], paths["jpeg"], paths["png2"]]
    for path, top in got.items():
        want = expected_probs(config, classifier.params, path)
        assert [c for c, _ in top] == list(np.argsort(-want, kind="stable")[:3]), path
        assert_close(path, [p for _, p in top], np.sort(want)[::-1][:3], 1e-5)


def test_predict_cli_prints_one_line_per_file_and_one_error_line(files):
    root, paths = files
    flags = [f"--config.model.overrides.{k}={v}" for k, v in OVERRIDES.items()]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vig_jax.predict",
            f"--checkpoint={root / 'converted'}",
            "--config=configs/demo.py",
            *flags,
            "--top_k=2",
            paths["jpeg"],
            paths["corrupt"],
            paths["png"],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [paths["jpeg"], paths["png"]]
    assert all(len(line.split("; ")) == 2 for line in lines), lines
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {paths['corrupt']}: cannot read")


def test_training_checkpoint_needs_its_config(tmp_path):
    from vig_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "checkpoints", keep=1)
    ckpt.save(1, {"params": {"head": {"bias": jnp.zeros(3)}}}, {"step": 1})
    ckpt.wait()
    ckpt.close()
    with pytest.raises(UserError, match="is a training checkpoint: pass --config"):
        load_classifier(str(tmp_path))


def test_class_names_from_tfds_metadata():
    names = class_names("fashion_mnist", 10)
    assert names[0] == "T-shirt/top" and names[9] == "Ankle boot"
    assert class_names("fashion_mnist", 5) is None  # not this dataset's head
    assert class_names("no_such_dataset", 3) is None
    assert (
        format_line("a.png", [(9, 0.75), (0, 0.25)], names)
        == "a.png: Ankle boot 0.750; T-shirt/top 0.250"
    )
    assert format_line("a.png", [(2, 1.0)], None) == "a.png: 2 1.000"


def test_inference_compiler_options_are_xla_options_and_predict_uses_them(files, monkeypatch):
    from vig_jax import models

    options = models.inference_compiler_options("gpu")
    assert options == {"xla_gpu_enable_triton_gemm": False}
    assert models.inference_compiler_options("cpu") == {}
    # The names are options this jaxlib's XLA knows (XLA's options are shared by its backends):
    # one it did not know would fail every GPU forward pass the library compiles.
    double = jax.jit(lambda x: 2 * x, compiler_options=options)
    np.testing.assert_array_equal(double(jnp.ones(3)), 2 * np.ones(3))
    # predict compiles with them: an unknown option makes it fail.
    root, paths = files
    classifier = load_classifier(str(root / "converted"), demo_config())
    monkeypatch.setattr(models, "inference_compiler_options", lambda *_: {"xla_no_such_option": 1})
    with pytest.raises(Exception, match="xla_no_such_option"):
        predict(classifier, [paths["png"]], top_k=1, batch_size=1)
