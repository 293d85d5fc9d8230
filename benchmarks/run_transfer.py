"""Transfer on real data (issue 17): does fine-tuning a pretrained ViG beat training from scratch?

    python benchmarks/run_transfer.py --out-dir benchmarks/results   # one GPU, planned ~5 min
    python benchmarks/run_transfer.py --smoke                        # CPU, ~3 min

1. Pretrain `configs/fmnist_transfer_pretrain.py` (a small plain ViG; seed `PRETRAIN_SEED`, not
   one of the fine-tuning seeds) on the Fashion-MNIST training images of classes 0-4 (all 30,000).
2. For each seed, draw `Setting.per_class` (100) training images of each of the classes 5-9
   (500 images, labels 0-4) and train `configs/fmnist_transfer_finetune.py` on them three ways,
   same steps each:
   - finetune: `init_from` the pretrained params (head re-initialised, a new label set);
   - scratch: the same model from random initialisation;
   - finetune_56: the fine-tune at 56 px, the pretrained 2x2 position table resized to 4x4.
   finetune and scratch train for each budget of `Setting.finetune_epochs` (a short one shows
   the head start, a long one where each ends up), finetune_56 for the last. In each budget each
   arm picks its `base_lr` from the same grid by mean accuracy on 1,000 held-out training images
   of classes 5-9 (disjoint from every seed's 500), so both get the same tuning effort.
3. Report test top-1 on the 5,000 test images of classes 5-9: mean +- std over the seeds at each
   arm's chosen lr, fine-tune minus scratch (means and per seed), plus every run.

Writes `transfer.json` and `transfer.md` to --out-dir (--smoke: /tmp/vig_transfer_smoke unless
given). --smoke shrinks everything (a 2-block width-32 model, 4 pretraining epochs, one budget of 30
steps, 3 seeds, two lrs) to run on CPU in ~3 min; tests/test_finetune.py runs it and asserts
that fine-tuning beats scratch (docs/finetuning.md has the numbers and where the margin vanishes).
Finished runs go to `<name>.partial.json` as they end. The images come from the IDX files of
Debian's `dataset-fashion-mnist` (or --source-dir / $VIG_FASHION_MNIST_DIR); the loop here feeds the
project's jitted train and eval steps (`make_trainer`) from memory, since the class subsets are not
TFDS splits.
"""

import argparse
import dataclasses
import gzip
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `configs` is a folder of the checkout, not an installed package

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)
PER_CLASS = 100  # labelled fine-tuning images per class (the default of `Setting.per_class`)
VAL_PER_CLASS = 200  # held-out training images per class for choosing the lr
ARMS = ("finetune", "scratch", "finetune_56")
# Not one of the fine-tuning seeds: with the same seed, the fine-tune's "re-initialised" head is
# the pretraining's initial head, which a short pretraining barely moves and the backbone is fitted
# to, so the new classes start mapped through the old ones (docs/finetuning.md).
PRETRAIN_SEED = 1000


@dataclasses.dataclass(frozen=True)
class Setting:
    """Sizes of one experiment; `FULL` for the GPU, `SMOKE` for CPU and CI."""

    seeds: tuple[int, ...]
    base_lrs: tuple[float, ...]  # the grid every arm chooses from (per 512 images)
    pretrain_examples: int | None  # None: all 30,000
    pretrain_epochs: float
    pretrain_batch: int
    # Fine-tuning budgets in epochs of the 5 x per_class images (10 steps of 50 at 100 a class):
    # finetune and scratch train every budget, finetune_56 the last; each arm chooses its lr per
    # budget.
    finetune_epochs: tuple[float, ...]
    test_examples: int | None  # None: all 5,000 test images of classes 5-9
    per_class: int = PER_CLASS  # labelled fine-tuning images per class, drawn per seed
    model: dict = dataclasses.field(default_factory=dict)  # model.overrides changes
    arms: tuple[str, ...] = ARMS
    lrs_56: tuple[float, ...] | None = None  # finetune_56's lr grid (None: `base_lrs`)


FULL = Setting(
    seeds=(0, 1, 2),
    base_lrs=(1e-2, 3e-2),
    pretrain_examples=None,
    pretrain_epochs=15.0,
    pretrain_batch=256,
    finetune_epochs=(3.0, 40.0),
    test_examples=None,
)
# The CPU-sized setting where fine-tuning still shows a head start: the short budget (30 steps)
# and an lr grid reaching the larger lr scratch training wants. With 120 steps, or 10 images per
# class, the small model's pretrained features are no better than random ones (docs/finetuning.md).
SMOKE = Setting(
    seeds=(0, 1, 2),
    base_lrs=(1e-1, 3e-1),
    pretrain_examples=None,
    pretrain_epochs=4.0,
    pretrain_batch=128,
    finetune_epochs=(3.0,),
    test_examples=None,
    model={"embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path_rate": 0.0},
    # The 56 px arm chose 0.1 from the grid (test 60.9 +- 5.2% against 50.7% at 0.3); only 0.1 runs,
    # which saves a compile at 56 px and three runs (~35 s of the smoke).
    lrs_56=(1e-1,),
)


def load_fashion_mnist(source_dir: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (uint8 [60000, 28, 28], int64 [60000]), "test": ...} from the IDX files."""
    from vig_jax.data import fashion_mnist

    directory = fashion_mnist.resolve_source_dir(source_dir)
    fashion_mnist.check_source_files(directory)

    def read(name, offset):
        with gzip.open(directory / name, "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        labels = read(f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
        images = read(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(len(labels), 28, 28)
        out[split] = (images, labels)
    return out


def select(images, labels, classes, rng=None, per_class=None, exclude=None):
    """Examples of `classes` (labels renumbered 0..len-1); `per_class` drawn with `rng` (not in
    the index set `exclude`). Returns (images, labels, indices into the input)."""
    picked = []
    for new, cls in enumerate(classes):
        idx = np.flatnonzero(labels == cls)
        if exclude is not None:
            idx = np.setdiff1d(idx, exclude)
        if per_class is not None:
            idx = np.sort(rng.choice(idx, per_class, replace=False))
        picked.append((idx, new))
    index = np.concatenate([i for i, _ in picked])
    new_labels = np.concatenate([np.full(len(i), n) for i, n in picked])
    return images[index], new_labels.astype(np.int32), index


def to_size(images: np.ndarray, size: int) -> np.ndarray:
    """[N, 28, 28] grey -> [N, size, size, 3] uint8 through the config's eval transform (crop_pct
    1: a bicubic resize), as the input pipeline prepares Fashion-MNIST."""
    from vig_jax.data.transforms import EvalTransform

    transform = EvalTransform(size, 1.0)
    return np.stack([transform({"image": im[..., None], "label": 0})["image"] for im in images])


def augment(rng: np.random.Generator, images: np.ndarray, padding: int) -> np.ndarray:
    """The "pad_crop" train transform on a batch: zero-pad, random crop, random flip."""
    n, size = images.shape[:2]
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    tops, lefts = rng.integers(0, 2 * padding + 1, size=(2, n))
    flips = rng.random(n) < 0.5
    out = np.empty_like(images)
    for i in range(n):
        crop = padded[i, tops[i] : tops[i] + size, lefts[i] : lefts[i] + size]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out


class Runner:
    """Builds a trainer per distinct config (compiling once) and runs training and evaluation."""

    def __init__(self, log):
        from vig_jax.train import sharding

        self.mesh = sharding.make_mesh()
        self.log = log
        self._trainers = {}

    def trainer(self, config, num_classes: int, steps_per_epoch: int):
        from vig_jax.train.trainer import make_trainer

        # The seed and the starting params do not change the jitted steps: one trainer serves
        # every seed and both the fine-tune and the scratch arm.
        key = config.copy_and_resolve_references()
        key.seed, key.init_from, key.reinit_head = 0, None, False
        key = (key.to_json(), num_classes, steps_per_epoch)
        if key not in self._trainers:
            self._trainers[key] = make_trainer(
                config, mesh=self.mesh, num_classes=num_classes, steps_per_epoch=steps_per_epoch
            )
        return self._trainers[key]

    def train(self, config, images, labels, num_classes: int):
        """Trains `config` on the arrays for `optimizer.epochs`.

        Returns (trainer, params, the loss at each quarter of the run, steps)."""
        from vig_jax.train import init_from, optim, sharding

        batch = config.data.batch_size
        spe = optim.steps_per_epoch(len(images), batch)
        trainer = self.trainer(config, num_classes, spe)
        state = init_from.initial_state(trainer, config, log=self.log)
        rng = np.random.default_rng(config.seed)
        total = optim.schedule_steps(config.optimizer, spe)
        order = np.empty(0, np.int64)
        losses = []
        for step in range(total):
            if len(order) < batch:
                order = np.concatenate([order, rng.permutation(len(images))])
            idx, order = order[:batch], order[batch:]
            local = {
                "image": augment(rng, images[idx], config.data.augment.padding),
                "label": labels[idx],
            }
            state, metrics = trainer.train_step(state, sharding.global_batch(local, self.mesh))
            if (step + 1) % max(total // 4, 1) == 0:
                losses.append(float(metrics["loss"]))
        if not np.isfinite(losses).all():
            raise FloatingPointError(f"non-finite training loss {losses}")
        return trainer, state.params, losses, total

    def accuracy(self, trainer, config, params, images, labels) -> float:
        """Top-1 over all of `images` (the last batch padded and masked)."""
        import jax

        from vig_jax.train import sharding

        b = config.data.eval_batch_size
        correct = count = 0.0
        for start in range(0, len(images), b):
            im, lab = images[start : start + b], labels[start : start + b]
            pad = b - len(im)
            local = {
                "image": np.concatenate([im, np.zeros((pad, *im.shape[1:]), im.dtype)]),
                "label": np.concatenate([lab, np.zeros(pad, lab.dtype)]),
                "mask": np.arange(b) < len(im),
            }
            sums = jax.device_get(
                trainer.eval_step(params, sharding.global_batch(local, self.mesh))
            )
            correct += float(sums["top1"])
            count += float(sums["count"])
        return correct / count


def _config(name: str, setting: Setting):
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.overrides.update(setting.model)
    return config


def run(setting: Setting, source_dir: str | None, workdir: pathlib.Path, log, partial=None) -> dict:
    """The whole experiment; returns the JSON record (see the module docstring).

    `partial(runs)`, when given, gets the list of finished fine-tuning runs after each one (so a
    run cut short by a time limit still leaves its results)."""
    from vig_jax.convert import save_params

    if PRETRAIN_SEED in setting.seeds:
        raise ValueError(f"seeds {setting.seeds} must not include {PRETRAIN_SEED=}")
    t0 = time.perf_counter()
    data = load_fashion_mnist(source_dir)
    train_images, train_labels = data["train"]
    test_images, test_labels = data["test"]
    runner = Runner(log)

    # 1. Pretraining on classes 0-4.
    pre = _config("fmnist_transfer_pretrain", setting)
    pre.seed = PRETRAIN_SEED
    pre.optimizer.epochs = setting.pretrain_epochs
    pre.data.batch_size = setting.pretrain_batch
    images, labels, _ = select(train_images, train_labels, PRETRAIN_CLASSES)
    if setting.pretrain_examples is not None:
        keep = np.random.default_rng(0).permutation(len(images))[: setting.pretrain_examples]
        images, labels = images[keep], labels[keep]
    images = to_size(images, pre.data.image_size)
    log(f"pretraining on {len(images)} images of classes {PRETRAIN_CLASSES}")
    trainer, params, losses, pretrain_steps = runner.train(
        pre, images, labels, len(PRETRAIN_CLASSES)
    )
    pre_test = select(test_images, test_labels, PRETRAIN_CLASSES)
    pre_acc = runner.accuracy(
        trainer, pre, params, to_size(pre_test[0], pre.data.image_size), pre_test[1]
    )
    checkpoint = workdir / "pretrained"
    save_params(
        jax_get(params), checkpoint, model_name=pre.model.name, num_classes=len(PRETRAIN_CLASSES)
    )
    log(f"pretrained: test top-1 {pre_acc:.4f} on classes {PRETRAIN_CLASSES} ({losses=})")
    pretrain_s = time.perf_counter() - t0

    # 2. The few-shot sets, the held-out set and the test set of classes 5-9.
    val_rng = np.random.default_rng(1234)
    val_images, val_labels, val_index = select(
        train_images, train_labels, FINETUNE_CLASSES, val_rng, VAL_PER_CLASS
    )
    test = select(test_images, test_labels, FINETUNE_CLASSES)[:2]
    if setting.test_examples is not None:
        keep = np.random.default_rng(1).permutation(len(test[0]))[: setting.test_examples]
        test = (test[0][keep], test[1][keep])
    shots = {
        seed: select(
            train_images,
            train_labels,
            FINETUNE_CLASSES,
            np.random.default_rng(100 + seed),
            setting.per_class,
            exclude=val_index,
        )[:2]
        for seed in setting.seeds
    }

    runs = []
    for arm in setting.arms:
        config = _config("fmnist_transfer_finetune", setting)
        if arm != "scratch":
            config.init_from = str(checkpoint)
        if arm == "finetune_56":
            config.data.image_size = 56
            config.data.augment.padding = 6
            config.model.overrides.pos_grid = 4
        size = config.data.image_size
        val = (to_size(val_images, size), val_labels)
        test_sized = (to_size(test[0], size), test[1])
        warmup = config.optimizer.warmup_epochs
        budgets = setting.finetune_epochs[-1:] if arm == "finetune_56" else setting.finetune_epochs
        for epochs in budgets:
            config.optimizer.epochs = epochs
            # The config's warmup, at most a quarter of a short budget.
            config.optimizer.warmup_epochs = min(warmup, epochs / 4)
            lrs = setting.base_lrs
            if arm == "finetune_56" and setting.lrs_56 is not None:
                lrs = setting.lrs_56
            for base_lr in lrs:
                config.optimizer.base_lr = base_lr
                for seed in setting.seeds:
                    config.seed = seed
                    t = time.perf_counter()
                    images, labels = shots[seed]
                    trainer, params, losses, steps = runner.train(
                        config, to_size(images, size), labels, len(FINETUNE_CLASSES)
                    )
                    record = {
                        "arm": arm,
                        "epochs": epochs,
                        "base_lr": base_lr,
                        "seed": seed,
                        "val_top1": runner.accuracy(trainer, config, params, *val),
                        "test_top1": runner.accuracy(trainer, config, params, *test_sized),
                        "steps": steps,
                        "train_loss": losses,
                        "wall_s": round(time.perf_counter() - t, 2),
                    }
                    runs.append(record)
                    if partial is not None:
                        partial(runs)
                    log(
                        f"{arm:12s} {steps:4d} steps, lr {base_lr:g}, seed {seed}: "
                        f"val {record['val_top1']:.4f}, test {record['test_top1']:.4f} "
                        f"({record['wall_s']} s)"
                    )
    return {
        "setting": dataclasses.asdict(setting),
        "classes": {"pretrain": PRETRAIN_CLASSES, "finetune": FINETUNE_CLASSES},
        "per_class": setting.per_class,
        "val_per_class": VAL_PER_CLASS,
        "pretrain_seed": PRETRAIN_SEED,
        "pretrain_steps": pretrain_steps,
        "pretrain_test_top1": pre_acc,
        "pretrain_s": round(pretrain_s, 1),
        "summary": summarise(runs),
        "runs": runs,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def jax_get(tree):
    import jax

    return jax.device_get(tree)


def summarise(runs: list[dict]) -> list[dict]:
    """One entry per fine-tuning budget: its epochs and steps, and per arm the lr with the best
    mean val top-1 and the test top-1 mean/std over the seeds there; with both the fine-tune and
    the scratch arm, the margin between their means and per seed (fine-tune minus scratch)."""
    out = []
    for epochs in dict.fromkeys(r["epochs"] for r in runs):
        budget = [r for r in runs if r["epochs"] == epochs]
        entry = {"epochs": epochs, "steps": budget[0]["steps"], "arms": {}}
        chosen = {}
        for arm in dict.fromkeys(r["arm"] for r in budget):
            mine = [r for r in budget if r["arm"] == arm]
            lrs = sorted({r["base_lr"] for r in mine})
            val = {lr: np.mean([r["val_top1"] for r in mine if r["base_lr"] == lr]) for lr in lrs}
            best = max(lrs, key=lambda lr: val[lr])
            chosen[arm] = {r["seed"]: r["test_top1"] for r in mine if r["base_lr"] == best}
            test = list(chosen[arm].values())
            entry["arms"][arm] = {
                "base_lr": best,
                "val_top1_mean": float(val[best]),
                "test_top1_mean": float(np.mean(test)),
                "test_top1_std": float(np.std(test, ddof=1)) if len(test) > 1 else 0.0,
                "seeds": len(test),
            }
        if "finetune" in chosen and "scratch" in chosen:
            a = entry["arms"]
            entry["margin_finetune_minus_scratch"] = (
                a["finetune"]["test_top1_mean"] - a["scratch"]["test_top1_mean"]
            )
            entry["margin_per_seed"] = {
                seed: chosen["finetune"][seed] - chosen["scratch"][seed]
                for seed in chosen["finetune"]
                if seed in chosen["scratch"]
            }
        out.append(entry)
    return out


def markdown(record: dict) -> str:
    lines = [
        f"# Transfer: Fashion-MNIST 0-4 -> 5-9, {record['per_class']} images per class",
        "",
        f"Pretrained ({record['pretrain_steps']} steps) test top-1 on classes 0-4: "
        f"{100 * record['pretrain_test_top1']:.2f}%. Device: {record['device']}; "
        f"wall {record['wall_s']} s.",
        "",
        "| fine-tuning steps | arm | base_lr (chosen on held-out) | test top-1 (%), mean ± std "
        "| seeds |",
        "|---|---|---|---|---|",
    ]
    for entry in record["summary"]:
        for arm in ARMS:
            if arm in entry["arms"]:
                a = entry["arms"][arm]
                lines.append(
                    f"| {entry['steps']} | {arm} | {a['base_lr']:g} | "
                    f"{100 * a['test_top1_mean']:.2f} ± {100 * a['test_top1_std']:.2f} | "
                    f"{a['seeds']} |"
                )
    lines.append("")
    for entry in record["summary"]:
        if "margin_finetune_minus_scratch" in entry:
            per_seed = ", ".join(f"{100 * m:+.1f}" for m in entry["margin_per_seed"].values())
            margin = 100 * entry["margin_finetune_minus_scratch"]
            lines.append(
                f"Fine-tune minus scratch, {entry['steps']} steps: {margin:+.2f} points "
                f"(per seed: {per_seed})."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the small CPU / CI version")
    parser.add_argument("--out-dir", help="JSON and markdown destination")
    parser.add_argument("--workdir", help="pretrained checkpoint folder (default: a temp dir)")
    parser.add_argument("--source-dir", help="directory of the four Fashion-MNIST IDX .gz files")
    args = parser.parse_args(argv)
    setting = SMOKE if args.smoke else FULL
    default_out = "/tmp/vig_transfer_smoke" if args.smoke else ROOT / "benchmarks" / "results"
    out_dir = pathlib.Path(args.out_dir or default_out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import tempfile

    import jax

    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(args.workdir or tmp)
        name = "transfer_smoke" if args.smoke else "transfer"
        partial_path = out_dir / f"{name}.partial.json"

        def partial(runs):
            partial_path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")

        record = run(setting, args.source_dir, workdir, log, partial)
        partial_path.unlink(missing_ok=True)
    d = jax.devices()
    record["device"] = f"{len(d)} x {d[0].device_kind} ({d[0].platform}), jax {jax.__version__}"
    record["host"] = {"cpu_count": os.cpu_count(), "python": platform.python_version()}
    record["git"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
