"""Fine-tuning (issue 17): init_from, the layer-decay and frozen-backbone knobs, transfer.

init_from reads a training workdir or a converted folder; re-initialises the head only when the
class count differs (or `reinit_head`); resizes plain ViG's position table exactly as the model
does at run time; reports every misfit in one error before compiling; and an interrupted
fine-tune resumes from its own checkpoint. The last test runs `benchmarks/run_transfer.py --smoke`
(Fashion-MNIST 0-4 -> 5-9, 100 images per class); see its comment for what it can assert.
"""

import dataclasses
import json
import os
import pathlib
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from tests.helpers import (
    assert_close,
    load_module,
    run_benchmark,
    shared_tfds_dir,
    skip_or_fail_in_ci,
)
from vig_jax.convert import save_params
from vig_jax.data import fashion_mnist
from vig_jax.models import create_model
from vig_jax.train import init_from, optim, sharding
from vig_jax.train.checkpoint import Checkpointer, read_saved_params
from vig_jax.train.trainer import make_trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(*, embed_dim=32, depth=1, image_size=32, **model) -> ml_collections.ConfigDict:
    """A 1-block width-32 plain ViG at 32 px (2x2 tokens) on the demo set, float32."""
    c = common.base_config()
    c.model = common.model_section(
        "vig_t",
        dtype="float32",
        embed_dim=embed_dim,
        depth=depth,
        num_heads=2,
        drop_path_rate=0.0,
        **model,
    )
    c.model.bigla_impl = "reference"
    c.data = common.data_section(
        dataset="vig_demo_shapes",
        image_size=image_size,
        batch_size=8,
        eval_batch_size=8,
        num_workers=0,
        augment=ml_collections.ConfigDict({"kind": "pad_crop", "padding": 2, "hflip": True}),
    )
    c.aug = common.deit_aug_section(random_erasing=0.0, mixup=0.0, cutmix=0.0)
    c.optimizer = common.adamw_section(
        base_lr=0.5, weight_decay=0.05, epochs=10.0, warmup_epochs=0.0
    )
    c.loop = common.loop_section(log_every_steps=1, eval_every_steps=100, ckpt_every_steps=2)
    c.loop.progress_bar = False
    c.mesh = common.mesh_section()
    return c


def trainer_for(config, num_classes=10):
    return make_trainer(
        config, mesh=sharding.make_mesh(), num_classes=num_classes, steps_per_epoch=10
    )


def flat(tree):
    return init_from._flatten(jax.device_get(tree))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained-looking source: a 10-class tiny model's state saved as a training checkpoint
    (in workdir/checkpoints) and its params as a converted folder."""
    root = tmp_path_factory.mktemp("source")
    config = tiny_config()
    config.seed = 7
    state = trainer_for(config).init(jax.random.PRNGKey(7))
    ckpt = Checkpointer(root / "workdir" / "checkpoints", keep=1)
    ckpt.save(5, state, {"step": 5})
    ckpt.wait()
    ckpt.close()
    save_params(
        jax.device_get(state.params), root / "converted", model_name="vig_t", num_classes=10
    )
    return root, flat(state.params)


@pytest.mark.parametrize("layout", ["workdir", "workdir/checkpoints", "converted"])
def test_init_from_loads_every_param_with_fresh_optimizer(source, layout):
    root, saved = source
    config = tiny_config()
    config.init_from = str(root / layout)
    trainer = trainer_for(config)
    lines = []
    state = init_from.initial_state(trainer, config, log=lines.append)
    got = flat(state.params)
    assert got.keys() == saved.keys()
    for k in saved:  # the head too: 10 classes on both sides
        np.testing.assert_array_equal(got[k], saved[k], err_msg=k)
    assert int(state.step) == 0
    fresh_opt = jax.device_get(trainer.init(jax.random.PRNGKey(0)).opt_state)
    for a, b in zip(
        jax.tree.leaves(jax.device_get(state.opt_state)), jax.tree.leaves(fresh_opt), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert lines == [f"init_from {root / layout}"]


def test_head_reinitialised_only_when_classes_differ(source):
    root, saved = source
    config = tiny_config()
    config.init_from = str(root / "converted")
    config.seed = 3
    fresh = flat(trainer_for(config, num_classes=4).init(init_from.fine_tune_key(3)).params)
    lines = []
    state = init_from.initial_state(trainer_for(config, num_classes=4), config, log=lines.append)
    got = flat(state.params)
    assert "head re-initialised (10 classes in the checkpoint, 4 in the config)" in lines[0]
    for k in got:
        want = fresh[k] if k.startswith("head/") else saved[k]
        np.testing.assert_array_equal(got[k], want, err_msg=k)
    # Same class count, new label set: only with reinit_head.
    config.reinit_head = True
    fresh = flat(trainer_for(config).init(init_from.fine_tune_key(3)).params)
    lines = []
    got = flat(init_from.initial_state(trainer_for(config), config, log=lines.append).params)
    assert "head re-initialised (config.reinit_head=True)" in lines[0]
    np.testing.assert_array_equal(got["head/kernel"], fresh["head/kernel"])
    assert not np.array_equal(got["head/kernel"], saved["head/kernel"])
    np.testing.assert_array_equal(got["blocks_0/mlp_norm/scale"], saved["blocks_0/mlp_norm/scale"])


def test_reinitialised_head_is_not_the_sources_initial_head_under_the_same_seed(source):
    """The source is the state `trainer.init(PRNGKey(7))`, so its head is still seed 7's initial
    head: a fine-tune with seed 7 must not draw that same head again."""
    root, saved = source
    config = tiny_config()
    config.init_from, config.seed, config.reinit_head = str(root / "converted"), 7, True
    got = flat(init_from.initial_state(trainer_for(config), config, log=lambda _: None).params)
    assert not np.array_equal(got["head/kernel"], saved["head/kernel"])
    np.testing.assert_array_equal(got["blocks_0/mlp_norm/scale"], saved["blocks_0/mlp_norm/scale"])
    # Negative control: initialised from the key itself, the head would be the source's.
    same = flat(trainer_for(config).init(jax.random.PRNGKey(7)).params)
    np.testing.assert_array_equal(same["head/kernel"], saved["head/kernel"])


def test_position_table_resize_equals_run_time_resize():
    """A 2x2 table resized once to 4x4 gives the logits the 2x2 model computes at 64 px (4x4
    tokens), where it resizes at run time; likewise the official 14x14 table to 4x4."""
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    kw = dict(embed_dim=32, depth=1, num_heads=2, bigla_impl="reference")
    target = create_model("vig_t", num_classes=3, pos_grid=4, **kw)

    # Under jit: op by op, each op of init and apply compiles on its own (slower on CPU).
    def init(model, seed):
        return jax.jit(partial(model.init, train=False))(jax.random.PRNGKey(seed), images[:1])

    def apply(model, params):
        return jax.jit(partial(model.apply, train=False))({"params": params}, images)

    fresh = init(target, 0)["params"]
    for grid in (2, 14):
        src = create_model("vig_t", num_classes=3, pos_grid=grid, **kw)
        params = init(src, grid)["params"]
        loaded, notes = init_from.adapt_params(params, fresh, model_name="vig_t")
        assert notes == [
            f"position table resized from {grid}x{grid} to 4x4 (bicubic, as at run time)"
        ]
        adapted = init_from.merge(fresh, loaded)
        assert adapted["pos_embed"].shape == (1, 16, 32)
        want = apply(src, params)
        got = apply(target, adapted)
        assert_close(f"logits from a {grid}x{grid} table", got, want, 1e-6)


def test_every_mismatch_reported_at_once_before_compiling(source):
    root, _ = source
    config = tiny_config(embed_dim=48, depth=2)  # other widths, one more block
    config.init_from = str(root / "converted")

    def compiles(*_):
        raise AssertionError("init ran before the params were checked")

    trainer = dataclasses.replace(trainer_for(config), init=compiles)
    with pytest.raises(init_from.InitFromError, match=r"differences\):") as info:
        init_from.initial_state(trainer, config)
    message = str(info.value)
    assert message.startswith(f"--config.init_from={root / 'converted'}: ")
    lines = message.splitlines()[1:]
    missing = [line for line in lines if line.strip().startswith("missing: blocks_1/")]
    shaped = [line for line in lines if line.strip().startswith("shape: ")]
    assert missing and len(missing) == len(
        [k for k in flat(trainer.abstract_state.params) if k.startswith("blocks_1/")]
    )
    assert "shape: norm/scale: checkpoint (32,), config (48,)" in message
    assert len(shaped) > 10  # every mis-shaped param, not the first one
    # Another model's converted checkpoint, and unexpected params.
    config = tiny_config()
    model_info = root / "converted" / "model.json"
    other = root / "other"
    other.mkdir()
    (other / "params").symlink_to(root / "converted" / "params")
    (other / "model.json").write_text(json.dumps({"model": "vig_s", "num_classes": 10}))
    config.init_from = str(other)
    with pytest.raises(init_from.InitFromError, match="model: checkpoint 'vig_s', config 'vig_t'"):
        init_from.initial_state(trainer_for(config), config)
    assert model_info.exists()
    with pytest.raises(init_from.InitFromError, match=r"(?s)missing: head/bias.*unexpected: x/y"):
        init_from.adapt_params(
            {"x": {"y": np.zeros(2)}},
            {"head": {"bias": jax.ShapeDtypeStruct((3,), jnp.float32)}},
            model_name="vig_t",
        )


def test_init_from_nothing_there_says_where_it_looked(tmp_path):
    config = tiny_config()
    config.init_from = str(tmp_path / "nope")
    with pytest.raises(
        init_from.InitFromError, match="no checkpoint at .*nope: expected a training"
    ):
        init_from.initial_state(trainer_for(config), config)


# --- optimizer knobs ---------------------------------------------------------------------------


def _params(name, **kw):
    model = create_model(name, num_classes=3, **kw)
    images = jnp.zeros((1, 32, 32, 3))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False)["params"])


def test_layer_ids_follow_beit_numbering():
    ids, depth = optim.layer_ids(_params("vig_t", embed_dim=32, depth=3, num_heads=2))
    assert depth == 3
    assert {k.split("/")[0]: v for k, v in flat(ids).items()} == {
        "stem": 0,
        "pos_embed": 0,
        "blocks_0": 1,
        "blocks_1": 2,
        "blocks_2": 3,
        "norm": 4,
        "head": 4,
    }
    h = _params("vig_h_t", dims=(16, 16, 16, 16), depths=(1, 1, 2, 1), num_heads=(1, 1, 1, 1))
    ids, depth = optim.layer_ids(h)
    top = {k.split("/")[0]: v for k, v in flat(ids).items()}
    assert depth == 5
    # A downsampling layer belongs to the first block after it.
    assert top["stem"] == 0 and top["stages_0_0"] == 1 and top["downsamples_0"] == 2
    assert top["stages_1_0"] == 2 and top["downsamples_1"] == 3 and top["stages_2_1"] == 4
    assert top["downsamples_2"] == 5 and top["stages_3_0"] == 5 and top["head"] == 6
    ids, depth = optim.layer_ids(_params("deit_t"))
    top = {k.split("/")[0]: v for k, v in flat(ids).items()}
    assert depth == 12 and top["cls_token"] == 0 and top["block10"] == 11 and top["head"] == 13
    with pytest.raises(ValueError, match=r"no layer known for top-level params \['extra'\]"):
        optim.layer_ids({"extra": np.zeros(1), "head": np.zeros(1)})


def _updates(params, grads, **opt):
    o = common.adamw_section(base_lr=1e-3, weight_decay=0.05, epochs=1.0, warmup_epochs=0.0)
    o.clip_norm = 1e6  # inactive: the knobs are compared without clipping interplay
    o.update(opt)
    tx = optim.make_optimizer(o, optax.constant_schedule(1e-3))
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    return flat(updates)


def _random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves, strict=True)]
    )


def test_layer_decay_scales_each_layers_update():
    abstract = _params("vig_t", embed_dim=32, depth=3, num_heads=2)
    params, grads = _random_like(abstract, 0), _random_like(abstract, 1)
    plain = _updates(params, grads)
    decayed = _updates(params, grads, layer_decay=0.5)
    ids = flat(optim.layer_ids(abstract)[0])
    for k in plain:
        # The update includes the decoupled weight decay: both scale with the layer's lr.
        assert_close(k, decayed[k], plain[k] * 0.5 ** (4 - ids[k]), 1e-6)
    assert_close("head", decayed["head/kernel"], plain["head/kernel"], 0)
    with pytest.raises(ValueError, match=r"optimizer.layer_decay must be in \(0, 1\], got 0.0"):
        _updates(params, grads, layer_decay=0.0)


def test_freeze_backbone_updates_only_the_head():
    abstract = _params("vig_t", embed_dim=32, depth=1, num_heads=2)
    params, grads = _random_like(abstract, 0), _random_like(abstract, 1)
    plain = _updates(params, grads)
    frozen = _updates(params, grads, freeze_backbone=True)
    for k in plain:
        if k.startswith("head/"):
            assert_close(k, frozen[k], plain[k], 1e-6)
        else:  # no gradient step and no weight decay
            assert not np.any(frozen[k]), k


def test_finetune_384_config_is_deits_recipe_on_a_24x24_table():
    c = load_module(ROOT / "configs" / "finetune_384.py", "configs.finetune_384").get_config()
    assert c.init_from is None and not c.reinit_head  # given on the command line
    assert (c.data.image_size, c.model.overrides.pos_grid, c.data.crop_pct) == (384, 24, 1.0)
    assert (c.aug.mixup_alpha, c.aug.cutmix_alpha) == (0.0, 0.0)
    o = c.optimizer
    assert (o.base_lr, o.min_lr, o.weight_decay, o.epochs) == (5e-6, 5e-6, 1e-8, 30.0)
    assert (o.layer_decay, o.freeze_backbone) == (1.0, False)
    model = create_model(c.model.name, num_classes=1000, **c.model.overrides.to_dict())
    images = jax.ShapeDtypeStruct((1, 384, 384, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
    assert params["params"]["pos_embed"].shape == (1, 24 * 24, 384)


# --- init_from in the training loop -----------------------------------------------------------


def test_interrupted_finetune_resumes_from_its_own_checkpoint(source, tmp_path_factory):
    """4 fine-tuning steps in one go equal 2 steps, then a restart to 4 with the same init_from:
    the restart continues the workdir's checkpoint instead of starting again from init_from."""
    from vig_jax.train import loop

    root, saved = source
    data_dir = shared_tfds_dir(tmp_path_factory, "vig_demo_shapes")
    out = tmp_path_factory.mktemp("finetune")

    def config(total):
        c = tiny_config()
        c.init_from = str(root / "workdir")
        c.data.data_dir = data_dir
        c.data.eval_split = "validation[:16]"
        c.loop.total_steps = total
        return c

    loop.train_and_evaluate(config(4), out / "once")
    loop.train_and_evaluate(config(2), out / "twice")
    loop.train_and_evaluate(config(4), out / "twice")
    once = flat(read_saved_params(out / "once")[0])
    twice, source_info = read_saved_params(out / "twice")
    assert source_info["step"] == 4
    twice = flat(twice)
    for k in once:
        assert_close(k, twice[k], once[k], 1e-6)
    assert not np.allclose(once["head/kernel"], saved["head/kernel"])


# --- transfer on real data --------------------------------------------------------------------

# The shrunk experiment (run_transfer.SMOKE: width 32, 2 blocks, 4 pretraining epochs, 100 images
# per class, 30 fine-tuning steps, lr from {0.1, 0.3} on held-out images). Measured on the 2-core
# CPU (jax 0.10.2): pretrained top-1 82.9% on classes 0-4; test top-1 on classes 5-9 fine-tune 79.1
# +- 0.7 (lr 0.1) vs scratch 77.1 +- 1.9 (lr 0.3), +2.0 points (per seed +0.7, +2.0, +3.3). The test
# asserts half of that mean margin: a broken load (a shuffled, half-loaded or re-initialised
# backbone) starts the fine-tune no better than scratch and fails it. At this model size the margin
# needs the short budget: at 120 steps, or with 10 images per class, it is within +-1 point
# (docs/finetuning.md). The GPU run of the full setting (width 128, 6 blocks) gives +2.4 / +1.6. The
# 56 px fine-tune (the position table resized from 2x2 to 4x4) is far from converged after 30 steps
# (60.9 +- 5.2% measured at lr 0.1, the only lr the smoke gives it; chance 20%): asserted to learn,
# not to match. Halving the pretraining (2 epochs) to save time left +1.4 points over 6 seeds, one
# of them -4.6: too close to the noise, so the smoke keeps 4 epochs.
MIN_PRETRAIN_TOP1 = 0.75
MIN_TOP1 = {"finetune": 0.72, "scratch": 0.72, "finetune_56": 0.45}
MIN_MARGIN = 0.01  # fine-tune minus scratch, mean over seeds, in top-1 (1 point)


def test_transfer_finetune_beats_scratch_and_every_arm_learns(tmp_path, tmp_path_factory):
    try:
        fashion_mnist.check_source_files(fashion_mnist.resolve_source_dir())
    except FileNotFoundError as error:
        skip_or_fail_in_ci(str(error))  # fails under CI=true
    # One CPU device, as measured (conftest fakes four for the sharding tests; the smoke's batch
    # of 50 does not split over them), and XLA's default optimisation (this run is many steps).
    flags = os.environ.get("XLA_FLAGS", "").split()
    dropped = ("--xla_force_host_platform_device_count", "--xla_backend_optimization_level")
    flags = [f for f in flags if not f.startswith(dropped)]
    run_benchmark(
        ROOT / "benchmarks" / "run_transfer.py",
        "--smoke",
        "--out-dir",
        tmp_path,
        cache_dir=tmp_path_factory.getbasetemp() / "transfer_jax_cache",
        timeout=900,
        env={**os.environ, "XLA_FLAGS": " ".join(flags)},
    )
    record = json.loads((tmp_path / "transfer_smoke.json").read_text())
    assert record["pretrain_seed"] not in record["setting"]["seeds"], record["setting"]
    assert record["pretrain_test_top1"] >= MIN_PRETRAIN_TOP1, record["pretrain_test_top1"]
    (budget,) = record["summary"]
    assert budget["steps"] == 30, budget
    for arm in ("finetune", "scratch", "finetune_56"):
        assert budget["arms"][arm]["seeds"] == 3, (arm, budget)
        assert budget["arms"][arm]["test_top1_mean"] >= MIN_TOP1[arm], (arm, budget)
    assert budget["margin_finetune_minus_scratch"] >= MIN_MARGIN, budget
    assert (tmp_path / "transfer_smoke.md").read_text().startswith("# Transfer: Fashion-MNIST")
