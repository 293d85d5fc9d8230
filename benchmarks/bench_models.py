"""Throughput and peak memory of the six ViG models, per BiGLA implementation.

    python benchmarks/bench_models.py               # device: 224^2, bf16, batch 128, all six
    python benchmarks/bench_models.py --models vig_s --impls pallas,chunked
    python benchmarks/bench_models.py --jobs 4      # 4 cases compile at once, timed one at a time
    python benchmarks/bench_models.py --smoke       # CPU check: tiny models, batch and images

Each case (model, impl, mode) runs in a fresh process so that `peak_bytes_in_use` is that case's own
peak. Modes: "infer" = jitted forward (train=False); "train" = jitted loss + grads + an SGD update
(params donated), i.e. forward + backward. Every case compiles its program ahead of time (recorded
as `compile_s`); the "infer" case first checks parity: float32 logits of the impl against
impl="reference" on 2 images of the benchmark size. Then, holding the GPU timing lock
(benchmarks/gpu_lock.py), it runs `--warmup` steps and times `--steps` steps; the step time is
their median. With `--jobs J` > 1, J cases run at once: they compile concurrently and only the
warm-up + timed steps are serialised by the lock. A case that fails or runs past `--timeout-s` is
recorded as an error and the others go on. `<out>.json` (device, jax version, git sha, every case)
and `<out>.md` (a table) are rewritten after every finished case, in the case order.
"""

import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.child_results import (  # noqa: E402
    common_setting,
    git_sha,
    parse_results,
    print_result,
)
from benchmarks.gpu_lock import concurrent_env, timing_lock  # noqa: E402
from vig_jax.models import create_model  # noqa: E402

MODELS = ("vig_t", "vig_s", "vig_b", "vig_h_t", "vig_h_s", "vig_h_b")
IMPLS = ("pallas", "chunked", "reference", "auto")
MODES = ("infer", "train")
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
# --smoke: one block per stage, so that the CPU check compiles in seconds, not minutes.
SMOKE_OVERRIDES = {"vig_t": dict(depth=1), "vig_h_t": dict(depths=(1, 1, 1, 1))}


def _images(batch, size, dtype, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), dtype)


def _init(name, size, overrides, with_logits):
    """float32 params, plus reference logits [2, 1000] if `with_logits`, of 2 images of `size`.

    Parameters are float32 and independent of the BiGLA impl, the compute dtype and the batch, so
    every case initialises the same way (key 0) on 2 images. Going through impl="reference" keeps
    the Pallas kernel out of this program (no extra Triton compile); with `with_logits` one compile
    gives both params and the parity reference, without it XLA drops the forward pass.
    Returns (params, logits or None, images [2, size, size, 3]).
    """
    images = _images(2, size, jnp.float32, seed=1)
    ref = create_model(name, bigla_impl="reference", **overrides)
    key = jax.random.key(0)
    if with_logits:
        logits, variables = jax.jit(lambda x: ref.init_with_output(key, x, train=False))(images)
        return variables["params"], logits, images
    return jax.jit(lambda x: ref.init(key, x, train=False))(images)["params"], None, images


def _parity(name, impl, params, want, images, overrides):
    """max |logits - reference logits| / max |reference logits|, float32, `images` [2, S, S, 3]."""
    model = create_model(name, bigla_impl=impl, **overrides)
    got = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, images)
    return float(jnp.abs(got - want).max() / jnp.abs(want).max())


def _time_steps(step, state, warmup, steps):
    """Runs `state = step(state)`; returns the per-step seconds of the timed steps."""
    for _ in range(warmup):
        state = jax.block_until_ready(step(state))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state = jax.block_until_ready(step(state))
        times.append(time.perf_counter() - start)
    return times


def _compile(name, impl, mode, params, args):
    """AOT-compiles the case's program; returns `step` for `_time_steps` and its first state."""
    dtype = DTYPES[args.dtype]
    overrides = SMOKE_OVERRIDES[name] if args.smoke else {}
    model = create_model(name, dtype=dtype, bigla_impl=impl, **overrides)
    images = _images(args.batch, args.size, dtype)
    if mode == "infer":
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
        forward = forward.lower(params, images).compile()
        return lambda _: forward(params, images), None

    labels = jax.random.randint(jax.random.key(2), (args.batch,), 0, 1000)

    def loss_fn(params, key):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    def train_step(params, key):  # params donated below: updated in place, as in training
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        return jax.tree.map(lambda p, g: p - 1e-4 * g, params, grads), loss

    key = jax.random.key(3)
    train_step = jax.jit(train_step, donate_argnums=0).lower(params, key).compile()
    return lambda s: train_step(s[0], key), (params, None)


def run_case(name, impl, mode, args):
    """One measurement in this process; returns its result dict."""
    overrides = SMOKE_OVERRIDES[name] if args.smoke else {}
    device = jax.devices()[0]
    result = dict(
        model=name, impl=impl, mode=mode, device=device.device_kind, platform=device.platform
    )
    params, want, parity_images = _init(name, args.size, overrides, with_logits=mode == "infer")
    result["params"] = int(sum(x.size for x in jax.tree.leaves(params)))
    if mode == "infer":
        result["parity_rel_err"] = _parity(name, impl, params, want, parity_images, overrides)
    del want, parity_images
    start = time.perf_counter()
    step, state = _compile(name, impl, mode, params, args)
    result["compile_s"] = time.perf_counter() - start
    # Only warm-up and timed steps hold the lock: other cases compile meanwhile, none times.
    start = time.perf_counter()
    with timing_lock():
        result["lock_wait_s"] = time.perf_counter() - start
        locked_from = time.time()
        times = _time_steps(step, state, args.warmup, args.steps)
        # Unix seconds of warm-up + timing: the windows of a run's cases must not overlap.
        result["timed_unix"] = [locked_from, time.time()]
    median = float(np.median(times))
    stats = device.memory_stats() or {}  # None on CPU
    result.update(
        step_ms_median=1e3 * median,
        step_ms_min=1e3 * float(np.min(times)),
        img_per_s=args.batch / median,
        peak_bytes=stats.get("peak_bytes_in_use"),
    )
    return result


def _markdown(meta, results):
    impls = sorted({r["impl"] for r in results})
    runs = meta.get("runs") or [meta]
    lines = [
        f"# ViG models, {meta['size']}^2, {meta['dtype']}, batch {meta['batch']} "
        f"({meta['device']}, jax {meta['jax']})",
        "",
        "img/s from the median of "
        f"{meta['steps']} steps; train = loss + grads + SGD update; peak = that case's process; "
        "compile = AOT compile wall seconds, with other cases compiling at once. "
        + " ".join(
            f"Run {k}: {', '.join(r['models'])} x {', '.join(r['impls'])} at git {r['git_sha']}, "
            f"{r['jobs']} case(s) at once."
            for k, r in enumerate(runs, 1)
        ),
        "",
        "| model | impl | infer img/s | train img/s | train peak GB | parity vs reference "
        "| compile s infer / train |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["model"], r["impl"], r["mode"]): r for r in results}
    for name in meta["models"]:
        for impl in impls:
            infer, train = (
                by_key.get((name, impl, "infer"), {}),
                by_key.get((name, impl, "train"), {}),
            )

            def cell(r, key, fmt):
                if "error" in r:
                    return "error"
                return fmt.format(r[key]) if r.get(key) is not None else "-"

            peak = train.get("peak_bytes")
            lines.append(
                f"| {name} | {impl} | {cell(infer, 'img_per_s', '{:,.0f}')} "
                f"| {cell(train, 'img_per_s', '{:,.0f}')} "
                f"| {'-' if peak is None else f'{peak / 1e9:.1f}'} "
                f"| {cell(infer, 'parity_rel_err', '{:.1e}')} "
                f"| {cell(infer, 'compile_s', '{:.0f}')} / {cell(train, 'compile_s', '{:.0f}')} |"
            )
    errors = [r for r in results if "error" in r]
    if errors:
        lines += ["", "Errors:", ""] + [
            f"- {r['model']} {r['impl']} {r['mode']}: {r['error']}" for r in errors
        ]
    return "\n".join(lines) + "\n"


def _tail(text, n=300):
    """Last `n` characters of a child's output (bytes or str, possibly None), stripped."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "").strip()[-n:]


def run_child(case, passthrough, env, timeout_s):
    """Runs one case (model, impl, mode) in a child process; returns its result dict.

    A child that crashes or runs past `timeout_s` (killed) gives a result with an "error".
    `wall_s` is the child's wall time: import, init, parity, compile, lock wait and timing.
    """
    name, impl, mode = case
    cmd = [sys.executable, __file__, f"--case={name}:{impl}:{mode}", *passthrough]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        error = f"timed out after {timeout_s:g} s (killed): {_tail(e.stderr)}"
        result = dict(model=name, impl=impl, mode=mode, error=error)
    else:
        found = parse_results(proc.stdout)
        if found:
            result = found[-1]
        else:
            error = f"process exited {proc.returncode}: {_tail(proc.stderr)}"
            result = dict(model=name, impl=impl, mode=mode, error=error)
    result["wall_s"] = time.perf_counter() - start
    return result


def _progress(k, n, result, elapsed):
    """One line per finished case: key numbers, the case's wall time, the run's elapsed time."""
    case = f"[{k}/{n}] {result['model']} {result['impl']} {result['mode']}"
    if "error" in result:
        numbers = f"ERROR {result['error'][:200]}"
    else:
        numbers = (
            f"{result['img_per_s']:,.1f} img/s, {result['step_ms_median']:.2f} ms/step, "
            f"compile {result['compile_s']:.1f} s, lock wait {result['lock_wait_s']:.1f} s"
        )
        if result.get("parity_rel_err") is not None:
            numbers += f", parity {result['parity_rel_err']:.1e}"
    return f"{case}: {numbers}; case {result['wall_s']:.0f} s, elapsed {elapsed:.0f} s"


def _write(out, meta, results):
    """Rewrites `<out>.json` and `<out>.md` (each via a temporary file and a rename)."""
    device = next((r["device"] for r in results if r.get("device")), None)
    platform = next((r["platform"] for r in results if r.get("platform")), None)
    meta = dict(meta, device=device, platform=platform)
    for path, text in (
        (out.with_suffix(".json"), json.dumps(dict(meta=meta, results=results), indent=1) + "\n"),
        (out.with_suffix(".md"), _markdown(meta, results)),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


MERGE_FIELDS = ("batch", "size", "dtype", "steps", "warmup", "smoke", "device")


def merge_results(docs):
    """One result document from several runs' documents ({"meta", "results"}), in order.

    The runs must agree on MERGE_FIELDS. A case (model, impl, mode) measured by several runs is
    taken from the last of them. The merged meta lists each run's meta under "runs"; models and
    impls are the union, in the canonical order.
    """
    metas = [d["meta"] for d in docs]
    for field in MERGE_FIELDS:
        common_setting(metas, field)
    by_key = {}
    for doc in docs:
        for r in doc["results"]:
            by_key[(r["model"], r["impl"], r["mode"])] = r
    models = [m for m in MODELS if any(m in meta["models"] for meta in metas)]
    impls = [i for i in IMPLS if any(i in meta["impls"] for meta in metas)]
    results = [
        by_key[(m, i, mode)]
        for m in models
        for i in impls
        for mode in MODES
        if (m, i, mode) in by_key
    ]
    meta = {k: metas[0].get(k) for k in ("jax", "jaxlib", *MERGE_FIELDS, "platform")}
    meta.update(models=models, impls=impls, runs=metas)
    return dict(meta=meta, results=results)


def run_all(cases, passthrough, meta, out, jobs, timeout_s):
    """Runs `cases` with up to `jobs` children at once; writes results after each finished case.

    The parent never initialises a JAX backend (on a GPU it would preallocate memory that the
    children need): each child reports its device. Results keep the order of `cases`.
    """
    done = {}
    run_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        env = concurrent_env(pathlib.Path(tmp) / "gpu.lock") if jobs > 1 else None
        futures = {
            pool.submit(run_child, c, passthrough, env, timeout_s): i for i, c in enumerate(cases)
        }
        for future in concurrent.futures.as_completed(futures):
            done[futures[future]] = future.result()
            results = [done[i] for i in sorted(done)]
            _write(out, meta, results)
            elapsed = time.perf_counter() - run_start
            print(_progress(len(done), len(cases), done[futures[future]], elapsed), flush=True)
    return [done[i] for i in range(len(cases))]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", help=f"comma-separated; default {','.join(MODELS)}")
    parser.add_argument(
        "--impls", help="comma-separated BiGLA impls; default pallas,chunked (smoke: chunked)"
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--jobs", type=int, default=1, help="cases run at once (compile concurrently); default 1"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=900.0, help="per case; killed and recorded as an error"
    )
    parser.add_argument(
        "--out",
        help="path stem; default benchmarks/results/models (smoke: /tmp/bench_models_smoke)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU check: vig_t/vig_h_t (default), 1 block per stage, chunked, 2x64^2",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="no run: combine earlier runs' <out>.json (a case measured twice: the later file's)",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # model:impl:mode, run by the parent
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.size, args.steps, args.warmup = 2, 64, 3, 1
    default_models = SMOKE_OVERRIDES if args.smoke else MODELS
    args.models = args.models.split(",") if args.models else list(default_models)
    args.impls = (args.impls or ("chunked" if args.smoke else "pallas,chunked")).split(",")
    known = SMOKE_OVERRIDES if args.smoke else MODELS
    if unknown := [m for m in args.models if m not in known]:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(known)}")
    if unknown := [i for i in args.impls if i not in IMPLS]:
        parser.error(f"unknown impl(s) {unknown}; choose from {', '.join(IMPLS)}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.timeout_s <= 0:
        parser.error(f"--timeout-s must be > 0, got {args.timeout_s}")
    if args.out is None:
        args.out = (
            "/tmp/bench_models_smoke" if args.smoke else str(ROOT / "benchmarks/results/models")
        )
    return args


def main():
    args = parse_args()
    if args.merge:
        docs = [json.loads(pathlib.Path(f).read_text()) for f in args.merge]
        try:
            merged = merge_results(docs)
        except ValueError as e:
            raise SystemExit(f"--merge {args.merge}: {e}") from None
        out = pathlib.Path(args.out)
        _write(out, merged["meta"], merged["results"])
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
        return
    if args.case:
        try:
            result = run_case(*args.case.split(":"), args)
        except Exception as e:  # reported in the table; the other cases still run
            name, impl, mode = args.case.split(":")
            result = dict(model=name, impl=impl, mode=mode, error=f"{type(e).__name__}: {e}"[:300])
        print_result(result)
        return

    cases = [(m, i, mode) for m in args.models for i in args.impls for mode in MODES]
    passthrough = [
        f"--{k}={getattr(args, k)}" for k in ("batch", "size", "dtype", "steps", "warmup")
    ]
    passthrough += ["--smoke"] if args.smoke else []
    meta = dict(
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        git_sha=git_sha(),
        models=args.models,
        impls=args.impls,
        batch=args.batch,
        size=args.size,
        dtype=args.dtype,
        steps=args.steps,
        warmup=args.warmup,
        jobs=args.jobs,
        timeout_s=args.timeout_s,
        smoke=args.smoke,
    )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_all(cases, passthrough, meta, out, args.jobs, args.timeout_s)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
