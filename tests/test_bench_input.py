"""Input benchmark (benchmarks/bench_input.py): a smoke run on a few generated JPEGs, in-process."""

import json
import pathlib

from tests.helpers import run_benchmark

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_input.py"


def test_smoke_writes_every_run_and_the_dataset_facts(tmp_path):
    out = tmp_path / "input"
    args = ["--smoke", "--out-dir", out, "--images", 20, "--workers", 0, "--seconds", 0.2]
    run_benchmark(SCRIPT, *args, cache_dir=tmp_path / "cache", timeout=300)
    result = json.loads((out / "input.json").read_text())
    assert [(r["mode"], r["workers"]) for r in result["runs"]] == [("train", 0), ("eval", 0)]
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
