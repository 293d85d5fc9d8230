"""vig_jax/train/checkpoint.py and metrics.py: round trips on small pytrees (no model compile)."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from vig_jax.train import optim, sharding
from vig_jax.train.checkpoint import Checkpointer, restore_params, state_checksums
from vig_jax.train.errors import UserError
from vig_jax.train.metrics import MetricsWriter, read_metrics
from vig_jax.train.state import init_state


def _state(use_ema):
    def init_params(key):
        k1, k2 = jax.random.split(key)
        return {
            "dense": {"kernel": jax.random.normal(k1, (8, 16)), "bias": jnp.zeros(16)},
            "pos_embed": jax.random.normal(k2, (1, 4, 16)),
        }

    tx = optax.adamw(1e-3, mask=optim.decay_mask)
    state = init_state(init_params, tx, jax.random.PRNGKey(0), use_ema=use_ema)
    # Make params, moments and EMA differ so a swapped restore would show.
    grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 3, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )


def _abstract(state, mesh, fsdp):
    abstract = jax.eval_shape(lambda: state)
    shardings = sharding.state_shardings(abstract, mesh, fsdp=fsdp, fsdp_min_size=16)
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def _assert_trees_equal(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("use_ema", [False, True], ids=["no_ema", "ema"])
def test_checkpoint_round_trip_into_fsdp_layout(tmp_path, use_ema):
    state = _state(use_ema)
    data_state = {"next_index": 48, "epoch": 1}
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state, data_state)
    ckpt.wait()
    assert ckpt.latest_step() == 3
    mesh = sharding.make_mesh()
    restored, restored_data = ckpt.restore(3, _abstract(state, mesh, fsdp=True))
    ckpt.close()
    _assert_trees_equal(restored, state)
    assert restored_data == data_state
    assert restored.params["dense"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        None, "data"
    )
    # keep=2: the oldest is gone.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]

    abstract_params = _abstract(state, mesh, fsdp=False).params
    params, step = restore_params(tmp_path, abstract_params, use_ema=False)
    assert step == 3
    _assert_trees_equal(params, state.params)
    if use_ema:
        ema, _ = restore_params(tmp_path / "checkpoints", abstract_params, use_ema=True)
        _assert_trees_equal(ema, state.ema)
    else:
        with pytest.raises(ValueError, match="ema_decay"):
            restore_params(tmp_path, abstract_params, use_ema=True)


def test_checkpoint_reads_the_wrapped_iterator_state_of_older_checkpoints(tmp_path):
    """Checkpoints written before issue 18 stored the iterator state as {"value": state}."""
    state = _state(False)
    ckpt = Checkpointer(tmp_path, keep=1)
    ckpt.save(5, state, {"value": {"batches": 5}})
    ckpt.wait()
    _, data_state = ckpt.restore(5, _abstract(state, sharding.make_mesh(), fsdp=False))
    ckpt.close()
    assert data_state == {"batches": 5}


def test_state_checksums_see_one_changed_word_of_any_leaf():
    """Negative controls of the checksums saved with each checkpoint: one element changed in any
    leaf (float32, bf16, int32, a typed PRNG key) changes that leaf's checksum, only that one."""
    tree = {
        "w": jnp.arange(64, dtype=jnp.float32).reshape(8, 8),
        "h": jnp.ones((5,), jnp.bfloat16),
        "step": jnp.int32(7),
        "key": jax.random.key(0),
    }
    base = state_checksums(tree)
    assert sorted(base) == ["h", "key", "step", "w"]
    changed = {
        "w": tree["w"].at[3, 5].set(np.nextafter(np.float32(29), np.float32(30))),
        "h": tree["h"].at[4].set(-1),
        "step": jnp.int32(8),
        "key": jax.random.key(1),
    }
    for name, leaf in changed.items():
        sums = state_checksums({**tree, name: leaf})
        assert [k for k in base if sums[k] != base[k]] == [name]
    moved = tree["w"].reshape(-1)[::-1].reshape(8, 8)  # the same words, other places
    assert state_checksums({**tree, "w": moved})["w"] != base["w"]


def test_restore_falls_back_when_arrays_differ_from_their_checksums(tmp_path):
    """A checkpoint whose arrays read back without error but not as saved (here: a changed
    checksum stands for a garbled data chunk that still decodes) is moved aside; the previous
    one is restored."""
    state = _state(use_ema=False)
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3)
    ckpt.save(1, state, {"batches": 1})
    ckpt.save(2, state.replace(step=state.step + 1), {"batches": 2})
    ckpt.wait()
    record = tmp_path / "checkpoints" / "2" / "checksums" / "metadata"
    sums = json.loads(record.read_text())
    sums["params/dense/kernel"] ^= 1
    record.write_text(json.dumps(sums))
    lines = []
    step, restored, data_state = ckpt.restore_latest(
        _abstract(state, sharding.make_mesh(), fsdp=False), lines.append
    )
    ckpt.close()
    assert (step, data_state) == (1, {"batches": 1})
    _assert_trees_equal(restored, state)
    assert len(lines) == 1 and "ChecksumError" in lines[0] and "params/dense/kernel" in lines[0]


def test_restore_params_without_checkpoint_is_clear_and_creates_nothing(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in"):
        restore_params(tmp_path, {}, use_ema=False)
    with pytest.raises(UserError, match="checkpoint .*/missing/path not found"):
        restore_params(tmp_path / "missing" / "path", {}, use_ema=False)
    assert not (tmp_path / "missing").exists()


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.write(1, {"train/loss": 2.5, "train/lr": np.float32(1e-3)})
    writer.write(2, {"eval/top1": 0.25})
    writer.close()
    assert read_metrics(tmp_path) == [
        {"step": 1, "train/loss": 2.5, "train/lr": pytest.approx(1e-3)},
        {"step": 2, "eval/top1": 0.25},
    ]
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    # The legacy loader returns events as written (the default one migrates scalars to tensors).
    scalars = {
        (e.step, v.tag): v.simple_value
        for e in LegacyEventFileLoader(str(event_file)).Load()
        for v in e.summary.value
    }
    assert scalars == {
        (1, "train/loss"): 2.5,
        (1, "train/lr"): pytest.approx(1e-3),
        (2, "eval/top1"): 0.25,
    }
    # Other processes write nothing.
    MetricsWriter(tmp_path / "other", enabled=False).write(1, {"x": 1.0})
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("marker", [True, False], ids=["resumed_at", "no_marker"])
def test_tensorboard_drops_the_rerun_steps_of_a_resumed_run(tmp_path, marker):
    """A run killed after logging steps 1-5 and resumed from its step-3 checkpoint logs 4 and 5
    again: TensorBoard shows each step once, with the resumed run's values. Negative control:
    without the restart marker it shows steps 4 and 5 twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsWriter(tmp_path, enabled=True)
    for step in range(1, 6):
        first.write(step, {"train/loss": float(step)})
    first.close()
    time.sleep(1.1)  # event files are named by the second they are opened in
    resumed = MetricsWriter(tmp_path, enabled=True, resumed_at=3 if marker else None)
    for step in (4, 5):
        resumed.write(step, {"train/loss": 10.0 * step})
    resumed.close()
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    got = [(e.step, e.value) for e in accumulator.Scalars("train/loss")]
    once = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert (got == once) == marker, got
