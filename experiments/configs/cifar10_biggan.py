"""CIFAR-10 BigGAN at 32x32 (docs/method.md 7): class-conditional, projection D, ADAPT relaxed.

Batch 50 / 50, n_dis 4, 200k iterations, Adam 2e-4 with betas (0.0, 0.999), EMA 0.9999.
Usage: python -m experiments.cifar10_biggan --workdir=DIR [--config=...:smoke]
"""

import ml_collections

from experiments.configs import cifar10


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """CIFAR-10's config with BigGAN and its schedule; presets as in cifar10.py."""
    c = cifar10.get_config(None)
    c.model.name = "biggan32"
    c.model.g_ch = 256
    c.model.d_ch = 256
    c.train.iterations = 200_000
    c.train.n_dis = 4
    c.train.batch_size_g = 50
    c.train.batch_size_d = 50
    c.train.beta2 = 0.999
    c.train.ema_decay = 0.9999
    c.eval.batch_size = 50
    return cifar10.with_preset(c, preset, smoke_widths=(16, 16))
