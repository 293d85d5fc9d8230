"""Fashion-MNIST end to end (issue 9): train.py with configs/fashion_mnist.py, then curve + summary.

    python benchmarks/run_fashion_mnist.py --workdir /tmp/vig_fmnist --out-dir "$OUT" \
        --source-dir .carry/fashion-mnist [--config.optimizer.epochs=10 ...]

Runs `python train.py --config configs/fashion_mnist.py --workdir WORKDIR [overrides]` in a
subprocess (output streamed through), then reads WORKDIR/metrics.jsonl and writes to --out-dir:
- fashion_mnist.png: train loss (mean per epoch) and test top-1 per evaluation, against epochs;
- fashion_mnist.json: final and best test top-1, wall time, steps, command, device, overrides;
- fashion_mnist_metrics.jsonl: a copy of the raw metrics.
Any argument starting with --config. is passed to train.py unchanged. --source-dir sets
$VIG_FASHION_MNIST_DIR for train.py (where `vig_jax.data.fashion_mnist` looks for the IDX files).
A workdir holding a previous run resumes it (train.py's rule); use a fresh one for a clean timing.
"""

import argparse
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Own flags, plus the --config.* overrides for train.py (anything else is an error)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="train.py workdir (fresh: clean timing)")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT), help="PNG/JSON destination")
    parser.add_argument("--source-dir", help="directory of the four IDX .gz files")
    parser.add_argument("--config", default="configs/fashion_mnist.py", help="config file")
    parser.add_argument(
        "--from-metrics",
        help="skip training: summarise and plot this metrics.jsonl (e.g. one copied back from a "
        "GPU run) with --wall-s and --device as recorded there",
    )
    parser.add_argument("--wall-s", type=float, help="with --from-metrics: the run's wall time")
    parser.add_argument("--device", help="with --from-metrics: the device the run used")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments (only --config.* overrides pass through): {bad}")
    return args, rest


def device_description() -> str:
    """E.g. "1 x NVIDIA H100 80GB HBM3 (gpu)", from a short subprocess (keeps JAX out of here)."""
    code = (
        "import jax; d = jax.devices(); "
        "print(f'{len(d)} x {d[0].device_kind} ({d[0].platform}), jax {jax.__version__}')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def schedule(config_path: str, overrides: list[str]) -> tuple[int, int]:
    """(optimizer steps per epoch, planned total steps) of the run, via the config, as the train
    loop computes them."""
    code = (
        "import sys; from absl import flags; from ml_collections import config_flags\n"
        "c = config_flags.DEFINE_config_file('config', None)\n"
        "flags.FLAGS(sys.argv)\n"
        "from vig_jax import data\n"
        "from vig_jax.train import optim\n"
        "d = c.value.data\n"
        "info = data.dataset_info(d.dataset, d.data_dir)\n"
        "spe = optim.steps_per_epoch(info.num_examples[d.train_split], d.batch_size)\n"
        "total = c.value.loop.total_steps or optim.schedule_steps(c.value.optimizer, spe)\n"
        "print(spe, total)\n"
    )
    argv = [f"--config={config_path}", *overrides]
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT
    )
    if out.returncode:
        raise RuntimeError(f"reading the config failed:\n{out.stderr}")
    spe, total = out.stdout.strip().splitlines()[-1].split()
    return int(spe), int(total)


def read_metrics(path: pathlib.Path) -> list[dict]:
    """The JSON lines of train.py's metrics.jsonl, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(metrics: list[dict], spe: int) -> dict:
    """Per-epoch train loss, test top-1 per evaluation, final and best top-1.

    `metrics` are metrics.jsonl lines; a resumed run logs some steps twice, so the last line per
    (step, kind) wins. Train loss of epoch e is the mean of the logged window means whose step
    falls in epoch e (logged windows are equal-sized except at the end).
    """
    train, evals = {}, {}
    for m in metrics:
        if "train/loss" in m:
            train[m["step"]] = m["train/loss"]
        if "eval/top1" in m:
            evals[m["step"]] = m["eval/top1"]
    if not evals:
        raise ValueError("metrics.jsonl holds no eval/top1: the run did not reach an evaluation")
    by_epoch: dict[int, list[float]] = {}
    for step, loss in sorted(train.items()):
        by_epoch.setdefault((step - 1) // spe + 1, []).append(loss)
    eval_steps = sorted(evals)
    best_step = max(eval_steps, key=lambda s: evals[s])
    return {
        "train_loss_per_epoch": {e: sum(v) / len(v) for e, v in sorted(by_epoch.items())},
        "test_top1": [{"step": s, "epoch": s / spe, "top1": evals[s]} for s in eval_steps],
        "final_test_top1": evals[eval_steps[-1]],
        "best_test_top1": evals[best_step],
        "best_epoch": best_step / spe,
        "steps": max(eval_steps[-1], max(train, default=0)),
    }


def plot(summary: dict, path: pathlib.Path, title: str) -> None:
    """Two panels: train loss per epoch and test top-1 (%) per evaluation, both against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    losses = summary["train_loss_per_epoch"]
    ax_loss.plot(list(losses), list(losses.values()), marker="o", ms=3)
    ax_loss.set(xlabel="epoch", ylabel="train loss (smoothed labels)", title="train loss")
    evals = summary["test_top1"]
    ax_acc.plot([e["epoch"] for e in evals], [100 * e["top1"] for e in evals], marker="o", ms=3)
    ax_acc.axhline(94.0, color="grey", ls="--", lw=1, label="94% target")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="test accuracy")
    ax_acc.legend(loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    env = dict(os.environ)
    if args.source_dir:
        source = pathlib.Path(args.source_dir).resolve()
        env["VIG_FASHION_MNIST_DIR"] = str(source)
        os.environ["VIG_FASHION_MNIST_DIR"] = str(source)  # for schedule's subprocess
    command = [
        sys.executable,
        "train.py",
        f"--config={args.config}",
        f"--workdir={args.workdir}",
        *overrides,
    ]
    metrics_path = pathlib.Path(args.workdir) / "metrics.jsonl"
    if args.from_metrics:
        if args.wall_s is None or args.device is None:
            raise SystemExit("--from-metrics needs --wall-s and --device")
        metrics_path, wall, device = pathlib.Path(args.from_metrics), args.wall_s, args.device
        stopped_early = None  # unknown
    else:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, env=env)
        # A time limit's SIGTERM goes on to train.py, which saves a checkpoint and stops; the
        # epochs it finished are still summarised and plotted (marked "stopped_early").
        terminated = []

        def forward_sigterm(*_):
            terminated.append(True)
            child.terminate()

        signal.signal(signal.SIGTERM, forward_sigterm)
        rc = child.wait()
        wall = time.perf_counter() - start
        if rc and not metrics_path.exists():
            print(f"train.py failed with exit code {rc}", file=sys.stderr)
            return rc
        if rc:
            print(f"train.py exit code {rc}; summarising its metrics", file=sys.stderr)
        stopped_early = bool(terminated) or rc != 0
        device = device_description()

    spe, planned_steps = schedule(args.config, overrides)
    summary = summarise(read_metrics(metrics_path), spe)
    if stopped_early is None:  # --from-metrics: judge by the steps the metrics reach
        stopped_early = summary["steps"] < planned_steps
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "final_test_top1": summary["final_test_top1"],
        "best_test_top1": summary["best_test_top1"],
        "best_epoch": summary["best_epoch"],
        "steps": summary["steps"],
        "steps_per_epoch": spe,
        "planned_steps": planned_steps,
        "stopped_early": stopped_early,  # SIGTERM (time limit) or a failed exit before the end
        "wall_s": round(wall, 1),  # train.py process: start-up, preparation, compile, training
        "command": shlex.join(command[1:]),
        "env": {"VIG_FASHION_MNIST_DIR": env.get("VIG_FASHION_MNIST_DIR")},
        "device": device,
        "cpu_count": os.cpu_count(),
        "test_top1": summary["test_top1"],
        "train_loss_per_epoch": summary["train_loss_per_epoch"],
    }
    (out_dir / "fashion_mnist.json").write_text(json.dumps(record, indent=1) + "\n")
    (out_dir / "fashion_mnist_metrics.jsonl").write_text(metrics_path.read_text())
    title = (
        f"ViG-H small on Fashion-MNIST: final {100 * summary['final_test_top1']:.2f}%, "
        f"best {100 * summary['best_test_top1']:.2f}%, {wall:.0f} s on {device.split(',')[0]}"
    )
    if stopped_early:
        title += (
            f"\nstopped at epoch {summary['steps'] / spe:.1f} of {planned_steps / spe:.0f} "
            "(time limit)"
        )
    plot(summary, out_dir / "fashion_mnist.png", title)
    print(
        f"final test top-1 {summary['final_test_top1']:.4f}, best {summary['best_test_top1']:.4f} "
        f"(epoch {summary['best_epoch']:.1f}), wall {wall:.1f} s -> {out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
