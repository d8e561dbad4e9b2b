"""TinyImageNet BigGAN at 64x64 (docs/method.md section 7, StudioGAN style), ADAPT relaxed.

The paper leaves n_dis, batch and Adam settings of this benchmark unstated [?]; we use
StudioGAN's TinyImageNet BigGAN recipe where it is known (n_dis 1, equal G/D batches, Adam
betas (0.0, 0.999), EMA 0.9999) and batch 256 x 200k iterations = 5.12e7 samples, the paper's
budget. Prepare the data once (no TensorFlow needed):
  python -m ddst_jax.datasets.tiny_imagenet --data_dir ~/tensorflow_datasets
Usage: python -m experiments.tiny_imagenet --workdir=DIR [--config=...:smoke]
"""

import ml_collections

from experiments.configs import cifar10


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """CIFAR-10's config with BigGAN-64 and TinyImageNet; presets as in cifar10.py."""
    c = cifar10.get_config(None)
    c.model.name = "biggan64"
    c.model.z_dim = 100
    c.model.g_ch = 80
    c.model.d_ch = 80
    c.data.name = "tiny_imagenet"
    c.data.image_size = 64
    c.train.iterations = 200_000
    c.train.n_dis = 1
    c.train.batch_size_g = 256
    c.train.batch_size_d = 256
    c.train.beta2 = 0.999
    c.train.ema_decay = 0.9999
    return cifar10.with_preset(c, preset, smoke_widths=(4, 8))
