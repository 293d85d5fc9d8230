"""Input benchmarks (benchmarks/bench_input.py, bench_input_stages.py): smoke runs on a few
generated JPEGs."""

import json
import pathlib

import pytest

from tests.helpers import load_module, run_benchmark

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_input.py"


def test_smoke_writes_every_run_and_the_dataset_facts(tmp_path):
    out = tmp_path / "input"
    args = ["--smoke", "--out-dir", out, "--images", 20, "--workers", 0, "--seconds", 0.2]
    run_benchmark(SCRIPT, *args, cache_dir=tmp_path / "cache", timeout=300)
    result = json.loads((out / "input.json").read_text())
    modes = [(r["mode"], r["workers"]) for r in result["runs"]]
    assert modes == [("train", 0), ("eval", 0), ("eval_replay", 0)]
    assert all(r["img_per_s"] > 0 and r["images"] > 0 for r in result["runs"])
    assert set(result["stage_ms"]) == {
        "read",
        "decode",
        "train",
        "train_without_randaugment",
        "randaugment",
        "eval",
    }
    assert all(ms > 0 for ms in result["stage_ms"].values())
    dataset = result["dataset"]
    assert dataset["prepare_images"] == 40  # 20 train + 2 val per class, 10 classes
    assert 300 < dataset["mean_width_height"][0] < 500 and dataset["mean_jpeg_kb"] > 20
    table = (out / "input.md").read_text()
    assert "| train | 0 |" in table and "| eval | 0 |" in table


def test_stage_table_compares_a_revision_with_the_working_tree(tmp_path, capsys):
    stages = load_module(REPO / "benchmarks" / "bench_input_stages.py", "bench_input_stages")
    old_t, old_ra = stages.load_revision("HEAD", tmp_path)
    # The revision's own modules, the transforms wired to the revision's RandAugment.
    assert pathlib.Path(old_t.__file__).parent == tmp_path
    assert old_t.RandAugment is old_ra.RandAugment
    args = ["--before", "HEAD", "--images", 3, "--rounds", 1, "--out-dir", tmp_path / "out"]
    assert stages.main([str(a) for a in args]) == 0
    result = json.loads((tmp_path / "out" / "stages.json").read_text())
    compared = {s: set(v) for s, v in result["stages"].items()}
    assert compared["training transform (the above)"] == {"before", "after"}
    assert compared["evaluation transform (decode, resize, crop)"] == {"before", "after"}
    assert compared["decode (full size, RGB)"] == {"same"}
    assert all(ms > 0 for v in result["stages"].values() for ms in v.values())
    assert "| training transform (the above) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--before no-such-revision"):
        stages.load_revision("no-such-revision", tmp_path)
    # A checkout folder without git (what a GPU machine gets from `git archive`).
    checkout = tmp_path / "checkout"
    (checkout / "vig_jax" / "data").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no .*randaugment.py"):
        stages.load_revision(str(checkout), tmp_path)
    for name in ("randaugment", "transforms"):
        source = REPO / "vig_jax" / "data" / f"{name}.py"
        (checkout / "vig_jax" / "data" / f"{name}.py").write_text(source.read_text())
    old_t, old_ra = stages.load_revision(str(checkout), tmp_path / "out")
    assert old_t.RandAugment is old_ra.RandAugment and hasattr(old_t, "TrainTransform")
