"""Input pipeline without TensorFlow: TFDS sources read with grain, host and device augmentations.

Public API (used by `vig_jax.train` and `vig_jax.evaluate`):
- `dataset_info(dataset, data_dir) -> DatasetInfo(num_classes, num_examples, image_shape)`
- `make_train_iterator(...)`: infinite, resumable batches {"image", "label"}
- `make_eval_iterator(...)`: one padded pass {"image", "label", "mask"}
- `split_fingerprint(dataset, data_dir, split)`: what identifies a prepared split (for caches;
  `vig_jax.data.batch_store` keeps evaluation batches on disk)
- `vig_jax.data.mix`: normalize, random_erasing, mixup_cutmix (jnp, on device)
Preparing datasets (no TensorFlow): `python -m vig_jax.data.prepare --from-folder DIR --name NAME`
or `--imagenet DIR` (`vig_jax.data.prepare`); ImageNet-like JPEGs for benchmarks:
`vig_jax.data.imagenet_like`.
"""

from vig_jax.data.pipeline import make_eval_iterator, make_train_iterator
from vig_jax.data.sources import DatasetInfo, dataset_info, split_fingerprint

__all__ = [
    "DatasetInfo",
    "dataset_info",
    "make_eval_iterator",
    "make_train_iterator",
    "split_fingerprint",
]
