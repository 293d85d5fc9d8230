"""First run of the Mosaic GPU BiGLA forward on an sm_90 GPU: parity, then forward time vs Triton.

    python benchmarks/check_mosaic.py                 # parity at 6 shapes, then the timing table
    python benchmarks/check_mosaic.py --no-timing     # parity only

(a) Parity: `bigla_mosaic` (states from the Mosaic states kernel, the Triton states kernels
and the XLA scan) against the float32 reference on the GPU: bf16 q, k, v, typical gates
(log_sigmoid(3 N(0, 1)) / 16) and gates at -10 on half of the channels. Prints max |Δ| / max |ref|
of o and of the five gradients (through the custom_vjp) and PASS / FAIL at 1e-2 (o) / 2e-2
(gradients), the bf16 bounds of tests/test_bigla_pallas.py; then the swapped-gates control,
which must FAIL.
(b) Timing: forward µs of `bigla_mosaic` (each states source), of the Triton `bigla_pallas`, and
of the states work alone as `bigla_mosaic` does it (cumsums and padding included; the Mosaic
states kernel, auto plan and sequential, vs the Triton states kernels) at ViG-S 224
(128, 196, 6, 32, 64) and ViG-T 1024 (8, 4096, 3, 32, 64): --inner calls in one jitted loop
(harness.jax_repeat), compiled ahead of time (harness.compile_jax, compile seconds printed),
median of --iters runs (harness.time_call).
Any error (a Mosaic lowering or compile failure, say) prints as one line and the run goes on;
each states source's parity cases and each timing shape run in their own Python process
(harness.run_isolated, --timeout seconds), so a kernel fault or hang stops only that group.
"""

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from pallas_kernels.bigla import mosaic  # noqa: E402
from pallas_kernels.bigla.mosaic import MosaicParams, bigla_mosaic  # noqa: E402
from pallas_kernels.bigla.pallas import bigla_pallas  # noqa: E402
from pallas_kernels.bigla.reference import bigla_reference  # noqa: E402

PARITY_SHAPES = [  # (B, N, H, K, V)
    (1, 1, 2, 16, 32),
    (2, 17, 2, 32, 64),
    (1, 64, 2, 16, 32),
    (2, 196, 6, 32, 64),
    (1, 1000, 2, 16, 32),
    (2, 4096, 3, 32, 64),
]
TIMING_SHAPES = {"vig_s_224": (128, 196, 6, 32, 64), "vig_t_1024": (8, 4096, 3, 32, 64)}
TOL_O, TOL_GRAD = 1e-2, 2e-2
NAMES = ("o", "dq", "dk", "dv", "dgf", "dgb")


def inputs(shape, gates="typical", seed=0):
    B, N, H, K, V = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = (jax.random.normal(ks[0], (B, N, H, K)) * K**-0.5).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, N, H, K)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, N, H, V)).astype(jnp.bfloat16)
    gf, gb = (jax.nn.log_sigmoid(3 * jax.random.normal(kk, (B, N, H, K))) / 16 for kk in ks[3:5])
    if gates == "very_negative":
        strong = jnp.arange(K) % 2 == 0
        gf, gb = jnp.where(strong, -10.0, gf), jnp.where(strong[::-1], -10.0, gb)
    do = jax.random.normal(ks[5], (B, N, H, V)).astype(jnp.bfloat16)
    return (q, k, v, gf, gb), do


def fwd_and_grads(f, args, do):
    o, vjp = jax.vjp(f, *args)
    return (o, *vjp(do))


def rel_errs(got, want):
    """max |Δ| / max |ref| per output. A reference that is exactly 0 (the gates' gradients at N = 1,
    where a lone token's gates act on nothing) is scaled by max |dq| instead, as the tests do:
    what is left there is the rounding of q * dq - k * dk."""
    errs = []
    dq_scale = max(np.abs(np.asarray(want[1], np.float64)).max(initial=0.0), 1.0)
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = np.abs(w).max(initial=0.0) or dq_scale
        errs.append(np.abs(g - w).max(initial=0.0) / scale if np.isfinite(g).all() else np.inf)
    return errs


def parity(shape, params, gates="typical", swap=False):
    args, do = inputs(shape, gates)
    f = lambda *a: bigla_mosaic(*a, params=params)
    q, k, v, gf, gb = args
    run = (q, k, v, gb, gf) if swap else args
    got = jax.jit(lambda a, d: fwd_and_grads(f, a, d))(run, do)
    up = [x.astype(jnp.float32) for x in args]
    want = jax.jit(lambda a, d: fwd_and_grads(bigla_reference, a, d))(up, do.astype(jnp.float32))
    errs = rel_errs(got, want)
    ok = errs[0] <= TOL_O and max(errs[1:]) <= TOL_GRAD
    if swap:  # only the forward: the control is about the kernel's use of the gates
        ok = errs[0] <= TOL_O
    return errs, ok


def parity_cases(states):
    """(shape, gates, swapped) of one states source (the Mosaic states kernel needs V >= 64)."""
    cases = [(s, "typical", False) for s in PARITY_SHAPES if states != "mosaic" or s[-1] >= 64]
    if states != "xla":
        cases += [
            ((2, 196, 3, 32, 64), "very_negative", False),
            ((2, 196, 3, 32, 64), "typical", True),
        ]
    return cases


def parity_child(case, report):
    """One states source's parity cases in this (fresh) process, each line reported as it ends."""
    lines = []
    for shape, gates, swap in case["cases"]:
        label = f"{tuple(shape)} states={case['states']} gates={gates}" + (
            " SWAPPED" if swap else ""
        )
        try:
            errs, ok = parity(tuple(shape), MosaicParams(states=case["states"]), gates, swap)
            verdict = ("FAIL (expected)" if not ok else "PASS (WRONG: control)") if swap else None
            verdict = verdict or ("PASS" if ok else "FAIL")
            detail = " ".join(f"{n} {e:.2e}" for n, e in zip(NAMES, errs, strict=True))
            lines.append(f"{label}: {detail} -> {verdict}")
        except Exception as exc:  # a Mosaic lowering/compile error: report it and go on
            lines.append(f"{label}: {harness.status(exc)}")
        harness.log(lines[-1])
        report({"lines": lines})
    return {"lines": lines}


def run_parity(args):
    harness.log(f"parity (bound o {TOL_O}, gradients {TOL_GRAD}; the swapped control must FAIL)")
    for states in ("mosaic", "pallas", "xla"):
        case = {"states": states, "cases": parity_cases(states)}
        result = harness.run_isolated(parity_child, case, timeout_s=args.timeout)
        if "status" in result:  # the child died (a kernel fault, a hang): the rest still runs
            harness.log(f"states={states} stopped: {result['status']}")


def time_forward(name, fn, shape, args):
    (q, k, v, gf, gb), _ = inputs(shape)
    try:
        loop, compile_s = harness.compile_jax(
            harness.jax_repeat(fn, args["inner"]), q, k, v, gf, gb
        )
        t = harness.time_call(
            lambda: loop(q, k, v, gf, gb), jax.block_until_ready, iters=args["iters"]
        )
        return f"{t['ms'] / args['inner'] * 1e3:.1f}", f"{compile_s:.1f}"
    except Exception as exc:
        harness.log(f"{name} {shape}: {harness.status(exc)}")
        return "error", "-"


def states_only(params, q, k, v, gf, gb):
    """The entering states alone, as `bigla_mosaic` computes them (padding and cumsums
    included), from the Mosaic states kernel or the Triton states kernels."""
    B, N, H, _ = q.shape
    nt = -(-N // mosaic.CHUNK)
    span = mosaic._mosaic_span(B, H, N, params) if params.states == "mosaic" else 1
    n_pad = -(-nt // span) * span * mosaic.CHUNK
    Gf, _ = mosaic._in_chunk_cumsums(gf, n_pad)
    _, Gb = mosaic._in_chunk_cumsums(gb, n_pad)
    padded = (mosaic._pad(k, n_pad), mosaic._pad(v, n_pad), Gf, Gb)
    return mosaic._entering_states((k, v, gf, gb), padded, params)


def timing_child(case, report):
    """The forward µs of every implementation at one shape, each row reported as it ends."""
    impls = {
        "mosaic (Mosaic states)": functools.partial(bigla_mosaic, params=MosaicParams("mosaic")),
        "mosaic (Triton states)": functools.partial(bigla_mosaic, params=MosaicParams("pallas")),
        "mosaic (XLA states)": functools.partial(bigla_mosaic, params=MosaicParams("xla")),
        "pallas (Triton)": bigla_pallas,
        "states only: Mosaic": functools.partial(states_only, MosaicParams("mosaic")),
        "states only: Mosaic, sequential": functools.partial(
            states_only, MosaicParams("mosaic", states_span=0)
        ),
        "states only: Triton": functools.partial(states_only, MosaicParams("pallas")),
    }
    shape, rows = tuple(case["shape"]), []
    for name, fn in impls.items():
        us, compile_s = time_forward(name, fn, shape, case)
        rows.append(f"| {case['name']} {shape} | {name} | {us} | {compile_s} |")
        harness.log(rows[-1])
        report({"rows": rows})
    return {"rows": rows}


def run_timing(args):
    lines = ["| shape | impl | fwd µs | compile s |", "|---|---|---|---|"]
    for name, shape in TIMING_SHAPES.items():
        case = {"name": name, "shape": shape, "inner": args.inner, "iters": args.iters}
        result = harness.run_isolated(timing_child, case, timeout_s=args.timeout)
        lines += result.get("rows", [])
        if "status" in result:
            lines.append(f"| {name} {shape} | (stopped: {result['status'][:120]}) | | |")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-timing", action="store_true", help="parity only")
    parser.add_argument("--inner", type=int, default=10, help="calls per jitted loop")
    parser.add_argument("--iters", type=int, default=20, help="timed runs (median)")
    parser.add_argument(
        "--timeout", type=float, default=240, help="seconds per child process (a hang ends there)"
    )
    args = parser.parse_args()
    # This process stays off the GPU: each group of cases runs in a fresh Python
    # (harness.run_isolated), so a kernel fault or hang ends only its group.
    device = harness.probe_devices()
    harness.log(f"jax {jax.__version__}, {device.get('kind')}, git {harness.git_sha()}")
    run_parity(args)
    if not args.no_timing:
        run_timing(args)


if __name__ == "__main__":
    main()
