"""Where a ViG step spends its device time: a jax.profiler trace summed per op class and per XLA op.

    python benchmarks/profile_step.py                          # ViG-S 224²/B128 and ViG-T 1024²/B8
    python benchmarks/profile_step.py --case vig_s:224:128 --override fused_proj=True
    python benchmarks/profile_step.py --case vig_s:224:128 --timm deit_s:224:128  # + timm DeiT-S
    python benchmarks/profile_step.py --case vig_h_s:224:128 --infer-only       # inference alone
    python benchmarks/profile_step.py --smoke                  # CPU check: tiny model, tiny images

For each case (model:size:batch), bf16 compute with float32 params (`create_model(...,
dtype=bfloat16)`), three jitted programs are compiled ahead of time and timed (`harness.time_call`,
median of `--iters` runs):
  infer      forward, train=False;
  grad       loss and gradients (forward + backward);
  train      the AdamW step (grad + optimizer update), state donated.
`train - grad` is the optimizer's share and `grad - infer` (roughly) the backward's; `--infer-only`
compiles the first alone (for ViG cases). Then `--steps`
train steps (and as many inference steps) run under `jax.profiler.trace`; the device events of the
trace are joined with the optimized HLO of the program (each event names its HLO op) and summed per
op class:

  bigla      the Pallas BiGLA kernels          matmul     cuBLAS / Triton GEMM fusions, dots
  dwconv     depthwise (grouped) convolutions  conv       other convolutions (the stem)
  reduce     fusions with a reduction (norms, softmax-CE, the optimizer's norms)
  copy       copies and transposes             elementwise  other fusions          other  the rest

and per place in the model (forward or backward, the Flax module path from the ops' metadata, e.g.
"bwd blocks/attn/o_norm") and class, with the HBM bytes its ops move (outputs and operands, from the
HLO shapes) and the bandwidth that implies (far below the card's ~4 TB/s: compute, latency or
launch bound; near it: the bytes are the cost), and per HLO op, the top `--top` of each. With
`--timm`, timm's DeiT as `bench_vs_vit` runs it (torch.compile, bf16) is timed and profiled with
torch.profiler in the same process, its CUDA kernels summed per class by name (attention, matmul,
Inductor's fused reductions and pointwise kernels, the fused AdamW), so that the two steps can be
compared class by class.
Output: a markdown table per case on stdout and `<out>/profile.md`, `<out>/profile.json`.
"""

import argparse
import collections
import functools
import gzip
import json
import math
import os
import pathlib
import re
import sys
import tempfile
import time

# XLA on GPU groups a step's kernels into command buffers (CUDA graphs), whose trace events hide the
# ops inside; profile them one by one. (Step times are then those without command buffers too.)
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import harness  # noqa: E402
from vig_jax.models import create_model, inference_compiler_options  # noqa: E402

CLASSES = ("bigla", "matmul", "dwconv", "conv", "reduce", "copy", "elementwise", "other")
DEFAULT_CASES = ("vig_s:224:128", "vig_t:1024:8")


@functools.lru_cache(maxsize=2)  # hlo_classes, hlo_sites and hlo_bytes parse the same module
def hlo_bodies(hlo_text: str) -> dict[str, str]:
    """The text of every computation of an optimized HLO module, by computation name (read-only:
    the dict is cached)."""
    bodies: dict[str, str] = {}
    current, lines = None, []
    for line in hlo_text.splitlines():
        head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" " * 4):
            current, lines = head.group(1), []
            continue
        if line.strip() == "}" and current is not None:
            bodies[current] = "\n".join(lines)
            current = None
            continue
        if current is not None:
            lines.append(line)
    return bodies


INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\(.*?\)|\S+)\s+([\w-]+)\((.*)$")


def instructions(body: str):
    """(line, name, opcode, rest after the opening parenthesis) of every instruction of an HLO
    computation's text."""
    for line in body.splitlines():
        m = INSTRUCTION.match(line)
        if m:
            yield line, *m.groups()


def fused_body(bodies: dict[str, str], rest: str) -> str:
    """The text of the computation a fusion's `calls=` names ("" if none)."""
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    return bodies.get(called.group(1), "") if called else ""


def hlo_classes(hlo_text: str) -> dict[str, str]:
    """Op class of every instruction of an optimized HLO module, by instruction name.

    A fusion is classed by what its fused computation holds (a dot, a convolution, a reduction, only
    copies/transposes); a custom call by its target (cuBLAS/cuDNN) or its Pallas kernel name.
    """
    bodies = hlo_bodies(hlo_text)

    def kind(text: str) -> str:
        if "bigla" in text:
            return "bigla"
        if re.search(r"convolution\(|cudnn\$conv", text):
            group = re.search(r"feature_group_count=(\d+)", text)
            return "dwconv" if group and int(group.group(1)) > 1 else "conv"
        if re.search(r" dot\(|gemm|cublas|triton_gemm", text):
            return "matmul"
        if re.search(r" reduce\(|reduce-window\(", text):
            return "reduce"
        ops = set(re.findall(r"=\s*\S+\s+([\w-]+)\(", text))
        if ops and ops <= {"copy", "transpose", "bitcast", "parameter", "reshape", "tuple"}:
            return "copy"
        return "elementwise"

    classes = {}
    for body in bodies.values():
        for _, name, opcode, rest in instructions(body):
            if opcode == "fusion":
                classes[name] = kind(fused_body(bodies, rest) + " " + rest)
            elif opcode == "custom-call":
                # Pallas kernels lower to Triton custom calls; the model's only ones are BiGLA's.
                triton = "xla.gpu.triton" in rest or "__gpu$" in rest
                classes[name] = "bigla" if triton else kind(rest).replace("elementwise", "other")
            elif opcode in ("copy", "transpose"):
                classes[name] = "copy"
            elif opcode in ("dot", "convolution", "reduce"):
                classes[name] = kind(f" {opcode}(" + rest)
            else:
                classes[name] = "other"
    return classes


def site(op_name: str | None) -> str:
    """Where in the model an HLO op comes from, from its `op_name` metadata: the pass ("fwd", or
    "bwd" under a transpose) and the first three Flax module names with block indices dropped,
    e.g. "bwd blocks/attn/o_norm"; ops outside the model (loss, optimizer) are "other"."""
    if not op_name:
        return "other"
    parts = op_name.split("/")[:-1]  # the last part names the primitive
    bwd = any(p.startswith("transpose(") for p in parts)
    mods = [
        re.sub(r"_\d+$", "", p)
        for p in parts
        # not transforms, Model.method scopes or einsum specs
        if not re.search(r"[(,>]", p) and not re.match(r"^[A-Z]\w*\.\w+$", p)
    ]
    if mods and mods[0][:1].isupper():  # the model's own scope (e.g. "ViG" when applied unbound)
        mods = mods[1:]
    if not mods:
        return "other"
    return ("bwd " if bwd else "fwd ") + "/".join(mods[:3])


def hlo_sites(hlo_text: str) -> dict[str, str]:
    """`site` of every instruction of the module's entry computation, by instruction name.

    A fusion without metadata of its own takes its fused computation's root's (or, failing that,
    the most frequent `op_name` inside it).
    """
    bodies = hlo_bodies(hlo_text)
    op_name = lambda text: (re.search(r'op_name="([^"]+)"', text) or [None, None])[1]
    sites = {}
    for body in bodies.values():
        for _, name, opcode, rest in instructions(body):
            found = op_name(rest)
            if found is None and opcode == "fusion":
                inner = fused_body(bodies, rest)
                root = [x for x in inner.splitlines() if x.lstrip().startswith("ROOT")]
                found = op_name(root[0]) if root else None
                if found is None:
                    names = re.findall(r'op_name="([^"]+)"', inner)
                    found = collections.Counter(names).most_common(1)[0][0] if names else None
            sites[name] = site(found)
    return sites


def device_events(trace_dir: str) -> list[dict]:
    """Complete events of the device timelines of a perfetto trace (CPU: the XLA op threads)."""
    path = sorted(pathlib.Path(trace_dir).rglob("*perfetto_trace.json.gz"))[-1]
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    gpu = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    out = []
    for e in events:
        if e.get("ph") != "X" or "hlo_op" not in e.get("args", {}):
            continue
        if gpu and e["pid"] not in gpu:
            continue
        out.append(e)
    return out


DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}


def _shape_bytes(text: str) -> int:
    """Bytes of the arrays an HLO shape (or tuple of shapes) names, e.g. "bf16[128,196,384]"."""
    total = 0
    for dtype, dims in re.findall(r"\b(pred|s8|u8|bf16|f16|s32|u32|f32)\[([\d,]*)\]", text):
        total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def hlo_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each instruction of the entry computation reads and writes in HBM: its output and its
    operands, each counted whole (an upper bound where an op reads part of an operand)."""
    bodies = hlo_bodies(hlo_text)
    entry = re.search(r"^ENTRY\s+%?([\w.\-]+)", hlo_text, re.M)
    body = bodies.get(entry.group(1), "") if entry else ""
    shapes, ops = {}, []
    for line, name, opcode, rest in instructions(body):
        shapes[name] = line.split("=", 1)[1].split(f" {opcode}(", 1)[0]
        ops.append((name, opcode, rest))
    free = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
    out = {}
    for name, opcode, rest in ops:
        if opcode in free:
            continue
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        out[name] = _shape_bytes(shapes[name]) + sum(
            _shape_bytes(shapes.get(a, "")) for a in operands
        )
    return out


def summarize(
    events,
    module: str,
    classes: dict[str, str],
    sites: dict[str, str],
    nbytes: dict[str, int],
    steps: int,
    top: int,
) -> dict:
    """Device ms per step per class, per model site (`hlo_sites`) and class with the HBM bytes its
    ops move (`hlo_bytes`, MB per step), and per HLO op, for the events of one HLO module."""
    per_op = collections.Counter()
    for e in events:
        if module not in e["args"].get("hlo_module", ""):
            continue
        per_op[e["args"]["hlo_op"]] += e["dur"] / 1e3 / steps  # us -> ms per step
    per_class, per_site, site_mb = (
        collections.Counter(),
        collections.Counter(),
        collections.Counter(),
    )
    for op, ms in per_op.items():
        per_class[classes.get(op, "other")] += ms
        where = f"{sites.get(op, 'other')} ({classes.get(op, 'other')})"
        per_site[where] += ms
        site_mb[where] += nbytes.get(op, 0) / 1e6
    return {
        "total_ms": sum(per_op.values()),
        "classes": {c: per_class.get(c, 0.0) for c in CLASSES},
        "sites": [(w, ms, site_mb[w]) for w, ms in per_site.most_common(top)],
        "top": [(op, classes.get(op, "other"), ms) for op, ms in per_op.most_common(top)],
        # The BiGLA kernels repeat per layer and fill the top; the rest, with where they come from:
        "top_xla": [
            (op, classes.get(op, "other"), sites.get(op, "other"), ms)
            for op, ms in per_op.most_common()
            if classes.get(op) != "bigla"
        ][:top],
    }


def run_case(spec: str, overrides: dict, args) -> dict:
    name, size, batch = spec.split(":")
    size, batch = int(size), int(batch)
    fields, xla = harness.split_xla_options(overrides)
    model = create_model(name, dtype=jnp.bfloat16, **fields)
    key = jax.random.key(0)
    images = jax.random.normal(key, (batch, size, size, 3), jnp.float32)
    labels = jax.random.randint(key, (batch,), 0, model.num_classes)
    params = jax.jit(lambda x: model.init(key, x[:1], train=False)["params"])(images)
    tx = optax.adamw(1e-4, weight_decay=0.05)
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def infer(p, x):
        return model.apply({"params": p}, x, train=False)

    def grad(p, x, y):
        return jax.value_and_grad(loss_fn)(p, x, y)

    def train_step(p, s, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    compiled, compile_s = {}, {}
    infer_options = {**inference_compiler_options(), **xla}  # as bench_vs_vit compiles it
    programs = [
        ("infer", infer, (params, images), (), infer_options),
        ("grad", grad, (params, images, labels), (), xla),
        ("train", train_step, (params, opt_state, images, labels), (0, 1), xla),
    ]
    for label, fn, fargs, donate, options in programs[: 1 if args.infer_only else 3]:
        compiled[label], compile_s[label] = harness.compile_jax(
            fn, *fargs, donate_argnums=donate, compiler_options=options
        )
        print(f"  {spec} {label}: compiled in {compile_s[label]:.1f} s", flush=True)

    state = [params, opt_state]

    def run_train():
        state[0], state[1], loss = compiled["train"](state[0], state[1], images, labels)
        return loss

    calls = {
        "infer": lambda: compiled["infer"](state[0], images),
        "grad": lambda: compiled["grad"](state[0], images, labels),
        "train": run_train,
    }
    ms = {
        label: harness.time_call(call, jax.block_until_ready, warmup=3, iters=args.iters)["ms"]
        for label, call in calls.items()
        if label in compiled
    }
    profile = {}
    profiled = [label for label in ("train", "infer") if label in compiled]
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for label in profiled:
                for _ in range(args.steps):
                    jax.block_until_ready(calls[label]())
        events = device_events(trace_dir)
    for label in profiled:
        hlo = compiled[label].as_text()
        if args.dump_hlo:  # to read the fusions the tables name
            (args.dump_hlo / f"{spec.replace(':', '_')}_{label}.hlo.txt").write_text(hlo)
        module = re.search(r"HloModule\s+([\w.\-]+)", hlo).group(1)
        profile[label] = summarize(
            events, module, hlo_classes(hlo), hlo_sites(hlo), hlo_bytes(hlo), args.steps, args.top
        )
    peak = None
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak = stats["peak_bytes_in_use"] / 1e9
    return {
        "case": spec,
        "overrides": overrides,
        "img_per_s": {k: batch / v * 1e3 for k, v in ms.items()},
        "ms": ms,
        "optimizer_ms": ms["train"] - ms["grad"] if "train" in ms else None,
        "compile_s": compile_s,
        "peak_gb_process": peak,
        "profile": profile,
    }


TORCH_CLASSES = (
    "attention", "matmul", "conv", "reduce", "elementwise", "optimizer", "copy", "other"
)  # fmt: skip


def torch_kernel_class(name: str) -> str:
    """Op class of a CUDA kernel of a compiled torch step, by kernel name (Inductor's Triton
    kernels: triton_per_* / triton_red_* reduce, triton_poi_* pointwise)."""
    n = name.lower()
    rules = [
        ("attention", ("flash", "fmha", "attention", "sdpa")),
        ("optimizer", ("adam", "multi_tensor")),
        ("conv", ("conv", "fprop", "dgrad", "wgrad")),
        ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
        ("reduce", ("triton_per", "triton_red", "reduce")),
        ("elementwise", ("triton", "elementwise", "vectorized")),
        ("copy", ("copy", "memcpy", "memset", "cat")),
    ]
    return next((c for c, keys in rules if any(k in n for k in keys)), "other")


def run_timm_case(spec: str, args) -> dict:
    """timm's DeiT (`spec` deit_t|deit_s|deit_b:size:batch[:torch.compile mode]) as bench_vs_vit
    runs it, profiled with torch.profiler: device ms per step per kernel class and top kernels."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_vs_vit import timm_deit

    name, size, batch, *mode = spec.split(":")
    size, batch = int(size), int(batch)
    deit = timm_deit(name, size, batch, mode=mode[0] if mode else "default")
    cuda = torch.cuda.is_available()
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    ms, compile_s, profile_out = {}, {}, {}
    for label in ("infer", "train"):
        call = deit[label]()
        t0 = time.perf_counter()
        harness.torch_sync(call())
        compile_s[label] = time.perf_counter() - t0
        ms[label] = harness.time_call(call, harness.torch_sync, warmup=3, iters=args.iters)["ms"]
        with profile(activities=[activity]) as prof:
            for _ in range(args.steps):
                call()
            harness.torch_sync()
        per_kernel = collections.Counter()
        for e in prof.key_averages():
            # Kernels only: a CPU op's self device time is its kernels', which would count twice.
            if cuda and e.device_type != DeviceType.CUDA:
                continue
            us = e.self_device_time_total if cuda else e.self_cpu_time_total
            if us > 0:
                per_kernel[e.key] += us / 1e3 / args.steps
        per_class = collections.Counter()
        for k, v in per_kernel.items():
            per_class[torch_kernel_class(k)] += v
        profile_out[label] = {
            "total_ms": sum(per_kernel.values()),
            "classes": {c: per_class.get(c, 0.0) for c in TORCH_CLASSES},
            "top": [
                (k[:90], torch_kernel_class(k), v) for k, v in per_kernel.most_common(args.top)
            ],
        }
        del call
    return {
        "case": spec,
        "framework": f"timm {name}, torch.compile" + (f" mode {mode[0]}" if mode else ""),
        "img_per_s": {k: batch / v * 1e3 for k, v in ms.items()},
        "ms": ms,
        "compile_s": compile_s,
        "profile": profile_out,
    }


def _class_table(prof: dict, classes: tuple[str, ...], label: str) -> list[str]:
    """Markdown rows: device ms per step and share of each class, training and inference."""
    modes = [m for m in ("train", "infer") if m in prof]
    lines = [f"| {label} |" + "".join(f" {m} ms/step | % |" for m in modes)]
    lines.append("|---|" + "---|---|" * len(modes))
    for c in classes:
        cells = [(prof[m]["classes"][c], prof[m]["total_ms"]) for m in modes]
        lines.append(
            f"| {c} |" + "".join(f" {v:.2f} | {100 * v / max(t, 1e-9):.0f} |" for v, t in cells)
        )
    lines.append("| **device total** |" + "".join(f" {prof[m]['total_ms']:.2f} | |" for m in modes))
    return lines


def markdown_timm(result: dict) -> str:
    ms, prof = result["ms"], result["profile"]
    lines = [
        f"### {result['case']} ({result['framework']})",
        "",
        f"wall ms/step: infer {ms['infer']:.2f}, train {ms['train']:.2f}; img/s infer "
        f"{result['img_per_s']['infer']:,.0f}, train {result['img_per_s']['train']:,.0f}",
        "",
        *_class_table(prof, TORCH_CLASSES, "kernel class"),
    ]
    lines += ["", "| top train kernels | class | ms/step |", "|---|---|---|"]
    lines += [f"| `{k}` | {c} | {v:.3f} |" for k, c, v in prof["train"]["top"]]
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    ms, prof = result["ms"], result["profile"]
    wall = ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
    if result["optimizer_ms"] is not None:
        wall += f" (optimizer ≈ {result['optimizer_ms']:.2f})"
    img_s = ", ".join(f"{k} {result['img_per_s'][k]:,.0f}" for k in ("infer", "train") if k in ms)
    lines = [
        f"### {result['case']} {result['overrides'] or ''}",
        "",
        f"wall ms/step: {wall}; img/s {img_s}; compile s "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["compile_s"].items()),
        "",
        *_class_table(prof, CLASSES, "op class"),
    ]
    for mode in [m for m in ("train", "infer") if m in prof]:
        lines += [
            "",
            f"| where in the model (op class), {mode} | ms/step | % | MB moved | GB/s |",
            "|---|---|---|---|---|",
        ]
        total = max(prof[mode]["total_ms"], 1e-9)
        lines += [
            f"| {w} | {v:.3f} | {100 * v / total:.1f} | {mb:,.0f} | {mb / max(v, 1e-9):,.0f} |"
            for w, v, mb in prof[mode]["sites"]
        ]
    mode = "train" if "train" in prof else "infer"
    lines += ["", f"| top {mode} ops | class | ms/step |", "|---|---|---|"]
    lines += [f"| `{op}` | {c} | {v:.3f} |" for op, c, v in prof[mode]["top"]]
    lines += ["", f"| top {mode} ops outside BiGLA | class | where | ms/step |"]
    lines += ["|---|---|---|---|"]
    lines += [f"| `{op}` | {c} | {w} | {v:.3f} |" for op, c, w, v in prof[mode]["top_xla"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", action="append", help="model:size:batch (repeatable)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="create_model key=value; xla_* keys are XLA options of the compiled programs",
    )
    p.add_argument(
        "--timm",
        action="append",
        default=[],
        help="also profile timm's DeiT as bench_vs_vit runs it: deit_t|deit_s|deit_b:size:batch, "
        "optionally :MODE (torch.compile mode, e.g. reduce-overhead)",
    )
    p.add_argument("--steps", type=int, default=5, help="profiled steps per program")
    p.add_argument("--iters", type=int, default=20, help="timed runs per program (median)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None, help="folder for profile.{md,json}")
    p.add_argument("--dump-hlo", action="store_true", help="write each optimized HLO to --out")
    p.add_argument(
        "--infer-only",
        action="store_true",
        help="compile, time and profile the inference program only (models whose training step "
        "compiles for minutes, e.g. ViG-H)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny CPU run")
    args = p.parse_args(argv)
    overrides = harness.parse_overrides(",".join(args.override))
    cases = args.case or list(DEFAULT_CASES)
    if args.smoke:
        cases = args.case or ["vig_t:64:2"]
        overrides = {"depth": 1, "bigla_impl": "chunked", **overrides}
        args.steps, args.iters = 1, 2
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="profile_step_"))
    out.mkdir(parents=True, exist_ok=True)
    args.dump_hlo = out if args.dump_hlo else None
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "argv": sys.argv[1:]}
    results, text = [], f"# profile_step on {meta['device']} (jax {meta['jax']})\n\n"
    jobs = [(spec, lambda s: run_case(s, overrides, args), markdown) for spec in cases]
    jobs += [(spec, lambda s: run_timm_case(s, args), markdown_timm) for spec in args.timm]
    for spec, run, render in jobs:
        print(f"{spec}: compiling and timing", flush=True)
        result = run(spec)
        results.append(result)
        text += render(result) + "\n"
        print(render(result), flush=True)
        (out / "profile.md").write_text(text)
        (out / "profile.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out / 'profile.md'}")


if __name__ == "__main__":
    main()
