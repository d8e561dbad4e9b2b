"""Scoring a run's generator, or a set of images, with the protocol beside every number.

FID, IS, KID and precision / recall / density / coverage all read Inception features
(``metrics.inception``), and two FIDs are comparable only when they were measured the same way.
So every score here carries a **protocol**: how many samples, which seed, which generator (the
EMA or the raw one) and BatchNorm mode, which reference images (and the sha256 of the reference
file), which Inception weights (sha256), which resize convention, and which ddst_jax version and
commit produced it. Reference statistics are stored with the protocol they were computed under
(and a sample of their features, for KID and PRDC); scoring against a reference of another
protocol is refused.

Resize conventions (``metrics.inception.RESIZE_MODES``): ``"pytorch"`` (pytorch-fid's bilinear
with half-pixel centres) and ``"tf1"`` (TensorFlow 1's ``resize_bilinear``, no half-pixel
offset, inside the TTUR Inception graph). The paper's code computed its FID with TTUR's
TensorFlow graph, i.e. ``"tf1"``; the runner's in-training FID uses ``"pytorch"``.

Typical use::

    run = load_run("runs/adapt_relaxed_10", checkpoint="best")
    pool, logits = sample_features(run, features_fn, num_samples=50_000, seed=0)
    scores = score(pool, logits, load_reference("cifar10_train_ref.npz"))
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import subprocess
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ddst_jax
from ddst_jax import checkpoint, evaluation, storage, train
from ddst_jax.gan import steps
from ddst_jax.gan.setup import GanSetup
from ddst_jax.metrics import fid, kid_prdc

FeaturesFn = Callable[[Any], tuple[jax.Array, jax.Array]]
GENERATORS = ("ema", "raw")
#: Protocol fields that must agree between a score and its reference statistics.
REFERENCE_KEYS = ("resize", "inception_sha256", "image_size")


class ProtocolMismatch(ValueError):
    """Reference statistics measured under another protocol than the score's."""


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with storage.open_read(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def code_version() -> dict[str, str | None]:
    """``{"ddst_jax": version, "commit": git commit or None}`` of the code running now."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"ddst_jax": ddst_jax.__version__, "commit": commit}


# ----------------------------------------------------------------------------- reference


class Reference(NamedTuple):
    """Reference statistics: mu (D,), sigma (D, D), a sample of features (M, D) or None, and the
    protocol they were computed under (None for a bare TTUR file)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    protocol: dict[str, Any] | None


def save_reference(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray,
                   features: np.ndarray | None, protocol: Mapping[str, Any]) -> None:
    """Writes a reference ``.npz``: TTUR's ``mu``/``sigma`` plus ``features`` and the protocol
    (JSON), atomically (local path or bucket URI)."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64),
              "protocol": np.asarray(json.dumps(dict(protocol), sort_keys=True))}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    storage.atomic_write(path, lambda f: np.savez(f, **arrays))


def load_reference(path: str | os.PathLike) -> Reference:
    """A reference ``.npz`` (ours, or TTUR's with ``mu`` and ``sigma`` only)."""
    mu, sigma = fid.load_statistics(path)
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as f:
        features = f["features"] if "features" in f.files else None
        protocol = json.loads(str(f["protocol"])) if "protocol" in f.files else None
    return Reference(mu, sigma, features, protocol)


def check_reference(reference: Reference, protocol: Mapping[str, Any]) -> list[str]:
    """Refuses a reference measured differently (``ProtocolMismatch`` naming the fields);
    returns notes (e.g. a TTUR file whose protocol is unknown)."""
    if reference.protocol is None:
        return ["the reference file records no protocol (a TTUR-style mu/sigma file): its "
                "resize and Inception weights are unknown; KID and PRDC need its features"]
    differ = {k: (reference.protocol.get(k), protocol.get(k)) for k in REFERENCE_KEYS
              if reference.protocol.get(k) != protocol.get(k)}
    if differ:
        listed = "; ".join(f"{k}: {a!r} (reference) vs {b!r} (now)" for k, (a, b) in differ.items())
        raise ProtocolMismatch(f"The reference statistics were measured under another protocol: "
                               f"{listed}. Recompute them with this protocol (omit the reference "
                               "to compute them from the run's data) or score with theirs.")
    return []


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass
class LoadedRun:
    """A run restored for scoring or sampling: its config, setup, state and checkpoint step."""

    workdir: str
    config: ml_collections.ConfigDict
    setup: GanSetup
    state: steps.TrainState
    step: int
    which: str  # "best", "latest" or the step asked for
    mesh: jax.sharding.Mesh


def load_run(workdir: str, checkpoint_name: str | int = "latest") -> LoadedRun:
    """Restores a run's checkpoint (``"latest"``, ``"best"`` or a step) with its own config."""
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        raise ValueError(f"{workdir} holds no run (no config.json); pass a run's --workdir.")
    config = ml_collections.ConfigDict(json.loads(storage.read_text(path)))
    spec = train.validate_config(config)
    setup = train.build_setup(config, spec)
    mesh = train.make_mesh(config.parallel.num_devices)
    init_fn, _, replicated = train.compile_fns(setup, config, mesh)
    target = checkpoint.abstract_state(jax.eval_shape(init_fn, jax.random.key(config.seed)),
                                       sharding=replicated)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=None)
    try:
        if checkpoint_name == "best":
            restored = ckpt.restore_best(target)
            if restored is None:
                raise ValueError(f"{workdir} has no best checkpoint (it is kept only when FID is "
                                 "evaluated during training); use --checkpoint=latest.")
        elif checkpoint_name == "latest":
            restored = ckpt.restore(target)
        else:
            restored = ckpt.restore(target, step=int(checkpoint_name))
    finally:
        ckpt.close()
    if restored is None:
        raise ValueError(f"{workdir} has no checkpoint yet.")
    return LoadedRun(workdir, config, setup, restored.state,
                     int(restored.metadata["iteration"]), str(checkpoint_name), mesh)


def sample_uint8(run: LoadedRun, start: int, size: int, *, seed: int, generator: str = "ema",
                 bn_mode: str = "train") -> jax.Array:
    """``size`` uint8 samples (size, H, W, 3) of the run's generator; sample ``start + i`` is the
    same whatever the batching (noise drawn per sample from ``seed``)."""
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}.")
    setup, state = run.setup, run.state
    sharding = NamedSharding(run.mesh, P("data"))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
        np.arange(start, start + size))
    z = jax.vmap(lambda k: jax.random.normal(k, (setup.model.z_dim,)))(keys)
    y = None
    if setup.model.num_classes:
        y = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0,
                                                  setup.model.num_classes))(keys)
        y = jax.device_put(y.astype(np.int32), sharding)
    params = state.g_ema if generator == "ema" else state.g_params
    images = _generate(setup, params, state.g_state, state.g_masks, jax.device_put(z, sharding),
                       y, bn_mode == "train")
    return images


@functools.partial(jax.jit, static_argnums=(0, 6))
def _generate(setup, params, g_state, masks, z, y, train_bn):
    images = steps.generate(setup, params, g_state, masks, z, y, train=train_bn)
    return jax.numpy.clip(jax.numpy.round((images + 1.0) * 127.5), 0, 255).astype("uint8")


# ----------------------------------------------------------------------------- scores


def score(pool: np.ndarray, logits: np.ndarray, reference: Reference, *, splits: int = 10,
          kid_subsets: int = 100, kid_subset_size: int = 1000, prdc_k: int = 5,
          prdc_samples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """FID, IS, KID and PRDC of features against a reference (None where it has no features).

    PRDC compares at most ``prdc_samples`` points per side (its cost grows with the product).
    """
    mu, sigma = fid.feature_statistics(pool)
    out: dict[str, Any] = {"fid": float(fid.frechet_distance(mu, sigma, reference.mu,
                                                             reference.sigma))}
    is_mean, is_std = fid.inception_score(logits, splits=min(splits, len(logits)))
    out.update(inception_score=float(is_mean), inception_score_std=float(is_std))
    if reference.features is None:
        out.update(kid=None, kid_std=None, precision=None, recall=None, density=None,
                   coverage=None)
        return out
    kid_mean, kid_std = kid_prdc.kid(reference.features, pool, num_subsets=kid_subsets,
                                     subset_size=kid_subset_size, seed=seed)
    out.update(kid=kid_mean, kid_std=kid_std)
    rng = np.random.default_rng(seed)

    def subset(x: np.ndarray) -> np.ndarray:
        if len(x) <= prdc_samples:
            return x
        return x[np.sort(rng.choice(len(x), prdc_samples, replace=False))]

    k = min(prdc_k, len(pool) - 1, len(reference.features) - 1)
    out.update(kid_prdc.prdc(subset(reference.features), subset(pool), k=k))
    out["prdc_k"] = k
    return out


def reference_from_source(source: Any, features_fn: FeaturesFn, mesh: jax.sharding.Mesh, *,
                          batch_size: int, protocol: Mapping[str, Any],
                          max_features: int = 10_000, seed: int = 0) -> Reference:
    """Statistics of every image of a data source (``data.ImageSource``), and a random sample
    of ``max_features`` of their features for KID / PRDC."""
    n = len(source)
    pool = evaluation.source_features(source, features_fn, mesh, batch_size)
    mu, sigma = fid.feature_statistics(pool)
    keep = np.sort(np.random.default_rng(seed).choice(n, min(n, max_features), replace=False))
    return Reference(mu, sigma, pool[keep], dict(protocol))


def images_from_path(path: str) -> np.ndarray:
    """uint8 NHWC images from a folder of PNG/JPEG files (sorted by name) or an ``.npz``
    (``images`` or ``train_images``)."""
    if storage.isdir(path):
        from PIL import Image  # noqa: PLC0415

        names = [n for n in storage.listdir(path) if n.lower().endswith((".png", ".jpg", ".jpeg"))]
        if not names:
            raise ValueError(f"{path} holds no .png/.jpg images.")
        return np.stack([np.asarray(Image.open(io.BytesIO(storage.read_bytes(
            storage.join(path, n)))).convert("RGB")) for n in names])
    if path.endswith(".npz") and storage.isfile(path):
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as f:
            key = next((k for k in ("images", "train_images") if k in f.files), None)
            if key is None:
                raise ValueError(f"{path} has no 'images' or 'train_images' array.")
            images = f[key]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{path}:{key} must be uint8 (N, H, W, 3), got {images.dtype} "
                             f"{images.shape}.")
        return images
    raise ValueError(f"--images={path}: pass a folder of .png/.jpg files or an .npz file.")
