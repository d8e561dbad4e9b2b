"""FID and Inception Score of the EMA generator during training (SPEC section 8).

Samples ``num_samples`` images from the EMA generator with a fixed noise key (so evaluations of
one run are comparable), in batches sharded over the data mesh like training, and scores them
with the FID Inception network against reference statistics of the training images.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddst_jax import data, reporting
from ddst_jax.gan import steps
from ddst_jax.metrics import fid, inception

#: ``features_fn(images uint8 (N, H, W, 3) sharded) -> (pool (N, D), logits (N, C))``.
FeaturesFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass
class Evaluator:
    """Computes FID / IS of a train state's EMA generator."""

    setup: steps.GanSetup
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
        pools, logits = [], []
        key = jax.random.key(self.seed)
        for start in range(0, self.num_samples, self.batch_size):
            k_z, k_y = jax.random.split(jax.random.fold_in(key, start))
            z = jax.device_put(jax.random.normal(k_z, (self.batch_size, self.setup.z_dim)),
                               sharding)
            y = steps.sample_labels(k_y, self.batch_size, self.setup)
            images = self._generate(state, z, None if y is None else jax.device_put(y, sharding))
            pool, logit = self.features_fn(images)
            keep = min(self.batch_size, self.num_samples - start)
            pools.append(np.asarray(jax.device_get(pool))[:keep])
            logits.append(np.asarray(jax.device_get(logit))[:keep])
        pool, logit = np.concatenate(pools), np.concatenate(logits)
        mu, sigma = fid.feature_statistics(pool)
        score = fid.frechet_distance(mu, sigma, *self.reference)
        is_mean, is_std = fid.inception_score(logit, splits=min(self.splits, len(logit)))
        return {"eval/fid": float(score), "eval/is": float(is_mean), "eval/is_std": float(is_std)}


def _generate_uint8(setup: steps.GanSetup, state: steps.TrainState, z: jax.Array,
                    y: jax.Array | None, train_bn: bool) -> jax.Array:
    """uint8 (B, H, W, 3) samples of the EMA generator (pixels rounded as PNG writers do)."""
    images = steps.generate(setup, state.g_ema, state.g_state, state.g_masks, z, y,
                            train=train_bn)
    return jax.numpy.clip(jax.numpy.round((images + 1.0) * 127.5), 0, 255).astype("uint8")


def inception_features_fn(weights_path: str | None) -> FeaturesFn:
    """The FID Inception's (pool, logits) with weights from a path or the cache/download."""
    variables = inception.load_weights(weights_path)
    return lambda images: inception.features(variables, images)


def reference_statistics(config: ml_collections.ConfigDict, workdir: str,
                         features_fn: FeaturesFn, mesh: jax.sharding.Mesh,
                         source: data.ImageSource) -> tuple[np.ndarray, np.ndarray]:
    """``config.eval.reference_stats`` (TTUR npz), or the training images' statistics.

    Computed statistics are cached in ``workdir/reference_stats.npz`` (every image of the run's
    training ``source``, as the paper's CIFAR-10 statistics use all 50k train images).
    """
    path = config.eval.reference_stats
    if path:
        if not os.path.exists(path):
            raise ValueError(f"config.eval.reference_stats: no file at {path}; create one with "
                             "`python -m experiments.fid_stats` or unset it to compute them.")
        return fid.load_statistics(path)
    cached = os.path.join(workdir, "reference_stats.npz")
    if os.path.exists(cached):
        return fid.load_statistics(cached)
    n, batch = len(source), config.eval.batch_size
    reporting.say(f"Computing FID reference statistics of {n} training images (once).")
    sharding = NamedSharding(mesh, P("data"))
    pools = []
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch) % n  # the last batch wraps; extra rows dropped
        images, _ = source.read(idx)
        pool, _ = features_fn(jax.device_put(images, sharding))
        pools.append(np.asarray(jax.device_get(pool))[: min(batch, n - start)])
    mu, sigma = fid.feature_statistics(np.concatenate(pools))
    if reporting.is_primary():
        fid.save_statistics(cached, mu, sigma)
    return mu, sigma
