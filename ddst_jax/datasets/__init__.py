"""TFDS builders for datasets TFDS does not ship (importing a builder's module registers it).

``tiny_imagenet`` (``ddst_jax.datasets.tiny_imagenet``): TinyImageNet-200 at 64x64. It is
prepared without TensorFlow (array_record files, images decoded with PIL).

``ensure_registered(name)`` imports the module of a project builder by its TFDS name, so that
``tfds.builder(name)`` / ``tfds.data_source(name)`` find it.
"""

from __future__ import annotations

import importlib

# TFDS name -> module defining the builder. All of them prepare without TensorFlow.
BUILDER_MODULES: dict[str, str] = {"tiny_imagenet": "ddst_jax.datasets.tiny_imagenet"}


def ensure_registered(name: str) -> bool:
    """Registers the project's TFDS builder ``name`` (a TFDS name, config/version allowed).

    Returns:
      True when the project provides the builder (it is then registered, and preparing it
      needs no TensorFlow); False for any other name (nothing is imported).
    """
    module = BUILDER_MODULES.get(name.split("/")[0].split(":")[0])
    if module is None:
        return False
    importlib.import_module(module)
    return True
