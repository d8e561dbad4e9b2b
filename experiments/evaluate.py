"""Score a run's checkpoint, or a set of images: FID, IS, KID, precision, recall, density and
coverage, every number with the protocol it was measured under (``ddst_jax.scoring``).

Usage::

    python -m experiments.evaluate --workdir=RUN [--checkpoint=latest|best|STEP]
        [--generator=ema|raw] [--bn_mode=train|eval] [--num_samples=N] [--seed=0]
        [--resize=pytorch|tf1] [--reference=REF.npz] [--inception_weights=PATH] [--output=F]
    python -m experiments.evaluate --images=DIR_OR_NPZ --reference=REF.npz [...]

Without ``--reference`` the reference statistics are computed from the run's own training
data (``config.data``) under this protocol and cached in ``RUN/eval/``. ``--reference`` takes a
file written by this command or ``python -m experiments.fid_stats`` (protocol and features
stored) or a bare TTUR ``mu``/``sigma`` file (FID only; its protocol is unknown and the JSON
says so). A reference of another protocol (resize, Inception weights, image size) is refused.

Writes the JSON (default ``RUN/eval/<checkpoint>_<generator>_<resize>.json``) and prints it.
Defaults: the run's ``eval.num_samples`` and ``eval.bn_mode``, the EMA generator, the latest
checkpoint, pytorch-fid's resize (``--resize=tf1`` is the TensorFlow convention of the paper's
FID numbers).
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from typing import Any

from absl import app, flags

from ddst_jax import storage

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a script, so importing this module (tests) adds no flags.
    flags.DEFINE_string("workdir", None, "Run directory to score.")
    flags.DEFINE_string("images", None, "Instead of a run: a folder of images or an npz.")
    flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step.")
    flags.DEFINE_enum("generator", "ema", ["ema", "raw"], "Which G to sample.")
    flags.DEFINE_enum("bn_mode", None, ["train", "eval"],
                      "G's BatchNorm when sampling (default: the run's eval.bn_mode).")
    flags.DEFINE_integer("num_samples", None,
                         "Generated samples (default: the run's eval.num_samples).")
    flags.DEFINE_integer("seed", 0, "Seed of the samples and of the KID/PRDC subsets.")
    flags.DEFINE_enum("resize", "pytorch", ["pytorch", "tf1"],
                      "Resize to 299: pytorch-fid's, or TensorFlow 1's (the paper's FID).")
    flags.DEFINE_string("reference", None, "Reference statistics .npz.")
    flags.DEFINE_string("inception_weights", None,
                        "pt_inception-2015-12-05-6726825d.pth (default: cache/download).")
    flags.DEFINE_integer("batch_size", None, "Images per Inception batch.")
    flags.DEFINE_string("output", None, "Where to write the JSON.")
    flags.DEFINE_bool("verbose", False, "Full tracebacks and library logs.")


def evaluate(workdir: str | None = None, *, images: str | None = None,
             checkpoint: str = "latest", generator: str = "ema", bn_mode: str | None = None,
             num_samples: int | None = None, seed: int = 0, resize: str = "pytorch",
             reference: str | None = None, inception_weights: str | None = None,
             batch_size: int | None = None, kid_subsets: int = 100,
             kid_subset_size: int = 1000, prdc_k: int = 5, prdc_samples: int = 10_000,
             output: str | None = None) -> dict[str, Any]:
    """Scores and protocol as a dict (also written to ``output``, or under ``RUN/eval/``)."""
    import jax  # noqa: PLC0415 (after flag parsing: keeps --help fast)

    from ddst_jax import data, reporting, scoring, train  # noqa: PLC0415
    from ddst_jax.metrics import inception  # noqa: PLC0415

    if (workdir is None) == (images is None):
        raise ValueError("Pass exactly one of --workdir (score a run) and --images.")
    run = scoring.load_run(workdir, checkpoint) if workdir is not None else None
    weights = inception.weights_file(inception_weights)
    variables = inception.load_weights(weights)

    def features_fn(batch):
        return inception.features(variables, batch, resize=resize)

    started = time.perf_counter()
    protocol: dict[str, Any] = {
        "resize": resize, "inception_sha256": scoring.file_sha256(weights), "seed": seed,
        "kid": {"subsets": kid_subsets, "subset_size": kid_subset_size},
        "prdc": {"k": prdc_k, "max_samples": prdc_samples}, **scoring.code_version(),
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "backend": jax.default_backend(), "devices": jax.device_count()}
    notes: list[str] = []
    if run is not None:
        num_samples = num_samples or int(run.config.eval.num_samples)
        bn_mode = bn_mode or run.config.eval.get("bn_mode", "train")
        batch_size = batch_size or int(run.config.eval.batch_size)
        size = run.setup.model.image_shape[0]
        protocol.update(source="generator", workdir=storage.resolve(workdir),
                        checkpoint=run.which, step=run.step, generator=generator,
                        bn_mode=bn_mode, num_samples=num_samples, image_size=size,
                        model=run.config.model.name)

        def batch_of(start: int, n: int):
            return scoring.sample_uint8(run, start, n, seed=seed, generator=generator,
                                        bn_mode=bn_mode)

        pool, logits = inception.batched(features_fn, batch_of, num_samples, batch_size)
    else:
        array = scoring.images_from_path(images)
        batch_size = batch_size or 100
        size = array.shape[1]
        protocol.update(source="images", images=storage.resolve(images),
                        images_sha256=(scoring.file_sha256(images)
                                       if storage.isfile(images) else None),
                        num_samples=len(array), image_size=size)
        pool, logits = inception.features_batched(variables, array, batch_size=batch_size,
                                                  resize=resize)
    if reference is not None:
        ref = scoring.load_reference(reference)
        ref_source = {"file": storage.resolve(reference),
                      "sha256": scoring.file_sha256(reference)}
    elif workdir is not None:
        ref, ref_source = _run_reference(run, features_fn, protocol, batch_size, data,
                                         scoring, train)
    else:
        raise ValueError("--images needs --reference=REF.npz (statistics of the real images).")
    notes += scoring.check_reference(ref, protocol)
    protocol["reference"] = {**ref_source, "protocol": ref.protocol}
    scores = scoring.score(pool, logits, ref, kid_subsets=kid_subsets,
                           kid_subset_size=kid_subset_size, prdc_k=prdc_k,
                           prdc_samples=prdc_samples, seed=seed)
    protocol["seconds"] = round(time.perf_counter() - started, 1)
    result = {"scores": scores, "protocol": protocol, "notes": notes}
    if output is None and workdir is not None:
        output = storage.join(workdir, "eval", f"{run.which}_{generator}_{resize}.json")
    if output is not None:
        reporting.write_summary(output, result)
        result["output"] = output
    return result


def _run_reference(run, features_fn, protocol, batch_size, data, scoring, train):
    """The run's training images' reference under ``protocol``, cached in ``RUN/eval/``."""
    ref_protocol = {k: protocol[k] for k in scoring.REFERENCE_KEYS}
    name = f"reference_{protocol['resize']}_{protocol['inception_sha256'][:12]}.npz"
    path = storage.join(run.workdir, "eval", name)
    if not storage.exists(path):
        source = data.load_source(run.config.data, seed=run.config.seed)
        described = {**ref_protocol, "data": run.config.data.to_dict(), "images": len(source)}
        ref = scoring.reference_from_source(source, features_fn, run.mesh,
                                            batch_size=batch_size, protocol=described)
        scoring.save_reference(path, ref.mu, ref.sigma, ref.features, ref.protocol)
    return scoring.load_reference(path), {"file": path, "sha256": scoring.file_sha256(path),
                                          "computed_from": "the run's training data"}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from experiments import runner  # noqa: PLC0415

    if not FLAGS.verbose:
        runner.quiet_libraries()
    workdir = FLAGS.workdir
    try:
        result = evaluate(workdir, images=FLAGS.images, checkpoint=FLAGS.checkpoint,
                          generator=FLAGS.generator, bn_mode=FLAGS.bn_mode,
                          num_samples=FLAGS.num_samples, seed=FLAGS.seed,
                          resize=FLAGS.resize, reference=FLAGS.reference,
                          inception_weights=FLAGS.inception_weights, batch_size=FLAGS.batch_size,
                          output=FLAGS.output)
    except Exception as e:  # noqa: BLE001
        message = runner.user_error(e, storage.resolve(workdir or "."))
        if message is None or FLAGS.verbose:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result, indent=2, sort_keys=True, default=str))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
