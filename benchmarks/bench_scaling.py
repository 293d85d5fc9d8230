"""The real training step on 1..N devices: img/s, scaling efficiency, memory, loss agreement.

    python benchmarks/bench_scaling.py                       # data parallel on 1, 2, 4, 8 GPUs
    python benchmarks/bench_scaling.py --fsdp                # params and optimizer state sharded
    python benchmarks/bench_scaling.py --devices 1 --loss-steps 0 --out /tmp/train_step
                                                             # the full-recipe step on one GPU
    python benchmarks/bench_scaling.py --smoke               # CPU, 1 and 2 fake devices, tiny ViG

The step is `make_trainer(config).train_step` built from configs/<model>.py, the whole recipe
(random erasing, mixup/cutmix, label smoothing, drop path, AdamW with clipping), fed one fixed
synthetic uint8 batch already on the devices (the input pipeline is not measured). Each device
count N runs in a fresh process seeing only the first N devices (CUDA_VISIBLE_DEVICES; fake CPU
devices in --smoke), at global batch --per-device-batch × N: compile seconds, img/s (median of
--iters runs, benchmarks/harness.py), peak memory per device, the collectives in the compiled step.
Then --loss-steps steps at the same global batch --loss-batch for every N (same init, batch and
step keys; the lr warmup shortened to those steps, so that updates reach the recipe's peak lr): the
losses must agree with 1 device within LOSS_RTOL, otherwise N devices compute something else.
Efficiency = img/s(N) / (N × img/s(1)). Results: `<out>.json`, `<out>.md`
(default benchmarks/results/scaling).
"""

import argparse
import importlib.util
import os
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402

# bf16 keeps 8 significant bits; splitting the batch changes XLA's fusions and reduction order, so
# activations differ by a few bf16 ulps from step 0 and compound over the Adam updates. 2e-2 is ~5
# ulps (2^-8 each) on the loss: beyond it the runs differ in substance (wrong gradient averaging, a
# lost shard). float32 (the smoke runs) only reorders sums: 1e-4 leaves ample room.
LOSS_RTOL = {"bfloat16": 2e-2, "float32": 1e-4}
NUM_CLASSES = 1000
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
SMOKE = dict(per_device_batch=4, image_size=32, dtype="float32", bigla_impl="reference",
             iters=3, warmup=1, loss_steps=8, loss_batch=8)  # fmt: skip
SMOKE_MODEL = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def measure(case: dict, report) -> dict:
    """Throughput, per-device peaks and collectives, then the loss curve, on all visible devices."""
    import jax
    import numpy as np

    from vig_jax.train import sharding
    from vig_jax.train.trainer import make_trainer

    spec = importlib.util.spec_from_file_location(
        "cfg", harness.REPO / f"configs/{case['model']}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mesh = sharding.make_mesh()
    n = mesh.devices.size

    def trainer(batch: int):
        c = module.get_config()
        c.data.batch_size = c.data.eval_batch_size = batch
        c.data.image_size = case["image_size"]
        c.model.dtype, c.model.bigla_impl = case["dtype"], case["bigla_impl"]
        c.model.overrides.update(case["overrides"])
        c.mesh.fsdp = case["fsdp"]
        if case["overrides"]:  # the tiny model has no array >= 2^18 elements: shard from 2^10
            c.mesh.fsdp_min_size = 2**10
        c.optimizer.warmup_epochs = max(case["loss_steps"], 1)  # one "epoch" per step
        return make_trainer(c, mesh=mesh, num_classes=NUM_CLASSES, steps_per_epoch=1)

    def data(batch: int, seed: int):
        rng = np.random.default_rng(seed)
        local = {
            "image": rng.integers(0, 256, (batch, *[case["image_size"]] * 2, 3), dtype=np.uint8),
            "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
        }
        return sharding.global_batch(local, mesh)

    batch = case["per_device_batch"] * n
    t = trainer(batch)
    out = {"device": jax.devices()[0].device_kind, "devices": n, "global_batch": batch}
    state, x = t.init(jax.random.PRNGKey(0)), data(batch, 0)
    step, out["compile_s"] = harness.compile_jax(t.train_step, state, x)
    hlo = step.as_text()
    out["collectives"] = {op: len(re.findall(rf" {op}(?:-start)?\(", hlo)) for op in COLLECTIVES}
    holder = [state]

    def call():
        holder[0], metrics = step(holder[0], x)
        return metrics

    timing = harness.time_call(
        call, jax.block_until_ready, warmup=case["warmup"], iters=case["iters"]
    )
    out.update(step_ms=timing["ms"], img_s=batch / timing["ms"] * 1e3)
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in mesh.devices.flat]
    out["peak_gb"] = max(peaks) / 1e9 if all(peaks) else None
    report(out)
    holder[0] = state = x = None  # frees the donated state's successor before the loss run
    if case["loss_steps"]:
        if case["loss_batch"] != batch:
            t = trainer(case["loss_batch"])
            step = t.train_step
        state, x = t.init(jax.random.PRNGKey(0)), data(case["loss_batch"], 1)
        losses = []
        for _ in range(case["loss_steps"]):
            state, metrics = step(state, x)
            losses.append(float(metrics["loss"]))
        out["losses"] = losses
    return out


def markdown(doc: dict) -> str:
    a = doc["meta"]["args"]
    return (
        "\n".join(
            [
                f"# {a['model']} training step, {a['image_size']}², {a['dtype']}, "
                f"{'FSDP' if a['fsdp'] else 'data parallel'}, {a['per_device_batch']} per device",
                "",
                harness.meta_line(doc["meta"])
                + f"; bigla {a['bigla_impl']}; img/s from the median "
                f"of {a['iters']} runs; losses: {a['loss_steps']} steps at global batch "
                f"{a['loss_batch']} on every device count, tolerance {LOSS_RTOL[a['dtype']]:.0e}.",
                "",
                *harness.table(
                    doc["rows"],
                    [
                        ("devices", "devices", "d"),
                        ("global batch", "global_batch", "d"),
                        ("img/s", lambda r: r.get("img_s", r.get("status")), ",.0f"),
                        ("efficiency", "efficiency", ".3f"),
                        ("step ms", "step_ms", ".1f"),
                        ("peak GB / device (max)", "peak_gb", ".2f"),
                        ("loss max rel diff vs 1", "loss_rel_diff", ".1e"),
                        ("compile s", "compile_s", ".1f"),
                        (
                            "collectives",
                            lambda r: (
                                ", ".join(
                                    f"{k} {v}" for k, v in (r.get("collectives") or {}).items() if v
                                )
                                or "none"
                            ),
                            "",
                        ),
                    ],
                ),
            ]
        )
        + "\n"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--model", default="vig_s")
    p.add_argument("--per-device-batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(LOSS_RTOL))
    p.add_argument("--bigla-impl", default="pallas")
    p.add_argument("--iters", type=int, default=20, help="timed runs (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loss-steps", type=int, default=50, help="0: no loss curve")
    p.add_argument("--loss-batch", type=int, default=128, help="global batch of the loss curves")
    p.add_argument("--fsdp", action="store_true", help="shard params and optimizer state")
    p.add_argument("--timeout-s", type=float, default=1200.0, help="per device count")
    p.add_argument("--out", help="path stem (default benchmarks/results/scaling)")
    p.add_argument("--smoke", action="store_true", help="CPU: fake devices, tiny ViG, few steps")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
        args.devices = [n for n in args.devices if n <= 2]
        args.out = args.out or "/tmp/bench_scaling_smoke"
    if min(args.devices) < 1 or args.loss_steps < 0:
        p.error("--devices must be >= 1 and --loss-steps >= 0")
    if bad := [n for n in args.devices if args.loss_steps and args.loss_batch % n]:
        p.error(f"--loss-batch {args.loss_batch} must split evenly over devices {bad}")
    if not (harness.REPO / f"configs/{args.model}.py").exists():
        p.error(f"no configs/{args.model}.py")
    available = max(args.devices) if args.smoke else harness.probe_devices()["count"]
    if skipped := sorted(n for n in args.devices if n > available):
        harness.log(f"skipping device counts {skipped}: only {available} devices")
    out = args.out or harness.REPO / "benchmarks/results/scaling"
    results = harness.Results(out, harness.metadata(args), markdown)
    case = {k: vars(args)[k] for k in (*SMOKE, "model", "fsdp")}
    case["overrides"] = SMOKE_MODEL if args.smoke else {}
    for n in sorted(set(args.devices) - set(skipped)):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(n)))
        env = {"CUDA_VISIBLE_DEVICES": ",".join(visible.split(",")[:n])}
        if args.smoke:
            flags = f"{harness.SMOKE_ENV['XLA_FLAGS']} --xla_force_host_platform_device_count={n}"
            env = {**harness.SMOKE_ENV, "XLA_FLAGS": flags}
        row = results.measure({"devices": n}, measure, case, env=env, timeout_s=args.timeout_s)
        base = results.doc["rows"][0]
        if row.get("img_s") and base.get("img_s") and base["devices"] == 1:
            row["efficiency"] = row["img_s"] / (n * base["img_s"])
        if row.get("losses") and base.get("losses") and base["devices"] == 1:
            diffs = [
                abs(a - b) / abs(b) for a, b in zip(row["losses"], base["losses"], strict=True)
            ]
            row["loss_rel_diff"] = max(diffs)
            row["loss_agrees"] = max(diffs) <= LOSS_RTOL[args.dtype]
        results.write()
    results.done()
    print(results.markdown(results.doc))


if __name__ == "__main__":
    main()
