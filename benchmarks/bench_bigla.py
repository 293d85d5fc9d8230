"""BiGLA benchmark: parity of the Pallas kernel with the reference, then forward and fwd+bwd
times of pallas / chunked (XLA) / reference at ViG head shapes, against the HBM floor.

GPU:  PYTHONUNBUFFERED=1 python benchmarks/bench_bigla.py --out DIR [--cases vig_s_224,...]
CPU:  python benchmarks/bench_bigla.py --smoke --out DIR   (interpret mode, tiny shapes)

Timing runs `iters` calls inside one jit (a `fori_loop` whose carry passes through
`optimization_barrier`, so calls are neither hoisted nor dead-code eliminated), compile excluded,
median over `repeats` such calls. The floor is the bytes that must move (inputs read once, outputs
written once) over the bandwidth of a large measured device-to-device copy.
"""

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pallas_kernels.bigla.pallas import KernelParams, bigla_pallas  # noqa: E402
from pallas_kernels.bigla.reference import bigla_reference  # noqa: E402

# name: (B, N, H, K, V). ViG-T/S/B have H = 3/6/12, K 32, V 64; ViG-H-T stages K 16, V 32.
CASES = {
    "vig_t_224": (128, 196, 3, 32, 64),
    "vig_s_224": (128, 196, 6, 32, 64),
    "vig_b_224": (128, 196, 12, 32, 64),
    "vig_t_512": (32, 1024, 3, 32, 64),
    "vig_t_1024": (8, 4096, 3, 32, 64),
    "vig_s_1024": (8, 4096, 6, 32, 64),
    "vigh_t_s1": (128, 3136, 3, 16, 32),
    "vigh_t_s2": (128, 784, 6, 16, 32),
    "vigh_t_s3": (128, 196, 12, 16, 32),
    "vigh_t_s4": (128, 49, 24, 16, 32),
}
SMOKE_CASES = {"smoke_short": (1, 40, 2, 16, 32), "smoke_long": (1, 300, 1, 16, 32)}


def make_inputs(shape, dtype, seed=0):
    """q, k, v in `dtype`; float32 gates log_sigmoid(3 N(0,1)) / 16 (typical ViG); cotangent do."""
    B, N, H, K, V = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = (jax.random.normal(ks[0], (B, N, H, K)) * K**-0.5).astype(dtype)
    k = jax.random.normal(ks[1], (B, N, H, K)).astype(dtype)
    v = jax.random.normal(ks[2], (B, N, H, V)).astype(dtype)
    gf = jax.nn.log_sigmoid(3 * jax.random.normal(ks[3], (B, N, H, K))) / 16
    gb = jax.nn.log_sigmoid(3 * jax.random.normal(ks[4], (B, N, H, K))) / 16
    do = jax.random.normal(ks[5], (B, N, H, V)).astype(dtype)
    return (q, k, v, gf, gb), do


def impl_fn(name, params):
    if name == "pallas":
        return functools.partial(bigla_pallas, params=params)
    if name == "reference":
        return bigla_reference
    from pallas_kernels.bigla.chunked import bigla_chunked

    return functools.partial(bigla_chunked, chunk_size=params.chunk)


def fwd_bwd(f):
    def run(args, do):
        o, vjp = jax.vjp(f, *args)
        return (o, *vjp(do.astype(o.dtype)))  # the reference returns float32 for fp32-cast inputs

    return run


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if not np.isfinite(got).all():
        return float("nan")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def parity(shape, dtype, params):
    """Max relative error (err / max|ref|) of o and the five gradients, reference in float32."""
    args, do = make_inputs(shape, dtype, seed=1)
    got = jax.jit(fwd_bwd(impl_fn("pallas", params)))(args, do)
    args32 = [x.astype(jnp.float32) for x in args]
    want = jax.jit(fwd_bwd(bigla_reference))(args32, do.astype(jnp.float32))
    names = ("o", "dq", "dk", "dv", "dgf", "dgb")
    return {n: rel_err(g, w) for n, g, w in zip(names, got, want, strict=True)}


def time_fn(fn, args, iters, repeats):
    """Median seconds per call of fn(*args) over `repeats` jitted loops of `iters` calls."""

    def loop(args):
        def body(_, carry):
            out = fn(*carry[0])
            return jax.lax.optimization_barrier((carry[0], out))

        out0 = jax.eval_shape(fn, *args)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out0)
        return jax.lax.fori_loop(0, iters, body, (args, zeros))[1]

    run = jax.jit(loop)
    jax.block_until_ready(run(args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / iters


def breakdown(shape, dtype, params, iters, repeats):
    """µs of the long plan's launches: states kernels alone and whole forward / backward passes
    (the chunk kernels take the difference)."""
    from pallas_kernels.bigla import pallas as P

    (q, k, v, gf, gb), do = make_inputs(shape, dtype)
    fns = {
        "fwd_states": (lambda *a: P._states(a, params, adjoints=False), (k, v, gf, gb)),
        "fwd_all": (lambda *a: P._bigla_fwd(*a, params), (q, k, v, gf, gb)),
        "bwd_states": (lambda *a: P._states(a, params, adjoints=True), (q, k, v, gf, gb, do)),
        "bwd_all": (lambda *a: P._bigla_bwd(*a, params), (q, k, v, gf, gb, do)),
    }
    return {name: time_fn(f, a, iters, repeats) * 1e6 for name, (f, a) in fns.items()}


def copy_bandwidth(iters, repeats, nbytes):
    """Bytes/s of a device-to-device elementwise pass (read + write counted)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    t = time_fn(lambda x: (x + 1.0,), (x,), iters, repeats)
    return 2 * x.nbytes / t


def io_bytes(shape, dtype, backward):
    B, N, H, K, V = shape
    s = jnp.dtype(dtype).itemsize
    tok = B * N * H
    fwd = tok * (2 * K * s + V * s + 2 * K * 4 + V * s)  # q, k, v, gf, gb in; o out
    if not backward:
        return fwd
    return 2 * fwd + tok * V * s  # + read inputs and do again, write 5 grads (same sizes as inputs)


def git_sha():
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(results):
    lines = [
        f"Device: {results['device']}; jax {results['jax']}; git {results['git_sha'][:10]}; "
        f"copy bandwidth {results['copy_GBps']:.0f} GB/s; {results['dtype']} q/k/v, fp32 gates.",
        "",
        "| case (B, N, H, K, V) | pass | pallas µs | chunked µs | reference µs | floor µs "
        "| pallas / floor | chunked / pallas |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, r in results["cases"].items():
        for p in ("fwd", "fwd_bwd"):
            t = r["time_us"][p]
            fl = r["floor_us"][p]
            pal, chk, ref = t.get("pallas"), t.get("chunked"), t.get("reference")

            def f(x):
                return "—" if x is None else f"{x:.1f}"

            lines.append(
                f"| {case} {tuple(r['shape'])} | {p} | {f(pal)} | {f(chk)} | {f(ref)} | {fl:.1f} "
                f"| {f(pal / fl if pal else None)} | {f(chk / pal if chk and pal else None)} |"
            )
    lines += ["", f"Kernel params: {results['params']}"]
    if results.get("sweep"):
        lines += [
            "",
            "Variant sweep (vig_s_224; num_warps:short_max_chunks:exact_diagonal), µs:",
            "",
        ]
        for spec, t in results["sweep"].items():
            lines.append(f"- {spec}: fwd {t['fwd_us']:.1f}, fwd+bwd {t['fwd_bwd_us']:.1f}")
    lines += ["", "Parity (max |Δ| / max |ref|, bf16 inputs vs fp32 reference):", ""]
    for case, r in results["parity"].items():
        lines.append(f"- {case}: " + ", ".join(f"{k} {v:.1e}" for k, v in r.items()))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for bigla.json and bigla.md")
    ap.add_argument("--smoke", action="store_true", help="CPU interpret mode, tiny shapes")
    ap.add_argument("--cases", default="vig_t_224,vig_s_224,vig_b_224,vig_t_512,vig_t_1024")
    ap.add_argument("--impls", default="pallas,chunked,reference")
    ap.add_argument("--parity-cases", default="vig_s_224,vig_t_1024,vigh_t_s4")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--short-max-chunks", type=int, default=1)
    ap.add_argument("--exact-diagonal", type=int, default=0, help="1: exact [16,16,K] form")
    ap.add_argument(
        "--sweep",
        default="",
        help="first time pallas variants on vig_s_224 and use the fastest fwd+bwd for the table; "
        "';'-separated num_warps:short_max_chunks:exact_diagonal[:chunk], e.g. '4:0:0;4:0:0:128'",
    )
    ap.add_argument(
        "--breakdown", action="store_true", help="also time each launch of the long plan per case"
    )
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    cases = SMOKE_CASES if args.smoke else {c: CASES[c] for c in args.cases.split(",") if c}
    parity_cases = (
        SMOKE_CASES if args.smoke else {c: CASES[c] for c in args.parity_cases.split(",") if c}
    )
    params = KernelParams(
        chunk=args.chunk,
        num_warps=args.num_warps,
        short_max_chunks=args.short_max_chunks,
        exact_diagonal=bool(args.exact_diagonal),
        interpret=args.smoke,
    )
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    iters, repeats = (1, 2) if args.smoke else (args.iters, args.repeats)
    impls = args.impls.split(",")
    results = {
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "jax": jax.__version__,
        "git_sha": git_sha(),
        "dtype": jnp.dtype(dtype).name,
        "params": dataclasses.asdict(params),
        "parity": {},
        "cases": {},
    }
    results["copy_GBps"] = copy_bandwidth(iters, repeats, 1 << 20 if args.smoke else 1 << 30) / 1e9
    print(f"{results['device']} jax {results['jax']} copy {results['copy_GBps']:.0f} GB/s")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / "bigla.json").write_text(json.dumps(results, indent=1))
        (out / "bigla.md").write_text(markdown(results))

    if args.sweep:
        results["sweep"] = {}
        shape = SMOKE_CASES["smoke_short"] if args.smoke else CASES["vig_s_224"]
        inputs, do = make_inputs(shape, dtype)
        best = None
        for spec in args.sweep.split(";"):
            nw, smax, ex, *chunk = (int(x) for x in spec.split(":"))
            p = dataclasses.replace(
                params,
                num_warps=nw,
                short_max_chunks=smax,
                exact_diagonal=bool(ex),
                chunk=chunk[0] if chunk else params.chunk,
            )
            t0 = time.perf_counter()
            f = impl_fn("pallas", p)
            fb = time_fn(lambda *a, f=f: fwd_bwd(f)(a[:5], a[5]), (*inputs, do), iters, repeats)
            fw = time_fn(f, inputs, iters, repeats)
            results["sweep"][spec] = {"fwd_us": fw * 1e6, "fwd_bwd_us": fb * 1e6}
            print(
                f"sweep {spec}: fwd {fw * 1e6:.1f} fwd+bwd {fb * 1e6:.1f} us "
                f"({time.perf_counter() - t0:.0f} s incl. compile)"
            )
            if best is None or fb < best[0]:
                best = (fb, p)
            save()
        params = best[1]
        results["params"] = dataclasses.asdict(params)

    for case, shape in parity_cases.items():
        results["parity"][case] = parity(shape, dtype, params)
        print("parity", case, {k: f"{v:.1e}" for k, v in results["parity"][case].items()})
        save()

    for case, shape in cases.items():
        inputs, do = make_inputs(shape, dtype)
        r = {"shape": shape, "time_us": {"fwd": {}, "fwd_bwd": {}}, "floor_us": {}}
        for p, backward in (("fwd", False), ("fwd_bwd", True)):
            bw = results["copy_GBps"] * 1e9
            r["floor_us"][p] = io_bytes(shape, dtype, backward) / bw * 1e6
            for name in impls:
                f = impl_fn(name, params)
                fn = (lambda *a, f=f: fwd_bwd(f)(a[:5], a[5])) if backward else f
                a = (*inputs, do) if backward else inputs
                try:
                    r["time_us"][p][name] = time_fn(fn, a, iters, repeats) * 1e6
                except Exception as e:  # noqa: BLE001 - report and go on (e.g. chunked absent)
                    print(f"{case} {p} {name}: {type(e).__name__}: {str(e)[:300]}")
            print(
                case,
                p,
                {k: f"{v:.1f}" for k, v in r["time_us"][p].items()},
                f"floor {r['floor_us'][p]:.1f}",
            )
        if args.breakdown:
            long_params = dataclasses.replace(params, short_max_chunks=0)
            r["breakdown_us"] = breakdown(shape, dtype, long_params, iters, repeats)
            print(case, "breakdown", {k: f"{v:.1f}" for k, v in r["breakdown_us"].items()})
        results["cases"][case] = r
        save()
    print(markdown(results))


if __name__ == "__main__":
    main()
