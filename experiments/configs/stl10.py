"""STL-10 SNGAN at 48x48 (docs/method.md 7): the unlabelled split resized to 48, ADAPT relaxed.

Usage: python -m experiments.stl10 --workdir=DIR [--config=experiments/configs/stl10.py:smoke]
"""

import ml_collections

from experiments.configs import cifar10


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """CIFAR-10's config with the STL-10 model and data; presets as in cifar10.py."""
    c = cifar10.get_config(None)
    c.model.name = "sngan48"
    c.model.g_ch = 512  # widest G layer (512 -> 256 -> 128 -> 64)
    c.model.d_ch = 1024  # widest D layer (64 -> ... -> 1024)
    c.data.name = "stl10"
    c.data.split = "unlabelled"
    c.data.label_key = "label"
    c.data.image_size = 48
    return cifar10.with_preset(c, preset, smoke_widths=(32, 64))
