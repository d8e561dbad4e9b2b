"""FID and Inception Score of the EMA generator during training (docs/method.md section 8).

Samples ``num_samples`` images from the EMA generator with a fixed noise key (so evaluations of
one run are comparable), in batches sharded over the data mesh like training, and scores them
with the FID Inception network against reference statistics of the training images.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddst_jax import data, reporting, storage
from ddst_jax.gan import setup as setup_lib
from ddst_jax.gan import steps
from ddst_jax.metrics import fid, inception

#: ``features_fn(images uint8 (N, H, W, 3) sharded) -> (pool (N, D), logits (N, C))``.
FeaturesFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass
class Evaluator:
    """Computes FID / IS of a train state's EMA generator."""

    setup: setup_lib.GanSetup
    mesh: jax.sharding.Mesh
    features_fn: FeaturesFn
    reference: tuple[np.ndarray, np.ndarray]
    num_samples: int
    batch_size: int
    bn_mode: str = "train"
    splits: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        self._generate = jax.jit(functools.partial(_generate_uint8, self.setup,
                                                   train_bn=self.bn_mode == "train"))

    def __call__(self, state: steps.TrainState) -> dict[str, float]:
        """Returns ``{"eval/fid", "eval/is", "eval/is_std"}`` of ``state.g_ema``."""
        sharding = NamedSharding(self.mesh, P("data"))
        key = jax.random.key(self.seed)

        def samples(start: int, size: int) -> jax.Array:
            # Full batches of samples; the extra ones of the last batch are dropped.
            k_z, k_y = jax.random.split(jax.random.fold_in(key, start))
            z = jax.device_put(jax.random.normal(k_z, (size, self.setup.model.z_dim)), sharding)
            y = steps.sample_labels(k_y, size, self.setup)
            return self._generate(state, z, None if y is None else jax.device_put(y, sharding))

        pool, logit = inception.batched(self.features_fn, samples, self.num_samples,
                                        self.batch_size)
        mu, sigma = fid.feature_statistics(pool)
        score = fid.frechet_distance(mu, sigma, *self.reference)
        is_mean, is_std = fid.inception_score(logit, splits=min(self.splits, len(logit)))
        return {"eval/fid": float(score), "eval/is": float(is_mean), "eval/is_std": float(is_std)}


def _generate_uint8(setup: setup_lib.GanSetup, state: steps.TrainState, z: jax.Array,
                    y: jax.Array | None, train_bn: bool) -> jax.Array:
    """uint8 (B, H, W, 3) samples of the EMA generator (pixels rounded as PNG writers do)."""
    images = steps.generate(setup, state.g_ema, state.g_state, state.g_masks, z, y,
                            train=train_bn)
    return jax.numpy.clip(jax.numpy.round((images + 1.0) * 127.5), 0, 255).astype("uint8")


def inception_features_fn(weights_path: str | None) -> FeaturesFn:
    """The FID Inception's (pool, logits) with weights from a path or the cache/download."""
    variables = inception.load_weights(weights_path)
    return lambda images: inception.features(variables, images)


def source_features(source: data.ImageSource, features_fn: FeaturesFn,
                    mesh: jax.sharding.Mesh, batch_size: int) -> np.ndarray:
    """float32 (len(source), 2048) pool features of every image of ``source``, in order,
    ``batch_size`` images per call sharded over the mesh's data axis."""
    n = len(source)
    sharding = NamedSharding(mesh, P("data"))

    def real_images(start: int, size: int) -> jax.Array:
        images, _ = source.read(np.arange(start, start + size) % n)  # the last batch wraps
        return jax.device_put(images, sharding)

    return inception.batched(features_fn, real_images, n, batch_size)[0]


def reference_statistics(config: ml_collections.ConfigDict, workdir: str,
                         features_fn: FeaturesFn, mesh: jax.sharding.Mesh,
                         source: data.ImageSource) -> tuple[np.ndarray, np.ndarray]:
    """``config.eval.reference_stats`` (TTUR npz), or the training images' statistics.

    Computed statistics are cached in ``workdir/reference_stats.npz`` (every image of the run's
    training ``source``, as the paper's CIFAR-10 statistics use all 50k train images).
    """
    path = config.eval.reference_stats
    if path:
        if not storage.exists(path):
            raise ValueError(f"config.eval.reference_stats: no file at {path}; create one with "
                             "`python -m experiments.fid_stats` or unset it to compute them.")
        return fid.load_statistics(path)
    cached = storage.join(workdir, "reference_stats.npz")
    if storage.exists(cached):
        return fid.load_statistics(cached)
    reporting.say(f"Computing FID reference statistics of {len(source)} training images "
                  "(once).")
    mu, sigma = fid.feature_statistics(
        source_features(source, features_fn, mesh, config.eval.batch_size))
    if reporting.is_primary():
        fid.save_statistics(cached, mu, sigma)
    return mu, sigma
