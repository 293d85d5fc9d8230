"""Transfer experiment, step 2: fine-tune on Fashion-MNIST 5-9 from 100 images a class.

    python benchmarks/run_transfer.py --out-dir /tmp/transfer    # runs all steps of the experiment

`benchmarks/run_transfer.py` sets `init_from` to the converted checkpoint of
`configs/fmnist_transfer_pretrain.py` (classes 0-4) and trains on 100 training images of each of
the classes 5-9 (sandal, shirt, sneaker, bag, ankle boot; labels 5-9 become 0-4, so
`reinit_head=True`: same class count, new label set). The scratch baseline is this config with
`init_from=None`, same steps; both pick their `base_lr` from the same grid on held-out training
images. The 56 px variant sets `data.image_size=56`, `data.augment.padding=6` and
`model.overrides.pos_grid=4`: the pretrained 2x2 position table is resized once to 4x4.

The recipe is a short DeiT-style fine-tune: few epochs, small lr, short warmup, no mixup, the
same light augmentation as the pretraining, drop path kept; scratch gets the same recipe.
"""

from configs import common, fmnist_transfer_pretrain


def get_config():
    c = fmnist_transfer_pretrain.get_config()
    c.reinit_head = True
    c.data.batch_size = 50  # 500 images: 10 steps per epoch
    # Peak lr = 1e-2 * 50 / 512 ~ 1e-3; run_transfer.py picks base_lr from {1e-2, 3e-2} (its
    # budgets: 3 and 40 epochs; warmup at most a quarter of the budget).
    c.optimizer = common.adamw_section(
        base_lr=1e-2, weight_decay=0.05, epochs=40.0, warmup_epochs=2.0
    )
    c.loop.log_every_steps = 10
    return c
