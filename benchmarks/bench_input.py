"""Host input pipeline throughput on ImageNet-like JPEGs, through grain to the device (issue 19).

    python benchmarks/bench_input.py --out-dir OUT --work-dir /tmp/bench_input  # 16 cores: ~3-4 min
    python benchmarks/bench_input.py --out-dir /tmp/bench_input --smoke         # CPU check, ~1 min
    python benchmarks/bench_input.py --out-dir OUT --workers 4,8,16 --threads 1,2,4 --transport

1. Generates a folder of ImageNet-like JPEGs (`vig_jax.data.imagenet_like`: mean ~400x360,
   quality 85-95; ~1 GB for the default 12,000) under WORK/jpegs and prepares it with
   `vig_jax.data.prepare` (the path users take; timed: images/s overall and per worker process)
   into WORK/tfds (WORK: --work-dir, default OUT). Both are reused when present, so a second run
   starts measuring at once.
2. Per-image CPU cost in this process (no grain, `time.process_time`, best of 3 passes): reading
   the stored bytes, decoding them in full, the training transform (DeiT: random-resized crop 224,
   flip, RandAugment m9), the same without RandAugment, RandAugment alone (on 224 crops) and the
   eval transform (resize to 256, centre crop 224). 1000 / ms is the img/s one core gives.
3. End to end: `make_train_iterator` (what training uses) for every pair of --workers (grain worker
   processes; default 1, 2, 4, 8, 16) and --threads (read threads per process; default the
   pipeline's), each batch placed on the device as the trainer does (`sharding.global_batch`) and
   normalised there, ending in block_until_ready. Batches of the first --warmup seconds are
   excluded: at the start every read thread of every worker finishes its first batch at about the
   same time, a burst of up to workers x threads batches that would inflate a short window. img/s is
   then counted over --seconds of steady state. Evaluation is timed as a stream of `EvalTransform`
   batches over the repeated split (the evaluation's transform and grain path without its
   end-of-pass padding), so every worker count is timed at steady state; a real pass adds the
   workers' start-up (seconds) once per evaluation. With --transport, also the training pipeline's
   shape (batched MapDataset -> to_iter_dataset -> mp_prefetch, the same workers and threads) with a
   map that returns a pre-made image (no read, decode or transform): the ceiling that moving batches
   from the workers to this process and onto the device sets (mode "transport"). Last, mode
   "eval_replay": one pass of evaluation batches written to disk and replayed memory-mapped
   (`config.data.eval_cache_dir`, `vig_jax.data.batch_store`), timed once.

Writes OUT/input.json and OUT/input.md.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time

import grain
import jax
import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import git_sha  # noqa: E402
from configs import common  # noqa: E402
from vig_jax import data  # noqa: E402
from vig_jax.data import imagenet_like, mix, prepare, sources, transforms, writer  # noqa: E402
from vig_jax.data.batch_store import BatchStore  # noqa: E402
from vig_jax.data.pipeline import READ_THREADS, TrainIterator, iterate  # noqa: E402
from vig_jax.train import sharding  # noqa: E402

DATASET = "input_bench"
DEIT = common.deit_host_augment().to_dict()  # the training recipe's host augmentation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True, help="input.json and input.md go here")
    p.add_argument("--work-dir", default=None, help="generated and prepared data (default OUT)")
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny dataset, 0-1 workers")
    p.add_argument("--workers", default=None, help="comma-separated, default 1,2,4,8,16")
    p.add_argument(
        "--threads",
        default=str(READ_THREADS),
        help=f"read threads per process, comma-separated (default {READ_THREADS})",
    )
    p.add_argument("--transport", action="store_true", help="also time batches of pre-made images")
    p.add_argument("--images", type=int, default=None, help="train images (default 12000)")
    p.add_argument("--batch", type=int, default=None, help="default 128 (smoke 8)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=None, help="steady state per run (6)")
    p.add_argument("--warmup", type=float, default=None, help="seconds excluded first (5)")
    return p.parse_args(argv)


def _counts(text: str, name: str, least: int) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: {name} {text!r}: need comma-separated integers") from None
    if min(counts) < least:
        raise SystemExit(f"error: {name} {text!r}: each must be >= {least}")
    return counts


def settings(args) -> dict:
    smoke = args.smoke
    return {
        "workers": _counts(args.workers or ("0,1" if smoke else "1,2,4,8,16"), "--workers", 0),
        "threads": _counts(args.threads, "--threads", 1),
        "transport": args.transport,
        "images": args.images or (40 if smoke else 12000),
        "batch": args.batch or (8 if smoke else 128),
        "image_size": args.image_size,
        "seconds": args.seconds or (1.0 if smoke else 6.0),
        "warmup": args.warmup if args.warmup is not None else (0.5 if smoke else 5.0),
        "stage_images": 16 if smoke else 300,
        # Generating and preparing in this process spares the smoke run worker start-up.
        "prepare_workers": 0 if smoke else os.cpu_count(),
    }


def make_dataset(work: pathlib.Path, images: int, workers: int) -> dict:
    """Generates and prepares the JPEG set unless present; returns sizes and prepare timing."""
    jpegs, data_dir = work / "jpegs", work / "tfds"
    classes = 10
    per_class = max(1, images // classes)
    stamp = jpegs / f".complete-{classes}x{per_class}"
    if not stamp.exists():
        start = time.perf_counter()
        imagenet_like.generate_folder(
            jpegs, classes=classes, train_per_class=per_class, val_per_class=2, num_workers=workers
        )
        print(f"generated {classes * per_class} JPEGs in {time.perf_counter() - start:.1f} s")
        stamp.touch()
    result = {}
    if not writer.is_prepared(data_dir, DATASET, "1.0.0") or not (work / "prepare.json").exists():
        report = prepare.prepare_folder(
            jpegs, name=DATASET, data_dir=data_dir, num_workers=workers, overwrite=True
        )
        print(report.summary())
        total = sum(report.num_examples.values()) + len(report.skipped)
        result = {
            "prepare_images": total,
            "prepare_workers": max(workers, 1),
            "prepare_seconds": report.seconds,
            "prepare_img_per_s": total / report.seconds,
            "prepare_img_per_s_per_worker": total / report.seconds / max(workers, 1),
        }
        (work / "prepare.json").write_text(json.dumps(result))
    result = json.loads((work / "prepare.json").read_text())
    files = sorted((jpegs / "train").rglob("*.JPEG"))[:200]
    sizes = np.array([transforms.open_image(f.read_bytes()).size for f in files])
    result["mean_width_height"] = sizes.mean(0).round().tolist()
    result["mean_jpeg_kb"] = float(np.mean([f.stat().st_size for f in files]) / 1e3)
    return result


def stage_costs(data_dir: str, n: int, image_size: int) -> dict:
    """ms of CPU per image for each host stage, in this process."""
    source = sources.data_source(DATASET, data_dir, "train", decode_images=False)
    train = transforms.TrainTransform.from_config(DEIT, image_size)
    no_ra = transforms.TrainTransform.from_config({**DEIT, "randaugment": None}, image_size)
    evaluate = transforms.EvalTransform(image_size, 0.875)
    rng = np.random.default_rng(0)
    crops = [Image.fromarray(no_ra(source[i % len(source)], rng)["image"]) for i in range(n)]
    stages = {
        "read": lambda i: source[i],
        "decode": lambda i: transforms.decode_rgb(source[i]["image"]),
        "train": lambda i: train(source[i], rng),
        "train_without_randaugment": lambda i: no_ra(source[i], rng),
        "randaugment": lambda i: train.randaugment(crops[i], rng),
        "eval": lambda i: evaluate(source[i]),
    }
    costs = {}
    for name, fn in stages.items():
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            for i in range(n):
                fn(i % len(source))
            best = min(best, (time.process_time() - start) / n)
        costs[name] = best * 1e3
        print(f"stage {name}: {costs[name]:.2f} ms/img ({1e3 / costs[name]:.0f} img/s per core)")
    return costs


def _device_ready(mesh, normalise):
    def put(batch):
        arrays = sharding.global_batch({"image": batch["image"], "label": batch["label"]}, mesh)
        return normalise(arrays["image"]).block_until_ready()

    return put


def _time_stream(it, s, put) -> dict:
    """Images and seconds of steady state of the infinite batch iterator `it` (closed after); the
    batches of the first s["warmup"] seconds (the workers' start and first burst) do not count."""
    try:
        put(next(it))
        warm = time.perf_counter()
        while time.perf_counter() - warm < s["warmup"]:
            put(next(it))
        start, batches = time.perf_counter(), 0
        while time.perf_counter() - start < s["seconds"] or batches < 2:
            put(next(it))
            batches += 1
        elapsed = time.perf_counter() - start
    finally:
        it.close()
    return {"images": batches * s["batch"], "seconds": elapsed}


def run_train(data_dir, workers, threads, s, put) -> dict:
    it = data.make_train_iterator(
        dataset=DATASET,
        data_dir=data_dir,
        split="train",
        image_size=s["image_size"],
        batch_size=s["batch"],
        seed=0,
        augment=DEIT,
        shard_index=0,
        shard_count=1,
        num_workers=workers,
        read_threads=threads,
    )
    return _time_stream(it, s, put)


@dataclasses.dataclass(frozen=True)
class _PremadeExample:
    """The same uint8 image and label for every index: batches cost only stacking and transport."""

    image: np.ndarray

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.image, "label": np.int32(index % 10)}


def run_transport(data_dir, workers, threads, s, put) -> dict:
    size = s["image_size"]
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)
    batches = grain.MapDataset.range(s["batch"]).map(_PremadeExample(image)).repeat(None)
    batches = batches.batch(s["batch"], drop_remainder=True)
    return _time_stream(TrainIterator(batches, workers, threads), s, put)


def run_eval(data_dir, workers, threads, s, put) -> dict:
    source = sources.data_source(DATASET, data_dir, "train", decode_images=False)
    transform = transforms.EvalTransform(s["image_size"], 0.875)
    batches = grain.MapDataset.source(source).map(transform).repeat(None)
    batches = batches.batch(s["batch"], drop_remainder=True)
    return _time_stream(TrainIterator(batches, workers, threads), s, put)


def run_eval_replay(data_dir, workers, threads, s, put) -> dict:
    """Evaluation batches replayed from disk (`config.data.eval_cache_dir`): one pass of the eval
    transform over the split is written to a `BatchStore` (with `workers` workers), then its
    batches are read back memory-mapped, cycled, and timed as the other modes."""
    source = sources.data_source(DATASET, data_dir, "train", decode_images=False)
    key = {"bench": DATASET, "images": len(source), "size": s["image_size"], "batch": s["batch"]}
    store = BatchStore(pathlib.Path(data_dir).parent / "eval_replay", key)
    if not store.complete():
        transform = transforms.EvalTransform(s["image_size"], 0.875)
        batches = grain.MapDataset.source(source).map(transform)
        with store.writer() as written:
            for batch in iterate(batches.batch(s["batch"], drop_remainder=True), workers, threads):
                written.add(batch)
            written.commit()

    def cycle():
        while True:
            yield from store.read()

    return _time_stream(cycle(), s, put)


def markdown(result: dict) -> str:
    lines = [
        f"# Input pipeline ({result['device']}, {result['cpu_count']} CPUs, "
        f"{result['settings']['image_size']} px, batch {result['settings']['batch']})",
        "",
        f"Dataset: {result['dataset']['prepare_images']} generated JPEGs, mean "
        f"{result['dataset']['mean_width_height']} px, {result['dataset']['mean_jpeg_kb']:.0f} KB. "
        f"Prepare: {result['dataset']['prepare_img_per_s']:.0f} images/s with "
        f"{result['dataset']['prepare_workers']} processes "
        f"({result['dataset']['prepare_img_per_s_per_worker']:.0f} per process).",
        "",
        "| stage (one core, no grain) | ms/img | img/s |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.2f} | {1e3 / v:.0f} |" for k, v in result["stage_ms"].items()]
    lines += [
        "",
        "| mode | workers | threads | img/s | img/s per worker |",
        "|---|---|---|---|---|",
    ]
    for row in result["runs"]:
        per = row["img_per_s"] / max(row["workers"], 1)
        lines.append(
            f"| {row['mode']} | {row['workers']} | {row['threads']} | {row['img_per_s']:.0f} "
            f"| {per:.0f} |"
        )
    lines += ["", f"git {result['git_sha']}, jax {result['jax']}, Python {result['python']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    s = settings(args)
    out = pathlib.Path(args.out_dir).expanduser()
    work = pathlib.Path(args.work_dir).expanduser() if args.work_dir else out
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = str(work / "tfds")
    dataset = make_dataset(work, s["images"], s["prepare_workers"])
    costs = stage_costs(data_dir, s["stage_images"], s["image_size"])
    mesh = sharding.make_mesh()
    normalise = jax.jit(lambda x: mix.normalize(x, mix.IMAGENET_MEAN, mix.IMAGENET_STD))
    put = _device_ready(mesh, normalise)
    modes = [("train", run_train), ("eval", run_eval)]
    if s["transport"]:
        modes.append(("transport", run_transport))
    modes.append(("eval_replay", run_eval_replay))
    runs = []
    for mode, run in modes:
        # The replay reads no pipeline: timed once (its workers only write the store first).
        for workers in s["workers"][-1:] if mode == "eval_replay" else s["workers"]:
            for threads in s["threads"][:1] if mode == "eval_replay" else s["threads"]:
                r = run(data_dir, workers, threads, s, put)
                row = {"mode": mode, "workers": workers, "threads": threads, **r}
                row["img_per_s"] = r["images"] / r["seconds"]
                runs.append(row)
                print(
                    f"{mode} workers={workers} threads={threads}: {row['img_per_s']:.0f} img/s",
                    flush=True,
                )
    result = {
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "settings": s,
        "dataset": dataset,
        "stage_ms": costs,
        "runs": runs,
        "git_sha": git_sha(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    (out / "input.json").write_text(json.dumps(result, indent=2))
    (out / "input.md").write_text(markdown(result))
    print(markdown(result))
    print(f"bench_input: {time.perf_counter() - started:.0f} s in all; wrote {out / 'input.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
