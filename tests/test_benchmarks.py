"""Each benchmark script's --smoke run (CPU, fresh Python, temporary output), and the harness."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import harness
from benchmarks.bench_bigla import auto_table_source
from benchmarks.bench_vs_vit import markdown as vs_vit_markdown

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _ok(row, *modes):
    for mode in modes:
        assert row[mode] == "ok", row
        assert row[f"{mode}_img_s"] > 0 and row[f"{mode}_compile_s"] > 0, row


def check_vs_vit(doc):
    assert [(r["framework"], r["model"], r["variant"]) for r in doc["rows"]] == [
        ("jax", "vig_t", "a"),
        ("jax", "vig_t", "b"),
    ]
    for r in doc["rows"]:
        _ok(r, "infer", "train")
    assert doc["meta"]["variants"] == {"a": {}, "b": {"use_out_act": False}}


def check_bigla(doc):
    assert [r["impl"] for r in doc["rows"]] == ["pallas a", "pallas b", "chunked"]
    for r in doc["rows"]:
        for p in ("fwd", "fwd_bwd"):
            assert r[f"{p}_ms"] > 0, r
            assert r[f"{p}_x_floor"] == pytest.approx(r[f"{p}_ms"] / r[f"{p}_floor_ms"])
    parity = doc["meta"]["parity"]
    assert set(parity) == {"pallas a", "pallas b", "chunked"}
    assert all(p["ok"] and p["dgb"] < 1e-4 for p in parity.values()), parity


def check_models(doc):
    (row,) = doc["rows"]
    assert (row["model"], row["impl"]) == ("vig_t", "chunked")
    _ok(row, "infer", "train")
    assert 0 < row["parity_rel_err"] < 1e-4  # chunked vs reference, float32, unit-scale params


def check_scaling(doc):
    assert [r["devices"] for r in doc["rows"]] == [1, 2]
    for r in doc["rows"]:
        assert r["img_s"] > 0 and r["loss_agrees"], r
    assert doc["rows"][1]["collectives"]["all-reduce"] >= 1  # gradients are averaged


def check_stem(doc):
    assert [r["form"] for r in doc["rows"]] == ["conv", "patches", "blocks"]
    assert all(r["fwd_ms"] > 0 and r["dkernel_ms"] > 0 for r in doc["rows"]), doc["rows"]


def check_swiglu(doc):
    (row,) = doc["rows"]
    assert row["form"] == "xla" and row["ms"] > 0 and row["tflops"] > 0, row


SMOKES = {
    "bench_vs_vit": (["--variant", "a", "--variant", "b:use_out_act=False"], check_vs_vit),
    "bench_bigla": (
        ["--impls", "pallas", "chunked", "--variant", "a", "--variant", "b:chunk=32"],
        check_bigla,
    ),
    "bench_models": ([], check_models),
    "bench_scaling": (["--devices", "1", "2"], check_scaling),
    "bench_stem": ([], check_stem),
    "bench_swiglu": ([], check_swiglu),
}


@pytest.mark.parametrize("script", list(SMOKES))
def test_smoke_writes_expected_rows(script, tmp_path):
    args, check = SMOKES[script]
    out = tmp_path / "result"
    # No persistent compilation cache: its programs differ, and on CPU a cached run's loss curve
    # was seen to differ from an uncached one's beyond the float32 tolerance.
    env = {**os.environ, **harness.SMOKE_ENV}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, BENCH / f"{script}.py", "--smoke", "--out", out, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["meta"]["git_sha"] and doc["meta"]["versions"]["jax"] and doc["meta"]["device"]
    check(doc)
    assert out.with_suffix(".md").read_text().count("\n|") >= 2 + len(doc["rows"])
    assert "wrote" in proc.stdout


def test_time_call_is_the_median_per_call():
    calls = []
    t = harness.time_call(lambda: calls.append(1), lambda _: None, warmup=2, iters=5)
    assert t["runs"] == 5 and t["k"] >= 1
    assert len(calls) == 2 + 1 + 5 * t["k"]  # warm-up, the sizing call, the timed runs
    assert 0 < t["ms"] < 1


def test_results_writes_json_and_markdown(tmp_path):
    def md(doc):
        return "\n".join(harness.table(doc["rows"], [("x", "x", ".1f"), ("y", "y", "")]))

    results = harness.Results(tmp_path / "r", {"git_sha": "abc"}, md)
    results.add({"x": 1.25, "y": "OOM", "device": "gpu0"})
    results.add({"x": None, "y": "a|b"})
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc == {"meta": {"git_sha": "abc", "device": "gpu0"},
                   "rows": [{"x": 1.25, "y": "OOM"}, {"x": None, "y": "a|b"}]}  # fmt: skip
    assert (tmp_path / "r.md").read_text().splitlines()[2:] == ["| 1.2 | OOM |", "| – | a/b |"]


def test_vs_vit_table_has_ratios_and_statuses():
    run = dict(framework="jax", size=224, batch=128, infer="ok", train="ok")
    vig = dict(run, model="vig_s", variant="v", infer_img_s=200.0, train_img_s=50.0,
               train_peak_gb=2.0)  # fmt: skip
    deit = dict(run, framework="timm", model="deit_b", variant="", infer_img_s=100.0,
                train="OOM")  # fmt: skip
    meta = {"versions": {"jax": "0"}, "git_sha": "abc", "date_utc": "now",
            "args": {"bigla_impl": "pallas", "iters": 3}, "variants": {"v": {}},
            "comparisons": [["vig_s", "deit_b", 224, 128]], "baselines": ["timm"]}  # fmt: skip
    line = vs_vit_markdown({"meta": meta, "rows": [vig, deit]}).splitlines()[-1]
    assert line.startswith("| vig_s | deit_b (timm) | 224² | 128 | 200 | 100 | 2.00 | 50.0 | OOM |")


def test_variants_parse_literals_and_reject_bad_items():
    assert harness.parse_variant("v:remat=block,dims=(32, 64),f=1e-3") == (
        "v", {"remat": "block", "dims": (32, 64), "f": 1e-3}
    )  # fmt: skip
    with pytest.raises(ValueError, match="is not key=value"):
        harness.parse_overrides("remat")
    proc = subprocess.run(
        [sys.executable, BENCH / "bench_vs_vit.py", "--smoke", "--variant", "x:no_such_field=1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and "unknown override(s) ['no_such_field']" in proc.stderr


def test_profile_sites_name_pass_and_module():
    from benchmarks.profile_step import site, torch_kernel_class

    name = "jit(train_step)/transpose(jvp(ViG))/ViG.features/blocks_11/attn/o_norm/reduce_sum"
    assert site(name) == "bwd blocks/attn/o_norm"
    assert site("jit(infer)/ViG.features/blocks_0/mlp/up/dot_general") == "fwd blocks/mlp/up"
    # The unbound model's own scope, as the inference program names it, is not a place:
    assert site("jit(infer)/ViG/blocks_3/attn/gate_up/dot_general") == "fwd blocks/attn/gate_up"
    assert site("jit(train_step)/mul") == "other"  # the optimizer: outside the model
    assert site(None) == "other"
    kernels = {
        "triton_per_fused_native_layer_norm_3": "reduce",
        "triton_poi_fused_gelu_7": "elementwise",
        "flash_fwd_kernel": "attention",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT": "matmul",
        "void multi_tensor_apply_kernel<...FusedAdamMathFunctor...>": "optimizer",
    }
    assert {k: torch_kernel_class(k) for k in kernels} == kernels


def test_profile_sites_of_a_compiled_step():
    import jax
    import jax.numpy as jnp

    from benchmarks.profile_step import hlo_sites
    from vig_jax.models import create_model

    model = create_model("vig_t", depth=1, bigla_impl="chunked")
    x = jnp.zeros((1, 32, 32, 3))
    params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)["params"]
    loss = lambda p: model.apply({"params": p}, x, train=False).sum()
    sites = set(hlo_sites(jax.jit(jax.grad(loss)).lower(params).compile().as_text()).values())
    for want in ("fwd blocks/mlp/up", "bwd blocks/mlp/up", "fwd blocks/attn/dwconv"):
        assert want in sites, sorted(sites)
    assert "bwd blocks/attn/o_norm" in sites or "bwd blocks/attn" in sites, sorted(sites)


def test_profile_bytes_count_outputs_and_operands():
    import jax
    import jax.numpy as jnp

    from benchmarks.profile_step import _shape_bytes, hlo_bytes

    assert _shape_bytes("(bf16[2,3]{1,0}, f32[4], pred[])") == 2 * 6 + 4 * 4 + 1
    x = jnp.ones(256)  # one fused op: reads x and y, writes the result
    hlo = jax.jit(lambda x, y: x * y + 1).lower(x, x).compile().as_text()
    assert list(hlo_bytes(hlo).values()) == [3 * 256 * 4]


def test_auto_table_keeps_the_faster_kernel_of_each_timed_shape():
    """bench_bigla's --auto-table text: per shape the first pallas variant against mosaic, the
    faster forward + backward; shapes where one of them failed are left out."""
    long, short = (8, 4096, 3, 32, 64), (128, 196, 6, 32, 64)
    rows = [
        dict(case="s", shape=short, impl="pallas default", fwd_bwd_ms=0.5),
        dict(case="s", shape=short, impl="pallas w4", fwd_bwd_ms=0.3),  # not the default
        dict(case="s", shape=short, impl="mosaic", fwd_bwd_ms=0.6),
        dict(case="l", shape=long, impl="pallas default", fwd_bwd_ms=0.5),
        dict(case="l", shape=long, impl="chunked", fwd_bwd_ms=0.1),
        dict(case="l", shape=long, impl="mosaic", fwd_bwd_ms=0.4),
        dict(case="x", shape=long, impl="pallas default", fwd_bwd_ms=0.5),
        dict(case="x", shape=long, impl="mosaic", fwd_bwd_ms="OOM"),
    ]
    namespace = {}
    exec(auto_table_source(rows, {"device": "GPU", "git_sha": "abc"}), namespace)
    assert "abc" in namespace["SOURCE"]
    got = [(r["N"], r["BH"], r["impl"], r["ms"]) for r in namespace["ROWS"]]
    assert got == [
        (196, 768, "pallas", {"pallas": 0.5, "mosaic": 0.6}),
        (4096, 24, "mosaic", {"pallas": 0.5, "mosaic": 0.4}),
    ]
