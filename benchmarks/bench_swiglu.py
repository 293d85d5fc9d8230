"""The fused SwiGLU up-projection kernel against XLA's form of the same work, one GPU.

    python benchmarks/bench_swiglu.py --out /tmp/swiglu       # ViG-T/S/B MLP shapes, ~1 min
    python benchmarks/bench_swiglu.py --smoke                 # CPU check (interpret, tiny)
    python benchmarks/bench_swiglu.py --tiles 128,64,64,4,3 --tiles 128,128,64,8,3   # tile sweep

Per shape (tokens M, width D, hidden I), the time of h = SiLU(x @ W_a) * (x @ W_b) for
  xla     what the models run (`SwiGLU(split_up=True)`): two matmuls to bf16 a and b, then
          SiLU(a) * b,
  pallas  `pallas_kernels.swiglu.swiglu_up` (one kernel writing only h; float32 gate), once per
          --tiles "BM,BN,BK,WARPS,STAGES" (default: the kernel's TILES),
forward (inference) and forward + backward, ms per call (calls looped inside one program, median of
--iters runs) and the matmuls' TFLOP/s (4 M D I forward). Writes <out>.json and <out>.md.
"""

import argparse
import dataclasses
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from pallas_kernels.swiglu import TILES, Tiles, swiglu_up  # noqa: E402
from vig_jax.models.layers import linear, swiglu_hidden  # noqa: E402

# name -> (M, D): batch 128 at 224² (196 tokens) for ViG-T/S/B, batch 8 at 1024² (4096) for ViG-T.
SHAPES = {
    "vig_t_224": (128 * 196, 192),
    "vig_s_224": (128 * 196, 384),
    "vig_b_224": (128 * 196, 768),
    "vig_t_1024": (8 * 4096, 192),
}


def xla_form(x, w_a, w_b):
    a, b = linear(x, w_a, x.dtype), linear(x, w_b, x.dtype)
    return jax.nn.silu(a) * b


def measure(fn, x, w_a, w_b, backward, args) -> dict:
    if backward:
        dh = jnp.ones((x.shape[0], w_a.shape[1]), x.dtype)
        prog = lambda x, a, b, dh: jax.vjp(fn, x, a, b)[1](dh)
        operands = (x, w_a, w_b, dh)
    else:
        prog, operands = fn, (x, w_a, w_b)
    loop, compile_s = harness.compile_jax(harness.jax_repeat(prog, args.inner), *operands)
    t = harness.time_call(lambda: loop(*operands), jax.block_until_ready, iters=args.iters)
    return {"ms": t["ms"] / args.inner, "compile_s": compile_s}


def markdown(doc: dict) -> str:
    lines = [f"# Fused SwiGLU up projection, {doc['meta'].get('device', '?')}", ""]
    lines += [harness.meta_line(doc["meta"]), ""]
    lines += [
        "| shape (M, D, I) | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms |",
        "|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
        tf = f"{r['fwd_tflops']:.0f}" if isinstance(r.get("fwd_tflops"), float) else "–"
        lines.append(
            f"| {r['case']} {tuple(r['shape'])} | {r['impl']} | {fmt(r.get('fwd_ms'))} | {tf} | "
            f"{fmt(r.get('fwd_bwd_ms'))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--inner", type=int, default=10, help="calls inside one timed program")
    p.add_argument("--iters", type=int, default=20, help="timed runs (median)")
    p.add_argument("--out", default=str(harness.REPO / "benchmarks/results/swiglu"))
    p.add_argument("--smoke", action="store_true", help="CPU: interpret mode, float32, tiny")
    p.add_argument("--tiles", action="append", help="BM,BN,BK,WARPS,STAGES (repeat)")
    args = p.parse_args(argv)
    shapes = {"smoke": (100, 64)} if args.smoke else {s: SHAPES[s] for s in args.shapes}
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    if args.smoke:
        args.inner, args.iters = 1, 2
    meta = harness.metadata(args)
    meta["device"] = jax.devices()[0].device_kind
    results = harness.Results(args.out, meta, markdown)
    impls = {"xla": xla_form}
    for t in [Tiles.parse(t) for t in args.tiles] if args.tiles else [TILES]:
        name = "pallas" if t == TILES else "pallas " + ",".join(map(str, dataclasses.astuple(t)))
        impls[name] = functools.partial(swiglu_up, impl="pallas", interpret=args.smoke, tiles=t)
    for case, (m, d) in shapes.items():
        width = 128 if args.smoke else swiglu_hidden(d, 256)
        ks = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(ks[0], (m, d)).astype(dtype)
        w_a, w_b = (jax.random.normal(k, (d, width), dtype) / d**0.5 for k in ks[1:])
        for name, fn in impls.items():
            row = {"case": case, "shape": (m, d, width), "impl": name}
            for backward, key in ((False, "fwd"), (True, "fwd_bwd")):
                try:
                    r = measure(fn, x, w_a, w_b, backward, args)
                    row[f"{key}_ms"], row[f"{key}_compile_s"] = r["ms"], r["compile_s"]
                except Exception as exc:
                    row[f"{key}_ms"] = harness.status(exc)
            if isinstance(row.get("fwd_ms"), float):
                row["fwd_tflops"] = 4 * m * d * width / (row["fwd_ms"] * 1e-3) / 1e12
            results.add(row)
            harness.log(f"{case} {name}: {row}")
    results.done()
    print(results.markdown(results.doc))


if __name__ == "__main__":
    main()
