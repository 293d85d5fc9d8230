"""Resolution benchmark and its plots: an end-to-end CPU smoke run, batch rule, OOM bookkeeping,
the concurrent sweep's scheduling (order, budget, OOM skips, incremental writes)."""

import argparse
import json
import os
import pathlib
import threading

import pytest

from tests.helpers import load_module, run_benchmark

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_resolution.py"


def _load(name):
    return load_module(REPO / "benchmarks" / f"{name}.py", name)


bench = _load("bench_resolution")
plot = _load("plot")


def test_bench_resolution_smoke_writes_results_and_plots(tmp_path):
    # One size and one pair keep this to two measured subprocesses (~25 s of CPU), run at once
    # (--jobs 2: concurrent compiles, timings serialised by the lock).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no fake devices needed
    out = tmp_path / "resolution"
    args = ["--smoke", "--sizes", "32", "--pairs", "vig_t:deit_t", "--jobs", "2", "--out", out]
    proc = run_benchmark(SCRIPT, *args, cache_dir=tmp_path / "cache", timeout=600, env=env)
    assert proc.stdout.count("32² B2") == 2  # one progress line per finished case
    result = json.loads(out.with_suffix(".json").read_text())
    meta = result["meta"]
    assert meta["smoke"] and meta["token_multiple"] == 64 and meta["device"] == "cpu"
    assert meta["jobs"] == 2 and meta["cases_done"] == "2/2"
    # Plan order (the pair's order), whichever child finished first.
    assert [c["model"] for c in result["cases"]] == ["vig_t", "deit_t"]
    cases = {c["model"]: c for c in result["cases"]}
    for name, c in cases.items():
        assert (c["size"], c["batch"]) == (32, 2)
        assert c["infer"] == "ok" and c["train"] == "ok", (name, c["infer"], c["train"])
        assert c["infer_img_s"] > 0 and c["train_img_s"] > 0
        assert 0 < c["infer_ms"] < 1e4 and 0 < c["train_ms"] < 1e5 and c["wall_s"] > 0
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
    assert xs == [1024] and note == " (OOM: 2048²)"


class _FakeProc:  # hashable, like subprocess.Popen
    def __init__(self, case):
        self.case = case


class _FakeFlops:
    def __init__(self, jobs, env):
        pass

    def results(self):
        return {("vig_t", 32): {"model": "vig_t", "size": 32, "params": 7, "gmacs": 1.5}}

    def close(self, timeout_s):
        pass


def _fake_sweep(monkeypatch, jobs, sizes, child, write):
    """bench.sweep with children faked by `child(case, timeout_s) -> result` (run in the pool's
    threads), no FLOP counter, and a clock that only `child` advances (clock["t"])."""
    clock = {"t": 1000.0}
    started = []

    def start_child(case, env):
        assert ("VIG_BENCH_GPU_LOCK" in env) == (jobs > 1)
        started.append((case["model"], case["size"], case["train"]))
        return _FakeProc(case)

    monkeypatch.setattr(bench, "_start_child", start_child)
    monkeypatch.setattr(bench, "_wait_child", lambda proc, t: child(proc.case, t, clock))
    monkeypatch.setattr(bench, "_FlopCounter", _FakeFlops)
    monkeypatch.setattr(bench.time, "time", lambda: clock["t"])
    args = argparse.Namespace(
        sizes=sizes, pairs=["vig_t:deit_t"], bigla_impl="chunked", attention="xla",
        token_multiple=64, iters=3, warmup=1, batch=2, budget_s=25.0, smoke=True, jobs=jobs,
    )  # fmt: skip
    return bench.sweep(args, write), started


def test_bench_resolution_sweep_budget_and_oom_skips(monkeypatch):
    """Each fake child takes 10 s against a 25 s budget; at 32² deit_t's inference and vig_t's
    training run out of memory."""
    timeouts = {}

    def child(case, timeout_s, clock):
        key = (case["model"], case["size"])
        timeouts[key] = timeout_s
        clock["t"] += 10.0
        if key == ("deit_t", 32):
            return {"infer": "OOM", "train": "not run"}
        res = dict(infer="ok", infer_img_s=10.0 * case["size"], train="skipped")
        if case["train"]:
            res.update(train="OOM" if key == ("vig_t", 32) else "ok", train_img_s=1.0)
        return res

    writes = []
    result, started = _fake_sweep(monkeypatch, 1, [32, 48, 64], child, writes.append)
    # vig_t 48² knew of the training OOM at 32² (train=False), deit_t 48² was skipped (inference
    # OOM at 32²); at 64² the budget had run out (clock at 30 s). A child's time limit is what
    # is left of budget + grace when it starts.
    assert started == [("vig_t", 32, True), ("deit_t", 32, True), ("vig_t", 48, False)]
    grace = 25.0 + bench.GRACE_S
    assert timeouts == {("vig_t", 32): grace, ("deit_t", 32): grace - 10, ("vig_t", 48): grace - 20}
    got = [(c["model"], c["size"], c["infer"], c["train"]) for c in result["cases"]]
    assert got == [
        ("vig_t", 32, "ok", "OOM"),
        ("deit_t", 32, "OOM", "not run"),
        ("vig_t", 48, "ok", "skipped"),
        ("deit_t", 48, "not run (OOM at a smaller size)", "not run"),
        ("vig_t", 64, "not run (time budget)", "not run (time budget)"),
        ("deit_t", 64, "not run (OOM at a smaller size)", "not run"),
    ]
    assert [c.get("wall_s") for c in result["cases"]] == [10.0, 10.0, 10.0, None, None, None]
    assert result["cases"][0]["gmacs"] == 1.5 and result["cases"][0]["params"] == 7
    assert result["meta"]["jobs"] == 1 and result["meta"]["cases_done"] == "6/6"
    assert len(writes) == 7 and writes[-1] == result  # after each case, then once at the end
    assert [c["infer"] for c in writes[0]["cases"]] == ["ok"] + ["pending"] * 5


def test_bench_resolution_sweep_keeps_plan_order_when_jobs_finish_out_of_order(monkeypatch):
    """Two jobs: vig_t 32² (case 0) finishes only after deit_t 32² (case 1) has been written."""
    second_written = threading.Event()
    writes = []

    def write(result):
        writes.append(result)
        if result["cases"][1]["infer"] == "ok":
            second_written.set()

    def child(case, timeout_s, clock):
        if (case["model"], case["size"]) == ("vig_t", 32):
            assert second_written.wait(30)
        return dict(infer="ok", infer_img_s=float(case["size"]), train="ok", train_img_s=1.0)

    result, started = _fake_sweep(monkeypatch, 2, [32, 48], child, write)
    plan = [("vig_t", 32), ("deit_t", 32), ("vig_t", 48), ("deit_t", 48)]
    assert [(m, s) for m, s, _ in started] == plan  # started in plan order
    assert [(c["model"], c["size"]) for c in result["cases"]] == plan
    assert [c["infer_img_s"] for c in result["cases"]] == [32.0, 32.0, 48.0, 48.0]
    assert [c["infer"] for c in writes[0]["cases"]] == ["pending", "ok", "pending", "pending"]
    assert writes[0]["meta"]["cases_done"] == "1/4" and result["meta"]["cases_done"] == "4/4"
    assert len(writes) == 5 and writes[-1] == result
    md = bench.to_markdown(writes[0])
    assert "| 32² | 2 | pending / 32 |" in md
