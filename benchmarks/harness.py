"""The benchmark harness every `bench_*.py` script is built on.

Timing (`time_call`): the program is compiled ahead of time (`compile_jax` records the compile
seconds) or, for torch, compiled by its first calls, which the warm-up absorbs; then `iters` runs
of k back-to-back calls each, k chosen so that one run lasts about `RUN_SECONDS` (dispatch is
hidden), every run ended by waiting on all of its last call's outputs; the result is the median
seconds per call. Programs of a few microseconds repeat inside one jit instead (`jax_repeat`).

Memory: JAX's `peak_bytes_in_use` is process-wide and cannot be reset, so a script that reports
memory measures each case in a fresh Python (`run_isolated`); torch resets its own counter
(`torch_peak_reset` / `torch_peak_bytes`).

Results (`Results`): metadata (versions, git sha, date, arguments; the device comes from the cases)
and rows, written to `<out>.json` and `<out>.md` after every finished case, so a run cut short keeps
what it measured. An out-of-memory error is recorded as "OOM" (`status`) and the run goes on.
"""

import ast
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN_SECONDS = 0.05  # target length of one timed run of k back-to-back calls
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OutOfMemoryError")
_START = time.perf_counter()


def log(msg: str) -> None:
    """A progress line with the seconds since the script started."""
    print(f"[{time.perf_counter() - _START:6.0f} s] {msg}", flush=True)


def status(exc: BaseException) -> str:
    """The status of a failed case: "OOM" for out of memory, else "error: <first line>"."""
    msg = str(exc)
    if any(m in msg for m in OOM_MARKERS) or type(exc).__name__ in OOM_MARKERS:
        return "OOM"
    return "error: " + (msg.strip().splitlines() or [type(exc).__name__])[0][:300]


def time_call(call: Callable, sync: Callable, *, warmup: int = 2, iters: int = 20) -> dict:
    """Median time of `call()` over `iters` runs of k back-to-back calls, after `warmup` calls.

    Args:
      call: runs the program once and returns its outputs (it may carry state between calls).
      sync: waits until the outputs passed to it are ready (e.g. `jax.block_until_ready`).

    Returns:
      {"ms": median milliseconds per call, "k": calls per run, "runs": iters}.
    """
    for _ in range(warmup):
        sync(call())
    t0 = time.perf_counter()
    sync(call())
    single = time.perf_counter() - t0
    k = max(1, min(1000, math.ceil(RUN_SECONDS / max(single, 1e-7))))
    runs = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(k):
            out = call()
        sync(out)
        runs.append((time.perf_counter() - t0) / k)
    return {"ms": statistics.median(runs) * 1e3, "k": k, "runs": iters}


def compile_jax(
    fn: Callable, *args, donate_argnums=(), compiler_options: dict | None = None
) -> tuple[Callable, float]:
    """`jax.jit(fn)` (or `fn` itself if already jitted: its shardings and donation kept) compiled
    ahead of time for `args` (arrays or ShapeDtypeStructs), and the seconds that took.
    `compiler_options`: XLA options for this program only (`split_xla_options`)."""
    import jax

    t0 = time.perf_counter()
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, donate_argnums=donate_argnums)
    compiled = jitted.lower(*args).compile(compiler_options or None)
    return compiled, time.perf_counter() - t0


def split_xla_options(overrides: dict) -> tuple[dict, dict]:
    """(model fields, XLA options) of a variant's overrides: keys starting with "xla_" are XLA
    options for the compiled programs (`compile_jax`), e.g. `xla_gpu_cublas_fallback=False`, the
    rest `create_model` fields. An option XLA does not know fails that variant's compile."""
    xla = {k: v for k, v in overrides.items() if k.startswith("xla_")}
    return {k: v for k, v in overrides.items() if k not in xla}, xla


def jax_repeat(fn: Callable, n: int) -> Callable:
    """`fn(*args)` called n times inside one program, for µs-scale programs whose dispatch would
    be timed otherwise. Each call's outputs pass through an optimization barrier with the inputs,
    so no call is hoisted out of the loop or removed; the last call's outputs are returned."""
    import jax
    import jax.numpy as jnp

    def repeated(*args):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))

        def body(_, carry):
            return jax.lax.optimization_barrier((carry[0], fn(*carry[0])))

        return jax.lax.fori_loop(0, n, body, (args, zeros))[1]

    return repeated


def jax_peak_bytes() -> int | None:
    """Peak bytes in use on the first device since the process started (None on CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats else None


def torch_sync(_=None) -> None:
    """Waits for the GPU's queued work (`time_call`'s sync for torch; a no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def torch_peak_bytes() -> int | None:
    """Peak bytes allocated by torch since the last `torch_peak_reset` (None without CUDA)."""
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def importable(*names: str) -> bool:
    """Whether every named top-level package can be imported (checked without importing it)."""
    return all(importlib.util.find_spec(n) is not None for n in names)


def git_sha() -> str:
    """HEAD, with "-dirty" if the working tree differs; $GIT_SHA if set; "unknown" without git."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]

    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True)

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return git("rev-parse", "HEAD").stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata(args) -> dict:
    """Versions (read from package metadata: no backend starts), git sha, UTC date, arguments."""
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "torch", "timm", "triton", "flash-linear-attention"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "git_sha": git_sha(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
    }


def _smoke_xla_flags() -> str:
    """-O0 (halves XLA:CPU compiles, changes no HLO) and the caller's other XLA flags (e.g. a test
    run's workarounds; tests/conftest.py) but its fake device count: one CPU device."""
    drop = ("--xla_force_host_platform_device_count", "--xla_backend_optimization_level")
    keep = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(drop)]
    return " ".join([*keep, "--xla_backend_optimization_level=0"])


SMOKE_ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": _smoke_xla_flags()}  # --smoke cases


def _probe(case: dict, report) -> dict:
    import jax

    d = jax.devices()
    return {"platform": d[0].platform, "count": len(d), "kind": d[0].device_kind}


def probe_devices() -> dict:
    """{"platform", "count", "kind"} of JAX's default devices, asked of a fresh Python (this process
    stays off the device, which the cases need)."""
    return run_isolated(_probe, {})


def run_isolated(fn: Callable, case: dict, *, env: dict | None = None, timeout_s=None) -> dict:
    """`fn(case, report)` run in a fresh Python; returns the dict it returned.

    `fn` must be a module-level function of a script or module; `report(partial)` saves what the
    case measured so far, so that a child that dies later (an abort inside a library, a timeout)
    still gives it, with "status" set to why it stopped. The child's stdout streams through; its
    stderr is kept for that message. `env` adds to this process's environment; JAX in the child
    may take 92% of the device (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set) so that "OOM" means
    the card.
    """
    env = {**os.environ, **(env or {})}
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    script = sys.modules[fn.__module__].__file__
    with tempfile.TemporaryDirectory(prefix="bench_case_") as tmp:
        out = pathlib.Path(tmp) / "result.json"
        err = pathlib.Path(tmp) / "stderr.txt"
        cmd = [sys.executable, __file__, script, fn.__name__, json.dumps(case), str(out)]
        why = None
        with open(err, "w") as stderr:
            try:
                proc = subprocess.run(cmd, env=env, stderr=stderr, timeout=timeout_s)
                if proc.returncode:
                    why = f"exit code {proc.returncode}"
            except subprocess.TimeoutExpired:
                why = f"timeout after {timeout_s:g} s"
        result = json.loads(out.read_text()) if out.exists() else {}
        if why and not result.get("done"):
            tail = err.read_text().strip().splitlines()[-3:]
            oom = any(m in line for line in tail for m in OOM_MARKERS)
            result["status"] = "OOM" if oom else f"{why}: {' | '.join(tail)[-400:]}"
    result.pop("done", None)
    return result


def _child_main(script: str, name: str, case_json: str, out: str) -> None:
    spec = importlib.util.spec_from_file_location("_bench_child", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = pathlib.Path(out)

    def report(partial: dict) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(partial))
        os.replace(tmp, path)

    try:
        result = getattr(module, name)(json.loads(case_json), report)
    except Exception as exc:  # recorded with what the case reported before it
        result = {**(json.loads(path.read_text()) if path.exists() else {}), "status": status(exc)}
    report({**result, "done": True})


class Results:
    """Metadata plus rows, rewritten to `<out>.json` and `<out>.md` on every `add`.

    `markdown(doc) -> str` renders the document {"meta", "rows"}. A row's "device" moves into the
    metadata (the first one seen). Installs a SIGTERM handler that exits through Python, so that
    a time limit's SIGTERM also kills `run_isolated`'s child.
    """

    def __init__(self, out: str | pathlib.Path, meta: dict, markdown: Callable[[dict], str]):
        self.out = pathlib.Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.doc = {"meta": meta, "rows": []}
        self.markdown = markdown
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    def add(self, row: dict) -> dict:
        device = row.pop("device", None)
        if device and not self.doc["meta"].get("device"):
            self.doc["meta"]["device"] = device
        self.doc["rows"].append(row)
        self.write()
        return row

    def write(self) -> None:
        for suffix, text in (
            (".json", json.dumps(self.doc, indent=1) + "\n"),
            (".md", self.markdown(self.doc)),
        ):
            path = self.out.with_suffix(suffix)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

    def measure(self, fields: dict, fn: Callable, case: dict, **kwargs) -> dict:
        """Adds the row {**fields, **run_isolated(fn, case, **kwargs)}, with progress lines."""
        label = " ".join(map(str, fields.values()))
        log(f"{label} ...")
        row = self.add({**fields, **run_isolated(fn, case, **kwargs)})
        parts = [
            f"{k} {v:,.4g}"
            for k, v in row.items()
            if k.endswith(("img_s", "peak_gb", "compile_s")) and isinstance(v, float)
        ]
        bad = [f"{k}: {row[k]}" for k in ("infer", "train", "status") if row.get(k, "ok") != "ok"]
        log(f"{label}: {', '.join(parts + bad)}")
        return row

    def done(self) -> None:
        log(f"wrote {self.out.with_suffix('.json')} and {self.out.with_suffix('.md')}")


def table(rows: list[dict], columns: list[tuple]) -> list[str]:
    """Markdown table lines. columns: (header, key or row -> value, format spec); a value that is
    a string (a status such as "OOM") is shown as is, None as "–"."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = key(row) if callable(key) else row.get(key)
            if value is None:
                cells.append("–")
            elif isinstance(value, str):
                cells.append(value.replace("|", "/")[:80])
            else:
                cells.append(format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def meta_line(meta: dict) -> str:
    """One line of metadata for a markdown table's caption."""
    v = meta["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "torch", "timm") if k in v)
    return (
        f"{meta.get('device', 'unknown device')}; {libs}; git {meta['git_sha'][:12]}; "
        f"{meta['date_utc']}"
    )


def parse_overrides(text: str) -> dict:
    """Parses "a=1,b=shift" to {"a": 1, "b": "shift"}: values are Python literals, else strings.

    Raises:
      ValueError: an item without "=".
    """
    out = {}
    for item in filter(None, re.split(r",(?=\s*\w+\s*=)", text)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def parse_variant(text: str) -> tuple[str, dict]:
    """Parses "name:key=val,key=val" (or "name") to (name, overrides)."""
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"variant {text!r} has no name (name:key=val,...)")
    return name, parse_overrides(rest)


if __name__ == "__main__":
    _child_main(*sys.argv[1:])
