"""Shared recipe builders for the configs (the recipe: docs/training.md). No `get_config` here.

Every config has the same sections in the same order: model, data, aug (device-side
augmentation), optimizer/schedule, loop, mesh. Configs are data: nothing is derived from another
field (the learning rate is scaled by batch/512 and epochs become steps in
`vig_jax/train/optim.py`), so a CLI override such as `--config.data.batch_size=256` stays
consistent.
"""

import ml_collections
from ml_collections import config_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def model_section(name, *, dtype="bfloat16", **overrides):
    """`create_model(name, dtype=..., bigla_impl=..., remat=..., **overrides)` as data."""
    m = ml_collections.ConfigDict()
    m.name = name
    # Params and optimizer state stay float32; `dtype` is the compute dtype of the model.
    m.dtype = dtype
    m.bigla_impl = "auto"
    # Activation memory: "none", "block" (per block, matmul and BiGLA outputs saved, the rest
    # recomputed) or "full" (per block, nothing saved); same loss and gradients.
    m.remat = "none"
    m.overrides = ml_collections.ConfigDict(overrides)
    return m


def data_section(*, dataset, image_size, batch_size, eval_batch_size, num_workers, augment):
    """Input pipeline (`vig_jax.data`). `batch_size` is global (all processes, all devices)."""
    d = ml_collections.ConfigDict()
    d.dataset = dataset
    d.data_dir = config_dict.placeholder(str)  # None: the TFDS default (~/tensorflow_datasets)
    d.train_split = "train"
    d.eval_split = "validation"
    d.image_size = image_size
    d.crop_pct = 0.875  # eval: resize the shorter side to image_size / crop_pct, centre crop
    d.batch_size = batch_size
    d.eval_batch_size = eval_batch_size
    d.num_workers = num_workers
    d.read_threads = 4  # threads building batches in each worker process (`data.pipeline`)
    # Benchmark only: train on the pipeline's first batch at every step (no input cost after it),
    # to compare the loop's img/s with and without the input pipeline (`docs/data.md`).
    d.repeat_first_batch = False
    # A directory: the first evaluation writes its transformed uint8 batches there and later ones
    # (also after a restart) read them memory-mapped instead of decoding again (ImageNet's
    # validation split at 224²: 7.5 GB). None: every evaluation reads the pipeline (small splits
    # are kept in host memory anyway, `train.loop.EvalBatches`).
    d.eval_cache_dir = config_dict.placeholder(str)
    d.augment = augment  # host-side, per example (`vig_jax.data.transforms.TrainTransform`)
    d.mean = IMAGENET_MEAN
    d.std = IMAGENET_STD
    return d


def deit_host_augment():
    """Host-side DeiT augmentation: random-resized crop (scale 0.08-1), flip, RandAugment m9."""
    return ml_collections.ConfigDict(
        {
            "kind": "deit",
            "scale": (0.08, 1.0),
            "ratio": (3 / 4, 4 / 3),
            "hflip": True,
            # Color jitter 0.4 is off in the official recipe when RandAugment is on.
            "randaugment": "rand-m9-mstd0.5-inc1",
        }
    )


def deit_aug_section(*, label_smoothing=0.1, random_erasing=0.25, mixup=0.8, cutmix=1.0):
    """DeiT recipe, device side: random erasing, mixup/cutmix, label smoothing."""
    a = ml_collections.ConfigDict()
    a.random_erasing = random_erasing
    a.mixup_alpha = mixup
    a.cutmix_alpha = cutmix
    a.switch_prob = 0.5  # probability of cutmix instead of mixup when both are on
    a.label_smoothing = label_smoothing
    return a


def adamw_section(*, base_lr, weight_decay, epochs=300.0, warmup_epochs=20.0):
    """AdamW + warmup/cosine schedule. `base_lr` is per 512 images (scaled by global batch/512)."""
    o = ml_collections.ConfigDict()
    o.base_lr = base_lr
    o.warmup_lr = 5e-7  # lr at step 0, rising linearly to the peak over the warmup
    o.min_lr = 5e-6  # cosine floor at the last step
    o.epochs = epochs
    o.warmup_epochs = warmup_epochs
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.weight_decay = weight_decay  # not applied to norms, biases, pos_embed
    o.clip_norm = 5.0
    # Micro-batches per optimizer step (a scan in the step): same update, 1/n the activations.
    o.grad_accum_steps = 1
    o.ema_decay = 0.0  # 0 disables the EMA of params; e.g. 0.9999 keeps one and evaluates it too
    # Fine-tuning (docs/finetuning.md). Layer-wise lr decay as in BEiT / DeiT III: block i of L
    # learns at lr * layer_decay ** (L - i), the stem lowest, the head at lr; 1.0 turns it off.
    o.layer_decay = 1.0
    o.freeze_backbone = False  # True: a linear probe, only the head learns
    return o


def loop_section(
    *,
    log_every_steps,
    eval_every_steps=None,
    ckpt_every_steps=None,
    eval_every_epochs=None,
    ckpt_every_epochs=None,
):
    """Logging, evaluation and checkpoint intervals. Evaluation and checkpoints are set either in
    optimizer steps or in epochs (exactly one of each pair): epochs become steps in
    `vig_jax/train/trainer.py`, so they follow a --config.data.batch_size override."""
    lp = ml_collections.ConfigDict()
    # None: train for optimizer.epochs; an int stops after that many steps (the schedule still
    # follows optimizer.epochs), for smoke runs and tests.
    lp.total_steps = config_dict.placeholder(int)
    lp.log_every_steps = log_every_steps
    for name, value, kind in (
        ("eval_every_steps", eval_every_steps, int),
        ("ckpt_every_steps", ckpt_every_steps, int),
        ("eval_every_epochs", eval_every_epochs, float),
        ("ckpt_every_epochs", ckpt_every_epochs, float),
    ):
        lp[name] = config_dict.placeholder(kind)
        if value is not None:
            lp[name] = value
    lp.keep_checkpoints = 2
    lp.progress_bar = True
    return lp


def mesh_section(*, fsdp=False):
    """Device mesh: one `data` axis over all devices of all processes."""
    m = ml_collections.ConfigDict()
    # False: data parallel, state replicated. True: params and optimizer state sharded over the
    # data axis too (largest divisible axis of each array with >= fsdp_min_size elements).
    m.fsdp = fsdp
    m.fsdp_min_size = 2**18
    return m


def base_config(*, seed=0):
    """The top-level fields of every config: the seed and where the params start."""
    c = ml_collections.ConfigDict()
    c.seed = seed
    # None: from scratch. A training workdir (or its checkpoints/ folder) or a converted checkpoint
    # (`python -m vig_jax.convert`): start from its params with a fresh optimizer and schedule
    # (vig_jax/train/init_from.py); a checkpoint in the run's own workdir still wins (resume).
    c.init_from = config_dict.placeholder(str)
    # With init_from: re-initialise the head even when the class counts match (a new label set of
    # the same size). A head of another class count is always re-initialised.
    c.reinit_head = False
    return c


def imagenet_recipe(*, model, base_lr, weight_decay, drop_path, model_overrides=None):
    """The official ViG ImageNet-1k recipe (8 GPUs x 128 = global batch 1024) for `model`."""
    c = base_config()
    c.model = model_section(model, drop_path_rate=drop_path, **(model_overrides or {}))
    c.data = data_section(
        dataset="imagenet2012",
        image_size=224,
        batch_size=1024,
        eval_batch_size=1024,
        num_workers=16,
        augment=deit_host_augment(),
    )
    c.aug = deit_aug_section()
    c.optimizer = adamw_section(base_lr=base_lr, weight_decay=weight_decay)
    # 1,281,167 images / 1024 = 1251 steps per epoch: evaluate about every 2 epochs, checkpoint
    # about every 20 minutes on 8 GPUs.
    c.loop = loop_section(log_every_steps=100, eval_every_steps=2500, ckpt_every_steps=2500)
    c.mesh = mesh_section()
    return c
