"""ViG-H-T on ImageNet-1k, official recipe (docs/training.md); the paper reports 82.8% top-1.

    python train.py --config configs/vig_h_t.py --workdir /tmp/vig_h_t

Global batch 1024 (base lr 8e-4 is per 512 images and scales with --config.data.batch_size).
"""

from configs import common


def get_config():
    return common.imagenet_recipe(model="vig_h_t", base_lr=8e-4, weight_decay=0.05, drop_path=0.2)
