"""Classifies image files with a trained or converted checkpoint: top-k labels and probabilities.

    python -m vig_jax.predict --checkpoint /tmp/vig_s_converted cat.jpg dog.png
    python -m vig_jax.predict --checkpoint /tmp/vig_fmnist --config configs/fashion_mnist.py a.png

`--checkpoint` is a converted folder (`python -m vig_jax.convert`: its model.json names the model;
without --config the ImageNet eval transform at 224 px is used) or a training workdir (then
--config, the run's config, is required: it gives the model, image size, crop and normalisation).
Each image (JPEG, PNG or anything Pillow reads, any size, grey or colour) goes through the
config's eval transform (shorter side to size / crop_pct, bicubic, centre crop), in batches of
--batch_size on the default JAX device (GPU if there is one, else CPU). Class names come from the
dataset's TFDS metadata when TFDS knows the dataset, else classes print as their index.

Prints one line per image: `PATH: name p; name p; ...` (most likely first). A file that cannot be
read prints one line `error: PATH: ...` on stderr; the others are still classified, and the exit
code is then 1.
"""

import dataclasses
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vig_jax.train import cli

IMAGENET_DEFAULTS = {
    "dataset": "imagenet2012",
    "image_size": 224,
    "crop_pct": 0.875,
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A model with its params and the eval transform it expects.

    Attributes:
      model, params: `model.apply({"params": params}, images, train=False)` -> logits.
      image_size, crop_pct: the eval transform (`vig_jax.data.transforms.EvalTransform`).
      mean, std: per-channel normalisation of [0, 1] pixels.
      class_names: one per class, or None when the dataset's names are unknown.
      model_name: registered model name.
    """

    model: object
    params: dict
    image_size: int
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None
    model_name: str

    def logits_fn(self):
        """`fn(images uint8 [B, S, S, 3]) -> logits float32 [B, C]`, params closed over."""
        from vig_jax.data import mix

        def fn(images):
            x = mix.normalize(images, self.mean, self.std)
            return self.model.apply({"params": self.params}, x, train=False).astype(jnp.float32)

        return fn


def class_names(dataset: str, num_classes: int) -> tuple[str, ...] | None:
    """The label names TFDS records for `dataset` (no download, no preparation), or None."""
    try:
        import tensorflow_datasets as tfds

        names = tfds.builder(dataset).info.features["label"].names
    except Exception:  # unknown or unreadable dataset: classes print as indices
        return None
    return tuple(names) if len(names) == num_classes else None


def load_classifier(
    checkpoint: str, config=None, *, bigla_impl: str | None = None, log=None
) -> Classifier:
    """The model and params at `checkpoint`, set up as `config` says (see the module docstring).

    Args:
      bigla_impl: overrides the config's BiGLA implementation (models without BiGLA ignore it).
      log: gets a line per adaptation of the params (e.g. a resized position table).

    Raises:
      UserError: no checkpoint there, a training checkpoint without `config`, or params that do
        not fit the config's model (every difference listed).
    """
    from vig_jax.models import create_model, uses_bigla
    from vig_jax.train import init_from
    from vig_jax.train.checkpoint import read_saved_params
    from vig_jax.train.errors import UserError

    try:
        saved, source = read_saved_params(checkpoint)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    if "bias" not in saved.get(init_from.HEAD, {}):
        raise UserError(f"{checkpoint}: the params have no classifier head ({init_from.HEAD}/)")
    num_classes = saved[init_from.HEAD]["bias"].shape[-1]
    if config is not None:
        m, d = config.model, config.data
        name, dtype, impl, overrides = m.name, m.dtype, m.bigla_impl, m.overrides.to_dict()
        eval_settings = {
            "dataset": d.dataset,
            "image_size": d.image_size,
            "crop_pct": d.crop_pct,
            "mean": tuple(d.mean),
            "std": tuple(d.std),
        }
    elif source["kind"] == "converted":
        name, dtype, impl, overrides = source["model"], "float32", "auto", {}
        eval_settings = IMAGENET_DEFAULTS
    else:
        raise UserError(
            f"{checkpoint} is a training checkpoint: pass --config, the config it was trained with "
            "(model, image size and normalisation come from there)"
        )
    if bigla_impl is not None and uses_bigla(name):
        impl = bigla_impl
    model = create_model(
        name, num_classes=num_classes, dtype=jnp.dtype(dtype), bigla_impl=impl, **overrides
    )
    size = eval_settings["image_size"]
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    abstract = jax.eval_shape(
        lambda x: model.init(jax.random.PRNGKey(0), x, train=False)["params"], images
    )
    try:
        loaded, notes = init_from.adapt_params(
            saved, abstract, model_name=name, saved_model=source.get("model")
        )
    except init_from.InitFromError as e:
        raise UserError(f"{checkpoint}: {e}") from None
    if log is not None:
        for note in notes:
            log(note)
    params = jax.tree_util.tree_map_with_path(
        lambda path, _: loaded["/".join(str(k.key) for k in path)], abstract
    )
    return Classifier(
        model=model,
        params=params,
        image_size=size,
        crop_pct=eval_settings["crop_pct"],
        mean=tuple(eval_settings["mean"]),
        std=tuple(eval_settings["std"]),
        class_names=class_names(eval_settings["dataset"], num_classes),
        model_name=name,
    )


def read_image(path: str, image_size: int, crop_pct: float) -> np.ndarray:
    """The file as uint8 [S, S, 3] after the eval transform (EXIF rotation applied).

    Raises:
      OSError: missing, unreadable or not an image Pillow can decode (its message says which).
    """
    from PIL import Image, ImageOps

    from vig_jax.data.transforms import EvalTransform

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        pixels = np.asarray(image)
    return EvalTransform(image_size, crop_pct)({"image": pixels, "label": 0})["image"]


def predict(
    classifier: Classifier, paths: Sequence[str], *, top_k: int, batch_size: int, on_error=None
) -> dict[str, list[tuple[int, float]]]:
    """{path: [(class, probability), ...] (top_k, most likely first)} of the readable files.

    Unreadable files are skipped after `on_error(path, message)`. Batches have a fixed size
    (the last is padded), so one program serves every batch.
    """
    from vig_jax import models

    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be >= 1, got {top_k=}, {batch_size=}")
    fn = jax.jit(
        lambda x: jax.nn.softmax(classifier.logits_fn()(x), axis=-1),
        compiler_options=models.inference_compiler_options(),
    )
    k = min(top_k, classifier.params["head"]["bias"].shape[-1])
    results: dict[str, list[tuple[int, float]]] = {}
    readable, images = [], []

    def flush():
        if not images:
            return
        batch = np.zeros((batch_size, *images[0].shape), np.uint8)
        batch[: len(images)] = images
        probs = np.asarray(fn(batch))[: len(images)]  # [b, C]
        for path, p in zip(readable, probs, strict=True):
            order = np.argsort(-p, kind="stable")[:k]
            results[path] = [(int(c), float(p[c])) for c in order]
        readable.clear()
        images.clear()

    for path in paths:
        try:
            images.append(read_image(path, classifier.image_size, classifier.crop_pct))
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            if on_error is not None:
                on_error(path, f"cannot read image: {e}")
            continue
        readable.append(path)
        if len(images) == batch_size:
            flush()
    flush()
    return results


def format_line(path: str, top: list[tuple[int, float]], names: Sequence[str] | None) -> str:
    """`PATH: name 0.912; name 0.051` (class indices when there are no names)."""
    label = (lambda c: names[c]) if names else str
    return f"{path}: " + "; ".join(f"{label(c)} {p:.3f}" for c, p in top)


def define_flags() -> None:
    """The command line's flags (defined when run as a program, so that `vig_jax.export` can
    import this module and define its own)."""
    config_flags.DEFINE_config_file("config", None, "the run's config file", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "converted folder or training workdir")
    flags.DEFINE_integer("top_k", 5, "labels shown per image")
    flags.DEFINE_integer("batch_size", 32, "images per batch")
    flags.mark_flags_as_required(["checkpoint"])


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("no image files given")
    logging.set_verbosity(logging.WARNING)

    def log(message):
        print(message, file=sys.stderr)

    f = flags.FLAGS
    classifier = load_classifier(f.checkpoint, f.config, log=log)
    failed = []

    def on_error(path, message):
        failed.append(path)
        print(f"error: {path}: {message}", file=sys.stderr, flush=True)

    results = predict(classifier, paths, top_k=f.top_k, batch_size=f.batch_size, on_error=on_error)
    for path in paths:
        if path in results:
            print(format_line(path, results[path], classifier.class_names))
    return 1 if failed else 0


if __name__ == "__main__":
    define_flags()
    app.run(cli.guard(main), flags_parser=cli.parse_flags)
