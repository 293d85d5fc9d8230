"""Throughput and peak memory of the six ViG models, per BiGLA implementation.

    python benchmarks/bench_models.py               # device: 224^2, bf16, batch 128, all six
    python benchmarks/bench_models.py --models vig_s --impls pallas,chunked
    python benchmarks/bench_models.py --smoke       # CPU check: tiny models, batch and images

Each case (model, impl, mode) runs in a fresh process so that `peak_bytes_in_use` is that case's own
peak. Modes: "infer" = jitted forward (train=False); "train" = jitted loss + grads + an SGD update
(params donated), i.e. forward + backward. Before timing, the "infer" case checks parity: float32
logits of the impl against impl="reference" on 2 images of the benchmark size. Compilation is
excluded; the step time is the median of `--steps` timed steps after `--warmup` steps.
Writes `<out>.json` (device, jax version, git sha, every case) and `<out>.md` (a table).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402

from vig_jax.models import create_model  # noqa: E402

MODELS = ("vig_t", "vig_s", "vig_b", "vig_h_t", "vig_h_s", "vig_h_b")
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
# --smoke: one block per stage, so that the CPU check compiles in seconds, not minutes.
SMOKE_OVERRIDES = {"vig_t": dict(depth=1), "vig_h_t": dict(depths=(1, 1, 1, 1))}


def _images(batch, size, dtype, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), dtype)


def _parity(name, impl, size, overrides):
    """max |logits - reference logits| / max |reference logits|, float32, 2 images."""
    images = _images(2, size, jnp.float32, seed=1)
    ref = create_model(name, bigla_impl="reference", **overrides)
    params = jax.jit(lambda x: ref.init(jax.random.key(0), x, train=False))(images)
    want = jax.jit(lambda p, x: ref.apply(p, x, train=False))(params, images)
    model = create_model(name, bigla_impl=impl, **overrides)
    got = jax.jit(lambda p, x: model.apply(p, x, train=False))(params, images)
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


def run_case(name, impl, mode, args):
    """One measurement in this process; returns its result dict."""
    dtype = DTYPES[args.dtype]
    overrides = SMOKE_OVERRIDES[name] if args.smoke else {}
    model = create_model(name, dtype=dtype, bigla_impl=impl, **overrides)
    images = _images(args.batch, args.size, dtype)
    labels = jax.random.randint(jax.random.key(2), (args.batch,), 0, 1000)
    params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)["params"]
    result = dict(model=name, impl=impl, mode=mode)
    result["params"] = int(sum(x.size for x in jax.tree.leaves(params)))
    if mode == "infer":
        result["parity_rel_err"] = _parity(name, impl, args.size, overrides)
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
        times = _time_steps(lambda _: forward(params, images), None, args.warmup, args.steps)
    else:

        def loss_fn(params, key):
            logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

        def train_step(params, key):  # params donated below: updated in place, as in training
            loss, grads = jax.value_and_grad(loss_fn)(params, key)
            return jax.tree.map(lambda p, g: p - 1e-4 * g, params, grads), loss

        train_step = jax.jit(train_step, donate_argnums=0)
        key = jax.random.key(3)
        times = _time_steps(
            lambda s: train_step(s[0], key), (params, None), args.warmup, args.steps
        )
    median = float(np.median(times))
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    result.update(
        step_ms_median=1e3 * median,
        step_ms_min=1e3 * float(np.min(times)),
        img_per_s=args.batch / median,
        peak_bytes=stats.get("peak_bytes_in_use"),
    )
    return result


def _git_sha():
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return None


def _markdown(meta, results):
    impls = sorted({r["impl"] for r in results})
    lines = [
        f"# ViG models, {meta['size']}^2, {meta['dtype']}, batch {meta['batch']} "
        f"({meta['device']}, jax {meta['jax']}, {meta['git_sha']})",
        "",
        "img/s from the median of "
        f"{meta['steps']} steps; train = loss + grads + SGD update; peak = that case's process.",
        "",
        "| model | impl | infer img/s | train img/s | train peak GB | parity vs reference |",
        "|---|---|---|---|---|---|",
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
                f"| {cell(infer, 'parity_rel_err', '{:.1e}')} |"
            )
    errors = [r for r in results if "error" in r]
    if errors:
        lines += ["", "Errors:", ""] + [
            f"- {r['model']} {r['impl']} {r['mode']}: {r['error']}" for r in errors
        ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--impls", default="pallas,chunked", help="comma-separated BiGLA impls")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--out",
        help="path stem; default benchmarks/results/models (smoke: /tmp/bench_models_smoke)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU check: vig_t/vig_h_t, 1 block per stage, 2x64^2"
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # model:impl:mode, run by the parent
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.size, args.steps, args.warmup, args.impls = 2, 64, 3, 1, "chunked"
        args.models = ",".join(SMOKE_OVERRIDES)
    if args.out is None:
        args.out = (
            "/tmp/bench_models_smoke" if args.smoke else str(ROOT / "benchmarks/results/models")
        )
    if args.case:
        try:
            result = run_case(*args.case.split(":"), args)
        except Exception as e:  # reported in the table; the other cases still run
            name, impl, mode = args.case.split(":")
            result = dict(model=name, impl=impl, mode=mode, error=f"{type(e).__name__}: {e}"[:300])
        print("RESULT " + json.dumps(result), flush=True)
        return

    models, impls = args.models.split(","), args.impls.split(",")
    passthrough = [
        f"--{k}={getattr(args, k)}" for k in ("batch", "size", "dtype", "steps", "warmup")
    ]
    passthrough += ["--smoke"] if args.smoke else []
    results = []
    for name in models:
        for impl in impls:
            for mode in ("infer", "train"):
                cmd = [sys.executable, __file__, f"--case={name}:{impl}:{mode}", *passthrough]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if lines:
                    result = json.loads(lines[-1].removeprefix("RESULT "))
                else:
                    error = f"process exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
                    result = dict(model=name, impl=impl, mode=mode, error=error)
                results.append(result)
                print(json.dumps(result), flush=True)
    meta = dict(
        device=jax.devices()[0].device_kind,
        platform=jax.default_backend(),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        git_sha=_git_sha(),
        models=models,
        impls=impls,
        batch=args.batch,
        size=args.size,
        dtype=args.dtype,
        steps=args.steps,
        warmup=args.warmup,
    )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps(dict(meta=meta, results=results), indent=1) + "\n"
    )
    out.with_suffix(".md").write_text(_markdown(meta, results))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
