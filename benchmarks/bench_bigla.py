"""BiGLA kernel table: forward and forward+backward time per implementation vs the memory floor.

    python benchmarks/bench_bigla.py                                  # one GPU, every shape
    python benchmarks/bench_bigla.py --variant v5 --variant c128:chunk=128,num_warps=8
    python benchmarks/bench_bigla.py --smoke                          # CPU, interpret mode

First the parity of every implementation (and kernel variant) with `bigla_reference` at one small
shape: max |Δ| / max |reference| of o and the five gradients under a random cotangent, bf16 inputs
against the float32 reference (float32 in --smoke). Then, per shape, the milliseconds of the forward
and of forward+backward (`jax.vjp`, all six outputs consumed) of:
  pallas    the fused Pallas kernel, once per `--variant NAME:field=val,...` (fields of
            `KernelParams`), so old and new kernel plans are timed side by side in one call;
  chunked   the pure-jnp chunked form under XLA;
  mosaic    the Mosaic GPU forward (`bigla_mosaic`, Hopper, bf16) with the Triton backward;
  fla       `fla.ops.gla.chunk_gla` (torch, Triton) when `fla` is importable: both directions as
            one call on the batch [x; flip(x)], the output's halves flipped back and averaged.
Floor = bytes that must move (inputs read and outputs written once; forward+backward: the forward,
then the inputs and do read and the five gradients written) / the bandwidth of a 1 GiB
device-to-device copy measured in the same run. "× floor" = time / floor.
bf16 q, k, v and do, float32 gates log_sigmoid(3 N(0, 1)) / 16 (typical of ViG). Timing: a jitted
loop of --inner calls, compiled ahead of time, median of --iters runs (benchmarks/harness.py).
Results: `<out>.json` and `<out>.md` (default benchmarks/results/bigla). With `--auto-table PATH`
(and both pallas and mosaic timed) also the table `impl="auto"` reads
(pallas_kernels/bigla/auto_table.py): per shape, the faster kernel forward + backward.
"""

import argparse
import dataclasses
import functools
import inspect
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from pallas_kernels.bigla import _device, mosaic  # noqa: E402
from pallas_kernels.bigla.chunked import bigla_chunked  # noqa: E402
from pallas_kernels.bigla.pallas import KernelParams, bigla_pallas  # noqa: E402
from pallas_kernels.bigla.reference import bigla_reference  # noqa: E402

# name: (B, N, H, K, V); ViG-T/S/B have H = 3/6/12, K 32, V 64.
SHAPES = {
    "vig_t_224": (128, 196, 3, 32, 64),
    "vig_s_224": (128, 196, 6, 32, 64),
    "vig_b_224": (128, 196, 12, 32, 64),
    "vig_t_512": (32, 1024, 3, 32, 64),
    "vig_t_1024": (8, 4096, 3, 32, 64),
    "vig_s_1024": (8, 4096, 6, 32, 64),
    "vig_t_2048": (2, 16384, 3, 32, 64),
    "vig_t_4096": (1, 65536, 3, 32, 64),
}
PARITY_SHAPE = (2, 200, 2, 32, 64)
SMOKE_SHAPES = {"smoke": (1, 40, 2, 16, 32)}
SMOKE_PARITY_SHAPE = (1, 40, 2, 16, 32)
# Parity bound per input dtype (max |Δ| / max |ref|); bf16 rounding of q, k, v and o is ~4e-3.
TOL = {"bfloat16": 2e-2, "float32": 1e-4}
GRADS = ("o", "dq", "dk", "dv", "dgf", "dgb")


def make_inputs(shape, dtype, seed=0):
    """(q, k, v, gf, gb), do: q, k, v, do in `dtype`; float32 gates."""
    B, N, H, K, V = shape
    ks = jax.random.split(jax.random.key(seed), 6)
    q = (jax.random.normal(ks[0], (B, N, H, K)) * K**-0.5).astype(dtype)
    k = jax.random.normal(ks[1], (B, N, H, K)).astype(dtype)
    v = jax.random.normal(ks[2], (B, N, H, V)).astype(dtype)
    gf = jax.nn.log_sigmoid(3 * jax.random.normal(ks[3], (B, N, H, K))) / 16
    gb = jax.nn.log_sigmoid(3 * jax.random.normal(ks[4], (B, N, H, K))) / 16
    do = jax.random.normal(ks[5], (B, N, H, V)).astype(dtype)
    return (q, k, v, gf, gb), do


def with_grads(f):
    """(inputs, do) -> (o, dq, dk, dv, dgf, dgb)."""

    def run(inputs, do):
        o, vjp = jax.vjp(f, *inputs)
        return (o, *vjp(do.astype(o.dtype)))

    return run


def io_bytes(shape, dtype, backward: bool) -> int:
    B, N, H, K, V = shape
    s, tok = jnp.dtype(dtype).itemsize, B * N * H
    inputs, out = tok * (2 * K * s + V * s + 2 * K * 4), tok * V * s
    # forward: inputs in, o out; backward adds inputs and do in, five gradients (as inputs) out
    return inputs + out + (2 * inputs + out if backward else 0)


def copy_gbps(nbytes: int) -> float:
    """GB/s of a device-to-device elementwise pass over `nbytes` (read + write counted)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    loop, _ = harness.compile_jax(harness.jax_repeat(lambda x: x + 1.0, 10), x)
    t = harness.time_call(lambda: loop(x), jax.block_until_ready, iters=10)
    return 2 * x.nbytes / (t["ms"] / 10 * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# fla (torch): the two directions as one chunk_gla call on [x; flip(x)].


def fla_bigla():
    """A torch BiGLA on fla's `chunk_gla` taking [B, N, H, d] torch tensors."""
    import torch
    from fla.ops.gla import chunk_gla

    kw = {"scale": 1.0}
    if "head_first" in inspect.signature(chunk_gla).parameters:
        kw["head_first"] = False  # [B, N, H, d]

    def bigla(q, k, v, gf, gb):
        B = q.shape[0]
        both = [torch.cat([x, x.flip(1)]) for x in (q, k, v)]
        g = torch.cat([gf, gb.flip(1)])  # float32, as for our kernels
        o = chunk_gla(*both, g, **kw)[0]
        return (o[:B] + o[B:].flip(1)) / 2

    return bigla


def _to_torch(x):
    import torch

    return torch.from_dlpack(jax.block_until_ready(x)).requires_grad_(True)


def fla_call(inputs, do, backward):
    """call() running fla's BiGLA on `inputs` (forward, or forward + backward into `do`)."""
    import torch

    f = fla_bigla()
    q, k, v, gf, gb = (_to_torch(x) for x in inputs)
    do_t = _to_torch(do).detach()
    args = (q, k, v, gf, gb)

    def call():
        if not backward:
            with torch.no_grad():
                return f(*args)
        o = f(*args)
        return o, *torch.autograd.grad(o, args, do_t)

    return call


# ----------------------------------------------------------------------------------------------


def impl_fns(variants: dict) -> dict:
    """{label: jax BiGLA}: pallas once per kernel variant, then chunked and mosaic."""
    fns = {
        f"pallas {name}".strip(): functools.partial(bigla_pallas, params=params)
        for name, params in variants.items()
    }
    fns["chunked"] = functools.partial(bigla_chunked, chunk_size=64)
    return {**fns, "mosaic": functools.partial(mosaic.bigla_mosaic, params=mosaic.MosaicParams())}


AUTO_TABLE = '''"""Which GPU kernel `bigla(..., impl="auto")` runs, per GPU and shape, as measured.

Written by `benchmarks/bench_bigla.py --impls pallas mosaic --auto-table <this file>`: one row per
measured shape with the faster of the Triton ("pallas") and Mosaic GPU ("mosaic") kernels, forward +
backward. `impl="auto"` takes the row of the same GPU and head dims nearest in (log N, log B·H);
without one it runs the Triton kernel. Regenerate rather than edit.
"""

SOURCE = "{source}"
# impl: the faster kernel; ms: each kernel's time; pass: "fwd_bwd" (or "fwd") as timed.
ROWS = (
{rows}
)  # fmt: skip
'''


def auto_table_source(rows: list, meta: dict) -> str:
    """The text of pallas_kernels/bigla/auto_table.py: per measured shape where the first pallas
    variant and mosaic both ran, the faster of the two forward + backward."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        ms = {}
        for r in rows:
            impl = r["impl"].split()[0]
            if r["case"] == case and impl in ("pallas", "mosaic") and impl not in ms:
                ms[impl], (B, N, H, K, V) = r.get("fwd_bwd_ms"), r["shape"]
        if len(ms) == 2 and all(isinstance(t, float) for t in ms.values()):
            ms = {k: round(t, 4) for k, t in ms.items()}
            out.append(
                f"    dict(device={meta['device']!r}, K={K}, V={V}, N={N}, BH={B * H}, "
                f"impl={min(ms, key=ms.get)!r},\n         ms={ms!r}, **{{'pass': 'fwd_bwd'}}),"
            )
    source = f"bench_bigla.py, commit {meta.get('git_sha')}, {meta['device']}"
    return AUTO_TABLE.format(source=source, rows="\n".join(out))


def parity(shape, dtype, fns: dict, with_fla: bool) -> dict:
    """{label: {o, dq, ...: relative error, ok: bool}} against the float32 reference."""
    inputs, do = make_inputs(shape, dtype, seed=1)
    up = lambda xs: [x.astype(jnp.float32) for x in xs]
    want = jax.jit(with_grads(bigla_reference))(up(inputs), do.astype(jnp.float32))
    gots = {}
    for label, fn in fns.items():
        try:
            gots[label] = jax.jit(with_grads(fn))(inputs, do)
        except Exception as exc:
            gots[label] = harness.status(exc)
    if with_fla:
        try:
            outs = fla_call(inputs, do, True)()
            gots["fla"] = [t.detach().float().cpu().numpy() for t in outs]
        except Exception as exc:
            gots["fla"] = harness.status(exc)
    out = {}
    for label, got in gots.items():
        if isinstance(got, str):
            out[label] = {"status": got, "ok": False}
            continue
        errs = {}
        for n, g, w in zip(GRADS, got, want, strict=True):
            g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
            errs[n] = float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30))
        ok = all(np.isfinite(e) and e <= TOL[jnp.dtype(dtype).name] for e in errs.values())
        out[label] = {**errs, "ok": bool(ok)}
        harness.log(
            f"parity {label}: "
            + " ".join(f"{n} {e:.1e}" for n, e in errs.items())
            + ("" if ok else f"  FAIL (> {TOL[jnp.dtype(dtype).name]:.0e})")
        )
    return out


def measure(label, fn, shape, dtype, backward, args, gbps) -> dict:
    """{pass}_ms, _floor_ms, _x_floor, _compile_s (or _status) of one impl and pass at one shape."""
    inputs, do = make_inputs(shape, dtype)
    name = "fwd_bwd" if backward else "fwd"
    r = {f"{name}_floor_ms": io_bytes(shape, dtype, backward) / (gbps * 1e9) * 1e3}
    try:
        if label == "fla":
            call, sync, n = fla_call(inputs, do, backward), harness.torch_sync, 1
        else:
            a = (*inputs, do) if backward else inputs
            prog = (lambda *a: with_grads(fn)(a[:5], a[5])) if backward else fn
            loop, r[f"{name}_compile_s"] = harness.compile_jax(
                harness.jax_repeat(prog, args.inner), *a
            )
            call, sync, n = (lambda: loop(*a)), jax.block_until_ready, args.inner
        r[f"{name}_ms"] = harness.time_call(call, sync, iters=args.iters)["ms"] / n
        r[f"{name}_x_floor"] = r[f"{name}_ms"] / r[f"{name}_floor_ms"]
    except Exception as exc:
        r[f"{name}_ms"] = harness.status(exc)
    return r


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    lines = [
        "# BiGLA kernel",
        "",
        harness.meta_line(meta) + f"; copy bandwidth {meta['copy_gbps']:.0f} GB/s; "
        f"{meta['dtype']} q/k/v, float32 gates; median of {meta['args']['iters']} runs.",
        "",
    ]
    rows = [{**r, "case": f"{r['case']} {tuple(r['shape'][:3])}"} for r in doc["rows"]]
    lines += harness.table(
        rows,
        [
            ("case (B, N, H)", "case", ""),
            ("impl", "impl", ""),
            ("fwd ms", "fwd_ms", ".3f"),
            ("fwd floor ms", "fwd_floor_ms", ".3f"),
            ("fwd × floor", "fwd_x_floor", ".1f"),
            ("fwd+bwd ms", "fwd_bwd_ms", ".3f"),
            ("fwd+bwd floor ms", "fwd_bwd_floor_ms", ".3f"),
            ("fwd+bwd × floor", "fwd_bwd_x_floor", ".1f"),
        ],
    )
    lines += [
        "",
        f"Parity at (B, N, H, K, V) = {tuple(meta['parity_shape'])}, "
        "max |Δ| / max |reference| (float32 reference):",
        "",
    ]
    for label, p in meta["parity"].items():
        errs = ", ".join(f"{n} {p[n]:.1e}" for n in GRADS if n in p) or p.get("status")
        lines.append(f"- {label}: {errs}{'' if p['ok'] else ' — FAIL'}")
    variants = "; ".join(f"{k or 'default'}: {v}" for k, v in meta["variants"].items())
    lines += ["", f"Kernel parameters: {variants}"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument(
        "--impls",
        nargs="+",
        default=["pallas", "chunked", "fla"],
        choices=("pallas", "chunked", "fla", "mosaic"),
    )
    p.add_argument("--auto-table", help="write the impl='auto' table here (needs pallas, mosaic)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME[:field=val,...] of KernelParams (repeat); default: KernelParams()",
    )
    p.add_argument("--inner", type=int, default=10, help="calls inside one timed program")
    p.add_argument("--iters", type=int, default=20, help="timed runs (median)")
    p.add_argument("--out", help="path stem (default benchmarks/results/bigla)")
    p.add_argument("--smoke", action="store_true", help="CPU: interpret mode, float32, tiny shape")
    args = p.parse_args(argv)
    variants = {}
    try:
        for name, over in map(harness.parse_variant, args.variant):
            variants[name] = KernelParams(**{"interpret": args.smoke, **over})
    except (ValueError, TypeError) as exc:  # TypeError: an unknown KernelParams field
        p.error(f"--variant: {exc}")
    args._variants = variants or {"": KernelParams(interpret=args.smoke)}
    if args.smoke:
        args.inner, args.iters = 1, 2
        args._shapes, args._parity_shape = SMOKE_SHAPES, SMOKE_PARITY_SHAPE
        args.out = args.out or "/tmp/bench_bigla_smoke"
    else:
        args._shapes, args._parity_shape = {s: SHAPES[s] for s in args.shapes}, PARITY_SHAPE
    args.out = args.out or str(harness.REPO / "benchmarks/results/bigla")
    return args


def main(argv=None):
    args = parse_args(argv)
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    with_fla = "fla" in args.impls and harness.importable("fla", "torch")
    if "fla" in args.impls and not with_fla:
        harness.log("fla not importable: no fla column")
    fns = impl_fns(args._variants)
    fns = {k: f for k, f in fns.items() if k.split()[0] in args.impls}
    if "mosaic" in fns and (dtype != jnp.bfloat16 or _device()[1] != "9.0"):
        harness.log("mosaic needs a Hopper GPU and bf16: no mosaic rows")
        del fns["mosaic"]
    meta = harness.metadata(args)
    meta.update(
        device=jax.devices()[0].device_kind,
        dtype=jnp.dtype(dtype).name,
        variants={k: dataclasses.asdict(v) for k, v in args._variants.items()},
        parity_shape=args._parity_shape,
    )
    meta["copy_gbps"] = copy_gbps(1 << 20 if args.smoke else 1 << 30)
    harness.log(f"{meta['device']}: copy bandwidth {meta['copy_gbps']:.0f} GB/s")
    meta["parity"] = parity(args._parity_shape, dtype, fns, with_fla)
    results = harness.Results(args.out, meta, markdown)
    labels = list(fns) + ["fla"] * with_fla
    for case, shape in args._shapes.items():
        for label in labels:
            row = {"case": case, "shape": shape, "impl": label}
            for backward in (False, True):
                row |= measure(
                    label, fns.get(label), shape, dtype, backward, args, meta["copy_gbps"]
                )
            results.add(row)
            harness.log(
                " ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in row.items()
                    if k != "shape"
                )
            )
    results.done()
    print(results.markdown(results.doc))
    if args.auto_table:
        path = pathlib.Path(args.auto_table)
        path.write_text(auto_table_source(results.doc["rows"], meta))
        harness.log(f"wrote {path}")


if __name__ == "__main__":
    main()
