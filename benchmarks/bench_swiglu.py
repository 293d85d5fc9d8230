"""SwiGLU's up projection and gate alone: the Mosaic GPU kernel against the models' XLA form.

    python benchmarks/bench_swiglu.py                    # ViG-T/S/B shapes, one H200
    python benchmarks/bench_swiglu.py --smoke            # CPU check, XLA form only

For each case (rows M = batch x tokens, input width D, hidden width I) and each form, bf16, the
forward h = SiLU(x W_a) * (x W_b), jitted and timed with `harness.time_call` (median ms per call):
  xla     the models' form (`SwiGLU(split_up=True)`): two matmuls writing a and b, then the gate;
  mosaic  `pallas_kernels.swiglu_mosaic.swiglu_up` (Hopper; skipped where it cannot run),
with the TFLOP/s of the two matmuls' 4·M·D·I flops and, for mosaic, the relative error against
xla. The model-level effect: `bench_vs_vit.py --variant default --variant mu:mlp_mosaic_up=True`.
Results: `<out>.json` and `<out>.md`.
"""

import argparse
import functools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402

# (name, M, D, I): 224² B128 for ViG-T/S/B (196 tokens), ViG-T at 1024² B8 (4096 tokens).
CASES = (
    ("vig_t_224", 25088, 192, 512),
    ("vig_s_224", 25088, 384, 1024),
    ("vig_b_224", 25088, 768, 2048),
    ("vig_t_1024", 32768, 192, 512),
)


def forms():
    """{name: fn(x, w_up) -> h}."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import swiglu_mosaic
    from vig_jax.models.layers import linear

    def xla(x, w_up):
        hidden = w_up.shape[1] // 2
        a, b = (
            linear(x, w_up[:, s], jnp.bfloat16) for s in (slice(None, hidden), slice(hidden, None))
        )
        return jax.nn.silu(a) * b  # bf16, as the model computes it

    return {"xla": xla, "mosaic": swiglu_mosaic.swiglu_up}


def measure(name, M, D, hidden, iters, names):
    """Rows {case, form, ms, tflops, rel_err} of one case."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (M, D), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (D, 2 * hidden), jnp.float32) / D**0.5
    rows, want = [], None
    for form, f in forms().items():
        if form not in names:
            continue
        row = {"case": f"{name} ({M}, {D}, {hidden})", "form": form}
        try:
            fn = jax.jit(f)
            h = jax.block_until_ready(fn(x, w))
            call = functools.partial(fn, x, w)
            row["ms"] = harness.time_call(call, jax.block_until_ready, iters=iters)["ms"]
            row["tflops"] = 4 * M * D * hidden / row["ms"] / 1e9
            if want is None:
                want = h.astype(jnp.float32)
            else:
                err = jnp.abs(h.astype(jnp.float32) - want).max() / jnp.abs(want).max()
                row["rel_err"] = float(err)
        except Exception as exc:  # recorded; the run goes on
            row["status"] = harness.status(exc)
        harness.log(f"{row}")
        rows.append(row)
    return rows


def markdown(doc):
    columns = [("case (M, D, I)", "case", ""), ("form", "form", ""), ("ms", "ms", ".4f")]
    columns += [("TFLOP/s", "tflops", ".0f"), ("rel. error vs xla", "rel_err", ".1e")]
    columns += [("status", "status", "")]
    lines = ["# SwiGLU up projection + gate", "", harness.meta_line(doc["meta"]) + "; bf16.", ""]
    return "\n".join([*lines, *harness.table(doc["rows"], columns)]) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=20, help="timed runs per program (median)")
    p.add_argument("--forms", nargs="+", default=["xla", "mosaic"], choices=["xla", "mosaic"])
    p.add_argument("--out", help="path stem (default benchmarks/results/swiglu)")
    p.add_argument("--smoke", action="store_true", help="CPU check: one small case, xla only")
    args = p.parse_args(argv)
    cases = [("smoke", 256, 64, 128)] if args.smoke else CASES
    names = ["xla"] if args.smoke else args.forms
    default = "/tmp/bench_swiglu_smoke" if args.smoke else "benchmarks/results/swiglu"
    import jax

    meta = harness.metadata(args)
    meta["device"] = jax.devices()[0].device_kind
    results = harness.Results(args.out or default, meta, markdown)
    for case in cases:
        for row in measure(*case, iters=2 if args.smoke else args.iters, names=names):
            results.add(row)
    print(markdown(results.doc))
    print(f"wrote {results.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
