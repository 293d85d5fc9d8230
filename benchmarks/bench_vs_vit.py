"""ViG vs ViT: our JAX ViG against timm's DeiT under `torch.compile`, side by side in one call.

    python benchmarks/bench_vs_vit.py                        # the headline table (one GPU)
    python benchmarks/bench_vs_vit.py --variant base --variant remat:remat=block,dwconv=shift
    python benchmarks/bench_vs_vit.py --sizes 224 512 1024 2048 --jax-deit  # + our JAX DeiT
    python benchmarks/bench_vs_vit.py --smoke                # CPU check (/tmp/bench_vs_vit_smoke.*)

Measures, per (model, size, batch), inference img/s (forward, train=False), training img/s (loss,
gradients and an AdamW update), the training peak memory and the compile seconds of each, and the
ratios ViG / DeiT. Default cases: ViG-S vs DeiT-B and DeiT-S at 224² B128 (the paper's ViG-S vs
DeiT-B claim and the same size class), ViG-T vs DeiT-T at 1024² B8, 1536² B3 and 2048² B2 (batch
scaled by 1/area from B8 at 1024², floored, at least 1, so every batch holds about 32K tokens).
`--sizes` sweeps sizes for `--pairs` (ViG-T vs DeiT-T, ViG-S vs DeiT-B) instead, at batch
128·(224/size)² (floored, at least 1).

Both sides bf16, drop path off, the same batch, each (model, size) in a fresh process:
  ViG (JAX)   `create_model(name, dtype=bfloat16)` (float32 params), `--bigla-impl` (pallas), a
              jitted forward (compiled with `inference_compiler_options()`, as the library's own
              forward passes are) and a jitted AdamW step with the state donated; both compiled
              ahead of time.
  DeiT (timm) `timm.create_model("deit_*_patch16_224", img_size=size)` under `torch.compile`,
              attention through SDPA (flash attention for bf16 on the GPU); inference with the
              weights cast to bf16, training with float32 weights under bf16 autocast and fused
              AdamW. Compilation happens in the warm-up and is timed as the first call.
              `--timm-mode` is torch.compile's mode: "reduce-overhead" (the default) replays
              the compiled graphs as CUDA graphs; in the "default" mode DeiT-S's training step
              left the H200 idle half of its wall time, waiting on the host (4,203 against
              8,035 img/s), so the CUDA-graph DeiT is the strongest baseline.
  DeiT (JAX)  with --jax-deit, our `vig_jax.models.deit` (cuDNN attention): a JAX baseline only.
Timing and memory: see benchmarks/harness.py (median of --iters runs, compile excluded; peak =
process peak after inference and training for JAX, torch's max_memory_allocated during training).
torch and timm are optional (`pip install -e ".[baselines]"`); without them ViG is measured alone.

ViG variants: `--variant NAME:key=val,...` (repeatable) measures the ViG side once per variant in
the same call, e.g. before and after a model change; `--vig-override key=val` applies to all.
Values are Python literals or bare strings (`remat=block`); unknown fields are an error. Keys
starting with "xla_" are XLA options for the variant's compiled programs, not model fields
(`--variant nofb:xla_gpu_cublas_fallback=False`).
Results: `<out>.json` (one row per measured process) and `<out>.md` (the comparison table).
"""

import argparse
import dataclasses
import functools
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402

# name: (ViG, DeiT, size, batch)
CASES = {
    "s224_vs_b": ("vig_s", "deit_b", 224, 128),
    "s224_vs_s": ("vig_s", "deit_s", 224, 128),
    "t1024": ("vig_t", "deit_t", 1024, 8),
    "t1536": ("vig_t", "deit_t", 1536, 3),
    "t2048": ("vig_t", "deit_t", 2048, 2),
}
TIMM_NAMES = {
    "deit_t": "deit_tiny_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "deit_b": "deit_base_patch16_224",
}
MODES = ("infer", "train")


def batch_for(size: int) -> int:
    """128 at 224², scaled by (224/size)², floored, at least 1 (the `--sizes` sweep)."""
    return max(1, int(128 * (224 / size) ** 2))


# ----------------------------------------------------------------------------------------------
# One (model, size, batch) per process (harness.run_isolated).


def _mode(out: dict, mode: str, case: dict, build, sync, peak) -> None:
    """Builds (`build() -> (call, compile seconds or None)`) and times one mode into out:
    img/s, ms, peak GB, compile seconds, and out[mode] = "ok", or out[mode] = its failure."""
    if mode not in case["modes"]:
        return
    try:
        call, compile_s = build()
        if compile_s is None:  # torch.compile compiles on the first call
            t0 = time.perf_counter()
            sync(call())
            compile_s = time.perf_counter() - t0
        t = harness.time_call(call, sync, warmup=case["warmup"], iters=case["iters"])
        p = peak()
        out[f"{mode}_img_s"] = case["batch"] / t["ms"] * 1e3
        out.update({f"{mode}_ms": t["ms"], f"{mode}_compile_s": compile_s, mode: "ok"})
        out[f"{mode}_peak_gb"] = None if p is None else p / 1e9
    except Exception as exc:  # recorded; the case goes on
        out[mode] = harness.status(exc)


def measure_jax(case: dict, report) -> dict:
    """ViG or our DeiT in JAX: inference, then the AdamW step (state donated)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from vig_jax.models import create_model, inference_compiler_options, uses_bigla

    name, size, b = case["model"], case["size"], case["batch"]
    kwargs, xla = harness.split_xla_options(case["overrides"])
    if uses_bigla(name):
        kwargs.update(bigla_impl=case["bigla_impl"], drop_path_rate=0.0)
    else:  # cuDNN's backward rejects N = 197, 1025, ...: pad attention's tokens to 64
        cudnn = jax.default_backend() == "gpu"
        kwargs.update(attention_impl="cudnn" if cudnn else "xla", token_multiple=64)
    model = create_model(name, dtype=jnp.bfloat16, **kwargs)
    out = {"device": jax.devices()[0].device_kind}
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((b, size, size, 3), np.float32), jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 1000, (b,)), jnp.int32)
    key = jax.random.key(0, impl="rbg")  # compiles faster than threefry; values do not matter
    init_images = jnp.zeros((1, min(size, 224), min(size, 224), 3), jnp.bfloat16)
    params = jax.jit(lambda x: model.init(key, x, train=False)["params"])(init_images)
    out["params"] = sum(x.size for x in jax.tree.leaves(params))
    if case.get("parity"):  # float32 logits of 2 images against bigla_impl="reference"
        # Unit-scale parameters: at the official init BiGLA moves the logits by < 1e-6.
        leaves, tree = jax.tree.flatten(params)
        unit = tree.unflatten(
            [jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
        )
        x2, logits = images[:2].astype(jnp.float32), []
        for impl in (kwargs["bigla_impl"], "reference"):
            m = create_model(name, **{**kwargs, "bigla_impl": impl})  # float32
            logits.append(jax.jit(functools.partial(m.apply, train=False))({"params": unit}, x2))
        err = jnp.abs(logits[0] - logits[1]).max() / jnp.abs(logits[1]).max()
        out["parity_rel_err"] = float(err)
    tx = optax.adamw(1e-3, weight_decay=0.05)

    def train_step(state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state[0])
        updates, opt_state = tx.update(grads, state[1], state[0])
        return (optax.apply_updates(state[0], updates), opt_state), loss

    def infer():
        fwd = lambda p, x: model.apply({"params": p}, x, train=False)
        options = {**inference_compiler_options(), **xla}  # a variant's xla_* keys win
        compiled, seconds = harness.compile_jax(fwd, params, images, compiler_options=options)
        return (lambda: compiled(params, images)), seconds

    def train():
        abstract = jax.eval_shape(lambda p: (p, tx.init(p)), params)
        step, seconds = harness.compile_jax(
            train_step, abstract, images, labels, donate_argnums=0, compiler_options=xla
        )
        state = [(params, jax.jit(tx.init)(params))]

        def call():
            state[0], loss = step(state[0], images, labels)
            return state[0], loss

        return call, seconds

    _mode(out, "infer", case, infer, jax.block_until_ready, harness.jax_peak_bytes)
    report(out)
    _mode(out, "train", case, train, jax.block_until_ready, harness.jax_peak_bytes)
    return out


TIMM_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def timm_deit(
    name: str, size: int, batch: int, overrides: dict | None = None, mode: str = "default"
) -> dict:
    """timm's DeiT as the baseline runs it: {"model", "infer", "train"}, where infer() and train()
    each reset torch's peak-memory counter and return a call running one step: bf16 weights under
    `torch.compile` for inference; float32 weights, bf16 autocast, `torch.compile` and fused AdamW
    for training (compiled by the call's first runs). `mode`: torch.compile's mode;
    "reduce-overhead" replays the compiled graphs as CUDA graphs (fewer host launches)."""
    if mode not in TIMM_MODES:
        raise ValueError(f"mode={mode!r} is not one of {TIMM_MODES}")
    import copy

    import timm
    import torch
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    torch.set_float32_matmul_precision("high")
    model = timm.create_model(
        TIMM_NAMES[name], img_size=size, num_classes=1000, drop_path_rate=0.0, **(overrides or {})
    ).to(dev)
    x = torch.randn(batch, 3, size, size, device=dev, dtype=torch.bfloat16)
    y = torch.randint(0, 1000, (batch,), device=dev)
    compile = lambda m: torch.compile(m, mode=None if mode == "default" else mode)
    # These modes replay CUDA graphs, which reuse their output buffers: each step starts anew.
    graphs = mode in ("reduce-overhead", "max-autotune")
    begin = torch.compiler.cudagraph_mark_step_begin if graphs else (lambda: None)

    def infer():
        harness.torch_peak_reset()
        bf16 = compile(copy.deepcopy(model).to(torch.bfloat16).eval())

        def call():
            begin()
            with torch.inference_mode():
                return bf16(x)

        return call

    def train():
        harness.torch_peak_reset()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=cuda)
        compiled = compile(model)

        def call():
            begin()
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return call

    return {"model": model, "infer": infer, "train": train}


def measure_timm(case: dict, report) -> dict:
    """timm's DeiT under torch.compile (`timm_deit`): inference, then the training step."""
    import torch

    cuda = torch.cuda.is_available()
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu"}
    mode = case.get("timm_mode", "default")
    deit = timm_deit(case["model"], case["size"], case["batch"], case["overrides"], mode)
    out["params"] = sum(p.numel() for p in deit["model"].parameters())
    out["fused_attn"] = bool(deit["model"].blocks[0].attn.fused_attn)  # SDPA, not explicit softmax
    infer = lambda: (deit["infer"](), None)  # torch.compile compiles on the first call
    train = lambda: (deit["train"](), None)
    _mode(out, "infer", case, infer, harness.torch_sync, harness.torch_peak_bytes)
    if cuda:  # the bf16 copy is gone: its cached blocks must not count as training's
        torch.cuda.empty_cache()
    report(out)
    _mode(out, "train", case, train, harness.torch_sync, harness.torch_peak_bytes)
    return out


def _value(run: dict | None, key: str):
    """A run's number, or its mode's status ("OOM", ...) when that mode did not run."""
    if run is None:
        return None
    mode = key.split("_")[0]
    return run.get(key) if run.get(mode) == "ok" else run.get(mode) or run.get("status")


def markdown(doc: dict) -> str:
    meta, a = doc["meta"], doc["meta"]["args"]
    runs = {
        tuple(r[k] for k in ("framework", "model", "variant", "size", "batch")): r
        for r in doc["rows"]
    }
    keys = ("infer_img_s", "train_img_s", "train_peak_gb")
    rows = []
    for vig, base, size, batch in meta["comparisons"]:
        for variant in meta["variants"]:
            for fw in meta["baselines"] or [None]:
                v = runs.get(("jax", vig, variant, size, batch))
                d = runs.get((fw, base, "", size, batch))
                row = {
                    "vig": f"{vig} ({variant})" if len(meta["variants"]) > 1 else vig,
                    "base": f"{base} ({fw})" if fw else None,
                    "size": f"{size}²",
                    "b": batch,
                }
                for key in keys:
                    row["v" + key], row["d" + key] = _value(v, key), _value(d, key)
                    ok = all(isinstance(row[s + key], float | int) for s in "vd")
                    row["x" + key] = row["v" + key] / row["d" + key] if ok else None
                for side, r in (("v", v), ("d", d)):
                    row[side + "c"] = "/".join(
                        "–" if c is None else f"{c:.0f}"
                        for c in ((r or {}).get(f"{m}_compile_s") for m in MODES)
                    )
                rows.append(row)
    x = [("ViG", "vig", ""), ("baseline", "base", ""), ("size", "size", ""), ("batch", "b", "d")]
    for key, name, fmt in zip(
        keys, ("infer img/s", "train img/s", "train GB"), (",.0f", ",.1f", ".2f"), strict=True
    ):
        x += [(f"ViG {name}", "v" + key, fmt), (f"DeiT {name}", "d" + key, fmt)]
        x += [(("memory" if "GB" in name else name[:5]) + " ×", "x" + key, ".2f")]
    x += [("ViG compile s (infer/train)", "vc", ""), ("DeiT compile s", "dc", "")]
    lines = [
        "# ViG vs DeiT",
        "",
        harness.meta_line(meta) + f"; ViG BiGLA `{a['bigla_impl']}`; median of {a['iters']} runs.",
        "",
        "bf16, drop path off, same batch; training = AdamW step. Ratios ViG / DeiT (speed > 1: "
        "ViG faster; memory < 1: ViG smaller). timm: DeiT under torch.compile "
        f"(mode {a.get('timm_mode', 'default')}; SDPA; bf16 weights for inference, float32 + "
        "autocast for training); jax: our JAX DeiT.",
        "",
        *harness.table(rows, x),
    ]
    if any(meta["variants"].values()):
        lines += [
            "",
            "ViG variants: " + "; ".join(f"{k}: {v}" for k, v in meta["variants"].items()),
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--sizes", type=int, nargs="+", help="sweep these sizes instead of --cases")
    p.add_argument(
        "--pairs", nargs="+", default=["vig_t:deit_t", "vig_s:deit_b"], help="for --sizes"
    )
    p.add_argument("--batch", type=int, help="one batch for every case")
    p.add_argument("--variant", action="append", default=[], help="NAME[:key=val,...] (repeat)")
    p.add_argument("--vig-override", action="append", default=[], help="key=val for every ViG")
    p.add_argument("--bigla-impl", default="pallas", choices=("pallas", "chunked", "auto"))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--no-timm", action="store_true", help="skip the timm baseline")
    p.add_argument(
        "--timm-mode",
        default="reduce-overhead",
        choices=TIMM_MODES,
        help="torch.compile mode for DeiT (default: CUDA graphs)",
    )
    p.add_argument("--jax-deit", action="store_true", help="also measure our JAX DeiT")
    p.add_argument("--iters", type=int, default=20, help="timed runs per mode (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=900.0, help="per measured process")
    p.add_argument("--out", help="path stem (default benchmarks/results/vs_vit)")
    p.add_argument("--smoke", action="store_true", help="CPU check: depth-1 models at 32², B2")
    args = p.parse_args(argv)
    names = args.variant or ["default"]
    try:
        common = harness.parse_overrides(",".join(args.vig_override))
        args.variants = {n: {**common, **o} for n, o in map(harness.parse_variant, names)}
    except ValueError as exc:
        p.error(str(exc))
    if len(args.variants) != len(names):
        p.error(f"--variant names must differ: {names}")
    if args.smoke:
        args.iters, args.warmup, args.bigla_impl = 3, 1, "chunked"
        args.comparisons = [("vig_t", "deit_t", 32, args.batch or 2)]
    elif args.sizes:
        pairs = [pair.split(":") for pair in args.pairs]
        if any(len(pair) != 2 for pair in pairs):
            p.error(f"--pairs takes vig:deit names, got {args.pairs}")
        args.comparisons = [
            (v, d, s, args.batch or batch_for(s)) for s in args.sizes for v, d in pairs
        ]
    else:
        args.comparisons = [(v, d, s, args.batch or b) for v, d, s, b in map(CASES.get, args.cases)]
    args.out = args.out or (
        "/tmp/bench_vs_vit_smoke" if args.smoke else harness.REPO / "benchmarks/results/vs_vit"
    )
    from vig_jax.models import create_model, model_class

    for v, d, *_ in args.comparisons:  # unknown names and overrides fail before any process starts
        if d not in TIMM_NAMES:
            p.error(f"baseline {d!r} is not one of {list(TIMM_NAMES)}")
        try:
            if "drop_path_rate" not in {f.name for f in dataclasses.fields(model_class(v))}:
                p.error(f"{v!r} is not a ViG model")
            for overrides in args.variants.values():
                create_model(v, **harness.split_xla_options(overrides)[0])
        except ValueError as exc:
            p.error(str(exc))
    return args


def main(argv=None):
    args = parse_args(argv)
    baselines = ["timm"] if not args.no_timm and harness.importable("torch", "timm") else []
    if not args.no_timm and not baselines:
        harness.log("torch/timm not importable: no timm baseline (pip install -e '.[baselines]')")
    baselines += ["jax"] * args.jax_deit
    smoke = {"depth": 1} if args.smoke else {}
    meta = harness.metadata(args)
    meta.update(comparisons=args.comparisons, variants=args.variants, baselines=baselines)
    results = harness.Results(args.out, meta, markdown)
    plan = {}  # (framework, model, variant, size, batch) -> overrides, each measured once
    for vig, base, size, batch in args.comparisons:
        for variant, overrides in args.variants.items():
            plan[("jax", vig, variant, size, batch)] = {**smoke, **overrides}
        plan.update({(fw, base, "", size, batch): smoke for fw in baselines})
    for (fw, model, variant, size, batch), overrides in plan.items():
        case = dict(
            model=model,
            size=size,
            batch=batch,
            overrides=overrides,
            modes=args.modes,
            iters=args.iters,
            warmup=args.warmup,
            bigla_impl=args.bigla_impl,
            timm_mode=args.timm_mode,
        )
        fields = dict(framework=fw, model=model, variant=variant, size=size, batch=batch)
        fn = measure_timm if fw == "timm" else measure_jax
        env = harness.SMOKE_ENV if args.smoke else {}
        results.measure(fields, fn, case, env=env, timeout_s=args.timeout_s)
    results.done()
    print(results.markdown(results.doc))


if __name__ == "__main__":
    main()
