"""ViG-B on ImageNet-1k, official recipe (docs/training.md); the paper reports 82.6% top-1.

    python train.py --config configs/vig_b.py --workdir /tmp/vig_b

Global batch 1024 (base lr 1e-3 is per 512 images and scales with --config.data.batch_size).
"""

from configs import common


def get_config():
    return common.imagenet_recipe(model="vig_b", base_lr=1e-3, weight_decay=0.05, drop_path=0.5)
