"""Multi-device scaling of the real ViG train step: img/s, efficiency, memory, loss agreement.

    python benchmarks/bench_scaling.py                        # GPU: ViG-S 224, 128/device, bf16
    python benchmarks/bench_scaling.py --fsdp                 # same, params/opt state sharded
    python benchmarks/bench_scaling.py --smoke --devices 1 2  # CPU: fake devices, tiny ViG

Each device count N of --devices (counts above the available devices are skipped) runs in a fresh
subprocess that sees only the first N devices (CUDA_VISIBLE_DEVICES on GPU,
--xla_force_host_platform_device_count=N on CPU), so the peak memory of each case is its own. In
it, two runs of `make_trainer(config).train_step` (the full recipe of configs/<model>.py: random
erasing, mixup/cutmix, label smoothing, drop path, AdamW with clipping):

1. Throughput: global batch = --per-device-batch x N, one fixed synthetic uint8 batch already on
   the devices (the input pipeline is not measured). Compile excluded; median over --steps steps
   after --warmup, each ended by block_until_ready. Then `peak_bytes_in_use` of every device
   of the mesh (None on CPU).
2. Loss curve: --loss-steps steps at the SAME global batch --loss-batch for every N (default 128,
   smaller than 128 x 8 so that one GPU holds it), same init seed, same fixed batch, same step
   keys; only how the batch is split over devices differs. The augmentations act on the global
   batch with sharding-invariant keys, so they are identical too (fresh mixup/cutmix, erasing and
   drop path every step, so the curve is not flat). The lr warmup is shortened to --loss-steps
   steps (steps_per_epoch = 1, warmup_epochs = loss steps): the updates ramp up to the recipe's
   peak lr (base_lr x batch / 512) instead of staying near 1% of it, so differences can grow.
   Run 1 uses this trainer too (the lr schedule does not change a step's cost), so where
   --loss-batch equals the throughput batch one compiled step serves both runs (e.g.
   --loss-batch 256 with 1 and 2 devices at 128/device: three compiles instead of four).

Efficiency = img/s(N) / (N x img/s(1)). Loss agreement = max over steps of
|loss_N - loss_1| / |loss_1|, checked against LOSS_RTOL (bf16: 2e-2, float32: 1e-4; see there).
Writes --out (default benchmarks/results/scaling.json; smoke: /tmp/bench_scaling_smoke.json) and
the same path with .md.
"""

import argparse
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.child_results import common_setting  # noqa: E402  (no JAX: the parent stays off the GPUs)

# Relative loss difference we accept between N devices and 1 device. bf16 keeps 8 significant bits
# (rounding error 2^-9 ~ 2e-3 per op); splitting the batch changes XLA's fusions and reduction
# order, so activations differ by a few bf16 ulps from step 0, and over 50 Adam updates those
# differences compound. 2e-2 is ~5 bf16 ulps (2^-8 = 3.9e-3 each) on the loss: beyond that the
# runs compute something different (wrong gradient averaging, a lost shard), not rounding.
# float32 (the smoke runs) only reorders sums of ~1e-7 relative error: 1e-4 leaves ample room.
LOSS_RTOL = {"bfloat16": 2e-2, "float32": 1e-4}
NUM_CLASSES = 1000
# Collective ops counted in the compiled step's HLO: a data-parallel step should need all-reduces
# (gradients) and little else; all-gathers of activations mean a computation ran unsharded.
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
SMOKE = {  # CPU smoke: tiny ViG (bench_train_step's overrides), 32 px, few steps, float32
    "per_device_batch": 4,
    "image_size": 32,
    "dtype": "float32",
    "bigla_impl": "reference",
    "steps": 3,
    "warmup": 1,
    "loss_steps": 8,
    "loss_batch": 8,
}


def scaling_efficiency(img_per_s: dict[int, float]) -> dict[int, float | None]:
    """{N: img/s(N) / (N * img/s(1))}; all None when the 1-device case was not measured."""
    base = img_per_s.get(1)
    return {n: (None if base is None else v / (n * base)) for n, v in sorted(img_per_s.items())}


def max_rel_diff(losses: list[float], reference: list[float]) -> float:
    """max_i |losses[i] - reference[i]| / |reference[i]| over two equally long loss curves."""
    if len(losses) != len(reference) or not losses:
        raise ValueError(
            f"need two non-empty curves of equal length, got {len(losses)}, {len(reference)}"
        )
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))


def child_env(n: int, platform_name: str, env: dict[str, str], *, smoke: bool) -> dict[str, str]:
    """Environment of the subprocess for N devices: only the first N devices visible."""
    env = dict(env)
    if platform_name == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        flags = f"{flags} --xla_force_host_platform_device_count={n}"
        if smoke:  # halves the CPU compile (~12 s -> ~5 s per step); smoke timings mean nothing
            flags += " --xla_backend_optimization_level=0"
        env["XLA_FLAGS"] = flags.strip()
    else:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(n)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:n])
    return env


def probe_devices(smoke: bool, wanted: int) -> tuple[str, int]:
    """(platform, device count), asked of a subprocess: the parent must not claim the GPUs."""
    if smoke:  # fake CPU devices exist in any number
        return "cpu", wanted
    code = "import jax; print(jax.default_backend(), jax.device_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    name, count = out.stdout.split()[-2:]
    return name, int(count)


def _config(args, batch: int):
    from benchmarks.bench_train_step import bench_config

    ns = argparse.Namespace(
        model=args.model,
        batch=batch,
        image_size=args.image_size,
        dtype=args.dtype,
        bigla_impl=args.bigla_impl,
        smoke=args.smoke,
    )
    c = bench_config(ns)
    c.mesh.fsdp = args.fsdp
    if args.smoke:  # the tiny model has no array >= 2^18 elements: shard from 2^10 to test FSDP
        c.mesh.fsdp_min_size = 2**10
    return c


def run_case(args, n: int, report=lambda partial: None) -> dict:
    """Throughput, per-device peak memory and the loss curve on the N visible devices.

    `report(result)` is called once the throughput is measured (with loss_curve None), so that a
    case stopped during its loss curve still leaves its throughput."""
    import jax
    import numpy as np

    from benchmarks.bench_train_step import compile_and_time, synthetic_batch
    from vig_jax.train import sharding
    from vig_jax.train.trainer import make_trainer, oom_hint

    if jax.device_count() != n:
        raise RuntimeError(f"expected {n} visible devices, JAX sees {jax.device_count()}")
    mesh = sharding.make_mesh()

    def curve_trainer(batch_size):  # lr warmup over the curve (steps_per_epoch = 1)
        config = _config(args, batch_size)
        config.optimizer.warmup_epochs = args.loss_steps
        return make_trainer(config, mesh=mesh, num_classes=NUM_CLASSES, steps_per_epoch=1)

    # The throughput run uses the loss curve's trainer too: the lr schedule does not change the
    # step's cost, and where both batches are equal the compiled step serves both runs.
    batch_size = args.per_device_batch * n
    trainer = curve_trainer(batch_size)
    with oom_hint():
        state = trainer.init(jax.random.PRNGKey(0))
        batch = sharding.global_batch(synthetic_batch(batch_size, args.image_size, 0), mesh)
        step, state, compile_s, times, _ = compile_and_time(
            trainer, state, batch, warmup=args.warmup, steps=args.steps
        )
    median = float(np.median(times))
    hlo = step.as_text()
    collectives = {op: len(re.findall(rf" {op}(?:-start)?\(", hlo)) for op in COLLECTIVES}
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in mesh.devices.flat]
    del state, batch
    result = {
        "devices": n,
        "global_batch": batch_size,
        "compile_s": compile_s,
        "step_ms_median": median * 1e3,
        "img_per_s": batch_size / median,
        "peak_gb_per_device": [None if p is None else p / 1e9 for p in peaks],
        "collectives": collectives,
        "loss_curve": None,
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }
    report(result)

    if args.loss_batch != batch_size:
        trainer = curve_trainer(args.loss_batch)
        step = trainer.train_step
    with oom_hint():
        state = trainer.init(jax.random.PRNGKey(0))
        batch = sharding.global_batch(synthetic_batch(args.loss_batch, args.image_size, 1), mesh)
        losses = []
        for _ in range(args.loss_steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    if not np.isfinite(losses).all():
        raise FloatingPointError(f"non-finite loss on {n} devices: {losses}")
    return {**result, "loss_curve": losses}


def run_in_subprocess(args, n: int, platform_name: str) -> dict:
    """`run_case(args, n)` in a fresh Python that sees only the first N devices. A child that
    fails or outlives --case-timeout-s gives what it reported so far plus an "error"."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "case.json"
        cmd = [sys.executable, __file__, *args.argv, "--case", str(n), "--case-out", str(out)]
        env = child_env(n, platform_name, os.environ, smoke=args.smoke)
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.case_timeout_s)
            error = f"exit code {proc.returncode}" if proc.returncode else None
        except subprocess.TimeoutExpired:
            error = f"timed out after {args.case_timeout_s:.0f} s"
        result = json.loads(out.read_text()) if out.exists() else {"devices": n}
        if error:
            result["error"] = error
        return result


def summarize(args, cases: list[dict], platform_name: str) -> dict:
    """The result document: cases with efficiency and loss agreement against 1 device."""
    eff = scaling_efficiency({c["devices"]: c["img_per_s"] for c in cases if "img_per_s" in c})
    ref = next((c.get("loss_curve") for c in cases if c["devices"] == 1), None)
    rtol = LOSS_RTOL[args.dtype]
    for c in cases:  # a case cut short (see run_in_subprocess) lacks some numbers: None there
        c["efficiency"] = eff.get(c["devices"])
        curve = c.get("loss_curve")
        c["loss_max_rel_diff"] = None if ref is None or curve is None else max_rel_diff(curve, ref)
        c["loss_agrees"] = (
            None if c["loss_max_rel_diff"] is None else c["loss_max_rel_diff"] <= rtol
        )
    return {
        "model": args.model,
        "smoke": args.smoke,
        "fsdp": args.fsdp,
        "image_size": args.image_size,
        "dtype": args.dtype,
        "bigla_impl": args.bigla_impl,
        "per_device_batch": args.per_device_batch,
        "steps_timed": args.steps,
        "warmup": args.warmup,
        "loss_steps": args.loss_steps,
        "loss_global_batch": args.loss_batch,
        "loss_rtol": rtol,
        "augment": "full recipe (random erasing, mixup/cutmix, label smoothing, drop path)",
        "platform": platform_name,
        "host": platform.platform(),
        "jax": next((c["jax"] for c in cases if "jax" in c), None),
        "device_kind": next((c["device_kind"] for c in cases if "device_kind" in c), None),
        "cases": cases,
    }


# Result fields that merged parts must share, and the argument each one was written from.
RUN_FIELDS = {
    "model": "model",
    "smoke": "smoke",
    "fsdp": "fsdp",
    "image_size": "image_size",
    "dtype": "dtype",
    "bigla_impl": "bigla_impl",
    "per_device_batch": "per_device_batch",
    "steps_timed": "steps",
    "warmup": "warmup",
    "loss_steps": "loss_steps",
    "loss_global_batch": "loss_batch",
}


def merged_args(args, parts: list[dict]):
    """`args` with the run settings of the result documents `parts`, which must agree on them.

    A part with only the 1-device case may differ in `fsdp`: on one device nothing is sharded,
    so its run is the baseline of a data-parallel and an FSDP scaling alike."""
    args = argparse.Namespace(**vars(args))
    multi = [p for p in parts if any(c["devices"] > 1 for c in p["cases"])]
    for field, name in RUN_FIELDS.items():
        voters = multi if field == "fsdp" and multi else parts
        setattr(args, name, common_setting(voters, field))
    return args


def markdown(result: dict) -> str:
    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    lines = [
        "| devices | global batch | img/s | efficiency | step ms | peak GB / device (max) "
        "| loss max rel diff vs 1 | compile s | collectives in the step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        if "img_per_s" not in c:
            lines.append(f"| {c['devices']} | {c.get('error', 'not measured')} ||||||||")
            continue
        peaks = [p for p in c["peak_gb_per_device"] if p is not None]
        counts = c.get("collectives") or {}  # absent in results written before it was recorded
        ops = ", ".join(f"{op} {k}" for op, k in counts.items() if k)
        ops = ops or ("none" if counts else "n/a")
        lines.append(
            f"| {c['devices']} | {c['global_batch']} | {c['img_per_s']:,.0f} "
            f"| {fmt(c['efficiency'], '.3f')} | {c['step_ms_median']:.1f} "
            f"| {fmt(max(peaks) if peaks else None, '.2f')} | {fmt(c['loss_max_rel_diff'], '.1e')} "
            f"| {c['compile_s']:.1f} | {ops} |"
        )
    errors = [f"{c['devices']} device(s): {c['error']}" for c in result["cases"] if "error" in c]
    r = result
    lines += [
        "",
        f"{r['model']} {r['image_size']}² {r['dtype']}, bigla {r['bigla_impl']}, "
        f"{'FSDP' if r['fsdp'] else 'data parallel'}, {r['per_device_batch']}/device, "
        f"{r['device_kind']}, jax {r['jax']}. img/s: median of {r['steps_timed']} steps after "
        f"{r['warmup']} warm-up. Loss: {r['loss_steps']} steps at global batch "
        f"{r['loss_global_batch']} on every device count, tolerance {r['loss_rtol']:.0e}.",
    ]
    if errors:
        lines += ["", "Cut short: " + "; ".join(errors) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--model", default="vig_s")
    p.add_argument("--per-device-batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(LOSS_RTOL))
    p.add_argument("--bigla-impl", default="pallas")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loss-steps", type=int, default=50)
    p.add_argument("--loss-batch", type=int, default=128, help="global batch of the loss curves")
    p.add_argument("--fsdp", action="store_true", help="shard params/opt state over the devices")
    p.add_argument("--smoke", action="store_true", help="CPU, fake devices, tiny ViG, few steps")
    p.add_argument(
        "--out",
        help="JSON path (.md beside it); default benchmarks/results/scaling.json "
        "(smoke: /tmp/bench_scaling_smoke.json)",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="no run: combine the cases of earlier results (e.g. 1 and 2 devices measured in "
        "separate calls, with the same other flags) into --out",
    )
    p.add_argument(
        "--case-timeout-s",
        type=float,
        default=1200.0,
        help="stop a device count's process after this long (its throughput, if measured, stays)",
    )
    # Internal: one device count, run by the parent in a subprocess.
    p.add_argument("--case", type=int, help=argparse.SUPPRESS)
    p.add_argument("--case-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    if min(args.devices) < 1 or args.steps < 1 or args.warmup < 1 or args.loss_steps < 1:
        p.error("--devices, --steps, --warmup and --loss-steps must be >= 1")
    bad = [n for n in args.devices if args.loss_batch % n]
    if bad:
        p.error(f"--loss-batch {args.loss_batch} must split evenly over devices {bad}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.case is not None:
        case_out = pathlib.Path(args.case_out)
        result = run_case(args, args.case, report=lambda r: case_out.write_text(json.dumps(r)))
        case_out.write_text(json.dumps(result))
        return
    default = (
        "/tmp/bench_scaling_smoke.json" if args.smoke else ROOT / "benchmarks/results/scaling.json"
    )
    out = pathlib.Path(args.out or default)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(cases, platform_name, skipped):
        result = summarize(args, cases, platform_name)
        result["skipped_devices"] = skipped
        out.write_text(json.dumps(result, indent=1) + "\n")
        table = markdown(result)
        out.with_suffix(".md").write_text(table)
        return table

    if args.merge:
        parts = [json.loads(pathlib.Path(f).read_text()) for f in args.merge]
        cases = sorted((c for part in parts for c in part["cases"]), key=lambda c: c["devices"])
        if len({c["devices"] for c in cases}) != len(cases):
            raise SystemExit(f"--merge: a device count appears twice in {args.merge}")
        try:
            args = merged_args(args, parts)
        except ValueError as e:
            raise SystemExit(f"--merge {args.merge}: {e}") from None
        platform_name, skipped = parts[0]["platform"], []
    else:
        platform_name, available = probe_devices(args.smoke, max(args.devices))
        counts = sorted(set(n for n in args.devices if n <= available))
        skipped = sorted(set(args.devices) - set(counts))
        if skipped:
            print(
                f"skipping device counts {skipped}: only {available} {platform_name} devices",
                flush=True,
            )
        cases = []
        for n in counts:
            print(f"--- {n} device(s)", flush=True)
            cases.append(run_in_subprocess(args, n, platform_name))
            write(cases, platform_name, skipped)  # every finished case is on disk at once
    print(write(cases, platform_name, skipped))


if __name__ == "__main__":
    main()
