"""The ViG stem's first convolution (9 x 9, stride 8, 3 channels) in each of its forms, alone.

    python benchmarks/bench_stem.py                      # 224² B128 and 2048² B2, one GPU
    python benchmarks/bench_stem.py --smoke              # CPU check (/tmp/bench_stem_smoke.*)

For each case (batch, size, output channels F; ViG-S's stem has F 192, ViG-T's 96) and each form
of `layers.CONV_IMPLS` ("conv": XLA's convolution; "patches": `conv_patches`, 81 strided slices
concatenated and one matmul; "blocks": `conv_blocks`, 8 x 8 pixel blocks as channels and a 2 x 2
convolution), bf16: the forward and the kernel's gradient (what training needs; images have no
gradient), each jitted and timed with `harness.time_call` (median ms per call). The forms compute
the same function (tests/test_model_forms.py); in the model XLA fuses the bias, the norm and the
activation around them, so the model's own numbers come from bench_vs_vit's `stem_impl` variants.
Results: `<out>.json` and `<out>.md`.
"""

import argparse
import functools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402

CASES = ((128, 224, 192), (2, 2048, 96))


def conv_forms():
    """{name: fn(x, kernel, stride)} for every stem form."""
    import jax

    from vig_jax.models.layers import CONV_IMPLS, conv_blocks, conv_patches

    def conv(x, kernel, stride):
        dims = ("NHWC", "HWIO", "NHWC")
        pad = ((1, 1), (1, 1))
        return jax.lax.conv_general_dilated(x, kernel, (stride,) * 2, pad, dimension_numbers=dims)

    forms = {"conv": conv, "patches": conv_patches, "blocks": conv_blocks}
    assert tuple(forms) == CONV_IMPLS, CONV_IMPLS
    return forms


def measure(batch, size, features, iters):
    """Rows {case, form, fwd_ms, dkernel_ms} of one case."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (9, 9, 3, features), jnp.bfloat16)
    rows = []
    for name, f in conv_forms().items():
        fwd = jax.jit(lambda x, k, f=f: f(x, k, 8))
        dy = jnp.ones_like(jax.eval_shape(fwd, x, kernel), jnp.bfloat16)
        dk = jax.jit(lambda x, k, dy, f=f: jax.vjp(lambda k: f(x, k, 8), k)[1](dy)[0])
        calls = {
            "fwd": functools.partial(fwd, x, kernel),
            "dkernel": functools.partial(dk, x, kernel, dy),
        }
        times = {
            f"{what}_ms": harness.time_call(call, jax.block_until_ready, iters=iters)["ms"]
            for what, call in calls.items()
        }
        row = {"case": f"B{batch} {size}² F{features}", "form": name, **times}
        harness.log(f"{row['case']} {name}: fwd {times['fwd_ms']:.4f} ms, dkernel "
                    f"{times['dkernel_ms']:.4f} ms")  # fmt: skip
        rows.append(row)
    return rows


def markdown(doc):
    columns = [("case", "case", ""), ("form", "form", ""), ("forward ms", "fwd_ms", ".4f")]
    columns += [("kernel gradient ms", "dkernel_ms", ".4f")]
    lines = ["# ViG stem, first convolution", "", harness.meta_line(doc["meta"]) + "; bf16.", ""]
    return "\n".join([*lines, *harness.table(doc["rows"], columns)]) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=10, help="timed runs per program (median)")
    p.add_argument("--out", help="path stem (default benchmarks/results/stem)")
    p.add_argument("--smoke", action="store_true", help="CPU check: 2 images of 64²")
    args = p.parse_args(argv)
    cases = [(2, 64, 16)] if args.smoke else CASES
    default = "/tmp/bench_stem_smoke" if args.smoke else "benchmarks/results/stem"
    import jax

    meta = harness.metadata(args)
    meta["device"] = jax.devices()[0].device_kind
    results = harness.Results(args.out or default, meta, markdown)
    for case in cases:
        for row in measure(*case, iters=2 if args.smoke else args.iters):
            results.add(row)
    print(markdown(results.doc))
    print(f"wrote {results.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
