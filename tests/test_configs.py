"""configs/: each config loads, carries the official recipe, builds its model; clear CLI errors."""

import pathlib
import subprocess
import sys

import pytest

from tests.helpers import load_module
from vig_jax.models import create_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
# name: (model, base lr per 512, weight decay, drop path); spec/vig.md and configs/vig_h_{s,b}.py.
RECIPES = {
    "vig_t": ("vig_t", 1e-3, 0.05, 0.0),
    "vig_s": ("vig_s", 5e-4, 0.1, 0.2),
    "vig_b": ("vig_b", 1e-3, 0.05, 0.5),
    "vig_h_t": ("vig_h_t", 8e-4, 0.05, 0.2),
    "vig_h_s": ("vig_h_s", 8e-4, 0.05, 0.3),
    "vig_h_b": ("vig_h_b", 8e-4, 0.05, 0.6),
}


def load(name):
    path = ROOT / "configs" / f"{name}.py"
    return load_module(path, f"configs.{name}").get_config()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_imagenet_config_follows_official_recipe(name):
    c = load(name)
    model, lr, wd, drop_path = RECIPES[name]
    assert c.model.name == model and c.model.overrides.drop_path_rate == drop_path
    assert c.model.dtype == "bfloat16"
    assert (c.data.dataset, c.data.image_size, c.data.crop_pct) == ("imagenet2012", 224, 0.875)
    assert c.data.batch_size == 1024
    assert c.data.augment.randaugment == "rand-m9-mstd0.5-inc1"
    assert tuple(c.data.augment.scale) == (0.08, 1.0) and c.data.augment.hflip
    assert (c.aug.mixup_alpha, c.aug.cutmix_alpha, c.aug.switch_prob) == (0.8, 1.0, 0.5)
    assert (c.aug.label_smoothing, c.aug.random_erasing) == (0.1, 0.25)
    o = c.optimizer
    assert (o.base_lr, o.weight_decay, o.clip_norm) == (lr, wd, 5.0)
    assert (o.epochs, o.warmup_epochs, o.warmup_lr, o.min_lr) == (300, 20, 5e-7, 5e-6)
    assert (o.b1, o.b2, o.eps) == (0.9, 0.999, 1e-8)
    assert c.loop.total_steps is None and not c.mesh.fsdp
    # The model section builds (no init: ImageNet-size params are not allocated here).
    create_model(c.model.name, num_classes=1000, **c.model.overrides.to_dict())


def test_demo_config_builds_small_model():
    c = load("demo")
    assert c.data.dataset == "vig_demo_shapes"
    create_model(c.model.name, num_classes=10, **c.model.overrides.to_dict())


def _train_cli(*flags):
    return subprocess.run(
        [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", "/nonexistent/x"]
        + list(flags),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_unknown_config_field_fails_before_start():
    out = _train_cli("--config.optimizer.base_lrr=0.1")
    assert out.returncode == 2  # user error (docs/faults.md)
    assert "unknown config field 'optimizer.base_lrr' in --config.optimizer.base_lrr" in out.stderr
    assert 'Did you mean "base_lr"' in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_wrong_type_fails_before_start():
    out = _train_cli("--config.data.batch_size=abc")
    assert out.returncode == 2
    assert "--config.data.batch_size=abc" in out.stderr and "invalid literal" in out.stderr
    assert "Traceback" not in out.stderr
