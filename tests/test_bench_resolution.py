"""Resolution benchmark and its plots: an end-to-end CPU smoke run, batch rule, OOM bookkeeping."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_resolution.py"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("bench_resolution")
plot = _load("plot")


def test_bench_resolution_smoke_writes_results_and_plots(tmp_path):
    # One size and one pair keep this to two measured subprocesses (~25 s of CPU).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no fake devices needed
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "resolution"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--sizes", "32", "--pairs", "vig_t:deit_t"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    meta = result["meta"]
    assert meta["smoke"] and meta["token_multiple"] == 64 and meta["device"] == "cpu"
    cases = {c["model"]: c for c in result["cases"]}
    assert set(cases) == {"vig_t", "deit_t"}
    for name, c in cases.items():
        assert (c["size"], c["batch"]) == (32, 2)
        assert c["infer"] == "ok" and c["train"] == "ok", (name, c["infer"], c["train"])
        assert c["infer_img_s"] > 0 and c["train_img_s"] > 0
        assert c["gmacs"] > 0 and c["gmacs"] == pytest.approx(c["xla_gflops"] / 2)
        assert c["train_xla_bytes"] > c["infer_xla_bytes"] > 0
    # Depth-1 models: 12 -> 1 blocks of the full models (DeiT-T block = 444,864 params).
    assert cases["deit_t"]["params"] == 5_717_416 - 11 * 444_864
    md = out.with_suffix(".md").read_text()
    assert "## vig_t vs deit_t" in md and "| 32² | 2 |" in md

    paths = plot.plot(result, tmp_path / "plots")
    assert [p.name for p in paths] == [
        "resolution_throughput.png",
        "resolution_memory.png",
        "resolution_flops.png",
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


@pytest.mark.parametrize(
    "size, batch", [(224, 128), (384, 43), (512, 24), (768, 10), (1024, 6), (1536, 2), (2048, 1)]
)
def test_bench_resolution_batch_rule(size, batch):
    assert bench.batch_for(size) == batch


def test_bench_resolution_oom_is_recorded_not_raised():
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.1GiB.")
    assert bench._status(oom) == "OOM"
    assert bench._status(ValueError("Unsupported sequence length\nmore")).startswith(
        "error: Unsupported sequence length"
    )
    meta = dict(
        device="H100", platform="gpu", jax="0.11.2", git_sha="abc", date_utc="now",
        dtype="bf16", bigla_impl="pallas", attention="cudnn", token_multiple=64, iters=10,
        warmup=2, smoke=False, pairs=["vig_t:deit_t"],
    )  # fmt: skip
    ok = dict(infer="ok", train="ok", infer_img_s=100.0, train_img_s=40.0, gmacs=2.0)
    ok.update(infer_peak_bytes=2**30, train_peak_bytes=2**31)
    cases = [
        dict(model="vig_t", size=1024, batch=6, params=5_834_536, **ok),
        dict(
            model="deit_t",
            size=1024,
            batch=6,
            params=5_717_416,
            **ok,
        ),
        dict(model="vig_t", size=2048, batch=1, params=5_834_536, **ok),
        dict(model="deit_t", size=2048, batch=1, infer="ok", train="OOM", infer_img_s=50.0),
    ]
    cases[1].update(infer_img_s=50.0, train_peak_bytes=2**32)
    md = bench.to_markdown({"meta": meta, "cases": cases})
    assert "| 1024² | 6 | 100 / 50 (2.00×) |" in md
    assert "2.00 / 4.00 (2.00×)" in md  # train peak GB, DeiT / ViG
    assert "| 2048² | 1 |" in md and "40.0 / OOM" in md
    xs, ys, note = plot._series(cases, "deit_t", "train_img_s", 1.0)
    assert xs == [1024] and note == " (OOM from 2048²)"
