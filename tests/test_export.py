"""`python -m vig_jax.export`: the serialized artifact loads with plain `jax.export.deserialize`
(this package blocked from import), takes any batch size, and matches the model's logits."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import assert_close
from vig_jax.convert import save_params
from vig_jax.models import create_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = {
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 2,
}  # configs/demo.py shrunk: 48 px, 3x3 tokens

# Runs in a fresh Python in which importing vig_jax or pallas_kernels fails: the artifact must
# not need them. Prints the logits of two batch sizes as JSON.
PLAIN_JAX = """
import json, sys
sys.modules["vig_jax"] = None
sys.modules["pallas_kernels"] = None
import jax, numpy as np
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
rng = np.random.default_rng(0)
out = [exported.call(rng.integers(0, 256, (b, 48, 48, 3), dtype=np.uint8)).tolist() for b in (1, 5)]
print(json.dumps(out))
"""


def test_export_round_trip_in_plain_jax(tmp_path):
    model = create_model("vig_t", num_classes=10, bigla_impl="reference", **OVERRIDES)
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 48, 48, 3)), train=False)["params"])
    params = init(jax.random.PRNGKey(0))
    save_params(jax.device_get(params), tmp_path / "converted", model_name="vig_t", num_classes=10)
    out = tmp_path / "model.jax_exported"
    flags = [f"--config.model.overrides.{k}={v}" for k, v in OVERRIDES.items()]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vig_jax.export",
            f"--checkpoint={tmp_path / 'converted'}",
            "--config=configs/demo.py",
            *flags,
            f"--out={out}",
            "--platforms=cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "-> logits [B, 10]" in proc.stdout
    info = json.loads(out.with_name(out.name + ".json").read_text())
    assert info["input"] == {"shape": ["B", 48, 48, 3], "dtype": "uint8"}
    assert info["platforms"] == ["cpu"] and info["crop_pct"] == 0.875
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_JAX, str(out)], capture_output=True, text=True, timeout=300
    )
    assert plain.returncode == 0, plain.stderr
    got = json.loads(plain.stdout)
    rng = np.random.default_rng(0)
    mean, std = np.array((0.485, 0.456, 0.406)), np.array((0.229, 0.224, 0.225))
    for b, logits in zip((1, 5), got, strict=True):
        images = rng.integers(0, 256, (b, 48, 48, 3), dtype=np.uint8)
        x = (images / 255.0 - mean) / std
        want = model.apply({"params": params}, jnp.asarray(x, jnp.float32), train=False)
        assert_close(f"logits, batch {b}", logits, want, 1e-5)
