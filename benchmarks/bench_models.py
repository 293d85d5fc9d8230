"""Throughput, peak memory and compile time of the six ViG models, per BiGLA implementation.

    python benchmarks/bench_models.py                        # one GPU: 224², bf16, batch 128
    python benchmarks/bench_models.py --models vig_s --impls pallas chunked
    python benchmarks/bench_models.py --smoke                # CPU check (/tmp/bench_models_smoke.*)

Each (model, impl) runs in a fresh process (benchmarks/bench_vs_vit.py's `measure_jax`): parity of
the float32 logits of 2 images with impl="reference", then inference (jitted forward) and training
(loss, gradients and an AdamW update, state donated), drop path off; compile seconds of each, img/s
from the median of --iters runs, peak memory after inference and after training (process peak).
Results: `<out>.json` and `<out>.md` (default benchmarks/results/models).
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from benchmarks.bench_vs_vit import measure_jax  # noqa: E402

MODELS = ("vig_t", "vig_s", "vig_b", "vig_h_t", "vig_h_s", "vig_h_b")
SMOKE = {"vig_t": {"depth": 1}, "vig_h_t": {"depths": (1, 1, 1, 1)}}  # one block per stage


def markdown(doc: dict) -> str:
    meta, a = doc["meta"], doc["meta"]["args"]

    def val(mode, key):
        return lambda r: r.get(key) if r.get(mode) == "ok" else r.get(mode) or r.get("status")

    return "\n".join(
        [
            f"# ViG models, {a['size']}², bf16, batch {a['batch']}",
            "",
            harness.meta_line(meta) + f"; median of {a['iters']} runs; train = AdamW step; "
            "peak = the case's process after inference / after training; parity = float32 "
            "logits vs impl=reference.",
            "",
            *harness.table(
                doc["rows"],
                [
                    ("model", "model", ""),
                    ("impl", "impl", ""),
                    ("infer img/s", val("infer", "infer_img_s"), ",.0f"),
                    ("train img/s", val("train", "train_img_s"), ",.0f"),
                    ("infer peak GB", val("infer", "infer_peak_gb"), ".2f"),
                    ("train peak GB", val("train", "train_peak_gb"), ".2f"),
                    ("parity", "parity_rel_err", ".1e"),
                    ("compile s infer", "infer_compile_s", ".0f"),
                    ("compile s train", "train_compile_s", ".0f"),
                ],
            ),
        ]
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS, help="default: all (smoke: vig_t)")
    p.add_argument(
        "--impls", nargs="+", default=["pallas", "chunked"], choices=("pallas", "chunked", "auto")
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=20, help="timed runs per mode (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=900.0, help="per (model, impl) process")
    p.add_argument("--out", help="path stem (default benchmarks/results/models)")
    p.add_argument("--smoke", action="store_true", help="CPU: 1 block per stage, 2×64², chunked")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.impls = args.models or ["vig_t"], ["chunked"]
        if unknown := set(args.models) - set(SMOKE):
            p.error(f"--smoke runs {list(SMOKE)}, not {sorted(unknown)}")
        args.batch, args.size, args.iters, args.warmup = 2, 64, 3, 1
        args.out = args.out or "/tmp/bench_models_smoke"
    args.models = args.models or list(MODELS)
    out = args.out or harness.REPO / "benchmarks/results/models"
    results = harness.Results(out, harness.metadata(args), markdown)
    common = dict(size=args.size, batch=args.batch, modes=["infer", "train"], parity=True)
    common.update(iters=args.iters, warmup=args.warmup)
    for model in args.models:
        for impl in args.impls:
            overrides = SMOKE[model] if args.smoke else {}
            case = dict(common, model=model, bigla_impl=impl, overrides=overrides)
            env = harness.SMOKE_ENV if args.smoke else {}
            fields = {"model": model, "impl": impl}
            results.measure(fields, measure_jax, case, env=env, timeout_s=args.timeout_s)
    results.done()
    print(results.markdown(results.doc))


if __name__ == "__main__":
    main()
