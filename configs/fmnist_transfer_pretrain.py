"""Transfer experiment, step 1: a small plain ViG pretrained on Fashion-MNIST 0-4.

    python benchmarks/run_transfer.py --out-dir /tmp/transfer    # runs all steps of the experiment

`benchmarks/run_transfer.py` trains this config on the training images of classes 0-4 (T-shirt,
trouser, pullover, dress, coat; 30,000 images, labels 0-4) and saves the params as a converted
checkpoint, the `init_from` of `configs/fmnist_transfer_finetune.py`. With train.py (all ten
classes, same recipe) it is a plain small-ViG Fashion-MNIST run.

Why this model: at 28 px the stride-16 patch embed gives a 2x2 token grid, so the position table
is learned on that grid (`pos_grid=2`), not resized from 14x14 at every step; the fine-tune at
56 px (4x4 tokens) starts from this table resized once. Float32 and the BiGLA token scan: for 4-16
tokens the scan is the cheapest form on CPU and GPU alike.
"""

import ml_collections

from configs import common
from configs.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD


def get_config():
    c = common.base_config()
    c.model = common.model_section(
        "vig_t",
        dtype="float32",
        embed_dim=128,
        depth=6,
        num_heads=4,
        drop_path_rate=0.1,
        pos_grid=2,
    )
    c.model.bigla_impl = "reference"
    c.data = common.data_section(
        dataset="fashion_mnist",
        image_size=28,
        batch_size=256,
        eval_batch_size=1000,
        num_workers=0,
        # Zero-pad 3 px, random 28 px crop, flip (garments are left-right symmetric).
        augment=ml_collections.ConfigDict({"kind": "pad_crop", "padding": 3, "hflip": True}),
    )
    c.data.eval_split = "test"
    c.data.crop_pct = 1.0
    c.data.mean = FASHION_MNIST_MEAN
    c.data.std = FASHION_MNIST_STD
    c.aug = common.deit_aug_section(label_smoothing=0.1, random_erasing=0.25, mixup=0.0, cutmix=0.0)
    # Peak lr = 4e-3 * 256 / 512 = 2e-3.
    c.optimizer = common.adamw_section(
        base_lr=4e-3, weight_decay=0.05, epochs=15.0, warmup_epochs=1.0
    )
    c.loop = common.loop_section(log_every_steps=100, eval_every_steps=1000, ckpt_every_steps=1000)
    c.mesh = common.mesh_section()
    return c
