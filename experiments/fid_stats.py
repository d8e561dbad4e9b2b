r"""Computes FID reference statistics of a dataset: TTUR's ``mu`` and ``sigma``, plus the
protocol they were measured under and a sample of features for KID / PRDC
(``ddst_jax.scoring``; ``experiments.evaluate --reference=FILE`` reads it and refuses a
different protocol).

Examples::

    python -m experiments.fid_stats --dataset=cifar10 --split=train --output=cifar10_train.npz
    python -m experiments.fid_stats --dataset=stl10 --split=unlabelled --image_size=48 \
        --output=stl10_48.npz
    python -m experiments.fid_stats --source=npz --path=images.npz --output=stats.npz \
        --weights=/path/to/pt_inception-2015-12-05-6726825d.pth

Images are read at ``--image_size`` (the generator's resolution: the statistics must describe
the images the GAN is compared against), then the FID Inception resizes them to 299x299 with
``--resize`` (pytorch-fid's convention, or ``tf1``: TensorFlow 1's, as the paper's FID).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging

from ddst_jax import data, scoring
from ddst_jax.metrics import fid, inception

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a script, so importing this module (tests) adds no global flags.
    flags.DEFINE_enum("source", "tfds", ["tfds", "npz"], "Where the images come from.")
    flags.DEFINE_string("dataset", "cifar10", "TFDS dataset name (--source=tfds).")
    flags.DEFINE_string("split", "train", "TFDS split, slicing allowed (--source=tfds).")
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: TFDS's default).")
    flags.DEFINE_string("path", None, "--source=npz: file with uint8 (N, H, W, 3) train_images.")
    flags.DEFINE_integer("image_size", 32, "Side length the images are read at, in pixels.")
    flags.DEFINE_string("output", None, "Where to write the statistics (.npz).", required=True)
    flags.DEFINE_string("weights", None, "FID Inception .pth file (default: cache/download).")
    flags.DEFINE_string("cache_dir", None, "Weights cache folder (default ~/.cache/ddst_jax).")
    flags.DEFINE_integer("batch_size", 100, "Images per Inception forward pass.")
    flags.DEFINE_enum("resize", "pytorch", ["pytorch", "tf1"], "Resize convention to 299.")
    flags.DEFINE_integer("max_features", 10_000, "Features kept for KID / PRDC (a random "
                         "sample; 10k x 2048 float32 is 80 MB).")


class _SourceImages:
    """``len`` + slicing over a :class:`ddst_jax.data.ImageSource`, for ``features_batched``."""

    def __init__(self, source: data.ImageSource):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: slice) -> np.ndarray:
        return self._source.read(np.arange(len(self))[index])[0]


def open_images(
    *,
    source: str,
    dataset: str,
    split: str,
    data_dir: str | None,
    path: str | None,
    image_size: int,
) -> data.ImageSource:
    """The images to describe.

    Raises:
      data.DatasetUnavailableError: the dataset or file is missing; the message says how to fix
        it, in this script's flags.
    """
    if source == "npz":
        if not path:
            raise data.DatasetUnavailableError("--source=npz needs --path=FILE.npz.")
        return data.load_npz(path, image_size)
    try:
        return data.load_tfds(dataset, split=split, data_dir=data_dir, image_size=image_size)
    except data.DatasetUnavailableError as e:
        raise data.DatasetUnavailableError(
            f"{e}\n(In this script the options are --data_dir=DIR, or --source=npz --path=FILE "
            "with uint8 train_images.)"
        ) from e


def compute_reference_statistics(
    images: data.ImageSource, variables: inception.Variables, *, batch_size: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu (2048,), sigma (2048, 2048))`` float64 of all images of ``images``."""
    return fid.statistics_of_images(
        variables, _SourceImages(images), batch_size=batch_size, progress=True
    )


def compute_reference(images: data.ImageSource, variables: inception.Variables, *,
                      batch_size: int, resize: str, max_features: int, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu, sigma, a random sample of max_features features)`` of all images."""
    pool, _ = inception.features_batched(variables, _SourceImages(images),
                                         batch_size=batch_size, progress=True, resize=resize)
    mu, sigma = fid.feature_statistics(pool)
    keep = np.random.default_rng(seed).choice(len(pool), min(len(pool), max_features),
                                              replace=False)
    return mu, sigma, pool[np.sort(keep)]


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        images = open_images(
            source=FLAGS.source,
            dataset=FLAGS.dataset,
            split=FLAGS.split,
            data_dir=FLAGS.data_dir,
            path=FLAGS.path,
            image_size=FLAGS.image_size,
        )
        variables = inception.load_weights(FLAGS.weights, cache_dir=FLAGS.cache_dir)
    except (data.DatasetUnavailableError, inception.WeightsUnavailableError) as e:
        raise SystemExit(f"fid_stats: {e}") from e
    what = FLAGS.path if FLAGS.source == "npz" else f"{FLAGS.dataset}/{FLAGS.split}"
    logging.info("FID statistics of %d images of %s at %dpx", len(images), what, FLAGS.image_size)
    start = time.time()
    mu, sigma, features = compute_reference(images, variables, batch_size=FLAGS.batch_size,
                                            resize=FLAGS.resize, max_features=FLAGS.max_features)
    weights = inception.weights_file(FLAGS.weights, cache_dir=FLAGS.cache_dir)
    protocol = {"resize": FLAGS.resize, "inception_sha256": scoring.file_sha256(weights),
                "image_size": FLAGS.image_size, "images": len(images), "source": what,
                **scoring.code_version()}
    scoring.save_reference(FLAGS.output, mu, sigma, features, protocol)
    logging.info("Wrote %s (%d images, %.0f s).", FLAGS.output, len(images), time.time() - start)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
