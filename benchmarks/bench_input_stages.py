"""Where the host's per-image CPU time goes, stage by stage, before and after a change (issue 19).

    python benchmarks/bench_input_stages.py --before 8709175      # ~1 min on the 2-core dev CPU
    python benchmarks/bench_input_stages.py --before HEAD --images 8 --rounds 1   # quick check

Generates --images ImageNet-like JPEGs in memory (`vig_jax.data.imagenet_like`, mean ~400x360,
quality 85-95) and times each host stage of the training and evaluation transforms with
`time.process_time` (CPU of this process, one core): decode, the random-resized crop's resize,
flip, RandAugment (and its geometric ops alone, each when drawn), the conversion to numpy, the
collation into a batch, the eval resize + centre crop, and the whole transforms. The transforms and
RandAugment of git revision --before are loaded beside the working tree's, and every stage runs
both, interleaved, for --rounds rounds; the table gives the medians. On a machine shared with other
work the absolute numbers move between runs; the before/after ratios of one run are what to read.

Prints a markdown table; with --out-dir, also writes stages.md and stages.json there.
"""

import argparse
import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import common  # noqa: E402
from vig_jax.data import imagenet_like, randaugment, transforms  # noqa: E402

DEIT = common.deit_host_augment().to_dict()  # the training recipe's host augmentation
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--before", required=True, help="git revision (or checkout folder) to compare against"
    )
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.images < 1 or args.rounds < 1:
        p.error(f"--images and --rounds must be >= 1, got {args.images}, {args.rounds}")
    return args


def _read_source(revision: str, name: str) -> str:
    """vig_jax/data/<name>.py at git `revision`, or in the checkout folder `revision` (a copy of
    the repository without git, e.g. `git archive` output on a machine that has no git)."""
    folder = pathlib.Path(revision)
    if folder.is_dir():
        path = folder / "vig_jax" / "data" / f"{name}.py"
        if not path.is_file():
            raise SystemExit(f"error: --before {revision}: no {path}")
        return path.read_text()
    try:
        return subprocess.run(
            ["git", "show", f"{revision}:vig_jax/data/{name}.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else e
        raise SystemExit(f"error: --before {revision}: {detail}") from None


def load_revision(revision: str, into: pathlib.Path):
    """(transforms, randaugment) modules as they are at `revision` (see `_read_source`)."""
    modules = {}
    for name in ("randaugment", "transforms"):
        text = _read_source(revision, name)
        path = into / f"before_{name}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"before_{name}", path)
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    # The old transforms import RandAugment from the package; point them at the old one.
    modules["transforms"].RandAugment = modules["randaugment"].RandAugment
    return modules["transforms"], modules["randaugment"]


def build_stages(data, old_t, old_ra) -> dict:
    """{stage: {"same" | "before" | "after": fn(index, jpeg_bytes)}}."""
    resample = Image.Resampling.BICUBIC
    no_ra = transforms.TrainTransform.from_config({**DEIT, "randaugment": None}, 224)
    crops = [
        Image.fromarray(no_ra({"image": d, "label": 0}, np.random.default_rng(i))["image"])
        for i, d in enumerate(data)
    ]
    decoded = [transforms.open_image(d).convert("RGB") for d in data]
    arrays = [np.asarray(image) for image in decoded]
    batch = [np.asarray(crop) for crop in crops[:128]]

    def crop_resize(i, _):
        image, rng = decoded[i], np.random.default_rng(i)
        top, left, h, w = transforms.random_resized_crop_box(
            rng, image.height, image.width, DEIT["scale"], DEIT["ratio"]
        )
        return image.resize((224, 224), resample, box=(left, top, left + w, top + h))

    def entropy_decode(_, d):
        image = transforms.open_image(d)
        image.draft("RGB", (image.width // 8, image.height // 8))
        image.load()

    stages = {
        "decode (full size, RGB)": {"same": lambda i, d: transforms.decode_rgb(d)},
        "  its entropy decoding (the same at 1/8 scale)": {"same": entropy_decode},
        "random-resized crop: resize to 224": {"same": crop_resize},
        "flip (half of the images)": {
            "same": lambda i, d: i % 2 and crops[i].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        },
        "RandAugment m9 on the 224 crop": {},
        **{f"  {name} alone, when drawn (1 in 15)": {} for name in GEOMETRIC},
        "to numpy": {"same": lambda i, d: np.asarray(crops[i])},
        "collation into a batch of 128": {
            "same": lambda i, d: np.stack(batch) if i % 128 == 0 else None
        },
        "training transform (the above)": {},
        "eval: resize 256 + centre crop 224 (decoded)": {},
        "evaluation transform (decode, resize, crop)": {},
    }
    for tag, t, ra in (("before", old_t, old_ra), ("after", transforms, randaugment)):
        augment = ra.RandAugment.from_string(DEIT["randaugment"])
        train = t.TrainTransform.from_config(DEIT, 224)
        evaluate = t.EvalTransform(224, 0.875)
        stages["RandAugment m9 on the 224 crop"][tag] = lambda i, d, a=augment: a(
            crops[i], np.random.default_rng(i)
        )
        for name in GEOMETRIC:
            op = getattr(ra, f"_{name}")
            stages[f"  {name} alone, when drawn (1 in 15)"][tag] = lambda i, d, op=op: op(
                crops[i], 9.0, np.random.default_rng(i)
            )
        stages["training transform (the above)"][tag] = lambda i, d, f=train: f(
            {"image": d, "label": 0}, np.random.default_rng(i)
        )
        stages["eval: resize 256 + centre crop 224 (decoded)"][tag] = lambda i, d, t=t: (
            t.resize_and_centre_crop(arrays[i], 224, 0.875)
        )
        stages["evaluation transform (decode, resize, crop)"][tag] = lambda i, d, f=evaluate: f(
            {"image": d, "label": 0}
        )
    return stages


def measure(stages: dict, data, rounds: int) -> dict:
    """{stage: {variant: median ms per image}}, the variants interleaved round by round."""
    times = {}
    for _ in range(rounds):
        for stage, variants in stages.items():
            for tag, fn in variants.items():
                start = time.process_time()
                for i, d in enumerate(data):
                    fn(i, d)
                ms = (time.process_time() - start) / len(data) * 1e3
                times.setdefault(stage, {}).setdefault(tag, []).append(ms)
    return {s: {t: float(np.median(v)) for t, v in tags.items()} for s, tags in times.items()}


def markdown(result: dict) -> str:
    lines = [
        f"| stage (ms of CPU per image; {result['images']} images, median of "
        f"{result['rounds']} rounds) | before ({result['before']}) | after |",
        "|---|---|---|",
    ]
    for stage, ms in result["stages"].items():
        if "same" in ms:
            lines.append(f"| {stage} | {ms['same']:.2f} | {ms['same']:.2f} |")
        else:
            change = (ms["after"] / ms["before"] - 1) * 100
            lines.append(f"| {stage} | {ms['before']:.2f} | {ms['after']:.2f} ({change:+.0f}%) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    data = [imagenet_like.jpeg_bytes(0, "train", i) for i in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        old_t, old_ra = load_revision(args.before, pathlib.Path(tmp))
        stages = build_stages(data, old_t, old_ra)
        result = {
            "before": args.before,
            "images": args.images,
            "rounds": args.rounds,
            "stages": measure(stages, data, args.rounds),
        }
    table = markdown(result)
    print(table, end="")
    if args.out_dir:
        out = pathlib.Path(args.out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        (out / "stages.json").write_text(json.dumps(result, indent=2))
        (out / "stages.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
