"""Device-side batch augmentations in jnp (docs/training.md): jit-able, keyed by PRNG keys.

Order in a train step, as timm's loader + train loop apply them: `normalize` -> `random_erasing`
(on normalised pixels, so its N(0, 1) noise matches the data scale) -> `mixup_cutmix`.
"""

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # in [0, 1] units, like timm/torchvision
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's RandomErasing defaults, as the recipe uses them.
_ERASE_ATTEMPTS = 10  # box draws per image before giving up
_ERASE_AREA = (0.02, 1.0 / 3.0)  # box area as a fraction of the image
_ERASE_MIN_ASPECT = 0.3  # box h/w is log-uniform in [0.3, 1 / 0.3]


def normalize(
    images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...], dtype=jnp.float32
) -> jax.Array:
    """(images / 255 - mean) / std per channel.

    Args:
      images: [B, h, w, C] uint8 (or any real dtype in 0-255 units).
      mean, std: C values in [0, 1] units, e.g. IMAGENET_MEAN / IMAGENET_STD.
      dtype: output dtype.
    Returns:
      [B, h, w, C] of `dtype`.
    """
    if len(mean) != images.shape[-1] or len(std) != images.shape[-1]:
        raise ValueError(f"need one mean/std per channel: {images.shape=}, {mean=}, {std=}")
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    std = jnp.asarray(std, jnp.float32) * 255.0
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def random_erasing(key: jax.Array, images: jax.Array, prob: float) -> jax.Array:
    """timm RandomErasing, "pixel" mode, one box per image: fills a box with N(0, 1) noise.

    Each image independently, with probability `prob`: up to 10 draws of a box with area fraction
    ~ U(0.02, 1/3) and aspect h/w log-uniform in [0.3, 1 / 0.3]; the first
    box that fits strictly inside the image (h < H and w < W, as timm) is placed uniformly and
    filled with per-pixel, per-channel standard normal noise. No box fits -> image unchanged.

    Args:
      key: PRNG key.
      images: [B, H, W, C] float, already normalised.
      prob: probability of erasing each image (0 disables).
    Returns:
      [B, H, W, C], same dtype.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images [B, H, W, C], got {images.shape=}")
    batch, height, width, _ = images.shape
    k_apply, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(key, 6)
    shape = (batch, _ERASE_ATTEMPTS)
    area = jax.random.uniform(k_area, shape, minval=_ERASE_AREA[0], maxval=_ERASE_AREA[1])
    area = area * height * width
    log_min_aspect = jnp.log(_ERASE_MIN_ASPECT)
    log_aspect = jax.random.uniform(k_aspect, shape, minval=log_min_aspect, maxval=-log_min_aspect)
    box_h = jnp.round(jnp.sqrt(area * jnp.exp(log_aspect))).astype(jnp.int32)  # [B, tries]
    box_w = jnp.round(jnp.sqrt(area / jnp.exp(log_aspect))).astype(jnp.int32)
    fits = (box_h < height) & (box_w < width)
    first = jnp.argmax(fits, axis=1)  # first fitting draw (0 if none; masked by `any_fits`)
    box_h = jnp.take_along_axis(box_h, first[:, None], axis=1)[:, 0]  # [B]
    box_w = jnp.take_along_axis(box_w, first[:, None], axis=1)[:, 0]
    erase = jax.random.bernoulli(k_apply, prob, (batch,)) & fits.any(axis=1)
    # Top-left uniform over the integer positions keeping the box inside (inclusive ends).
    top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - box_h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - box_w + 1)).astype(jnp.int32)
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # [B, H]
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # [B, W]
    mask = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]  # [B, H, W]
    noise = jax.random.normal(k_noise, images.shape, images.dtype)
    return jnp.where(mask[..., None], noise, images)


def mixup_cutmix(
    key: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float,
) -> tuple[jax.Array, jax.Array]:
    """timm Mixup in batch mode: one lambda for the batch, each image paired with the flipped batch.

    If both alphas are > 0, cutmix is used with probability `switch_prob`, else mixup; if one is
    0, only the other is used; both 0 leaves images and targets unchanged (lambda = 1). Mixup:
    x = lam * x + (1 - lam) * x[::-1], lam ~ Beta(mixup_alpha, mixup_alpha). Cutmix: lam ~
    Beta(cutmix_alpha, cutmix_alpha), a box of sides int(H sqrt(1 - lam)), int(W sqrt(1 - lam))
    centred uniformly on a pixel and clipped to the image takes x[::-1]'s pixels, and lam becomes
    1 - (clipped box area) / (H W). Targets: lam * t + (1 - lam) * t[::-1].

    Args:
      key: PRNG key.
      images: [B, H, W, C] float.
      targets: [B, num_classes] float32, the (label-smoothed) one-hot labels, as timm mixes them:
        `vig_jax.train.losses.smooth_labels`.
      mixup_alpha, cutmix_alpha: Beta parameters, >= 0 (0 disables that kind).
      switch_prob: probability of cutmix when both are enabled.
    Returns:
      images [B, H, W, C] (same dtype) and soft targets [B, num_classes] float32, rows sum to 1.
    """
    if images.ndim != 4 or targets.ndim != 2 or targets.shape[0] != images.shape[0]:
        raise ValueError(
            "expected images [B, H, W, C] and targets (smoothed labels) [B, num_classes]: "
            f"{images.shape=}, {targets.shape=}"
        )
    if mixup_alpha < 0 or cutmix_alpha < 0 or not 0.0 <= switch_prob <= 1.0:
        raise ValueError(
            "need alphas >= 0 and 0 <= switch_prob <= 1: "
            f"{mixup_alpha=}, {cutmix_alpha=}, {switch_prob=}"
        )
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return images, targets
    _, height, width, _ = images.shape
    k_switch, k_lam, k_cy, k_cx = jax.random.split(key, 4)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.bernoulli(k_switch, switch_prob)
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    # One Beta draw with the chosen kind's alpha: Beta sampling compiles slowly on CPU (a
    # rejection loop), so we do not draw both and discard one.
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    lam = jax.random.beta(k_lam, alpha, alpha)

    cut_ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut_ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * cut_ratio).astype(jnp.int32)
    cy = jax.random.randint(k_cy, (), 0, height)
    cx = jax.random.randint(k_cx, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows, cols = jnp.arange(height), jnp.arange(width)
    box = ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]  # [H, W]
    # lam corrected by the clipped area: the true fraction of pixels kept from the image.
    lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)

    flipped = images[::-1]
    mixed = lam * images + (1.0 - lam) * flipped
    cut = jnp.where(box[None, :, :, None], flipped, images)
    images = jnp.where(use_cutmix, cut, mixed.astype(images.dtype))
    lam = jnp.where(use_cutmix, lam_cut, lam).astype(jnp.float32)
    return images, lam * targets + (1.0 - lam) * targets[::-1]
