"""Exports a checkpoint's inference function as a `jax.export` artifact (StableHLO + params).

    python -m vig_jax.export --checkpoint /tmp/vig_s_converted --out vig_s.jax_exported
    python -m vig_jax.export --checkpoint /tmp/vig_fmnist --config configs/fashion_mnist.py \
        --out fmnist.jax_exported

The artifact maps uint8 images [B, S, S, 3] (RGB, already through the eval transform: shorter side
to S / crop_pct, bicubic, centre crop S) to float32 logits [B, C], normalisation included; B is
symbolic, so one artifact serves every batch size. It needs only JAX to run, not this package:

    exported = jax.export.deserialize(open(path, "rb").read())
    logits = exported.call(images)

`--out`'s sidecar `<out>.json` records S, crop_pct, the classes and their names. The model's BiGLA
layers are exported in their pure-XLA form (`chunked`; a Pallas kernel call is not a stable
export target), lowered for every platform in --platforms (default cpu and cuda). Model, transform
and num_classes come from the checkpoint and --config as in `vig_jax.predict`.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from vig_jax import predict
from vig_jax.train import cli

EXPORT_BIGLA_IMPL = "chunked"


def export_classifier(
    classifier: predict.Classifier, platforms: tuple[str, ...]
) -> jax.export.Exported:
    """`jax.export` of `classifier.logits_fn()` for uint8 [b, S, S, 3], b symbolic."""
    (b,) = jax.export.symbolic_shape("b")
    size = classifier.image_size
    spec = jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8)
    return jax.export.export(jax.jit(classifier.logits_fn()), platforms=platforms)(spec)


def write(exported: jax.export.Exported, classifier: predict.Classifier, out: pathlib.Path):
    """Writes the serialized artifact to `out` and its description to `<out>.json`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(exported.serialize())
    num_classes = exported.out_avals[0].shape[-1]
    info = {
        "model": classifier.model_name,
        "input": {
            "shape": ["B", classifier.image_size, classifier.image_size, 3],
            "dtype": "uint8",
        },
        "output": {"shape": ["B", num_classes], "dtype": "float32", "meaning": "logits"},
        "crop_pct": classifier.crop_pct,
        "platforms": list(exported.platforms),
        "class_names": list(classifier.class_names) if classifier.class_names else None,
    }
    out.with_name(out.name + ".json").write_text(json.dumps(info, indent=1) + "\n")


_CONFIG = config_flags.DEFINE_config_file("config", None, "the run's config file", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "converted folder or training workdir")
_OUT = flags.DEFINE_string("out", None, "artifact file to write")
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu", "cuda"], "platforms to lower for")
flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    classifier = predict.load_classifier(
        _CHECKPOINT.value,
        _CONFIG.value,
        bigla_impl=EXPORT_BIGLA_IMPL,
        log=lambda m: print(m, file=sys.stderr),
    )
    exported = export_classifier(classifier, tuple(_PLATFORMS.value))
    out = pathlib.Path(_OUT.value)
    write(exported, classifier, out)
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): uint8 [B, {classifier.image_size}, "
        f"{classifier.image_size}, 3] -> logits [B, {exported.out_avals[0].shape[-1]}], "
        f"platforms {', '.join(exported.platforms)}"
    )


if __name__ == "__main__":
    app.run(cli.guard(main), flags_parser=cli.parse_flags)
