"""A small ViG on the embedded `vig_demo_shapes` set (48x48, 10 classes): trains on 2 CPU cores.

    python train.py --config configs/demo.py --workdir /tmp/vig_demo

The dataset is generated on first use (no download). 390 steps of batch 128 (10 epochs of 5000
images); expected eval top-1 50.0% (chance 10%), top-5 99.1%, with ~2 minutes of CPU time.
"""

import ml_collections

from configs import common


def get_config():
    c = common.base_config()
    # Plain ViG block stack, narrow and shallow; float32 compute (bf16 is slower on CPU).
    c.model = common.model_section(
        "vig_t", dtype="float32", embed_dim=64, depth=2, num_heads=2, drop_path_rate=0.0
    )
    # 9 tokens: the token scan is ~10x faster on CPU than the chunked form padding to 64.
    c.model.bigla_impl = "reference"
    # 48 px input: the stride-16 patch embed gives a 3x3 token grid (pos_embed resized from 14x14).
    c.data = common.data_section(
        dataset="vig_demo_shapes",
        image_size=48,
        batch_size=128,
        eval_batch_size=200,
        num_workers=0,
        augment=ml_collections.ConfigDict({"kind": "pad_crop", "padding": 4, "hflip": True}),
    )
    # Short runs on a small set: no mixup/cutmix or erasing, which need long schedules to pay off.
    c.aug = common.deit_aug_section(random_erasing=0.0, mixup=0.0, cutmix=0.0)
    # Peak lr = base_lr * 128 / 512 = 3e-3: a small model on a small set (1e-3 reached 39%).
    c.optimizer = common.adamw_section(
        base_lr=1.2e-2, weight_decay=0.05, epochs=10.0, warmup_epochs=1.0
    )
    c.loop = common.loop_section(log_every_steps=10, eval_every_steps=100, ckpt_every_steps=100)
    c.mesh = common.mesh_section()
    return c
