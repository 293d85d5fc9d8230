"""ViG-S fine-tuned from 224^2 to 384^2 on ImageNet-1k, DeiT's recipe for its 384 models.

    python train.py --config configs/finetune_384.py --workdir /tmp/vig_s_384 \
        --config.init_from=/tmp/vig_s    # a 224 run's workdir, or a converted checkpoint

Starts from the 224^2 params (`init_from`, docs/finetuning.md); the 14x14 position table is
resized once to the 24x24 grid of 384 px (`pos_grid=24`) with the bicubic resize the model would
apply at run time, then learned there. Other sizes: --config.model.name=vig_b plus its drop path;
another resolution R: --config.data.image_size=R --config.model.overrides.pos_grid=R//16.

Recipe as DeiT's 384 fine-tune (Touvron et al. 2021, `--finetune --input-size 384 --lr 5e-6
--min-lr 5e-6 --weight-decay 1e-8 --epochs 30`): a short schedule (30 epochs), a learning rate
100x below pretraining's (5e-6 per 512 images, i.e. 1e-5 at batch 1024), almost no weight decay.
Mixup and cutmix are off (the brief for this config: none or weak; the model is already
regularised by its 300-epoch run); RandAugment, random erasing, label smoothing and drop path stay.
Eval resizes straight to 384 without a crop (crop_pct 1.0, as timm's 384 models). Global batch
512: 2.9x the tokens per image of 224 px.
"""

from configs import common


def get_config():
    c = common.imagenet_recipe(model="vig_s", base_lr=5e-6, weight_decay=1e-8, drop_path=0.2)
    c.model.overrides.pos_grid = 24  # 384 / 16
    c.data.image_size = 384
    c.data.crop_pct = 1.0
    c.data.batch_size = 512
    c.data.eval_batch_size = 512
    c.aug.mixup_alpha = 0.0
    c.aug.cutmix_alpha = 0.0
    c.optimizer.epochs = 30.0
    c.optimizer.warmup_epochs = 5.0
    c.optimizer.min_lr = 5e-6  # DeiT: --min-lr equal to --lr
    c.optimizer.warmup_lr = 1e-6
    # 1,281,167 / 512 = 2502 steps per epoch: evaluate and checkpoint about every 2 epochs.
    c.loop.eval_every_steps = 5000
    c.loop.ckpt_every_steps = 5000
    return c
