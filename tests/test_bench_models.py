"""Model benchmark driver: smoke run with --jobs 2, stable incremental results, timeouts, flags."""

import json
import math
import os
import pathlib
import sys
import time

import pytest

from tests.helpers import load_module, run_benchmark

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_models.py"

bench = load_module(SCRIPT, "bench_models")

from benchmarks.gpu_lock import LOCK_ENV  # noqa: E402  (importable once bench put REPO on the path)


def test_smoke_two_jobs_writes_every_case_in_order(tmp_path):
    # vig_t only (1 block): two children (infer, train) compiling at once, ~30 s of CPU.
    out = tmp_path / "models"
    args = ["--smoke", "--models", "vig_t", "--jobs", "2", "--out", out]
    proc = run_benchmark(SCRIPT, *args, cache_dir=tmp_path / "cache", timeout=300)
    data = json.loads(out.with_suffix(".json").read_text())
    meta, results = data["meta"], data["results"]
    assert meta["jobs"] == 2 and meta["smoke"] and meta["platform"] == "cpu" and meta["device"]
    assert (meta["batch"], meta["size"], meta["models"], meta["impls"]) == (
        2,
        64,
        ["vig_t"],
        ["chunked"],
    )
    assert [(r["model"], r["impl"], r["mode"]) for r in results] == [
        ("vig_t", "chunked", "infer"),
        ("vig_t", "chunked", "train"),
    ]
    for r in results:
        assert "error" not in r, r
        assert r["params"] > 0 and r["peak_bytes"] is None  # CPU has no memory_stats
        for key in ("compile_s", "step_ms_median", "step_ms_min", "img_per_s", "wall_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["step_ms_min"] <= r["step_ms_median"]
        assert r["img_per_s"] == pytest.approx(2 / (r["step_ms_median"] / 1e3))
        assert 0 <= r["lock_wait_s"] < r["wall_s"]
    # The lock serialised warm-up + timing: the two windows do not overlap.
    (a0, a1), (b0, b1) = sorted(r["timed_unix"] for r in results)
    assert a0 < a1 <= b0 < b1
    # chunked vs reference, float32: the two algorithms agree to rounding.
    assert results[0]["parity_rel_err"] < 1e-5 and "parity_rel_err" not in results[1]
    # One progress line per finished case.
    assert proc.stdout.count("[1/2]") == 1 and proc.stdout.count("[2/2]") == 1
    md = out.with_suffix(".md").read_text()
    assert "| vig_t | chunked |" in md and "error" not in md


def test_run_all_keeps_case_order_and_writes_after_each_case(tmp_path, monkeypatch):
    # Children finish in reverse order; every intermediate file holds the finished cases in order.
    cases = [
        ("vig_t", "chunked", "infer"),
        ("vig_t", "chunked", "train"),
        ("vig_s", "pallas", "infer"),
    ]
    seen = []

    def fake_child(case, passthrough, env, timeout_s):
        assert env is not None and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
        assert os.path.isdir(os.path.dirname(env[LOCK_ENV]))
        time.sleep(0.3 * (len(cases) - cases.index(case)))
        name, impl, mode = case
        if case == cases[1]:
            return dict(model=name, impl=impl, mode=mode, error="boom", wall_s=1.0)
        return dict(
            model=name, impl=impl, mode=mode, device="cpu", platform="cpu", params=1,
            compile_s=1.0, lock_wait_s=0.0, step_ms_median=2.0, step_ms_min=1.0, img_per_s=1e3,
            peak_bytes=None, parity_rel_err=0.0 if mode == "infer" else None, wall_s=1.0,
        )  # fmt: skip

    real_write = bench._write

    def spy_write(out, meta, results):
        real_write(out, meta, results)
        seen.append([(r["model"], r["impl"], r["mode"]) for r in results])

    monkeypatch.setattr(bench, "run_child", fake_child)
    monkeypatch.setattr(bench, "_write", spy_write)
    meta = dict(jax="x", jaxlib="x", git_sha=None, models=["vig_t", "vig_s"], batch=2, size=64)
    meta.update(impls=["chunked", "pallas"], dtype="bf16", steps=3, warmup=1, jobs=3)
    out = tmp_path / "m"
    results = bench.run_all(cases, [], meta, out, jobs=3, timeout_s=9.0)
    assert [(r["model"], r["impl"], r["mode"]) for r in results] == cases
    assert seen == [cases[2:], cases[1:], cases]
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["mode"] for r in data["results"]] == ["infer", "train", "infer"]
    assert data["meta"]["device"] == "cpu" and data["results"][1]["error"] == "boom"
    md = out.with_suffix(".md").read_text()
    assert "- vig_t chunked train: boom" in md and "| vig_s | pallas | 1,000 |" in md


def test_run_child_timeout_is_an_error(tmp_path):
    # The child is killed while still importing JAX; the case becomes an error, nothing raises.
    r = bench.run_child(("vig_t", "chunked", "infer"), ["--smoke"], None, timeout_s=0.2)
    assert (r["model"], r["impl"], r["mode"]) == ("vig_t", "chunked", "infer")
    assert r["error"].startswith("timed out after 0.2 s") and r["wall_s"] < 30


def test_parse_args():
    args = bench.parse_args(["--smoke"])
    assert args.models == ["vig_t", "vig_h_t"] and args.impls == ["chunked"]
    assert (args.batch, args.size, args.jobs, args.timeout_s) == (2, 64, 1, 900.0)
    args = bench.parse_args(["--jobs", "4", "--timeout-s", "60"])
    assert args.models == list(bench.MODELS) and args.impls == ["pallas", "chunked"]
    assert (args.jobs, args.timeout_s, args.batch) == (4, 60.0, 128)
    for bad in (["--jobs", "0"], ["--timeout-s", "0"], ["--models", "vig_x"], ["--impls", "cuda"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    with pytest.raises(SystemExit):  # smoke has tiny variants of vig_t and vig_h_t only
        bench.parse_args(["--smoke", "--models", "vig_s"])


def test_merge_results_takes_later_runs_in_canonical_order(tmp_path, monkeypatch):
    def case(model, impl, mode, img_per_s):
        return dict(model=model, impl=impl, mode=mode, device="H100", platform="gpu",
                    img_per_s=img_per_s, compile_s=1.0, step_ms_median=1.0, peak_bytes=None,
                    parity_rel_err=0.0 if mode == "infer" else None)  # fmt: skip

    common = dict(jax="0.11.2", jaxlib="0.11.2", batch=128, size=224, dtype="bf16", steps=10)
    common.update(warmup=3, smoke=False, device="H100")
    first = dict(
        meta=dict(common, git_sha="aaa", models=["vig_s", "vig_h_t"], impls=["pallas"], jobs=8),
        results=[case("vig_s", "pallas", "infer", 1.0), case("vig_h_t", "pallas", "infer", 2.0)],
    )
    second = dict(
        meta=dict(common, git_sha="bbb", models=["vig_h_t"], impls=["chunked", "pallas"], jobs=5),
        results=[case("vig_h_t", "pallas", "infer", 3.0), case("vig_h_t", "chunked", "train", 4.0)],
    )
    merged = bench.merge_results([first, second])
    got = [(r["model"], r["impl"], r["mode"], r["img_per_s"]) for r in merged["results"]]
    assert got == [
        ("vig_s", "pallas", "infer", 1.0),
        ("vig_h_t", "pallas", "infer", 3.0),  # measured twice: the later run's
        ("vig_h_t", "chunked", "train", 4.0),
    ]
    meta = merged["meta"]
    assert meta["models"] == ["vig_s", "vig_h_t"] and meta["impls"] == ["pallas", "chunked"]
    assert [r["git_sha"] for r in meta["runs"]] == ["aaa", "bbb"]
    # Through the command line: the table names both runs.
    files = []
    for k, doc in enumerate((first, second)):
        files.append(tmp_path / f"run{k}.json")
        files[-1].write_text(json.dumps(doc))
    out = tmp_path / "merged"
    monkeypatch.setattr(sys, "argv", ["bench", "--merge", *map(str, files), "--out", str(out)])
    bench.main()
    md = out.with_suffix(".md").read_text()
    assert "at git aaa, 8 case(s) at once" in md and "at git bbb, 5 case(s)" in md
    assert "| vig_h_t | pallas | 3 |" in md
    second["meta"]["size"] = 384
    with pytest.raises(ValueError, match="differ in size"):
        bench.merge_results([first, second])
