"""vig_jax/train/step.py, trainer.py: jitted, sharded train and eval steps on 4 fake CPU devices.

A tiny real ViG (width 32, 1 block, 32 px) with the full device-side augmentation recipe.
"""

import jax
import ml_collections
import numpy as np
import pytest

from configs import common
from tests.helpers import assert_close
from vig_jax.train import sharding
from vig_jax.train.trainer import make_trainer, oom_hint

NUM_CLASSES = 10
STEPS_PER_EPOCH = 10
# One AdamW step in float32 on 1 vs 4 devices differs only by reduction order: measured 1.2e-5
# relative on the head kernel with jax 0.10.2 / flax 0.12.8 (below 1e-5 with earlier releases); a
# sharding bug moves parameters by O(1).
SHARDED_TOL = 3e-5
# Adam divides by |g|: where |g| is near eps (1e-8) the update amplifies reduction-order noise
# by orders of magnitude. A larger eps keeps the update linear in g there, so the comparison
# measures the sharding, not Adam's conditioning.
ADAM_EPS = 1e-4


def tiny_config(*, batch_size=8, image_size=32, **optimizer) -> ml_collections.ConfigDict:
    """The recipe around a 1-block, width-32 ViG at 32 px (2x2 tokens), float32, no drop path."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = common.model_section(
        "vig_t", dtype="float32", embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.0
    )
    c.model.bigla_impl = "reference"  # fastest on CPU for a handful of tokens
    c.data = common.data_section(
        dataset="vig_demo_shapes",
        image_size=image_size,
        batch_size=batch_size,
        eval_batch_size=batch_size,
        num_workers=0,
        augment=ml_collections.ConfigDict({"kind": "pad_crop", "padding": 2, "hflip": True}),
    )
    c.aug = common.deit_aug_section()  # the full device-side recipe: erasing, mixup, cutmix
    c.optimizer = common.adamw_section(
        # Peak lr 0.5 * 8 / 512 ~ 7.8e-3: a few steps visibly fit a fixed batch.
        base_lr=0.5,
        weight_decay=0.05,
        epochs=10.0,
        warmup_epochs=0.0,
    )
    c.optimizer.update(optimizer)
    c.loop = common.loop_section(log_every_steps=1, eval_every_steps=100, ckpt_every_steps=100)
    c.loop.progress_bar = False
    c.mesh = common.mesh_section()
    return c


def random_batch(batch_size=8, image_size=32, num_classes=10, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),
        "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
    }


def _run(config, devices, steps=1, batch=None):
    mesh = sharding.make_mesh(devices)
    trainer = make_trainer(
        config, mesh=mesh, num_classes=NUM_CLASSES, steps_per_epoch=STEPS_PER_EPOCH
    )
    state = trainer.init(jax.random.PRNGKey(0))
    init_params = jax.device_get(state.params)
    global_batch = sharding.global_batch(batch or random_batch(), mesh)
    losses = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, global_batch)
        losses.append(float(metrics["loss"]))
    return trainer, state, init_params, losses


@pytest.fixture(scope="module")
def single():
    """Reference: one device, 1 step."""
    trainer, state, init_params, losses = _run(tiny_config(eps=ADAM_EPS), jax.devices()[:1])
    return trainer, jax.device_get(state), init_params, losses


@pytest.mark.parametrize("fsdp", [False, True], ids=["data_parallel", "fsdp"])
def test_train_step_sharded_equals_single_device(single, fsdp):
    assert len(jax.devices()) == 4, "tests/conftest.py should give 4 fake CPU devices"
    config = tiny_config(eps=ADAM_EPS)
    config.mesh.fsdp = fsdp
    config.mesh.fsdp_min_size = 256  # small enough to shard the tiny model's matrices
    trainer, state, _, losses = _run(config, None)
    leaves = jax.tree_util.tree_leaves(trainer.abstract_state.params)
    specs = {tuple(x.sharding.spec) for x in leaves}
    if fsdp:
        assert any("data" in s for s in specs), specs
        # Optimizer moments follow the params' layout.
        mu = state.opt_state[1][0].mu["head"]["kernel"]
        assert mu.sharding.spec == state.params["head"]["kernel"].sharding.spec
    else:
        assert specs == {()}
    assert losses[0] == pytest.approx(single[3][0], rel=1e-6)
    want = jax.tree_util.tree_leaves_with_path(single[1].params)
    got = jax.tree_util.tree_leaves(jax.device_get(state.params))
    for (path, w), g in zip(want, got, strict=True):
        assert_close(jax.tree_util.keystr(path), g, w, SHARDED_TOL)
    assert int(state.step) == 1


def test_grad_accum_equals_full_batch_and_ema_update(single):
    # Two micro-batches of 4 on 4 devices give the full-batch update: the model has no batch
    # statistics and drop path is off, so the mean of micro-batch means is the batch mean.
    config = tiny_config(eps=ADAM_EPS, grad_accum_steps=2, ema_decay=0.75)
    _, state, init_params, losses = _run(config, None)
    assert losses[0] == pytest.approx(single[3][0], rel=1e-5)
    flat_want = jax.tree_util.tree_leaves(single[1].params)
    flat_got = jax.tree_util.tree_leaves(jax.device_get(state.params))
    for w, g in zip(flat_want, flat_got, strict=True):
        assert_close("params", g, w, SHARDED_TOL)
    # EMA after one step: 0.75 * init + 0.25 * new params.
    ema = jax.device_get(state.ema)
    for e, p0, p1 in zip(
        jax.tree_util.tree_leaves(ema),
        jax.tree_util.tree_leaves(init_params),
        flat_got,
        strict=True,
    ):
        assert_close("ema", e, 0.75 * p0 + 0.25 * p1, 1e-6)


def test_train_step_loss_falls_on_fixed_batch(single):
    trainer = single[0]
    state = trainer.init(jax.random.PRNGKey(0))
    local = random_batch()
    batch = sharding.global_batch(local, trainer.mesh)
    eval_batch = sharding.global_batch({**local, "mask": np.ones(8, bool)}, trainer.mesh)

    def clean_loss(params):  # plain cross-entropy of the unaugmented batch
        sums = jax.device_get(trainer.eval_step(params, eval_batch))
        return float(sums["loss_sum"] / sums["count"])

    before = clean_loss(state.params)
    losses = []
    for _ in range(15):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    # The training loss sees mixup/cutmix (a random mix each step); the clean loss must fall.
    assert np.isfinite(losses).all()
    after = clean_loss(state.params)
    assert after < 0.7 * before, (before, after, losses)


def test_eval_step_counts_only_unmasked_examples(single):
    trainer, state = single[0], single[1]
    params = jax.device_put(state.params, jax.devices()[0])
    batch = random_batch()
    mask = np.array([True] * 5 + [False] * 3)
    sums = jax.device_get(
        trainer.eval_step(params, sharding.global_batch({**batch, "mask": mask}, trainer.mesh))
    )
    # By hand from the logits of the normalised images.
    data = tiny_config().data
    images = (batch["image"] / 255.0 - np.array(data.mean)) / np.array(data.std)
    logits = np.asarray(trainer.model.apply({"params": params}, images, train=False), np.float64)
    top = logits.max(1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    labels = batch["label"]
    nll = -logp[np.arange(8), labels]
    rank = (logits >= logits[np.arange(8), labels][:, None]).sum(1) - 1
    assert sums["count"] == 5
    assert sums["loss_sum"] == pytest.approx(nll[:5].sum(), rel=1e-5)
    assert sums["top1"] == (rank[:5] < 1).sum()
    assert sums["top5"] == (rank[:5] < 5).sum()


def test_pallas_bigla_runs_per_batch_shard_in_the_sharded_steps():
    """The trainer traces its steps under its mesh, so the Pallas kernel (interpret mode here)
    runs in shard_map on each device's slice of the batch instead of on the gathered batch; the
    4-device eval sums equal those of a 1-device trainer with the reference BiGLA."""

    def trainer_for(impl, devices):
        config = tiny_config()
        # Width 64 over 2 heads: K = 16, V = 32, the smallest head dims the kernel takes.
        config.model = common.model_section(
            "vig_t", dtype="float32", embed_dim=64, depth=1, num_heads=2, drop_path_rate=0.0
        )
        config.model.bigla_impl = impl
        if impl == "pallas":
            config.model.overrides.bigla_interpret = True
        mesh = sharding.make_mesh(devices)
        return make_trainer(config, mesh=mesh, num_classes=NUM_CLASSES, steps_per_epoch=1)

    local = random_batch()
    eval_local = {**local, "mask": np.ones(8, bool)}
    sums = {}
    for impl, devices in (("pallas", None), ("reference", jax.devices()[:1])):
        trainer = trainer_for(impl, devices)
        state = trainer.init(jax.random.PRNGKey(0))
        if impl == "pallas":
            assert "shard_map" in str(jax.make_jaxpr(trainer.train_step)(state, local))
        batch = sharding.global_batch(eval_local, trainer.mesh)
        sums[impl] = jax.device_get(trainer.eval_step(state.params, batch))
    got, want = sums["pallas"], sums["reference"]
    assert got["count"] == want["count"] == 8
    assert got["loss_sum"] == pytest.approx(want["loss_sum"], rel=1e-5)
    assert got["top1"] == want["top1"] and got["top5"] == want["top5"]


def test_oom_error_gets_config_hint():
    with pytest.raises(RuntimeError, match="grad_accum_steps") as info:
        with oom_hint():
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 GB")
    assert "RESOURCE_EXHAUSTED" in str(info.value)  # XLA's message is kept
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        with oom_hint():
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")


@pytest.mark.parametrize(
    "batch_size,accum,match",
    [(8, 0, "grad_accum_steps must be >= 1"), (8, 3, "must split into"), (6, 2, "must split into")],
)
def test_make_trainer_rejects_batch_splits(batch_size, accum, match):
    """Checked before anything is built: 0 micro-batches, a remainder, a micro-batch of 3 on 4
    devices."""
    config = tiny_config(batch_size=batch_size, grad_accum_steps=accum)
    with pytest.raises(ValueError, match=match):
        make_trainer(config, mesh=sharding.make_mesh(), num_classes=NUM_CLASSES, steps_per_epoch=1)


def test_eval_step_compiles_with_the_inference_options(monkeypatch):
    from vig_jax import models

    seen = []

    def options(platform):
        seen.append(platform)
        return {"xla_no_such_option": 1}

    monkeypatch.setattr(models, "inference_compiler_options", options)
    trainer = make_trainer(
        tiny_config(), mesh=sharding.make_mesh(), num_classes=NUM_CLASSES, steps_per_epoch=1
    )
    assert seen == ["cpu"]
    state = trainer.init(jax.random.PRNGKey(0))
    batch = random_batch()
    evaluation = sharding.global_batch({**batch, "mask": np.ones(8, bool)}, trainer.mesh)
    with pytest.raises(Exception, match="xla_no_such_option"):
        trainer.eval_step(state.params, evaluation)
    trainer.train_step(state, sharding.global_batch(batch, trainer.mesh))  # XLA's own options
