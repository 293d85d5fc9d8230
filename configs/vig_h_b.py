"""ViG-H-B on ImageNet-1k, official recipe (docs/training.md); the paper reports 84.2% top-1.

    python train.py --config configs/vig_h_b.py --workdir /tmp/vig_h_b

Global batch 1024 (base lr 8e-4 is per 512 images and scales with --config.data.batch_size).

The official code publishes a base lr only for ViG-H-T (8e-4 per 512). We keep 8e-4 for H-B, as
for H-S: one lr across sizes, with drop path growing with the model (0.6 here).
"""

from configs import common


def get_config():
    return common.imagenet_recipe(model="vig_h_b", base_lr=8e-4, weight_decay=0.05, drop_path=0.6)
