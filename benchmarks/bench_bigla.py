"""BiGLA benchmark: parity of the Pallas kernel with the reference, then forward and fwd+bwd
times of pallas / chunked (XLA) / reference at ViG head shapes, against the HBM floor.

GPU:  PYTHONUNBUFFERED=1 python benchmarks/bench_bigla.py --out DIR --jobs 4 [--cases a,b]
CPU:  python benchmarks/bench_bigla.py --smoke --out DIR   (interpret mode, tiny shapes)

Timing runs `iters` calls inside one jit (a `fori_loop` whose carry passes through
`optimization_barrier`, so calls are neither hoisted nor dead-code eliminated), compiled ahead of
time, median over `repeats` such calls. The floor is the bytes that must move (inputs read once,
outputs written once) over the bandwidth of a large measured device-to-device copy.

`--jobs J` (J > 1): the parent measures the copy bandwidth and runs the `--sweep` itself, then
runs every parity case and every timing case in its own child process, up to J at once. Children
compile concurrently (most of the wall time: XLA + Triton) and hold a file lock
(benchmarks/gpu_lock.py) only for their GPU work, so no two timings overlap. bigla.json / bigla.md
are rewritten after every finished case, in the order of the case lists; a failed child leaves an
`error` string for its case.
`--jobs 1` (default) runs everything in this one process.
"""

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.child_results import git_sha, log_lines, parse_results, print_result  # noqa: E402
from benchmarks.gpu_lock import concurrent_env, timing_lock  # noqa: E402
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
IMPLS = ("pallas", "chunked", "reference")


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
    if name != "chunked":
        raise ValueError(f"impl {name!r} is not one of {IMPLS}")
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
    args32 = [x.astype(jnp.float32) for x in args]
    do32 = do.astype(jnp.float32)
    got_fn = jax.jit(fwd_bwd(impl_fn("pallas", params))).lower(args, do).compile()
    want_fn = jax.jit(fwd_bwd(bigla_reference)).lower(args32, do32).compile()
    # Compiled outside the lock; the (short) runs hold it so that they never overlap another
    # process's timing on the GPU; the comparison is host work, after.
    with timing_lock():
        got = jax.block_until_ready(got_fn(args, do))
        want = jax.block_until_ready(want_fn(args32, do32))
    names = ("o", "dq", "dk", "dv", "dgf", "dgb")
    return {n: rel_err(g, w) for n, g, w in zip(names, got, want, strict=True)}


def compile_loop(fn, args, iters):
    """fn(*args) called `iters` times in one jitted `fori_loop`, compiled ahead of time."""

    def loop(args):
        def body(_, carry):
            out = fn(*carry[0])
            return jax.lax.optimization_barrier((carry[0], out))

        out0 = jax.eval_shape(fn, *args)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out0)
        return jax.lax.fori_loop(0, iters, body, (args, zeros))[1]

    return jax.jit(loop).lower(args).compile()


def time_fns(fns, iters, repeats):
    """Median seconds per call of each fn(*args) in `fns` {name: (fn, args)}, over `repeats`
    loops of `iters` calls. All are compiled first, outside the timing lock, then warmed up and
    timed under one hold of the lock. Returns ({name: seconds}, {name: error string}): a program
    that fails to compile or run is reported and the others go on."""
    compiled, errors = {}, {}
    for name, (fn, args) in fns.items():
        try:
            compiled[name] = compile_loop(fn, args, iters)
        except Exception as e:  # noqa: BLE001 - report and go on
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
    times = {}
    with timing_lock():
        for name, run in compiled.items():
            args = fns[name][1]
            try:
                jax.block_until_ready(run(args))  # warm up
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(run(args))
                    ts.append(time.perf_counter() - t0)
                times[name] = float(np.median(ts)) / iters
            except Exception as e:  # noqa: BLE001 - report and go on
                errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
    return times, errors


def time_fn(fn, args, iters, repeats):
    """Median seconds per call of fn(*args) (see time_fns); raises if it fails."""
    times, errors = time_fns({"fn": (fn, args)}, iters, repeats)
    if errors:
        raise RuntimeError(errors["fn"])
    return times["fn"]


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
    times, errors = time_fns(fns, iters, repeats)
    if errors:
        raise RuntimeError(f"breakdown: {errors}")
    return {name: times[name] * 1e6 for name in fns}


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


def time_case(shape, dtype, params, impls, copy_gbps, iters, repeats, with_breakdown):
    """Timing case: µs of fwd and fwd_bwd per impl, the HBM floor, optionally the breakdown."""
    inputs, do = make_inputs(shape, dtype)
    r = {"shape": list(shape), "time_us": {"fwd": {}, "fwd_bwd": {}}, "floor_us": {}}
    fns = {}
    for p, backward in (("fwd", False), ("fwd_bwd", True)):
        r["floor_us"][p] = io_bytes(shape, dtype, backward) / (copy_gbps * 1e9) * 1e6
        for name in impls:
            f = impl_fn(name, params)
            fn = (lambda *a, f=f: fwd_bwd(f)(a[:5], a[5])) if backward else f
            fns[(p, name)] = (fn, (*inputs, do) if backward else inputs)
    times, errors = time_fns(fns, iters, repeats)
    for (p, name), t in times.items():
        r["time_us"][p][name] = t * 1e6
    for (p, name), e in errors.items():
        print(f"{shape} {p} {name}: {e}")
    if errors:
        r["errors"] = {f"{p}/{name}": e for (p, name), e in errors.items()}
    if with_breakdown:
        long_params = dataclasses.replace(params, short_max_chunks=0)
        r["breakdown_us"] = breakdown(shape, dtype, long_params, iters, repeats)
    return r


def case_summary(kind, r):
    """One line of key numbers of a finished parity or timing case."""
    if "error" in r:
        return "ERROR " + r["error"].strip().splitlines()[-1][:300]
    if kind == "parity":
        return " ".join(f"{k} {v:.1e}" for k, v in r.items())
    parts = []
    for p, t in r["time_us"].items():
        parts.append(p + " " + " ".join(f"{k} {v:.1f}" for k, v in t.items()))
    parts.append(" ".join(f"floor {p} {v:.1f}" for p, v in r["floor_us"].items()))
    if "breakdown_us" in r:
        parts.append("breakdown " + " ".join(f"{k} {v:.1f}" for k, v in r["breakdown_us"].items()))
    return " | ".join(parts) + " µs"


def run_child(cmd, env, timeout_s):
    """Runs one child case; returns (result dict or {"error": ...}, the child's own log lines)."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:g} s"}, []
    log = log_lines(proc.stdout)
    found = parse_results(proc.stdout)
    # A RESULT line is printed after all the work, so it stands even if the process then fails
    # on the way out (GPU runtimes sometimes crash at interpreter exit).
    if not found:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])[-1500:]
        return {"error": f"child exited with {proc.returncode}: {tail}"}, log
    return found[-1], log


def markdown(results):
    def f(x):
        return "—" if x is None else f"{x:.1f}"

    lines = [
        f"Device: {results['device']}; jax {results['jax']}; git {results['git_sha'][:10]}; "
        f"copy bandwidth {results['copy_GBps']:.0f} GB/s; {results['dtype']} q/k/v, fp32 gates.",
        "",
        "| case (B, N, H, K, V) | pass | pallas µs | chunked µs | reference µs | floor µs "
        "| pallas / floor | chunked / pallas |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, r in results["cases"].items():
        if "error" in r:
            msg = r["error"].strip().splitlines()[-1][:120].replace("|", "/")
            lines.append(f"| {case} {tuple(r['shape'])} | error: {msg} | | | | | | |")
            continue
        for p in ("fwd", "fwd_bwd"):
            t = r["time_us"][p]
            fl = r["floor_us"][p]
            pal, chk, ref = t.get("pallas"), t.get("chunked"), t.get("reference")
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
        if "error" in r:
            lines.append(f"- {case}: error: " + r["error"].strip().splitlines()[-1][:300])
        else:
            lines.append(f"- {case}: " + ", ".join(f"{k} {v:.1e}" for k, v in r.items()))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for bigla.json and bigla.md (required)")
    ap.add_argument("--smoke", action="store_true", help="CPU interpret mode, tiny shapes")
    ap.add_argument("--cases", default="vig_t_224,vig_s_224,vig_b_224,vig_t_512,vig_t_1024")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--parity-cases", default="vig_s_224,vig_t_1024,vigh_t_s4")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--short-max-chunks", type=int, default=1)
    ap.add_argument("--exact-diagonal", type=int, default=0, help="1: exact [16,16,K] form")
    ap.add_argument(
        "--split-backward",
        type=int,
        default=1,
        help="0: one backward chunk kernel for both directions",
    )
    ap.add_argument(
        "--sweep",
        default="",
        help="first time pallas variants on vig_s_224 and use the fastest fwd+bwd for the table; "
        "';'-separated num_warps:short_max_chunks:exact_diagonal[:chunk], e.g. '4:0:0;4:0:0:128'",
    )
    ap.add_argument(
        "--breakdown", action="store_true", help="also time each launch of the long plan per case"
    )
    ap.add_argument("--iters", type=int, help="calls per timed loop (default 20, smoke 1)")
    ap.add_argument("--repeats", type=int, help="timed loops, median taken (default 20, smoke 2)")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="J > 1: each parity / timing case in a child process, up to J compiling at once, "
        "timings serialised by a lock; 1: everything in this process",
    )
    ap.add_argument(
        "--case-timeout-s",
        type=float,
        default=1800.0,
        help="with --jobs > 1: a child still running after this long is killed (case: error)",
    )
    # Internal: one case, run by the parent in a child process ("parity:NAME" or "time:NAME"),
    # with the parent's resolved kernel params, iters/repeats and copy bandwidth.
    ap.add_argument("--child-case", help=argparse.SUPPRESS)
    ap.add_argument("--copy-gbps", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    known = SMOKE_CASES if args.smoke else CASES
    for flag in ("cases", "parity_cases"):  # ignored under --smoke
        unknown = [c for c in getattr(args, flag).split(",") if c and c not in CASES]
        if unknown and not args.smoke:
            ap.error(f"--{flag.replace('_', '-')}: unknown {unknown}; known: {list(CASES)}")
    bad = [i for i in args.impls.split(",") if i not in IMPLS]
    if bad:
        ap.error(f"--impls: unknown {bad}; known: {list(IMPLS)}")
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.child_case:
        kind, _, name = args.child_case.partition(":")
        if kind not in ("parity", "time") or name not in known or args.copy_gbps is None:
            ap.error(f"bad child case {args.child_case!r} (copy bandwidth {args.copy_gbps})")
    elif not args.out:
        ap.error("--out is required")
    if args.iters is None:
        args.iters = 1 if args.smoke else 20
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 20
    return args


def kernel_params(args):
    return KernelParams(
        chunk=args.chunk,
        num_warps=args.num_warps,
        short_max_chunks=args.short_max_chunks,
        exact_diagonal=bool(args.exact_diagonal),
        split_backward=bool(args.split_backward),
        interpret=args.smoke,
    )


def child_main(args):
    """Runs one case in this (child) process and prints its result as one RESULT line."""
    kind, _, name = args.child_case.partition(":")
    shape = (SMOKE_CASES if args.smoke else CASES)[name]
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    params = kernel_params(args)
    if kind == "parity":
        r = parity(shape, dtype, params)
    else:
        impls = args.impls.split(",")
        r = time_case(
            shape, dtype, params, impls, args.copy_gbps, args.iters, args.repeats, args.breakdown
        )
    print_result(r)


def child_cmd(args, params, copy_gbps, kind, name):
    """The command line of the child process for one case, with every resolved setting."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child-case", f"{kind}:{name}"]
    cmd += ["--chunk", str(params.chunk), "--num-warps", str(params.num_warps)]
    cmd += ["--short-max-chunks", str(params.short_max_chunks)]
    cmd += ["--exact-diagonal", str(int(params.exact_diagonal)), "--impls", args.impls]
    cmd += ["--split-backward", str(int(params.split_backward))]
    cmd += ["--iters", str(args.iters), "--repeats", str(args.repeats)]
    cmd += ["--copy-gbps", repr(copy_gbps)]
    return cmd + ["--smoke"] * args.smoke + ["--breakdown"] * args.breakdown


def main(argv=None):
    args = parse_args(argv)
    if args.child_case:
        child_main(args)
        return

    lock_dir = child_env = None
    if args.jobs > 1:
        lock_dir = tempfile.TemporaryDirectory(prefix="bench_bigla_")
        child_env = concurrent_env(os.path.join(lock_dir.name, "gpu.lock"))
        # Before JAX starts its backend: this process too must not preallocate the GPU, and its
        # own timings (copy bandwidth, sweep) take the lock like the children's.
        os.environ.update(child_env)

    cases = SMOKE_CASES if args.smoke else {c: CASES[c] for c in args.cases.split(",") if c}
    parity_cases = (
        SMOKE_CASES if args.smoke else {c: CASES[c] for c in args.parity_cases.split(",") if c}
    )
    params = kernel_params(args)
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    iters, repeats = args.iters, args.repeats
    impls = args.impls.split(",")
    results = {
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "jax": jax.__version__,
        "git_sha": git_sha(),
        "dtype": jnp.dtype(dtype).name,
        "jobs": args.jobs,
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

    if args.jobs == 1:
        for case, shape in parity_cases.items():
            results["parity"][case] = parity(shape, dtype, params)
            print("parity", case, case_summary("parity", results["parity"][case]))
            save()
        for case, shape in cases.items():
            results["cases"][case] = time_case(
                shape, dtype, params, impls, results["copy_GBps"], iters, repeats, args.breakdown
            )
            print(case, case_summary("time", results["cases"][case]))
            save()
    else:
        run_children(args, params, child_env, results, parity_cases, cases, save)
        lock_dir.cleanup()
    print(markdown(results))


def run_children(args, params, env, results, parity_cases, cases, save):
    """Every parity and timing case in its own child process (environment `env`), up to
    `args.jobs` at once; results merged in the order of the case lists and saved after each
    finished child."""
    jobs = [("parity", c) for c in parity_cases] + [("time", c) for c in cases]
    done = {}
    start = time.perf_counter()

    def run(job):
        t0 = time.perf_counter()
        cmd = child_cmd(args, params, results["copy_GBps"], *job)
        r, log = run_child(cmd, env, args.case_timeout_s)
        return r, log, time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            kind, case = futures[future]
            r, log, wall_s = future.result()
            if kind == "time" and "error" in r:
                r = {"shape": list(cases[case]), **r}
            done[kind, case] = r
            # In the order of the case lists, whatever order the children finish in.
            results["parity"] = {
                c: done["parity", c] for c in parity_cases if ("parity", c) in done
            }
            results["cases"] = {c: done["time", c] for c in cases if ("time", c) in done}
            save()
            for line in log:
                print("  " + line)
            print(
                f"[{len(done)}/{len(jobs)}] {kind} {case}: {case_summary(kind, r)} "
                f"({wall_s:.0f} s; {time.perf_counter() - start:.0f} s since the first child)",
                flush=True,
            )


if __name__ == "__main__":
    main()
