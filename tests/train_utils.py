"""Shared pieces of the training tests: a tiny real ViG config and deterministic batches."""

import ml_collections
import numpy as np

from configs import common


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
        base_lr=4e-3, weight_decay=0.05, epochs=10.0, warmup_epochs=0.0
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
