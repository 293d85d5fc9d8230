"""Scaling benchmark: smoke run on 1 and 2 fake CPU devices, efficiency, device env, checks."""

import json
import pathlib

import pytest

from tests.helpers import load_module, run_benchmark

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_scaling.py"

bench = load_module(SCRIPT, "bench_scaling")


def test_smoke_on_one_and_two_fake_devices(tmp_path):
    # Two subprocesses (1 and 2 devices), each compiling two tiny steps: ~30 s of CPU.
    out = tmp_path / "scaling.json"
    # FSDP (the smoke lowers fsdp_min_size so the tiny model's kernels are sharded) covers both
    # modes' machinery: on 1 device it is plain data parallel.
    args = ["--smoke", "--devices", "1", "2", "--fsdp", "--out", out]
    run_benchmark(SCRIPT, *args, cache_dir=tmp_path / "cache", timeout=600)
    r = json.loads(out.read_text())
    assert r["smoke"] and r["fsdp"] and r["dtype"] == "float32" and r["platform"] == "cpu"
    assert r["loss_rtol"] == bench.LOSS_RTOL["float32"] == 1e-4
    assert r["loss_global_batch"] == 8 and r["skipped_devices"] == [] and r["jax"]
    cases = {c["devices"]: c for c in r["cases"]}
    assert sorted(cases) == [1, 2]
    for n, c in cases.items():
        assert c["global_batch"] == 4 * n and c["img_per_s"] > 0
        assert c["efficiency"] == pytest.approx(c["img_per_s"] / (n * cases[1]["img_per_s"]))
        assert c["peak_gb_per_device"] == [None] * n  # CPU has no memory_stats
        assert len(c["loss_curve"]) == 8
    assert cases[1]["efficiency"] == 1.0 and cases[1]["loss_max_rel_diff"] == 0.0
    # One device needs no collective; two (FSDP) gather params and reduce gradients.
    assert set(cases[1]["collectives"]) == set(bench.COLLECTIVES)
    assert not any(cases[1]["collectives"].values()), cases[1]["collectives"]
    assert cases[2]["collectives"]["all-gather"] > 0, cases[2]["collectives"]
    # Same global batch, seed and keys split over 2 devices (FSDP): float32 agreement.
    assert cases[2]["loss_max_rel_diff"] <= r["loss_rtol"] and cases[2]["loss_agrees"]
    # The curve is not flat (per-step augmentation keys and updates), so agreement is not trivial.
    curve = cases[1]["loss_curve"]
    assert max(curve) - min(curve) > 10 * r["loss_rtol"] * abs(curve[0])
    md = out.with_suffix(".md").read_text()
    assert md.startswith("| devices | global batch | img/s | efficiency |") and "| 2 | 8 |" in md


def test_scaling_efficiency():
    eff = bench.scaling_efficiency({4: 3000.0, 1: 1000.0, 2: 1900.0})
    assert list(eff) == [1, 2, 4]
    assert eff == pytest.approx({1: 1.0, 2: 0.95, 4: 0.75})
    assert bench.scaling_efficiency({2: 1900.0, 8: 7000.0}) == {2: None, 8: None}


def test_max_rel_diff():
    assert bench.max_rel_diff([2.0, 1.1, 3.0], [2.0, 1.0, 3.0]) == pytest.approx(0.1)
    assert bench.max_rel_diff([1.0], [1.0]) == 0.0
    with pytest.raises(ValueError, match="equal length"):
        bench.max_rel_diff([1.0, 2.0], [1.0])


def test_child_env_restricts_devices():
    base = {"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=4", "PATH": "/bin"}
    cpu = bench.child_env(2, "cpu", base, smoke=False)
    assert cpu["XLA_FLAGS"] == "--foo  --xla_force_host_platform_device_count=2"
    assert cpu["JAX_PLATFORMS"] == "cpu" and cpu["PATH"] == "/bin"
    assert bench.child_env(4, "gpu", {}, smoke=False)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    gpu = bench.child_env(2, "gpu", {"CUDA_VISIBLE_DEVICES": "3,5,6"}, smoke=False)
    assert gpu["CUDA_VISIBLE_DEVICES"] == "3,5"


def test_loss_batch_must_split_over_every_device_count():
    with pytest.raises(SystemExit):
        bench.parse_args(["--devices", "1", "3", "--loss-batch", "128"])
    args = bench.parse_args(["--devices", "1", "2", "8"])
    assert (args.loss_batch, args.loss_steps, args.steps, args.per_device_batch) == (
        128,
        50,
        20,
        128,
    )


def test_summarize_flags_disagreeing_curves():
    args = bench.parse_args(["--devices", "1", "2", "4"])  # GPU defaults: bf16, tolerance 2e-2
    base = {"compile_s": 1.0, "step_ms_median": 1.0, "device_kind": "H100", "jax": "0.11.2"}
    cases = [
        {**base, "devices": 1, "global_batch": 128, "img_per_s": 1000.0, "loss_curve": [7.0, 6.0]},
        {**base, "devices": 2, "global_batch": 256, "img_per_s": 1800.0, "loss_curve": [7.0, 6.1]},
        {**base, "devices": 4, "global_batch": 512, "img_per_s": 3000.0, "loss_curve": [7.0, 6.3]},
    ]
    for c in cases:
        c["peak_gb_per_device"] = [10.0] * c["devices"]
    r = bench.summarize(args, cases, "gpu")
    assert r["loss_rtol"] == 2e-2 and r["dtype"] == "bfloat16" and r["device_kind"] == "H100"
    got = {c["devices"]: (c["efficiency"], c["loss_max_rel_diff"], c["loss_agrees"]) for c in cases}
    assert got[1] == (1.0, 0.0, True)
    assert got[2] == (pytest.approx(0.9), pytest.approx(0.1 / 6), True)
    assert got[4] == (pytest.approx(0.75), pytest.approx(0.05), False)
    md = bench.markdown(r)
    assert "| 4 | 512 | 3,000 | 0.750 | 1.0 | 10.00 | 5.0e-02 | 1.0 |" in md
    # Without a 1-device case there is nothing to compare against.
    r = bench.summarize(args, [dict(cases[1])], "gpu")
    assert r["cases"][0]["efficiency"] is None and r["cases"][0]["loss_agrees"] is None


def test_merge_combines_separate_runs(tmp_path):
    """1 and 2 devices measured in separate calls: --merge recomputes efficiency and agreement,
    and takes the run settings from the parts (the 1-device part's fsdp does not count)."""
    flags = ["--loss-batch", "256"]
    args_of = {1: bench.parse_args(flags), 2: bench.parse_args([*flags, "--fsdp"])}
    base = {"compile_s": 1.0, "step_ms_median": 1.0, "device_kind": "H100", "jax": "0.11.2"}
    one = {**base, "devices": 1, "global_batch": 128, "img_per_s": 1000.0}
    two = {**base, "devices": 2, "global_batch": 256, "img_per_s": 1900.0}
    one["loss_curve"], two["loss_curve"] = [7.0, 6.0], [7.0, 6.06]
    files = []
    for case in (two, one):  # order of the files does not matter
        case["peak_gb_per_device"] = [10.0] * case["devices"]
        path = tmp_path / f"part{case['devices']}.json"
        part = bench.summarize(args_of[case["devices"]], [dict(case)], "gpu")
        path.write_text(json.dumps(part))
        files.append(str(path))
    out = tmp_path / "merged.json"
    bench.main(["--merge", *files, "--out", str(out)])
    merged = json.loads(out.read_text())
    assert merged["fsdp"] and merged["loss_global_batch"] == 256 and merged["loss_rtol"] == 2e-2
    got = [(c["devices"], c["efficiency"], c["loss_agrees"]) for c in merged["cases"]]
    assert got == [(1, 1.0, True), (2, pytest.approx(0.95), True)]
    assert "| 2 | 256 | 1,900 | 0.950 |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="appears twice"):
        bench.main(["--merge", files[1], files[1], "--out", str(out)])
    other = json.loads(pathlib.Path(files[0]).read_text())
    other["dtype"] = "float32"
    pathlib.Path(files[0]).write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="differ in dtype"):
        bench.main(["--merge", *files, "--out", str(out)])


def test_cases_cut_short_are_reported_not_raised():
    """A device count killed during its loss curve keeps its throughput; one killed before
    timing shows its error; the summary and table still come out."""
    args = bench.parse_args(["--devices", "1", "2", "4"])
    base = {"compile_s": 1.0, "step_ms_median": 1.0, "device_kind": "H100", "jax": "0.11.2"}
    one = {**base, "devices": 1, "global_batch": 128, "img_per_s": 1000.0, "loss_curve": [7.0]}
    two = {**base, "devices": 2, "global_batch": 256, "img_per_s": 1800.0, "loss_curve": None}
    two["error"] = "timed out after 300 s"
    four = {"devices": 4, "error": "exit code 1"}
    for c in (one, two):
        c["peak_gb_per_device"] = [5.0] * c["devices"]
    r = bench.summarize(args, [one, two, four], "gpu")
    got = [(c["devices"], c["efficiency"], c["loss_agrees"]) for c in r["cases"]]
    assert got == [(1, 1.0, True), (2, pytest.approx(0.9), None), (4, None, None)]
    md = bench.markdown(r)
    assert "| 2 | 256 | 1,800 | 0.900 |" in md and "| 4 | exit code 1 |" in md
    assert "2 device(s): timed out after 300 s" in md
