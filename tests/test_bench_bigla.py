"""BiGLA benchmark driver: `--smoke --jobs 2` end to end (children, merge order, JSON),
ahead-of-time compile outside the timing lock, child failures and timeouts recorded as errors."""

import contextlib
import json
import math
import pathlib
import sys
import threading

import jax.numpy as jnp

from tests.helpers import load_module, run_benchmark

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_bigla.py"

bench = load_module(SCRIPT, "bench_bigla")

# float32 interpret-mode Pallas vs the float32 reference: ~4e-7 measured, so 1e-5 is loose yet far
# below what a wrong gate, direction or chunk boundary gives (O(1)).
PARITY_TOL = 1e-5


def test_smoke_with_two_jobs(tmp_path):
    # Copy bandwidth in the parent, then 2 parity + 2 timing children, 2 at a time (~40 s of CPU).
    args = ["--smoke", "--jobs", "2", "--out", tmp_path]
    proc = run_benchmark(SCRIPT, *args, cache_dir=tmp_path / "cache", timeout=600)
    r = json.loads((tmp_path / "bigla.json").read_text())
    assert r["jobs"] == 2 and r["dtype"] == "float32" and r["params"]["interpret"]
    assert r["copy_GBps"] > 0 and math.isfinite(r["copy_GBps"])
    # Every case present, in the order of the case list (not the order children finished in).
    assert list(r["parity"]) == list(r["cases"]) == list(bench.SMOKE_CASES)
    for case, errs in r["parity"].items():
        assert set(errs) == {"o", "dq", "dk", "dv", "dgf", "dgb"}, (case, errs)
        for name, e in errs.items():
            assert 0 <= e < PARITY_TOL, (case, name, e)  # NaN fails too
    for case, c in r["cases"].items():
        assert c["shape"] == list(bench.SMOKE_CASES[case]) and "errors" not in c, c
        for p in ("fwd", "fwd_bwd"):
            assert set(c["time_us"][p]) == set(bench.IMPLS), (case, p, c["time_us"][p])
            for name, t in c["time_us"][p].items():
                assert math.isfinite(t) and t > 0, (case, p, name, t)
            assert math.isfinite(c["floor_us"][p]) and c["floor_us"][p] > 0
        # The backward moves more bytes than the forward.
        assert c["floor_us"]["fwd_bwd"] > c["floor_us"]["fwd"]
    md = (tmp_path / "bigla.md").read_text()
    assert "| smoke_short (1, 40, 2, 16, 32) | fwd_bwd |" in md and "- smoke_long: o " in md
    for k in range(1, 5):  # one progress line per finished child
        assert f"[{k}/4] " in proc.stdout, proc.stdout


def test_time_fns_compiles_before_taking_the_lock(monkeypatch):
    events = []

    @contextlib.contextmanager
    def fake_lock():
        events.append("lock")
        yield
        events.append("unlock")

    def fn(x):
        events.append("trace")  # Python runs only while tracing, i.e. while lowering
        return (x * 2.0,)

    def bad(x):
        raise ValueError("does not trace")

    monkeypatch.setattr(bench, "timing_lock", fake_lock)
    x = jnp.ones((8,), jnp.float32)
    times, errors = bench.time_fns({"ok": (fn, (x,)), "bad": (bad, (x,))}, iters=2, repeats=3)
    # Traced (eval_shape + loop body) and compiled before the lock; nothing compiles under it.
    assert events[-2:] == ["lock", "unlock"] and set(events[:-2]) == {"trace"}
    assert list(times) == ["ok"] and times["ok"] > 0
    assert list(errors) == ["bad"] and "does not trace" in errors["bad"]


def test_failed_or_hung_child_is_an_error():
    args = bench.parse_args(["--smoke", "--out", "unused"])
    params = bench.kernel_params(args)
    cmd = bench.child_cmd(args, params, 1.0, "time", "no_such_case")
    assert cmd[cmd.index("--copy-gbps") + 1] == "1.0" and "--smoke" in cmd
    r, _ = bench.run_child(cmd, None, timeout_s=120)
    assert r["error"].startswith("child exited with 2") and "no_such_case" in r["error"], r
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    assert bench.run_child(sleeper, None, timeout_s=0.5) == ({"error": "timed out after 0.5 s"}, [])


def test_children_merge_in_case_order_whatever_finishes_first(monkeypatch):
    args = bench.parse_args(["--smoke", "--out", "unused", "--jobs", "4"])
    params = bench.dataclasses.replace(bench.kernel_params(args), chunk=128, num_warps=8)
    results = {"copy_GBps": 2.5, "parity": {}, "cases": {}}
    snapshots, three_done, cmds = [], threading.Event(), {}

    def save():
        snapshots.append((list(results["parity"]), list(results["cases"])))
        if len(snapshots) == 3:
            three_done.set()

    def fake_run_child(cmd, env, timeout_s):
        kind, name = cmd[cmd.index("--child-case") + 1].split(":")
        cmds[kind, name] = cmd
        assert env == {"LOCK": "x"} and timeout_s == args.case_timeout_s
        if (kind, name) == ("parity", "smoke_short"):
            assert three_done.wait(60)  # finishes last
        if (kind, name) == ("time", "smoke_short"):
            return {"error": "boom"}, ["a log line"]
        return ({"o": 1e-7} if kind == "parity" else {"time_us": {}, "floor_us": {}}), []

    monkeypatch.setattr(bench, "run_child", fake_run_child)
    cases = bench.SMOKE_CASES
    bench.run_children(args, params, {"LOCK": "x"}, results, cases, cases, save)
    assert len(snapshots) == 4 and "smoke_short" not in snapshots[2][0]
    assert list(results["parity"]) == list(results["cases"]) == list(cases)
    assert results["cases"]["smoke_short"] == {"shape": [1, 40, 2, 16, 32], "error": "boom"}
    # Children get the resolved kernel params and the parent's copy bandwidth.
    cmd = " ".join(cmds["time", "smoke_long"])
    assert "--chunk 128 --num-warps 8" in cmd and "--copy-gbps 2.5" in cmd and "--smoke" in cmd


def test_markdown_shows_failed_cases():
    results = {
        "device": "cpu",
        "jax": "0",
        "git_sha": "abc",
        "copy_GBps": 1.0,
        "dtype": "float32",
        "params": {},
        "parity": {"smoke_short": {"error": "child exited with 1: ...\nValueError: boom"}},
        "cases": {"smoke_long": {"shape": [1, 300, 1, 16, 32], "error": "timed out after 9 s"}},
    }
    md = bench.markdown(results)
    assert "| smoke_long (1, 300, 1, 16, 32) | error: timed out after 9 s |" in md
    assert "- smoke_short: error: ValueError: boom" in md
