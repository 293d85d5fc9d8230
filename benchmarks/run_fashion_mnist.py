"""Fashion-MNIST end to end: train.py with configs/fashion_mnist.py, then its learning curve.

    python benchmarks/run_fashion_mnist.py --workdir /tmp/vig_fmnist [--config.optimizer.epochs=10]

Runs `python train.py --config configs/fashion_mnist.py --workdir WORKDIR [--config.* overrides]`
(its output streams through; a SIGTERM is passed on to it, and the epochs it finished are still
summarised), then reads WORKDIR/metrics.jsonl and writes `<out>.json` (final and best test top-1,
the wall seconds of the whole train.py process, steps, command, device) and `<out>.png` (train loss
per epoch and test top-1 per evaluation). --source-dir sets $VIG_FASHION_MNIST_DIR, where
`vig_jax.data.fashion_mnist` looks for the four IDX files. A workdir holding a previous run resumes
it (train.py's rule): use a fresh one for a clean timing.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402

TRAIN_EXAMPLES = 60_000


def summarise(metrics: list[dict], steps_per_epoch: int) -> dict:
    """Train loss per epoch (mean of the logged windows in it), test top-1 per evaluation.

    A resumed run logs some steps twice: the last line per (step, kind) wins."""
    train = {m["step"]: m["train/loss"] for m in metrics if "train/loss" in m}
    evals = {m["step"]: m["eval/top1"] for m in metrics if "eval/top1" in m}
    if not evals:
        raise SystemExit("metrics.jsonl holds no eval/top1: the run did not reach an evaluation")
    by_epoch: dict[int, list[float]] = {}
    for step, loss in sorted(train.items()):
        by_epoch.setdefault((step - 1) // steps_per_epoch + 1, []).append(loss)
    best = max(evals, key=evals.get)
    return {
        "final_test_top1": evals[max(evals)],
        "best_test_top1": evals[best],
        "best_epoch": best / steps_per_epoch,
        "steps": max(max(evals), max(train, default=0)),
        "steps_per_epoch": steps_per_epoch,
        "test_top1": {s / steps_per_epoch: evals[s] for s in sorted(evals)},
        "train_loss_per_epoch": {e: sum(v) / len(v) for e, v in sorted(by_epoch.items())},
    }


def plot(summary: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    losses, top1 = summary["train_loss_per_epoch"], summary["test_top1"]
    ax_loss.plot(list(losses), list(losses.values()), marker="o", ms=3)
    ax_loss.set(xlabel="epoch", ylabel="train loss (smoothed labels)", title="train loss")
    ax_acc.plot(list(top1), [100 * v for v in top1.values()], marker="o", ms=3)
    ax_acc.axhline(94.0, color="grey", ls="--", lw=1, label="94% target")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="test accuracy")
    ax_acc.legend(loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="train.py workdir (fresh: a clean timing)")
    p.add_argument("--out", default=str(harness.REPO / "benchmarks/results/fashion_mnist"))
    p.add_argument("--source-dir", help="directory of the four IDX .gz files")
    args, overrides = p.parse_known_args(argv)
    if bad := [a for a in overrides if not a.startswith("--config.")]:
        p.error(f"unrecognised arguments (only --config.* overrides pass through): {bad}")
    if args.source_dir:
        os.environ["VIG_FASHION_MNIST_DIR"] = str(pathlib.Path(args.source_dir).resolve())
    config = harness.REPO / "configs/fashion_mnist.py"
    spec = importlib.util.spec_from_file_location("fashion_mnist_config", config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    batch = re.findall(r"--config\.data\.batch_size=(\d+)", " ".join(overrides))
    batch = int(batch[-1]) if batch else module.get_config().data.batch_size
    cmd = [sys.executable, "train.py", f"--config={config}", f"--workdir={args.workdir}"]
    start, stopped = time.perf_counter(), []
    child = subprocess.Popen(cmd + overrides, cwd=harness.REPO)
    signal.signal(signal.SIGTERM, lambda *_: (stopped.append(True), child.terminate()))
    rc = child.wait()
    wall = time.perf_counter() - start
    metrics_path = pathlib.Path(args.workdir) / "metrics.jsonl"
    if rc and not metrics_path.exists():
        raise SystemExit(f"train.py failed with exit code {rc}")
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    summary = summarise(metrics, TRAIN_EXAMPLES // batch)
    device = harness.probe_devices()
    record = {
        **summary,
        "stopped_early": bool(stopped) or rc != 0,  # a time limit's SIGTERM, or a failed exit
        "wall_s": round(wall, 1),  # train.py: start-up, data preparation, compile, training
        "command": " ".join(cmd[1:] + overrides),
        "device": f"{device['count']} x {device['kind']}",
        **harness.metadata(args),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    title = (
        f"ViG-H small on Fashion-MNIST: final {100 * summary['final_test_top1']:.2f}%, best "
        f"{100 * summary['best_test_top1']:.2f}%, {wall:.0f} s on {device['kind']}"
    )
    plot(
        summary,
        out.with_suffix(".png"),
        title + ("\nstopped early" if record["stopped_early"] else ""),
    )
    harness.log(f"{title} -> {out}.json, .png")


if __name__ == "__main__":
    main()
