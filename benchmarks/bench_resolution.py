"""ViG vs DeiT across input resolutions: throughput, peak memory, FLOPs, params (issue 7).

    python benchmarks/bench_resolution.py              # GPU, ~8 min on an H100; prints progress
    python benchmarks/bench_resolution.py --jobs 4     # 4 cases compile at once, timed in turn
    python benchmarks/bench_resolution.py --smoke      # CPU check: depth-1 models, tiny images

Pairs (paper claims): ViG-T vs DeiT-T and ViG-S vs DeiT-B, at 224..1024 and larger sizes while the
time budget lasts. bf16 compute, fp32 params, batch 128·(224/size)² (floor, min 1), the same for
both models of a size. Per (model, size):
  inference   jitted forward, train=False;
  training    jitted AdamW step (loss, grads, update) with the state donated.
Compilation and warm-up are excluded; a run is `k` back-to-back calls ended by block_until_ready
(k such that a run lasts >= ~50 ms, so dispatch is hidden); the reported time is the median over
`--iters` runs.

Memory: each (model, size) runs in a FRESH subprocess, inference first, then training. JAX's
`peak_bytes_in_use` is process-wide and cannot be reset, so `infer_peak` is the inference peak alone
and `train_peak` is the process peak after both (training always needs more: params, grads and
Adam moments plus activations). The XLA estimate of each compiled program (arguments + outputs +
temporaries, `compiled.memory_analysis()`) is recorded too. The subprocess gets
XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 (unless set) so that "OOM" means the card, not the default 75 %
pool. An out-of-memory error is recorded as "OOM" and the run goes on.

Concurrency (`--jobs J`, default 1): up to J case processes run at once; they compile
concurrently and hold `gpu_lock.timing_lock()` only for warm-up and timed runs (both modes), so no
two timings overlap. They run without GPU memory preallocation (`gpu_lock.concurrent_env`), so
each peak is still its own process's. Cases start in the output order (sizes as given, the pairs'
models within a size); none starts after `--budget-s`, and one still running GRACE_S later is
killed ("timeout"). A model's case is skipped (inference OOM) or not trained (training OOM) when
an earlier size of that model ran out of memory, as far as is known when the case starts (with
J > 1 an earlier size may still be running). Under J > 1 a case's memory is not alone on the card:
the others hold their inputs and parameters, and XLA's autotuning while they compile allocates and
runs kernels on the GPU (which may also disturb the timing in progress); an OOM at the largest
sizes may need a rerun with `--jobs 1` to be sure.
The results are rewritten after every finished case (cases to come: "pending"); SIGTERM kills the
children and writes "not run (benchmark stopped)" for the rest, so a run cut off by a time limit
still leaves everything it finished.

FLOPs: `vig_jax.flops.count_model` (XLA cost analysis of the batch-1 forward, ViG with the chunked
BiGLA since XLA sees no FLOPs inside a Pallas kernel) in one CPU subprocess that runs alongside.

ViG uses `--bigla-impl` (pallas by default); DeiT uses `--attention` (cudnn flash attention by
default, with the token count padded inside attention to a multiple of `--token-multiple`, 64,
because cuDNN's backward rejects N = 197, 1025, 4097; `--attention xla` for plain softmax attention,
unpadded). Results: `<out>.json` and `<out>.md` (default benchmarks/results/resolution.*).
"""

import argparse
import concurrent.futures
import datetime
import functools
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.child_results import git_sha, parse_results, print_result  # noqa: E402
from benchmarks.gpu_lock import concurrent_env, timing_lock  # noqa: E402

DEFAULT_SIZES = (224, 384, 512, 768, 1024, 1536, 2048)
DEFAULT_PAIRS = ("vig_t:deit_t", "vig_s:deit_b")
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory")
RUN_SECONDS = 0.05  # target length of one timed run (k back-to-back calls)
GRACE_S = 90.0  # a case running when the time budget ends may go on this long


def batch_for(size: int) -> int:
    """128 at 224², scaled by (224/size)², floored, at least 1."""
    return max(1, int(128 * (224 / size) ** 2))


# ----------------------------------------------------------------------------------------------
# Child processes: one (model, size) case on the accelerator, or the FLOP counts on the CPU.


def _status(exc: Exception) -> str:
    msg = str(exc)
    if any(m in msg for m in OOM_MARKERS):
        return "OOM"
    return "error: " + (msg.strip().splitlines() or [type(exc).__name__])[0][:300]


def _time_runs(fn, iters: int, warmup: int) -> tuple[float, int]:
    """Median seconds per call of `fn()` (which blocks), over `iters` runs of k calls each."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    single = time.perf_counter() - t0
    k = max(1, min(50, int(RUN_SECONDS / max(single, 1e-6))))
    runs = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(k)
        runs.append((time.perf_counter() - t0) / k)
    return statistics.median(runs), k


def _memory_analysis_bytes(compiled) -> int | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )


def _peak_bytes(device) -> int | None:
    stats = device.memory_stats()  # None on CPU
    return int(stats["peak_bytes_in_use"]) if stats else None


def run_case(case: dict) -> dict:
    """Measures one model at one size: inference, then a training step. Runs in its own process."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from vig_jax.models import create_model

    device = jax.devices()[0]
    out = {
        "device": device.device_kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "jaxlib": __import__("jaxlib").__version__,
    }
    model = create_model(
        case["model"], num_classes=1000, dtype=jnp.bfloat16, **case["create_kwargs"]
    )
    b, s = case["batch"], case["size"]
    rng = np.random.default_rng(0)  # host-side data: nothing to compile
    images = jnp.asarray(rng.standard_normal((b, s, s, 3), np.float32), jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 1000, (b,)), jnp.int32)
    # The "rbg" generator compiles much faster than threefry (init draws every parameter);
    # random values do not change what is timed.
    key = jax.random.key(0, impl="rbg")
    # Parameters do not depend on the image size: initialise at 224² so every size shares one
    # compiled init (persistent cache, see _child_env).
    init_images = jnp.zeros((1, 224, 224, 3), jnp.bfloat16)
    params = jax.jit(lambda x: model.init(key, x, train=False)["params"])(init_images)
    out["params"] = sum(x.size for x in jax.tree.leaves(params))

    # Training step: AdamW, state donated. The dropout key is fixed (DropPath in ViG draws from
    # it); a new key per step would only add a host-side op to the timed loop.
    tx = optax.adamw(1e-3, weight_decay=0.05)

    def step(state, x, y):
        p, opt_state = state

        def loss_fn(p):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    # Both programs compile at once (XLA compiles without the GIL); the training state is
    # abstract here, so nothing is allocated before the inference peak is read.
    abstract_state = jax.eval_shape(lambda p: (p, tx.init(p)), params)
    lowered = {
        "infer": jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)).lower(
            params, images
        ),
        "train": jax.jit(step, donate_argnums=0).lower(abstract_state, images, labels),
    }
    if not case["train"]:
        del lowered["train"]
        out["train"] = "not run (OOM at a smaller size)"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {mode: pool.submit(low.compile) for mode, low in lowered.items()}
    compiled = {}
    for mode, future in futures.items():
        try:
            compiled[mode] = future.result()
            out[f"{mode}_xla_bytes"] = _memory_analysis_bytes(compiled[mode])
        except Exception as exc:  # a failure is recorded and the sweep goes on
            out[mode] = _status(exc)

    # Compiled above, outside the lock; only warm-up and timed runs hold it (other benchmark
    # processes may be compiling meanwhile, see gpu_lock). Peaks are read after each mode's timing.
    # The optimizer-state init compiles here too; it runs (allocates) only after inference.
    opt_init = jax.jit(tx.init).lower(params).compile() if "train" in compiled else None
    with timing_lock():
        if "infer" in compiled:
            make = functools.partial(_infer_call, compiled.pop("infer"), params, images)
            _time_mode("infer", make, case, device, out)
        if "train" in compiled:
            make = functools.partial(
                _train_call, compiled.pop("train"), opt_init, params, images, labels
            )
            _time_mode("train", make, case, device, out)
    return out


def _time_mode(mode: str, make_call, case: dict, device, out: dict) -> None:
    """Times `call = make_call()` (call(k) runs k steps and blocks); records in `out` the mode's
    status, ms, img/s, calls per run and the process peak after it, or the error as its status."""
    try:
        sec, k = _time_runs(make_call(), case["iters"], case["warmup"])
        b = case["batch"]
        out.update(
            {
                mode: "ok",
                f"{mode}_ms": sec * 1e3,
                f"{mode}_img_s": b / sec,
                f"{mode}_calls_per_run": k,
            }
        )
        out[f"{mode}_peak_bytes"] = _peak_bytes(device)
    except Exception as exc:
        out[mode] = _status(exc)


def _infer_call(compiled, params, images):
    """call(k): k compiled forwards."""

    def call(k=1):
        for _ in range(k):
            y = compiled(params, images)
        y.block_until_ready()

    return call


def _train_call(compiled, opt_init, params, images, labels):
    """call(k): k compiled (donating) train steps. `opt_init` is the compiled AdamW init: the
    optimizer state is allocated here, after inference."""
    import jax

    holder = [(params, opt_init(params))]

    def call(k=1):
        state = holder[0]
        for _ in range(k):
            state, loss = compiled(state, images, labels)
        jax.block_until_ready((state, loss))
        holder[0] = state

    return call


def run_flops(jobs: list) -> None:
    """Prints one RESULT line per [model, size, overrides] job: params and batch-1 forward FLOPs."""
    os.nice(10)  # runs beside the timed GPU cases: stay out of their way
    from vig_jax.flops import count_model

    for name, size, overrides in jobs:
        try:
            c = count_model(name, (size, size), **overrides)
            res = dict(
                params=c.params,
                xla_gflops=c.xla_flops / 1e9,
                gmacs=c.macs / 1e9,
                matmul_gflops=c.matmul_flops / 1e9,
            )
        except Exception as exc:
            res = {"error": _status(exc)}
        print_result({"model": name, "size": size, **res})


# ----------------------------------------------------------------------------------------------
# Parent: sweep, collect, write.


def _child_env(smoke: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    # Shared persistent compilation cache: parameter init (compiled at 224² for every size) and
    # reruns compile once. It cannot change what is timed, only the wall time of the sweep.
    env.setdefault(
        "JAX_COMPILATION_CACHE_DIR",
        str(pathlib.Path(tempfile.gettempdir()) / "vig_jax_bench_cache"),
    )
    if smoke:
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _start_child(case: dict, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child-case", json.dumps(case)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_child(proc: subprocess.Popen, timeout_s: float) -> dict:
    """The case result of a child started by `_start_child`; killed after `timeout_s`."""
    try:
        stdout, stderr = proc.communicate(timeout=max(timeout_s, 0.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"infer": f"timeout after {timeout_s:.0f} s", "train": "not run (timeout)"}
    results = parse_results(stdout)
    if proc.returncode != 0 or not results:
        # Some allocation failures abort the process instead of raising (e.g. inside cuDNN).
        if any(m in stderr for m in OOM_MARKERS):
            return {"infer": "OOM", "train": "OOM", "note": "process aborted"}
        tail = " | ".join(stderr.strip().splitlines()[-3:])[:400]
        status = f"crashed (rc={proc.returncode}): {tail}"
        return {"infer": status, "train": status}
    return results[-1]


class _FlopCounter:
    """The CPU subprocess counting FLOPs; its results are read as they come, for partial writes."""

    def __init__(self, jobs: list, env: dict):
        self._stderr = tempfile.TemporaryFile("w+")  # read only on failure; a pipe could fill
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child-flops", json.dumps(jobs)],
            env={**env, "JAX_PLATFORMS": "cpu"},
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._results, self._lock = {}, threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            for r in parse_results(line):
                with self._lock:
                    self._results[(r["model"], r["size"])] = r

    def results(self) -> dict:
        """{(model, size): {params, xla_gflops, gmacs, matmul_gflops} or {error}} so far."""
        with self._lock:
            return dict(self._results)

    def close(self, timeout_s: float) -> None:
        """Waits up to `timeout_s` for the remaining counts, then kills the counter."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            if timeout_s > 0:  # 0: the sweep was stopped, nothing more was expected
                print("FLOP counter timed out; counts so far only", flush=True)
        self._reader.join()
        if self.proc.returncode and self.proc.returncode > 0:
            self._stderr.seek(0)
            print(f"FLOP counter failed: {self._stderr.read().strip()[-400:]}", flush=True)
        self._stderr.close()


def _case_kwargs(name: str, args) -> dict:
    """create_model keyword arguments of one model under the chosen kernels."""
    kwargs = {"depth": 1} if args.smoke else {}
    if name.startswith("vig"):
        kwargs["bigla_impl"] = args.bigla_impl
    elif name.startswith("deit"):
        kwargs["attention_impl"] = args.attention
        kwargs["token_multiple"] = args.token_multiple
    else:
        raise ValueError(f"{name!r}: only vig_* and deit_* models are compared here")
    return kwargs


def _plan(args) -> list:
    """The cases in output order: sizes in the given order, each with every model of the pairs."""
    pairs = [tuple(p.split(":")) for p in args.pairs]
    models = list(dict.fromkeys(m for pair in pairs for m in pair))
    return [
        dict(
            model=name,
            size=size,
            batch=args.batch or batch_for(size),
            iters=args.iters,
            warmup=args.warmup,
            create_kwargs=_case_kwargs(name, args),
        )
        for size in args.sizes
        for name in models
    ]


def sweep(args, write) -> dict:
    """Runs every case of `_plan(args)`, up to `args.jobs` child processes at once.

    Cases start in plan order, each only while the time budget lasts; one running at the budget
    gets GRACE_S more, then it is killed. A model that ran out of memory at an earlier size is
    not run again (inference) or not trained (training), as far as that is known when the case
    starts. `write(result)` is called after every finished case with the results so far (cases
    still to come marked "pending"), and once at the end; the final result is returned.
    """
    env = _child_env(args.smoke)
    start = time.time()
    plan = _plan(args)
    overrides = {"depth": 1} if args.smoke else {}
    flops = _FlopCounter([[c["model"], c["size"], overrides] for c in plan], env)
    done = [None] * len(plan)  # finished case records, in plan order
    infer_oom, train_oom, live = set(), set(), set()
    lock = threading.Lock()  # guards everything above, the console and the result files
    stopped = threading.Event()
    order = iter(range(len(plan)))  # the next case to start
    lock_dir = tempfile.TemporaryDirectory(prefix="vig_bench_lock_") if args.jobs > 1 else None
    if lock_dir:  # children compile concurrently and take turns timing (gpu_lock)
        env = concurrent_env(pathlib.Path(lock_dir.name) / "gpu.lock", env)

    def snapshot(pending: str) -> dict:
        return _result(args, plan, done, flops.results(), time.time() - start, pending)

    def finish(i: int, record: dict) -> None:  # called with `lock` held
        done[i] = record
        print(_progress_line(record, time.time() - start), flush=True)
        write(snapshot("pending"))

    def run_next_case() -> None:
        with lock:
            if stopped.is_set():
                return
            # The index is taken under the lock, so cases start (or are skipped) in plan order.
            i = next(order)
            case = plan[i]
            elapsed = time.time() - start
            if case["model"] in infer_oom:
                finish(i, {**case, "infer": "not run (OOM at a smaller size)", "train": "not run"})
                return
            if elapsed > args.budget_s:
                budget = "not run (time budget)"
                finish(i, {**case, "infer": budget, "train": budget})
                return
            case = {**case, "train": case["model"] not in train_oom}
            proc = _start_child(case, env)  # under the lock: a stopped sweep kills every child
            live.add(proc)
        # Hard stop: whatever runs at the budget gets GRACE_S more, then it is killed.
        res = _wait_child(proc, args.budget_s + GRACE_S - elapsed)
        with lock:
            live.discard(proc)
            if stopped.is_set():
                return
            res["wall_s"] = round(time.time() - start - elapsed, 1)
            if res.get("infer") == "OOM":
                infer_oom.add(case["model"])
            if res.get("train") == "OOM":
                train_oom.add(case["model"])
            finish(i, {**case, **res})

    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    completed = False
    try:
        for future in [pool.submit(run_next_case) for _ in plan]:
            future.result()
        completed = True
    finally:
        if not completed:  # an error, or SIGTERM (see main): no child outlives the sweep
            with lock:
                stopped.set()
                for proc in live:
                    proc.kill()
                write(snapshot("not run (benchmark stopped)"))
        pool.shutdown(wait=True, cancel_futures=True)
        try:
            flops.close(GRACE_S if completed else 0.0)
        finally:  # also when stopped while waiting for the FLOP counts: keep those that came
            if lock_dir:
                lock_dir.cleanup()
            result = snapshot("pending" if completed else "not run (benchmark stopped)")
            write(result)
    return result


def _result(args, plan: list, done: list, flops: dict, elapsed: float, pending: str) -> dict:
    """The result document: meta and one record per planned case (FLOPs merged in)."""
    cases = []
    for case, record in zip(plan, done, strict=True):
        c = dict(record) if record else {**case, "infer": pending, "train": pending}
        f = flops.get((c["model"], c["size"]), {})
        c.update({k: v for k, v in f.items() if k not in ("model", "size", "params")})
        c.setdefault("params", f.get("params"))
        cases.append(c)
    first = dict(next((c for c in cases if "device" in c), {}))
    for c in cases:  # recorded once, in meta
        for key in ("device", "platform", "jax", "jaxlib"):
            c.pop(key, None)
    n_done = sum(r is not None for r in done)
    return {
        "meta": {
            "device": first.get("device"),
            "platform": first.get("platform"),
            "jax": first.get("jax"),
            "jaxlib": first.get("jaxlib"),
            "git_sha": git_sha(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": "bfloat16 compute, float32 params",
            "bigla_impl": args.bigla_impl,
            "attention": args.attention,
            "token_multiple": args.token_multiple,
            "iters": args.iters,
            "warmup": args.warmup,
            "pairs": args.pairs,
            "smoke": args.smoke,
            "jobs": args.jobs,
            "cases_done": f"{n_done}/{len(plan)}",
            "total_s": round(elapsed, 1),
            "memory": "fresh process per (model, size); infer_peak = inference alone, "
            "train_peak = process peak after inference + training; *_xla_bytes = XLA estimate"
            + (
                f"; {args.jobs} processes at once (compiling concurrently, timing one at a "
                "time), no preallocation"
                if args.jobs > 1
                else ""
            ),
            "flops": "vig_jax.flops: XLA cost analysis of the batch-1 forward "
            "(ViG: chunked BiGLA); gmacs = xla_gflops / 2",
        },
        "cases": cases,
    }


def _progress_line(c: dict, elapsed: float) -> str:
    def part(mode):
        if c.get(mode) != "ok":
            return f"{mode} {c.get(mode)}"
        peak = c.get(f"{mode}_peak_bytes")
        mem = f", peak {peak / 2**30:.2f} GB" if peak else ""
        return f"{mode} {c[f'{mode}_img_s']:,.1f} img/s{mem}"

    return (
        f"[{elapsed:6.0f} s] {c['model']:>7} {c['size']:>5}² B{c['batch']:<4} "
        f"{part('infer')}; {part('train')}"
    )


# ----------------------------------------------------------------------------------------------
# Markdown.


def _num(c: dict, key: str, scale: float):
    """A case's value, or its status text when the mode did not run."""
    mode = key.split("_")[0]
    if mode in ("infer", "train") and c.get(mode) != "ok":
        return c.get(mode, "n/a")
    value = c.get(key)
    return None if value is None else value * scale


def _pair_cell(a, b, fmt: str, higher_is_better: bool) -> str:
    def show(x):
        if x is None:
            return "n/a"
        return x if isinstance(x, str) else format(x, fmt)

    cell = f"{show(a)} / {show(b)}"
    if isinstance(a, float | int) and isinstance(b, float | int) and a and b:
        cell += f" ({a / b if higher_is_better else b / a:.2f}×)"
    return cell


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# ViG vs DeiT across resolutions",
        "",
        f"{meta['device']} ({meta['platform']}), jax {meta['jax']}, "
        f"git {str(meta['git_sha'])[:10]}, "
        f"{meta['date_utc']}; {meta['dtype']}; ViG BiGLA `{meta['bigla_impl']}`, DeiT attention "
        f"`{meta['attention']}` (token multiple {meta['token_multiple']}); median of "
        f"{meta['iters']} runs after {meta['warmup']} warm-up calls"
        + ("; SMOKE run (depth-1 models, CPU)" if meta["smoke"] else "")
        + ".",
        "",
        "Cells: ViG / DeiT (ViG's advantage: speed ratio, or DeiT/ViG for memory and FLOPs). "
        "Peak GB: training = process peak after inference and training, each (model, size) in a "
        "fresh process. GMACs: batch-1 forward, XLA FLOPs / 2.",
    ]
    cols = [
        ("infer img/s", "infer_img_s", 1.0, ",.0f", True),
        ("train img/s", "train_img_s", 1.0, ",.1f", True),
        ("infer peak GB", "infer_peak_bytes", 2**-30, ".2f", False),
        ("train peak GB", "train_peak_bytes", 2**-30, ".2f", False),
        ("GMACs", "gmacs", 1.0, ".3g", False),
    ]
    by_key = {(c["model"], c["size"]): c for c in result["cases"]}
    for pair in meta["pairs"]:
        vig, deit = pair.split(":")
        lines += [
            "",
            f"## {vig} vs {deit}",
            "",
            "| size | batch | " + " | ".join(name for name, *_ in cols) + " |",
            "|---|---|" + "---|" * len(cols),
        ]
        sizes = sorted({c["size"] for c in result["cases"] if c["model"] in (vig, deit)})
        for size in sizes:
            a, b = by_key.get((vig, size), {}), by_key.get((deit, size), {})
            cells = [
                _pair_cell(_num(a, key, scale), _num(b, key, scale), fmt, better)
                for _, key, scale, fmt, better in cols
            ]
            lines.append(
                f"| {size}² | {a.get('batch', b.get('batch'))} | " + " | ".join(cells) + " |"
            )
    params = {c["model"]: c.get("params") for c in result["cases"] if c.get("params")}
    lines += ["", "Params: " + ", ".join(f"{m} {p / 1e6:.1f} M" for m, p in params.items()), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS), help="vig:deit names")
    parser.add_argument("--bigla-impl", choices=("pallas", "chunked"), default="pallas")
    parser.add_argument("--attention", choices=("cudnn", "xla"), default="cudnn")
    parser.add_argument(
        "--token-multiple",
        type=int,
        default=None,
        help="pad DeiT's attention sequence to a multiple of this (default: cudnn 64, xla 1)",
    )
    parser.add_argument("--iters", type=int, default=10, help="timed runs per mode (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--batch", type=int, default=None, help="override 128·(224/size)²")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help=f"start no case after this many seconds; a running one is killed {GRACE_S:.0f} s on",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="case processes at once: they compile concurrently and take turns timing",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/resolution"))
    parser.add_argument(
        "--smoke", action="store_true", help="CPU check: depth-1 models, tiny sizes"
    )
    parser.add_argument("--child-case", help=argparse.SUPPRESS)
    parser.add_argument("--child-flops", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_case:
        print_result(run_case(json.loads(args.child_case)))
        return
    if args.child_flops:
        run_flops(json.loads(args.child_flops))
        return
    if args.smoke:
        # Pallas and cuDNN need a GPU; exercise the padded-attention path with XLA instead.
        args.bigla_impl, args.attention = "chunked", "xla"
        args.token_multiple = args.token_multiple or 64
        if args.sizes == list(DEFAULT_SIZES):
            args.sizes = [32, 48]
        args.batch = args.batch or 2
    if args.token_multiple is None:
        args.token_multiple = 64 if args.attention == "cudnn" else 1
    for p in args.pairs:
        if p.count(":") != 1:
            parser.error(f"--pairs takes vig:deit names, got {p!r}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A time limit's SIGTERM stops the sweep: children are killed and the results so far are
    # written (unfinished cases "not run (benchmark stopped)"); the files are rewritten after
    # every case anyway, so even a SIGKILL leaves every finished case on disk.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = sweep(args, functools.partial(write_results, out))
    print(
        f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} "
        f"in {result['meta']['total_s']:.0f} s"
    )


def write_results(out: pathlib.Path, result: dict) -> None:
    """Writes `<out>.json` and `<out>.md`, each replaced at once (a reader never sees half)."""
    for suffix, text in (
        (".json", json.dumps(result, indent=1) + "\n"),
        (".md", to_markdown(result)),
    ):
        path = out.with_suffix(suffix)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
