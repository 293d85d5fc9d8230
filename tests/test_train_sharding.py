"""vig_jax/train/sharding.py: mesh, FSDP layout rule, global batch assembly on 4 fake devices."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from vig_jax.train import sharding


def test_fsdp_spec_picks_largest_divisible_axis():
    assert sharding.fsdp_spec((384, 1024), 4, min_size=16) == P(None, "data")
    assert sharding.fsdp_spec((1024, 384), 4, min_size=16) == P("data", None)
    # Largest axis not divisible: the next one is used.
    assert sharding.fsdp_spec((3, 3, 1, 6), 4, min_size=16) == P()
    assert sharding.fsdp_spec((3, 3, 1, 384), 4, min_size=16) == P(None, None, None, "data")
    assert sharding.fsdp_spec((1, 196, 384), 8, min_size=16) == P(None, None, "data")
    assert sharding.fsdp_spec((1, 198, 6), 4, min_size=16) == P()
    # Small arrays and single devices stay replicated.
    assert sharding.fsdp_spec((384,), 4, min_size=1024) == P()
    assert sharding.fsdp_spec((384, 1024), 1, min_size=16) == P()


def test_global_batch_is_split_over_all_devices():
    mesh = sharding.make_mesh()
    assert mesh.devices.size == 4 and mesh.axis_names == ("data",)
    local = {"image": np.arange(8 * 2).reshape(8, 2), "label": np.arange(8, dtype=np.int32)}
    batch = sharding.global_batch(local, mesh)
    assert batch["image"].shape == (8, 2)
    assert len(batch["image"].addressable_shards) == 4
    for shard in batch["label"].addressable_shards:
        assert shard.data.shape == (2,)
    np.testing.assert_array_equal(jax.device_get(batch["image"]), local["image"])


def test_state_shardings_replicated_without_fsdp():
    mesh = sharding.make_mesh()
    tree = {"w": jax.ShapeDtypeStruct((64, 64), np.float32)}
    assert sharding.state_shardings(tree, mesh, fsdp=False, fsdp_min_size=1)["w"].spec == P()
    fsdp = sharding.state_shardings(tree, mesh, fsdp=True, fsdp_min_size=1)
    assert fsdp["w"].spec == P("data", None)
