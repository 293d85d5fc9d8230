"""Train-step throughput and peak memory of ViG through the real jitted, sharded step (issue 6).

    python benchmarks/bench_train_step.py                 # GPU: ViG-S 224, batch 128, bf16, pallas
    python benchmarks/bench_train_step.py --smoke         # CPU check: tiny ViG, batch 8, 32 px

The step is `vig_jax.train.trainer.make_trainer(config).train_step` built from configs/<model>.py
(full recipe: random erasing, mixup/cutmix, label smoothing, AdamW with clipping), fed a fixed
synthetic uint8 batch already on the device (the input pipeline is not measured). Parity first:
the model's logits with the benchmarked BiGLA impl against `chunked` at the initial params.
Compilation is timed separately and excluded; each timed step ends with block_until_ready; the
reported time is the median over --steps steps after --warmup. Peak memory is the device's
`peak_bytes_in_use` (process-wide, includes the warm-up; None on CPU).
Writes benchmarks/results/train_step.json and .md (smoke: /tmp/bench_train_step_smoke/).
"""

import argparse
import importlib.util
import json
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.child_results import git_sha  # noqa: E402
from vig_jax.train import sharding  # noqa: E402
from vig_jax.train.trainer import build_model, make_trainer  # noqa: E402

NUM_CLASSES = 1000
STEPS_PER_EPOCH = 1251  # ImageNet at batch 1024; only shapes the lr schedule


def load_config(model: str):
    path = ROOT / "configs" / f"{model}.py"
    spec = importlib.util.spec_from_file_location(f"configs.{model}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def bench_config(args):
    c = load_config(args.model)
    c.data.batch_size = args.batch
    c.data.eval_batch_size = args.batch
    c.data.image_size = args.image_size
    c.model.dtype = args.dtype
    c.model.bigla_impl = args.bigla_impl
    if args.smoke:
        c.model.overrides.update({"embed_dim": 32, "depth": 1, "num_heads": 2})
    return c


def parity(config, impl: str) -> float:
    """max |logits(impl) - logits(chunked)| / max |logits(chunked)| on 4 images, float32."""
    key = jax.random.PRNGKey(1)
    s = config.data.image_size
    images = jax.random.normal(key, (4, s, s, 3), jnp.float32)
    outs = []
    for name in (impl, "chunked"):
        c = config.copy_and_resolve_references()
        c.model.bigla_impl, c.model.dtype = name, "float32"
        model = build_model(c, NUM_CLASSES)
        params = jax.jit(lambda k, m=model: m.init(k, images[:1], train=False))(key)
        outs.append(np.asarray(jax.jit(lambda p, m=model: m.apply(p, images, train=False))(params)))
    return float(np.abs(outs[0] - outs[1]).max() / np.abs(outs[1]).max())


def synthetic_batch(batch: int, size: int, seed: int) -> dict:
    """A fixed random batch as the data pipeline yields it: image uint8 [B, S, S, 3], label [B]."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
    }


def compile_and_time(trainer, state, batch, *, warmup: int, steps: int):
    """Compiles `trainer.train_step` for (state, batch), then runs warmup + steps steps on it.

    Returns:
      (compiled step, state, compile seconds, wall seconds of each of the `steps` timed steps,
       loss of every step).
    """
    t0 = time.perf_counter()
    step = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    return step, state, compile_s, times, losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vig_s")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--bigla-impl", default="pallas")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fsdp", action="store_true", help="shard params/opt state (multi-GPU)")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny model, batch 8, 32 px")
    parser.add_argument(
        "--out", help="directory; default benchmarks/results (smoke: /tmp/bench_train_step_smoke)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.image_size, args.dtype = 8, 32, "float32"
        args.bigla_impl, args.steps, args.warmup = "reference", 5, 1
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")

    config = bench_config(args)
    config.mesh.fsdp = args.fsdp
    err = parity(config, args.bigla_impl)
    print(f"parity {args.bigla_impl} vs chunked: relative logits error {err:.2e}", flush=True)

    mesh = sharding.make_mesh()
    trainer = make_trainer(
        config, mesh=mesh, num_classes=NUM_CLASSES, steps_per_epoch=STEPS_PER_EPOCH
    )
    state = trainer.init(jax.random.PRNGKey(0))
    s = args.image_size
    batch = sharding.global_batch(synthetic_batch(args.batch, s, 0), mesh)
    _, state, compile_s, times, losses = compile_and_time(
        trainer, state, batch, warmup=args.warmup, steps=args.steps
    )
    print(f"compiled in {compile_s:.1f} s", flush=True)
    if not np.isfinite(losses).all():
        raise FloatingPointError(f"non-finite loss in the benchmark: {losses}")
    median = float(np.median(times))
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    result = {
        "model": args.model,
        "smoke": args.smoke,
        "batch": args.batch,
        "image_size": s,
        "dtype": args.dtype,
        "bigla_impl": args.bigla_impl,
        "fsdp": args.fsdp,
        "params": n_params,
        "parity_rel_err": err,
        "compile_s": compile_s,
        "step_ms_median": median * 1e3,
        "step_ms_min": float(np.min(times)) * 1e3,
        "img_per_s": args.batch / median,
        "peak_gb": None if peak is None else peak / 1e9,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "steps_timed": args.steps,
        "devices": [d.device_kind for d in jax.devices()],
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "git_sha": git_sha(),
    }
    default = "/tmp/bench_train_step_smoke" if args.smoke else ROOT / "benchmarks" / "results"
    out = pathlib.Path(args.out or default)
    out.mkdir(parents=True, exist_ok=True)
    stem = "train_step_smoke" if args.smoke else "train_step"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    peak_s = "n/a" if result["peak_gb"] is None else f"{result['peak_gb']:.2f}"
    table = (
        "| model | batch | size | dtype | bigla | devices | img/s | step ms (median) | peak GB "
        "| compile s |\n|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {args.model} | {args.batch} | {s} | {args.dtype} | {args.bigla_impl} "
        f"| {len(jax.devices())}x {jax.devices()[0].device_kind} | {result['img_per_s']:,.0f} "
        f"| {result['step_ms_median']:.1f} | {peak_s} | {compile_s:.1f} |\n\n"
        f"jax {jax.__version__}, git {result['git_sha'][:10]}, median of {args.steps} steps "
        f"after {args.warmup} warm-up, parity vs chunked {err:.1e}.\n"
    )
    (out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
