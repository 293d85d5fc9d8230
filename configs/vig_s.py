"""ViG-S on ImageNet-1k, official recipe (docs/training.md); the paper reports 81.7% top-1.

    python train.py --config configs/vig_s.py --workdir /tmp/vig_s

Global batch 1024 (base lr 5e-4 is per 512 images and scales with --config.data.batch_size).
"""

from configs import common


def get_config():
    return common.imagenet_recipe(model="vig_s", base_lr=5e-4, weight_decay=0.1, drop_path=0.2)
